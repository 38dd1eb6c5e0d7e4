"""Latency targets: the measured table decides how many channels go from each group.

:func:`prune` calls these when given ``latency_reduction`` or ``allocation="latency"``.
The criterion's scores still order the channels *inside* each group (lowest first); the
table of :mod:`cdprune.measure.latency` ranks the groups' next units by score lost per second of
predicted latency saved (:func:`~cdprune.measure.latency.greedy_order`). A latency target then
takes the shortest prefix of that ranking whose predicted reduction reaches it, and
:func:`prune` checks the result by timing the whole network, correcting the predicted
target until the measured reduction lands within tolerance.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..measure.latency import (
    MULTIPLES,
    LatencySettings,
    LatencyTable,
    LayerShape,
    UnitChange,
    compare_networks,
    fastest_multiple,
    greedy_order,
    layer_shapes,
    measure_network,
)
from .groups import Candidate
from .search import NoChannelError, Search, cell_units, channel_units

logger = logging.getLogger(__name__)


class LatencyModel:
    """The measured table of one model plus what a pruning needs from it."""

    def __init__(self, model: nn.Module, example: torch.Tensor, settings: LatencySettings):
        self.settings = settings
        self.shapes_by_name = layer_shapes(model, example)
        self.table = LatencyTable.measure(self.shapes_by_name.values(), settings,
                                          signature=type(model).__name__)
        self.base_seconds: float | None = None  # the whole network, measured

    def shapes(self, model: nn.Module) -> dict[nn.Module, LayerShape]:
        """The shapes keyed by the modules of ``model`` (a copy of the measured one)."""
        named = dict(model.named_modules())
        return {named[n]: s for n, s in self.shapes_by_name.items() if n in named}

    def round_to(self, narrowest: int) -> int:
        """The width multiple that runs fastest, timed on the layer costing most time;
        at most half the narrowest prunable width, so that every layer can still lose
        channels."""
        heaviest = max(self.shapes_by_name.values(), key=lambda s: self.table.predict(
            s, s.in_ch, s.out_ch) if s.kind != "linear" else -1.0)
        allowed = [m for m in MULTIPLES if m <= max(1, narrowest // 2)]
        name = f"round_to<={allowed[-1]}"
        if name not in self.table.notes:  # timed once per table: noise must not flip it
            self.table.note(name, fastest_multiple(heaviest, self.settings, allowed))
        return int(self.table.notes[name])

    def predicted(self, search: Search, shapes: dict[nn.Module, LayerShape],
                  removals: list[list[int]]) -> float:
        """Predicted seconds of the timed layers after the removals."""
        return self.table.network(shapes, search.widths(removals))


def _changes(cand: Candidate, block: list[int]) -> list[tuple[Any, int, int]]:
    idx = torch.tensor(block)
    out = []
    for module, kind, roots in cand.members:
        n = len(block) if roots is None else int(torch.isin(roots, idx).sum())
        if n:
            out.append((module, n if kind in ("in", "dw") else 0,
                        n if kind in ("out", "dw") else 0))
    return out


def order_by_latency(search: Search, shapes: dict[nn.Module, LayerShape],
                     table: LatencyTable, round_to: int | None) -> None:
    """Reorder ``search``'s units: least score lost per predicted second saved first.

    Inside a group the units keep their score order; a group's units stop where the
    next would take it below its minimum width.
    """
    groups, blocks = [], []
    for gid, cand in enumerate(search.cands):
        units_of = cell_units if cand.cells is not None else channel_units
        bl, _ = units_of(cand, round_to, "global")
        units, kept = [], cand.width
        for b in bl:
            if kept - len(b) < cand.min_keep:
                break
            kept -= len(b)
            score = float(cand.importance[b].clamp(min=0).sum())
            units.append(UnitChange(gid, score, _changes(cand, b)))
        groups.append(units)
        blocks.append(bl[:len(units)])
    order = greedy_order(groups, shapes, table)
    search.order = [(g, blocks[g][i]) for g, i, _ in order]


def by_latency(search: Search, model: LatencyModel, shapes: dict[nn.Module, LayerShape],
               target: float) -> tuple[list[list[int]], float, bool]:
    """The shortest prefix of the ranking whose predicted reduction reaches ``target``.

    The reduction is relative to the measured whole network, so time outside the timed
    layers (pooling, additions, overhead) counts as unprunable. Returns the removals,
    their predicted reduction and whether the whole ranking was needed (saturated).
    """
    full = model.predicted(search, shapes, search.removals(0))
    # Layers timed alone can sum to more than the whole network (each timing pays the
    # call overhead and cold caches): then relative to their sum.
    base = max(model.base_seconds or 0.0, full)

    def reduction(k: int) -> float:
        return (full - model.predicted(search, shapes, search.removals(k))) / base

    lo, hi = 0, len(search.order)
    if reduction(hi) < target:
        logger.warning("a latency reduction of %.3f is beyond the prediction for pruning "
                       "everything allowed (%.3f)", target, reduction(hi))
        return search.removals(hi), reduction(hi), True
    while lo < hi:  # predicted time falls as units go (each unit saves time or is last)
        mid = (lo + hi) // 2
        if reduction(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    best = min((k for k in (lo - 1, lo) if k >= 0), key=lambda k: abs(reduction(k) - target))
    return search.removals(best), reduction(best), False


def _next_goal(history: list[dict[str, float]], target: float) -> float:
    """The predicted reduction to ask for next: a secant through the last two rounds, or
    a shift by the last miss when they measured alike."""
    last = history[-1]
    # Layer tables tend to misjudge by a factor (time outside the timed layers that
    # shrinks too, cache effects): scale first.
    goal = last["goal"] * target / last["measured"] if last["measured"] > 0.01 else (
        last["goal"] + target - last["measured"])
    if len(history) >= 2:
        prev = history[-2]
        slope = (last["measured"] - prev["measured"]) / (last["goal"] - prev["goal"] or 1e-9)
        if slope > 0.1:  # a sane slope: measured rises with the goal
            goal = last["goal"] + (target - last["measured"]) / slope
    return min(0.99, max(0.001, goal))


def hit_latency(run: Any, base: nn.Module, example: torch.Tensor, timed: LatencyModel,
                target: float) -> Any:
    """Prune with ``run(goal)`` until the measured latency reduction is within tolerance.

    Each round prunes a fresh copy to a predicted reduction ``goal`` and times the pruned
    network alternately with the original (:func:`~cdprune.measure.latency.compare_networks`);
    the next goal corrects the last miss. The closest round is kept; when none lands
    within tolerance, a warning says so and ``extra["latency_target_missed"]`` records it.
    """
    settings = timed.settings
    timed.base_seconds = measure_network(base, example, settings)
    history: list[dict[str, float]] = []
    best = None
    goal = target
    short, over = 0.0, 0.99  # goals known to measure below / above the target
    for _ in range(settings.max_rounds):
        try:
            result = run(goal)
        except NoChannelError:
            if best is None:
                raise
            # A correction asked for less than the first unit saves: no finer step exists.
            logger.info("latency: a goal of -%.2f%% removes no channel; keeping the closest "
                        "round", 100 * goal)
            break
        t_base, t_pruned, ratio = compare_networks(base, result.model, example, settings,
                                                   rounds=settings.search_rounds)
        measured = 1.0 - ratio
        saturated = result.extra.pop("latency_saturated", False)  # the ranking ran out
        history.append({"goal": round(goal, 6),
                        "predicted": round(result.extra.pop("latency_predicted", goal), 6),
                        "measured": round(measured, 6), "base_ms": round(1e3 * t_base, 4),
                        "pruned_ms": round(1e3 * t_pruned, 4)})
        logger.info("latency round %d: predicted -%.1f%%, measured -%.1f%% (%.3g -> %.3g ms)",
                    len(history), 100 * history[-1]["predicted"], 100 * measured,
                    1e3 * t_base, 1e3 * t_pruned)
        if best is None or abs(measured - target) < abs(best[1] - target):
            best = (result, measured)
        if abs(measured - target) <= settings.tolerance * target:
            break
        if measured < target and saturated:
            logger.warning("latency: pruning all that max_layer_pruning allows still leaves "
                           "the network at -%.1f%% measured; time outside the prunable "
                           "channels (per-operator overhead, a small batch) bounds it",
                           100 * measured)
            break
        if measured < target:
            short = max(short, goal)
        else:
            over = min(over, goal)
        goal = _next_goal(history, target)
        if not short < goal < over:  # the estimate left the bracket: halve it instead
            goal = (short + over) / 2
    assert best is not None
    result, searched = best
    # The round closest to the target was chosen by its own timing, so that timing leans
    # towards the target; only an independent re-measurement may say the target was hit.
    t_base, t_pruned, ratio = compare_networks(base, result.model, example, settings,
                                               rounds=settings.confirm_rounds)
    measured = 1.0 - ratio
    hit = abs(measured - target) <= settings.tolerance * target
    logger.info("latency re-measured over %d alternating pairs: -%.1f%% (%.3g -> %.3g ms; "
                "the search's round said -%.1f%%)", settings.confirm_rounds, 100 * measured,
                1e3 * t_base, 1e3 * t_pruned, 100 * searched)
    result.plan["target"]["latency_reduction"] = target
    result.extra["latency"] = {
        "target": target, "measured": round(measured, 6), "hit": hit,
        "search_measured": round(searched, 6), "confirm_rounds": settings.confirm_rounds,
        "base_ms": round(1e3 * t_base, 4), "pruned_ms": round(1e3 * t_pruned, 4),
        "tolerance": settings.tolerance, "batch_size": settings.batch_size,
        "threads": settings.threads or torch.get_num_threads(), "device": settings.device,
        "clock": "custom" if settings.timer is not None else settings.clock_name(),
        "round_to": result.plan.get("round_to"), "rounds": history}
    if not hit:
        close = abs(searched - target) <= settings.tolerance * target
        logger.warning("a latency reduction of %s was not reached within %.0f%%: re-measured, "
                       "the pruned network saves %.4f%s (timings on a busy machine are "
                       "noisy; more rounds or a quieter machine help)", target,
                       100 * settings.tolerance, measured,
                       f", although the search's round measured {searched:.4f}" if close
                       else f" after {len(history)} rounds")
        result.extra["latency_target_missed"] = {"target": target,
                                                 "reached": round(measured, 6)}
    return result
