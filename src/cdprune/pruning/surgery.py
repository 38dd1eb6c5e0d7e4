"""Channel surgery: cutting the chosen channels out of every layer that holds them.

Torch-Pruning's own pruning functions do most of it; grouped convolutions' inputs and
the extra per-filter tensors of Conv2d subclasses are cut here, because Torch-Pruning
gets them wrong for cdprune's rankings.
"""

from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import UnsupportedModelError
from .graph import dimension, is_grouped, member_kind
from .groups import Candidate, FrozenIndexMapping
from .layouts import resize_splits
from .result import PLAN_FORMAT


def prune_together(graph: tp.DependencyGraph, parts: list[tuple[nn.Module, Any, list[int]]]
                   ) -> dict[nn.Module, tuple[int, set[int]]]:
    """Remove channels of several roots in one go.

    Returns, per layer whose outputs shrank, its width before and the positions removed.

    All groups are read before anything is pruned, so their indices share one numbering
    (the original model's), and each layer is cut once with the union of its indices. Grouped convolutions' input
    channels are cut here, group by group: Torch-Pruning assumes the same positions go in
    every group, which holds for its own pruner but not for scores ranked within groups.
    """
    merged: dict[tuple[Any, Any], tuple[Any, set[int]]] = {}
    with FrozenIndexMapping(graph):
        for root, fn, idxs in parts:
            for item in graph.get_pruning_group(root, fn, idxs):
                key = (item.dep.target, item.dep.handler)
                merged.setdefault(key, (item.dep, set()))[1].update(int(i) for i in item.idxs)
    removed: dict[nn.Module, tuple[int, set[int]]] = {}
    grouped_inputs, norms = [], []
    group = tp.dependency.group.Group()
    group._DG = graph
    extras = []
    for dep, idxs in merged.values():
        module, kind = dep.target.module, member_kind(dep.pruning_fn)
        if kind in ("out", "dw") or isinstance(module, (nn.modules.batchnorm._BatchNorm,
                                                         nn.GroupNorm)):
            removed[module] = (dimension(module, kind or "out"), idxs)
        if kind in ("out", "dw") and isinstance(module, (nn.Conv2d, nn.Linear)):
            extras.append((module, removed[module][0], idxs))
        if kind == "in" and is_grouped(module):
            grouped_inputs.append((module, idxs))
        elif isinstance(module, nn.LayerNorm):
            norms.append((module, idxs, getattr(dep.handler.__self__, "pruning_dim", -1)))
        else:
            group.add_dep(dep, sorted(idxs))
    group.prune(record_history=False)
    resize_splits({dep.target: idxs for dep, idxs in merged.values()
                   if getattr(dep.target, "cdprune_adjustable", None)
                   and dep.target.inputs and dep.source is not dep.target})
    for module, idxs in grouped_inputs:
        _prune_grouped_inputs(module, idxs)
    for module, idxs, dim in norms:
        _prune_layer_norm(module, idxs, dim)
    for module, width, idxs in extras:
        _prune_extra_tensors(module, width, idxs)
    return removed


@torch.no_grad()
def _prune_extra_tensors(module: nn.Module, width: int, idxs: set[int]) -> None:
    """Cut a layer's other per-output-channel tensors along with its weight.

    Subclasses of Conv2d add some (timm's ScaledStdConv2d has a ``gain`` per filter) that
    Torch-Pruning leaves whole, which breaks the pruned layer's forward pass.
    """
    keep = torch.tensor([i for i in range(width) if i not in idxs], dtype=torch.long)
    for name, param in list(module.named_parameters(recurse=False)):
        if name not in ("weight", "bias") and param.dim() >= 1 and param.shape[0] == width:
            setattr(module, name, nn.Parameter(param.data[keep].clone(),
                                               requires_grad=param.requires_grad))
    for name, buf in list(module.named_buffers(recurse=False)):
        if buf is not None and buf.dim() >= 1 and buf.shape[0] == width:
            module._buffers[name] = buf[keep].clone()


@torch.no_grad()
def _prune_layer_norm(norm: nn.LayerNorm, idxs: set[int], dim: int) -> None:
    """Drop entries of a LayerNorm, the kept ones in their order.

    Torch-Pruning 1.6's own LayerNorm pruner keeps them in the iteration order of a
    Python set, which is not ascending once the kept indices outgrow the set's table:
    the norm's weights then no longer sit on their channels.
    """
    width = norm.normalized_shape[dim]
    keep = torch.tensor([i for i in range(width) if i not in idxs], dtype=torch.long)
    if norm.weight is not None:
        norm.weight = nn.Parameter(norm.weight.data.index_select(dim, keep).clone(),
                                   requires_grad=norm.weight.requires_grad)
    if norm.bias is not None:
        norm.bias = nn.Parameter(norm.bias.data.index_select(dim, keep).clone(),
                                 requires_grad=norm.bias.requires_grad)
    shape = list(norm.normalized_shape)
    shape[dim] = len(keep)
    norm.normalized_shape = tuple(shape)


@torch.no_grad()
def _prune_grouped_inputs(conv: nn.Conv2d, idxs: set[int]) -> None:
    """Drop input channels of a grouped conv; every group must lose as many."""
    groups = conv.groups
    per_in, per_out = conv.in_channels // groups, conv.out_channels // groups
    blocks = []
    for g in range(groups):
        keep = [c for c in range(per_in) if g * per_in + c not in idxs]
        blocks.append(conv.weight[g * per_out:(g + 1) * per_out][:, keep])
    if len({b.shape[1] for b in blocks}) != 1 or conv.out_channels % groups:
        raise UnsupportedModelError(
            f"grouped convolution {conv} would get groups of unequal width; pass it (or the "
            "layers feeding it) as ignored_layers")
    conv.weight = nn.Parameter(torch.cat(blocks).contiguous())
    conv.in_channels -= len(idxs)


def apply_removals(graph: tp.DependencyGraph, cands: list[Candidate], removals: list[list[int]],
                   names: dict[nn.Module, str]) -> dict[str, Any]:
    """Remove the chosen channels of each candidate and return the plan that replays it."""
    steps, parts = [], []
    for cand, idxs in zip(cands, removals):
        if not idxs:
            continue
        step = []
        for part in cand.parts:
            local = [i - part.offset for i in idxs if part.offset <= i < part.offset + part.width]
            if local:
                step.append((part.root, part.root_fn, local))
        parts += step
        records = [{"module": names[root],
                    "kind": "linear" if isinstance(root, nn.Linear) else "conv",
                    "idxs": [int(i) for i in local]} for root, _, local in step]
        steps.append(records[0] if len(records) == 1 else {"parts": records})
    kept = {names[module]: [i for i in range(width) if i not in gone]
            for module, (width, gone) in prune_together(graph, parts).items()}
    return {"format": PLAN_FORMAT, "steps": steps, "kept": kept}
