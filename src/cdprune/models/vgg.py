"""VGG-16 with batch normalisation, sized for 32x32 CIFAR images.

Thirteen 3x3 conv-BN-ReLU layers in five stages (the last stage has no max-pool; a 2x2
average pool reduces its 2x2 map to one pixel), then a two-layer classifier
512 -> 512 -> classes. This is the variant whose cost is usually quoted as 313.46M MACs
in the filter-pruning literature. Convolutions carry no bias because BN follows each one.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import init_weights, register_model

__all__ = ["VGG_CIFAR_CFG", "VGGCifar"]

VGG_CIFAR_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                        512, 512, 512, "M", 512, 512, 512)


class VGGCifar(nn.Module):
    """``features`` (conv-BN-ReLU and max-pools, then a 2x2 average pool) and ``classifier``."""

    def __init__(self, num_classes: int = 10, cfg: tuple[int | str, ...] = VGG_CIFAR_CFG,
                 in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(v), 3, padding=1, bias=False),
                           nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                channels = int(v)
        layers.append(nn.AvgPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(channels, 512), nn.ReLU(inplace=True),
                                        nn.Linear(512, num_classes))
        init_weights(self)
        for m in self.classifier:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("vgg16_cifar", input_size=(3, 32, 32), num_classes=10, family="vgg_cifar")
def vgg16_cifar(num_classes: int, in_channels: int = 3) -> VGGCifar:
    """VGG-16-BN for CIFAR (313.46M MACs, 14.99M parameters at 10 classes)."""
    return VGGCifar(num_classes, in_channels=in_channels)
