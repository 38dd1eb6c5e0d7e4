"""Pruning to a target: :func:`prune` and what it returns.

Scores rank filters globally, as in the paper; channels are then removed for real
through Torch-Pruning's dependency graph, so layers whose channels are coupled (residual
additions, concatenation, depthwise convolutions) shrink together and the pruned network
is genuinely smaller and faster. The final model is measured for real, and its widths
checked against the search's prediction.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..importance.activations import attention_modules
from ..importance.scoring import CDPImportance
from ..measure.latency import LatencySettings
from ..measure.macs import count_macs, count_params
from ..suggest import did_you_mean
from .by_latency import LatencyModel, by_latency, hit_latency, order_by_latency
from .graph import auto_scope, first_sample, trace_model
from .groups import candidates
from .result import PruneResult, conv_widths
from .search import MACS_TOLERANCE, NoChannelError, Search, by_macs, by_sparsity
from .surgery import apply_removals

__all__ = ["PruneResult", "conv_widths", "prune"]

logger = logging.getLogger(__name__)

SCOPES = ("auto", "internal", "all")
ALLOCATIONS = ("global", "uniform", "latency")


def _validate(sparsity: float | None, macs_reduction: float | None,
              latency_reduction: float | None, scope: str, max_layer_pruning: float,
              round_to: int | None) -> None:
    if sum(t is not None for t in (sparsity, macs_reduction, latency_reduction)) != 1:
        raise ConfigError("give exactly one pruning target: sparsity (fraction of filters), "
                          "macs_reduction (fraction of MACs) or latency_reduction (fraction "
                          "of measured latency), e.g. macs_reduction=0.5")
    for name, value in (("sparsity", sparsity), ("macs_reduction", macs_reduction),
                        ("latency_reduction", latency_reduction)):
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
            hint = did_you_mean(name, named, before="; ")
            raise ConfigError(f"{what} '{name}' is not a module of the model{hint}")
        modules.append(named[name])
    return modules


def _check_scores(model: nn.Module, scores: Mapping[str, torch.Tensor]) -> set[nn.Module]:
    named = dict(model.named_modules())
    modules = set()
    for name, score in scores.items():
        module = named.get(name)
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            hint = did_you_mean(name, [n for n, m in named.items()
                                       if isinstance(m, (nn.Conv2d, nn.Linear))], before="; ")
            raise ConfigError(f"scores name '{name}', which is not a Conv2d or Linear layer of "
                              f"the model{hint}; were the scores computed on another "
                              "architecture?")
        width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        if torch.as_tensor(score).numel() != width:
            raise ConfigError(f"scores of '{name}' have {torch.as_tensor(score).numel()} entries "
                              f"but the layer has {width} outputs")
        modules.add(module)
    if not modules:
        raise ConfigError("no scores given: collect statistics and score them first")
    return modules


def prune(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor],
    *,
    example_inputs: Any,
    sparsity: float | None = None,
    macs_reduction: float | None = None,
    latency_reduction: float | None = None,
    ignored_layers: Iterable[str] | None = None,
    scope: str = "auto",
    max_layer_pruning: float = 0.9,
    round_to: int | None = None,
    group_reduction: str = "mean",
    allocation: str | None = None,
    inplace: bool = False,
    latency: LatencySettings | None = None,
) -> PruneResult:
    """Remove the lowest-scoring filters physically, to a sparsity, MACs or latency target.

    Args:
        model: the network to prune (left untouched unless ``inplace``).
        scores: per-filter scores keyed by Conv2d name, e.g. from
            :func:`~cdprune.importance.scoring.tfidf_scores`; higher is kept first.
        example_inputs: a batch the model accepts, used to trace dependencies and shapes.
        sparsity: fraction of candidate filters to remove, by one global ranking.
        macs_reduction: fraction of the model's MACs to remove; the result lands within
            0.3 percentage points of it, or, when the removable units are too coarse, on
            the nearest reachable reduction below it (logged, and recorded in
            ``result.extra["macs_target_missed"]``).
        latency_reduction: fraction of the model's latency to remove, measured on this
            machine as ``latency`` says (batch size, threads, device): within
            ``latency.tolerance`` (5%) of the target, checked by timing the whole pruned
            network against the original. Implies ``allocation="latency"`` unless another
            is given, ``scope="all"`` for ``"auto"`` (option-A ResNets then prune the
            zero-padded residual positions), and widths rounded to the fastest measured
            multiple unless ``round_to`` is given. The timings are in
            ``result.extra["latency"]``.
        ignored_layers: module names whose output channels must not be pruned.
        scope: ``"internal"`` prunes only channels that belong to one layer's output
            (block-internal channels of residual networks); ``"all"`` also prunes coupled
            channels such as the residual stream; ``"auto"`` picks ``"internal"`` for
            option-A CIFAR ResNets (their shortcut's registered pruner asks for it, see
            :func:`register_pruner`) and ``"all"`` otherwise.
        max_layer_pruning: no group loses more than this fraction of its channels (and
            every layer keeps at least one).
        round_to: keep channel counts at multiples of this (faster kernels), or None.
        group_reduction: how coupled channels combine their scores.
        allocation: ``"global"`` ranks raw group scores across the whole network (the
            paper); ``"uniform"`` ranks each channel by its rank within its group, so
            every group loses about the same fraction and scores only choose *which*
            channels go inside a layer; ``"latency"`` removes, group by group, the unit
            losing least score per second of latency saved, by a latency table timed on
            this machine (:mod:`cdprune.measure.latency`). Default: ``"latency"`` with a latency
            target, ``"global"`` otherwise.
        inplace: prune ``model`` itself instead of a copy (not with a latency target,
            whose rounds prune fresh copies).
        latency: how latency is timed and cached (:class:`~cdprune.measure.latency.LatencySettings`;
            default batch 1, torch's threads, CPU, a cache in ``~/.cache/cdprune``).

    Returns:
        The pruned model, its plan and its MACs, parameters and widths before and after.

    Raises:
        ConfigError: bad target or arguments, unknown layer names, scores that do not fit
            the model, or a MACs target that cannot be reached under the constraints.
        UnsupportedModelError: Torch-Pruning misreads the graph around the named layers
            even once they are ignored (or ``inplace=True``, which forbids the retry).
    """
    _validate(sparsity, macs_reduction, latency_reduction, scope, max_layer_pruning, round_to)
    if allocation is None:
        allocation = "latency" if latency_reduction is not None else "global"
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation={allocation!r} is not valid; use one of "
                          f"{', '.join(ALLOCATIONS)}")
    _check_scores(model, scores)
    ignored_named = list(ignored_layers or ())
    _resolve_modules(model, ignored_named, "ignored layer")
    timed = None
    auto_round = False  # round_to chosen by timing, not by the caller
    if latency_reduction is not None or allocation == "latency":
        if inplace and latency_reduction is not None:
            raise ConfigError("a latency target prunes and times several copies of the model; "
                              "use inplace=False")
        example = first_sample(example_inputs)
        if not isinstance(example, torch.Tensor):
            raise ConfigError("latency targets need example_inputs to be one tensor batch")
        timed = LatencyModel(model, example, latency or LatencySettings())
        auto_round = round_to is None and timed.settings.round_to == "auto"
        if auto_round:
            round_to = timed.round_to(min(m.out_channels for n, m in model.named_modules()
                                          if n in scores))
        elif round_to is None and timed.settings.round_to is not None:
            round_to = int(timed.settings.round_to)
        if scope == "auto":  # option A: the zero-padded residual positions, exactly
            scope = "all"
    if scope == "auto":
        scope = auto_scope(model)

    ignored_extra: list[str] = []
    chosen = {"round_to": round_to}  # a timed width multiple may be given up (below)

    def run(goal: float | None) -> PruneResult:
        for attempt in range(3):
            work = model if inplace else copy.deepcopy(model)
            try:
                return _prune_once(work, scores, example_inputs, sparsity, macs_reduction,
                                   ignored_named + ignored_extra, scope, max_layer_pruning,
                                   chosen["round_to"], group_reduction, allocation,
                                   None if timed is None else (timed, goal))
            except NoChannelError:
                if not (auto_round and chosen["round_to"]):
                    raise
                # The multiple came from timing, not from the user: a reachable target
                # must not become unreachable through it.
                logger.warning("with the timed width multiple %d no channel can go for this "
                               "target; pruning without a width multiple",
                               chosen["round_to"])
                chosen["round_to"] = None
            except _Misread as exc:
                if inplace or attempt == 2:
                    raise UnsupportedModelError(
                        f"Torch-Pruning's dependency graph misreads layers "
                        f"{', '.join(exc.names)}: pruning would not give the shapes it "
                        "predicts; pass them as ignored_layers" + (
                            " (or prune a copy: inplace=False does this itself)"
                            if inplace else "")) from None
                logger.warning("Torch-Pruning's dependency graph misreads layers %s; pruning "
                               "again with them ignored", ", ".join(exc.names))
                ignored_extra.extend(exc.names)
        raise AssertionError("unreachable")

    if latency_reduction is None:
        result = run(None)
    else:
        assert timed is not None
        result = hit_latency(run, model, first_sample(example_inputs), timed,
                             latency_reduction)
    if ignored_extra:
        result.extra["auto_ignored"] = ignored_extra
    result.plan["scope"] = scope
    if macs_reduction is not None and abs(result.macs_reduction - macs_reduction) > MACS_TOLERANCE:
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
                round_to: int | None, group_reduction: str, allocation: str,
                timed: tuple[LatencyModel, float | None] | None = None) -> PruneResult:
    names = {m: n for n, m in work.named_modules()}
    named = dict(work.named_modules())
    scored = {named[n] for n in scores}
    ignored = _resolve_modules(work, ignored_named, "ignored layer")
    trace = trace_model(work, example_inputs)
    ignored += [m for m in trace.output_layers if m not in ignored]

    macs_before = count_macs(work, example_inputs=first_sample(example_inputs))
    params_before = count_params(work)
    widths_before = conv_widths(work)
    graph = trace.graph
    importance = CDPImportance(scores, group_reduction=group_reduction, model=work)
    cands = candidates(graph, importance, ignored, scope, max_layer_pruning, scored, names)
    search = Search(cands, trace.geometry, round_to, allocation)
    candidate_filters = sum(int(c.scored[c.allowed].sum()) for c in cands)
    if not cands:
        attention = attention_modules(work)
        if attention:  # ViT, Swin: their convolutions only embed patches into the stream
            raise ConfigError(
                f"nothing can be pruned: the model is a transformer ({', '.join(attention)}); "
                "its convolutions only feed the token stream that attention and LayerNorm "
                "read whole, and no MLP hidden layer (the first linear layer of an MLP "
                "block, cdprune.importance.activations.mlp_hidden_layers) is scored; score "
                "those (every criterion does) to prune their hidden units")
        raise ConfigError(f"nothing can be pruned with scope={scope!r}: no scored channel is "
                          "free of ignored layers; try scope='all' or fewer ignored layers")

    predicted_latency = None
    if timed is not None:  # the measured latency table reorders and/or picks the prefix
        shapes = timed[0].shapes(work)
        if allocation == "latency":
            order_by_latency(search, shapes, timed[0].table, round_to)
    if timed is not None and timed[1] is not None:
        removals, predicted_latency, saturated = by_latency(search, timed[0], shapes,
                                                            timed[1])
    elif sparsity is not None:
        removals = by_sparsity(search, sparsity, candidate_filters)
    else:
        removals = by_macs(search, macs_reduction, scope, max_layer_pruning)
    if not any(removals):
        raise NoChannelError(
            "the pruning target removes no channel" + (
                f": with round_to={round_to} the smallest block any layer can lose is too "
                "large; use a smaller round_to" if round_to else
                "; raise the target or max_layer_pruning"))

    plan = apply_removals(graph, cands, removals, names)
    target = {"sparsity": sparsity, "macs_reduction": macs_reduction}
    if timed is not None and timed[1] is not None:
        target["latency_reduction"] = timed[1]  # the predicted goal; prune() sets the asked
    plan.update(scope=scope, target=target,
                round_to=round_to, max_layer_pruning=max_layer_pruning, allocation=allocation)
    wrong = [names[m] for m, (c_in, c_out) in search.widths(removals).items()
             if _width_of(m) != (c_in, c_out)]
    if wrong:
        raise _Misread(wrong)
    try:
        macs_after = count_macs(work, example_inputs=first_sample(example_inputs))
    except RuntimeError as exc:  # an op Torch-Pruning did not see, with a fixed width
        raise UnsupportedModelError(
            f"the pruned model no longer runs ({_first_line(exc)}): an operation inside one "
            "of its modules has a channel count Torch-Pruning cannot see; pass the layers "
            "feeding it as ignored_layers") from None
    predicted = search.macs(removals)
    if predicted != macs_after:
        logger.warning("analytic MACs %d differ from measured %d; the MACs target search may "
                       "be off for this architecture", predicted, macs_after)
    result = PruneResult(work, plan, macs_before, macs_after, params_before,
                         count_params(work), widths_before, conv_widths(work),
                         search.filters(removals), candidate_filters)
    if predicted_latency is not None:
        result.extra["latency_predicted"] = predicted_latency
        result.extra["latency_saturated"] = saturated
    return result


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _width_of(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    return module.in_features, module.out_features
