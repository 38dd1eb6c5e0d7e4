"""The run's configuration: every option of every stage, in one typed object.

:class:`RunConfig` composes the stage configs (statistics, pruning, compaction,
fine-tuning) with the run's own: the model, the data and the run itself. It is the one
place that says what an option is called, its type, its default, the values it accepts
and how it is checked; the command line's flags, the YAML config's keys, the resolved
``config.yaml`` of a run directory and ``--help`` are generated from it.

The stages read a *flat* configuration (``{option: value}``, one namespace: no two
sections share an option name), which is what a YAML file and the command line give;
:meth:`RunConfig.from_flat` turns one into the typed object, :func:`validate` checks one
in place. Errors name options by field (``macs_reduction``); the command line shows them
as its flags.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from ..data.transforms import normalisation_problem
from ..finetune.config import TrainConfig
from ..importance.config import StatsConfig, published_conflicts
from ..options import (
    BOOL,
    FLOAT,
    FLOATS,
    INT,
    INTS,
    SIZE,
    STR,
    STRS,
    OptionError,
    OptionsError,
    OptionSpec,
    check,
    from_mapping,
    option,
    option_specs,
)
from ..pruning.config import CompactConfig, PruneConfig

__all__ = ["DataConfig", "ModelConfig", "RunConfig", "RunOptions", "check_coe",
           "check_input_channels", "check_round_to", "check_value", "max_workers", "validate"]

WEIGHTS = ("final", "best", "last", "pruned")
# From a configuration an SGD rate above 10 is a slip (1e1 for 1e-1), never a recipe; from
# Python, fine_tune's divergence check catches it.
MAX_LR = 10.0
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass
class ModelConfig:
    """Which network, and which weights."""

    model: str | None = option(None, "zoo name (see `cdprune models`), torchvision:NAME or "
                               "timm:NAME")
    checkpoint: str | None = option(
        None, "weights of the base model (.pth, .pth.tar, .th, .pt, .safetensors); with "
        "{model_dir}: weights of the pruned model")
    random_init: bool = option(False, "use randomly initialised weights when no {checkpoint} "
                               "is given (for tests; pruning random weights is meaningless "
                               "otherwise)")
    weights: str | None = option(
        None, "which weights of {model_dir}: final (the last epoch, last.pth, when "
        "fine-tuning ran, else the pruned model), best (best.pth: chosen on the test set "
        "unless {val_split}), last or pruned (default: pruned to fine-tune, final otherwise)",
        choices=WEIGHTS)


@dataclass
class DataConfig:
    """The dataset, how it is read and normalised, and which part of it is used."""

    dataset: str = option("cifar10", "cifar10, cifar100, imagenet, folder (any class "
                          "folders), digits")
    data_root: str = option("data", "dataset folder")
    download: bool = option(False, "download CIFAR if missing (verified by MD5)")
    batch_size: int = option(TrainConfig.batch_size, "training batch size", positive=True)
    eval_batch_size: int | None = option(None, "evaluation batch size (default: "
                                         "{batch_size})", positive=True)
    workers: int = option(2, "data loading workers")
    mean: list[float] | None = option(None, "input normalisation mean, one value per channel "
                                      "or one for all; the checkpoint's own (a wrong one "
                                      "silently costs accuracy)")
    std: list[float] | None = option(None, "input normalisation std")
    cutout: bool = option(False, "Cutout 16x16")
    train_subset: int | None = option(None, "fine-tune on a seeded random subset of this many "
                                      "training images", positive=True)
    val_subset: int | None = option(None, "evaluate on a seeded random subset of this many "
                                    "validation images", positive=True)
    val_split: int | None = option(None, "hold this many training images out to choose the "
                                   "best epoch on, so the test set is never used for it",
                                   positive=True)


@dataclass
class RunOptions:
    """The run itself: where it writes, how it is seeded, where it computes, what it shows."""

    output_dir: str | None = option(None, "run directory (refused if it holds another run)")
    overwrite: bool = option(False, "reuse an output directory that holds another run "
                             "(only the files that run wrote are removed)")
    resume: bool = option(False, "continue the run in {output_dir} from its last.pth")
    seed: int = option(TrainConfig.seed, "random seed")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda if available)")
    no_progress: bool = option(False, "hide progress bars (long stages then log a line every "
                               "{log_interval} seconds, as when the output is not a "
                               "terminal)")
    log_interval: float = option(30.0, "seconds between progress log lines when no bar is "
                                 "shown; 0: none")


@dataclass
class RunConfig:
    """Every option of a run, by section. Build one with :meth:`from_flat`.

    Attributes:
        model: :class:`ModelConfig`.
        data: :class:`DataConfig`.
        stats: :class:`~cdprune.importance.config.StatsConfig`.
        prune: :class:`~cdprune.pruning.config.PruneConfig`.
        compact: :class:`~cdprune.pruning.config.CompactConfig`.
        train: :class:`~cdprune.finetune.config.TrainConfig`.
        run: :class:`RunOptions`.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    compact: CompactConfig = field(default_factory=CompactConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunOptions = field(default_factory=RunOptions)

    SECTIONS: ClassVar[dict[str, type]] = {
        "model": ModelConfig, "data": DataConfig, "stats": StatsConfig, "prune": PruneConfig,
        "compact": CompactConfig, "train": TrainConfig, "run": RunOptions}

    @classmethod
    def specs(cls) -> dict[str, OptionSpec]:
        """``{option: spec}`` of every option of every section, in section order."""
        return dict(_all_specs(tuple(cls.SECTIONS.values())))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{option: default}`` of every option."""
        # Lists are copied: the specs are shared, and a caller may extend its own config.
        return {name: list(spec.default) if isinstance(spec.default, list) else spec.default
                for name, spec in cls.specs().items()}

    @classmethod
    def from_flat(cls, config: Mapping[str, Any], *, need_target: bool = False) -> RunConfig:
        """Check a flat configuration (see :func:`validate`) and build the typed object.

        Keys that are no option of a run (a command's own inputs) are ignored; unset
        (``None``) ones take their defaults.
        """
        flat = {**cls.defaults(), **{k: v for k, v in config.items() if v is not None}}
        validate(flat, need_target=need_target)
        return cls(**{name: from_mapping(section, flat)
                      for name, section in cls.SECTIONS.items()})

    def flat(self) -> dict[str, Any]:
        """The options as one flat mapping (what :meth:`from_flat` reads)."""
        out: dict[str, Any] = {}
        for name in self.SECTIONS:
            section = getattr(self, name)
            for spec in option_specs(type(section)):
                out[spec.name] = getattr(section, spec.name)
        return out


@functools.cache
def _all_specs(sections: tuple[type, ...]) -> tuple[tuple[str, OptionSpec], ...]:
    out: dict[str, OptionSpec] = {}
    for section in sections:
        for spec in option_specs(section):
            if spec.name in out:  # one flat namespace: a clash is a programming error
                raise TypeError(f"option {spec.name!r} is defined by both "
                                f"{out[spec.name].owner} and {spec.owner}")
            out[spec.name] = spec
    return tuple(out.items())


# ---------------------------------------------------------------------- values
_WORDS = {BOOL: "true or false", INT: "an integer", FLOAT: "a number", INTS: "a list of integers",
          STR: "a string", FLOATS: "a number or a list of numbers", STRS: "a list of names",
          SIZE: "a number with an optional K/M/G suffix"}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)



def check_value(key: str, value: Any, where: str | None = None) -> Any:
    """``value`` if it has the type of option ``key`` (ints are accepted as floats, one
    number as a list of one); else raise :class:`~cdprune.errors.ConfigError`.

    Args:
        key: the option.
        value: its value, e.g. read from YAML.
        where: how the message names it (default: the option itself).
    """
    spec = RunConfig.specs().get(key)
    if value is None or spec is None:
        return value
    kind = spec.kind
    ok = {
        BOOL: lambda v: isinstance(v, bool),
        INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
        FLOAT: _is_number,
        STR: lambda v: isinstance(v, str),
        FLOATS: lambda v: _is_number(v) or (isinstance(v, list) and bool(v)
                                            and all(_is_number(x) for x in v)),
        STRS: lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        INTS: lambda v: isinstance(v, list) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in v),
        SIZE: lambda v: isinstance(v, str) or _is_number(v),
    }[kind](value)
    named = (where) if where else "{" + key + "}"
    if not ok:
        got = f"the string {value!r}" if isinstance(value, str) else \
            f"a {type(value).__name__}" if isinstance(value, (list, dict)) else repr(value)
        fix = "; write it without quotes" if isinstance(value, str) else ""
        raise OptionsError(f"{named} must be {_WORDS[kind]}, got {(got)}{fix}")
    if kind == FLOAT:
        value = float(value)
    if kind == FLOATS:
        value = [float(x) for x in (value if isinstance(value, list) else [value])]
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, float) and not math.isfinite(v):
            raise OptionsError(f"{named} is {v}; give a finite number")
    return value


def max_workers() -> int:
    """The most DataLoader workers that make sense here: one per CPU this process may run
    on (PyTorch's own advice), and never fewer than the default 2."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(2, cpus)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate(config: dict[str, Any], *, need_target: bool = False) -> None:
    """Check every option of a flat configuration; raise naming the first bad one.

    Types, allowed values and ranges of every option, the stages' own checks, and the
    checks that involve several options. Also brings ``mean``/``std`` given as one number
    to one value per channel of the dataset; nothing else is changed: a value set by the
    user is used as given or refused.

    Args:
        config: the flat configuration (missing options count as unset).
        need_target: exactly one pruning target must be set (``prune`` and ``run``).

    Raises:
        ConfigError: an :class:`~cdprune.options.OptionsError` naming the option.
    """
    specs = RunConfig.specs()
    for key in specs:
        if key in config:
            config[key] = check_value(key, config[key])
    for key, value in config.items():  # names from a non-UTF-8 command line or file system
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and not _utf8(v):
                shown = repr(v.encode("utf-8", "replace").decode())
                raise OptionsError("{" + key + "} " + (shown) + " is not valid UTF-8; "
                                   "rename it with UTF-8 characters only")
    for key, spec in specs.items():
        value = config.get(key)
        if spec.choices and value is not None and value not in spec.choices:
            raise OptionError(key, value, f"one of {', '.join(map(str, spec.choices))}")
    get = config.get
    if get("resume") and get("overwrite"):
        raise OptionsError("{resume} and {overwrite} exclude each other: resuming continues "
                           "the run in the output directory, overwriting removes it; give "
                           "one of them")
    workers = max_workers()
    checks = [  # the run's own options; each stage's are checked by its config below
        ("lr", not _is_number(get("lr")) or get("lr") <= MAX_LR,
         f"a positive number up to {MAX_LR:g}"),
        ("eval_batch_size", get("eval_batch_size") is None or get("eval_batch_size") > 0,
         "a positive integer"),
        ("batch_size", get("batch_size") is None or get("batch_size") > 0,
         "a positive integer"),
        ("workers", get("workers") is None or 0 <= get("workers") <= workers,
         f"0 to {workers} (the CPUs this process may use; more loader workers only add "
         "processes)"),
        ("train_subset", get("train_subset") is None or get("train_subset") > 0,
         "a positive integer"),
        ("val_subset", get("val_subset") is None or get("val_subset") > 0, "a positive integer"),
        ("val_split", get("val_split") is None or get("val_split") > 0, "a positive integer"),
        ("log_interval", get("log_interval") is None or get("log_interval") >= 0,
         "0 (no progress lines) or a positive number of seconds"),
    ]
    for key, ok, valid in checks:
        check(key, get(key), ok, valid)
    TrainConfig.from_config(config)  # checked on construction
    StatsConfig.from_config(config).validate()
    PruneConfig.from_config(config).validate(need_target=need_target)
    if get("variant") == "published":
        conflicts = published_conflicts(config)
        if conflicts:
            given = ", ".join("{" + k + "} " + (str(config[k])) for k in conflicts)
            one = len(conflicts) == 1
            raise OptionsError(
                f"{{variant}} published sets every CDP option to the published code's, but "
                f"{given} {'was' if one else 'were'} given too; drop {{variant}} published "
                f"to use {'it' if one else 'them'}, or drop {'it' if one else 'them'}")
    CompactConfig.from_config(config).validate()
    device = get("device")
    if device is not None and not _DEVICE.match(device):
        raise OptionsError("{device} " + (repr(device)) + " is not supported; use cpu, "
                           "cuda or cuda:N")
    _check_normalisation(config)


def _check_normalisation(config: dict[str, Any]) -> None:
    """``mean``/``std``: one value per input channel, or one value for all of them."""
    if config.get("mean") is None and config.get("std") is None:
        return
    from ..data import dataset_info

    try:
        channels = int(dataset_info(config["dataset"])[1][0])
    except (KeyError, ValueError, TypeError):  # an unknown dataset is refused where it is built
        return
    for key in ("mean", "std"):
        values = config.get(key)
        if values is None:
            continue
        values = [float(v) for v in values]
        if len(values) == 1:
            values = values * channels
        if len(values) != channels:
            one = channels == 1
            raise OptionsError(
                "{" + key + "}" + (
                    f" has {len(values)} values but dataset '{config['dataset']}' has "
                    f"{channels} input channel{'' if one else 's'}; give "
                    f"{'1 value' if one else f'1 or {channels} values'}"))
        if key == "std" and any(v <= 0 for v in values):
            raise OptionError("std", " ".join(f"{v:g}" for v in values),
                              "positive in every value")
        problem = normalisation_problem(values if key == "mean" else None,
                                        values if key == "std" else None, where="")
        if problem:
            raise OptionsError("{" + key + "}" + (problem[len(key):]))
        config[key] = values


# ---------------------------------------------------------------------- against a model
def _convs(model: Any) -> list[tuple[str, int]]:
    from torch import nn

    return [(n, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def check_round_to(config: Mapping[str, Any], model: Any) -> None:
    """Refuse a ``round_to`` at least as wide as the widest convolution: nothing could go."""
    round_to = config.get("round_to")
    convs = _convs(model)
    if not round_to or not convs:
        return
    name, width = max(convs, key=lambda c: c[1])
    if round_to >= width:
        raise OptionsError("{round_to} " + (
            f"{round_to} removes nothing: the widest layer ({name}) has {width} channels, and "
            f"widths stay multiples of {round_to}") + "; give a {round_to} " + f"below {width}")


def check_coe(config: Mapping[str, Any], model: Any) -> None:
    """Refuse a ``coe`` that makes the balance factor of some layer zero or negative.

    b = ln(C / coe) + 1 is positive only for coe < e x C; the narrowest convolution sets
    the bound. Checked on the model before any statistics are gathered.
    """
    convs = _convs(model)
    coe = config.get("coe")
    if not coe or not convs:
        return
    name, width = min(convs, key=lambda c: c[1])
    b = math.log(width / coe) + 1.0
    if b <= 0:
        raise OptionsError("{coe} " + (
            f"{coe:g} is invalid: it gives layer '{name}' ({width} channels) the balance "
            f"factor ln({width}/{coe:g}) + 1 = {b:.3g}, which reverses its ranking") + "; give "
            "a {coe} " + (f"below e x {width} = {math.e * width:.4g} (e times the "
                                 "narrowest layer's width)"))


def check_input_channels(config: Mapping[str, Any], model: Any) -> None:
    """Refuse a model whose first convolution reads another number of channels than the
    dataset's images have (before a forward pass fails deep inside PyTorch)."""
    from torch import nn

    from ..data import dataset_info

    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    try:
        channels = int(dataset_info(config["dataset"])[1][0])
    except (KeyError, ValueError, TypeError):
        return
    if first is not None and first.in_channels != channels:
        raise OptionsError("{model} " + (
            f"{config.get('model')} reads {first.in_channels}-channel images but dataset "
            f"'{config['dataset']}' has {channels}-channel images; choose a model built for "
            "this dataset (see `cdprune models`)"))


def stage_fields() -> dict[str, list[str]]:
    """``{section: [option, ...]}``: which options each section holds."""
    return {name: [f.name for f in fields(cls) if "help" in f.metadata]
            for name, cls in RunConfig.SECTIONS.items()}
