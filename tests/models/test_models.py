import copy
import importlib.util
import io
import pickle
import sys
import types

import pytest
import torch
from torch import nn

from cdprune.checkpoint import load_weights, save_weights
from cdprune.errors import ConfigError
from cdprune.models import ModelSpec, create_model, list_models, model_spec, register_model
from cdprune.models.cifar_resnet import PadShortcut

from ..helpers import stand_in_torchvision

ALL = list_models()
CIFAR_A = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
CIFAR_B = [n + "b" for n in CIFAR_A]
IMAGENET = ["resnet18", "resnet34", "resnet50", "mobilenet_v2"]


def small_input(name: str, batch: int = 2) -> torch.Tensor:
    c, h, w = model_spec(name).input_size
    if h > 64:  # ImageNet models are size-agnostic: 64px keeps the test fast
        h = w = 64
    return torch.randn(batch, c, h, w)


def test_registry_lists_every_contract_name():
    expected = set(CIFAR_A + CIFAR_B + IMAGENET + ["vgg16_cifar", "digits_cnn", "tiny_cnn"])
    assert set(ALL) == expected
    assert ALL == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.slow
def test_forward_shape_and_num_classes(name):
    torch.manual_seed(0)
    spec = model_spec(name)
    model = create_model(name).eval()
    x = small_input(name)
    with torch.no_grad():
        assert model(x).shape == (2, spec.num_classes)
        other = create_model(name, num_classes=7).eval()
        assert other(x).shape == (2, 7)


@pytest.mark.parametrize("name", ALL)
def test_spec_fields(name):
    spec = model_spec(name)
    assert isinstance(spec, ModelSpec) and spec.name == name
    assert len(spec.input_size) == 3
    families = {"cifar_resnet_a": CIFAR_A, "cifar_resnet_b": CIFAR_B,
                "imagenet_resnet": IMAGENET[:3], "mobilenet": ["mobilenet_v2"],
                "vgg_cifar": ["vgg16_cifar"], "small": ["digits_cnn", "tiny_cnn"]}
    assert name in families[spec.family]
    expected_size = {"digits_cnn": (1, 8, 8), "tiny_cnn": (3, 16, 16)}.get(
        name, (3, 224, 224) if name in IMAGENET else (3, 32, 32))
    assert spec.input_size == expected_size
    assert spec.num_classes == (1000 if name in IMAGENET else 10)
    with pytest.raises(AttributeError):
        spec.num_classes = 3  # frozen


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_state_dict_layouts(depth):
    n = (depth - 2) // 6
    a = create_model(f"resnet{depth}").state_dict()
    b = create_model(f"resnet{depth}b").state_dict()
    # 1 stem conv + 2 per block; BN has 5 entries (incl. num_batches_tracked); head 2
    convs, bns = 1 + 6 * n, 1 + 6 * n
    assert len(a) == convs + 5 * bns + 2
    assert len(b) == len(a) + 2 * (1 + 5)  # two 1x1 conv + BN projections
    assert "linear.weight" in a and "fc.weight" not in a
    assert "fc.weight" in b and "linear.weight" not in b
    assert not any("shortcut" in k or "downsample" in k for k in a)
    for stage in (2, 3):
        assert b[f"layer{stage}.0.downsample.0.weight"].shape[2:] == (1, 1)
        assert f"layer{stage}.0.downsample.1.running_var" in b
    assert "layer1.0.downsample.0.weight" not in b and "layer2.1.downsample.0.weight" not in b
    for i in range(n):
        for part in ("conv1.weight", "bn1.weight", "conv2.weight", "bn2.running_mean"):
            assert f"layer3.{i}.{part}" in a
    assert a["layer2.0.conv1.weight"].shape == (32, 16, 3, 3)
    assert a["linear.weight"].shape == (10, 64)


def test_resnet56_matches_public_checkpoint_counts():
    # The public option-A file holds 277 tensors (no BN num_batches_tracked, saved by an old
    # PyTorch) and 853,018 parameters; option B holds 344 tensors and 855,770 parameters.
    a, b = create_model("resnet56"), create_model("resnet56b")
    sa = a.state_dict()
    assert len([k for k in sa if not k.endswith("num_batches_tracked")]) == 277
    assert len(b.state_dict()) == 344
    assert sum(p.numel() for p in a.parameters()) == 853_018
    assert sum(p.numel() for p in b.parameters()) == 855_770


@pytest.mark.slow
def test_imagenet_key_layout():
    r18 = create_model("resnet18").state_dict()
    assert len(r18) == 122
    assert r18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert r18["fc.weight"].shape == (1000, 512)
    r50 = create_model("resnet50").state_dict()
    assert len(r50) == 320
    assert r50["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert r50["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    r50m = create_model("resnet50")
    assert r50m.layer2[0].conv2.stride == (2, 2) and r50m.layer2[0].conv1.stride == (1, 1)
    mb = create_model("mobilenet_v2").state_dict()
    assert len(mb) == 314
    assert mb["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert mb["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)  # depthwise, no expand
    assert mb["features.1.conv.1.weight"].shape == (16, 32, 1, 1)
    assert mb["features.2.conv.0.0.weight"].shape == (96, 16, 1, 1)  # expand
    assert mb["features.2.conv.1.0.weight"].shape == (96, 1, 3, 3)
    assert mb["features.2.conv.3.running_var"].shape == (24,)
    assert mb["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert mb["classifier.1.weight"].shape == (1000, 1280)
    params = {n: sum(p.numel() for p in create_model(n).parameters()) for n in IMAGENET}
    assert params == {"resnet18": 11_689_512, "resnet34": 21_797_672,
                      "resnet50": 25_557_032, "mobilenet_v2": 3_504_872}


def test_initialisation_is_standard():
    model = create_model("resnet20")
    assert torch.equal(model.bn1.weight, torch.ones(16))
    assert torch.equal(model.bn1.bias, torch.zeros(16))
    w = create_model("resnet50").layer1[0].conv2.weight  # fan_out = 64 * 9
    assert abs(w.std().item() - (2 / (64 * 9)) ** 0.5) < 0.005


def test_pad_shortcut_matches_reference_padding():
    sc = PadShortcut(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    ref = nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))  # planes // 4 each side
    assert torch.equal(sc(x), ref)
    assert sc.planes_pad == (8, 8)
    assert sc.index == list(range(8, 24))
    assert "gather" not in sc.state_dict()  # never part of the checkpoint layout


def test_pad_shortcut_pruning_stays_exact():
    sc = PadShortcut(16, 32)
    x = torch.randn(1, 16, 4, 4)
    full = sc(x)
    sc.remove_inputs([0, 3, 15])
    sc.remove_outputs([0, 9, 10, 30])
    keep_in = [i for i in range(16) if i not in (0, 3, 15)]
    keep_out = [i for i in range(32) if i not in (0, 9, 10, 30)]
    masked = x.clone()
    masked[:, [0, 3, 15]] = 0
    expected = nn.functional.pad(masked[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))[:, keep_out]
    assert (sc.in_channels, sc.out_channels) == (13, 28)
    assert torch.equal(sc(x[:, keep_in]), expected)
    assert torch.equal(full[:, keep_out][:, sc.gather < 13], sc(x[:, keep_in])[:, sc.gather < 13])


@pytest.mark.slow
def test_pad_shortcut_pickles_copies_and_traces(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        restored = pickle.loads(pickle.dumps(model))
        assert torch.equal(restored(x), ref)
        assert torch.equal(copy.deepcopy(model)(x), ref)
        traced = torch.jit.trace(model, x)
        assert torch.allclose(traced(x), ref, atol=1e-6)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        assert torch.allclose(torch.jit.load(buf)(x), ref, atol=1e-6)
        fx = torch.fx.symbolic_trace(model)
        assert torch.allclose(fx(x), ref, atol=1e-6)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), ref, atol=1e-6)
    shortcuts = [m for m in model.modules() if isinstance(m, PadShortcut)]
    assert len(shortcuts) == 2


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ConfigError) as info:
        create_model("resnet5")
    message = str(info.value)
    assert "'resnet5'" in message and "resnet56" in message and "list_models()" in message
    with pytest.raises(ConfigError, match="vgg16_cifar"):
        model_spec("vgg16")
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        create_model("no_such_net_at_all")
    assert isinstance(create_model("ResNet20"), nn.Module)  # case-insensitive


def test_bad_arguments_are_config_errors():
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ConfigError, match="num_classes"):
            create_model("tiny_cnn", num_classes=bad)
    with pytest.raises(ConfigError, match="width"):
        create_model("resnet20", width=4)
    with pytest.raises(ConfigError, match="prefix"):
        create_model("keras:resnet50")
    assert create_model("tiny_cnn", in_channels=1, width=4)(torch.randn(1, 1, 16, 16)).shape \
        == (1, 10)


def test_register_model_refuses_duplicates_and_colons():
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet20", input_size=(3, 32, 32), num_classes=10, family="x")
    with pytest.raises(ValueError, match="':'"):
        register_model("my:net", input_size=(3, 32, 32), num_classes=10, family="x")


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_external_packages_missing(package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import fails even if installed
    monkeypatch.setitem(sys.modules, f"{package}.models", None)
    with pytest.raises(ConfigError, match=f"pip install {package}"):
        create_model(f"{package}:resnet18")
    spec = model_spec(f"{package}:resnet18")  # known without importing
    assert spec.input_size == (3, 224, 224) and spec.family == package


def test_torchvision_resolution_with_stand_in_package(monkeypatch):
    calls = []

    def get_model(name, weights=None, **kwargs):
        calls.append((name, weights, kwargs))
        return nn.Linear(2, kwargs.get("num_classes", 1000))

    stand_in_torchvision(monkeypatch, get_model)
    model = create_model("torchvision:resnet18", num_classes=5)
    assert model.out_features == 5 and calls == [("resnet18", None, {"num_classes": 5})]
    with pytest.raises(ConfigError, match="did you mean resnet18"):
        create_model("torchvision:resnet19")


def test_timm_resolution_with_stand_in_package(monkeypatch):
    def timm_create(name, pretrained=False, **kwargs):
        if name != "convnext_tiny":
            raise RuntimeError(f"Unknown model ({name})")
        assert pretrained is False
        return nn.Linear(2, kwargs["num_classes"])

    timm = types.ModuleType("timm")
    timm.create_model = timm_create
    monkeypatch.setitem(sys.modules, "timm", timm)
    assert create_model("timm:convnext_tiny", num_classes=3).out_features == 3
    with pytest.raises(ConfigError, match="timm has no model 'nope'"):
        create_model("timm:nope")


def test_digits_cnn_learns_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    torch.manual_seed(0)
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y))
    train, test = perm[:1400], perm[1400:]
    model = create_model("digits_cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(6):
        model.train()
        for idx in train[torch.randperm(len(train))].split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert accuracy > 0.95


def test_torchvision_detector_backbone_left_random(monkeypatch):
    """Detectors default to an ImageNet backbone downloaded on first use: cdprune asks for
    none (random weights, nothing fetched) unless told otherwise; classifiers, whose
    builders take no such option, get none."""
    calls = []

    def get_model(name, weights=None, **kwargs):
        calls.append((name, kwargs))
        return nn.Linear(2, 2)

    def detector(*, weights=None, weights_backbone="IMAGENET1K_V1", num_classes=None):
        raise AssertionError("built through get_model")

    def classifier(*, weights=None, num_classes=1000):
        raise AssertionError("built through get_model")

    stand_in_torchvision(monkeypatch, get_model, names=("fasterrcnn_x", "resnet18"))
    builders = {"fasterrcnn_x": detector, "resnet18": classifier}
    monkeypatch.setattr(sys.modules["torchvision.models"], "get_model_builder",
                        builders.__getitem__, raising=False)
    create_model("torchvision:fasterrcnn_x", num_classes=3)
    create_model("torchvision:resnet18", num_classes=3)
    create_model("torchvision:fasterrcnn_x", weights_backbone="DEFAULT")
    assert calls == [("fasterrcnn_x", {"num_classes": 3, "weights_backbone": None}),
                     ("resnet18", {"num_classes": 3}),
                     ("fasterrcnn_x", {"weights_backbone": "DEFAULT"})]


class Versioned(nn.Module):
    """Reads its format version from the state dict's metadata, as torchvision's MNASNet
    does, and refuses to load without one."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be 1 or 2, not {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_of_a_versioned_module_load_back(tmp_path, suffix):
    torch.manual_seed(0)
    model = Versioned()
    save_weights(model, tmp_path / f"w{suffix}")
    fresh = load_weights(Versioned(), tmp_path / f"w{suffix}")
    assert torch.equal(fresh.conv.weight, model.conv.weight)


@pytest.mark.parametrize("name", ["yolo:best.pt", "yolo:runs/weights/last.pth"])
def test_yolo_pickled_checkpoint_refused_with_the_conversion(name):
    """Ultralytics .pt files are pickles: never loaded, and the error says how to convert."""
    with pytest.raises(ConfigError, match="pickled") as info:
        create_model(name)
    assert "state_dict()" in str(info.value) and "checkpoint best_state.pt" in str(info.value)
    from cdprune.cli.flags import render

    assert "--checkpoint best_state.pt" in render(info.value)  # as the command line says it


def test_yolo_name_must_be_a_config():
    with pytest.raises(ConfigError, match=r"\.yaml"):
        create_model("yolo:yolov8n")
    assert model_spec("yolo:yolov8n.yaml").input_size == (3, 640, 640)
    assert model_spec("yolo:yolov8n.yaml").num_classes == 80


def test_yolo_without_ultralytics_says_how_to_install():
    if importlib.util.find_spec("ultralytics") is not None:
        pytest.skip("ultralytics is installed here (the external tier builds YOLO)")
    with pytest.raises(ConfigError, match=r"cdprune\[yolo\]"):
        create_model("yolo:yolov8n.yaml")
