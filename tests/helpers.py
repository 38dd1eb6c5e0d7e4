"""Helpers that several test files share: tiny models, data and scores made on the spot."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


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


def make_loader(n: int = 48, num_classes: int = 4, size: int = 8, batch_size: int = 16,
                seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.randn(n, 3, size, size, generator=g) + labels.view(-1, 1, 1, 1) * 0.3
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)



def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def random_scores(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.out_channels, generator=g) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d)}


def stand_in_torchvision(monkeypatch: Any, get_model: Callable[..., nn.Module],
                         names: tuple[str, ...] = ("resnet18", "resnet50")) -> None:
    """Install a stand-in ``torchvision.models`` (``list_models``, ``get_model``) for one
    test: cdprune's torchvision path runs where the real package cannot load."""
    models = types.ModuleType("torchvision.models")
    models.list_models = lambda: list(names)
    models.get_model = get_model
    package = types.ModuleType("torchvision")
    package.models = models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
