"""Reading and checking the command-line configuration: typed, strict, before any work.

A YAML config file sets defaults for the command's flags. Every value is checked against
the type its flag has (a quoted ``"false"`` is a string, not a boolean, and is refused),
and the merged configuration is checked value by value before any data is read or any
file written, so a bad value fails in the first second with one line naming the key.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..finetune.loop import TrainConfig
from ..options import (
    BOOL,
    FLOAT,
    FLOATS,
    INT,
    INTS,
    STR,
    STRS,
    CompactConfig,
    PruneConfig,
    StatsConfig,
    flag,
    key_choices,
    key_types,
    published_conflicts,
)
from ..suggest import did_you_mean

__all__ = ["KEY_TYPES", "check_coe", "check_input_channels", "check_round_to", "check_types",
           "flag", "load_yaml", "max_workers", "normalisation_problem", "validate"]

# The most bytes and aliases a config file may hold: a flat mapping of flags needs few,
# and a small file of nested aliases ("billion laughs") would otherwise expand to gigabytes.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_ALIASES = 16
MAX_LR = 10.0

_BOOL, _INT, _FLOAT, _STR, _INTS, _FLOATS, _STRS = BOOL, INT, FLOAT, STR, INTS, FLOATS, STRS
_SIZE = "size"  # a count with an optional K/M/G suffix: 60.02M, or a plain number
# The stages' options bring their own types and choices; the rest are listed here.
KEY_TYPES: dict[str, str] = {
    **key_types(StatsConfig, PruneConfig, CompactConfig, TrainConfig),
    **dict.fromkeys(("download", "cutout", "resume", "overwrite", "no_progress",
                     "random_init"), _BOOL),
    **dict.fromkeys(("batch_size", "eval_batch_size", "workers", "train_subset", "seed",
                     "val_subset", "val_split"), _INT),
    **dict.fromkeys(("model", "checkpoint", "dataset", "data_root", "device", "output_dir",
                     "weights"), _STR),
    "mean": _FLOATS, "std": _FLOATS, "log_interval": _FLOAT,
}
CHOICES: dict[str, tuple[str, ...]] = {
    **key_choices(StatsConfig, PruneConfig, CompactConfig, TrainConfig),
    "weights": ("final", "best", "last", "pruned"),
}
_WORDS = {_BOOL: "true or false", _INT: "an integer", _FLOAT: "a number",
          _INTS: "a list of integers",
          _STR: "a string", _FLOATS: "a number or a list of numbers",
          _STRS: "a list of names", _SIZE: "a number with an optional K/M/G suffix"}


# ---------------------------------------------------------------------- YAML
class _DuplicateKey(Exception):
    """A YAML mapping names a key twice."""


def _safe_loader() -> type:
    """PyYAML's SafeLoader, plus YAML 1.2's floats without a dot (``1e-5``, ``5E-4``).

    YAML 1.1 reads ``weight_decay: 1e-5`` as the string "1e-5"; a user who wrote a number
    must get a number, not a refusal to write it without the quotes it never had.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            # YAML keeps the last of two equal keys silently (lr: 0.02 ... lr: 5): refused.
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the mapping check refuses it
                    continue
                if first is not key_node.start_mark:
                    raise _DuplicateKey(f"sets {str(key)[:40]!r} twice (lines {first.line + 1} "
                                        f"and {key_node.start_mark.line + 1}); keep one")
            return super().construct_mapping(node, deep=deep)

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))
    return Loader


def load_yaml(path: str | Path, known: Mapping[str, Any],
              names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read a YAML config file: a flat mapping of ``known`` keys to values of their type.

    A key may be written with dashes or underscores, and as any name in ``names``
    (a flag's other names, e.g. ``lr_scheduler`` for ``lr_schedule``).

    Raises:
        FileNotFoundError: no such file.
        ConfigError: not UTF-8, not YAML, too large, too many aliases, not a mapping, an
            unknown key, or a value of the wrong type (the key is named).
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file '{file}' does not exist; check the -c path")
    raw = file.read_bytes()
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"config file '{file}' is {len(raw)} bytes; a config of flags "
                          f"holds far less (limit {MAX_YAML_BYTES}); check the -c path")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{file}' is not UTF-8 text (byte {exc.start}); "
                          "save it as UTF-8") from None
    try:
        loader = _safe_loader()
        aliases = sum(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, loader))
        if aliases > MAX_YAML_ALIASES:
            raise ConfigError(f"config file '{file}' uses {aliases} YAML aliases (at most "
                              f"{MAX_YAML_ALIASES}); write the values out")
        data = yaml.load(text, Loader=loader)  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKey as exc:
        raise ConfigError(f"config file '{file}' {exc}") from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"config file '{file}' is not valid YAML: {detail}") from None
    except RecursionError:
        raise ConfigError(f"config file '{file}' is nested too deeply; it must hold a flat "
                          "mapping of flag: value") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{file}' must hold a mapping of flag: value")
    out = {}
    for key, value in data.items():
        if not isinstance(key, str):  # never str() it: a nested alias key can be huge
            raise ConfigError(f"config file '{file}': keys must be flag names, got "
                              f"{repr(key)[:40]} ({type(key).__name__})")
        name = key.replace("-", "_")
        if name not in known:
            name = (names or {}).get(name, name)
        if name not in known:
            hint = did_you_mean(key.replace("-", "_"), [*known, *(names or {})], n=2,
                                before="; ")
            raise ConfigError(f"config file '{file}': unknown key '{key}'{hint}")
        if name in out:
            raise ConfigError(f"config file '{file}' sets {name} twice (as '{key}' and under "
                              "another name); keep one")
        out[name] = check_type(name, value, where=f"config file '{file}': {key}")
    return out


def check_type(key: str, value: Any, where: str | None = None) -> Any:
    """``value`` if it has the type of ``key`` (ints are accepted as floats); else raise."""
    kind = KEY_TYPES.get(key)
    where = where or flag(key)
    if value is None or kind is None:
        return value
    ok = {
        _BOOL: lambda v: isinstance(v, bool),
        _INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
        _FLOAT: _is_number,
        _STR: lambda v: isinstance(v, str),
        _FLOATS: lambda v: _is_number(v) or (isinstance(v, list) and bool(v)
                                             and all(_is_number(x) for x in v)),
        _STRS: lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        _INTS: lambda v: isinstance(v, list) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in v),
        _SIZE: lambda v: isinstance(v, str) or _is_number(v),
    }[kind](value)
    if not ok:
        got = f"the string {value!r}" if isinstance(value, str) else \
            f"a {type(value).__name__}" if isinstance(value, (list, dict)) else repr(value)
        fix = "; write it without quotes" if isinstance(value, str) else ""
        raise ConfigError(f"{where} must be {_WORDS[kind]}, got {got}{fix}")
    if kind == _FLOAT:
        value = float(value)
    if kind == _FLOATS:
        value = [float(x) for x in (value if isinstance(value, list) else [value])]
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{where} is {v}; give a finite number")
    return value


def check_types(config: Mapping[str, Any]) -> None:
    """Check every known key of a merged configuration for its type."""
    for key in KEY_TYPES:
        check_type(key, config.get(key))


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------- values
def max_workers() -> int:
    """The most DataLoader workers (``-j``) that make sense here: one per CPU this process
    may run on (PyTorch's own advice), and never fewer than the default 2."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(2, cpus)


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def _range(key: str, value: Any, valid: str, ok: bool) -> None:
    if not ok:
        raise ConfigError(f"{flag(key)} {value!r} is invalid; it must be {valid}"
                          if isinstance(value, str) else
                          f"{flag(key)} {value} is invalid; it must be {valid}")


def validate(config: dict[str, Any]) -> None:
    """Check every value of a merged configuration; raise :class:`ConfigError` naming it.

    Also brings ``mean``/``std`` given as one number to one value per channel of the
    dataset. Nothing else is changed: a value set by the user is used as given or refused.
    """
    check_types(config)
    for key, value in config.items():  # names from a non-UTF-8 command line or file system
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and not _utf8(v):
                raise ConfigError(f"{flag(key)} {v.encode('utf-8', 'replace').decode()!r} is "
                                  "not valid UTF-8; rename it with UTF-8 characters only")
    for key, choices in CHOICES.items():
        value = config.get(key)
        if value is not None and value not in choices:
            raise ConfigError(f"{flag(key)} {value!r} is invalid; choose one of "
                              f"{', '.join(choices)}")
    if config.get("resume") and config.get("overwrite"):
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the "
                          "run in the output directory, --overwrite removes it; give one of "
                          "them")
    get = config.get
    checks = [  # the run's own options; each stage's are checked by its config below
        # From the command line an SGD rate above 10 is a slip (1e1 for 1e-1), never a
        # recipe; from Python, fine_tune's divergence check catches it.
        ("lr", not _is_number(get("lr")) or get("lr") <= MAX_LR,
         f"a positive number up to {MAX_LR:g}"),
        ("eval_batch_size", get("eval_batch_size") is None or get("eval_batch_size") > 0,
         "a positive integer"),
        ("workers", 0 <= get("workers") <= max_workers(),
         f"0 to {max_workers()} (the CPUs this process may use; more loader workers only "
         "add processes)"),
        ("train_subset", get("train_subset") is None or get("train_subset") > 0,
         "a positive integer"),
        ("val_subset", get("val_subset") is None or get("val_subset") > 0, "a positive integer"),
        ("val_split", get("val_split") is None or get("val_split") > 0, "a positive integer"),
        ("log_interval", get("log_interval") is None or get("log_interval") >= 0,
         "0 (no progress lines) or a positive number of seconds"),
    ]
    for key, ok, valid in checks:
        _range(key, get(key), valid, ok)
    command = get("command")
    # The stages check their own options (OptionError: the command line names the flag).
    TrainConfig.from_config(config)  # checked on construction
    StatsConfig.from_config(config).validate()
    PruneConfig.from_config(config).validate(need_target=command in ("prune", "run"))
    conflicts = [f"{flag(k)} {config[k]}" for k in published_conflicts(config)] \
        if get("variant") == "published" else []
    if conflicts:
        raise ConfigError(f"--variant published sets every CDP option to the published code's, "
                          f"but {', '.join(conflicts)} {'was' if len(conflicts) == 1 else 'were'}"
                          " given too; drop --variant published to use "
                          f"{'it' if len(conflicts) == 1 else 'them'}, or drop "
                          f"{'it' if len(conflicts) == 1 else 'them'}")
    CompactConfig.from_config(config).validate()
    device = get("device")
    if device is not None and not _DEVICE.match(device):
        raise ConfigError(f"--device {device!r} is not supported; use cpu, cuda or cuda:N")
    _check_normalisation(config)
    if command in ("stats", "prune", "run", "compact") and not get("model"):
        raise ConfigError("--model is required (see `cdprune models`)")
    if command == "compact" and not get("removed_filters"):
        raise ConfigError("--removed-filters is required: a JSON file mapping conv names to "
                          "the masked filters' indices (or a report.json holding "
                          "removed_filters)")
    if command in ("stats", "prune", "run", "compare", "compact") and not get(
            "checkpoint") and not get("random_init"):
        raise ConfigError(f"--checkpoint is missing: {command} needs the trained weights of the "
                          "base model; pass --checkpoint FILE, or --random-init to use randomly "
                          "initialised weights on purpose")


# Input normalisation in any pixel scale (0-1 or 0-255) lies well inside these bounds;
# beyond them a value is a slip or damage, and the model would see garbage.
MAX_MEAN = 1e3
STD_RANGE = (1e-6, 1e3)


def normalisation_problem(mean: Any, std: Any, channels: int | None = None,
                          where: str = "--") -> str | None:
    """What is wrong with a mean and std read from a flag or a file; ``None`` if nothing.

    Each must be a list of finite numbers, one per input channel (or one for all), the
    mean within +-1000 and the std within 1e-6 and 1000.
    """
    for key, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        if not isinstance(values, list) or not values or not all(_is_number(v)
                                                                 for v in values):
            return f"{where}{key} must be a list of numbers, got {values!r}"[:200]
        bad = next((v for v in values if not math.isfinite(v)), None)
        low, high = (-MAX_MEAN, MAX_MEAN) if key == "mean" else STD_RANGE
        bad = bad if bad is not None else next((v for v in values if not low <= v <= high),
                                               None)
        if bad is not None:
            return f"{where}{key} holds {bad}; each value must be a finite number in " \
                   f"[{low:g}, {high:g}]"
        if channels is not None and len(values) not in (1, channels):
            return (f"{where}{key} has {len(values)} values for {channels}-channel inputs; "
                    f"it needs 1 or {channels}")
    return None


def _check_normalisation(config: dict[str, Any]) -> None:
    """``--mean``/``--std``: one value per input channel, or one value for all of them."""
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
            raise ConfigError(f"{flag(key)} has {len(values)} values but dataset "
                              f"'{config['dataset']}' has {channels} input channel"
                              f"{'s' if channels > 1 else ''}; give "
                              f"{'1 value' if channels == 1 else f'1 or {channels} values'}")
        if key == "std" and any(v <= 0 for v in values):
            raise ConfigError(f"--std {' '.join(f'{v:g}' for v in values)} is invalid; every "
                              "value must be positive")
        problem = normalisation_problem(values if key == "mean" else None,
                                        values if key == "std" else None)
        if problem:
            raise ConfigError(problem)
        config[key] = values


def check_round_to(config: Mapping[str, Any], model: Any) -> None:
    """Refuse a ``--round-to`` at least as wide as the widest convolution: nothing could go."""
    from torch import nn

    round_to = config.get("round_to")
    convs = [(n, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not round_to or not convs:
        return
    name, width = max(convs, key=lambda c: c[1])
    if round_to >= width:
        raise ConfigError(f"--round-to {round_to} removes nothing: the widest layer ({name}) "
                          f"has {width} channels, and widths stay multiples of {round_to}; "
                          f"give a --round-to below {width}")


def check_coe(config: Mapping[str, Any], model: Any) -> None:
    """Refuse a ``--coe`` that makes the balance factor of some layer zero or negative.

    b = ln(C / coe) + 1 is positive only for coe < e x C; the narrowest convolution sets
    the bound. Checked on the model before any statistics are gathered.
    """
    from torch import nn

    convs = [(n, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    coe = config.get("coe")
    if not coe or not convs:
        return
    name, width = min(convs, key=lambda c: c[1])
    b = math.log(width / coe) + 1.0
    if b <= 0:
        raise ConfigError(f"--coe {coe:g} is invalid: it gives layer '{name}' ({width} channels) "
                          f"the balance factor ln({width}/{coe:g}) + 1 = {b:.3g}, which reverses "
                          f"its ranking; give a --coe below e x {width} = "
                          f"{math.e * width:.4g} (e times the narrowest layer's width)")


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
        raise ConfigError(f"--model {config.get('model')} reads {first.in_channels}-channel "
                          f"images but dataset '{config['dataset']}' has {channels}-channel "
                          "images; choose a model built for this dataset (see `cdprune "
                          "models`)")
