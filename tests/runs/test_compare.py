import json
import math

import pytest
import torch

from cdprune.errors import ConfigError
from cdprune.finetune.config import TrainConfig
from cdprune.importance.criteria import (
    CRITERIA,
    bn_scale_scores,
    fpgm_scores,
    l1_scores,
    random_scores,
    taylor_scores,
)
from cdprune.runs.compare import compare_criteria, write_comparison

from ..helpers import SmallNet, make_loader


def test_baseline_scores_have_one_value_per_filter(small_net, loader):
    example = torch.randn(2, 3, 8, 8)
    for scores in (l1_scores(small_net), fpgm_scores(small_net), random_scores(small_net, 3),
                   bn_scale_scores(small_net, example), taylor_scores(small_net, loader)):
        assert set(scores) == {"conv1", "conv2", "conv3"}
        assert scores["conv3"].shape == (16,) and torch.isfinite(scores["conv3"]).all()
    assert torch.allclose(l1_scores(small_net)["conv1"],
                          small_net.conv1.weight.abs().sum((1, 2, 3)))
    assert torch.allclose(bn_scale_scores(small_net, example)["conv2"],
                          small_net.bn2.weight.abs())
    assert all(p.grad is None for p in small_net.parameters())  # taylor cleans up
    assert not torch.equal(random_scores(small_net, 0)["conv1"],
                           random_scores(small_net, 1)["conv1"])


def test_compare_all_criteria_end_to_end(tmp_path):
    torch.manual_seed(0)
    small_net = SmallNet(width=32).eval()  # wide enough to land within 0.3 points
    train = make_loader(n=32, batch_size=16, seed=1)
    val = make_loader(n=32, batch_size=16, seed=2)
    rows = compare_criteria(
        small_net, train_loader=train, val_loader=val, stats_loader=train,
        example_inputs=torch.randn(2, 3, 8, 8), macs_reductions=[0.3, 0.5],
        criteria=CRITERIA, finetune=TrainConfig(epochs=1, lr=0.01, batch_size=16),
        output_dir=tmp_path, random_seeds=(0, 1), num_classes=4, progress=False)
    assert len(rows) == 2 * (len(CRITERIA) + 1)
    for row in rows:
        assert abs(row["macs_reduction"] - row["macs_target"]) <= 0.003
        assert 0 <= row["acc_pruned"] <= 100 and not math.isnan(row["acc_finetuned"])
        # SmallNet's residual stream: the paper's counter credits less than is removed.
        assert row["macs_paper"] >= row["macs"]
    assert len({r["macs_target"] for r in rows}) == 2
    js, md = write_comparison(tmp_path, rows, {"model": "small_net"})
    doc = json.loads(js.read_text())
    assert len(doc["summary"]) == 2 * len(CRITERIA)
    random_line = next(s for s in doc["summary"] if s["criterion"] == "random")
    assert random_line["runs"] == 2
    text = md.read_text()
    assert "CDP (class documents)" in text and "(2 seeds)" in text
    assert "MACs (paper convention)" in text
    assert (tmp_path / "compare.png").is_file()


def test_compare_rejects_bad_input(small_net, loader, tmp_path):
    kwargs = dict(train_loader=loader, val_loader=loader, stats_loader=loader,
                  example_inputs=torch.randn(1, 3, 8, 8), output_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown criteria"):
        compare_criteria(small_net, macs_reductions=[0.5], criteria=["no_such_criterion"], **kwargs)
    with pytest.raises(ConfigError, match="outside"):
        compare_criteria(small_net, macs_reductions=[1.5], criteria=["l1"], **kwargs)


def test_cdp_options_and_allocation_reach_every_criterion(tmp_path, monkeypatch):
    import cdprune.importance.scoring as scoring
    import cdprune.importance.stats as stats
    import cdprune.runs.compare as compare

    seen: dict[str, list] = {"stats": [], "scores": [], "prune": []}
    real_stats, real_scores, real_prune = (stats.collect_stats, scoring.tfidf_scores,
                                           compare.prune)

    def spy(kind, fn):
        def wrapped(*args, **kwargs):
            seen[kind].append(kwargs)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(stats, "collect_stats", spy("stats", real_stats))
    monkeypatch.setattr(scoring, "tfidf_scores", spy("scores", real_scores))
    monkeypatch.setattr(compare, "prune", spy("prune", real_prune))
    torch.manual_seed(0)
    net = SmallNet(width=32).eval()
    loader = make_loader(n=32, batch_size=16, seed=1)
    rows = compare_criteria(
        net, train_loader=loader, val_loader=loader, stats_loader=loader,
        example_inputs=torch.randn(2, 3, 8, 8), macs_reductions=[0.5],
        criteria=["cdp", "l1"], finetune=None, output_dir=tmp_path, num_classes=4,
        cdp_options={"tap": "act", "normalize": "mean"}, allocation="uniform", progress=False)
    assert [r["criterion"] for r in rows] == ["cdp", "l1"]
    assert seen["stats"][0]["tap"] == "act" and seen["scores"][0]["normalize"] == "mean"
    assert [k["allocation"] for k in seen["prune"]] == ["uniform", "uniform"]
    with pytest.raises(ConfigError, match="documents"):
        compare_criteria(net, train_loader=loader, val_loader=loader, stats_loader=loader,
                         example_inputs=torch.randn(2, 3, 8, 8), macs_reductions=[0.5],
                         output_dir=tmp_path, cdp_options={"documents": "class"})


def test_comparison_json_is_strict_and_resumes_with_nan(tmp_path):
    from cdprune.runs.compare import read_comparison

    row = {"macs_target": 0.3, "criterion": "l1", "seed": None, "status": "done",
           "macs": 100, "macs_paper": 100, "params": 10, "macs_reduction": 0.3,
           "acc_base": 90.0, "acc_pruned": 50.0, "acc_recalibrated": math.nan,
           "acc_finetuned": math.nan, "seconds": 1.0}
    js, _ = write_comparison(tmp_path, [row], {"model": "m"})
    text = js.read_text()
    assert "NaN" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in compare.json"))
    back = read_comparison(js)
    assert math.isnan(back[0]["acc_finetuned"]) and back[0]["acc_pruned"] == 50.0
    # One target is a figure too, as the README lists it.
    assert (tmp_path / "compare.png").is_file()
    (tmp_path / "compare.json").write_text('{"rows": [1, 2]}')
    with pytest.raises(ConfigError, match="not a comparison"):
        read_comparison(tmp_path / "compare.json")


def test_compare_masked_gives_the_masked_and_the_compact_network(tmp_path):
    """--prune-mode mask (the published network): every criterion masked at the paper's
    MACs, fine-tuned with its masks held, then compacted and measured beside it."""
    from cdprune.measure.macs import count_params, paper_macs
    from cdprune.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=4).eval()
    train = make_loader(n=32, batch_size=16, seed=1)
    val = make_loader(n=32, batch_size=16, seed=2)
    example = torch.randn(2, 3, 8, 8)
    base_paper = paper_macs(model, {}, example_inputs=example)
    rows = compare_criteria(
        model, train_loader=train, val_loader=val, stats_loader=train, example_inputs=example,
        macs_reductions=[0.4], criteria=["cdp", "l1"], num_classes=4, progress=False,
        finetune=TrainConfig(epochs=1, lr=0.01, batch_size=16), output_dir=tmp_path,
        prune_mode="mask", recal_loader=train, compact_recalibrate=32)
    assert [r["criterion"] for r in rows] == ["cdp", "l1"]
    for row in rows:
        assert abs(row["macs_paper"] - 0.6 * base_paper) <= 0.003 * base_paper
        assert row["params"] < row["params_masked"] == count_params(model)
        assert 0 <= row["acc_compact"] <= 100 and row["compact"]["bn_recalibrate_images"] == 32
        assert row["latency_compact_ms"] > 0 and row["latency_masked_ms"] > 0
        folder = tmp_path / row["model_dir"]
        assert (folder / "compact" / "plan.json").is_file()
        # the masks held through fine-tuning
        state = torch.load(folder / "last.pth", weights_only=True)["model"]
        masks = json.loads((folder / "pruned" / "plan.json").read_text())["masked"]
        assert masks and all(state[f"{conv}.weight"][idx].abs().max() == 0
                             for conv, idx in masks.items())
    _, md = write_comparison(tmp_path, rows, {"model": "resnet20"})
    text = md.read_text()
    assert "compact top-1" in text and "latency masked / compact" in text
    with pytest.raises(ConfigError, match="prune_mode"):
        compare_criteria(model, train_loader=train, val_loader=val, stats_loader=train,
                         example_inputs=example, macs_reductions=[0.4], criteria=["l1"],
                         output_dir=tmp_path / "x", prune_mode="cut")
