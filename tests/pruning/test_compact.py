"""Compaction of masked networks: exact where it says so, measured where it is not."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdprune import compact, mask_filters, recalibrate_bn
from cdprune.errors import CheckpointError, ConfigError, UnsupportedModelError
from cdprune.measure.macs import count_macs, paper_macs
from cdprune.models import create_model
from cdprune.pruning import ScatterBatchNorm2d, load_pruned, save_compact
from cdprune.runs.locate import load_run_model

from ..helpers import SmallNet, make_loader, randomize_bn

# name, input size: option-A and option-B CIFAR ResNets, ImageNet BasicBlock and
# Bottleneck ResNets (small inputs keep them quick), VGG.
ARCHS = [("resnet20", 32), ("resnet20b", 32), ("resnet18", 64), ("resnet50", 64),
         ("vgg16_cifar", 32)]


def base(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(create_model(name, num_classes=10))


def conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def stream_convs(model: nn.Module) -> list[str]:
    """Convolutions whose BatchNorm output joins the residual stream."""
    names = conv_names(model)
    last = "conv3" if any(n.endswith("conv3") for n in names) else "conv2"
    return [n for n in names if n == "conv1" or n.endswith(last) or "downsample" in n]


def random_masks(model: nn.Module, names: list[str], fraction: float = 0.4, seed: int = 1
                 ) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        width = modules[name].out_channels
        out[name] = sorted(torch.randperm(width, generator=g)[:max(1, int(width * fraction))]
                           .tolist())
    return out


def masked_output(model: nn.Module, masks: dict[str, list[int]], x: torch.Tensor
                  ) -> torch.Tensor:
    """The masked network's output, computed independently of compact()."""
    with torch.no_grad():
        return mask_filters(copy.deepcopy(model), masks).eval()(x)


def exact_masks(name: str, model: nn.Module) -> dict[str, list[int]]:
    """Masks compaction must handle exactly: every residual-output filter kind, plus the
    folds into unpadded layers (a bottleneck's middle conv, VGG's last conv), plus one
    layer masked completely."""
    names = conv_names(model)
    if name.startswith("vgg"):
        return random_masks(model, names[-1:])
    chosen = stream_convs(model) + [n for n in names if n.endswith("conv2")
                                    and name == "resnet50"]
    masks = random_masks(model, chosen)
    full = stream_convs(model)[-1]
    masks[full] = list(range(dict(model.named_modules())[full].out_channels))
    return masks


@pytest.mark.parametrize("name,size", ARCHS)
def test_compaction_is_exact_where_it_claims(name, size):
    model = base(name)
    masks = exact_masks(name, model)
    x = torch.randn(4, 3, size, size)
    small, info = compact(model, masks, example_inputs=x)
    with torch.no_grad():
        diff = (small(x) - masked_output(model, masks, x)).abs().max().item()
    assert diff <= 1e-4 and info.max_abs_error <= 1e-4
    assert info.removed_border == 0 and info.removed_exact > 0
    assert info.kept_masked == (0 if name.startswith("vgg") else 1)
    assert info.macs < info.macs_masked == count_macs(model, example_inputs=x)
    assert info.params < info.params_masked
    # The masked filters are gone: every compacted conv is narrower by what was masked.
    widths = {n: m.out_channels for n, m in small.named_modules() if isinstance(m, nn.Conv2d)}
    for conv, idxs in masks.items():
        full = dict(model.named_modules())[conv].out_channels
        assert widths[conv] == max(1, full - len(idxs))
    assert isinstance(model, type(small)) and not any(
        isinstance(m, ScatterBatchNorm2d) for m in model.modules())  # the input is untouched


@pytest.mark.parametrize("name,size", [  # the paper's MACs on ResNets: resnet50 in the full suite
    pytest.param(*a, marks=pytest.mark.slow) if a[0] == "resnet50" else a for a in ARCHS])
def test_all_convs_masked_paper_macs_and_error_measured(name, size):
    """The published code masks every conv; compaction then realises the paper's MACs
    on ResNets (the stream keeps its width, as the paper's counter assumes)."""
    model = base(name)
    masks = random_masks(model, conv_names(model))
    x = torch.randn(2, 3, size, size)
    small, info = compact(model, masks, example_inputs=x)
    modules = dict(model.named_modules())
    kept = {n: sorted(set(range(modules[n].out_channels)) - set(idxs)) for n, idxs in masks.items()}
    assert info.macs_paper == paper_macs(model, kept, example_inputs=x)
    if name.startswith("resnet"):
        assert info.macs == info.macs_paper
    else:  # VGG's classifier loses the inputs the paper's counter still charges
        assert info.macs < info.macs_paper
    assert info.removed_border > 0
    assert sum(len(v) for v in masks.values()) == (info.removed_exact + info.removed_border
                                                    + info.kept_masked)
    with torch.no_grad():
        diff = (small(x) - masked_output(model, masks, x)).abs().max().item()
    assert diff == pytest.approx(info.max_abs_error, rel=1e-4, abs=1e-6)
    assert 0 < info.max_abs_error < 0.5 * masked_output(model, masks, x).abs().max().item()


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_block_first_fold_differs_only_at_the_borders_by_the_padded_taps(name):
    """A block-first filter's constant folded into the next conv: inside the image the
    compact conv computes exactly the masked one; on the border the difference is the
    constant times the kernel taps that fell on zero padding, nothing else."""
    model = base(name)
    masks = random_masks(model, ["layer1.0.conv1"], fraction=0.5)
    small, info = compact(model, masks, input_size=(3, 32, 32))
    assert info.layers == {"layer1.0.conv1": "fold-border"}
    assert info.removed_border == len(masks["layer1.0.conv1"]) and info.max_abs_error > 0
    masked = mask_filters(copy.deepcopy(model), masks).eval()
    seen = {}

    def grab(key):
        def hook(module, args, out):
            seen[key] = out
        return hook

    masked.layer1[0].conv2.register_forward_hook(grab("masked"))
    small.layer1[0].conv2.register_forward_hook(grab("small"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        masked(x), small(x)
    diff = seen["small"] - seen["masked"]
    assert diff[:, :, 1:-1, 1:-1].abs().max() <= 1e-4
    # Expected: sum of all taps times ReLU(c) minus the taps that saw the image.
    bn, conv2 = model.layer1[0].bn1, model.layer1[0].conv2
    gone = torch.tensor(masks["layer1.0.conv1"])
    c = (bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps))[gone]
    const = torch.relu(c).view(1, -1, 1, 1).expand(1, -1, *diff.shape[2:])
    with torch.no_grad():
        w = conv2.weight[:, gone]
        expected = torch.einsum("oikl,i->o", w, torch.relu(c)).view(1, -1, 1, 1) \
            - F.conv2d(const, w, padding=1)
    assert torch.allclose(diff, expected.expand_as(diff), atol=1e-4)
    assert expected[:, :, 0].abs().max() > 1e-3  # the border really differs


def test_recalibration_and_training_of_the_compact_network():
    model = base("resnet20b")
    masks = random_masks(model, conv_names(model))
    small, _ = compact(model, masks, input_size=(3, 32, 32))
    scatter = small.layer1[0].bn2
    assert isinstance(scatter, ScatterBatchNorm2d)
    fill = scatter.fill.detach().clone()
    loader = [(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))]
    assert recalibrate_bn(small, loader, 8) == 8
    assert torch.equal(scatter.fill, fill)  # constants are parameters, not statistics
    assert scatter.running_mean.shape == (scatter.num_features,)
    small.train()
    small(torch.randn(4, 3, 32, 32)).sum().backward()
    assert scatter.fill.grad is not None and scatter.fill.grad.abs().sum() > 0


def test_unknown_models_and_bad_masks_are_refused():
    with pytest.raises(UnsupportedModelError, match="SmallNet.*resnet20"):
        compact(SmallNet(), {"conv1": [0]}, input_size=(3, 8, 8))
    with pytest.raises(UnsupportedModelError, match="MobileNetV2"):
        compact(create_model("mobilenet_v2", num_classes=10), {}, input_size=(3, 32, 32))
    model = create_model("resnet20")
    with pytest.raises(ConfigError, match="'linear' \\(Linear\\)"):
        compact(model, {"linear": [0]}, input_size=(3, 32, 32))
    with pytest.raises(ConfigError, match="in \\[0, 16\\)"):
        compact(model, {"conv1": [16]}, input_size=(3, 32, 32))
    with pytest.raises(ConfigError, match="distinct"):
        compact(model, {"conv1": [1, 1]}, input_size=(3, 32, 32))
    with pytest.raises(ConfigError, match="example_inputs"):
        compact(model, {"conv1": [1]})


def test_unmasked_weights_are_compacted_as_masked():
    model = base("resnet20")
    masks = random_masks(model, stream_convs(model))
    x = torch.randn(2, 3, 32, 32)
    small, info = compact(model, masks, example_inputs=x)  # weights not zeroed beforehand
    assert info.max_abs_error <= 1e-4
    with torch.no_grad():
        assert (small(x) - masked_output(model, masks, x)).abs().max() <= 1e-4
        assert (small(x) - model.eval()(x)).abs().max() > 1e-3


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("vgg16_cifar", 32), pytest.param(
    "resnet50", 64, marks=pytest.mark.slow)])
def test_compact_network_saves_and_loads(tmp_path, name, size):
    model = base(name)
    masks = random_masks(model, conv_names(model))
    masks[conv_names(model)[1]] = []  # an empty entry is allowed and ignored
    small, info = compact(model, masks, input_size=(3, size, size))
    save_compact(tmp_path / "c", small, masks, info, model_name=name,
                 input_size=(3, size, size), extra={"num_classes": 10})
    loaded = load_pruned(tmp_path / "c", create_model(name, num_classes=10)).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    run_model = load_run_model(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(run_model(x), small(x))
    with pytest.raises(CheckpointError, match="base architecture"):
        load_pruned(tmp_path / "c", create_model("mobilenet_v2", num_classes=10))


def test_compact_network_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from cdprune.export import export

    model = base("resnet20b")
    small, _ = compact(model, random_masks(model, conv_names(model)), input_size=(3, 32, 32))
    result = export(small, tmp_path / "c.onnx", format="onnx", input_size=(3, 32, 32),
                    dynamic_batch=True)
    assert result.max_abs_diff <= 1e-4


def test_compacted_tiny_resnet_trains_like_any_model(tmp_path):
    """The compact network goes through fine_tune (checkpoints, resume-safe state)."""
    from cdprune import TrainConfig, fine_tune

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=4, in_channels=3)
    masks = random_masks(model, conv_names(model))
    small, _ = compact(model, masks, input_size=(3, 8, 8))
    loader = make_loader(n=32, size=8)
    result = fine_tune(small, loader, loader, TrainConfig(epochs=1, lr=0.01),
                       output_dir=tmp_path, progress=False)
    assert result.epochs_run == 1 and (tmp_path / "last.pth").is_file()


@pytest.mark.slow
def test_cli_compacts_recalibrates_fine_tunes_and_the_run_reloads(tmp_path, capsys):
    import json

    from cdprune import save_weights
    from cdprune.cli import main

    torch.manual_seed(0)
    model = randomize_bn(create_model("resnet20", num_classes=10))
    masks = random_masks(model, conv_names(model))
    weights = tmp_path / "masked.safetensors"
    save_weights(mask_filters(model, masks), weights)
    (tmp_path / "report.json").write_text(json.dumps({"removed_filters": masks}))
    data = ["--dataset", "synthetic", "-b", "32", "-j", "0", "--no-progress"]
    out = tmp_path / "c"
    assert main(["compact", "--model", "resnet20", "--checkpoint", str(weights),
                 "--removed-filters", str(tmp_path / "report.json"), *data,
                 "--train-subset", "64", "--bn-recalibrate", "64", "--compact-epochs", "1",
                 "--lr", "0.01",
                 "--output-dir", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "folded with border effects" in printed and "after 1 epochs" in printed
    report = json.loads((out / "report.json").read_text())
    assert {"masked", "compacted", "recalibrated", "finetuned"} <= set(report["accuracy"])
    assert report["pruning"]["compact"]["macs"] < report["pruning"]["compact"]["macs_masked"]
    plan = json.loads((out / "pruned" / "plan.json").read_text())
    assert plan["compact"]["removed_filters"] == masks
    assert (out / "last.pth").is_file()
    assert main(["eval", *data, "--model-dir", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(
        report["accuracy"]["finetuned"], abs=1e-6)
    assert main(["export", "--model-dir", str(out), "--format", "onnx"]) == 0
    assert (out / "model.onnx").is_file()  # the fine-tuned model, at the run


@pytest.mark.parametrize("model,argv,needle", [
    ("resnet20", ["--compact-epochs", "-1"], "--compact-epochs -1 is invalid"),
    ("resnet20", [], "--removed-filters is required"),
    ("digits_cnn", [], "cannot compact a DigitsCNN"),
])
def test_cli_refuses_bad_compact_options(tmp_path, capsys, model, argv, needle):
    from cdprune.cli import main

    (tmp_path / "m.json").write_text('{"conv1": [0]}')
    masks = [] if "required" in needle else ["--removed-filters", str(tmp_path / "m.json")]
    assert main(["compact", "--model", model, "--random-init", "--dataset", "digits",
                 "-j", "0", "--output-dir", str(tmp_path / "c"), *argv, *masks]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_masks_file_is_a_mapping_or_a_report_holding_one(tmp_path):
    import json

    from cdprune.runs.pipeline import load_masks

    masks = {"conv1": [0, 3], "layer1.0.conv1": [1]}
    (tmp_path / "m.json").write_text(json.dumps(masks))
    (tmp_path / "report.json").write_text(json.dumps({"removed_filters": masks, "x": 1}))
    assert load_masks(tmp_path / "m.json") == masks == load_masks(tmp_path / "report.json")
    (tmp_path / "bad.json").write_text(json.dumps({"conv1": 3}))
    with pytest.raises(CheckpointError, match="lists of filter indices"):
        load_masks(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(CheckpointError, match="not a JSON file"):
        load_masks(tmp_path / "broken.json")
    with pytest.raises(ConfigError, match="does not exist"):
        load_masks(tmp_path / "none.json")
