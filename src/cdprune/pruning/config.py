"""Options of the pruning stage and of compaction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..importance.criteria import criterion_names
from ..options import OptionsError, check, from_mapping, option
from .core import ALLOCATIONS, SCOPES
from .targets import parse_macs

__all__ = ["PRUNE_MODES", "CompactConfig", "PruneConfig"]

PRUNE_MODES = ("mask", "remove")
TARGETS = ("sparsity", "macs_reduction", "macs_target", "latency_reduction")


@dataclass
class PruneConfig:
    """Options of the pruning stage: the criterion, the target, which channels may go."""

    criterion: str = option("cdp", "how filters are ranked (CDP's statistics are collected "
                            "only for cdp and cdp_class)", choices=criterion_names())
    sparsity: float | None = option(None, "fraction of filters to remove")
    macs_reduction: float | None = option(None, "fraction of MACs to remove (hit within 0.3 "
                                          "points)")
    macs_target: str | None = option(None, "MACs to keep, absolute with K/M/G, e.g. 60.02M "
                                     "(in {macs_convention})", kind="size")
    latency_reduction: float | None = option(
        None, "fraction of latency to remove, timed on this machine (within 5%% of the "
        "target)")
    latency_batch: int = option(1, "batch size the latency target is timed at",
                                positive=True)
    macs_convention: str = option("physical", "what {macs_target} counts: the network that "
                                  "runs, or the CDP paper's counter on masks",
                                  choices=("physical", "paper"))
    scope: str = option("auto", "channels that may be pruned", choices=SCOPES)
    max_layer_pruning: float = option(0.9, "most a layer may lose")
    round_to: int | None = option(None, "keep widths multiples of this", positive=True)
    allocation: str | None = option(None, "global: one ranking of all filters (default); "
                                    "uniform: every layer loses the same fraction; latency: "
                                    "least score lost per second saved, timed here (default "
                                    "with {latency_reduction})",
                                    choices=ALLOCATIONS)
    ignore_layers: list[str] | None = option(None, "module names never pruned")
    bn_recalibrate: int | None = option(
        None, "re-estimate BatchNorm statistics on N training images after pruning (before "
        "fine-tuning); reported as its own accuracy row", positive=True)
    no_eval: bool = option(False, "do not evaluate the base and pruned models after pruning")
    prune_mode: str | None = option(
        None, "remove: cut the filters out physically (default); mask: keep the architecture "
        "and hold the removed filters' weights at zero through fine-tuning, the published "
        "code's network (default with {variant} published)", choices=PRUNE_MODES)

    def resolved_mode(self, variant: str | None) -> str:
        """The prune mode in force: the one given, else ``mask`` for the published variant
        and ``remove`` for every other."""
        return self.prune_mode or ("mask" if variant == "published" else "remove")

    def validate(self, *, need_target: bool = False) -> None:
        """Check every value; raise :class:`~cdprune.options.OptionError` naming the first
        bad one.

        Args:
            need_target: exactly one of ``sparsity``, ``macs_reduction``,
                ``macs_target`` and ``latency_reduction`` must be set.
        """
        for key in ("sparsity", "macs_reduction", "latency_reduction"):
            value = getattr(self, key)
            check(key, value, value is None or 0 < value < 1, "a fraction in (0, 1)")
        check("max_layer_pruning", self.max_layer_pruning, 0 < self.max_layer_pruning <= 1,
              "a fraction in (0, 1] (0 would let no layer lose a filter)")
        check("round_to", self.round_to, self.round_to is None or self.round_to > 0,
              "a positive integer")
        check("latency_batch", self.latency_batch, self.latency_batch > 0,
              "a positive integer")
        check("bn_recalibrate", self.bn_recalibrate,
              self.bn_recalibrate is None or self.bn_recalibrate > 0,
              "a positive number of images")
        if self.macs_target is not None:
            parse_macs(self.macs_target)
        given = [t for t in TARGETS if getattr(self, t) is not None]
        if need_target and len(given) != 1:
            raise OptionsError("give exactly one of {sparsity}, {macs_reduction}, "
                               "{macs_target} or {latency_reduction}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PruneConfig:
        """From a flat configuration (unset keys take the defaults)."""
        return from_mapping(cls, config)


@dataclass
class CompactConfig:
    """Options of compaction: what follows turning a masked network into a compact one.

    BatchNorm recalibration after compaction is :attr:`PruneConfig.bn_recalibrate`, the
    same option as after pruning; the fine-tuning hyper-parameters other than the number
    of epochs are :class:`~cdprune.finetune.config.TrainConfig`'s.
    """

    compact_epochs: int = option(0, "fine-tune the compact network this many epochs after "
                                 "compaction (and recalibration); the fine-tuning options set "
                                 "the rest")
    compact_recalibrate: int = option(
        2048, "after a masked run: training images the compact network's BatchNorm "
        "statistics are re-estimated on (absorbs the folds' border differences); 0: none")

    def validate(self) -> None:
        """Check every value; raise :class:`~cdprune.options.OptionError` naming the first
        bad one."""
        epochs = self.compact_epochs
        check("compact_epochs", epochs, isinstance(epochs, int) and not isinstance(
            epochs, bool) and epochs >= 0, "0 (no fine-tuning) or a number of epochs")
        images = self.compact_recalibrate
        check("compact_recalibrate", images, isinstance(images, int) and not isinstance(
            images, bool) and images >= 0, "0 (no recalibration) or a number of images")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CompactConfig:
        """From a flat configuration (unset keys take the defaults)."""
        return from_mapping(cls, config)
