"""The published code's network: its selection, masks held through fine-tuning, reports."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from cdprune.cli import main
from cdprune.errors import ConfigError
from cdprune.finetune.config import TrainConfig
from cdprune.finetune.loop import fine_tune
from cdprune.measure.macs import count_macs, paper_macs
from cdprune.models import create_model
from cdprune.pruning.masking import (
    FilterMasks,
    channel_cut,
    kept_of,
    mask_filters,
    masked_result,
    published_search,
    published_selection,
    removed_by_plan,
)

from ..helpers import SmallNet, make_loader, random_scores

DATA = ["--dataset", "digits", "-b", "64", "-j", "0", "--no-progress"]
FAST = ["--model", "digits_cnn", "--random-init", *DATA, "--stats-batch-size", "64",
        "--stop-batch", "4"]


def _kind(name: str) -> str:
    if name == "conv1":
        return "stem"
    return "block-first" if name.endswith(".conv1") else "residual-output"


def test_published_selection_masks_814_of_resnet56s_2032_filters_at_sparsity_04():
    model = create_model("resnet56", num_classes=10)
    scores = random_scores(model, seed=3)
    assert sum(s.numel() for s in scores.values()) == 2032
    removed = published_selection(scores, 0.4)
    assert sum(map(len, removed.values())) == 814  # 2032 - int(2032 * 0.6) + 1
    kinds = {_kind(n) for n in removed}
    assert kinds == {"stem", "block-first", "residual-output"}
    # Every masked filter scores at or below every kept one: one global ranking.
    flat_removed = torch.cat([scores[n][v] for n, v in removed.items()])
    kept = torch.cat([scores[n][[i for i in range(len(s)) if i not in removed.get(n, [])]]
                      for n, s in scores.items()])
    assert flat_removed.max() < kept.min()


def test_published_threshold_removes_ties_and_spares_layers_the_rule_spares():
    scores = {"a": torch.tensor([0.1, 0.5, 0.5, 0.9]), "b": torch.tensor([0.5, 0.7]),
              "c": torch.tensor([0.0])}
    # N=7, s=0.4: threshold is the int(7*0.6)=4th highest score, 0.5; every 0.5 goes.
    # "b": int(2*0.4) = 0 filters asked, so it is left whole; "c" has a single filter.
    assert published_selection(scores, 0.4) == {"a": [0, 1, 2]}
    with pytest.raises(ConfigError, match="sparsity"):
        published_selection(scores, 1.0)


@pytest.mark.parametrize("model_name,target", [("resnet20", 20.76e6), ("resnet56", 60.02e6)])
def test_published_search_lands_on_the_paper_macs(model_name, target):
    model = create_model(model_name, num_classes=10)
    scores = random_scores(model, seed=1)
    example = torch.randn(2, 3, 32, 32)
    sparsity, removed = published_search(model, scores, round(target), example_inputs=example)
    assert removed == published_selection(scores, sparsity)
    got = paper_macs(model, kept_of(model, removed), example_inputs=example)
    base = count_macs(model, example_inputs=example)
    # Within 0.3 points, or (ResNet-20: one stage-1 filter is 0.7% of its MACs) the closest
    # count: one filter more or less lands farther away.
    closest = min(abs(paper_macs(model, kept_of(model, published_selection(scores, s)),
                                 example_inputs=example) - target)
                  for s in (sparsity - 0.6 / 2032, sparsity + 0.6 / 2032))
    assert abs(got - target) <= 0.003 * base or abs(got - target) <= closest


def test_masked_result_zeroes_filters_and_keeps_the_architecture():
    model = SmallNet().eval()
    removed = {"conv1": [0, 3], "conv3": [5]}
    result = masked_result(model, removed, example_inputs=torch.randn(2, 3, 8, 8))
    assert result.plan["mode"] == "mask" and result.plan["steps"] == []
    assert removed_by_plan(result.plan, result.widths_before) == removed
    assert result.macs_after == result.macs_before and result.removed_filters == 3
    w = dict(result.model.named_modules())
    assert w["conv1"].weight[[0, 3]].abs().sum() == 0 and w["conv3"].weight[5].abs().sum() == 0
    assert w["conv1"].weight[1].abs().sum() > 0
    assert torch.equal(w["bn1"].bias, model.bn1.bias)  # BatchNorm untouched
    with pytest.raises(ConfigError, match="fc"):
        mask_filters(copy.deepcopy(model), {"fc": [0]})


def test_channel_cut_removes_private_channels_only():
    model = create_model("resnet20", num_classes=10).eval()
    removed = {"layer1.0.conv1": [0, 1, 2], "layer1.0.conv2": [4], "conv1": [5]}
    cut = channel_cut(model, removed, example_inputs=torch.randn(2, 3, 32, 32))
    # The block-internal filters go; the stem's and the residual output's stream stays.
    assert cut.widths_after["layer1.0.conv1"] == 13
    assert cut.widths_after["layer1.0.conv2"] == 16 and cut.widths_after["conv1"] == 16
    assert removed_by_plan(cut.plan, cut.widths_before) == {"layer1.0.conv1": [0, 1, 2]}
    assert cut.macs_after == count_macs(cut.model, input_size=(3, 32, 32)) < cut.macs_before


@pytest.mark.parametrize("nesterov", [True, False])
def test_masked_fine_tuning_keeps_masked_filters_exactly_zero(tmp_path, nesterov):
    torch.manual_seed(0)
    model = SmallNet()
    removed = {"conv1": [1, 2], "conv2": [0, 7], "conv3": [3]}
    mask_filters(model, removed)
    with torch.no_grad():  # a masked channel then carries a constant ReLU passes
        model.bn1.bias.fill_(0.1)
    # Nonzero gradients, momentum and weight decay all push on the masked weights.
    config = TrainConfig(epochs=3, lr=0.1, momentum=0.9, weight_decay=5e-3,
                         nesterov=nesterov, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fine_tune(model, make_loader(), make_loader(), config, output_dir=tmp_path,
              progress=False, masks=removed)
    convs = dict(model.named_modules())
    for name, idxs in removed.items():
        assert convs[name].weight[idxs].abs().max() == 0, name
        kept = [i for i in range(convs[name].out_channels) if i not in idxs]
        assert not torch.equal(convs[name].weight[kept], before[f"{name}.weight"][kept])
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["extra"]["masks"] == removed
    momentum = state["optimizer"]["state"]
    assert any(v["momentum_buffer"].abs().sum() > 0 for v in momentum.values())
    # BatchNorm of masked channels keeps training: its bias moves.
    assert not torch.equal(convs["bn1"].bias[[1, 2]], before["bn1.bias"][[1, 2]])


def test_filter_masks_clear_revived_weights_and_buffers():
    model = SmallNet()
    masks = FilterMasks(model, {"conv2": [3]})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    opt.step()  # unmasked step: the filter and its momentum are nonzero now
    assert model.conv2.weight[3].abs().sum() > 0
    masks.after_step(opt)
    assert model.conv2.weight[3].abs().sum() == 0
    assert opt.state[model.conv2.weight]["momentum_buffer"][3].abs().sum() == 0


def test_masked_fine_tuning_resumes_like_an_uninterrupted_run(tmp_path):
    removed = {"conv2": [1, 5]}
    config = TrainConfig(epochs=2, lr=0.05, momentum=0.9, weight_decay=5e-4, seed=0)
    models = []
    for name, stops in (("whole", [False]), ("resumed", [True, False])):
        torch.manual_seed(0)
        model = mask_filters(SmallNet(), removed)
        for i, stop in enumerate(stops):  # stop: interrupted after the first epoch
            fine_tune(model, make_loader(), make_loader(), config,
                      output_dir=tmp_path / name, progress=False, masks=removed,
                      resume=i > 0, callback=lambda record, stop=stop: stop)
        models.append(model)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)
    assert models[1].conv2.weight[[1, 5]].abs().max() == 0


@pytest.mark.slow
def test_published_masked_run_reports_and_evaluates_the_masked_network(tmp_path, capsys):
    """Prune with --variant published: masks by default; eval --weights pruned is the base
    model with those filters zeroed; report.json lists them."""
    base = create_model("digits_cnn", num_classes=10)
    torch.save(base.state_dict(), tmp_path / "base.pth")
    out = tmp_path / "run"
    assert main([*map(str, ["run", *FAST, "--checkpoint", tmp_path / "base.pth",
                            "--variant", "published", "--sparsity", "0.3", "--epochs", "1",
                            "--output-dir", out])]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    removed = report["removed_filters"]
    total = sum(m.out_channels for m in base.modules() if isinstance(m, nn.Conv2d))
    assert sum(map(len, removed.values())) == total - int(total * 0.7) + 1
    assert report["pruning"]["prune_mode"] == "mask"
    pruning = report["pruning"]
    # A plain CNN: the cut realises about what the paper credits (its linear layer counts
    # in full on the paper's side, shrunk on the cut's).
    assert pruning["macs_channel_cut"] < pruning["macs_before"] == pruning["macs_after"]
    assert abs(pruning["macs_paper_after"] - pruning["macs_channel_cut"]) \
        < 0.01 * pruning["macs_before"]
    assert "compact network" in (out / "report.md").read_text()
    # Compaction does not know this architecture: the report says so, the run succeeds.
    assert "DigitsCNN" in report["deployable"]["unsupported"]
    capsys.readouterr()
    assert main(["eval", *DATA, "--model-dir", str(out), "--weights", "pruned"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    from cdprune.data import build_dataset, build_loader
    from cdprune.measure.evaluate import evaluate

    zeroed = mask_filters(copy.deepcopy(base), {k: v for k, v in removed.items()})
    test = build_loader(build_dataset("digits", train=False), 64, shuffle=False)
    assert evaluated["top1"] == pytest.approx(evaluate(zeroed, test, progress=False).top1)
    from cdprune.runs.modeldir import load_pruned_dir

    pruned, _ = load_pruned_dir(out, {"weights": "pruned"}, 10)
    images = next(iter(test))[0]
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(images), zeroed.eval()(images), atol=1e-6)
        finetuned, _ = load_pruned_dir(out, {"weights": "final"}, 10)
    convs = dict(finetuned.named_modules())
    assert all(convs[n].weight[v].abs().max() == 0 for n, v in removed.items())


@pytest.mark.slow
def test_remove_mode_reports_the_removed_filters_in_original_numbering(tmp_path, capsys):
    out = tmp_path / "p"
    assert main([*map(str, ["run", *FAST, "--sparsity", "0.3", "--epochs", "1",
                            "--output-dir", out])]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "pruned" / "plan.json").read_text())
    assert report["pruning"]["prune_mode"] == "remove"
    removed = report["removed_filters"]
    assert removed and removed == plan["removed_filters"]
    for name, idxs in removed.items():
        width = report["pruning"]["widths_before"][name]
        assert sorted(set(plan["kept"][name]) | set(idxs)) == list(range(width))
        assert report["pruning"]["widths_after"][name] == width - len(idxs)


def test_the_compact_networks_numbers_come_from_compaction():
    """The report's compact row: measured by compact() on a model it knows, a stated
    reason on one it does not."""
    from cdprune.measure.macs import count_macs
    from cdprune.models import create_model
    from cdprune.pruning import compact
    from cdprune.runs.pipeline import compact_summary

    example = torch.randn(2, 3, 32, 32)
    model = create_model("resnet20", num_classes=10).eval()
    removed = {"layer1.0.conv1": [0, 1, 2], "layer2.1.conv2": [5], "conv1": [3]}
    result = masked_result(model, removed, example_inputs=example)
    numbers = compact_summary(model, result, example)
    small, _ = compact(result.model, removed, example_inputs=example)
    assert numbers["macs"] == count_macs(small, example_inputs=example[:1])
    assert numbers["macs"] < result.macs_after and numbers["params"] < result.params_after
    other = SmallNet().eval()
    unknown = masked_result(other, {"conv3": [0, 1]}, example_inputs=torch.randn(2, 3, 8, 8))
    told = compact_summary(other, unknown, torch.randn(2, 3, 8, 8))
    assert "SmallNet" in told["unsupported"] and "macs" not in told


@pytest.mark.parametrize("options,needle", [
    ({"round_to": 8, "sparsity": 0.3}, "round_to does not apply to variant published"),
    ({"ignore_layers": ["conv2"], "sparsity": 0.3}, "ignore_layers does not apply"),
    ({"macs_target": "100K"}, "macs_convention paper"),
    ({"latency_reduction": 0.3}, "latency"),
])
def test_published_variant_refuses_options_it_cannot_honour(options, needle):
    from cdprune.pruning.config import PruneConfig
    from cdprune.runs.pipeline import _published_prune

    model = SmallNet().eval()
    with pytest.raises(ConfigError, match=needle):
        _published_prune({"macs_convention": "physical"}, PruneConfig(**options), model,
                         random_scores(model), torch.randn(2, 3, 8, 8), "mask")
