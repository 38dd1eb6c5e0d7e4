"""GroupNorm taught to the pruner: its channels go a whole group at a time.

GroupNorm normalises each group of ``C / G`` consecutive channels over that group alone.
Removing a whole group and counting one group less leaves every other group's statistics
unchanged, so the pruned network equals the original with that group's channels zeroed
(at the convolution and at the norm's affine). Removing part of a group would change
the statistics of the rest of it, and leave a width the group count does not divide:
Torch-Pruning's own GroupNorm pruner does this and the pruned model no longer runs
(FCOS, RetinaNet v2). Channels of a group that a pruning group reaches only in part stay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .graph import ChannelPruner, register_pruner

__all__ = ["GroupNormPruner"]


class GroupNormPruner(ChannelPruner):
    """Prunes ``nn.GroupNorm`` by whole groups and keeps ``num_groups`` in step."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        size = layer.num_channels // layer.num_groups
        gone = sorted({int(i) for i in idxs})
        if any(sum(1 for j in gone if j // size == i // size) != size for i in gone):
            raise UnsupportedModelError(
                f"GroupNorm with {layer.num_groups} groups of {size} channels would lose "
                "part of a group; only whole groups can be removed exactly")
        keep = [i for i in range(layer.num_channels) if i not in set(gone)]
        layer.num_channels = len(keep)
        layer.num_groups = len(keep) // size
        if layer.affine:
            index = torch.tensor(keep, dtype=torch.long, device=layer.weight.device)
            layer.weight = nn.Parameter(layer.weight.data.index_select(0, index),
                                        requires_grad=layer.weight.requires_grad)
            layer.bias = nn.Parameter(layer.bias.data.index_select(0, index),
                                      requires_grad=layer.bias.requires_grad)
        return layer

    prune_in_channels = prune_out_channels  # one dimension: in and out are the same

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.num_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.num_channels

    def locked_outputs(self, layer: nn.Module, idxs: Sequence[int]) -> torch.Tensor:
        # A group the pruning group holds only in part cannot go whole: none of it goes.
        size = layer.num_channels // layer.num_groups
        groups = torch.tensor([int(i) // size for i in idxs], dtype=torch.long)
        counts = torch.bincount(groups, minlength=layer.num_groups)
        return counts[groups] != size

    def bundled_outputs(self, layer: nn.Module, idxs: Sequence[int]) -> list[list[int]]:
        size = layer.num_channels // layer.num_groups
        bundles: dict[int, list[int]] = {}
        for pos, i in enumerate(idxs):
            bundles.setdefault(int(i) // size, []).append(pos)
        return [b for b in bundles.values() if len(b) > 1]


register_pruner(nn.GroupNorm, GroupNormPruner())
