"""The CDP paper's MACs convention (masks, per-chain input reduction) against hand counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cdprune import count_macs, prune
from cdprune.importance.criteria import l1_scores
from cdprune.measure.macs import paper_macs
from cdprune.models import create_model

from ..helpers import SmallNet


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(16, 4, 1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(self.conv3(x).mean(dim=(2, 3)))


def test_a_plain_chain_reduces_each_conv_by_the_masks_of_the_one_before():
    kept = {"conv1": [0, 1, 2, 3, 4], "conv2": list(range(10)), "bn1": [0, 1, 2, 3, 4]}
    # conv1: 5 kept x 3 in x 9 x 64 positions; conv2: 10 kept x (8 - 3) in x 9 x 64;
    # conv3 (after the pool, 16 positions): 4 x (16 - 6) x 1 x 16; fc in full: 4 x 10.
    hand = 5 * 3 * 9 * 64 + 10 * 5 * 9 * 64 + 4 * 10 * 16 + 40
    assert paper_macs(Chain(), kept, (3, 8, 8)) == hand
    assert paper_macs(Chain(), {}, (3, 8, 8)) == count_macs(Chain(), (3, 8, 8))


def test_a_residual_stream_is_counted_at_full_width():
    net = SmallNet(num_classes=4, width=8)
    kept = {"conv1": list(range(6)), "conv2": list(range(5)), "conv3": list(range(12))}
    # conv1 (stem): 6 x 3 x 9 x 64. conv2 reads the stem output, which the residual sum
    # reads too: full 8 inputs, 5 kept: 5 x 8 x 9 x 64. conv3 reads relu(sum): 12 x 8 x 64.
    # fc counts in full: 16 x 4.
    hand = 6 * 3 * 9 * 64 + 5 * 8 * 9 * 64 + 12 * 8 * 64 + 16 * 4
    assert paper_macs(net, kept, (3, 8, 8)) == hand


@pytest.mark.parametrize("name", ["resnet20", "resnet20b"])
def test_against_the_physical_count_on_cifar_resnets(name):
    model = create_model(name, num_classes=10)
    assert paper_macs(model, {}, (3, 32, 32)) == count_macs(model, (3, 32, 32))
    example = torch.randn(2, 3, 32, 32)
    internal = prune(model, l1_scores(model), example_inputs=example, macs_reduction=0.5,
                     scope="internal")
    # Block-internal channels only: both conventions agree exactly.
    assert paper_macs(model, internal.plan["kept"], (3, 32, 32)) == internal.macs_after
    everything = prune(model, l1_scores(model), example_inputs=example, macs_reduction=0.5,
                       scope="all")
    # With the residual stream pruned, the physical network also saves the first conv's
    # inputs in every block, which the paper's counter does not credit.
    assert paper_macs(model, everything.plan["kept"], (3, 32, 32)) > everything.macs_after


def test_masked_block_outputs_do_not_reduce_the_next_block():
    model = create_model("resnet20", num_classes=10)
    full = paper_macs(model, {}, (3, 32, 32))
    conv2 = model.layer1[0].conv2
    kept = {"layer1.0.conv2": list(range(8))}  # half of a residual-stream conv's outputs
    positions = 32 * 32
    # Only that conv's own outputs are credited: 8 of 16 x 16 inputs x 9 x 1024.
    saved = 8 * conv2.in_channels * 9 * positions
    assert full - paper_macs(model, kept, (3, 32, 32)) == saved
