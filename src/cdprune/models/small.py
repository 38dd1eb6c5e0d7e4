"""Two small CNNs: one for scikit-learn's 8x8 digits (the demo), one for fast tests.

Both are ordinary conv-BN-ReLU networks so every pruning code path (including a residual
addition in :class:`TinyCNN`, which couples channels across layers) runs in milliseconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import init_weights, register_model

__all__ = ["DigitsCNN", "TinyCNN"]


def _conv_bn(in_planes: int, out_planes: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_planes)]


class DigitsCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers (16, 32, 32 filters; the second halves 8x8 to 4x4),
    global average pooling and a linear classifier. About 15k parameters; reaches over 95%
    test accuracy on the 8x8 digits within a few epochs.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, width)
        self.conv2, self.bn2 = _conv_bn(width, 2 * width, stride=2)
        self.conv3, self.bn3 = _conv_bn(2 * width, 2 * width)
        self.fc = nn.Linear(2 * width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyCNN(nn.Module):
    """Stem, one residual block (two convs whose sum with the stem couples their channels),
    a strided conv that doubles the width, global pooling and a linear head.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, width)
        self.conv2, self.bn2 = _conv_bn(width, width)
        self.conv3, self.bn3 = _conv_bn(width, width)
        self.conv4, self.bn4 = _conv_bn(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(y)) + x)
        x = F.relu(self.bn4(self.conv4(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("digits_cnn", input_size=(1, 8, 8), num_classes=10, family="small")
def digits_cnn(num_classes: int, in_channels: int = 1, width: int = 16) -> DigitsCNN:
    """The demo network for scikit-learn's 8x8 one-channel digits."""
    return DigitsCNN(num_classes, in_channels, width)


@register_model("tiny_cnn", input_size=(3, 16, 16), num_classes=10, family="small")
def tiny_cnn(num_classes: int, in_channels: int = 3, width: int = 8) -> TinyCNN:
    """A very small residual CNN for tests."""
    return TinyCNN(num_classes, in_channels, width)
