"""Loading a run's model as the commands do: from a run configuration (``--model-dir``).

Where the model is (which pruned-model directory, which weights) is answered by one
function, :func:`cdprune.runs.locate.find_run_model`; this module only builds the model the
way a command's configuration asks for it: it checks ``--model`` against the plan and the
pruned model against ``--dataset`` (classes, image channels), builds the base model from
the configuration, loads ``--checkpoint`` into the pruned architecture when given, and fills
the input size and normalisation the run recorded. From Python, without a configuration,
use :func:`cdprune.runs.locate.load_run_model` (``cdprune.load_run_model``) instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint import apply_weights, read_state_dict
from ..errors import CheckpointError, ConfigError, DataError
from .inputs import build_model

__all__ = ["check_model_dir", "load_model_dir", "load_pruned_dir", "model_dir_defaults"]

logger = logging.getLogger(__name__)


def model_dir_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """Fill what the pruned model of ``--model-dir`` recorded: input size, mean and std.

    The values the user gave win; the run's own normalisation is the right default for
    evaluating, fine-tuning or exporting its model.
    """
    from ..pruning import read_plan
    from .locate import find_run_model

    out = dict(config)
    if not config.get("model_dir"):
        return out
    plan = read_plan(find_run_model(config["model_dir"], "pruned").pruned_dir)
    extra = plan.get("extra") or {}
    if plan.get("input_size"):
        out.setdefault("input_size", list(plan["input_size"]))
    same_data = str(extra.get("dataset") or "").lower() == str(config.get("dataset")).lower()
    if same_data and not config.get("mean") and not config.get("std") and extra.get("mean") \
            and extra.get("std"):
        out["mean"], out["std"] = list(extra["mean"]), list(extra["std"])
    return out



def check_model_dir(path: str | os.PathLike, config: Mapping[str, Any]) -> None:
    """Check that the pruned model of ``path`` fits the config's dataset (its images'
    channels, its classes) from ``plan.json`` alone, before any data is read.

    Raises:
        DataError: it does not fit, with the ``--dataset`` it was made for.
        FileNotFoundError, CheckpointError: ``path`` holds no readable pruned model.
    """
    from ..pruning import read_plan
    from .inputs import dataset_classes
    from .locate import find_run_model

    directory = find_run_model(path, config.get("weights") or "pruned").pruned_dir
    _check_fit(directory, read_plan(directory), config, dataset_classes(config))


def _check_fit(directory: Path, plan: Mapping[str, Any], config: Mapping[str, Any],
               num_classes: int | None) -> None:
    """Refuse a dataset with other classes or other image channels than the pruned model
    was made for (before a forward pass fails deep inside PyTorch)."""
    from ..data import dataset_info

    planned = (plan.get("extra") or {}).get("num_classes")
    if num_classes is not None and isinstance(planned, int) and planned != num_classes:
        dataset = (plan.get("extra") or {}).get("dataset") or "its own dataset"
        raise DataError(f"the pruned model in '{directory}' has {planned} classes but dataset "
                        f"'{config.get('dataset')}' has {num_classes}; use it with "
                        f"{{dataset}} {dataset}")

    size = plan.get("input_size")
    if not config.get("dataset") or not isinstance(size, list) or not size:
        return
    try:
        channels = int(dataset_info(config["dataset"])[1][0])
    except (KeyError, ValueError, TypeError):
        return  # an unknown dataset is refused where it is built; folders take any model
    if str(config["dataset"]).lower() == "folder" or size[0] == channels:
        return
    used = (plan.get("extra") or {}).get("dataset")
    hint = f"use it with --dataset {used}" if used else "use it with a dataset of such images"
    raise DataError(f"the pruned model in '{directory}' reads {size[0]}-channel images but "
                    f"dataset '{config['dataset']}' has {channels}-channel images; {hint}")


def load_pruned_dir(path: str | os.PathLike, config: Mapping[str, Any],
                    num_classes: int | None, weights: str | None = None
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the pruned model saved under ``path`` (a run or pruned-model directory).

    ``weights`` (default ``config["weights"]``, else ``"pruned"``) picks the fine-tuned or
    pruned-only weights (see :func:`cdprune.runs.locate.find_run_model`); ``--checkpoint`` in
    the config, when given, is loaded into the pruned architecture instead.

    Raises:
        ConfigError: ``--model`` names another architecture than the plan was made for.
        DataError: the pruned model has another number of classes than the dataset.
        CheckpointError: the plan or the weights do not fit the base model.
    """
    model, plan, _ = load_model_dir(path, config, num_classes, weights)
    return model, plan


def load_model_dir(path: str | os.PathLike, config: Mapping[str, Any],
                   num_classes: int | None, weights: str | None = None
                   ) -> tuple[nn.Module, dict[str, Any], Any]:
    """:func:`load_pruned_dir`, also returning the :class:`~cdprune.runs.locate.RunModel` used."""
    from ..pruning import load_pruned, read_plan
    from .locate import find_run_model, read_finetuned

    found = find_run_model(path, weights or config.get("weights") or "pruned")
    directory = found.pruned_dir
    plan = read_plan(directory)
    zoo = plan.get("zoo_model")
    asked = config.get("model")
    if asked and zoo and str(asked).lower() != str(zoo).lower():
        raise ConfigError(f"{{model}} {asked} does not match the model '{directory}' was pruned "
                          f"from ({zoo}); leave out {{model}} or pass {{model}} {zoo}")
    name = asked or zoo
    if not name:
        raise ConfigError(f"'{directory}' holds a user model; pass {{model}} with a zoo name, "
                          "or load it from Python with cdprune.load_pruned")
    _check_fit(directory, plan, config, num_classes)
    planned = (plan.get("extra") or {}).get("num_classes")
    if num_classes is None and isinstance(planned, int):
        num_classes = planned
    base = build_model({**config, "model": name, "checkpoint": None, "dataset": None}, num_classes)
    try:
        model = load_pruned(directory, base)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (pruned model '{directory}'); prune {name} again with "
                              "`cdprune prune`, or point {model_dir} at a directory pruned "
                              f"from {name}") from None
    if config.get("checkpoint"):  # honoured, never ignored: weights of the pruned model
        from .locate import RunModel

        source = config["checkpoint"]
        try:
            apply_weights(model, read_state_dict(source), source=source)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}. With {{model_dir}}, {{checkpoint}} must hold weights of "
                                  f"the pruned model (e.g. a fine-tuned best.pth), not of the "
                                  "unpruned base model; leave out {checkpoint} to use the "
                                  "run's own weights") from None
        found = RunModel(directory, Path(source), "checkpoint")
    elif found.finetuned:
        apply_weights(model, read_finetuned(found, plan), source=found.weights)
    logger.info("loaded the %s weights of the pruned model from %s", found.kind, found.weights)
    return model, plan, found


