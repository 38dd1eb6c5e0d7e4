"""Reading a YAML config file: a flat mapping of options to values, typed and strict.

A YAML config file (``-c``) sets defaults for the command's flags. Every value is checked
against its option's type (a quoted ``"false"`` is a string, not a boolean, and is
refused) before anything else happens, so a bad file fails in the first second with one
line naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..runs.config import check_value
from ..suggest import did_you_mean

__all__ = ["load_yaml"]

# The most bytes and aliases a config file may hold: a flat mapping of flags needs few,
# and a small file of nested aliases ("billion laughs") would otherwise expand to gigabytes.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_ALIASES = 16


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
        out[name] = check_value(name, value, where=f"config file '{file}': {key}")
    return out
