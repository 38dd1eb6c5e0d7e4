"""The plan of a pruning, and pruned models on disk.

A pruned model is saved as ``model.safetensors`` plus ``plan.json``: which channels of
which layer were removed, in the base model's numbering. Loading replays the plan on a
fresh base model and loads the weights into it: no pickle anywhere.

A compact network (:mod:`.compact`) is saved the same way: its plan records the masks
under ``compact``, and loading compacts a fresh base model with them (the structure
depends on the masks alone) before loading the weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch_pruning as tp
from torch import nn

from ..checkpoint import load_weights, save_weights
from ..data.transforms import normalisation_problem
from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from ..fileio import atomic_write_text
from ..measure.macs import count_macs
from ..runs.files import MODEL, PLAN
from ..version import __version__
from .compact import compact_structure
from .graph import build_graph
from .result import PLAN_FORMAT
from .surgery import prune_together

if TYPE_CHECKING:
    from .compact import CompactInfo
    from .result import PruneResult

__all__ = ["load_pruned", "read_plan", "save_compact", "save_pruned"]

# More classes than any dataset has: a larger number in plan.json is damage, not data.
MAX_CLASSES = 1_000_000


def _replay(model: nn.Module, plan: Mapping[str, Any], example_inputs: Any) -> nn.Module:
    if not isinstance(plan, Mapping) or plan.get("format") != PLAN_FORMAT:
        raise CheckpointError(f"not a cdprune plan (expected format {PLAN_FORMAT!r})")
    if plan.get("compact") is not None:
        return _replay_compact(model, plan)
    graph = build_graph(model, example_inputs)
    named = dict(model.named_modules())
    parts = []
    for step in plan["steps"]:
        records = step.get("parts", [step]) if isinstance(step, Mapping) else [{}]
        for record in records:
            module = named.get(record.get("module"))
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                raise CheckpointError(f"plan step names module {record.get('module')!r}, which "
                                      "the base model lacks: the plan belongs to another "
                                      "architecture")
            fn = tp.prune_linear_out_channels if isinstance(module, nn.Linear) \
                else tp.prune_conv_out_channels
            if isinstance(module, nn.Conv2d) and module.groups == module.out_channels > 1:
                fn = tp.prune_depthwise_conv_out_channels
            width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            idxs = record.get("idxs", [])
            if not idxs or any(not isinstance(i, int) or not 0 <= i < width for i in idxs) \
                    or len(set(idxs)) >= width:
                raise CheckpointError(f"plan step for '{record['module']}' removes channels "
                                      f"{idxs[:8]}... that do not fit its {width} channels")
            parts.append((module, fn, idxs))
    prune_together(graph, parts)  # every step's indices are in the base model's numbering
    return model


def _replay_compact(model: nn.Module, plan: Mapping[str, Any]) -> nn.Module:
    if plan["steps"]:
        raise CheckpointError("plan both removes channels and compacts masks; a compact "
                              "network is made from the masked base architecture only")
    try:
        return compact_structure(model, plan["compact"]["removed_filters"])[0]
    except (ConfigError, UnsupportedModelError) as exc:
        raise CheckpointError(f"the compaction in the plan does not fit the base model "
                              f"({exc}); use the base architecture it was made from") from None


def _example_for(plan: Mapping[str, Any]) -> torch.Tensor:
    shape = plan.get("input_size")
    if not shape:
        raise CheckpointError("plan has no input_size; pass example_inputs to load_pruned")
    return torch.randn(1, *shape)


def save_pruned(directory: str | os.PathLike, result: PruneResult, *,
                model_name: str | None = None, input_size: Sequence[int] | None = None,
                extra: Mapping[str, Any] | None = None) -> Path:
    """Write a pruned model as ``model.safetensors`` + ``plan.json`` into ``directory``.

    Args:
        directory: created if missing.
        result: from :func:`prune`.
        model_name: zoo name of the base architecture, or None for a user model.
        input_size: ``(C, H, W)`` of one input, so loading can trace without arguments.
        extra: more plain data to store in ``plan.json`` (e.g. dataset, normalisation).
    """
    directory = Path(directory)  # created by the first write (a run directory records it first)
    save_weights(result.model, directory / MODEL)
    doc = dict(result.plan)
    doc.update(
        model=model_name or "user model (pass the same base model to load_pruned)",
        zoo_model=model_name, input_size=list(input_size) if input_size else None,
        macs_before=result.macs_before, macs_after=result.macs_after,
        params_before=result.params_before, params_after=result.params_after,
        cdprune_version=__version__, extra=dict(extra or {}))
    atomic_write_text(directory / PLAN, json.dumps(doc, indent=1) + "\n")
    return directory


def save_compact(directory: str | os.PathLike, model: nn.Module,
                 removed_filters: Mapping[str, Sequence[int]], info: CompactInfo, *,
                 model_name: str | None = None, input_size: Sequence[int] | None = None,
                 extra: Mapping[str, Any] | None = None) -> Path:
    """Write a compact network as ``model.safetensors`` + ``plan.json`` into ``directory``.

    The plan records the masks (``compact.removed_filters``) and what compaction reported;
    :func:`load_pruned` rebuilds the network by compacting a fresh base model with the
    same masks, then loads the weights.

    Args:
        directory: created if missing.
        model: the compact network from :func:`cdprune.compact` (after recalibration or
            fine-tuning if they ran).
        removed_filters: the masks it was compacted with.
        info: what :func:`cdprune.compact` returned with it.
        model_name: zoo name of the base architecture, or None for a user model.
        input_size: ``(C, H, W)`` of one input.
        extra: more plain data to store in ``plan.json`` (dataset, normalisation, ...).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model, directory / MODEL)
    masks = {str(k): sorted(int(i) for i in v) for k, v in removed_filters.items() if v}
    doc = {"format": PLAN_FORMAT, "steps": [], "kept": {},
           "compact": {"removed_filters": masks, **info.to_dict()},
           "model": model_name or "user model (pass the same base model to load_pruned)",
           "zoo_model": model_name, "input_size": list(input_size) if input_size else None,
           "macs_before": info.macs_masked, "macs_after": info.macs,
           "params_before": info.params_masked, "params_after": info.params,
           "cdprune_version": __version__, "extra": dict(extra or {})}
    atomic_write_text(directory / PLAN, json.dumps(doc, indent=1) + "\n")
    return directory


def read_plan(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and minimally check ``plan.json`` of a pruned-model directory."""
    path = Path(directory) / PLAN
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist; point to a directory written by "
                                "`cdprune prune` or save_pruned()")
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"'{path}' is not valid JSON ({exc}); the file is corrupt, "
                              "prune again") from None
    except RecursionError:
        raise CheckpointError(f"'{path}' is nested too deeply to be a plan; the file is "
                              "corrupt, prune again") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT \
            or not isinstance(plan.get("steps"), list):
        raise CheckpointError(f"'{path}' is not a cdprune plan (format {PLAN_FORMAT!r})")
    problem = _plan_problem(plan)
    if problem:
        raise CheckpointError(f"'{path}' is malformed ({problem}); the file is corrupt, "
                              "prune again")
    return plan


def _plan_problem(plan: Mapping[str, Any]) -> str | None:
    """What is wrong with the fields of a plan, field by field; ``None`` if nothing."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for i, step in enumerate(plan["steps"]):
        if not isinstance(step, dict):
            return f"step {i} is a {type(step).__name__}, not a mapping"
        # A step is one layer's removal, or {"parts": [...]}: one removal spread over the
        # layers a concatenation joined (each part in its own layer's numbering).
        records = step["parts"] if "parts" in step else [step]
        if not isinstance(records, list) or not records:
            return f"step {i} must list its parts"
        for record in records:
            if not isinstance(record, dict):
                return f"step {i} has a part that is a {type(record).__name__}, not a mapping"
            if not isinstance(record.get("module"), str) or not record["module"]:
                return f"step {i} names no module"
            idxs = record.get("idxs")
            if not isinstance(idxs, list) or not idxs or not all(is_int(x) and x >= 0
                                                                  for x in idxs):
                return f"step {i} ('{record['module']}') must list channel indices"
    packed = plan.get("compact")
    if packed is not None:
        masks = packed.get("removed_filters") if isinstance(packed, dict) else None
        if not isinstance(masks, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and all(is_int(x) and x >= 0
                                                                   for x in v)
                for k, v in masks.items()):
            return "compact.removed_filters must map conv names to filter indices"
    size = plan.get("input_size")
    if size is not None and (not isinstance(size, list) or not 1 <= len(size) <= 4
                             or not all(is_int(x) and 0 < x <= 65536 for x in size)):
        return f"input_size must be a list of positive sizes such as [3, 32, 32], got {size!r}"
    if not isinstance(plan.get("extra", {}), dict):
        return f"extra must be a mapping, got a {type(plan['extra']).__name__}"
    extra = plan.get("extra") or {}
    classes = extra.get("num_classes")
    if classes is not None and not (is_int(classes) and 0 < classes <= MAX_CLASSES):
        return (f"extra.num_classes must be a positive integer, got {classes!r} (at most "
                f"{MAX_CLASSES})")
    channels = size[0] if isinstance(size, list) and size else None
    problem = normalisation_problem(extra.get("mean"), extra.get("std"), channels,
                                    where="extra.")
    if problem:
        return problem
    for key in ("macs_before", "macs_after", "params_before", "params_after"):
        if plan.get(key) is not None and not (is_int(plan[key]) and plan[key] >= 0):
            return f"{key} must be a count, got {plan[key]!r}"
    for key in ("zoo_model", "model"):
        if plan.get(key) is not None and not isinstance(plan[key], str):
            return f"{key} must be a name, got a {type(plan[key]).__name__}"
    return None


def load_pruned(directory: str | os.PathLike, base_model: nn.Module, *,
                example_inputs: Any = None) -> nn.Module:
    """Rebuild a pruned model: replay ``plan.json`` on a fresh base model, load its weights.

    Args:
        directory: written by :func:`save_pruned`.
        base_model: an unpruned model of the same architecture (its weights are replaced).
        example_inputs: a batch for tracing; defaults to one of the stored input size.

    Raises:
        FileNotFoundError: missing directory or files.
        CheckpointError: corrupt plan, a plan for another architecture, or weights that do
            not fit the rebuilt model.
    """
    plan = read_plan(directory)
    example = example_inputs
    if example is None and plan.get("compact") is None:  # only a channel plan traces
        example = _example_for(plan)
    try:
        model = _replay(base_model, plan, example)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"plan in '{directory}' does not fit the base model "
                              f"({type(exc).__name__}: {exc}); use the base architecture it "
                              "was made from") from None
    _check_macs(model, plan, directory)
    return load_weights(model, Path(directory) / MODEL)


def _check_macs(model: nn.Module, plan: Mapping[str, Any], directory: Any) -> None:
    """The rebuilt model must have the MACs the plan recorded, at the recorded input size.

    Both were measured on one sample when the model was pruned; an ``input_size`` edited
    since (which export and evaluation would then trust) gives other MACs and is refused.
    """
    recorded, size = plan.get("macs_after"), plan.get("input_size")
    if not isinstance(recorded, int) or not size:
        return
    try:
        found = count_macs(model, input_size=size)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"the model of '{directory}' does not run at its recorded "
                              f"input_size {size} ({str(exc).splitlines()[0][:200]}); "
                              "plan.json was changed: prune again") from None
    if found != recorded:
        raise CheckpointError(f"the model of '{directory}' has {found} MACs at its recorded "
                              f"input_size {size}, but plan.json records {recorded} (measured "
                              "when it was pruned): input_size or the steps were changed since; "
                              "prune again, or restore plan.json")
