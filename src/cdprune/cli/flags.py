"""Options as command-line flags: the one place that maps an option to its flags.

Every option is a field of :class:`~cdprune.runs.config.RunConfig` (or of
:class:`~cdprune.export.ExportConfig`); its flag is ``--`` and its name with dashes unless
listed here. The aliases are the flags of torchvision's reference scripts and of the
published CDP scripts, so that their command lines work as they are.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import CdpruneError
from ..options import BOOL, FLOAT, FLOATS, INT, INTS, STRS, OptionSpec, option_specs

__all__ = ["add_options", "finite_float", "flag", "flags", "help_text", "positive_int", "render"]

# option: its flags, the main one first.
FLAGS: dict[str, tuple[str, ...]] = {
    "checkpoint": ("--checkpoint", "--pretrained_dir", "--pretrained-dir"),
    "data_root": ("--data-root", "--dataroot"),
    "batch_size": ("-b", "--batch-size"),
    "workers": ("-j", "--workers"),
    "log_interval": ("--log-interval", "--log-every"),
    "stop_batch": ("--stop-batch", "--stop_batch"),
    "weight_decay": ("--wd", "--weight-decay"),
    "lr_schedule": ("--lr-scheduler",),
    "milestones": ("--lr-steps",),
    "lr_warmup_epochs": ("--lr-warmup-epochs", "--warmup"),
    "fast_data": ("--no-fast-data",),
}
NEGATED = {"fast_data"}  # booleans whose flag turns them off
# Options of which one command line may give only one.
EXCLUSIVE: dict[str, tuple[str, ...]] = {
    "target": ("sparsity", "macs_reduction", "macs_target", "latency_reduction"),
    "batch": ("dynamic_batch", "static_batch"),
}
METAVARS = {"milestones": "EPOCH", "bn_recalibrate": "N", "compact_epochs": "N",
            "log_interval": "SECONDS"}
# What a flag says beyond the option's own help (the command line's extra meanings).
HELP_SUFFIX = {
    "resume": "; with a PATH (the CDP scripts' meaning, finetune only): the pruned model's "
              "weights to fine-tune, as --checkpoint",
    "fast_data": "; this flag keeps the DataLoader instead",
}
EXTRA_ARGS: dict[str, dict[str, Any]] = {
    "resume": {"nargs": "?", "const": True, "metavar": "PATH"},
}


def flags(key: str) -> tuple[str, ...]:
    """Every flag of option ``key``, the main one first."""
    return FLAGS.get(key, ("--" + key.replace("_", "-"),))


def flag(key: str) -> str:
    """The flag a message names option ``key`` by (the first long one: ``--batch-size``)."""
    return next(f for f in flags(key) if f.startswith("--"))


def render(exc: CdpruneError) -> str:
    """A library error's message with its options written as flags."""
    return exc.render(flag)


def help_text(spec: OptionSpec) -> str:
    """The ``--help`` line of an option: its help, options in it written as flags."""
    return CdpruneError(spec.help).render(flag) + HELP_SUFFIX.get(spec.name, "")


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


def _arg_type(spec: OptionSpec) -> Any:
    if spec.kind in (INT, INTS):
        return positive_int if spec.positive else int
    if spec.kind in (FLOAT, FLOATS):
        return finite_float
    return None


def add_options(group: Any, cls: type, *, only: Sequence[str] | None = None,
                skip: Sequence[str] = (), hidden: Sequence[str] = (),
                help: Mapping[str, str] | None = None) -> None:
    """Add the options of a config dataclass to an argparse parser or argument group.

    Every flag defaults to ``None`` (not given), so that a YAML config and the dataclass
    defaults apply underneath the flags actually typed.

    Args:
        group: a parser or an argument group.
        cls: the config dataclass.
        only: add just these options.
        skip: leave these options out.
        hidden: accept these but leave them out of ``--help`` (one set of flags serves
            every step of a script, whether the step reads them or not).
        help: help texts replacing the options' own, by option.
    """
    exclusive: dict[str, Any] = {}
    for spec in option_specs(cls):
        if spec.name in skip or (only is not None and spec.name not in only):
            continue
        target = group
        name = next((g for g, members in EXCLUSIVE.items() if spec.name in members), None)
        if name:
            if name not in exclusive:
                exclusive[name] = group.add_mutually_exclusive_group()
            target = exclusive[name]
        text = (help or {}).get(spec.name) or help_text(spec)
        kwargs: dict[str, Any] = {"dest": spec.name, "default": None,
                                  "help": argparse.SUPPRESS if spec.name in hidden else text}
        if spec.kind == BOOL:
            kwargs["action"] = "store_false" if spec.name in NEGATED else "store_true"
        else:
            kwargs["type"] = _arg_type(spec)
            if spec.choices:
                kwargs["choices"] = list(spec.choices)
            if spec.kind in (INTS, FLOATS, STRS):
                kwargs["nargs"] = "+"
            if spec.name in METAVARS:
                kwargs["metavar"] = METAVARS[spec.name]
        extra = EXTRA_ARGS.get(spec.name, {})
        if extra:
            kwargs.pop("action", None)
        kwargs.update(extra)
        target.add_argument(*flags(spec.name), **kwargs)
