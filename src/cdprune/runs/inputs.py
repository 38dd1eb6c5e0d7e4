"""What a run starts from: the device, the model and the data a config names.

The stages of :mod:`cdprune.runs.pipeline` call these; each refuses a bad value with an error
that names it (a classifier of the wrong width, an unknown layer, a dataset the model does
not fit) before anything is written.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import apply_weights, read_state_dict
from ..errors import CheckpointError, ConfigError, DataError
from ..importance.config import StatsConfig
from ..suggest import did_you_mean
from .config import check_coe, check_input_channels, check_round_to

__all__ = ["Data", "build_data", "build_inputs", "build_model", "check_base_accuracy",
           "check_ignore_layers", "dataset_classes", "known_normalisation"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- building blocks
def resolve_device(config: Mapping[str, Any]) -> torch.device:
    """The torch device a run uses: ``config["device"]``, else the local GPU, else CPU."""
    default = "cpu"
    if torch.cuda.is_available():
        default = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"  # torchrun: one GPU per rank
    name = config.get("device") or default
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{{device}} {name!r} is not a valid device; use cpu, cuda or cuda:N"
                          ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{{device}} {name} asked for, but CUDA is not available; use "
                          "{device} cpu")
    return device


def build_model(config: Mapping[str, Any], num_classes: int | None = None) -> nn.Module:
    """The base model named in the config, with its checkpoint loaded when one is given.

    Raises:
        DataError: the checkpoint's classifier has another number of outputs than the
            dataset has classes (``num_classes``).
    """
    from ..models import create_model

    model = create_model(config["model"], num_classes=num_classes)
    check_coe(config, model)
    if config.get("dataset"):
        check_input_channels(config, model)
    if config.get("checkpoint"):
        state = read_state_dict(config["checkpoint"])
        if num_classes is not None:
            _check_classifier(model, state, config, num_classes)
        try:
            apply_weights(model, state, source=config["checkpoint"])
        except CheckpointError as exc:
            from ..models.known import known_checkpoint

            known = known_checkpoint(config["checkpoint"])
            if known is None or known.model == str(config["model"]).lower():
                raise
            raise CheckpointError(f"{exc}; '{config['checkpoint']}' is {known.name}, the "
                                  f"weights of {known.model}: pass {{model}} {known.model}"
                                  ) from None
    return model


def dataset_classes(config: Mapping[str, Any]) -> int | None:
    """The number of classes of the config's dataset, without reading any image.

    A named dataset's own count; for ``--dataset folder`` the class folders under
    ``DATA_ROOT/val`` (``None`` when there are none to count: building the data says why).
    """
    from ..data import dataset_info

    name = str(config.get("dataset") or "")
    if name.lower() == "folder":
        return _count_class_folders(config) or None
    try:
        return int(dataset_info(name)[0])
    except (KeyError, ValueError, TypeError):
        return None  # an unknown dataset is refused where the data are built


def _count_class_folders(config: Mapping[str, Any]) -> int:
    root = Path(str(config.get("data_root") or "")) / "val"
    try:
        return sum(1 for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return 0


def build_inputs(config: Mapping[str, Any], **data_options: Any) -> tuple[Data, nn.Module]:
    """The data and the base model of a run, the model first.

    Building the model checks its name, the checkpoint and the checkpoint's fit to the
    model and to the dataset's classes in a second; the data (CIFAR's 50,000 training
    images, an ImageNet folder) are read only after these checks passed.
    ``data_options`` go to :func:`build_data`.
    """
    classes = dataset_classes(config)
    model = build_model(config, classes) if classes is not None else None
    data = build_data(config, **data_options)
    if model is None or classes != data.num_classes:
        model = build_model(config, data.num_classes)
    return data, model


def _check_classifier(model: nn.Module, state: Mapping[str, torch.Tensor],
                      config: Mapping[str, Any], num_classes: int) -> None:
    """A checkpoint trained for N classes cannot serve a dataset of M != N classes."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1][1].out_features != num_classes:
        return  # no recognisable classifier: the key/shape check of apply_weights decides
    key = f"{linears[-1][0]}.weight"
    rows = state[key].shape[0] if key in state and state[key].dim() == 2 else num_classes
    if rows != num_classes:
        dataset = config.get("dataset")
        hint = ""
        folders = _count_class_folders(config) if str(dataset).lower() == "imagenet" else 0
        if folders == rows:
            hint = f"; for class folders with {rows} classes use --dataset folder"
        elif folders:
            hint = (f"; the class folders under '{config.get('data_root')}/val' hold {folders} "
                    f"classes, so --dataset folder would not fit this {rows}-class checkpoint "
                    "either")
        raise DataError(f"checkpoint '{config['checkpoint']}' has a {rows}-class classifier "
                        f"('{key}' has {rows} outputs) but dataset '{dataset}' has "
                        f"{num_classes} classes; use a checkpoint trained on {dataset}, or the "
                        f"{{dataset}} the checkpoint was trained on{hint}")


def check_ignore_layers(config: Mapping[str, Any], model: nn.Module) -> None:
    """Refuse ``--ignore-layers`` names that are not modules of the model (before any work).

    Also refuses a ``--round-to`` no layer is wide enough for (see
    :func:`cdprune.runs.config.check_round_to`).
    """
    check_round_to(config, model)
    named = [name for name, _ in model.named_modules() if name]
    for name in config.get("ignore_layers") or ():
        if name not in named:
            hint = (did_you_mean(name, named)
                    or f"module names look like {', '.join(named[:3])}")
            raise ConfigError(f"{{ignore_layers}}: '{name}' is not a layer of "
                              f"{config.get('model')}; {hint}")


@dataclass
class Data:
    """Datasets and loaders of one run."""

    num_classes: int
    input_size: tuple[int, ...]
    train: Any
    val: Any
    stats: Any
    recal: Any = None  # un-augmented training images for BatchNorm recalibration
    classes: list[str] | None = None  # class names, for --dataset folder
    mean: tuple[float, ...] | None = None  # input normalisation in use
    std: tuple[float, ...] | None = None
    select: Any = None  # held-out training images for model selection (--val-split)


def build_data(config: Mapping[str, Any], *, need_train: bool = True,
               need_stats: bool = True) -> Data:
    """Datasets for statistics, fine-tuning and evaluation, as the config describes."""
    from ..data import build_dataset, build_loader, check_num_classes, dataset_info, subset

    name = config["dataset"]
    num_classes, input_size, mean, std = dataset_info(name)
    known = known_normalisation(config)
    mean = tuple(config.get("mean") or (known or {}).get("mean") or mean)
    std = tuple(config.get("std") or (known or {}).get("std") or std)
    common: dict[str, Any] = dict(mean=mean, std=std, download=bool(config.get("download")))
    folder = str(name).lower() == "folder"
    if folder:  # any class folders, at the model's input size
        input_size = tuple(config.get("input_size") or _model_input_size(config))
        common["image_size"] = input_size
    root = config.get("data_root")
    workers = int(config.get("workers") or 0)
    seed = int(config.get("seed") or 0)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()

    val_set = build_dataset(name, root, train=False, **common)
    classes = list(getattr(val_set, "classes", []) or []) or None
    if folder:
        num_classes = len(classes or [])
    check_num_classes(val_set, num_classes)
    if config.get("val_subset") and config["val_subset"] < len(val_set):
        val_set = subset(val_set, config["val_subset"], seed)
    val = build_loader(val_set, config.get("eval_batch_size") or config["batch_size"],
                       shuffle=False, workers=workers, seed=seed, distributed=distributed)
    train = stats = select = None
    if need_train:
        train_set = build_dataset(name, root, train=True, cutout=bool(config.get("cutout")),
                                  **common)
        check_num_classes(train_set, num_classes)
        if folder and list(train_set.classes) != classes:
            raise DataError(f"the train and val folders of '{root}' hold different classes "
                            f"({len(train_set.classes)} vs {len(classes or [])}); give both "
                            "the same class folders")
        if config.get("val_split"):
            train_set, select = _hold_out(config, train_set, name, root, common, workers,
                                          seed, distributed)
        elif config.get("train_subset"):
            train_set = subset(train_set, min(len(train_set), config["train_subset"]), seed)
        # A last batch of one image cannot train BatchNorm on 1x1 feature maps: drop it.
        single = len(train_set) > config["batch_size"] and \
            len(train_set) % config["batch_size"] == 1
        train = build_loader(train_set, config["batch_size"], shuffle=True, workers=workers,
                             seed=seed, drop_last=single, distributed=distributed)
    if need_stats:
        # Statistics read a seeded random sample of the training images (or the first ones,
        # --stats-sample first), un-augmented unless --stats-augment.
        stats_set = build_dataset(name, root, train=True,
                                  augment=bool(config.get("stats_augment")), **common)
        batch = config.get("stats_batch_size") or config["batch_size"]
        stop = config.get("stop_batch")
        if stop and stop * batch > len(stats_set):
            logger.warning("--stop-batch %d asks for %d batches of %d images, but the training "
                           "set has only %d images (%d batches); using all of them", stop, stop,
                           batch, len(stats_set), math.ceil(len(stats_set) / batch))
        elif stop and config.get("stats_sample") == "first":
            stats_set = torch.utils.data.Subset(stats_set, range(stop * batch))
        elif stop:
            stats_set = subset(stats_set, stop * batch, seed)
        else:
            stats_set = _default_sample(config, stats_set, seed)
        stats = build_loader(stats_set, batch, shuffle=False, workers=workers, seed=seed,
                             distributed=distributed)
    recal = None
    if need_train and config.get("bn_recalibrate"):
        plain = build_dataset(name, root, train=True, augment=False, **common)
        count = min(len(plain), int(config["bn_recalibrate"]))
        recal = build_loader(subset(plain, count, seed + 1),
                             config.get("stats_batch_size") or config["batch_size"],
                             shuffle=True, workers=workers, seed=seed + 1)
    return Data(num_classes, tuple(input_size), train, val, stats, recal, classes, mean, std,
                select)


def _default_sample(config: Mapping[str, Any], stats_set: Any, seed: int) -> Any:
    """The seeded sample of ``--stats-images`` training images read without ``--stop-batch``."""
    from ..data import subset

    images = StatsConfig.from_config(config).stats_images
    if images >= len(stats_set):
        logger.info("statistics read all %d training images (--stats-images %d)",
                    len(stats_set), images)
        return stats_set
    logger.info("statistics read a seeded sample of %d of the %d training images "
                "(--stats-images; --stop-batch N reads N batches instead)", images,
                len(stats_set))
    return subset(stats_set, images, seed)


def _model_input_size(config: Mapping[str, Any]) -> tuple[int, ...]:
    from ..models import model_spec

    if not config.get("model"):
        raise ConfigError("{dataset} folder needs {model} (its input size sets the image "
                          "size) or {model_dir}")
    return tuple(model_spec(config["model"]).input_size)


def known_normalisation(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """Mean and std of a recognised public ``--checkpoint`` (see ``cdprune.models.known``).

    Used when the config gives no ``--mean``/``--std`` and the checkpoint was trained on the
    config's dataset; ``None`` otherwise.
    """
    from ..models.known import known_checkpoint

    if not config.get("checkpoint") or (config.get("mean") and config.get("std")):
        return None
    known = known_checkpoint(config["checkpoint"])
    if known is None or str(config.get("dataset")).lower() != known.dataset:
        return None
    logger.info("checkpoint '%s' is %s: normalising inputs with its mean %s and std %s",
                config["checkpoint"], known.name, known.mean, known.std)
    return {"mean": known.mean, "std": known.std}


def check_base_accuracy(config: Mapping[str, Any], top1: float, images: int) -> str | None:
    """Warn when a recognised checkpoint scores far below its known accuracy.

    "Far" is more than 1 point and three standard errors of ``images`` test images; the
    usual cause is another input normalisation than the checkpoint's. Returns the warning.
    """
    from ..models.known import known_checkpoint

    known = known_checkpoint(config["checkpoint"]) if config.get("checkpoint") else None
    if known is None or str(config.get("dataset")).lower() != known.dataset or images <= 0:
        return None
    p = known.top1 / 100
    margin = max(1.0, 300 * math.sqrt(p * (1 - p) / images))
    if top1 >= known.top1 - margin:
        return None
    nums = " ".join(f"{v:g}" for v in known.mean), " ".join(f"{v:g}" for v in known.std)
    message = (f"base model top-1 {top1:.2f}% is far below the {known.top1:.2f}% known for "
               f"checkpoint '{config['checkpoint']}' ({known.name}); it expects inputs "
               f"normalised with --mean {nums[0]} --std {nums[1]}")
    logger.warning("%s", message)
    return message



def _hold_out(config: Mapping[str, Any], train_set: Any, name: str, root: Any,
              common: Mapping[str, Any], workers: int, seed: int, distributed: bool
              ) -> tuple[Any, Any]:
    """Split ``--val-split`` training images off for model selection (never the test set).

    The held-out images are read without augmentation; ``--train-subset`` then samples
    from the rest. The split depends on the seed only.
    """
    from ..data import Subset, build_dataset, build_loader

    total, held = len(train_set), int(config["val_split"])
    if not 0 < held < total:
        raise ConfigError(f"{{val_split}} {held} must hold out between 1 and {total - 1} of "
                          f"the {total} training images")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    held_idx, rest = order[:held].sort().values, order[held:]
    if config.get("train_subset"):
        rest = rest[:min(len(rest), int(config["train_subset"]))]
    plain = build_dataset(name, root, train=True, augment=False, **common)
    select = build_loader(Subset(plain, held_idx.tolist()),
                          config.get("eval_batch_size") or config["batch_size"],
                          shuffle=False, workers=workers, seed=seed, distributed=distributed)
    return Subset(train_set, rest.sort().values.tolist()), select


