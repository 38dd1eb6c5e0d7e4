"""Pruning criteria side by side at equal MACs: the evidence for choosing one.

The same pretrained model is pruned to the same MACs target by each criterion, every
pruned model gets the same fine-tuning budget, seed and data, and accuracy is reported
right after pruning and after fine-tuning. All criteria go through the same
:func:`~cdprune.pruning.prune` (same group reduction, global ranking and limits), so the
columns differ by the criterion alone. Random scores run with several seeds and are
summarised as mean and standard deviation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..fileio import atomic_write_text
from ..finetune.batchnorm import recalibrate_bn
from ..finetune.config import TrainConfig
from ..finetune.loop import fine_tune
from ..importance.criteria import ScoreContext, criterion_names, get_criterion
from ..measure.evaluate import evaluate
from ..measure.macs import paper_macs
from ..pruning import prune, save_pruned
from .files import COMPACT, COMPARE_JSON, COMPARE_MD, COMPARE_PLOT, PRUNED
from .report import format_count

__all__ = ["compare_criteria", "read_comparison", "write_comparison"]

logger = logging.getLogger(__name__)

def _label(criterion: str) -> str:
    """The registered label; rows of a criterion no longer registered keep their name."""
    return get_criterion(criterion).label if criterion in criterion_names() else criterion


def compare_criteria(
    model: nn.Module,
    *,
    train_loader: Any,
    val_loader: Any,
    stats_loader: Any,
    example_inputs: torch.Tensor,
    macs_reductions: Sequence[float],
    criteria: Sequence[str] | None = None,
    finetune: TrainConfig | None = None,
    output_dir: str | os.PathLike,
    random_seeds: Sequence[int] = (0, 1, 2),
    stats_max_batches: int | None = None,
    num_classes: int | None = None,
    coe: float = 0.0,
    scope: str = "auto",
    cdp_options: Mapping[str, Any] | None = None,
    allocation: str = "global",
    device: torch.device | str | None = None,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    done: Sequence[Mapping[str, Any]] = (),
    bn_recalibrate: int = 0,
    recal_loader: Any = None,
    model_name: str | None = None,
    pruned_extra: Mapping[str, Any] | None = None,
    prune_mode: str = "remove",
    compact_recalibrate: int = 2048,
) -> list[dict[str, Any]]:
    """Prune ``model`` with each criterion at each MACs target and fine-tune equally.

    Args:
        model: the pretrained base model (left untouched).
        train_loader: fine-tuning data (also the batches the Taylor criterion reads).
        val_loader: evaluation data.
        stats_loader: images for CDP statistics.
        example_inputs: a batch for tracing.
        macs_reductions: MACs targets, each a fraction in (0, 1).
        criteria: registered criterion names (:func:`~cdprune.importance.criteria.criterion_names`,
            all of them by default).
        finetune: the fine-tuning budget given to every pruned model; ``None`` or
            ``epochs=0`` skips fine-tuning.
        output_dir: where each run's checkpoints go.
        random_seeds: seeds of the random criterion.
        stats_max_batches, num_classes, coe: CDP statistics and scoring options.
        scope: pruning scope (see :func:`~cdprune.pruning.prune`).
        cdp_options: more options of the CDP criteria: ``tap`` and ``variant`` (for
            :func:`~cdprune.importance.stats.collect_stats`), ``normalize`` (for
            :func:`~cdprune.importance.scoring.tfidf_scores`). ``documents`` is set by the criterion.
        allocation: how every criterion's scores become per-layer removals (see
            :func:`~cdprune.pruning.prune`); one value for all, so that the columns differ
            by the criterion alone.
        device: where to evaluate and train.
        progress: show progress bars.
        on_row: called with each result row as soon as it exists (to write tables as
            the comparison goes).
        done: rows of an earlier, interrupted comparison; their (target, criterion, seed)
            are not run again and the rows are returned as they are.
        bn_recalibrate: when positive, also report accuracy after re-estimating BatchNorm
            statistics on this many images of ``recal_loader`` (fine-tuning starts from
            the recalibrated model).
        recal_loader: un-augmented training images for ``bn_recalibrate``.
        model_name: zoo name of ``model``, recorded in every pruned model directory so the
            command line can rebuild it (``None``: a user model, for :func:`load_pruned`).
        pruned_extra: more plain data for every ``plan.json`` (dataset, normalisation).
        prune_mode: ``"remove"`` (physical pruning at ``macs_reductions`` of the physical
            MACs) or ``"mask"``: the published code's network, every criterion's scores
            ranked over all Conv2d filters and masked at the sparsity whose MACs in the
            paper's convention land on each target, fine-tuned with the masks held; each
            masked network is then compacted (BatchNorm re-estimated on
            ``compact_recalibrate`` images of ``recal_loader``), and its row gives both:
            the masked network's paper MACs and accuracy, the compact network's physical
            MACs, parameters, accuracy (``acc_compact``) and latency against the masked.
        compact_recalibrate: images for the compact networks' BatchNorm (mask mode).

    Every pruned model is a model directory like a run's: ``MACS/CRITERION/pruned/``
    (plan and weights, after BatchNorm recalibration when asked), with the fine-tuned
    ``last.pth``/``best.pth`` beside it, so ``cdprune eval``/``export --model-dir
    MACS/CRITERION`` and :func:`~cdprune.load_run_model` take it as they take a run.

    Returns:
        One row per (target, criterion, seed): MACs, parameters, accuracy right after
        pruning (and BatchNorm recalibration) and after fine-tuning, seconds spent. A target
        a criterion cannot reach gives a row with ``status: "unreachable"`` and the
        ``error`` instead of aborting the comparison.
    """
    names = criterion_names()
    criteria = names if criteria is None else criteria
    unknown = [c for c in criteria if c not in names]
    if unknown:
        raise ConfigError(f"unknown criteria {unknown}; choose from {', '.join(names)}")
    for target in macs_reductions:
        if not 0 < target < 1:
            raise ConfigError(f"MACs reduction {target} is outside (0, 1)")
    opts = dict(cdp_options or {})
    unknown_opts = set(opts) - {"tap", "normalize", "variant"}
    if unknown_opts:
        raise ConfigError(f"cdp_options {sorted(unknown_opts)} are not valid; use tap, "
                          "normalize or variant")
    if prune_mode not in ("remove", "mask"):
        raise ConfigError(f"prune_mode={prune_mode!r} is not valid; use 'remove' or 'mask'")
    device = torch.device(device) if device else torch.device("cpu")
    model = model.to(device).eval()
    output_dir = Path(output_dir)
    if bn_recalibrate and recal_loader is None:
        raise ConfigError("bn_recalibrate needs recal_loader (un-augmented training images)")
    finished = {_key(r): dict(r) for r in done}
    base_acc = (next(iter(finished.values()))["acc_base"] if finished else
                evaluate(model, val_loader, device=device, progress=False).top1)
    cache: dict[str, tuple[dict[str, torch.Tensor], float]] = {}
    context = ScoreContext(example_inputs=example_inputs, batches=train_loader,
                           stats_loader=stats_loader, stats_max_batches=stats_max_batches,
                           num_classes=num_classes, cdp_options=opts, coe=coe, device=device,
                           progress=progress)

    def scores_for(criterion: str, seed: int) -> tuple[dict[str, torch.Tensor], float]:
        key = f"{criterion}:{seed}" if get_criterion(criterion).seeded else criterion
        if key not in cache:
            start = time.perf_counter()
            scores = get_criterion(criterion).score(model, replace(context, seed=seed))
            cache[key] = (scores, time.perf_counter() - start)
        return cache[key]

    rows = []
    for target in macs_reductions:
        for criterion in criteria:
            for seed in (random_seeds if get_criterion(criterion).seeded else (None,)):
                key = _key({"macs_target": target, "criterion": criterion, "seed": seed})
                if key in finished:
                    rows.append(finished[key])
                    logger.info("%s @ -%.0f%% MACs: done before, kept", criterion,
                                100 * target)
                    continue
                scores, score_time = scores_for(criterion, seed or 0)
                start = time.perf_counter()
                masks = None
                try:
                    if prune_mode == "mask":
                        result, masks = _masked_at(model, scores, target,
                                                   example_inputs.cpu())
                    else:
                        result = prune(model, scores, example_inputs=example_inputs.cpu(),
                                       macs_reduction=target, scope=scope,
                                       allocation=allocation)
                except ConfigError as exc:  # this criterion cannot reach this target
                    row = {"macs_target": target, "criterion": criterion, "seed": seed,
                           "status": "unreachable", "error": str(exc), "acc_base": base_acc}
                    rows.append(row)
                    logger.warning("%s @ -%.0f%% MACs: unreachable: %s", criterion,
                                   100 * target, exc)
                    if on_row:
                        on_row(row)
                    continue
                pruned = result.model.to(device)
                acc_pruned = evaluate(pruned, val_loader, device=device, progress=False).top1
                acc_recal = math.nan
                if bn_recalibrate:
                    recalibrate_bn(pruned, recal_loader, bn_recalibrate, device=device)
                    acc_recal = evaluate(pruned, val_loader, device=device,
                                         progress=False).top1
                tag = f"{criterion}{'' if seed is None else f'-seed{seed}'}"
                run_dir = output_dir / f"macs{target:g}" / tag
                save_pruned(run_dir / PRUNED, result, model_name=model_name,
                            input_size=tuple(example_inputs.shape[1:]), extra=pruned_extra)
                acc_tuned = math.nan
                if finetune is not None and (finetune.epochs > 0 or finetune.max_iters):
                    acc_tuned = fine_tune(pruned, train_loader, val_loader, finetune,
                                          output_dir=run_dir, device=device,
                                          extra_state={"plan": result.plan},
                                          progress=progress, masks=masks).final_acc
                row = {"macs_target": target, "criterion": criterion, "seed": seed,
                       "status": "done",
                       "macs": result.macs_after, "macs_reduction": result.macs_reduction,
                       "macs_paper": paper_macs(model, result.plan["kept"],
                                                example_inputs=example_inputs.cpu()),
                       "params": result.params_after, "acc_base": base_acc,
                       "acc_pruned": acc_pruned, "acc_recalibrated": acc_recal,
                       "acc_finetuned": acc_tuned,
                       "model_dir": run_dir.relative_to(output_dir).as_posix(),
                       "seconds": round(score_time + time.perf_counter() - start, 2)}
                if masks is not None:
                    row.update(_compact_row(pruned, masks, val_loader, example_inputs,
                                            recal_loader, compact_recalibrate, device,
                                            run_dir, model_name, pruned_extra))
                rows.append(row)
                logger.info("%s @ -%.0f%% MACs: %.2f%% right after pruning, %.2f%% after "
                            "fine-tuning", criterion, 100 * target, acc_pruned, acc_tuned)
                if on_row:
                    on_row(row)
    return rows


def _masked_at(model: nn.Module, scores: Mapping[str, torch.Tensor], target: float,
               example: torch.Tensor) -> tuple[Any, dict[str, list[int]]]:
    """The published selection of ``scores`` masking ``target`` of the paper's MACs."""
    from ..pruning.masking import masked_result, published_search

    base = paper_macs(model, {}, example_inputs=example)
    sparsity, removed = published_search(model, scores, round((1 - target) * base),
                                         example_inputs=example)
    result = masked_result(model, removed, example_inputs=example)
    return result, removed


def _compact_row(model: nn.Module, masks: Mapping[str, list[int]], val_loader: Any,
                 example: torch.Tensor, recal_loader: Any, images: int,
                 device: torch.device, run_dir: Path, model_name: str | None,
                 extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """A masked row's compact network: saved to ``compact/`` beside ``pruned/``, measured."""
    from ..pruning import save_compact
    from .deployable import deployable_network

    small, info, numbers = deployable_network(
        model, masks, val_loader=val_loader, example_inputs=example, recal_loader=recal_loader,
        recal_images=images if recal_loader is not None else 0, device=device)
    if small is None:
        return {"compact": numbers}
    save_compact(run_dir / COMPACT, small, masks, info, model_name=model_name,
                 input_size=tuple(example.shape[1:]), extra=extra)
    acc = numbers.get("acc_recalibrated", numbers["acc_compacted"])
    return {"macs_masked_paper": numbers["macs_paper"], "macs": numbers["macs"],
            "params_masked": numbers["params_masked"], "params": numbers["params"],
            "acc_compact": acc, "latency_masked_ms": numbers["latency_masked_ms"],
            "latency_compact_ms": numbers["latency_compact_ms"],
            "compact": {k: v for k, v in numbers.items()
                        if k in ("max_abs_error", "acc_compacted", "acc_recalibrated",
                                 "bn_recalibrate_images", "latency_method")}}


def _key(row: Mapping[str, Any]) -> tuple[float, str, int | None]:
    return float(row["macs_target"]), str(row["criterion"]), row.get("seed")


def _summarise(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One line per (target, criterion); random seeds become mean and std."""
    groups: dict[tuple[float, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["macs_target"], row["criterion"]), []).append(row)
    out = []
    for (target, criterion), all_members in groups.items():
        members = [m for m in all_members if m.get("status", "done") != "unreachable"]
        if not members:
            out.append({"macs_target": target, "criterion": criterion, "runs": 0,
                        "status": "unreachable", "error": all_members[0].get("error")})
            continue
        line = {"macs_target": target, "criterion": criterion, "runs": len(members),
                "status": "done",
                "macs": statistics.fmean(m["macs"] for m in members),
                "macs_paper": statistics.fmean(m.get("macs_paper", m["macs"]) for m in members),
                "params": statistics.fmean(m["params"] for m in members),
                "seconds": statistics.fmean(m["seconds"] for m in members)}
        for key in ("acc_pruned", "acc_recalibrated", "acc_finetuned", "acc_compact"):
            line[key], line[key + "_std"] = _mean_std([m.get(key, math.nan) for m in members])
        for key in ("latency_masked_ms", "latency_compact_ms"):
            if all(m.get(key) is not None for m in members):
                line[key] = statistics.fmean(m[key] for m in members)
        out.append(line)
    return out


def _mean_std(values: Sequence[float | None]) -> tuple[float, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(mean: float, std: float | None) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def write_comparison(directory: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                     meta: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``compare.json``, ``compare.md`` and, for several targets, ``compare.png``."""
    directory = Path(directory)
    summary = _summarise(rows)
    doc = {"meta": dict(meta or {}), "rows": list(rows), "summary": summary}
    # A number that was not measured is null: a bare NaN is not JSON to most parsers.
    js = atomic_write_text(directory / COMPARE_JSON,
                           json.dumps(_nan_to_null(doc), indent=1, default=str,
                                      allow_nan=False) + "\n")
    base = rows[0]["acc_base"] if rows else math.nan
    lines = ["# Pruning criteria at equal MACs", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- {key}: {value}")
    recal = any(not math.isnan(line.get("acc_recalibrated", math.nan)) for line in summary)
    masked = any(not math.isnan(line.get("acc_compact", math.nan)) for line in summary)
    lines += [f"- base model top-1: {base:.2f}%", ""]
    if masked:
        lines += ["Masked networks (the published code's): *MACs (paper convention)* and "
                  "*top-1 after fine-tuning* are the masked network's; *MACs*, *params*, "
                  "*compact top-1* and the latencies are its compact network's (every masked "
                  "filter removed, BatchNorm re-estimated), timed against the masked one.", ""]
    lines += ["| MACs target | criterion | MACs | MACs (paper convention) | params | "
              "top-1 right after pruning | "
              + ("top-1 after BN recalibration | " if recal else "")
              + "top-1 after fine-tuning | "
              + ("compact top-1 | latency masked / compact (ms) | " if masked else "")
              + "seconds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if recal else "")
              + (" --- | --- |" if masked else "")]
    for line in summary:
        label = _label(line["criterion"])
        if line["runs"] > 1:
            label += f" ({line['runs']} seeds)"
        if line["status"] == "unreachable":
            lines.append(f"| -{100 * line['macs_target']:.0f}% | {label} | unreachable | - | - | "
                         + "- | " * (2 + recal + 2 * masked) + "- |")
            continue
        recal_cell = (f"{_fmt(line['acc_recalibrated'], line['acc_recalibrated_std'])} | "
                      if recal else "")
        lines.append(
            f"| -{100 * line['macs_target']:.0f}% | {label} | {format_count(line['macs'])} | "
            f"{format_count(line['macs_paper'])} | {format_count(line['params'])} | "
            f"{_fmt(line['acc_pruned'], line['acc_pruned_std'])} | {recal_cell}"
            f"{_fmt(line['acc_finetuned'], line['acc_finetuned_std'])} | "
            + (f"{_fmt(line['acc_compact'], line['acc_compact_std'])} | "
               f"{line.get('latency_masked_ms', math.nan):.2f} / "
               f"{line.get('latency_compact_ms', math.nan):.2f} | " if masked else "")
            + f"{line['seconds']:.0f} |")
    errors = [line for line in summary if line["status"] == "unreachable"]
    if errors:
        lines += ["", "Unreachable targets:", ""]
        lines += [f"- {line['criterion']} at -{100 * line['macs_target']:.0f}%: "
                  f"{line['error']}" for line in errors]
    md = atomic_write_text(directory / COMPARE_MD, "\n".join(lines) + "\n")
    if any(line["status"] == "done" for line in summary):
        _plot(directory / COMPARE_PLOT, summary)
    return js, md


def _nan_to_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_null(v) for v in value]
    return value


# Row fields that are accuracies: null in compare.json means not measured (NaN here).
_ACCURACIES = ("acc_base", "acc_pruned", "acc_recalibrated", "acc_finetuned",
               "acc_finetuned_best", "acc_compact")


def read_comparison(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``compare.json`` that :func:`write_comparison` wrote (to resume it).

    Raises:
        ConfigError: the file is not such a comparison.
    """
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise TypeError("rows is not a list of records")
        return [{k: (math.nan if k in _ACCURACIES and v is None else v)
                 for k, v in row.items()} for row in rows]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot resume: '{path}' is not a comparison written by cdprune "
                          f"({exc}); remove it or choose another {{output_dir}}") from None


def _plot(path: Path, summary: Sequence[Mapping[str, Any]]) -> None:
    from .report import load_pyplot, save_figure

    plt = load_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    summary = [line for line in summary if line["status"] == "done"]
    for criterion in dict.fromkeys(line["criterion"] for line in summary):
        pts = sorted((line["macs"] / 1e6, line["acc_finetuned"] if not math.isnan(
            line["acc_finetuned"]) else line["acc_pruned"]) for line in summary
            if line["criterion"] == criterion)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=_label(criterion))
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Accuracy vs MACs")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def default_budget(epochs: float = 1, **overrides: Any) -> TrainConfig:
    """A short fine-tuning budget for quick comparisons (lr 0.01, cosine, no warmup)."""
    cfg = TrainConfig(epochs=max(1, math.ceil(epochs)), lr=0.01)
    return replace(cfg, **overrides)
