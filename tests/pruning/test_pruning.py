import copy
import json

import pytest
import torch
from torch import nn

from cdprune.errors import CheckpointError, ConfigError
from cdprune.measure.macs import count_macs
from cdprune.models import create_model
from cdprune.pruning import load_pruned, prune, read_plan, save_pruned

from ..helpers import SmallNet, random_scores, randomize_bn


class ConcatDepthwiseNet(nn.Module):
    """A user model with a concatenation and a depthwise conv (Torch-Pruning must couple)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(14, 14, 3, padding=1, groups=14), nn.BatchNorm2d(14),
                                nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(14, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        x = self.pw(self.dw(x))
        return self.fc(x.mean((2, 3)))


def masked_copy(model: nn.Module, plan: dict) -> nn.Module:
    """The original with every removed channel forced to zero after its BN (or conv)."""
    masked = copy.deepcopy(model)
    named = dict(masked.named_modules())
    for name, kept in plan["kept"].items():
        module = named[name]
        width = module.weight.shape[0]
        kept_set = set(kept)
        removed = [i for i in range(width) if i not in kept_set]
        module.weight.data[removed] = 0
        if module.bias is not None:
            module.bias.data[removed] = 0
    return masked


MODELS = {
    "resnet20": (3, 32), "resnet20b": (3, 32), "vgg16_cifar": (3, 32), "resnet18": (3, 64),
    "mobilenet_v2": (3, 64), "tiny_cnn": (3, 16), "digits_cnn": (1, 8),
}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "small_net":
        return randomize_bn(SmallNet()), torch.randn(4, 3, 8, 8)
    if name == "concat_dw":
        return randomize_bn(ConcatDepthwiseNet()), torch.randn(4, 3, 8, 8)
    channels, size = MODELS[name]
    return randomize_bn(create_model(name)), torch.randn(4, channels, size, size)


FAST_ROUND_TO = {("vgg16_cifar", 4), ("resnet20b", 8), ("resnet56", 4), ("mobilenet_v2", 8)}

# scope="all" on the larger models only in the full suite: the fast tier prunes every model
# with the default scope and the residual stream of resnet20, small_net and concat_dw too.
FAST_ALL_SCOPE = {"resnet20", "small_net", "concat_dw"}


@pytest.mark.parametrize("name, scope", [
    (name, scope) if scope == "auto" or name in FAST_ALL_SCOPE
    else pytest.param(name, scope, marks=pytest.mark.slow)
    for scope in ("auto", "all") for name in [*MODELS, "small_net", "concat_dw"]])
def test_pruned_equals_masked_original(name, scope):
    model, x = build(name)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    result = prune(model, random_scores(model), example_inputs=x, sparsity=0.4, scope=scope)
    assert result.macs_after < result.macs_before
    assert result.removed_filters > 0
    pruned = result.model.eval()
    with torch.no_grad():
        expected = masked_copy(model, result.plan)(x)
        got = pruned(x)
    assert got.shape == expected.shape  # the classifier keeps its outputs
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    # the original is untouched
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


@pytest.mark.parametrize("name, target", [  # the second target on one model in the fast tier
    (name, target) if target == 0.3 or name == "resnet20"
    else pytest.param(name, target, marks=pytest.mark.slow)
    for target in (0.3, 0.5) for name in ("resnet20", "resnet20b", "vgg16_cifar", "mobilenet_v2")])
def test_macs_target_within_tolerance(name, target):
    model, x = build(name)
    result = prune(model, random_scores(model, 1), example_inputs=x, macs_reduction=target)
    assert abs(result.macs_reduction - target) <= 0.003
    assert result.macs_after == count_macs(result.model, example_inputs=x[:1])


def test_option_a_scopes():
    model, x = build("resnet20")
    internal = prune(model, random_scores(model), example_inputs=x, macs_reduction=0.3)
    assert internal.plan["scope"] == "internal"
    stream = ["conv1"] + [f"layer{s}.{i}.conv2" for s in (1, 2, 3) for i in range(3)]
    assert all(internal.widths_after[n] == internal.widths_before[n] for n in stream)
    full = prune(model, random_scores(model), example_inputs=x, macs_reduction=0.3, scope="all")
    assert any(full.widths_after[n] < full.widths_before[n] for n in stream)
    with torch.no_grad():
        assert torch.allclose(full.model(x), masked_copy(model, full.plan)(x), atol=1e-4)


def test_limits_classifier_and_ignored_layers():
    model, x = build("resnet20b")
    result = prune(model, random_scores(model), example_inputs=x, sparsity=0.95,
                   max_layer_pruning=0.75, ignored_layers=["layer1.0.conv1"])
    assert result.model.fc.out_features == 10
    assert result.widths_after["layer1.0.conv1"] == 16
    for name, width in result.widths_after.items():
        assert width >= max(1, 0.25 * result.widths_before[name] - 1e-6), name


@pytest.mark.parametrize("name, round_to", [  # each model with one multiple in the fast tier
    (name, round_to) if (name, round_to) in FAST_ROUND_TO
    else pytest.param(name, round_to, marks=pytest.mark.slow)
    for round_to in (4, 8) for name in ("vgg16_cifar", "resnet20b", "resnet56", "mobilenet_v2")])
def test_round_to_gives_multiples(name, round_to):
    model, x = build(name) if name != "resnet56" else (create_model("resnet56").eval(),
                                                      torch.randn(2, 3, 32, 32))
    result = prune(model, random_scores(model), example_inputs=x, macs_reduction=0.5,
                   round_to=round_to)
    changed = [n for n, w in result.widths_after.items() if w != result.widths_before[n]]
    assert changed and all(result.widths_after[n] % round_to == 0 for n in changed)
    assert abs(result.macs_reduction - 0.5) <= 0.003


def test_deterministic_and_low_scores_go_first():
    model, x = build("small_net")
    # conv3's scores in a shuffled order, so "lowest" is not simply "first"
    conv3 = torch.randperm(16, generator=torch.Generator().manual_seed(0)).float()
    scores = {"conv1": torch.ones(8), "conv2": torch.ones(8), "conv3": conv3}
    a = prune(model, scores, example_inputs=x, sparsity=0.25)
    b = prune(model, scores, example_inputs=x, sparsity=0.25)
    assert a.plan["steps"] == b.plan["steps"]
    removed = 16 - a.widths_after["conv3"]
    assert removed > 0
    lowest = sorted(torch.argsort(conv3)[:removed].tolist())
    assert a.plan["kept"]["conv3"] == sorted(set(range(16)) - set(lowest))
    gone = [i for step in a.plan["steps"] if step["module"] == "conv3" for i in step["idxs"]]
    assert sorted(gone) == lowest


def test_sparsity_counts_filters():
    model, x = build("vgg16_cifar")
    result = prune(model, random_scores(model), example_inputs=x, sparsity=0.5)
    assert abs(result.sparsity - 0.5) < 0.01
    removed = sum(result.widths_before.values()) - sum(result.widths_after.values())
    assert removed == result.removed_filters


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 0.0}, "outside"), ({"sparsity": 1.0}, "outside"),
    ({"macs_reduction": -0.2}, "outside"), ({}, "exactly one"),
    ({"sparsity": 0.3, "macs_reduction": 0.3}, "exactly one"),
    ({"macs_reduction": 0.97}, "unreachable"),
    ({"sparsity": 0.3, "ignored_layers": ["layer9.conv"]}, "not a module"),
    ({"sparsity": 0.3, "scope": "stream"}, "scope"),
    ({"sparsity": 0.3, "round_to": 0}, "round_to"),
])
def test_bad_arguments(kwargs, match):
    model, x = build("resnet20")
    with pytest.raises(ConfigError, match=match):
        prune(model, random_scores(model), example_inputs=x, **kwargs)


@pytest.mark.parametrize("scope", ["internal", "all"])
def test_unreachable_target_suggests_only_what_would_help(scope):
    model, x = build("resnet20b")
    with pytest.raises(ConfigError, match="unreachable") as info:
        prune(model, random_scores(model), example_inputs=x, macs_reduction=0.999, scope=scope)
    assert ("or use scope='all'" in str(info.value)) == (scope != "all")


def test_scores_must_fit():
    model, x = build("resnet20")
    with pytest.raises(ConfigError, match="layer1.0.conv1"):
        prune(model, {"layer1.0.conv1": torch.ones(3)}, example_inputs=x, sparsity=0.3)
    with pytest.raises(ConfigError, match="not a Conv2d"):
        prune(model, {"layer1.0.bn1": torch.ones(16)}, example_inputs=x, sparsity=0.3)


@pytest.mark.parametrize("name", ["resnet20", "resnet20b", "mobilenet_v2", "concat_dw"])
def test_save_load_round_trip_is_exact(name, tmp_path):
    model, x = build(name)
    result = prune(model, random_scores(model), example_inputs=x, sparsity=0.4, scope="all")
    save_pruned(tmp_path / "run", result, model_name=name, input_size=tuple(x.shape[1:]))
    assert not list(tmp_path.glob("run/*.pt*"))  # no pickle files
    fresh, _ = build(name)
    loaded = load_pruned(tmp_path / "run", fresh).eval()
    for (k, v), (k2, v2) in zip(result.model.state_dict().items(),
                                loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))


def test_load_pruned_errors(tmp_path):
    model, x = build("resnet20b")
    result = prune(model, random_scores(model), example_inputs=x, sparsity=0.3)
    save_pruned(tmp_path / "run", result, model_name="resnet20b", input_size=(3, 32, 32))
    with pytest.raises(CheckpointError, match="another architecture|does not fit"):
        load_pruned(tmp_path / "run", build("vgg16_cifar")[0])
    plan_path = tmp_path / "run" / "plan.json"
    plan = json.loads(plan_path.read_text())
    plan["steps"][0]["idxs"] = [999]
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_pruned(tmp_path / "run", build("resnet20b")[0])
    plan_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_plan(tmp_path / "run")
    with pytest.raises(FileNotFoundError):
        read_plan(tmp_path / "nowhere")


def test_uniform_allocation_prunes_every_layer_alike():
    model, x = build("vgg16_cifar")
    scores = random_scores(model)
    scores["features.0"] = scores["features.0"] * 100  # would be spared by a global ranking
    result = prune(model, scores, example_inputs=x, sparsity=0.5, allocation="uniform")
    fractions = [result.widths_after[n] / w for n, w in result.widths_before.items()]
    assert max(fractions) - min(fractions) <= 0.07
    glob = prune(model, scores, example_inputs=x, sparsity=0.5)
    assert glob.widths_after["features.0"] == 64
    with pytest.raises(ConfigError, match="allocation"):
        prune(model, scores, example_inputs=x, sparsity=0.5, allocation="layer")


def test_option_a_scope_all_prunes_the_residual_stream():
    """The option-A shortcut subsamples with x[:, :, ::2, ::2]: a spatial slice, which must
    not be read as a channel layout that forbids pruning the residual stream."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10)
    randomize_bn(model)
    stream = {"conv1"} | {f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(3)}
    scores = {name: (torch.zeros if name in stream else torch.ones)(m.out_channels)
              + 1e-3 * torch.rand(m.out_channels)
              for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    result = prune(model, scores, example_inputs=torch.randn(2, 3, 32, 32),
                   macs_reduction=0.3, scope="all")
    assert result.widths_after["conv1"] < 16
    assert result.widths_after["layer3.2.conv2"] < 64
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    result.model.eval()
    assert result.model(x).shape == model(x).shape == (4, 10)


class _GroupNormNet(nn.Module):
    """conv -> GroupNorm (4 groups of 4) -> ReLU -> conv -> GroupNorm -> pooled classifier."""

    def __init__(self):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.conv2, self.gn2 = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.gn1(self.conv1(x)))
        x = torch.relu(self.gn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_group_norm_pruned_by_whole_groups_exactly():
    """GroupNorm channels go a whole group at a time (num_groups follows), so the pruned
    network equals the original with those channels zeroed; a partial group would change
    the other channels' statistics (and Torch-Pruning's own cut leaves an invalid width)."""
    torch.manual_seed(0)
    model = _GroupNormNet().eval()
    for gn in (model.gn1, model.gn2):
        gn.weight.data.uniform_(0.5, 1.5)
        gn.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 8, 8)
    result = prune(model, random_scores(model), example_inputs=x, sparsity=0.5)
    for name in ("gn1", "gn2"):
        gn = getattr(result.model, name)
        assert gn.num_channels == gn.num_groups * 4 < 16
        kept = result.plan["kept"][name]
        assert {i // 4 for i in range(16) if i not in kept}.isdisjoint(
            {i // 4 for i in kept})  # whole groups only
    masked = copy.deepcopy(model)
    named = dict(masked.named_modules())
    for name, kept in result.plan["kept"].items():
        removed = [i for i in range(named[name].weight.shape[0]) if i not in kept]
        named[name].weight.data[removed] = 0
        named[name].bias.data[removed] = 0
    with torch.no_grad():
        assert torch.allclose(result.model(x), masked(x), atol=1e-5)
