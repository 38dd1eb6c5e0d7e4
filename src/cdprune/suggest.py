""""Did you mean ...?" hints for names a user mistyped (layers, models, config keys)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean"]


def did_you_mean(name: str, candidates: Iterable[str], *, n: int = 3, cutoff: float = 0.6,
                 before: str = "", after: str = "") -> str:
    """``before + "did you mean a, b?" + after`` for the names closest to ``name``, else ``""``.

    Args:
        name: what the user typed.
        candidates: the valid names.
        n: at most this many suggestions, closest first.
        cutoff: similarity (0 to 1) a candidate needs to be suggested.
        before: text put before the hint when there is one (e.g. ``"; "``).
        after: text put after the hint when there is one (e.g. ``" "``).
    """
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=cutoff)
    return f"{before}did you mean {', '.join(close)}?{after}" if close else ""
