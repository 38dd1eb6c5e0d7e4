"""Shared fixtures: tiny models and data made on the spot (no files from outside)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)


class SmallNet(nn.Module):
    """Conv-BN-ReLU stem, one residual block, a 1x1 conv and a classifier."""

    def __init__(self, num_classes: int = 4, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


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


def make_loader(n: int = 48, num_classes: int = 4, size: int = 8, batch_size: int = 16,
                seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.randn(n, 3, size, size, generator=g) + labels.view(-1, 1, 1, 1) * 0.3
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


@pytest.fixture
def loader() -> DataLoader:
    return make_loader()
