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
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_weights
from .files import (
    DEMO_BASE,
    MODEL,
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
    from ..finetune.config import TrainConfig
    from ..finetune.loop import fine_tune
    from ..importance.criteria import get_criterion
    from ..measure.evaluate import measure_latency
    from ..measure.macs import count_params
    from .config import RunConfig
    from .inputs import build_inputs
    from .locate import load_run_model
    from .pipeline import finish_report, run_all
    from .rundir import RunDir

    say = printer or (lambda line: logger.info("%s", line))
    ranking = get_criterion(criterion)  # an unknown name fails before any work
    torch.manual_seed(seed)
    base_epochs, tune_epochs = (4, 2) if quick else (15, 8)
    # The demo is `cdprune run` on digits, with a base model it trains first.
    config: dict[str, Any] = {
        **RunConfig.defaults(), "model": "digits_cnn", "dataset": "digits", "random_init": True,
        "criterion": criterion, "macs_reduction": 0.5, "scope": "all", "seed": seed,
        "stats_images": 512, "stats_batch_size": 128, "batch_size": 64,
        "eval_batch_size": 256, "epochs": tune_epochs, "lr": 0.02, "lr_warmup_epochs": 0.0,
        "weight_decay": 5e-4, "workers": 0, "no_progress": not progress,
        "output_dir": str(output_dir), "command": "demo", "quick": quick}
    RunConfig.from_flat(config, need_target=True)  # checked like any run
    with RunDir(output_dir, overwrite=overwrite, stage="demo", replaces="demo",
                config={"quick": quick, "seed": seed, "criterion": criterion}) as run:
        data, model = build_inputs(config, need_stats=ranking.statistics)
        run.write_config(config)
        say(f"1/4 training the base CNN on digits ({base_epochs} epochs)")
        base_cfg = TrainConfig(epochs=base_epochs, lr=0.05, weight_decay=5e-4, batch_size=64,
                               lr_warmup_epochs=0, seed=seed)
        fine_tune(model, data.train, data.val, base_cfg, output_dir=run.path / DEMO_BASE,
                  progress=progress)
        save_weights(model, run.path / DEMO_BASE / MODEL)
        say("2/4 collecting CDP statistics and scores" if ranking.statistics
            else f"2/4 scoring filters by {ranking.label}")
        say(f"3/4 pruning 50% of the MACs; 4/4 fine-tuning the pruned CNN "
            f"({tune_epochs} epochs)")
        outcome = run_all(config, run, data=data, model=model)
        summary = outcome.summary
        base_acc, pruned_acc = summary["acc_base"], summary["acc_pruned"]
        final_acc = outcome.accuracy["finetuned"]
        size = tuple(data.input_size)
        pruned = load_run_model(run.path)  # the fine-tuned pruned model
        lat_base = measure_latency(model, size, batch_size=1024, iters=30, threads=1)
        lat_pruned = measure_latency(pruned, size, batch_size=1024, iters=30, threads=1)
        latency = {"base (1 thread, batch 1024)": f"{1e3 * lat_base:.2f} ms",
                   "pruned (1 thread, batch 1024)": f"{1e3 * lat_pruned:.2f} ms"}
        report_md = finish_report(run, config, summary, finetuned=outcome.accuracy,
                                  latency=latency)[1]

    rows = [
        ("MACs", f"{summary['macs_before'] / 1e6:.3f}M", f"{summary['macs_after'] / 1e6:.3f}M"),
        ("parameters", f"{count_params(model) / 1e3:.1f}k",
         f"{summary['params_after'] / 1e3:.1f}k"),
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
            "macs_before": summary["macs_before"], "macs_after": summary["macs_after"],
            "latency_base": lat_base, "latency_pruned": lat_pruned,
            "best_finetune": outcome.finetune.best_acc, "report": str(report_md)}
