"""Options of the statistics stage, and what the published variant of CDP fixes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..options import check, from_mapping, option
from .activations import DOCUMENTS
from .scoring import NORMALIZATIONS

__all__ = ["PUBLISHED", "STATS_SAMPLES", "TAPS", "StatsConfig", "published_conflicts"]

TAPS = ("conv", "act")  # before BatchNorm (published), after BatchNorm and ReLU
STATS_SAMPLES = ("random", "first")

# What the published variant sets: an explicit other value is refused, never replaced.
PUBLISHED = {"tap": "conv", "documents": "sample", "normalize": "none", "allocation": "global",
             "criterion": "cdp"}


def published_conflicts(values: Mapping[str, Any]) -> list[str]:
    """The options in ``values`` set to something else than the published variant sets."""
    return [k for k, v in PUBLISHED.items()
            if values.get(k) is not None and values[k] != v
            and not (k == "normalize" and values[k] is None)]


@dataclass
class StatsConfig:
    """Options of the statistics stage: which images, how they are read and scored."""

    stop_batch: int | None = option(
        None, "batches of training images to sample for statistics (default: "
        "{stats_images} images)")
    stats_images: int = option(
        10240, "training images, a seeded sample, the statistics read when {stop_batch} is "
        "not given; the training set's size or more reads all of it", positive=True)
    stats_batch_size: int = option(128, "batch size of the statistics pass", positive=True)
    documents: str = option("sample", "TF-IDF documents: every image (published code) or "
                            "every class", choices=DOCUMENTS)
    stats_dtype: str = option("float32", "precision per-image values are rounded to before "
                              "they are counted", choices=("float32", "float16"))
    coe: float = option(0.0, "balance coefficient (0: none)")
    tap: str | None = option(None, "where a filter's activation is read: conv output before "
                             "BatchNorm (default), or after BatchNorm and ReLU", choices=TAPS)
    normalize: str | None = option(None, "per-layer score scaling before the global ranking "
                                   "(default: none)",
                                   choices=tuple(n for n in NORMALIZATIONS if n))
    stats_augment: bool = option(False, "read statistics from augmented training images "
                                 "(random crop and flip, seeded), as the published code does")
    stats_sample: str = option("random", "which training images the statistics read: a "
                               "seeded random sample, or the first ones in dataset order (the "
                               "published ImageNet code's class-limited sample: 200 unshuffled "
                               "batches of class-sorted folders cover about 20 classes)",
                               choices=STATS_SAMPLES)
    variant: str | None = option(None, "set every CDP option (tap, documents, normalize, "
                                 "allocation) to the published code's, and select as it does: "
                                 "one ranking of every Conv2d filter, masked ({prune_mode}); "
                                 "another value given for one of them is refused",
                                 choices=("published",))

    def validate(self) -> None:
        """Check every value; raise :class:`~cdprune.options.OptionError` naming the first
        bad one."""
        check("stop_batch", self.stop_batch, self.stop_batch is None or self.stop_batch > 0,
              "a positive number of batches")
        check("stats_batch_size", self.stats_batch_size, self.stats_batch_size > 0,
              "a positive integer")
        check("stats_images", self.stats_images, self.stats_images > 0,
              "a positive number of images")
        check("coe", self.coe, self.coe >= 0, "0 (no balancing) or a positive number")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> StatsConfig:
        """From a flat configuration (unset keys take the defaults)."""
        return from_mapping(cls, config)
