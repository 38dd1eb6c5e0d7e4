"""What a pruning produced: :class:`PruneResult`, and the format of its plan.

Kept apart from the engine (:mod:`~cdprune.pruning.core`), the plans
(:mod:`~cdprune.pruning.plan`) and the masks (:mod:`~cdprune.pruning.masking`), which all
build or read results: none of them has to import another for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["PLAN_FORMAT", "PruneResult", "conv_widths"]

PLAN_FORMAT = "cdprune.plan/1"


@dataclass
class PruneResult:
    """What :func:`prune` did.

    Attributes:
        model: the pruned network (a new module unless ``inplace=True``).
        plan: plain-data record that rebuilds the pruned architecture from the base model:
            ``steps`` (the group removals, in order) and ``kept`` (per pruned module, the
            kept output-channel indices of the original).
        macs_before, macs_after, params_before, params_after: measured on the real models.
        widths_before, widths_after: output channels of every Conv2d.
        removed_filters, candidate_filters: scored filters removed, out of those that could
            be (in scope, not ignored).
    """

    model: nn.Module
    plan: dict[str, Any]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    widths_before: dict[str, int]
    widths_after: dict[str, int]
    removed_filters: int = 0
    candidate_filters: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def macs_reduction(self) -> float:
        """Fraction of the base model's MACs removed."""
        return 1.0 - self.macs_after / self.macs_before

    @property
    def sparsity(self) -> float:
        """Fraction of candidate filters removed."""
        return self.removed_filters / max(1, self.candidate_filters)

    def summary(self) -> dict[str, Any]:
        """Numbers for reports: MACs, parameters, sparsity and per-layer widths."""
        return {
            "macs_before": self.macs_before, "macs_after": self.macs_after,
            "macs_reduction": round(self.macs_reduction, 6),
            "params_before": self.params_before, "params_after": self.params_after,
            "removed_filters": self.removed_filters,
            "candidate_filters": self.candidate_filters,
            "sparsity": round(self.sparsity, 6),
            "widths_before": self.widths_before, "widths_after": self.widths_after,
        }


def conv_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d, by name."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
