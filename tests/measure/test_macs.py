import pytest
import torch
from torch import nn

from cdprune.errors import ConfigError
from cdprune.measure.macs import count_macs, count_params, profile
from cdprune.models import create_model, model_spec


@pytest.mark.parametrize("name, millions", [
    ("resnet20", 40.55), ("resnet56", 125.49), ("vgg16_cifar", 313.46),
])
def test_cifar_figures_exact(name, millions):
    macs = count_macs(create_model(name), model_spec(name).input_size)
    assert round(macs / 1e6, 2) == millions


@pytest.mark.parametrize("name, millions", [
    ("resnet18", 1814.0), ("resnet50", 4089.0), ("mobilenet_v2", 300.0),
])
def test_imagenet_figures(name, millions):
    macs = count_macs(create_model(name), (3, 224, 224))
    assert abs(macs / 1e6 - millions) / millions < 0.005


def test_option_b_adds_the_projection_macs():
    a = count_macs(create_model("resnet20"), (3, 32, 32))
    b = count_macs(create_model("resnet20b"), (3, 32, 32))
    # 1x1 stride-2 projections: 16->32 on 16x16 and 32->64 on 8x8
    assert b - a == 16 * 16 * 32 * 16 + 8 * 8 * 64 * 32


def test_hand_counted_layers_and_profile():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False),
                          nn.Flatten(), nn.Linear(8 * 5 * 5, 6))
    report = profile(model, (3, 10, 10))
    conv1 = 10 * 10 * 8 * 3 * 9
    conv2 = 5 * 5 * 8 * 2 * 9  # grouped: each output sees 8/4 input channels
    linear = 200 * 6
    assert report["layers"] == {"0": conv1, "2": conv2, "4": linear}
    assert report["macs"] == conv1 + conv2 + linear
    assert report["params"] == count_params(model) == (8 * 27 + 8) + 8 * 18 + (200 * 6 + 6)


def test_pruned_conv_counts_its_real_width():
    torch.manual_seed(0)
    full = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1))
    narrow = nn.Sequential(nn.Conv2d(3, 10, 3, padding=1), nn.Conv2d(10, 4, 1))
    # physically removing 6 filters (as pruning does) must cost exactly their share
    with torch.no_grad():
        narrow[0].weight.copy_(full[0].weight[:10])
        narrow[1].weight.copy_(full[1].weight[:, :10])
    hw = 8 * 8
    assert count_macs(full, (3, 8, 8)) == hw * (16 * 27 + 4 * 16)
    assert count_macs(narrow, (3, 8, 8)) == hw * (10 * 27 + 4 * 10)
    assert count_params(full) - count_params(narrow) == 6 * 27 + 6 + 4 * 6


def test_input_forms_agree_and_count_per_sample():
    model = create_model("tiny_cnn")
    base = count_macs(model, (3, 16, 16))
    assert count_macs(model, (7, 3, 16, 16)) == base
    assert count_macs(model, example_inputs=torch.randn(5, 3, 16, 16)) == base
    assert count_macs(model, example_inputs=(torch.randn(5, 3, 16, 16),)) == base
    assert count_macs(model, example_inputs={"x": torch.randn(2, 3, 16, 16)}) == base
    # MACs scale with the input size (the count is measured, not configured)
    assert count_macs(model, (3, 32, 32)) == 4 * base - 3 * model.fc.in_features * 10


def test_layer_used_twice_counts_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    assert count_macs(Twice(), example_inputs=torch.randn(3, 4)) == 2 * 16


def test_modes_restored_and_no_side_effects():
    model = create_model("resnet20")
    model.train()
    model.layer1.eval()  # a mixed state must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, (3, 32, 32))
    assert model.training and not model.layer1.training and model.layer2.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched
    assert not any(m._forward_hooks for m in model.modules())


def test_hooks_removed_and_modes_restored_on_error():
    model = create_model("tiny_cnn").train()
    with pytest.raises(RuntimeError):
        count_macs(model, (5, 16, 16))  # wrong channel count
    assert model.training
    assert not any(m._forward_hooks for m in model.modules())


def test_argument_errors():
    model = create_model("tiny_cnn")
    with pytest.raises(ConfigError, match="exactly one"):
        count_macs(model)
    with pytest.raises(ConfigError, match="exactly one"):
        count_macs(model, (3, 16, 16), example_inputs=torch.randn(1, 3, 16, 16))
    for bad in [(16, 16), (3, 0, 16), "3x16x16", (1, 2, 3, 4, 5)]:
        with pytest.raises(ConfigError, match="input_size"):
            count_macs(model, bad)


def test_count_params_counts_shared_parameters_once():
    lin = nn.Linear(3, 3)
    assert count_params(nn.Sequential(lin, lin)) == 12
    assert count_params(create_model("resnet56")) == 853_018


class RoIHeads(nn.Module):
    """Stands for a two-stage detector's region heads: rows are regions, as many as the
    data gives (none at all on an image without detections)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, regions):
        return self.fc(self.conv(regions).mean((2, 3)))


class _TwoStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.roi_heads = RoIHeads()

    def forward(self, x):
        features = self.stem(x)
        regions = int(features.sum() > 0) * 5  # proposal count decided by the data
        return self.roi_heads(features[:1].expand(regions, -1, -1, -1))


def test_region_heads_count_one_region_whatever_the_proposals():
    model = _TwoStage()
    region = 8 * 4 * 9 * 4 * 4 + 2 * 8
    stem = 4 * 3 * 4 * 4
    with torch.no_grad():
        model.stem.bias.fill_(1.0)
        model.stem.weight.abs_()
        assert count_macs(model, input_size=(3, 4, 4)) == stem + region  # five regions
        model.stem.weight.neg_()
        model.stem.bias.fill_(-1.0)
        assert count_macs(model, input_size=(3, 4, 4)) == stem + region  # none ran
