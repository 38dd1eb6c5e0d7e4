"""Pruning criteria side by side at equal MACs: the evidence for choosing one.

The same pretrained model is pruned to the same MACs target by each criterion, every
pruned model gets the same fine-tuning budget, seed and data, and accuracy is reported
right after pruning and after fine-tuning. All criteria go through the same
:func:`~cdprune.pruning.prune` (same group reduction, global ranking and limits), so the
columns differ by the criterion alone. Random scores run with several seeds and are
summarised as mean and standard deviation.
"""

from __future__ import annotations

import copy
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

from .checkpoint import atomic_write_text
from .criteria import (
    CRITERIA,
    bn_scale_scores,
    fpgm_scores,
    l1_scores,
    random_scores,
    taylor_scores,
)
from .errors import ConfigError
from .evaluate import evaluate
from .macs import paper_macs
from .pruning import prune
from .scoring import tfidf_scores
from .stats import collect_stats
from .train import TrainConfig, fine_tune

__all__ = ["compare_criteria", "write_comparison"]

logger = logging.getLogger(__name__)

LABELS = {"cdp": "CDP (sample documents)", "cdp_class": "CDP (class documents)",
          "l1": "L1-norm", "bn_scale": "BN scale", "taylor": "Taylor (first order)",
          "fpgm": "FPGM", "random": "random"}


def compare_criteria(
    model: nn.Module,
    *,
    train_loader: Any,
    val_loader: Any,
    stats_loader: Any,
    example_inputs: torch.Tensor,
    macs_reductions: Sequence[float],
    criteria: Sequence[str] = CRITERIA,
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
) -> list[dict[str, Any]]:
    """Prune ``model`` with each criterion at each MACs target and fine-tune equally.

    Args:
        model: the pretrained base model (left untouched).
        train_loader: fine-tuning data (also the batches the Taylor criterion reads).
        val_loader: evaluation data.
        stats_loader: images for CDP statistics.
        example_inputs: a batch for tracing.
        macs_reductions: MACs targets, each a fraction in (0, 1).
        criteria: names from :data:`~cdprune.criteria.CRITERIA`.
        finetune: the fine-tuning budget given to every pruned model; ``None`` or
            ``epochs=0`` skips fine-tuning.
        output_dir: where each run's checkpoints go.
        random_seeds: seeds of the random criterion.
        stats_max_batches, num_classes, coe: CDP statistics and scoring options.
        scope: pruning scope (see :func:`~cdprune.pruning.prune`).
        cdp_options: more options of the CDP criteria: ``tap`` and ``variant`` (for
            :func:`~cdprune.stats.collect_stats`), ``normalize`` (for
            :func:`~cdprune.scoring.tfidf_scores`). ``documents`` is set by the criterion.
        allocation: how every criterion's scores become per-layer removals (see
            :func:`~cdprune.pruning.prune`); one value for all, so that the columns differ
            by the criterion alone.
        device: where to evaluate and train.
        progress: show progress bars.
        on_row: called with each result row as soon as it exists.

    Returns:
        One row per (target, criterion, seed): MACs, parameters, accuracy right after
        pruning and after fine-tuning, seconds spent.
    """
    unknown = [c for c in criteria if c not in CRITERIA]
    if unknown:
        raise ConfigError(f"unknown criteria {unknown}; choose from {', '.join(CRITERIA)}")
    for target in macs_reductions:
        if not 0 < target < 1:
            raise ConfigError(f"MACs reduction {target} is outside (0, 1)")
    opts = dict(cdp_options or {})
    unknown_opts = set(opts) - {"tap", "normalize", "variant"}
    if unknown_opts:
        raise ConfigError(f"cdp_options {sorted(unknown_opts)} are not valid; use tap, "
                          "normalize or variant")
    stats_opts = {k: opts[k] for k in ("tap", "variant") if opts.get(k) is not None}
    score_opts = {k: opts[k] for k in ("normalize", "variant") if opts.get(k) is not None}
    device = torch.device(device) if device else torch.device("cpu")
    model = model.to(device).eval()
    output_dir = Path(output_dir)
    base_acc = evaluate(model, val_loader, device=device, progress=False).top1
    cache: dict[str, tuple[dict[str, torch.Tensor], float]] = {}

    def scores_for(criterion: str, seed: int) -> tuple[dict[str, torch.Tensor], float]:
        key = f"{criterion}:{seed}" if criterion == "random" else criterion
        if key not in cache:
            start = time.perf_counter()
            if criterion in ("cdp", "cdp_class"):
                stats = collect_stats(model, stats_loader, max_batches=stats_max_batches,
                                      documents="class" if criterion == "cdp_class" else "sample",
                                      num_classes=num_classes, device=device,
                                      progress=progress, **stats_opts)
                scores = tfidf_scores(stats, coe=coe, **score_opts)
            elif criterion == "l1":
                scores = l1_scores(model)
            elif criterion == "fpgm":
                scores = fpgm_scores(model)
            elif criterion == "bn_scale":
                scores = bn_scale_scores(model, example_inputs.to(device))
            elif criterion == "taylor":
                scores = taylor_scores(copy.deepcopy(model), train_loader, device=device)
            else:
                scores = random_scores(model, seed)
            cache[key] = (scores, time.perf_counter() - start)
        return cache[key]

    rows = []
    for target in macs_reductions:
        for criterion in criteria:
            for seed in (random_seeds if criterion == "random" else (None,)):
                scores, score_time = scores_for(criterion, seed or 0)
                start = time.perf_counter()
                result = prune(model, scores, example_inputs=example_inputs.cpu(),
                               macs_reduction=target, scope=scope, allocation=allocation)
                pruned = result.model.to(device)
                acc_pruned = evaluate(pruned, val_loader, device=device, progress=False).top1
                acc_tuned = math.nan
                if finetune is not None and (finetune.epochs > 0 or finetune.max_iters):
                    tag = f"{criterion}{'' if seed is None else f'-seed{seed}'}"
                    run_dir = output_dir / f"macs{target:g}" / tag
                    acc_tuned = fine_tune(pruned, train_loader, val_loader, finetune,
                                          output_dir=run_dir, device=device,
                                          extra_state={"plan": result.plan},
                                          progress=progress).final_acc
                row = {"macs_target": target, "criterion": criterion, "seed": seed,
                       "macs": result.macs_after, "macs_reduction": result.macs_reduction,
                       "macs_paper": paper_macs(model, result.plan["kept"],
                                                example_inputs=example_inputs.cpu()),
                       "params": result.params_after, "acc_base": base_acc,
                       "acc_pruned": acc_pruned, "acc_finetuned": acc_tuned,
                       "seconds": round(score_time + time.perf_counter() - start, 2)}
                rows.append(row)
                logger.info("%s @ -%.0f%% MACs: %.2f%% right after pruning, %.2f%% after "
                            "fine-tuning", criterion, 100 * target, acc_pruned, acc_tuned)
                if on_row:
                    on_row(row)
    return rows


def _summarise(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One line per (target, criterion); random seeds become mean and std."""
    groups: dict[tuple[float, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["macs_target"], row["criterion"]), []).append(row)
    out = []
    for (target, criterion), members in groups.items():
        line = {"macs_target": target, "criterion": criterion, "runs": len(members),
                "macs": statistics.fmean(m["macs"] for m in members),
                "macs_paper": statistics.fmean(m.get("macs_paper", m["macs"]) for m in members),
                "params": statistics.fmean(m["params"] for m in members),
                "seconds": statistics.fmean(m["seconds"] for m in members)}
        for key in ("acc_pruned", "acc_finetuned"):
            line[key], line[key + "_std"] = _mean_std([m[key] for m in members])
        out.append(line)
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    values = [v for v in values if not math.isnan(v)]
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
    js = atomic_write_text(directory / "compare.json",
                           json.dumps(doc, indent=1, default=str) + "\n")
    base = rows[0]["acc_base"] if rows else math.nan
    lines = ["# Pruning criteria at equal MACs", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- {key}: {value}")
    lines += [f"- base model top-1: {base:.2f}%", "",
              "| MACs target | criterion | MACs | MACs (paper convention) | params | "
              "top-1 right after pruning | top-1 after fine-tuning | seconds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for line in summary:
        label = LABELS.get(line["criterion"], line["criterion"])
        if line["runs"] > 1:
            label += f" ({line['runs']} seeds)"
        lines.append(
            f"| -{100 * line['macs_target']:.0f}% | {label} | {line['macs'] / 1e6:.2f}M | "
            f"{line['macs_paper'] / 1e6:.2f}M | "
            f"{line['params'] / 1e6:.3f}M | {_fmt(line['acc_pruned'], line['acc_pruned_std'])} "
            f"| {_fmt(line['acc_finetuned'], line['acc_finetuned_std'])} | "
            f"{line['seconds']:.0f} |")
    md = atomic_write_text(directory / "compare.md", "\n".join(lines) + "\n")
    targets = sorted({line["macs_target"] for line in summary})
    if len(targets) > 1:
        _plot(directory / "compare.png", summary)
    return js, md


def _plot(path: Path, summary: Sequence[Mapping[str, Any]]) -> None:
    from .report import _pyplot, _save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for criterion in dict.fromkeys(line["criterion"] for line in summary):
        pts = sorted((line["macs"] / 1e6, line["acc_finetuned"] if not math.isnan(
            line["acc_finetuned"]) else line["acc_pruned"]) for line in summary
            if line["criterion"] == criterion)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=LABELS.get(criterion, criterion))
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Accuracy vs MACs")
    ax.legend(fontsize=7)
    _save_figure(fig, path)


def default_budget(epochs: float = 1, **overrides: Any) -> TrainConfig:
    """A short fine-tuning budget for quick comparisons (lr 0.01, cosine, no warmup)."""
    cfg = TrainConfig(epochs=max(1, math.ceil(epochs)), lr=0.01)
    return replace(cfg, **overrides)
