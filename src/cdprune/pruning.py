"""Physical, dependency-aware removal of the lowest-scoring filters.

Scores rank filters globally, as in the paper; channels are then removed for real through
Torch-Pruning's dependency graph, so layers whose channels are coupled (residual
additions, concatenation, depthwise convolutions) shrink together and the pruned network
is genuinely smaller and faster.

A *group* is a set of coupled channels; its importance per channel is the reduction of
its members' CDP scores (:class:`~cdprune.scoring.CDPImportance`). Groups are ranked in
one global list; the lowest are removed until a fraction of filters (``sparsity``) or of
MACs (``macs_reduction``) is gone. MACs of a candidate pruning are computed analytically
from the layer shapes, which makes the threshold search cheap; the final model is then
measured for real.

Pruned models are saved as ``model.safetensors`` plus ``plan.json``. Loading replays the
plan on a fresh base model: no pickle anywhere.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from .checkpoint import atomic_write_text, load_weights, save_weights
from .errors import CheckpointError, ConfigError, UnsupportedModelError
from .macs import count_macs, count_params
from .scoring import CDPImportance

__all__ = ["PruneResult", "load_pruned", "prune", "save_pruned"]

logger = logging.getLogger(__name__)

SCOPES = ("auto", "internal", "all")
ALLOCATIONS = ("global", "uniform")
PLAN_FORMAT = "cdprune.plan/1"
_OUT_FNS = ("prune_conv_out_channels", "prune_depthwise_conv_out_channels",
            "prune_linear_out_channels")
_MACS_TOLERANCE = 0.003  # the paper's own: within 0.3 percentage points
# Why channels are left unpruned (see _fixed_layout).
SPLIT = "they pass through a torch.split/chunk whose piece sizes the model's code fixes"
REGROUPING = "they pass through a channel regrouping (a view to groups, e.g. a shuffle)"


@dataclass
class PruneResult:
    """What :func:`prune` did.

    Attributes:
        model: the pruned network (a new module unless ``inplace=True``).
        plan: plain-data record that rebuilds the pruned architecture from the base model:
            ``steps`` (the group removals, in order) and ``kept`` (per pruned module, the
            kept output-channel indices of the original).
        macs_before, macs_after, params_before, params_after: measured on the real models.
        widths_before, widths_after: output channels of every Conv2d.
        removed_filters, candidate_filters: scored filters removed, out of those that could
            be (in scope, not ignored).
    """

    model: nn.Module
    plan: dict[str, Any]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    widths_before: dict[str, int]
    widths_after: dict[str, int]
    removed_filters: int = 0
    candidate_filters: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def macs_reduction(self) -> float:
        """Fraction of the base model's MACs removed."""
        return 1.0 - self.macs_after / self.macs_before

    @property
    def sparsity(self) -> float:
        """Fraction of candidate filters removed."""
        return self.removed_filters / max(1, self.candidate_filters)

    def summary(self) -> dict[str, Any]:
        """Numbers for reports: MACs, parameters, sparsity and per-layer widths."""
        return {
            "macs_before": self.macs_before, "macs_after": self.macs_after,
            "macs_reduction": round(self.macs_reduction, 6),
            "params_before": self.params_before, "params_after": self.params_after,
            "removed_filters": self.removed_filters,
            "candidate_filters": self.candidate_filters,
            "sparsity": round(self.sparsity, 6),
            "widths_before": self.widths_before, "widths_after": self.widths_after,
        }


# ---------------------------------------------------------------------- dependency graph
class _PadShortcutPruner(tp.pruner.function.BasePruningFunc):
    """Teaches Torch-Pruning the option-A shortcut, which it would read as element-wise.

    The shortcut places input channel ``i`` at output position ``index[i]`` (or nowhere),
    so input and output channels are pruned independently and stay exact: a removed input
    channel leaves zeros where it went, exactly what the unpruned model computes once
    that channel is zeroed.
    """

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


def _custom_pruners() -> dict[type, tp.pruner.function.BasePruningFunc]:
    from .models.cifar_resnet import PadShortcut

    return {PadShortcut: _PadShortcutPruner()}


def _has_pad_shortcut(model: nn.Module) -> bool:
    pruners = _custom_pruners()
    return any(type(m) in pruners for m in model.modules())


def _build_graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    was_training = model.training
    model.eval()  # tracing runs a forward pass: never let it update BN running stats
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, customized_pruners=_custom_pruners(),
                verbose=False)
    finally:
        model.train(was_training)
    _fix_splits(graph)
    _mark_regroupings(graph)
    return graph


def _mark_regroupings(graph: tp.DependencyGraph) -> None:
    """Mark the reshapes that regroup channels, and switch off their index mapping.

    Apart from flattening features into a Linear classifier, a reshape in a CNN regroups
    channels: ``view(b, groups, c // groups, h, w)`` of a channel shuffle or of split
    attention (ResNeSt), or the radix softmax behind it. Torch-Pruning reads them as
    flattens and maps each index to a run of indices, which on ResNeSt builds groups of
    millions of indices (tens of seconds). The channels through them are left unpruned
    (:func:`_fixed_layout`), so these reshapes just pass indices through.
    """
    ops_module = tp.ops.__name__

    def feeds_only_linear(node: Any) -> bool:
        stack, seen, linear = list(node.outputs), set(), False
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if isinstance(n.module, nn.Linear):
                linear = True
            elif type(n.module).__module__ != ops_module or n.type == tp.ops.OPTYPE.RESHAPE:
                return False
            else:
                stack += n.outputs
        return linear

    for node in list(graph.module2node.values()):
        if node.grad_fn is not None and node.grad_fn.name() == "CopySlices":
            # x[:, :c] += y (ReXNet's partial residual): read as a plain addition, which
            # sends Torch-Pruning's group tracing round in circles for minutes.
            node.cdprune_fixed = "they pass through an in-place write into a channel slice"
            continue
        if (node.type == tp.ops.OPTYPE.ELEMENTWISE and node.grad_fn is not None
                and "Convolution" in node.grad_fn.name()):
            # F.conv2d with a fixed filter inside a module (TResNet's anti-aliasing blur):
            # its channel count is baked into the filter.
            node.cdprune_fixed = ("they pass through a functional convolution with a fixed "
                                  "filter (F.conv2d)")
            continue
        ndim = len(getattr(node.grad_fn, "_saved_self_sym_sizes", ()) or ())
        # Feature maps only: reshaping a per-channel parameter to (1, C, 1, 1) is harmless.
        if (node.type != tp.ops.OPTYPE.RESHAPE or ndim < 4 or feeds_only_linear(node)
                or not any(n.type != tp.ops.OPTYPE.PARAMETER for n in node.inputs)):
            continue  # a weight reshaped (weight standardisation) is no regrouping
        node.cdprune_fixed = REGROUPING
        node.type = tp.ops.OPTYPE.ELEMENTWISE
        deps = list(node.dependencies) + [d for n in node.inputs + node.outputs
                                          for d in n.dependencies if d.target is node]
        for dep in deps:
            dep.index_mapping = [None] * len(dep.index_mapping)


def _fix_splits(graph: tp.DependencyGraph) -> None:
    """Give Torch-Pruning the real sizes and order of the pieces of every channel split.

    It guesses a ``chunk``'s piece sizes from the layers around it, and takes the split's
    consumers in the order it met them while tracing as the order of the pieces; both go
    wrong on cross-stage (CSP) and Res2Net blocks. The autograd graph knows both: the
    split's saved sizes, and which output each consumer reads.
    """
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.SPLIT:
            continue
        fn = node.grad_fn
        shape, dim = getattr(fn, "_saved_self_sym_sizes", None), getattr(fn, "_saved_dim", None)
        if shape is None or dim is None or dim - len(shape) * (dim >= len(shape)) not in (1, -3):
            continue
        total = int(shape[1])
        if hasattr(fn, "_saved_split_sizes"):
            pieces = [int(p) for p in fn._saved_split_sizes]
        elif hasattr(fn, "_saved_split_size"):
            step = int(fn._saved_split_size)
            pieces = [step] * (total // step) + ([total % step] if total % step else [])
        else:
            continue
        order = {}
        for out in node.outputs:
            nrs = {nr for f, nr in getattr(out.grad_fn, "next_functions", ()) if f is fn}
            if len(nrs) == 1:
                order[out] = nrs.pop()
        if len(order) != len(node.outputs) or sorted(order.values()) != list(range(len(pieces))):
            continue  # a consumer reads several pieces, or a piece is unused: leave it
        node.outputs.sort(key=order.__getitem__)
        node.module.split_sizes = pieces
        node.module.offsets = [sum(pieces[:i]) for i in range(len(pieces) + 1)]
    for node in graph.module2node.values():
        if node.type == tp.ops.OPTYPE.CONCAT:
            node.module.concat_sizes = None  # inferred again, from the corrected splits


# ---------------------------------------------------------------------- analytic MACs
@dataclass
class _Geometry:
    """Shape facts of one Conv2d/Linear layer, enough to recount its MACs after pruning."""

    in_ch: int
    out_ch: int
    groups: int
    kernel: int
    positions: int  # output positions per sample (H*W for conv)

    def macs(self, out_rm: int = 0, in_rm: int = 0, depthwise_rm: int = 0) -> int:
        out = self.out_ch - out_rm - depthwise_rm
        if self.groups > 1 and self.groups == self.in_ch:  # depthwise: one input per output
            return self.positions * out * self.kernel
        return self.positions * out * ((self.in_ch - in_rm) // self.groups) * self.kernel


@dataclass
class _Trace:
    """What Torch-Pruning's traced forward pass of one sample tells: the dependency
    graph, every Conv2d/Linear's shapes and the layer that produced the output (the
    classifier, never pruned)."""

    graph: tp.DependencyGraph
    geometry: dict[nn.Module, _Geometry]
    output_layers: list[nn.Module]


def _trace(model: nn.Module, example_inputs: Any) -> _Trace:
    geo: dict[nn.Module, _Geometry] = {}
    last: list[nn.Module] = []

    def hook(m: nn.Module, inputs: Any, out: torch.Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            geo[m] = _Geometry(m.in_channels, m.out_channels, m.groups,
                               m.kernel_size[0] * m.kernel_size[1],
                               out.shape[-1] * out.shape[-2])
        elif isinstance(m, nn.Linear):
            geo[m] = _Geometry(m.in_features, m.out_features, 1, 1,
                               out.numel() // out.shape[0] // m.out_features)
        last[:] = [m]

    # Torch-Pruning traces with a forward pass (and runs the first layer once more on
    # its own, hence no MACs counting here); the hooks read it too.
    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        graph = _build_graph(model, _first_sample(example_inputs))
    finally:
        for h in hooks:
            h.remove()
    return _Trace(graph, geo, last)


def _first_sample(example_inputs: Any) -> Any:
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs[:1]
    return example_inputs


def _kind(fn: Any) -> str | None:
    if fn == tp.prune_depthwise_conv_out_channels:
        return "dw"
    if fn == tp.prune_conv_out_channels or fn == tp.prune_linear_out_channels:
        return "out"
    if fn == tp.prune_conv_in_channels or fn == tp.prune_linear_in_channels:
        return "in"
    return None


def _is_grouped(module: nn.Module) -> bool:
    """A grouped convolution (not depthwise): each group must keep as many channels."""
    return (isinstance(module, nn.Conv2d) and module.groups > 1
            and module.groups != module.out_channels)


def _dimension(module: nn.Module, kind: str | None) -> int | None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if kind in ("out", "dw"):
        return getattr(module, "out_channels", getattr(module, "out_features", None))
    if kind == "in":
        return getattr(module, "in_channels", getattr(module, "in_features", None))
    return None


def _misread(item: Any) -> bool:
    """True when Torch-Pruning's indices for one group member cannot be right.

    Its index bookkeeping goes wrong on some graphs (a ``torch.split`` whose pieces are
    added to other tensors, as in Res2Net): a member then gets more indices than the group
    has channels, or indices past the layer's width. Such a group is never pruned.
    """
    module, kind = item.dep.target.module, _kind(item.dep.pruning_fn)
    if (isinstance(module, nn.Conv2d) and module.groups == module.out_channels > 1
            and module.in_channels != module.out_channels):
        return True  # depthwise with a channel multiplier on its input: read as 1:1
    size = _dimension(module, kind) if isinstance(module, nn.Module) else None
    if size is None:
        return False
    idxs = list(item.idxs)
    if len(idxs) != len(item.root_idxs) or any(not 0 <= i < size for i in idxs):
        return True
    return kind != "in" and len(set(idxs)) != len(idxs)


def _fixed_layout(item: Any) -> str | None:
    """Why channels through this group member cannot be removed, or None if they can.

    The model's own code fixes some channel layouts with plain numbers that pruning
    cannot change: ``torch.split(x, width)`` (Res2Net, CSP), ``x[:, :n]`` (Ghost modules
    whose slice drops channels) and the ``view(b, groups, c // groups, h, w)`` of a
    channel shuffle. Pruning channels that pass through them would change the function.
    """
    node = item.dep.target
    if getattr(node, "cdprune_fixed", None):
        return node.cdprune_fixed
    if node.type not in (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.SLICE, tp.ops.OPTYPE.RESHAPE):
        return None
    fn = node.grad_fn
    dim = getattr(fn, "_saved_dim", 1)
    ndim = len(getattr(fn, "_saved_self_sym_sizes", ())) or 4
    if node.type == tp.ops.OPTYPE.RESHAPE:
        return REGROUPING if ndim >= 5 else None
    if not isinstance(dim, int) or dim % ndim not in (1, ndim - 1):
        return None  # not the channel dim of NCHW, nor of NHWC (channels-last blocks)
    if dim % ndim == ndim - 1 != 1 and getattr(fn, "_saved_step", 1) != 1:
        # A strided slice of the last dim is a spatial subsampling of NCHW (the option-A
        # shortcut's x[:, :, ::2, ::2]), never a channels-last block's channel slice.
        return None
    return (SPLIT if node.type == tp.ops.OPTYPE.SPLIT else
            "they pass through a channel slice whose bounds the model's code fixes")
    return None


@dataclass
class _Part:
    """One Torch-Pruning group inside a candidate: its root and its slice of channels."""

    root: nn.Module
    root_fn: Any
    offset: int
    width: int


@dataclass
class _Candidate:
    """Channels that are removed together, numbered 0..width-1.

    Usually one Torch-Pruning group. Groups whose channels feed the same grouped
    convolution are merged into one candidate (several parts), because the convolution's
    groups must lose equally many channels whichever part the channels come from.
    """

    parts: list[_Part]
    importance: torch.Tensor
    allowed: torch.Tensor  # channels that may be removed without changing the function
    scored: torch.Tensor  # per channel: how many scored conv outputs its removal shrinks
    # (module, kind, channels of this candidate the member holds; None: all); kind out/in/dw
    members: list[tuple[nn.Module, str, torch.Tensor | None]]
    # per grouped-conv member (module, kind): that member's channel index of each channel
    # of the candidate, -1 where the channel does not reach it
    grouped: dict[tuple[nn.Module, str], torch.Tensor]
    min_keep: int = 1
    cells: list[torch.Tensor] | None = None  # equal-removal cells of a grouped candidate
    bundles: list[list[int]] | None = None  # channels that can only go together

    @property
    def width(self) -> int:
        return int(self.importance.numel())


def _from_group(group: Any, imp: torch.Tensor, scored_modules: set[nn.Module]
                ) -> tuple[_Candidate, int]:
    """A one-part candidate from a Torch-Pruning group; also its count of output members."""
    width = len(group[0].root_idxs)
    allowed = torch.ones(width, dtype=torch.bool)
    members: list[tuple[nn.Module, str, torch.Tensor | None]] = []
    grouped: dict[tuple[nn.Module, str], torch.Tensor] = {}
    scored = torch.zeros(width)
    outs = 0
    for item in group:
        fn = item.dep.pruning_fn
        module = item.dep.target.module
        kind = _kind(fn)
        if kind is None and isinstance(getattr(fn, "__self__", None), _PadShortcutPruner):
            if fn == fn.__self__.prune_out_channels:
                outs += 1
                # A stream position fed by the shortcut is not zero when its conv branch
                # is: removing it would change the function. Only the zero-padded
                # positions can go.
                live = module.gather[list(item.idxs)] < module.in_channels
                allowed[torch.tensor(list(item.root_idxs))[live]] = False
            continue
        if kind is None:
            continue
        outs += kind == "out"
        roots = torch.tensor(list(item.root_idxs), dtype=torch.long)
        if kind in ("out", "dw") and module in scored_modules:
            scored[roots] += 1
        full = len(roots) == width and len(set(roots.tolist())) == width
        members.append((module, kind, None if full else roots))
        if _is_grouped(module) and kind in ("in", "out"):
            index = torch.full((width,), -1, dtype=torch.long)
            index[roots] = torch.tensor(list(item.idxs), dtype=torch.long)
            grouped[(module, kind)] = index
    root = group[0].dep.target.module
    part = _Part(root, group[0].dep.pruning_fn, 0, width)
    cand = _Candidate([part], imp.float().cpu(), allowed, scored, members, grouped)
    cand.bundles = _bundles(getattr(group, "_cdprune_ties", ()), width)
    return cand, outs


def _bundles(ties: Iterable[tuple[int, int]], width: int) -> list[list[int]] | None:
    """Classes of channels tied together, or None when every channel stands alone."""
    parent = list(range(width))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    tied = False
    for a, b in set(ties):
        if 0 <= a < width and 0 <= b < width and find(a) != find(b):
            parent[find(a)] = find(b)
            tied = True
    if not tied:
        return None
    classes: dict[int, list[int]] = {}
    for i in range(width):
        classes.setdefault(find(i), []).append(i)
    return list(classes.values())


class _TieRecorder:
    """Notes, while Torch-Pruning builds a group, channels of two roots that are one.

    Tracing a group from its root, Torch-Pruning can reach one layer channel from two
    root channels (a Ghost module's depthwise copy joined back by a residual addition).
    It then keeps one of the two roots for that channel and forgets the other, though
    pruning either removes both. Recorded here, such roots are pruned together.
    """

    def __enter__(self) -> _TieRecorder:
        group_cls = tp.dependency.group.Group
        self.original = original = group_cls.add_and_merge

        def add_and_merge(group: Any, dep: Any, idxs: Any) -> None:
            for old_dep, old_idxs in group._group:
                if old_dep.target == dep.target and old_dep.handler == dep.handler:
                    roots = {i.idx: i.root_idx for i in old_idxs}
                    ties = group.__dict__.setdefault("_cdprune_ties", [])
                    ties += [(roots[i.idx], i.root_idx) for i in idxs
                             if roots.get(i.idx, i.root_idx) != i.root_idx]
                    break
            original(group, dep, idxs)

        group_cls.add_and_merge = add_and_merge
        return self

    def __exit__(self, *exc: Any) -> None:
        tp.dependency.group.Group.add_and_merge = self.original


class _Stop(Exception):
    """Group tracing reached a layout that cannot be pruned, or ran away."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _all_groups(graph: tp.DependencyGraph, ignored: list[nn.Module]
                ) -> tuple[list[Any], list[tuple[nn.Module, str]]]:
    """Every group rooted at a Conv2d/Linear output, as Torch-Pruning's ``get_all_groups``
    lists them, but tracing stops as soon as it reaches a node marked as a fixed layout
    (the group would be left unpruned anyway) or grows past any sensible size (a graph
    Torch-Pruning misreads). Returns the groups and the (root, reason) of stopped ones.
    """
    ignored = list(ignored) + list(graph.IGNORED_LAYERS_IN_TRACING)
    limit = 4 * len(graph.module2node) + 100
    group_cls = tp.dependency.group.Group
    original = group_cls.add_dep

    def add_dep(group: Any, dep: Any, idxs: Any) -> None:
        reason = getattr(dep.target, "cdprune_fixed", None)
        if reason:
            raise _Stop(reason)
        if len(group._group) > limit:
            raise _Stop(f"Torch-Pruning's tracing of their group runs away (past {limit} "
                        "members)")
        original(group, dep, idxs)

    groups, stopped, visited = [], [], set()
    group_cls.add_dep = add_dep
    try:
        for module in list(graph.module2node):
            if (module in ignored or module in visited
                    or not isinstance(module, (nn.Conv2d, nn.Linear))):
                continue
            pruner = graph.get_pruner_of_module(module)
            width = pruner.get_out_channels(module) if pruner is not None else None
            if width is None:
                continue
            try:
                group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                                list(range(width)))
            except _Stop as exc:
                visited.add(module)
                stopped.append((module, exc.reason))
                continue
            outs = [dep.target.module for dep, _ in group
                    if graph.is_out_channel_pruning_fn(dep.handler)]
            visited.update(outs)
            if not any(m in ignored for m in outs):
                groups.append(group)
    finally:
        group_cls.add_dep = original
    return groups, stopped


class _FrozenIndexMapping:
    """Lets Torch-Pruning map indices once for many groups while nothing is pruned.

    It refreshes every concatenation's and split's index mapping each time it builds a
    group, which costs minutes on large graphs (DenseNet, ReXNet). The mapping only
    changes when something is pruned, so one refresh serves all groups read before.
    """

    def __init__(self, graph: tp.DependencyGraph):
        self.graph = graph

    def __enter__(self) -> _FrozenIndexMapping:
        module = tp.dependency.index_mapping
        self.original = module.update_index_mapping
        self.original(self.graph)
        module.update_index_mapping = lambda graph: None
        return self

    def __exit__(self, *exc: Any) -> None:
        tp.dependency.index_mapping.update_index_mapping = self.original


def _merge(cands: list[_Candidate]) -> _Candidate:
    """One candidate from several, channels numbered part after part."""
    if len(cands) == 1:
        return cands[0]
    parts, members, offset = [], [], 0
    keys = list(dict.fromkeys(k for c in cands for k in c.grouped))
    grouped: dict[tuple[nn.Module, str], list[torch.Tensor]] = {k: [] for k in keys}
    for cand in cands:
        for part in cand.parts:
            parts.append(_Part(part.root, part.root_fn, part.offset + offset, part.width))
        for module, kind, roots in cand.members:
            roots = torch.arange(cand.width) if roots is None else roots
            members.append((module, kind, roots + offset))
        for key in keys:
            grouped[key].append(cand.grouped.get(
                key, torch.full((cand.width,), -1, dtype=torch.long)))
        offset += cand.width
    return _Candidate(parts, torch.cat([c.importance for c in cands]),
                      torch.cat([c.allowed for c in cands]),
                      torch.cat([c.scored for c in cands]), members,
                      {k: torch.cat(v) for k, v in grouped.items()})


def _cells(cand: _Candidate) -> list[torch.Tensor] | None:
    """Split a grouped candidate into cells that lose channels one each, in step.

    A cell is the set of channels that land in the same group of every grouped
    convolution they reach. Removing one channel from every cell keeps every group of
    every such convolution equally wide when each group holds as many cells, which is
    checked; None when it does not hold (the candidate then cannot be pruned exactly).
    """
    columns = []
    for (module, kind), index in cand.grouped.items():
        size = (module.in_channels if kind == "in" else module.out_channels) // module.groups
        columns.append(torch.where(index >= 0, index // size, -1))
    segments = torch.stack(columns, dim=1)
    unique, inverse = torch.unique(segments, dim=0, return_inverse=True)
    for col, (module, _) in enumerate(cand.grouped):
        seg = unique[:, col]
        counts = torch.bincount(seg[seg >= 0], minlength=module.groups)
        if counts.numel() != module.groups or counts.min() == 0 or counts.min() != counts.max():
            return None
    return [(inverse == c).nonzero().flatten() for c in range(len(unique))]


def _candidates(graph: tp.DependencyGraph, importance: CDPImportance, ignored: list[nn.Module],
                scope: str, max_layer_pruning: float, scored: set[nn.Module],
                names: dict[nn.Module, str]) -> list[_Candidate]:
    singles: list[_Candidate] = []
    misread: list[str] = []
    fixed: dict[str, list[str]] = {}
    with _TieRecorder(), _FrozenIndexMapping(graph):
        groups, stopped = _all_groups(graph, ignored)
    for module, reason in stopped:
        fixed.setdefault(reason, []).append(names.get(module, "?"))
    for group in groups:
        bad = [item for item in group if _misread(item)]
        if bad:
            misread += [names.get(item.dep.target.module, "?") for item in bad
                        if isinstance(item.dep.target.module, (nn.Conv2d, nn.Linear))]
            continue
        reason = next(filter(None, map(_fixed_layout, group)), None)
        if reason is not None:
            fixed.setdefault(reason, []).append(names.get(group[0].dep.target.module, "?"))
            continue
        imp = importance(group)
        if imp is None:
            continue
        cand, outs = _from_group(group, imp, scored)
        if scope == "internal" and outs != 1:
            continue  # the channels feed more than one layer's output: a residual stream
        singles.append(cand)
    for reason, roots in fixed.items():
        logger.warning("the output channels of %s are left unpruned: %s", ", ".join(roots[:8])
                       + (f" and {len(roots) - 8} more" if len(roots) > 8 else ""), reason)
    if misread:
        logger.warning("Torch-Pruning's dependency graph misreads the channels around %s "
                       "(e.g. a torch.split whose pieces are added elsewhere); those channels "
                       "are left unpruned", ", ".join(sorted(set(misread))[:8]))

    # Candidates reaching the same grouped convolution are pruned as one.
    owner: dict[tuple[nn.Module, str], int] = {}
    parent = list(range(len(singles)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, cand in enumerate(singles):
        for key in cand.grouped:
            if key in owner:
                parent[find(i)] = find(owner[key])
            else:
                owner[key] = i
    components: dict[int, list[_Candidate]] = {}
    for i, cand in enumerate(singles):
        components.setdefault(find(i), []).append(cand)

    out = []
    for members in components.values():
        cand = _merge(members)
        if cand.grouped and any(c.bundles for c in members):
            logger.warning("channels feeding grouped convolution(s) %s are tied to others; "
                           "they are left unpruned",
                           ", ".join(sorted(names.get(m, "?") for m, _ in cand.grouped)))
            continue
        if cand.grouped:
            cand.cells = _cells(cand)
            if cand.cells is None:
                logger.warning(
                    "grouped convolution(s) %s cannot keep equally wide groups when the "
                    "channels feeding them are pruned; those channels are left unpruned",
                    ", ".join(sorted(names.get(m, "?") for m, _ in cand.grouped)))
                continue
            rounds = min(
                min(int(cand.allowed[cell].sum()),
                    len(cell) - max(1, math.ceil((1.0 - max_layer_pruning) * len(cell) - 1e-9)))
                for cell in cand.cells)
            cand.min_keep = cand.width - max(0, rounds) * len(cand.cells)
        else:
            cand.min_keep = max(1, math.ceil((1.0 - max_layer_pruning) * cand.width - 1e-9))
        if cand.width <= cand.min_keep or not cand.allowed.any():
            continue
        out.append(cand)
    return out


class _Search:
    """Turns positions of the global ranking into per-candidate removals and their MACs.

    The ranking is over *units*: single channels, or with ``round_to`` blocks of
    ``round_to`` channels of one candidate (its lowest-scoring first; a first, smaller
    block takes the remainder so that the kept width stays a multiple). A grouped
    candidate's unit is one channel of every cell, each cell's lowest-scoring left, so
    that every group of its grouped convolutions loses as many channels. A unit's key is
    the highest score in it: it goes only when all its channels are below the threshold.
    """

    def __init__(self, candidates: list[_Candidate], geometry: dict[nn.Module, _Geometry],
                 round_to: int | None, allocation: str = "global"):
        self.cands = candidates
        self.geometry = geometry
        units: list[tuple[float, int, int, list[int]]] = []  # key, candidate, seq, channels
        for gid, cand in enumerate(candidates):
            blocks, keys = (_cell_units(cand, round_to, allocation) if cand.cells is not None
                            else _channel_units(cand, round_to, allocation))
            units += [(k, gid, seq, b) for seq, (k, b) in enumerate(zip(keys, blocks))]
        # Deterministic: by key, then candidate order, then position within the candidate.
        units.sort(key=lambda u: (u[0], u[1], u[2]))
        self.order = [(gid, block) for _, gid, _, block in units]
        self.base_macs = sum(g.macs() for g in geometry.values())

    def removals(self, k: int) -> list[list[int]]:
        """Channel indices to remove per candidate when the k lowest units are chosen."""
        return self.select(range(k))

    def select(self, ranks: Iterable[int]) -> list[list[int]]:
        """Removals per candidate for the given positions of the global ranking."""
        chosen: list[list[int]] = [[] for _ in self.cands]
        for gid, block in (self.order[i] for i in sorted(ranks)):
            cand = self.cands[gid]
            if cand.width - len(chosen[gid]) - len(block) >= cand.min_keep:
                chosen[gid].extend(block)
        return [sorted(idxs) for idxs in chosen]

    def removed_per_layer(self, removals: list[list[int]]
                          ) -> tuple[dict[nn.Module, int], dict[nn.Module, int],
                                     dict[nn.Module, int]]:
        out_rm: dict[nn.Module, int] = {}
        in_rm: dict[nn.Module, int] = {}
        dw_rm: dict[nn.Module, int] = {}
        for cand, idxs in zip(self.cands, removals):
            if not idxs:
                continue
            removed = None
            for module, kind, roots in cand.members:
                if roots is None:
                    n = len(idxs)
                else:
                    removed = torch.tensor(idxs) if removed is None else removed
                    n = int(torch.isin(roots, removed).sum())
                target = {"out": out_rm, "in": in_rm, "dw": dw_rm}[kind]
                target[module] = target.get(module, 0) + n
        return out_rm, in_rm, dw_rm

    def macs(self, removals: list[list[int]]) -> int:
        out_rm, in_rm, dw_rm = self.removed_per_layer(removals)
        return sum(g.macs(out_rm.get(m, 0), in_rm.get(m, 0), dw_rm.get(m, 0))
                   for m, g in self.geometry.items())

    def widths(self, removals: list[list[int]]) -> dict[nn.Module, tuple[int, int]]:
        """Predicted (in, out) channels of every layer after the removals."""
        out_rm, in_rm, dw_rm = self.removed_per_layer(removals)
        widths = {}
        for m, g in self.geometry.items():
            dw = dw_rm.get(m, 0)
            widths[m] = (g.in_ch - in_rm.get(m, 0) - dw, g.out_ch - out_rm.get(m, 0) - dw)
        return widths

    def filters(self, removals: list[list[int]]) -> int:
        return sum(int(c.scored[r].sum()) for c, r in zip(self.cands, removals) if r)


def _channel_units(cand: _Candidate, round_to: int | None, allocation: str
                   ) -> tuple[list[list[int]], list[float]]:
    imp = cand.importance
    allowed = cand.allowed.nonzero().flatten()
    ranked = allowed[torch.argsort(imp[allowed], stable=True)].tolist()
    if allocation == "uniform":  # position within the group, as a fraction of it
        keys = {ch: (i + 1) / len(ranked) for i, ch in enumerate(ranked)}
    else:
        keys = {ch: float(imp[ch]) for ch in ranked}
    if cand.bundles is not None:  # tied channels: a bundle is one unit (round_to ignored)
        ok = [b for b in cand.bundles if bool(cand.allowed[b].all())]
        blocks = sorted(ok, key=lambda b: (max(keys[c] for c in b), b[0]))
        return blocks, [max(keys[c] for c in b) for b in blocks]
    size = round_to or 1
    first = len(ranked) % size if cand.width % size == 0 else cand.width % size
    blocks = ([ranked[:first]] if first else []) + [
        ranked[i:i + size] for i in range(first, len(ranked), size)]
    blocks = [b for b in blocks if b]
    return blocks, [max(keys[c] for c in b) for b in blocks]


def _cell_units(cand: _Candidate, round_to: int | None, allocation: str
                ) -> tuple[list[list[int]], list[float]]:
    imp = cand.importance
    ranked = []
    for cell in cand.cells or []:
        ok = cell[cand.allowed[cell]]
        ranked.append(ok[torch.argsort(imp[ok], stable=True)].tolist())
    rounds = (cand.width - cand.min_keep) // len(ranked)
    # With round_to, enough rounds per unit that each unit removes a multiple of it.
    step = round_to // math.gcd(round_to, len(ranked)) if round_to else 1
    blocks, keys = [], []
    for r in range(0, rounds - rounds % step, step):
        block = [ch for cell in ranked for ch in cell[r:r + step]]
        blocks.append(block)
        if allocation == "uniform":
            keys.append(max((r + step) / len(cell) for cell in ranked))
        else:
            keys.append(max(float(imp[ch]) for ch in block))
    return blocks, keys


# ---------------------------------------------------------------------- public API
def _validate(sparsity: float | None, macs_reduction: float | None, scope: str,
              max_layer_pruning: float, round_to: int | None) -> None:
    if (sparsity is None) == (macs_reduction is None):
        raise ConfigError("give exactly one pruning target: sparsity (fraction of filters) or "
                          "macs_reduction (fraction of MACs), e.g. --macs-reduction 0.5")
    for name, value in (("sparsity", sparsity), ("macs_reduction", macs_reduction)):
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < 1):
            raise ConfigError(f"{name}={value} is outside (0, 1); give a fraction such as 0.5")
    if scope not in SCOPES:
        raise ConfigError(f"scope={scope!r} is not valid; use one of {', '.join(SCOPES)}")
    if not 0 < max_layer_pruning <= 1:
        raise ConfigError(f"max_layer_pruning={max_layer_pruning} is outside (0, 1]")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ConfigError(f"round_to={round_to} must be a positive integer (e.g. 8) or None")


def _resolve_modules(model: nn.Module, names: Iterable[str] | None, what: str
                     ) -> list[nn.Module]:
    named = dict(model.named_modules())
    modules = []
    for name in names or ():
        if name not in named:
            close = difflib.get_close_matches(name, list(named), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{what} '{name}' is not a module of the model{hint}")
        modules.append(named[name])
    return modules


def _check_scores(model: nn.Module, scores: Mapping[str, torch.Tensor]) -> set[nn.Module]:
    named = dict(model.named_modules())
    modules = set()
    for name, score in scores.items():
        module = named.get(name)
        if not isinstance(module, nn.Conv2d):
            close = difflib.get_close_matches(name, [n for n, m in named.items()
                                                     if isinstance(m, nn.Conv2d)], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"scores name '{name}', which is not a Conv2d of the model{hint}"
                              "; were the scores computed on another architecture?")
        if torch.as_tensor(score).numel() != module.out_channels:
            raise ConfigError(f"scores of '{name}' have {torch.as_tensor(score).numel()} entries "
                              f"but the layer has {module.out_channels} filters")
        modules.add(module)
    if not modules:
        raise ConfigError("no scores given: collect statistics and score them first")
    return modules


def conv_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d, by name."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def prune(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor],
    *,
    example_inputs: Any,
    sparsity: float | None = None,
    macs_reduction: float | None = None,
    ignored_layers: Iterable[str] | None = None,
    scope: str = "auto",
    max_layer_pruning: float = 0.9,
    round_to: int | None = None,
    group_reduction: str = "mean",
    allocation: str = "global",
    inplace: bool = False,
) -> PruneResult:
    """Remove the lowest-scoring filters physically, to a sparsity or a MACs target.

    Args:
        model: the network to prune (left untouched unless ``inplace``).
        scores: per-filter scores keyed by Conv2d name, e.g. from
            :func:`~cdprune.scoring.tfidf_scores`; higher is kept first.
        example_inputs: a batch the model accepts, used to trace dependencies and shapes.
        sparsity: fraction of candidate filters to remove, by one global ranking.
        macs_reduction: fraction of the model's MACs to remove; the result lands within
            0.3 percentage points of it, or, when the removable units are too coarse, on
            the nearest reachable reduction below it (logged, and recorded in
            ``result.extra["macs_target_missed"]``).
        ignored_layers: module names whose output channels must not be pruned.
        scope: ``"internal"`` prunes only channels that belong to one layer's output
            (block-internal channels of residual networks); ``"all"`` also prunes coupled
            channels such as the residual stream; ``"auto"`` picks ``"internal"`` for
            option-A CIFAR ResNets and ``"all"`` otherwise.
        max_layer_pruning: no group loses more than this fraction of its channels (and
            every layer keeps at least one).
        round_to: keep channel counts at multiples of this (faster kernels), or None.
        group_reduction: how coupled channels combine their scores.
        allocation: ``"global"`` ranks raw group scores across the whole network (the
            paper); ``"uniform"`` ranks each channel by its rank within its group, so
            every group loses about the same fraction and scores only choose *which*
            channels go inside a layer.
        inplace: prune ``model`` itself instead of a copy.

    Returns:
        The pruned model, its plan and its MACs, parameters and widths before and after.

    Raises:
        ConfigError: bad target or arguments, unknown layer names, scores that do not fit
            the model, or a MACs target that cannot be reached under the constraints.
        UnsupportedModelError: Torch-Pruning misreads the graph around the named layers
            even once they are ignored (or ``inplace=True``, which forbids the retry).
    """
    _validate(sparsity, macs_reduction, scope, max_layer_pruning, round_to)
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation={allocation!r} is not valid; use one of "
                          f"{', '.join(ALLOCATIONS)}")
    _check_scores(model, scores)
    ignored_named = list(ignored_layers or ())
    _resolve_modules(model, ignored_named, "ignored layer")
    if scope == "auto":
        scope = "internal" if _has_pad_shortcut(model) else "all"

    ignored_extra: list[str] = []
    for attempt in range(3):
        work = model if inplace else copy.deepcopy(model)
        try:
            result = _prune_once(work, scores, example_inputs, sparsity, macs_reduction,
                                 ignored_named + ignored_extra, scope, max_layer_pruning,
                                 round_to, group_reduction, allocation)
            break
        except _Misread as exc:
            if inplace or attempt == 2:
                raise UnsupportedModelError(
                    f"Torch-Pruning's dependency graph misreads layers {', '.join(exc.names)}:"
                    " pruning would not give the shapes it predicts; pass them as "
                    "ignored_layers" + (" (or prune a copy: inplace=False does this "
                                        "itself)" if inplace else "")) from None
            logger.warning("Torch-Pruning's dependency graph misreads layers %s; pruning "
                           "again with them ignored", ", ".join(exc.names))
            ignored_extra += exc.names
    if ignored_extra:
        result.extra["auto_ignored"] = ignored_extra
    result.plan["scope"] = scope
    if macs_reduction is not None and abs(result.macs_reduction - macs_reduction) > _MACS_TOLERANCE:
        if result.macs_reduction > macs_reduction:
            raise ConfigError(
                f"pruned MACs reduction {result.macs_reduction:.4f} overshoots the target "
                f"{macs_reduction} by more than 0.3 points; try another target")
        # Coarse units (grouped convolutions, round_to): the nearest reduction below.
        logger.warning("a MACs reduction of %s cannot be reached within 0.3 points: the "
                       "removable units are too coarse; landed on %.4f, the nearest "
                       "reachable reduction below the target that the search found",
                       macs_reduction, result.macs_reduction)
        result.extra["macs_target_missed"] = {"target": macs_reduction,
                                              "reached": round(result.macs_reduction, 6)}
    logger.info("pruned %d of %d candidate filters: MACs %.2fM -> %.2fM (-%.1f%%)",
                result.removed_filters, result.candidate_filters, result.macs_before / 1e6,
                result.macs_after / 1e6, 100 * result.macs_reduction)
    return result


class _Misread(Exception):
    """Pruning gave other shapes than predicted: the dependency graph was misread."""

    def __init__(self, names: list[str]):
        super().__init__(", ".join(names))
        self.names = names


def _prune_once(work: nn.Module, scores: Mapping[str, torch.Tensor], example_inputs: Any,
                sparsity: float | None, macs_reduction: float | None,
                ignored_named: list[str], scope: str, max_layer_pruning: float,
                round_to: int | None, group_reduction: str, allocation: str) -> PruneResult:
    names = {m: n for n, m in work.named_modules()}
    named = dict(work.named_modules())
    scored = {named[n] for n in scores}
    ignored = _resolve_modules(work, ignored_named, "ignored layer")
    trace = _trace(work, example_inputs)
    ignored += [m for m in trace.output_layers if m not in ignored]

    macs_before = count_macs(work, example_inputs=_first_sample(example_inputs))
    params_before = count_params(work)
    widths_before = conv_widths(work)
    graph = trace.graph
    importance = CDPImportance(scores, group_reduction=group_reduction, model=work)
    cands = _candidates(graph, importance, ignored, scope, max_layer_pruning, scored, names)
    search = _Search(cands, trace.geometry, round_to, allocation)
    candidate_filters = sum(int(c.scored[c.allowed].sum()) for c in cands)
    if not cands:
        raise ConfigError(f"nothing can be pruned with scope={scope!r}: no scored channel is "
                          "free of ignored layers; try scope='all' or fewer ignored layers")

    if sparsity is not None:
        removals = _by_sparsity(search, sparsity, candidate_filters)
    else:
        removals = _by_macs(search, macs_reduction, scope, max_layer_pruning)
    if not any(removals):
        raise ConfigError(
            "the pruning target removes no channel" + (
                f": with round_to={round_to} the smallest block any layer can lose is too "
                "large; use a smaller round_to" if round_to else
                "; raise the target or max_layer_pruning"))

    plan = _apply(graph, cands, removals, names)
    plan.update(scope=scope, target={"sparsity": sparsity, "macs_reduction": macs_reduction},
                round_to=round_to, max_layer_pruning=max_layer_pruning, allocation=allocation)
    wrong = [names[m] for m, (c_in, c_out) in search.widths(removals).items()
             if _width_of(m) != (c_in, c_out)]
    if wrong:
        raise _Misread(wrong)
    try:
        macs_after = count_macs(work, example_inputs=_first_sample(example_inputs))
    except RuntimeError as exc:  # an op Torch-Pruning did not see, with a fixed width
        raise UnsupportedModelError(
            f"the pruned model no longer runs ({_first_line(exc)}): an operation inside one "
            "of its modules has a channel count Torch-Pruning cannot see; pass the layers "
            "feeding it as ignored_layers") from None
    predicted = search.macs(removals)
    if predicted != macs_after:
        logger.warning("analytic MACs %d differ from measured %d; the MACs target search may "
                       "be off for this architecture", predicted, macs_after)
    return PruneResult(work, plan, macs_before, macs_after, params_before, count_params(work),
                       widths_before, conv_widths(work), search.filters(removals),
                       candidate_filters)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _width_of(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    return module.in_features, module.out_features


def _by_sparsity(search: _Search, sparsity: float, candidate_filters: int) -> list[list[int]]:
    target = sparsity * candidate_filters
    lo, hi = 0, len(search.order)
    while lo < hi:  # smallest k whose removals reach the target filter count
        mid = (lo + hi) // 2
        if search.filters(search.removals(mid)) >= target:
            hi = mid
        else:
            lo = mid + 1
    return search.removals(lo)


def _by_macs(search: _Search, target: float, scope: str, max_layer_pruning: float
             ) -> list[list[int]]:
    def reduction(k: int) -> float:
        return 1.0 - search.macs(search.removals(k)) / search.base_macs

    most = reduction(len(search.order))
    if most + _MACS_TOLERANCE < target:
        raise ConfigError(
            f"a MACs reduction of {target} is unreachable: at most {most:.4f} can be removed "
            f"with scope={scope!r} and max_layer_pruning={max_layer_pruning} (the stem, the "
            "classifier and ignored layers are kept); lower the target or raise "
            "max_layer_pruning" + (", or use scope='all'" if scope != "all" else ""))
    lo, hi = 0, len(search.order)
    while lo < hi:  # smallest k reaching the target; reduction is monotone in k
        mid = (lo + hi) // 2
        if reduction(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    best = min((k for k in (lo - 1, lo) if 0 <= k <= len(search.order)),
               key=lambda k: abs(reduction(k) - target))
    if abs(reduction(best) - target) <= _MACS_TOLERANCE:
        return search.removals(best)
    return search.select(_refine(search, lo, target))


def _refine(search: _Search, lo: int, target: float, window: int = 48,
            rounds: int = 64) -> set[int]:
    """Land within tolerance of the MACs target when the threshold unit is too coarse.

    Removing the first ``lo`` units overshoots the target and ``lo - 1`` falls short.
    Tried in turn, closest result kept: (1) remove ``lo`` units, then put back the
    highest-ranked removed units that can be spared; (2) remove ``lo - 1``, then add the
    next-ranked units that still fit; (3) from the better of the two, a local search of
    single additions, put-backs and swaps among units within ``window`` ranks of the
    threshold. Only units near the threshold move, so the result stays true to the
    ranking.
    """
    # Closest selection not above the target seen so far: the answer when none lands
    # within tolerance (a user asking for -30% must never get -47%).
    fallback: list[Any] = [-1.0, set(range(lo - 1))]

    def value(sel: set[int]) -> float:
        v = 1.0 - search.macs(search.select(sel)) / search.base_macs
        if fallback[0] < v <= target + _MACS_TOLERANCE:
            fallback[:] = [v, set(sel)]
        return v

    def good(v: float) -> bool:
        return abs(v - target) <= _MACS_TOLERANCE

    above = set(range(lo))
    for j in range(lo - 1, max(-1, lo - 1 - 4 * window), -1):
        if value(above - {j}) >= target - _MACS_TOLERANCE:
            above.discard(j)
            if good(value(above)):
                return above
    below = set(range(lo - 1))
    for i in range(lo - 1, min(len(search.order), lo + 4 * window)):
        if value(below | {i}) <= target + _MACS_TOLERANCE:
            below.add(i)
            if good(value(below)):
                return below
    ranks = min((above, below), key=lambda sel: abs(value(sel) - target))
    current = value(ranks)
    for _ in range(rounds):
        if good(current):
            break
        kept = [i for i in range(len(search.order)) if i not in ranks][:window]
        removed = sorted(ranks)[-window:]
        moves = [ranks | {i} for i in kept] + [ranks - {j} for j in removed]
        moves += [(ranks - {j}) | {i} for j in removed[-window // 2:] for i in kept[:window // 2]]
        best_sel, best_val = None, current
        for sel in moves:
            v = value(sel)
            if abs(v - target) < abs(best_val - target):
                best_sel, best_val = sel, v
        if best_sel is None:
            break
        ranks, current = best_sel, best_val
    return ranks if good(current) else fallback[1]


def _apply(graph: tp.DependencyGraph, cands: list[_Candidate], removals: list[list[int]],
           names: dict[nn.Module, str]) -> dict[str, Any]:
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
            for module, (width, gone) in _prune_together(graph, parts).items()}
    return {"format": PLAN_FORMAT, "steps": steps, "kept": kept}


def _prune_together(graph: tp.DependencyGraph, parts: list[tuple[nn.Module, Any, list[int]]]
                    ) -> dict[nn.Module, tuple[int, set[int]]]:
    """Remove channels of several roots in one go.

    Returns, per layer whose outputs shrank, its width before and the positions removed.

    All groups are read before anything is pruned, so their indices share one numbering
    (the original model's), and each layer is cut once with the union of its indices. Grouped convolutions' input
    channels are cut here, group by group: Torch-Pruning assumes the same positions go in
    every group, which holds for its own pruner but not for scores ranked within groups.
    """
    merged: dict[tuple[Any, Any], tuple[Any, set[int]]] = {}
    with _FrozenIndexMapping(graph):
        for root, fn, idxs in parts:
            for item in graph.get_pruning_group(root, fn, idxs):
                key = (item.dep.target, item.dep.handler)
                merged.setdefault(key, (item.dep, set()))[1].update(int(i) for i in item.idxs)
    removed: dict[nn.Module, tuple[int, set[int]]] = {}
    grouped_inputs = []
    group = tp.dependency.group.Group()
    group._DG = graph
    extras = []
    for dep, idxs in merged.values():
        module, kind = dep.target.module, _kind(dep.pruning_fn)
        if kind in ("out", "dw") or isinstance(module, nn.modules.batchnorm._BatchNorm):
            removed[module] = (_dimension(module, kind or "out"), idxs)
        if kind in ("out", "dw") and isinstance(module, (nn.Conv2d, nn.Linear)):
            extras.append((module, removed[module][0], idxs))
        if kind == "in" and _is_grouped(module):
            grouped_inputs.append((module, idxs))
        else:
            group.add_dep(dep, sorted(idxs))
    group.prune(record_history=False)
    for module, idxs in grouped_inputs:
        _prune_grouped_inputs(module, idxs)
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


# ---------------------------------------------------------------------- save / load
def _replay(model: nn.Module, plan: Mapping[str, Any], example_inputs: Any) -> nn.Module:
    if not isinstance(plan, Mapping) or plan.get("format") != PLAN_FORMAT:
        raise CheckpointError(f"not a cdprune plan (expected format {PLAN_FORMAT!r})")
    graph = _build_graph(model, example_inputs)
    named = dict(model.named_modules())
    parts = []
    for step in plan["steps"]:
        records = step.get("parts", [step]) if isinstance(step, Mapping) else [{}]
        for record in records:
            module = named.get(record.get("module"))
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                raise CheckpointError(f"plan step names module {record.get('module')!r}, which "
                                      "the base model lacks: the plan belongs to another "
                                      "architecture")
            fn = tp.prune_linear_out_channels if isinstance(module, nn.Linear) \
                else tp.prune_conv_out_channels
            if isinstance(module, nn.Conv2d) and module.groups == module.out_channels > 1:
                fn = tp.prune_depthwise_conv_out_channels
            width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            idxs = record.get("idxs", [])
            if not idxs or any(not isinstance(i, int) or not 0 <= i < width for i in idxs) \
                    or len(set(idxs)) >= width:
                raise CheckpointError(f"plan step for '{record['module']}' removes channels "
                                      f"{idxs[:8]}... that do not fit its {width} channels")
            parts.append((module, fn, idxs))
    _prune_together(graph, parts)  # every step's indices are in the base model's numbering
    return model


def _example_for(plan: Mapping[str, Any]) -> torch.Tensor:
    shape = plan.get("input_size")
    if not shape:
        raise CheckpointError("plan has no input_size; pass example_inputs to load_pruned")
    return torch.randn(1, *shape)


def save_pruned(directory: str | os.PathLike, result: PruneResult, *,
                model_name: str | None = None, input_size: Sequence[int] | None = None,
                extra: Mapping[str, Any] | None = None) -> Path:
    """Write a pruned model as ``model.safetensors`` + ``plan.json`` into ``directory``.

    Args:
        directory: created if missing.
        result: from :func:`prune`.
        model_name: zoo name of the base architecture, or None for a user model.
        input_size: ``(C, H, W)`` of one input, so loading can trace without arguments.
        extra: more plain data to store in ``plan.json`` (e.g. dataset, normalisation).
    """
    from . import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(result.model, directory / "model.safetensors")
    doc = dict(result.plan)
    doc.update(
        model=model_name or "user model (pass the same base model to load_pruned)",
        zoo_model=model_name, input_size=list(input_size) if input_size else None,
        macs_before=result.macs_before, macs_after=result.macs_after,
        params_before=result.params_before, params_after=result.params_after,
        cdprune_version=__version__, extra=dict(extra or {}))
    atomic_write_text(directory / "plan.json", json.dumps(doc, indent=1) + "\n")
    return directory


def read_plan(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and minimally check ``plan.json`` of a pruned-model directory."""
    path = Path(directory) / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist; point to a directory written by "
                                "`cdprune prune` or save_pruned()")
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"'{path}' is not valid JSON ({exc}); the file is corrupt, "
                              "prune again") from None
    except RecursionError:
        raise CheckpointError(f"'{path}' is nested too deeply to be a plan; the file is "
                              "corrupt, prune again") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT \
            or not isinstance(plan.get("steps"), list):
        raise CheckpointError(f"'{path}' is not a cdprune plan (format {PLAN_FORMAT!r})")
    problem = _plan_problem(plan)
    if problem:
        raise CheckpointError(f"'{path}' is malformed ({problem}); the file is corrupt, "
                              "prune again")
    return plan


def _plan_problem(plan: Mapping[str, Any]) -> str | None:
    """What is wrong with the fields of a plan, field by field; ``None`` if nothing."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for i, step in enumerate(plan["steps"]):
        if not isinstance(step, dict):
            return f"step {i} is a {type(step).__name__}, not a mapping"
        if not isinstance(step.get("module"), str) or not step["module"]:
            return f"step {i} names no module"
        idxs = step.get("idxs")
        if not isinstance(idxs, list) or not idxs or not all(is_int(x) and x >= 0
                                                              for x in idxs):
            return f"step {i} ('{step['module']}') must list channel indices"
    size = plan.get("input_size")
    if size is not None and (not isinstance(size, list) or not 1 <= len(size) <= 4
                             or not all(is_int(x) and 0 < x <= 65536 for x in size)):
        return f"input_size must be a list of positive sizes such as [3, 32, 32], got {size!r}"
    if not isinstance(plan.get("extra", {}), dict):
        return f"extra must be a mapping, got a {type(plan['extra']).__name__}"
    classes = (plan.get("extra") or {}).get("num_classes")
    if classes is not None and not (is_int(classes) and classes > 0):
        return f"extra.num_classes must be a positive integer, got {classes!r}"
    for key in ("zoo_model", "model"):
        if plan.get(key) is not None and not isinstance(plan[key], str):
            return f"{key} must be a name, got a {type(plan[key]).__name__}"
    return None


def load_pruned(directory: str | os.PathLike, base_model: nn.Module, *,
                example_inputs: Any = None) -> nn.Module:
    """Rebuild a pruned model: replay ``plan.json`` on a fresh base model, load its weights.

    Args:
        directory: written by :func:`save_pruned`.
        base_model: an unpruned model of the same architecture (its weights are replaced).
        example_inputs: a batch for tracing; defaults to one of the stored input size.

    Raises:
        FileNotFoundError: missing directory or files.
        CheckpointError: corrupt plan, a plan for another architecture, or weights that do
            not fit the rebuilt model.
    """
    plan = read_plan(directory)
    example = example_inputs if example_inputs is not None else _example_for(plan)
    try:
        model = _replay(base_model, plan, example)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"plan in '{directory}' does not fit the base model "
                              f"({type(exc).__name__}: {exc}); use the base architecture it "
                              "was made from") from None
    return load_weights(model, Path(directory) / "model.safetensors")
