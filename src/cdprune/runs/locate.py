"""The final model of a run: the pruned architecture with its fine-tuned weights.

A run directory holds the pruned model (``pruned/plan.json`` + ``pruned/model.safetensors``)
and, once fine-tuning ran, ``best.pth`` and ``last.pth`` (in the run directory itself for
``cdprune run``, in ``finetune/`` for the demo, in the output directory of ``cdprune
finetune``). What a user deploys is the fine-tuned model, so that is what this module finds
by default: the last epoch's weights, whose test accuracy is the run's headline. The best
epoch (chosen on the test set unless ``--val-split`` held images out) and the pruned-only
weights stay one option away.

Three kinds of directory are accepted:

* a pruned-model directory (``plan.json``): its own weights, nothing else;
* a run directory (``pruned/plan.json``): the fine-tuned weights when fine-tuning ran;
* a fine-tune directory (``best.pth``/``last.pth`` without a plan): the pruned model it
  started from is found through its ``config.yaml`` (``model_dir``) or a sibling ``pruned/``.

:func:`find_run_model` is the one answer to "where is the model" for the whole package;
:func:`load_run_model` loads it from Python (the public API). The commands load it through
:mod:`cdprune.runs.modeldir`, which adds the checks and overrides of a run configuration
(``--model``, ``--dataset``, ``--checkpoint``) on top of :func:`find_run_model`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import apply_weights, safe_torch_load
from ..errors import CheckpointError, ConfigError, MissingFileError
from .files import BEST, CONFIG, DEMO_FINETUNE, LAST, MODEL, PLAN, PRUNED

__all__ = ["WEIGHTS", "RunModel", "find_run_model", "load_run_model"]

logger = logging.getLogger(__name__)

WEIGHTS = ("final", "best", "last", "pruned")


@dataclass(frozen=True)
class RunModel:
    """Where a run's model lives.

    Attributes:
        pruned_dir: the pruned-model directory (``plan.json`` and ``model.safetensors``).
        weights: the file whose weights the model gets: ``best.pth``/``last.pth`` of the
            fine-tuning, or the pruned model's ``model.safetensors``.
        kind: ``"best"``, ``"last"`` or ``"pruned"``.
    """

    pruned_dir: Path
    weights: Path
    kind: str

    @property
    def finetuned(self) -> bool:
        return self.kind != "pruned"


def _origin_of_finetune(folder: Path) -> Path | None:
    """The pruned-model directory a fine-tune directory started from, if it can be found."""
    import yaml

    config = folder / CONFIG
    if config.is_file():
        try:
            recorded = (yaml.safe_load(config.read_text()) or {}).get("model_dir")
        except yaml.YAMLError:
            recorded = None
        if recorded:
            for candidate in (Path(recorded), folder.parent / recorded):
                for d in (candidate, candidate / PRUNED):
                    if (d / PLAN).is_file():
                        return d
    sibling = folder.parent / PRUNED  # the demo's layout: run/pruned and run/finetune
    return sibling if (sibling / PLAN).is_file() else None


def find_run_model(path: str | os.PathLike, weights: str = "final") -> RunModel:
    """Find the pruned architecture and the weights to load for ``path``.

    Args:
        path: a run, pruned-model or fine-tune directory.
        weights: ``"final"`` (the last epoch, ``last.pth``, when fine-tuning ran: the
            weights the headline accuracy belongs to; else the pruned weights), ``"best"``
            (the best epoch, chosen on the validation images: the test set itself unless
            ``--val-split`` held images out), ``"last"`` or ``"pruned"``.

    Raises:
        ConfigError: unknown ``weights``, or ``best``/``last`` asked for where no
            fine-tuning ran.
        MissingFileError: ``path`` holds none of the three kinds of directory (a
            ``FileNotFoundError``).
    """
    if weights not in WEIGHTS:
        raise ConfigError(f"{{weights}} {weights!r} is not valid; use one of {', '.join(WEIGHTS)}")
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"model directory '{path}' does not exist; point {{model_dir}} "
                               "at a run directory or a pruned-model directory")
    if (path / PLAN).is_file():
        pruned, tuned = path, []  # an explicit pruned-model directory means those weights
    elif (path / PRUNED / PLAN).is_file():
        pruned, tuned = path / PRUNED, [path, path / DEMO_FINETUNE]
    elif (path / BEST).is_file() or (path / LAST).is_file():
        origin = _origin_of_finetune(path)
        if origin is None:
            weights = path / LAST if (path / LAST).is_file() else path / BEST
            raise MissingFileError(
                f"'{path}' holds fine-tuned weights but the pruned model they came from "
                "cannot be found (no model_dir in its config.yaml, no sibling pruned/); pass "
                "the pruned-model directory they were trained from: {model_dir} PRUNED_DIR "
                f"{{checkpoint}} {weights}")
        pruned, tuned = origin, [path]
    else:
        raise MissingFileError(
            f"'{path}' holds no model: expected plan.json (a pruned-model directory), "
            f"pruned/plan.json (a run directory) or {BEST}/{LAST} (a fine-tune directory); "
            "point {model_dir} at a directory written by cdprune prune, run or finetune")
    folder = next((d for d in tuned if (d / BEST).is_file() or (d / LAST).is_file()), None)
    if weights == "pruned" or (weights == "final" and folder is None):
        return RunModel(pruned, pruned / MODEL, "pruned")
    if weights == "final":  # the last epoch: the weights behind the headline accuracy
        kind = "last" if (folder / LAST).is_file() else "best"
    else:
        kind = weights
    file = folder / (BEST if kind == "best" else LAST) if folder else None
    if file is None or not file.is_file():
        where = folder or path
        raise ConfigError(f"{{weights}} {weights}: '{where}' has no {kind}.pth (fine-tuning did "
                          "not run there); use {weights} pruned, or fine-tune first")
    return RunModel(pruned, file, kind)


def read_finetuned(found: RunModel, plan: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of a fine-tuning checkpoint, checked to come from ``plan``."""
    obj = safe_torch_load(found.weights)
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(f"'{found.weights}' is not a cdprune fine-tuning checkpoint "
                              "(no 'model' entry); fine-tune again")
    extra = obj.get("extra")
    origin = extra.get("plan") if isinstance(extra, dict) else None
    origin = origin if isinstance(origin, dict) else {}
    made_from = origin.get("steps")
    if (made_from is not None and (made_from != plan.get("steps")
                                   or _masks(origin) != _masks(plan))) \
            or origin.get("masked") != plan.get("masked"):
        raise CheckpointError(f"'{found.weights}' was fine-tuned from another pruned model "
                              f"than '{found.pruned_dir}'; point {{model_dir}} at the run that "
                              "wrote it")
    return obj["model"]


def _masks(plan: dict[str, Any]) -> Any:
    """The masks a compact network was made from (None for a channel plan)."""
    packed = plan.get("compact")
    return packed.get("removed_filters") if isinstance(packed, dict) else None


def load_run_model(path: str | os.PathLike, weights: str = "final", *,
                   base_model: nn.Module | None = None) -> nn.Module:
    """The model of a run directory, ready to evaluate or export.

    Args:
        path: a run, pruned-model or fine-tune directory (see :func:`find_run_model`).
        weights: ``"final"`` (default: the last fine-tuned epoch when fine-tuning ran),
            ``"best"``, ``"last"`` or ``"pruned"``.
        base_model: an unpruned model of the base architecture; built from the zoo name in
            ``plan.json`` when left out.

    Raises:
        ConfigError: see :func:`find_run_model`; a user model without ``base_model``.
        FileNotFoundError: no model under ``path``.
        CheckpointError: plan or weights do not fit.
    """
    from ..models import create_model
    from ..pruning import load_pruned, read_plan

    found = find_run_model(path, weights)
    plan = read_plan(found.pruned_dir)
    if base_model is None:
        if not plan.get("zoo_model"):
            raise ConfigError(f"'{found.pruned_dir}' holds a user model; pass base_model=")
        base_model = create_model(plan["zoo_model"],
                                  num_classes=(plan.get("extra") or {}).get("num_classes"))
    model = load_pruned(found.pruned_dir, base_model)
    if found.finetuned:
        apply_weights(model, read_finetuned(found, plan), source=found.weights)
    logger.info("model of %s: %s weights from %s", path, found.kind, found.weights)
    return model.eval()
