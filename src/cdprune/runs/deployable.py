"""The deployable form of a masked network, measured beside it.

A masked network (the published code's) runs at the full architecture's cost; its
compact network (:func:`cdprune.pruning.compact`) removes every masked filter physically.
``cdprune run`` and ``cdprune compare`` both end a masked pruning here: compact,
re-estimate BatchNorm, evaluate, and time the two networks against each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..finetune.batchnorm import recalibrate_bn
from ..measure.evaluate import evaluate
from ..measure.latency import LatencySettings, compare_networks
from ..pruning import compact

__all__ = ["deployable_network"]


def deployable_network(model: nn.Module, masks: Mapping[str, Sequence[int]], *,
                       val_loader: Any, example_inputs: torch.Tensor,
                       recal_loader: Any = None, recal_images: int = 0,
                       device: torch.device | str = "cpu", progress: bool = False,
                       evaluated: bool = True, latency_rounds: int = 15
                       ) -> tuple[nn.Module | None, Any, dict[str, Any]]:
    """Compact a (fine-tuned) masked network, recalibrate, evaluate and time it.

    Args:
        model: the masked network (masked filters' conv weights zero); left as it is.
        masks: ``{conv name: [filter indices]}`` of the masked filters.
        val_loader: evaluation data.
        example_inputs: a batch of inputs (compaction's output check; its first image
            times both networks at batch 1).
        recal_loader: plain training images for BatchNorm recalibration.
        recal_images: how many of them (0: no recalibration).
        device: where to evaluate and time.
        progress: show evaluation progress bars.
        evaluated: evaluate the compact network (``acc_compacted``, ``acc_recalibrated``);
            False skips the evaluations.
        latency_rounds: alternating masked/compact timing pairs (0: not timed).

    Returns:
        ``(compact_model, info, numbers)``: the compact network, what
        :func:`~cdprune.pruning.compact` reported, and the numbers (MACs, parameters,
        ``acc_compacted`` straight after compaction, ``acc_recalibrated`` after
        recalibration, latencies). For an architecture compaction does not know:
        ``(None, None, {"unsupported": ..., "reason": ...})``.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    example = example_inputs.to(device)
    try:
        small, info = compact(model, masks, example_inputs=example)
    except UnsupportedModelError as exc:
        return None, None, {"unsupported": f"compaction does not know "
                                           f"{type(model).__name__}", "reason": str(exc)}
    out: dict[str, Any] = {
        "macs": info.macs, "params": info.params, "macs_paper": info.macs_paper,
        "macs_masked": info.macs_masked, "params_masked": info.params_masked,
        "max_abs_error": info.max_abs_error}

    def top1(net: nn.Module) -> float:
        return float(evaluate(net, val_loader, device=device, progress=progress).top1)

    if evaluated:
        out["acc_compacted"] = top1(small)
    if recal_images and recal_loader is not None:
        out["bn_recalibrate_images"] = recalibrate_bn(small, recal_loader, recal_images,
                                                      device=device)
        if evaluated:
            out["acc_recalibrated"] = top1(small)
    if not latency_rounds:
        return small, info, out
    settings = LatencySettings(batch_size=1, device=device.type, cache_dir=None)
    with torch.no_grad():
        masked_s, compact_s, ratio = compare_networks(model, small.eval(), example[:1],
                                                      settings, rounds=latency_rounds)
    out.update(latency_masked_ms=round(masked_s * 1e3, 3),
               latency_compact_ms=round(compact_s * 1e3, 3), speedup=round(1 / ratio, 3),
               latency_method=f"batch 1 on {device.type}, {torch.get_num_threads()} threads, "
               f"median of {latency_rounds} alternating masked/compact pairs")
    return small, info, out
