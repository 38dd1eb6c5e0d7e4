"""cdprune: compress convolutional networks with CDP (class-wise discriminative power).

The pipeline: collect activation statistics, score filters with TF-IDF, remove the
lowest-scoring channels physically, fine-tune.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

from .checkpoint import load_weights, read_state_dict, save_weights  # noqa: E402
from .scoring import CDPImportance, tfidf, tfidf_scores  # noqa: E402
from .stats import ActivationStats, collect_stats  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "ActivationStats",
    "CDPImportance",
    "collect_stats",
    "load_weights",
    "read_state_dict",
    "save_weights",
    "tfidf",
    "tfidf_scores",
]
