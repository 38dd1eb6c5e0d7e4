"""The global ranking and the search for the cut that meets a sparsity or MACs target.

Candidates' channels are ranked in one list of units (see :class:`Search`); a target is
met by the smallest prefix of that list that reaches it. MACs of a candidate cut are
counted analytically from the layer shapes, which makes the search cheap; when a unit
is too coarse to land within tolerance, a local search near the threshold refines it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .graph import Geometry
from .groups import Candidate

MACS_TOLERANCE = 0.003  # the paper's own: within 0.3 percentage points


class NoChannelError(ConfigError):
    """The target removes no channel (with ``round_to``, the blocks may be too large)."""


class Search:
    """Turns positions of the global ranking into per-candidate removals and their MACs.

    The ranking is over *units*: single channels, or with ``round_to`` blocks of
    ``round_to`` channels of one candidate (its lowest-scoring first; a first, smaller
    block takes the remainder so that the kept width stays a multiple). A grouped
    candidate's unit is one channel of every cell, each cell's lowest-scoring left, so
    that every group of its grouped convolutions loses as many channels. A unit's key is
    the highest score in it: it goes only when all its channels are below the threshold.
    """

    def __init__(self, candidates: list[Candidate], geometry: dict[nn.Module, Geometry],
                 round_to: int | None, allocation: str = "global"):
        self.cands = candidates
        self.geometry = geometry
        units: list[tuple[float, int, int, list[int]]] = []  # key, candidate, seq, channels
        for gid, cand in enumerate(candidates):
            blocks, keys = (cell_units(cand, round_to, allocation) if cand.cells is not None
                            else channel_units(cand, round_to, allocation))
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


def channel_units(cand: Candidate, round_to: int | None, allocation: str
                  ) -> tuple[list[list[int]], list[float]]:
    """A candidate's removable channels in blocks (``round_to`` or tied bundles), with keys."""
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


def cell_units(cand: Candidate, round_to: int | None, allocation: str
               ) -> tuple[list[list[int]], list[float]]:
    """A cell-structured candidate's removable channels, one round per cell per block."""
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


def by_sparsity(search: Search, sparsity: float, candidate_filters: int) -> list[list[int]]:
    """The fewest removals that reach ``sparsity`` of the candidate filters."""
    target = sparsity * candidate_filters
    lo, hi = 0, len(search.order)
    while lo < hi:  # smallest k whose removals reach the target filter count
        mid = (lo + hi) // 2
        if search.filters(search.removals(mid)) >= target:
            hi = mid
        else:
            lo = mid + 1
    return search.removals(lo)


def by_macs(search: Search, target: float, scope: str, max_layer_pruning: float
            ) -> list[list[int]]:
    """The removals that reach a MACs reduction of ``target``."""
    def reduction(k: int) -> float:
        return 1.0 - search.macs(search.removals(k)) / search.base_macs

    most = reduction(len(search.order))
    if most + MACS_TOLERANCE < target:
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
    if abs(reduction(best) - target) <= MACS_TOLERANCE:
        return search.removals(best)
    return search.select(_refine(search, lo, target))


def _refine(search: Search, lo: int, target: float, window: int = 48,
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
        if fallback[0] < v <= target + MACS_TOLERANCE:
            fallback[:] = [v, set(sel)]
        return v

    def good(v: float) -> bool:
        return abs(v - target) <= MACS_TOLERANCE

    above = set(range(lo))
    for j in range(lo - 1, max(-1, lo - 1 - 4 * window), -1):
        if value(above - {j}) >= target - MACS_TOLERANCE:
            above.discard(j)
            if good(value(above)):
                return above
    below = set(range(lo - 1))
    for i in range(lo - 1, min(len(search.order), lo + 4 * window)):
        if value(below | {i}) <= target + MACS_TOLERANCE:
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
