"""Absolute MACs targets (``60.02M``) in either counting convention.

Papers state pruned models by absolute MACs, counted their own way. ``macs_target``
takes such a figure and says which convention it is in:

* ``physical``: :func:`cdprune.count_macs` of the network that actually runs;
* ``paper``: the CDP paper's own counter on masks (:func:`cdprune.measure.macs.paper_macs`).

Both conventions agree on the unpruned model. A physical target is a fraction of the base
MACs, which :func:`cdprune.prune` hits directly; a paper target is found by bisection on
that fraction, pruning and counting each candidate.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..measure.macs import paper_macs
from ..options import OptionsError

__all__ = ["CONVENTIONS", "parse_macs", "reduction_for_target"]

logger = logging.getLogger(__name__)

CONVENTIONS = ("physical", "paper")
_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}
_TOLERANCE = 0.003  # of the base MACs, as for fractional targets


def parse_macs(value: str | int | float) -> int:
    """``"60.02M"``, ``"2.089G"``, ``"920000K"`` or a plain number, as an integer MACs count.

    Raises:
        ConfigError: not a positive number with an optional K/M/G suffix.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, scale = float(value), 1.0
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgG]?)\s*",
                             str(value))
        if not match:
            raise ConfigError(f"MACs target {value!r} is not a number with an optional K, M "
                              "or G suffix; write e.g. 60.02M or 2.089G")
        number, scale = float(match.group(1)), _SUFFIX[match.group(2).upper()]
    macs = number * scale
    if not math.isfinite(macs) or macs < 1:
        raise ConfigError(f"MACs target {value!r} must be a positive count, e.g. 60.02M")
    return int(round(macs))


def reduction_for_target(target: int, base_macs: int, convention: str,
                         prune_at: Callable[[float], Any] | None = None,
                         model: Any = None, example_inputs: Any = None,
                         iterations: int = 20) -> float:
    """The ``macs_reduction`` fraction that lands a pruning on ``target`` MACs.

    Args:
        target: MACs wanted after pruning, in ``convention``.
        base_macs: MACs of the unpruned model (the same in both conventions).
        convention: ``"physical"`` or ``"paper"``.
        prune_at: for ``paper``: prunes at a fraction and returns the PruneResult.
        model: for ``paper``: the unpruned model.
        example_inputs: for ``paper``: a batch the model takes.
        iterations: bisection steps for ``paper``.

    Raises:
        ConfigError: unknown convention, or a target outside (0, base MACs) or one no
            pruning reaches.
    """
    if convention not in CONVENTIONS:
        raise ConfigError(f"MACs convention {convention!r} is unknown; use one of "
                          f"{', '.join(CONVENTIONS)}")
    if not 0 < target < base_macs:
        raise ConfigError(f"MACs target {target / 1e6:.2f}M must be below the unpruned "
                          f"model's {base_macs / 1e6:.2f}M; give a smaller MACs target")
    fraction = 1.0 - target / base_macs
    if convention == "physical":
        return fraction
    if prune_at is None or model is None or example_inputs is None:
        raise ConfigError("a 'paper' MACs target needs prune_at, model and example_inputs")

    def paper_fraction(r: float) -> float | None:
        try:
            result = prune_at(r)
        except ConfigError:
            return None  # this much cannot be removed
        return 1.0 - paper_macs(model, result.plan["kept"],
                                example_inputs=example_inputs) / base_macs

    # The paper convention credits at most what physical pruning removes plus masked
    # residual outputs, so its reduction at a physical fraction r is close to r: bisect.
    lo, hi = 0.0, min(0.99, fraction + 0.5)
    best, best_err = None, math.inf
    for _ in range(iterations):
        mid = (lo + hi) / 2
        got = paper_fraction(mid)
        if got is None:
            hi = mid
            continue
        err = abs(got - fraction)
        if err < best_err:
            best, best_err = mid, err
        if err <= _TOLERANCE / 3:
            break
        lo, hi = (mid, hi) if got < fraction else (lo, mid)
    if best is None or best_err > _TOLERANCE:
        raise OptionsError(f"no pruning reaches {target / 1e6:.2f}M MACs in the paper "
                           f"convention (closest: {best_err * 100:.2f} points away); try "
                           "{scope} all, a larger {max_layer_pruning} or the physical "
                           "convention")
    logger.info("paper-convention target %.2fM: physical MACs reduction %.4f", target / 1e6,
                best)
    return best
