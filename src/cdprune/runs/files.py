"""The names of the files and folders cdprune writes, each spelled once.

A run directory (``cdprune stats|prune|finetune|run --output-dir DIR``) holds::

    config.yaml           the resolved configuration of the last command
    run.json              the manifest: the files this run wrote (and may replace)
    .cdprune.lock         held while a command works in the directory
    classes.json          the class names of the data set
    stats.safetensors     the per-class activation statistics (stage 1)
    scores.safetensors    every filter's score (stage 2), scores.png plots them
    pruned/               the pruned model: plan.json + model.safetensors (stage 3)
    compact/              a masked run's compact (deployable) network, as pruned/
    prune_summary.json    MACs, parameters and widths before and after pruning
    widths.png            the layer widths before and after pruning
    last.pth, best.pth    fine-tuning's resumable and best checkpoints (stage 4)
    metrics.jsonl         one line per fine-tuning epoch, training.png plots it
    report.json/.md       the run's report
    compare.json/.md/.png the table of ``cdprune compare``

The demo writes the same files, plus ``base/`` (the base model it trains); demos of
earlier versions kept their fine-tuning checkpoints in ``finetune/``, which is still read. The library stages that write files outside a run
directory (:func:`cdprune.pruning.plan.save_pruned`, :func:`cdprune.fine_tune`) use the
same names, so a folder they wrote is found as a run's would be. This module imports
nothing, so any module may import it without an import cycle.
"""

from __future__ import annotations

# The run directory's bookkeeping.
CONFIG = "config.yaml"
MANIFEST = "run.json"
LOCK = ".cdprune.lock"

# Stage 1 and 2: statistics and scores.
CLASSES = "classes.json"
STATS = "stats.safetensors"
SCORES = "scores.safetensors"
SCORES_PLOT = "scores.png"

# Stage 3: the pruned model (a folder) and what pruning changed.
PRUNED = "pruned"
PLAN = "plan.json"
MODEL = "model.safetensors"
PRUNE_SUMMARY = "prune_summary.json"
COMPACT = "compact"
WIDTHS_PLOT = "widths.png"

# Stage 4: fine-tuning.
LAST = "last.pth"
BEST = "best.pth"
METRICS = "metrics.jsonl"
TRAINING_PLOT = "training.png"

# Reports.
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
COMPARE_PLOT = "compare.png"

# The demo's folders beside pruned/.
DEMO_BASE = "base"
DEMO_FINETUNE = "finetune"
