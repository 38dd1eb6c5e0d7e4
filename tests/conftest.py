"""Shared fixtures: tiny models and data made on the spot (no files from outside)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from .helpers import SmallNet, make_loader

torch.set_num_threads(1)


@pytest.fixture
def small_net() -> SmallNet:
    torch.manual_seed(0)
    net = SmallNet()
    for m in net.modules():  # non-trivial BN so pruning tests see real statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture
def loader() -> DataLoader:
    return make_loader()
