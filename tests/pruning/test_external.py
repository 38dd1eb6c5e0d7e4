"""The real torchvision and timm: their models pruned to a MACs target, exactly.

These tests run only with ``-m external`` where torchvision and timm are installed (CI
installs them in a second environment; see ``.ci/run``). Without them every test here
skips and says why; with ``CDPRUNE_REQUIRE_EXTERNAL=1`` a missing or broken package fails
instead, so the tier can never pass by skipping.

Each model gets random weights with varied norms and layer scales, l1 or random scores and
``prune(..., macs_reduction=0.3)``; the pruned model must equal the original with the
removed channels zeroed (where LayerNorm mixes channels: with that norm restricted to the
kept channels), land within 0.3 points of the target (or below it, saying so), and come
back identical through save_pruned/load_pruned.
"""

from __future__ import annotations

import importlib
import os
import time

import pytest
import torch

from benchmarks import detectors
from benchmarks import zoo_coverage as zoo
from cdprune.importance.criteria import l1_scores
from cdprune.pruning import load_pruned, prune, save_pruned

from ..helpers import random_scores

pytestmark = pytest.mark.external

REQUIRED = os.environ.get("CDPRUNE_REQUIRE_EXTERNAL") == "1"
SIZE = 64
TARGET = 0.3

# Transformers: their MLP hidden units are pruned (test_transformers_prune_their_mlp_hidden_units).
TRANSFORMERS = ("vit_", "swin_", "maxvit_")
# Inception v3, v4 and Inception-ResNet need 75x75 inputs or more (their stems shrink the
# image about 30x before the last 3x3 convolutions).
SIZES = {"inception_v3": 96, "inception_v4": 96, "inception_resnet_v2": 96}
# Torchvision's classification CNNs run in the fast part of the tier (the one CI runs) as
# the smallest model of each family; the other 51 (up to 640M parameters, about an hour
# on one thread) are marked slow: `pytest -m external` runs them too.
FAST_TORCHVISION = {
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s",
    "googlenet", "inception_v3", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_large",
    "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnet50",
    "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "squeezenet1_1", "vgg11_bn"}
# Over a minute on one thread: nasnet/pnasnet/inception-resnet graphs, TResNet.
SLOW_TIMM = {"nasnetalarge", "pnasnet5large", "inception_resnet_v2", "tresnet_m",
             "inception_v4", "dpn48b", "rdnet_tiny", "resnest14d", "hrnet_w18_small"}


def _require(package: str):
    """Import ``package`` or skip the test with the reason (fail where it is required)."""
    try:
        return importlib.import_module(package)
    except Exception as exc:  # a broken install (e.g. torch/torchvision mismatch) too
        message = (f"the external tier needs the real {package.split('.')[0]} "
                   f"({type(exc).__name__}: {exc}); install torchvision, timm and ultralytics "
                   "and run "
                   "`pytest -m external`")
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)


def _torchvision_cnns() -> list:
    try:
        import torchvision
    except Exception:  # listed as one test that skips (or fails) with the reason
        return [pytest.param(None, id="torchvision-not-installed")]
    names = [n for n in torchvision.models.list_models(module=torchvision.models)
             if not n.startswith(TRANSFORMERS)]
    return [pytest.param(n, id=n, marks=() if n in FAST_TORCHVISION else pytest.mark.slow)
            for n in names]


def _timm_models() -> list:
    try:
        import timm  # noqa: F401  (only whether it imports)
    except Exception:
        return [pytest.param(None, id="timm-not-installed")]
    names = sorted(set(zoo.TIMM_FAMILIES.values()) | set(zoo.TIMM_EXTRA.values()))
    return [pytest.param(n, id=n, marks=pytest.mark.slow if n in SLOW_TIMM else ())
            for n in names]


def _check(model: torch.nn.Module, rebuild, scores, size: int, tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    start = time.perf_counter()
    result = prune(model, scores, example_inputs=x, macs_reduction=TARGET)
    elapsed = time.perf_counter() - start
    missed = result.extra.get("macs_target_missed")
    if missed is None:
        assert abs(result.macs_reduction - TARGET) <= 0.003
    else:  # coarse units: below the target, never above, and recorded
        assert 0 < result.macs_reduction < TARGET
    mixing = any(isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))
                 or "StdConv" in type(m).__name__ for m in model.modules())
    with torch.no_grad():
        got = result.model.eval()(x)
        masked = zoo._masked(model, result.plan)
        reference = zoo._norm_aware(masked, result.model) if mixing else masked
        exact, err = zoo._close(got, reference(x))
        assert exact, f"pruned output differs from the masked original (max rel. err {err:.2e})"
        save_pruned(tmp_path, result, input_size=(3, size, size))
        loaded = load_pruned(tmp_path, zoo.vary(rebuild()).eval()).eval()
        assert torch.equal(loaded(x), got)
    assert elapsed < 600


def test_external_packages_present():
    """Says, once and visibly, whether the tier ran for real."""
    tv = _require("torchvision")
    timm = _require("timm")
    assert tv.models.list_models(module=tv.models) and timm.list_models("resnet18")


@pytest.mark.parametrize("name", _torchvision_cnns())
def test_torchvision_cnn_prunes_exactly(name, tmp_path):
    tv = _require("torchvision")
    assert name is not None, "torchvision imports now but did not at collection"
    size = SIZES.get(name, SIZE)

    def build():
        torch.manual_seed(0)
        return tv.models.get_model(name, weights=None, num_classes=10)

    model = zoo.vary(build()).eval()
    _check(model, build, l1_scores(model), size, tmp_path)


@pytest.mark.parametrize("name", _timm_models())
def test_timm_cnn_prunes_exactly(name, tmp_path):
    timm = _require("timm")
    assert name is not None, "timm imports now but did not at collection"

    def build():
        torch.manual_seed(0)
        return timm.create_model(name, num_classes=10)

    model = zoo.vary(build()).eval()
    _check(model, build, random_scores(model), SIZES.get(name, SIZE), tmp_path)


@pytest.mark.parametrize("source,name,in_place", [
    ("torchvision", "resnet18", "all"), ("torchvision", "densenet121", "some"),
    ("torchvision", "efficientnet_b0", "some"), ("torchvision", "convnext_tiny", "none"),
    ("timm", "mobilenetv3_large_100", "some")])
def test_statistics_hooks_leave_real_models_untouched(source, name, in_place):
    """The in-place ReLU of the statistics pass, on real models: the pooled values are
    those of a pass that modifies nothing (bit for bit), the model's own outputs are
    unchanged, and the layers taken in place are the ones only a BatchNorm reads."""
    from cdprune.importance.activations import conv_layer_names
    from cdprune.importance.hooks import Collector

    package = _require(source)
    torch.manual_seed(0)
    model = zoo.vary(package.models.get_model(name, weights=None) if source == "torchvision"
                     else package.create_model(name)).eval()
    modules = dict(model.named_modules())
    names = conv_layer_names(model)
    batches = [torch.randn(2, 3, SIZE, SIZE) for _ in range(2)]
    pooled: dict[str, torch.Tensor] = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: pooled.__setitem__(
        n, o.contiguous().relu().mean((2, 3)))) for n in names]
    with torch.inference_mode():
        reference = [(model(x), torch.cat([pooled[n] for n in names], 1)) for x in batches]
    for h in hooks:
        h.remove()
    collector = Collector([modules[n] for n in names], model)
    outputs: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda m, i, o: outputs.append(o))
    try:
        with torch.inference_mode():
            for x, (ref_out, ref_rows) in zip(batches, reference):
                collector.forward(model, x)
                assert torch.equal(collector.take(), ref_rows)
                assert torch.equal(outputs.pop(), ref_out)
        late = len(collector.in_place)
    finally:
        handle.remove()
        collector.remove()
    assert {"all": late == len(names), "some": 0 < late < len(names),
            "none": late == 0}[in_place], f"{late} of {len(names)} layers taken in place"


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "swin_v2_t"])
def test_transformers_prune_their_mlp_hidden_units(name, tmp_path):
    """ViT and Swin: the hidden units of every MLP block (the first linear layer's outputs)
    are scored and pruned to the MACs target, exactly; the token stream that attention and
    LayerNorm read whole stays."""
    tv = _require("torchvision")
    extra = {"image_size": 32} if name.startswith("vit_") else {}

    def build():
        torch.manual_seed(0)
        return tv.models.get_model(name, weights=None, num_classes=10, **extra)

    model = zoo.vary(build()).eval()
    _check(model, build, l1_scores(model), 32, tmp_path)


def test_timm_vit_prunes_by_cdp_statistics(tmp_path):
    """CDP scores of MLP hidden units from token-averaged activations."""
    timm = _require("timm")
    from cdprune import collect_stats, tfidf_scores

    def build():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                 num_classes=10)

    model = zoo.vary(build()).eval()
    stats = collect_stats(model, [torch.randn(8, 3, 32, 32)], progress=False)
    scores = tfidf_scores(stats)
    assert sum(n.endswith("mlp.fc1") for n in scores) == 12
    _check(model, build, scores, 32, tmp_path)


@pytest.mark.parametrize("name", ["timm:regnetx_002", "torchvision:resnet18"])
def test_cli_external_model_end_to_end(name, tmp_path, capsys):
    """A timm (grouped convs) or torchvision model through run (statistics, prune, save,
    load, fine-tune), eval and export."""
    from .test_families import _cli_end_to_end

    _require("torchvision.models" if name.startswith("torchvision") else "timm")
    _cli_end_to_end(name, tmp_path, capsys)


# Detectors and segmenters at a 64x64 input (benchmarks/detectors.py builds them): those
# under about five seconds on one thread run in the fast part, the rest are marked slow.
DETECTORS = {
    "ssdlite320_mobilenet_v3_large": True, "fasterrcnn_mobilenet_v3_large_320_fpn": True,
    "fasterrcnn_resnet50_fpn": False, "retinanet_resnet50_fpn": True,
    "retinanet_resnet50_fpn_v2": False, "fcos_resnet50_fpn": False,
    "maskrcnn_resnet50_fpn": False, "maskrcnn_resnet50_fpn_v2": False,
    "ssd300_vgg16": False, "deeplabv3_mobilenet_v3_large": True,
    "deeplabv3_resnet50": False, "lraspp_mobilenet_v3_large": True,
}


def _check_detector(name: str) -> None:
    row = detectors.row(name, TARGET)
    assert abs(row["macs_reduction"] - TARGET) <= 0.003, row
    assert row["outputs_whole"], "a task output lost channels"
    assert row["exact"], f"pruned outputs differ from the masked original: {row}"
    assert row["reload_exact"] and not row["auto_ignored"], row


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if fast else pytest.mark.slow)
                                  for n, fast in DETECTORS.items()])
def test_torchvision_detector_prunes_exactly(name):
    """A whole detector or segmenter (backbone, FPN, heads; the task outputs stay whole)
    pruned with CDP scores from unlabelled images to -30% MACs within 0.3 points, counted
    at a fixed input size with region heads counted per region; its head outputs (or
    segmentation logits) equal the masked original's; reloaded, it gives them again."""
    _require("torchvision")
    _check_detector(f"torchvision:{name}")


@pytest.mark.parametrize("config", ["yolov8n.yaml", "yolo11n.yaml"])
def test_yolo_prunes_exactly(config):
    """Ultralytics' whole DetectionModel (backbone, neck, Detect head; the head's box and
    class outputs stay whole), as the torchvision detectors above."""
    _require("ultralytics")
    _check_detector(f"yolo:{config}")
