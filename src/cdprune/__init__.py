"""cdprune: compress convolutional networks with CDP (class-wise discriminative power).

The pipeline: collect activation statistics (:func:`collect_stats`), score filters with
TF-IDF (:func:`tfidf_scores`), remove the lowest-scoring channels physically
(:func:`prune`), fine-tune (:func:`fine_tune`). A network pruned by masking, as the
published code does, becomes a physically smaller one with :func:`compact`.
"""

from __future__ import annotations

import logging

from . import models  # noqa: E402
from .checkpoint import load_weights, read_state_dict, save_weights  # noqa: E402
from .errors import (  # noqa: E402
    CdpruneError,
    CheckpointError,
    ConfigError,
    DataError,
    UnsupportedModelError,
)
from .finetune.batchnorm import recalibrate_bn  # noqa: E402
from .finetune.config import TrainConfig  # noqa: E402
from .finetune.loop import fine_tune  # noqa: E402
from .importance.activations import ActivationStats  # noqa: E402
from .importance.scoring import CDPImportance, tfidf, tfidf_scores  # noqa: E402
from .importance.stats import collect_stats  # noqa: E402
from .measure.evaluate import evaluate  # noqa: E402
from .measure.latency import LatencySettings  # noqa: E402
from .measure.macs import count_macs, count_params, paper_macs  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .pruning import (  # noqa: E402
    CompactInfo,
    PruneResult,
    compact,
    load_pruned,
    mask_filters,
    prune,
    save_compact,
    save_pruned,
)
from .runs.locate import find_run_model, load_run_model  # noqa: E402
from .version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "ActivationStats",
    "CDPImportance",
    "CdpruneError",
    "CompactInfo",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LatencySettings",
    "UnsupportedModelError",
    "PruneResult",
    "TrainConfig",
    "collect_stats",
    "compact",
    "count_macs",
    "count_params",
    "create_model",
    "evaluate",
    "find_run_model",
    "fine_tune",
    "list_models",
    "load_pruned",
    "load_run_model",
    "load_weights",
    "mask_filters",
    "models",
    "paper_macs",
    "prune",
    "read_state_dict",
    "recalibrate_bn",
    "save_compact",
    "save_pruned",
    "save_weights",
    "tfidf",
    "tfidf_scores",
]
