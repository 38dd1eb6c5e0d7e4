"""Typed options of the stages, and the flags and config keys made from them.

Every option of a stage is one field of that stage's dataclass (:class:`StatsConfig`,
:class:`PruneConfig`, :class:`CompactConfig`): its type, its default and its help live there, together with the
stage's :meth:`validate`. The command line's flags, the YAML config's keys and types and
the table of defaults are all read off these fields, so adding an option is adding a
field.

Bad values raise :class:`OptionError`, which names the option by its field name; the
command line shows it under its flag (``--max-layer-pruning 0.0 is invalid; ...``).
"""

from __future__ import annotations

import argparse
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .importance.criteria import criterion_names

__all__ = ["CompactConfig", "OptionError", "OptionSpec", "PruneConfig", "StatsConfig", "add_options",
           "flag", "option", "option_specs"]

# The kinds of value an option holds, as the YAML config checks them.
BOOL, INT, FLOAT, STR, INTS, FLOATS, STRS = ("bool", "int", "float", "str", "ints", "floats",
                                            "strs")


class OptionError(ConfigError):
    """An option's value is outside what it accepts.

    Attributes:
        key: the option's field name (``max_layer_pruning``).
        value: the value refused.
        valid: what it must be (``"a fraction in (0, 1]"``).
    """

    def __init__(self, key: str, value: Any, valid: str):
        super().__init__(f"{key}={value!r} is invalid; it must be {valid}")
        self.key, self.value, self.valid = key, value, valid

    def as_flag(self) -> str:
        """The same message, naming the option by its command-line flag."""
        shown = repr(self.value) if isinstance(self.value, str) else self.value
        return f"{flag(self.key)} {shown} is invalid; it must be {self.valid}"


def flag(key: str) -> str:
    """The command-line flag of a config key: a stage option's main flag (``milestones`` ->
    ``--lr-steps``), else the key with dashes (``eval_batch_size`` -> ``--eval-batch-size``)."""
    for cls in _stage_classes():
        for spec in option_specs(cls):
            if spec.name == key:
                return spec.flags[0]
    return "--" + key.replace("_", "-")


def _stage_classes() -> list[type]:
    from .finetune.loop import TrainConfig

    return [StatsConfig, PruneConfig, CompactConfig, TrainConfig]


def option(default: Any, help: str, *, flags: Sequence[str] = (), choices: Sequence[str] = (),
           positive: bool = False, metavar: str | None = None, exclusive: str | None = None,
           show_default: bool = True, negate: bool = False, kind: str | None = None) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: the option's default (``None``: unset, the library decides).
        help: one line for ``--help``; the default is appended to it.
        flags: the flags, the main one first; default: the field name with dashes.
        choices: the values allowed, when they are a fixed list.
        positive: an integer flag that argparse itself refuses below 1.
        metavar: the value's name in ``--help``.
        exclusive: options sharing this name are mutually exclusive on the command line.
        show_default: append ``(default: ...)`` to the help.
        negate: a boolean whose flag turns it off (``--no-fast-data`` sets ``False``).
        kind: the value's kind when the type does not say it (``"size"``: 60.02M).
    """
    meta = {"help": help, "flags": tuple(flags), "choices": tuple(choices),
            "positive": positive, "metavar": metavar, "exclusive": exclusive,
            "show_default": show_default, "negate": negate, "kind": kind}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One option as the command line and the YAML config see it."""

    name: str
    kind: str
    default: Any
    help: str
    flags: tuple[str, ...]
    choices: tuple[str, ...]
    positive: bool
    metavar: str | None
    exclusive: str | None
    negate: bool = False


def _kind(hint: Any) -> str:
    """The option kind of a field's type (``int | None`` -> int, ``list[str]`` -> strs)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (list, Sequence):
        return {float: FLOATS, int: INTS}.get(args[0] if args else str, STRS)
    if args and typing.get_origin(hint) is not list:  # a union: X | None
        return _kind(args[0]) if len(args) == 1 else STR
    return {bool: BOOL, int: INT, float: FLOAT, str: STR}.get(hint, STR)


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def option_specs(cls: type) -> list[OptionSpec]:
    """The options of a stage dataclass, in field order (fields without help are skipped)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if "help" not in f.metadata:
            continue
        meta = f.metadata
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        text = meta["help"]
        if meta["show_default"] and default is not None and default is not False:
            text = f"{text} (default: {_shown(default)})"
        out.append(OptionSpec(f.name, meta["kind"] or _kind(hints[f.name]), default, text,
                              meta["flags"] or ("--" + f.name.replace("_", "-"),),
                              meta["choices"], meta["positive"], meta["metavar"],
                              meta["exclusive"], meta["negate"]))
    return out


def defaults(*classes: type) -> dict[str, Any]:
    """``{option: default}`` of the stages' options."""
    return {s.name: s.default for cls in classes for s in option_specs(cls)}


def key_types(*classes: type) -> dict[str, str]:
    """``{option: kind}`` for the YAML config's type checks."""
    return {s.name: s.kind for cls in classes for s in option_specs(cls)}


def key_choices(*classes: type) -> dict[str, tuple[str, ...]]:
    """``{option: allowed values}`` for the options with a fixed list."""
    return {s.name: s.choices for cls in classes for s in option_specs(cls) if s.choices}


# ---------------------------------------------------------------------- argparse
def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _arg_type(spec: OptionSpec) -> Callable[[str], Any] | None:
    if spec.kind in (INT, INTS):
        return positive_int if spec.positive else int
    if spec.kind in (FLOAT, FLOATS):
        return finite_float
    return None


def add_options(group: Any, cls: type, *, only: Sequence[str] | None = None,
                skip: Sequence[str] = ()) -> None:
    """Add the options of a stage dataclass to an argparse parser or argument group.

    Every flag defaults to ``None`` (not given), so that a YAML config and the dataclass
    defaults apply underneath the flags actually typed.

    Args:
        group: a parser or an argument group.
        cls: the stage dataclass.
        only: add just these options.
        skip: leave these options out.
    """
    exclusive: dict[str, Any] = {}
    for spec in option_specs(cls):
        if spec.name in skip or (only is not None and spec.name not in only):
            continue
        target = group
        if spec.exclusive:
            if spec.exclusive not in exclusive:
                exclusive[spec.exclusive] = group.add_mutually_exclusive_group()
            target = exclusive[spec.exclusive]
        kwargs: dict[str, Any] = {"dest": spec.name, "help": spec.help, "default": None}
        if spec.kind == BOOL:
            kwargs["action"] = "store_false" if spec.negate else "store_true"
        else:
            kwargs["type"] = _arg_type(spec)
            if spec.choices:
                kwargs["choices"] = list(spec.choices)
            if spec.kind in (INTS, FLOATS, STRS):
                kwargs["nargs"] = "+"
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
        target.add_argument(*spec.flags, **kwargs)


# ---------------------------------------------------------------------- checks
def _check(key: str, value: Any, ok: bool, valid: str) -> None:
    if not ok:
        raise OptionError(key, value, valid)


def _from(cls: type, config: Mapping[str, Any]) -> Any:
    """The stage config of a merged configuration: its keys that are set; others default."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names and v is not None})


# ---------------------------------------------------------------------- stages
DOCUMENTS = ("sample", "class")
TAPS = ("conv", "act")
NORMALIZE = ("none", "max", "mean")
SCOPES = ("auto", "internal", "all")
ALLOCATIONS = ("global", "uniform", "latency")
PRUNE_MODES = ("mask", "remove")
STATS_SAMPLES = ("random", "first")


# What --variant published sets: an explicit other value is refused, never replaced.
PUBLISHED = {"tap": "conv", "documents": "sample", "normalize": "none", "allocation": "global",
             "criterion": "cdp"}


def published_conflicts(values: Mapping[str, Any]) -> list[str]:
    """The options in ``values`` set to something else than ``--variant published`` sets."""
    return [k for k, v in PUBLISHED.items()
            if values.get(k) is not None and values[k] != v
            and not (k == "normalize" and values[k] is None)]


@dataclass
class StatsConfig:
    """Options of the statistics stage: which images, how they are read and scored."""

    stop_batch: int | None = option(
        None, "batches of training images to sample for statistics (default: "
        "--stats-images images)", flags=("--stop-batch", "--stop_batch"))
    stats_images: int = option(
        10240, "training images, a seeded sample, the statistics read when --stop-batch is "
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
                                   "(default: none)", choices=NORMALIZE)
    stats_augment: bool = option(False, "read statistics from augmented training images "
                                 "(random crop and flip, seeded), as the published code does")
    stats_sample: str = option("random", "which training images the statistics read: a "
                               "seeded random sample, or the first ones in dataset order (the "
                               "published ImageNet code's class-limited sample: 200 unshuffled "
                               "batches of class-sorted folders cover about 20 classes)",
                               choices=STATS_SAMPLES)
    variant: str | None = option(None, "set every CDP option (tap, documents, normalize, "
                                 "allocation) to the published code's, and select as it does: "
                                 "one ranking of every Conv2d filter, masked (--prune-mode); "
                                 "another value given for one of them is refused",
                                 choices=("published",))

    def validate(self) -> None:
        """Check every value; raise :class:`OptionError` naming the first bad one."""
        _check("stop_batch", self.stop_batch, self.stop_batch is None or self.stop_batch > 0,
               "a positive number of batches")
        _check("stats_batch_size", self.stats_batch_size, self.stats_batch_size > 0,
               "a positive integer")
        _check("stats_images", self.stats_images, self.stats_images > 0,
               "a positive number of images")
        _check("coe", self.coe, self.coe >= 0, "0 (no balancing) or a positive number")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> StatsConfig:
        """From a merged configuration (unset keys take the defaults)."""
        return _from(cls, config)


@dataclass
class PruneConfig:
    """Options of the pruning stage: the criterion, the target, which channels may go."""

    criterion: str = option("cdp", "how filters are ranked (CDP's statistics are collected "
                            "only for cdp and cdp_class)", choices=criterion_names())
    sparsity: float | None = option(None, "fraction of filters to remove",
                                    exclusive="target")
    macs_reduction: float | None = option(None, "fraction of MACs to remove (hit within 0.3 "
                                          "points)", exclusive="target")
    macs_target: str | None = option(None, "MACs to keep, absolute with K/M/G, e.g. 60.02M "
                                     "(in --macs-convention)", exclusive="target", kind="size")
    latency_reduction: float | None = option(
        None, "fraction of latency to remove, timed on this machine (within 5%% of the "
        "target)", exclusive="target")
    latency_batch: int = option(1, "batch size the latency target is timed at",
                                positive=True)
    macs_convention: str = option("physical", "what --macs-target counts: the network that "
                                  "runs, or the CDP paper's counter on masks",
                                  choices=("physical", "paper"))
    scope: str = option("auto", "channels that may be pruned", choices=SCOPES)
    max_layer_pruning: float = option(0.9, "most a layer may lose")
    round_to: int | None = option(None, "keep widths multiples of this", positive=True)
    allocation: str | None = option(None, "global: one ranking of all filters (default); "
                                    "uniform: every layer loses the same fraction; latency: "
                                    "least score lost per second saved, timed here (default "
                                    "with --latency-reduction)",
                                    choices=ALLOCATIONS)
    ignore_layers: list[str] | None = option(None, "module names never pruned")
    bn_recalibrate: int | None = option(
        None, "re-estimate BatchNorm statistics on N training images after pruning (before "
        "fine-tuning); reported as its own accuracy row", positive=True, metavar="N")
    no_eval: bool = option(False, "do not evaluate the base and pruned models after pruning")
    prune_mode: str | None = option(
        None, "remove: cut the filters out physically (default); mask: keep the architecture "
        "and hold the removed filters' weights at zero through fine-tuning, the published "
        "code's network (default with --variant published)", choices=PRUNE_MODES)

    def resolved_mode(self, variant: str | None) -> str:
        """The prune mode in force: the one given, else ``mask`` for the published variant
        and ``remove`` for every other."""
        return self.prune_mode or ("mask" if variant == "published" else "remove")

    def validate(self, *, need_target: bool = False) -> None:
        """Check every value; raise :class:`OptionError` naming the first bad one.

        Args:
            need_target: exactly one of ``sparsity``, ``macs_reduction``,
                ``macs_target`` and ``latency_reduction`` must be set.
        """
        for key in ("sparsity", "macs_reduction", "latency_reduction"):
            value = getattr(self, key)
            _check(key, value, value is None or 0 < value < 1, "a fraction in (0, 1)")
        _check("max_layer_pruning", self.max_layer_pruning, 0 < self.max_layer_pruning <= 1,
               "a fraction in (0, 1] (0 would let no layer lose a filter)")
        _check("round_to", self.round_to, self.round_to is None or self.round_to > 0,
               "a positive integer")
        _check("latency_batch", self.latency_batch, self.latency_batch > 0,
               "a positive integer")
        _check("bn_recalibrate", self.bn_recalibrate,
               self.bn_recalibrate is None or self.bn_recalibrate > 0,
               "a positive number of images")
        if self.macs_target is not None:
            from .pruning.targets import parse_macs

            parse_macs(self.macs_target)
        targets = [t for t in (self.sparsity, self.macs_reduction, self.macs_target,
                               self.latency_reduction) if t is not None]
        if need_target and len(targets) != 1:
            raise ConfigError("give exactly one of --sparsity, --macs-reduction, --macs-target "
                              "or --latency-reduction")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PruneConfig:
        """From a merged configuration (unset keys take the defaults)."""
        return _from(cls, config)


@dataclass
class CompactConfig:
    """Options of compaction: what follows turning a masked network into a compact one.

    BatchNorm recalibration after compaction is :attr:`PruneConfig.bn_recalibrate`, the
    same option as after pruning; the fine-tuning hyper-parameters other than the number
    of epochs are :class:`~cdprune.finetune.loop.TrainConfig`'s.
    """

    compact_epochs: int = option(0, "fine-tune the compact network this many epochs after "
                                 "compaction (and recalibration); the fine-tuning flags set "
                                 "the rest", metavar="N")

    def validate(self) -> None:
        """Check every value; raise :class:`OptionError` naming the first bad one."""
        epochs = self.compact_epochs
        _check("compact_epochs", epochs, isinstance(epochs, int) and not isinstance(
            epochs, bool) and epochs >= 0, "0 (no fine-tuning) or a number of epochs")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CompactConfig:
        """From a merged configuration (unset keys take the defaults)."""
        return _from(cls, config)
