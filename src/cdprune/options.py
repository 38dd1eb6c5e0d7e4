"""Typed options: a dataclass field that also knows its help, allowed values and kind.

Every option of cdprune is one field of one dataclass: the stages' configs
(:class:`~cdprune.importance.config.StatsConfig`,
:class:`~cdprune.pruning.config.PruneConfig`, ...) and the run's own
(:class:`~cdprune.runs.config.RunConfig` composes them all). The field holds the type,
the default, the allowed values and one line of help; the command line's flags, the YAML
config's keys and types and the table of defaults are all read off these fields, so adding
an option is adding a field. Which flags a field answers to is the command line's business
(:mod:`cdprune.cli.flags`), never the library's.

Errors name options by their field names. A message that speaks of other options writes
them as ``{field}`` placeholders (:class:`OptionsError`): in Python they read as the field
names (``macs_reduction``), and the command line renders them as its flags.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .errors import ConfigError

__all__ = ["OptionError", "OptionSpec", "OptionsError", "check", "from_mapping", "option",
           "option_specs"]

# The kinds of value an option holds, as the YAML config checks them.
BOOL, INT, FLOAT, STR, INTS, FLOATS, STRS, SIZE = ("bool", "int", "float", "str", "ints",
                                                  "floats", "strs", "size")


class OptionsError(ConfigError):
    """A configuration error whose message names options as ``{field}`` placeholders (see
    :class:`~cdprune.errors.CdpruneError`)."""


class OptionError(OptionsError):
    """An option's value is outside what it accepts.

    Attributes:
        key: the option's field name (``max_layer_pruning``).
        value: the value refused.
        valid: what it must be (``"a fraction in (0, 1]"``).
    """

    def __init__(self, key: str, value: Any, valid: str):
        self.key, self.value, self.valid = key, value, valid
        shown = repr(value) if isinstance(value, str) else str(value)
        super().__init__("{" + key + "}=" + shown + " is invalid; it must be " + valid)

    def render(self, name: Callable[[str], str]) -> str:
        text = super().render(name)
        # A flag takes its value after a space (``--coe -1``), a field after ``=``.
        flag = name(self.key)
        return text.replace(flag + "=", flag + " ", 1) if flag.startswith("-") else text


def check(key: str, value: Any, ok: bool, valid: str) -> None:
    """Raise :class:`OptionError` for ``key`` unless ``ok``."""
    if not ok:
        raise OptionError(key, value, valid)


def option(default: Any, help: str, *, choices: Sequence[Any] = (), positive: bool = False,
           show_default: bool = True, kind: str | None = None) -> Any:
    """A dataclass field that is also a user-facing option.

    Args:
        default: the option's default (``None``: unset, the library decides).
        help: one line for ``--help``; the default is appended to it. Other options are
            written as ``{field}`` placeholders.
        choices: the values allowed, when they are a fixed list.
        positive: an integer that must be at least 1 (the command line refuses it early).
        show_default: append ``(default: ...)`` to the help.
        kind: the value's kind when the type does not say it (``"size"``: 60.02M).
    """
    meta = {"help": help, "choices": tuple(choices), "positive": positive,
            "show_default": show_default, "kind": kind}
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
    choices: tuple[Any, ...]
    positive: bool
    owner: str  # the dataclass defining it


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
    """The options of a config dataclass, in field order (fields without help are settings
    of the Python API only, and are skipped)."""
    return list(_specs(cls))


@functools.cache
def _specs(cls: type) -> tuple[OptionSpec, ...]:
    # Read once per class: type hints are resolved from strings, which is slow, and every
    # parser, YAML check and validation reads the same fields.
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
                              meta["choices"], meta["positive"], cls.__name__))
    return tuple(out)


def from_mapping(cls: type, config: Mapping[str, Any]) -> Any:
    """An instance of ``cls`` from a flat configuration: its keys that are set (not
    ``None``); the others take their defaults."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names and v is not None})
