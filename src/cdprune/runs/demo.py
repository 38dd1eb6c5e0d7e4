"""The embedded demo: the whole CDP pipeline on scikit-learn's digits, offline, on a CPU.

A small CNN is trained from scratch on the 8x8 handwritten digits, CDP statistics are
collected on training images, about half of the MACs are pruned away, the pruned network
is fine-tuned briefly, and a before/after table (MACs, parameters, accuracy, CPU latency)
is handed back together with the report and plots of the run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_weights
from .files import (
    DEMO_BASE,
    DEMO_FINETUNE,
    MODEL,
    PRUNED,
    SCORES_PLOT,
    STATS,
    TRAINING_PLOT,
    WIDTHS_PLOT,
)

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)


def run_demo(output_dir: str | os.PathLike = "runs/demo", *, quick: bool = False,
             overwrite: bool = False, progress: bool = True, seed: int = 0,
             criterion: str = "cdp",
             printer: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run the demo and return its numbers.

    Args:
        output_dir: run directory for checkpoints, report and plots.
        quick: a shorter version (fewer epochs), used as a smoke test.
        overwrite: replace ``output_dir`` even if it holds another run than an earlier
            demo (an earlier demo is always replaced; its files are removed first).
        progress: show progress bars.
        seed: seed for data order, initialisation and sampling.
        criterion: how filters are ranked, a registered criterion
            (:func:`~cdprune.importance.criteria.criterion_names`); CDP's by default.
        printer: receives the lines of the before/after table (the CLI passes ``print``).
    """
    from ..data import build_dataset, build_loader, subset
    from ..finetune.config import TrainConfig
    from ..finetune.loop import fine_tune
    from ..importance.criteria import ScoreContext, get_criterion
    from ..importance.scoring import tfidf_scores
    from ..importance.stats import collect_stats
    from ..measure.evaluate import evaluate, measure_latency
    from ..measure.macs import count_macs, count_params
    from ..models import create_model
    from ..pruning import prune, save_pruned
    from .pipeline import finish_report
    from .report import plot_scores, plot_training, plot_widths
    from .rundir import RunDir

    say = printer or (lambda line: logger.info("%s", line))
    ranking = get_criterion(criterion)  # an unknown name fails before any work
    torch.manual_seed(seed)
    base_epochs, tune_epochs = (4, 2) if quick else (15, 8)
    with RunDir(output_dir, overwrite=overwrite, stage="demo", replaces="demo",
                config={"quick": quick, "seed": seed, "criterion": criterion}) as run:
        train_set = build_dataset("digits", train=True)
        val_set = build_dataset("digits", train=False)
        train = build_loader(train_set, 64, shuffle=True, seed=seed)
        val = build_loader(val_set, 256, shuffle=False, seed=seed)
        stats_loader = build_loader(subset(train_set, min(len(train_set), 512), seed), 128,
                                    shuffle=False, seed=seed)
        model = create_model("digits_cnn", num_classes=10)
        example = torch.zeros(1, *next(iter(val))[0].shape[1:])

        say(f"1/4 training the base CNN on digits ({base_epochs} epochs)")
        base_cfg = TrainConfig(epochs=base_epochs, lr=0.05, weight_decay=5e-4, batch_size=64,
                               lr_warmup_epochs=0, seed=seed)
        fine_tune(model, train, val, base_cfg, output_dir=run.path / DEMO_BASE, progress=progress)
        base_acc = evaluate(model, val, progress=False).top1
        save_weights(model, run.path / DEMO_BASE / MODEL)

        if ranking.statistics:
            say("2/4 collecting CDP statistics and scores")
            stats = collect_stats(model, stats_loader, progress=progress,
                                  documents="class" if criterion == "cdp_class" else "sample",
                                  num_classes=10)
            scores = tfidf_scores(stats)
            stats.save(run.path / STATS)
        else:
            say(f"2/4 scoring filters by {ranking.label}")
            scores = ranking.score(model, ScoreContext(example_inputs=example, batches=train,
                                                       num_classes=10, seed=seed))
        plot_scores(run.path / SCORES_PLOT, scores)

        say("3/4 pruning 50% of the MACs")
        result = prune(model, scores, example_inputs=example, macs_reduction=0.5, scope="all")
        pruned_acc = evaluate(result.model, val, progress=False).top1
        save_pruned(run.path / PRUNED, result, model_name="digits_cnn",
                    input_size=tuple(example.shape[1:]))
        plot_widths(run.path / WIDTHS_PLOT, result.widths_before, result.widths_after)

        say(f"4/4 fine-tuning the pruned CNN ({tune_epochs} epochs)")
        tune_cfg = replace(base_cfg, epochs=tune_epochs, lr=0.02)
        tuned = fine_tune(result.model, train, val, tune_cfg, output_dir=run.path / DEMO_FINETUNE,
                          extra_state={"plan": result.plan}, progress=progress)
        final_acc = evaluate(result.model, val, progress=False).top1
        plot_training(run.path / TRAINING_PLOT, tuned.history)

        size = tuple(example.shape[1:])
        lat_base = measure_latency(model, size, batch_size=1024, iters=30, threads=1)
        lat_pruned = measure_latency(result.model, size, batch_size=1024, iters=30, threads=1)
        summary = {"criterion": criterion, **result.summary()}
        summary.update(acc_base=base_acc, acc_pruned=pruned_acc)
        config = {"model": "digits_cnn", "dataset": "digits", "criterion": criterion,
                  "macs_reduction": 0.5,
                  "epochs_base": base_epochs, "epochs_finetune": tune_epochs, "seed": seed,
                  "quick": quick}
        latency = {"base (1 thread, batch 1024)": f"{1e3 * lat_base:.2f} ms",
                   "pruned (1 thread, batch 1024)": f"{1e3 * lat_pruned:.2f} ms"}
        _, report_md = finish_report(run, config, summary, finetuned=final_acc,
                                     latency=latency)

    rows = [
        ("MACs", f"{count_macs(model, example_inputs=example) / 1e6:.3f}M",
         f"{result.macs_after / 1e6:.3f}M"),
        ("parameters", f"{count_params(model) / 1e3:.1f}k", f"{result.params_after / 1e3:.1f}k"),
        ("accuracy", f"{base_acc:.2f}%", f"{final_acc:.2f}% ({pruned_acc:.2f}% before "
                                          "fine-tuning)"),
        ("CPU latency (1 thread, batch 1024)", f"{1e3 * lat_base:.2f} ms", f"{1e3 * lat_pruned:.2f} ms"),
    ]
    width = max(len(label) for label, _, _ in rows) + 2
    say("")
    say(f"{'':{width}s}{'base':>14s}   {'pruned':s}")
    for label, before, after in rows:
        say(f"{label:{width}s}{before:>14s}   {after}")
    say("")
    say(f"report: {Path(report_md)}")
    say(f"plots:  {', '.join(str(p) for p in sorted(Path(output_dir).glob('*.png')))}")
    return {"acc_base": base_acc, "acc_pruned": pruned_acc, "acc_finetuned": final_acc,
            "macs_before": result.macs_before, "macs_after": result.macs_after,
            "latency_base": lat_base, "latency_pruned": lat_pruned,
            "best_finetune": tuned.best_acc, "report": str(report_md)}
