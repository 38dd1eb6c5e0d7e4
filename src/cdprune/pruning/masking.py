"""The published code's network: filters masked to zero, not removed.

The CDP paper's code ranks every Conv2d filter of the network in one global list (the
stem, each block's first convolution and each residual-output convolution alike; the
classifier is a Linear layer and stays out), masks the lowest-ranked filters' weights to
zero and fine-tunes that masked network. This module rebuilds that selection
(:func:`published_selection`, :func:`published_search`), holds the masks at zero through
fine-tuning (:class:`FilterMasks`), packs a masked network as a :class:`PruneResult` that
saves and loads like a physically pruned one (:func:`masked_result`), and measures what a
plain channel cut could really remove from it (:func:`channel_cut`).

Masks are described as ``removed_filters``: ``{conv module name: sorted filter
indices}``. A masked network is the base architecture, same modules and names, with those
filters' weights (and conv bias) zero; its BatchNorm is untouched and keeps training, so
a masked filter's channel still carries a learnable per-channel constant.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..importance.scoring import CDPImportance
from ..measure.macs import count_macs, count_params, paper_macs
from .graph import first_sample, trace_model
from .groups import candidates
from .result import PLAN_FORMAT, PruneResult, conv_widths
from .surgery import apply_removals

__all__ = ["FilterMasks", "channel_cut", "mask_filters", "masked_result",
           "kept_of", "published_selection", "published_search", "removed_by_plan"]

logger = logging.getLogger(__name__)

_TOLERANCE = 0.003  # the published MACs search stops within 0.3 points of the target


def _conv_names(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _ranked(scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.as_tensor(v, dtype=torch.float32).flatten().cpu()
                      for v in scores.values()])


def _kept_count(total: int, sparsity: float) -> int:
    # The published threshold is the k-th highest score, k = int(N * (1 - s)).
    return int(total * (1 - sparsity))


def published_selection(scores: Mapping[str, torch.Tensor], sparsity: float
                        ) -> dict[str, list[int]]:
    """The filters the published code masks at ``sparsity``.

    One global ranking of all scored filters: the threshold is the ``int(N * (1 - s))``-th
    highest score and a filter is kept only when its score is strictly above it, so the
    threshold filter itself goes too (N=2,032 filters of ResNet-56 at s=0.4 mask 814). A
    layer is left whole when ``int(width * s) < 1`` or it has a single filter, as the
    pruning library the published code runs on does. No layer is protected otherwise: a
    layer may lose every filter.

    Args:
        scores: one score per output filter of every Conv2d to rank (higher kept first),
            e.g. from :func:`~cdprune.importance.scoring.tfidf_scores` with ``variant="published"``.
        sparsity: the published code's sparsity, a fraction in (0, 1).

    Returns:
        ``{conv name: sorted filter indices}`` of the masked filters (masked layers only).

    Raises:
        ConfigError: sparsity outside (0, 1), no scores, or a sparsity so high that no
            filter would be kept.
    """
    if not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise ConfigError(f"sparsity={sparsity!r} is outside (0, 1); give a fraction such "
                          "as 0.4")
    if not scores:
        raise ConfigError("no scores to rank: score the model's Conv2d layers first")
    flat = _ranked(scores)
    keep = _kept_count(flat.numel(), sparsity)
    if keep < 1:
        raise ConfigError(f"sparsity={sparsity} keeps no filter of {flat.numel()}; give a "
                          "smaller sparsity")
    threshold = torch.topk(flat, keep).values.min()
    out: dict[str, list[int]] = {}
    for name, value in scores.items():
        score = torch.as_tensor(value, dtype=torch.float32).flatten().cpu()
        if score.numel() < 2 or int(score.numel() * sparsity) < 1:
            continue
        gone = (~(score > threshold)).nonzero().flatten().tolist()
        if gone:
            out[name] = gone
    return out


def _sparsity_for(total: int, keep: int) -> float:
    """A sparsity whose published rule keeps exactly ``keep`` of ``total`` ranked filters."""
    for digits in (4, 5, 6, 8, 12):
        s = round(1 - (keep + 0.5) / total, digits)
        if 0 < s < 1 and _kept_count(total, s) == keep:
            return s
    return 1 - (keep + 0.5) / total


def published_search(model: nn.Module, scores: Mapping[str, torch.Tensor], target: int, *,
                     example_inputs: Any) -> tuple[float, dict[str, list[int]]]:
    """The published sparsity whose masks land on ``target`` MACs in the paper's convention.

    The paper's MACs of the masked network (:func:`~cdprune.measure.macs.paper_macs`) fall as the
    sparsity rises, so the number of filters kept is bisected; the closest count wins.

    Args:
        model: the unpruned network the scores belong to.
        scores: as for :func:`published_selection`.
        target: MACs to keep, in the paper's convention.
        example_inputs: a batch the model takes.

    Returns:
        The sparsity (as the published code's sparsity would be given) and its selection.

    When no count lands within 0.3 points (of the unpruned MACs) of the target, because
    one filter of a wide layer moves the count by more, the closest is taken, with a
    warning.

    Raises:
        ConfigError: the target is not below the unpruned MACs.
    """
    total = _ranked(scores).numel()
    base = paper_macs(model, {}, example_inputs=example_inputs)
    if not 0 < target < base:
        raise ConfigError(f"MACs target {target / 1e6:.2f}M must be below the unpruned "
                          f"model's {base / 1e6:.2f}M; give a smaller MACs target")
    cache: dict[int, tuple[int, float, dict[str, list[int]]]] = {}

    def at(keep: int) -> tuple[int, float, dict[str, list[int]]]:
        if keep not in cache:
            s = _sparsity_for(total, keep)
            sel = published_selection(scores, s)
            macs = paper_macs(model, kept_of(model, sel), example_inputs=example_inputs)
            cache[keep] = (macs, s, sel)
        return cache[keep]

    lo, hi = 1, total - 1  # paper MACs grow with the filters kept
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid)[0] >= target:
            hi = mid
        else:
            lo = mid + 1
    best = min((k for k in (lo - 1, lo) if 1 <= k < total),
               key=lambda k: abs(at(k)[0] - target))
    macs, sparsity, selection = at(best)
    if abs(macs - target) / base > _TOLERANCE:
        # One filter of a wide early layer can move the count by more than the tolerance
        # (the published search would never stop there): the closest count is kept.
        logger.warning("no published sparsity lands within 0.3 points of %.2fM MACs (paper "
                       "convention); the closest, %.2fM at sparsity %s, is used",
                       target / 1e6, macs / 1e6, sparsity)
    logger.info("paper-convention target %.2fM: published sparsity %s masks %d filters "
                "(%.2fM)", target / 1e6, sparsity, sum(map(len, selection.values())),
                macs / 1e6)
    return sparsity, selection


def kept_of(model: nn.Module, removed: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """``{conv: kept filter indices}`` of the masked convolutions (for paper MACs)."""
    convs = _conv_names(model)
    kept = {}
    for n, idx in removed.items():
        gone = set(idx)  # once per layer, not once per filter
        kept[n] = [i for i in range(convs[n].out_channels) if i not in gone]
    return kept


def _check_removed(model: nn.Module, removed: Mapping[str, Sequence[int]]
                   ) -> dict[str, nn.Conv2d]:
    convs = _conv_names(model)
    for name, idxs in removed.items():
        if name not in convs:
            raise ConfigError(f"removed_filters names '{name}', which is not a Conv2d of the "
                              "model; the masks belong to another architecture")
        width = convs[name].out_channels
        if any(not isinstance(i, int) or not 0 <= i < width for i in idxs):
            raise ConfigError(f"removed_filters of '{name}' must be filter indices in "
                              f"[0, {width}), got {list(idxs)[:8]}")
    return convs


def mask_filters(model: nn.Module, removed: Mapping[str, Sequence[int]]) -> nn.Module:
    """Zero the weights (and conv bias) of the removed filters, in place; BatchNorm untouched.

    Returns:
        ``model``.

    Raises:
        ConfigError: a name that is not a Conv2d of ``model`` or an index out of range.
    """
    convs = _check_removed(model, removed)
    with torch.no_grad():
        for name, idxs in removed.items():
            if idxs:
                index = torch.as_tensor(list(idxs), dtype=torch.long,
                                        device=convs[name].weight.device)
                convs[name].weight.index_fill_(0, index, 0.0)
                if convs[name].bias is not None:
                    convs[name].bias.index_fill_(0, index, 0.0)
    return model


class FilterMasks:
    """Keeps masked filters at zero while an optimiser trains the network.

    Multiplicative masks are built once per masked parameter (on its device), so each
    training step costs a handful of fused multiplications: :meth:`zero_grads` after the
    backward pass (no gradient reaches a masked weight, so neither weight decay nor
    momentum of a zero weight moves it), :meth:`after_step` after the optimiser step
    (weights and momentum buffers multiplied by the mask again, in case anything did).

    Args:
        model: the network (its parameters, not a wrapper's copy).
        removed: ``{conv name: filter indices}``.
    """

    def __init__(self, model: nn.Module, removed: Mapping[str, Sequence[int]]):
        convs = _check_removed(model, removed)
        self.removed = {n: sorted(int(i) for i in idx) for n, idx in removed.items() if idx}
        self.params: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        for name, idxs in self.removed.items():
            conv = convs[name]
            keep = torch.ones(conv.out_channels, device=conv.weight.device,
                              dtype=conv.weight.dtype)
            keep[idxs] = 0
            self.params.append(conv.weight)
            self.masks.append(keep.view(-1, *([1] * (conv.weight.dim() - 1))))
            if conv.bias is not None:
                self.params.append(conv.bias)
                self.masks.append(keep)

    def __bool__(self) -> bool:
        return bool(self.params)

    def _fit(self) -> None:
        # The model may have moved (device, dtype, channels_last) since the masks were made.
        for i, (p, m) in enumerate(zip(self.params, self.masks)):
            if m.device != p.device or m.dtype != p.dtype:
                self.masks[i] = m.to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def apply(self) -> None:
        """Multiply the masked parameters by their masks."""
        self._fit()
        torch._foreach_mul_(self.params, self.masks)

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Zero the masked entries of the gradients (call between backward and step)."""
        pairs = [(p.grad, m) for p, m in zip(self.params, self.masks) if p.grad is not None]
        if pairs:
            self._fit()
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Re-apply the masks to the weights and to the optimiser's per-parameter buffers."""
        self.apply()
        if optimizer is None:
            return
        bufs, masks = [], []
        for p, m in zip(self.params, self.masks):
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    bufs.append(value)
                    masks.append(m)
        if bufs:
            torch._foreach_mul_(bufs, masks)


def removed_by_plan(plan: Mapping[str, Any], widths_before: Mapping[str, int]
                    ) -> dict[str, list[int]]:
    """``{conv: removed filter indices}`` (original numbering) of a pruning plan.

    A masked plan lists its masks; a physical plan's ``kept`` gives, per pruned
    convolution, the output channels kept of ``widths_before``.
    """
    if plan.get("masked") is not None:
        return {n: list(v) for n, v in plan["masked"].items()}
    out = {}
    for name, kept in (plan.get("kept") or {}).items():
        if name in widths_before:
            keep = set(kept)
            gone = [i for i in range(widths_before[name]) if i not in keep]
            if gone:
                out[name] = gone
    return out


def masked_result(model: nn.Module, removed: Mapping[str, Sequence[int]], *,
                  example_inputs: Any, target: Mapping[str, Any] | None = None) -> Any:
    """A masked copy of ``model`` as a :class:`~cdprune.pruning.PruneResult`.

    The plan has no removal steps (the architecture stays whole) and records the masks
    under ``masked``, ``mode: "mask"``; ``kept`` lists the unmasked filters of each
    masked convolution. ``macs_after`` is the MACs of the masked network as it runs
    (equal to ``macs_before``: masking saves no arithmetic); the paper's count is
    :func:`~cdprune.measure.macs.paper_macs`.
    """

    work = mask_filters(copy.deepcopy(model), removed)
    removed = {n: sorted(int(i) for i in v) for n, v in removed.items() if v}
    sample = example_inputs[:1] if isinstance(example_inputs, torch.Tensor) else example_inputs
    macs = count_macs(work, example_inputs=sample)
    widths = conv_widths(work)
    plan = {"format": PLAN_FORMAT, "steps": [], "mode": "mask", "masked": removed,
            "kept": kept_of(model, removed), "target": dict(target or {})}
    return PruneResult(work, plan, macs, macs, count_params(model), count_params(work),
                       widths, widths, sum(map(len, removed.values())), sum(widths.values()))


def channel_cut(model: nn.Module, removed: Mapping[str, Sequence[int]], *,
                example_inputs: Any) -> Any:
    """Physically remove what a plain channel cut can of a set of masked filters.

    A channel goes when every convolution writing it has it masked: a block-internal
    filter on its own, a residual-stream channel only when every convolution adding to
    that stream has it masked (and the stream's layout allows it). Every layer keeps at
    least one channel. The result is a physically smaller network whose MACs are the
    honest cost of the masks without compaction (residual-output filters whose stream
    must stay are not cut). It computes a different function from the masked network
    (masked channels' BatchNorm constants are dropped with them).

    Returns:
        A :class:`~cdprune.pruning.PruneResult` of the cut network (``plan["masked"]`` is
        not set; ``removed_by_plan`` gives the filters cut).
    """

    convs = _check_removed(model, removed)
    work = copy.deepcopy(model)
    names = {m: n for n, m in work.named_modules()}
    sample = first_sample(example_inputs)
    macs_before, params_before = count_macs(work, example_inputs=sample), count_params(work)
    widths_before = conv_widths(work)
    trace = trace_model(work, example_inputs)
    scores = {n: torch.ones(c.out_channels) for n, c in convs.items()}
    scored = {m for m in names if isinstance(m, nn.Conv2d)}
    cands = candidates(trace.graph, CDPImportance(scores, model=work),
                       list(trace.output_layers), "all", 1.0, scored, names)
    masked = {n: set(int(i) for i in v) for n, v in removed.items()}
    removals: list[list[int]] = []
    for cand in cands:
        writers = [(names[m], roots) for m, kind, roots in cand.members
                   if kind == "out" and isinstance(m, nn.Conv2d)]
        if len(cand.parts) != 1 or cand.cells is not None or cand.bundles or not writers \
                or any(roots is not None for _, roots in writers):
            removals.append([])
            continue
        gone = [j for j in range(cand.width) if bool(cand.allowed[j])
                and all(j in masked.get(name, ()) for name, _ in writers)]
        removals.append(gone[:max(0, cand.width - cand.min_keep)])
    if any(removals):
        plan = apply_removals(trace.graph, cands, removals, names)
    else:
        plan = {"format": PLAN_FORMAT, "steps": [], "kept": {}}
    plan.update(mode="channel_cut", scope="all")
    filters = sum(widths_before.values()) - sum(conv_widths(work).values())
    return PruneResult(work, plan, macs_before, count_macs(work, example_inputs=sample),
                       params_before, count_params(work), widths_before, conv_widths(work),
                       filters, sum(widths_before.values()))
