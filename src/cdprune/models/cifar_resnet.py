"""ResNets for 32x32 CIFAR images (He et al., 2016, section 4.2), in two shortcut flavours.

Both flavours share the layout: a 3x3 stem with 16 filters, three stages of ``n`` basic
blocks with 16, 32 and 64 channels (depth = 6n + 2), stride 2 at the first block of the
second and third stages, global average pooling and one linear layer.

* Option A (``resnet20`` ... ``resnet110``): where the width doubles the shortcut takes
  every second pixel and zero-pads the channels, so it has no parameters. Parameter names
  follow the widely used public option-A checkpoints (head named ``linear``).
* Option B (``resnet20b`` ... ``resnet110b``): there the shortcut is a 1x1 convolution
  and BN (``downsample.0``/``downsample.1``), head named ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..pruning.graph import ChannelPruner, register_pruner
from .registry import init_weights, register_model

__all__ = ["CifarResNet", "PadShortcut", "PadShortcutPruner", "BasicBlock"]

CIFAR_INPUT = (3, 32, 32)
DEPTHS = (20, 32, 44, 56, 110)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and place the channels among zero channels.

    As built, the ``in_channels`` inputs fill the middle of ``out_channels`` outputs with
    ``planes_pad`` zero channels on each side: exactly what the public option-A checkpoints
    compute. The layout is kept as a gather index over the input channels plus one
    appended zero channel, so after channel pruning (:meth:`remove_inputs`,
    :meth:`remove_outputs`) any surviving placement is still exact. The index is a
    non-persistent buffer: it follows ``.to(device)`` but never appears in state dicts.

    It is a real module (not a lambda) so models pickle, deep-copy and trace.
    """

    gather: torch.Tensor

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"PadShortcut cannot narrow {in_channels} channels to "
                             f"{out_channels}; out_channels must be >= in_channels")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        before = (out_channels - in_channels) // 2
        gather = torch.full((out_channels,), in_channels, dtype=torch.long)
        gather[before:before + in_channels] = torch.arange(in_channels)
        self.register_buffer("gather", gather, persistent=False)

    @property
    def planes_pad(self) -> tuple[int, int]:
        """Zero channels before the first and after the last copied input channel."""
        copied = torch.nonzero(self.gather < self.in_channels).flatten().tolist()
        if not copied:
            return self.out_channels, 0
        return copied[0], self.out_channels - 1 - copied[-1]

    @property
    def index(self) -> list[int]:
        """Output position of each input channel, ``-1`` where it is dropped."""
        where = [-1] * self.in_channels
        for pos, src in enumerate(self.gather.tolist()):
            if src < self.in_channels:
                where[src] = pos
        return where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        x = F.pad(x, (0, 0, 0, 0, 0, 1))  # one zero channel at index in_channels
        return torch.index_select(x, 1, self.gather)

    def remove_outputs(self, idxs: Sequence[int]) -> None:
        """Drop output channels ``idxs`` (positions in the current output)."""
        drop = set(int(i) for i in idxs)
        keep = [i for i in range(self.out_channels) if i not in drop]
        self.gather = self.gather[torch.tensor(keep, dtype=torch.long,
                                               device=self.gather.device)]
        self.out_channels = len(keep)

    def remove_inputs(self, idxs: Sequence[int]) -> None:
        """Drop input channels ``idxs``; outputs they filled become zero channels."""
        drop = set(int(i) for i in idxs)
        keep = [i for i in range(self.in_channels) if i not in drop]
        new_in = len(keep)
        remap = torch.full((self.in_channels + 1,), new_in, dtype=torch.long)
        remap[torch.tensor(keep, dtype=torch.long)] = torch.arange(new_in)
        self.gather = remap.to(self.gather.device)[self.gather]
        self.in_channels = new_in

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, "
                f"planes_pad={self.planes_pad}")


class PadShortcutPruner(ChannelPruner):
    """Teaches Torch-Pruning the option-A shortcut, which it would read as element-wise.

    The shortcut places input channel ``i`` at output position ``index[i]`` (or nowhere),
    so input and output channels are pruned independently and stay exact: a removed input
    channel leaves zeros where it went, exactly what the unpruned model computes once
    that channel is zeroed.
    """

    # The residual stream of an option-A network widens by zero padding; pruning it
    # would need the padding and the convolutions to agree, so by default only the
    # channels inside each block are pruned.
    scope = "internal"

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        layer.remove_outputs(idxs)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        layer.remove_inputs(idxs)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels

    def locked_outputs(self, layer: nn.Module, idxs: Sequence[int]) -> torch.Tensor:
        # A stream position fed by the shortcut is not zero when its conv branch is:
        # removing it would change the function. Only the zero-padded positions can go.
        return layer.gather[list(idxs)] < layer.in_channels


register_pruner(PadShortcut, PadShortcutPruner())


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + sc(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Option B's projection is named ``downsample`` (parameter keys of the public
        # checkpoints); option A's parameter-free padding is ``shortcut``.
        self.shortcut: nn.Module = nn.Identity()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if option == "A":
                self.shortcut = PadShortcut(in_planes, planes, stride)
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.shortcut(x) if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` with option-A (``"A"``) or option-B (``"B"``) shortcuts."""

    def __init__(self, depth: int, num_classes: int = 10, option: str = "A",
                 in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), "
                             f"got {depth}")
        if option not in ("A", "B"):
            raise ValueError(f"shortcut option must be 'A' or 'B', got {option!r}")
        n = (depth - 2) // 6
        self.depth, self.option = depth, option
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, in_planes = (16, 32, 64), 16
        for stage, planes in enumerate(widths, start=1):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 1 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, option))
                in_planes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        head = nn.Linear(64, num_classes)
        if option == "A":
            self.linear = head
        else:
            self.fc = head
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.linear(x) if self.option == "A" else self.fc(x)


def _register(depth: int, option: str) -> None:
    suffix = "" if option == "A" else "b"
    family = "cifar_resnet_a" if option == "A" else "cifar_resnet_b"

    @register_model(f"resnet{depth}{suffix}", input_size=CIFAR_INPUT, num_classes=10,
                    family=family)
    def build(num_classes: int, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(depth, num_classes, option, in_channels)


for _depth in DEPTHS:
    for _option in ("A", "B"):
        _register(_depth, _option)
