"""Candidates: the sets of coupled channels that pruning removes together.

Every Torch-Pruning group rooted at a Conv2d/Linear output becomes a candidate with one
importance per channel; groups that cannot be pruned exactly (a fixed channel layout,
indices Torch-Pruning misreads) are left out with a warning; groups that feed the same
grouped convolution are merged, so its groups stay equally wide.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..importance.scoring import CDPImportance
from .graph import ChannelPruner, fixed_layout, is_grouped, is_misread, member_kind
from .layouts import tolerant_index_mapping

logger = logging.getLogger(__name__)


@dataclass
class _Part:
    """One Torch-Pruning group inside a candidate: its root and its slice of channels."""

    root: nn.Module
    root_fn: Any
    offset: int
    width: int


@dataclass
class Candidate:
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
                ) -> tuple[Candidate, int]:
    """A one-part candidate from a Torch-Pruning group; also its count of output members."""
    width = len(group[0].root_idxs)
    allowed = torch.ones(width, dtype=torch.bool)
    members: list[tuple[nn.Module, str, torch.Tensor | None]] = []
    grouped: dict[tuple[nn.Module, str], torch.Tensor] = {}
    scored = torch.zeros(width)
    ties: list[tuple[int, int]] = list(getattr(group, "_cdprune_ties", ()))
    outs = 0
    for item in group:
        fn = item.dep.pruning_fn
        module = item.dep.target.module
        kind = member_kind(fn)
        if getattr(item.dep.target, "cdprune_adjustable", None):
            _keep_every_piece(item, imp, allowed)
            continue
        owner = getattr(fn, "__self__", None)
        if kind is None and isinstance(owner, ChannelPruner):
            if fn == owner.prune_out_channels:
                outs += 1
                locked = owner.locked_outputs(module, list(item.idxs))
                if locked is not None:
                    allowed[torch.tensor(list(item.root_idxs))[locked]] = False
                roots = list(item.root_idxs)
                for bundle in owner.bundled_outputs(module, list(item.idxs)):
                    ties += [(roots[a], roots[b]) for a, b in zip(bundle, bundle[1:])]
            continue
        if kind is None:
            continue
        outs += kind == "out"
        roots = torch.tensor(list(item.root_idxs), dtype=torch.long)
        if kind in ("out", "dw") and module in scored_modules:
            scored[roots] += 1
        full = len(roots) == width and len(set(roots.tolist())) == width
        members.append((module, kind, None if full else roots))
        if is_grouped(module) and kind in ("in", "out"):
            index = torch.full((width,), -1, dtype=torch.long)
            index[roots] = torch.tensor(list(item.idxs), dtype=torch.long)
            grouped[(module, kind)] = index
    root = group[0].dep.target.module
    part = _Part(root, group[0].dep.pruning_fn, 0, width)
    cand = Candidate([part], imp.float().cpu(), allowed, scored, members, grouped)
    cand.bundles = _bundles(ties, width)
    return cand, outs


def _keep_every_piece(item: Any, imp: torch.Tensor, allowed: torch.Tensor) -> None:
    """Keep the best channel of each piece of an adjustable split: an empty piece would
    leave its convolution without channels."""
    offsets = item.dep.target.module.offsets
    idxs, roots = list(item.idxs), list(item.root_idxs)
    for start, end in zip(offsets, offsets[1:]):
        inside = [r for i, r in zip(idxs, roots) if start <= i < end]
        if inside:
            allowed[max(inside, key=lambda r: float(imp[r]))] = False


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


class _Defer(Exception):
    """The group should be rooted elsewhere first (see :func:`_all_groups`)."""


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
        if (deferring and getattr(dep.target, "cdprune_group_major", 0)
                and dep.source in dep.target.inputs):
            raise _Defer()
        if len(group._group) > limit:
            raise _Stop(f"Torch-Pruning's tracing of their group runs away (past {limit} "
                        "members)")
        original(group, dep, idxs)

    groups, stopped, visited, deferred = [], [], set(), []
    group_cls.add_dep = add_dep
    deferring = True
    roots = [m for m in graph.module2node if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        while roots:
            module = roots.pop(0)
            if module in ignored or module in visited:
                continue
            pruner = graph.get_pruner_of_module(module)
            width = pruner.get_out_channels(module) if pruner is not None else None
            if width is None:
                continue
            deferring = module not in deferred
            try:
                group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                                list(range(width)))
            except _Defer:
                # Its channels enter a group-major regrouping (the G*C attention logits
                # of a selective kernel): rooted there the group is G times too wide.
                # Rooted at the C channels it weighs, it takes these along.
                deferred.append(module)
                roots.append(module)
                continue
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


class FrozenIndexMapping:
    """Lets Torch-Pruning map indices once for many groups while nothing is pruned.

    It refreshes every concatenation's and split's index mapping each time it builds a
    group, which costs minutes on large graphs (DenseNet, ReXNet). The mapping only
    changes when something is pruned, so one refresh serves all groups read before.
    """

    def __init__(self, graph: tp.DependencyGraph):
        self.graph = graph

    def __enter__(self) -> FrozenIndexMapping:
        module = tp.dependency.index_mapping
        self.original = module.update_index_mapping
        with tolerant_index_mapping():
            self.original(self.graph)
        module.update_index_mapping = lambda graph: None
        return self

    def __exit__(self, *exc: Any) -> None:
        tp.dependency.index_mapping.update_index_mapping = self.original


def _merge(cands: list[Candidate]) -> Candidate:
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
    return Candidate(parts, torch.cat([c.importance for c in cands]),
                     torch.cat([c.allowed for c in cands]),
                     torch.cat([c.scored for c in cands]), members,
                     {k: torch.cat(v) for k, v in grouped.items()})


def _keep_in_every_part(cand: Candidate, max_layer_pruning: float) -> None:
    """Every layer of a merged candidate keeps its share, not only the candidate as a whole.

    Cells lose channels in step across the parts; without this a cell lying inside one
    narrow part (one branch of a concatenation) could empty that layer. The most important
    channels of each part, as many as ``max_layer_pruning`` leaves it, are kept.
    """
    for part in cand.parts:
        span = torch.arange(part.offset, part.offset + part.width)
        keep = max(1, math.ceil((1.0 - max_layer_pruning) * part.width - 1e-9))
        ranked = span[torch.argsort(cand.importance[span], descending=True, stable=True)]
        cand.allowed[ranked[:keep]] = False


def _cells(cand: Candidate) -> list[torch.Tensor] | None:
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


def candidates(graph: tp.DependencyGraph, importance: CDPImportance, ignored: list[nn.Module],
               scope: str, max_layer_pruning: float, scored: set[nn.Module],
               names: dict[nn.Module, str]) -> list[Candidate]:
    """The prunable channel groups of ``graph``, scored by ``importance``."""
    singles: list[Candidate] = []
    misread: list[str] = []
    fixed: dict[str, list[str]] = {}
    with _TieRecorder(), FrozenIndexMapping(graph):
        groups, stopped = _all_groups(graph, ignored)
    for module, reason in stopped:
        fixed.setdefault(reason, []).append(names.get(module, "?"))
    for group in groups:
        bad = [item for item in group if is_misread(item)]
        if bad:
            misread += [names.get(item.dep.target.module, "?") for item in bad
                        if isinstance(item.dep.target.module, (nn.Conv2d, nn.Linear))]
            continue
        reason = next(filter(None, map(fixed_layout, group)), None)
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
    components: dict[int, list[Candidate]] = {}
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
            _keep_in_every_part(cand, max_layer_pruning)
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
