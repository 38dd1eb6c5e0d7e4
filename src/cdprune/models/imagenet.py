"""ImageNet ResNet-18/34/50 and MobileNetV2, laid out so torchvision state dicts load as is.

Module names, order and shapes follow torchvision's definitions (ResNet v1.5, with the
stride on the 3x3 convolution of a bottleneck; MobileNetV2 with ``features.N`` and
``classifier``), which lets :func:`cdprune.load_weights` read torchvision's published
checkpoints into these models without torchvision installed. Initialisation is the usual
one: Kaiming-normal (fan-out) convolutions, BN weight 1 and bias 0.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "ImageNetResNet", "InvertedResidual", "MobileNetV2",
           "ConvBNReLU"]

IMAGENET_INPUT = (3, 224, 224)


# --------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or ``downsample`` shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, each with BN."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ImageNetResNet(nn.Module):
    """ResNet with a 7x7/2 stem and max-pool, four stages (64, 128, 256, 512 planes)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int],
                 num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._stage(block, 64, layers[0], stride=1)
        self.layer2 = self._stage(block, 128, layers[1], stride=2)
        self.layer3 = self._stage(block, 256, layers[2], stride=2)
        self.layer4 = self._stage(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        _init_conv_bn(self)

    def _stage(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
               stride: int) -> nn.Sequential:
        out_planes = planes * block.expansion
        downsample = None
        if stride != 1 or self.in_planes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes))
        layers = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = out_planes
        layers += [block(self.in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet18", input_size=IMAGENET_INPUT, num_classes=1000,
                family="imagenet_resnet")
def resnet18(num_classes: int, in_channels: int = 3) -> ImageNetResNet:
    """ResNet-18 (1.81G MACs at 224x224)."""
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels)


@register_model("resnet34", input_size=IMAGENET_INPUT, num_classes=1000,
                family="imagenet_resnet")
def resnet34(num_classes: int, in_channels: int = 3) -> ImageNetResNet:
    """ResNet-34 (3.66G MACs at 224x224)."""
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels)


@register_model("resnet50", input_size=IMAGENET_INPUT, num_classes=1000,
                family="imagenet_resnet")
def resnet50(num_classes: int, in_channels: int = 3) -> ImageNetResNet:
    """ResNet-50 v1.5 (4.09G MACs at 224x224)."""
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels)


# --------------------------------------------------------------------------- MobileNetV2
class ConvBNReLU(nn.Sequential):
    """Conv (no bias), BN, ReLU6 as indices 0, 1, 2; ``same`` padding for odd kernels."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1):
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, (kernel_size - 1) // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand (1x1, skipped when ``expand_ratio`` is 1), depthwise 3x3, linear 1x1 project.

    The residual is added when the block keeps both resolution and width.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(in_planes * expand_ratio))
        self.use_res_connect = stride == 1 and in_planes == out_planes
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_planes, hidden, kernel_size=1))
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, out_planes, 1, bias=False),
                   nn.BatchNorm2d(out_planes)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a width to a multiple of ``divisor`` without losing more than 10% of it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


# expansion t, output channels c, repeats n, first stride s
MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., 2018): ``features`` then dropout and a linear layer."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2,
                 in_channels: int = 3):
        super().__init__()
        stem = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU(in_channels, stem, stride=2)]
        planes = stem
        for t, c, n, s in MOBILENET_V2_SETTINGS:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(planes, out, s if i == 0 else 1, t))
                planes = out
        features.append(ConvBNReLU(planes, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout),
                                        nn.Linear(self.last_channel, num_classes))
        _init_conv_bn(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


@register_model("mobilenet_v2", input_size=IMAGENET_INPUT, num_classes=1000,
                family="mobilenet")
def mobilenet_v2(num_classes: int, width_mult: float = 1.0, dropout: float = 0.2,
                 in_channels: int = 3) -> MobileNetV2:
    """MobileNetV2 1.0 (about 300M MACs at 224x224)."""
    return MobileNetV2(num_classes, width_mult, dropout, in_channels)


def _init_conv_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
