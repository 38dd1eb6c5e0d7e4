"""Named datasets: their defaults (classes, input size, statistics) and their builder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .cifar import CIFAR10, CIFAR100
from .folders import ImageFolder, class_folders
from .toy import Digits, SyntheticImages
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DIGITS_MEAN,
    DIGITS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    Transform,
    cifar_transforms,
    imagenet_transforms,
)

DATASETS = ("cifar10", "cifar100", "imagenet", "digits", "synthetic", "folder")


class DatasetInfo(NamedTuple):
    """Defaults of a named dataset: classes, model input size and channel statistics."""

    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


_INFO = {
    "cifar10": DatasetInfo(10, (3, 32, 32), CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": DatasetInfo(100, (3, 32, 32), CIFAR100_MEAN, CIFAR100_STD),
    "imagenet": DatasetInfo(1000, (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD),
    # Any class-folder dataset: classes come from the folders, the image size from the
    # model (num_classes 0 means "as many as there are folders").
    "folder": DatasetInfo(0, (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD),
    "digits": DatasetInfo(10, (1, 8, 8), DIGITS_MEAN, DIGITS_STD),
    "synthetic": DatasetInfo(10, (3, 16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def _canonical(name: str) -> str:
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in _INFO:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """``(num_classes, input_size, mean, std)`` defaults of a named dataset."""
    return _INFO[_canonical(name)]


def build_dataset(name: str, root: str | os.PathLike | None = None, train: bool = True, *,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  cutout: bool = False, download: bool = False, augment: bool | None = None,
                  **kwargs: Any) -> Dataset:
    """Build a named dataset with its standard transforms.

    Args:
        name: one of ``cifar10``, ``cifar100``, ``imagenet``, ``folder``, ``digits``,
            ``synthetic``.
        root: data folder (CIFAR: the folder holding the batches folder, or that folder;
            ImageNet and folder: the folder holding ``train/`` and ``val/`` class
            folders). Unused by
            ``digits`` and ``synthetic``.
        train: training split, else the test/validation split.
        mean: normalisation mean; ``None`` uses :func:`dataset_info`'s default.
        std: normalisation std; ``None`` uses the default.
        cutout: add Cutout to CIFAR training augmentation.
        download: fetch the official CIFAR archive if files are missing.
        augment: training augmentation; ``None`` means on for CIFAR/ImageNet training and
            off otherwise. Statistics collection passes ``False``.
        **kwargs: passed to the dataset class (e.g. ``verify_sizes`` for CIFAR; ``num_samples``,
            ``num_classes``, ``image_size``, ``seed`` for synthetic; ``seed``,
            ``test_fraction`` for digits; ``image_size`` ``(C, H, W)`` for folder).
    """
    key = _canonical(name)
    info = _INFO[key]
    if key == "synthetic" and mean is None and std is None:
        channels = int(kwargs.get("image_size", info.input_size)[0])
        mean, std = (0.0,) * channels, (1.0,) * channels
    mean = tuple(mean) if mean is not None else info.mean
    std = tuple(std) if std is not None else info.std
    if key in ("cifar10", "cifar100", "imagenet", "folder"):
        if root is None:
            raise ConfigError(f"dataset {key!r} needs a data root folder (root=...)")
        do_augment = train if augment is None else augment
    else:
        do_augment = bool(augment)

    if key in ("cifar10", "cifar100"):
        tf = cifar_transforms(do_augment, mean, std, cutout=cutout)
        cls = CIFAR10 if key == "cifar10" else CIFAR100
        return cls(root, train, tf, download=download, **kwargs)
    if key == "imagenet":
        folder = Path(root) / ("train" if train else "val")
        if not folder.is_dir():
            raise FileNotFoundError(
                f"ImageNet folder {folder} does not exist; expected {root}/train/<class>/ and "
                f"{root}/val/<class>/ (validation images sorted into class folders)")
        return ImageFolder(folder, imagenet_transforms(do_augment, mean, std), **kwargs)
    if key == "folder":
        return class_folders(Path(root), train, do_augment, mean, std,
                             kwargs.pop("image_size", info.input_size), **kwargs)
    if key == "digits":
        steps: list[Transform] = [RandomCrop(8, padding=1)] if do_augment else []
        return Digits(train, Compose([*steps, Normalize(mean, std)]), **kwargs)
    # synthetic
    params = {"num_samples": 512 if train else 128, "num_classes": info.num_classes,
              "image_size": info.input_size, "seed": 0}
    params.update(kwargs)
    _, h, w = params["image_size"]
    steps = [RandomCrop((h, w), padding=max(h // 8, 1)), RandomHorizontalFlip()] \
        if do_augment else []
    return SyntheticImages(train=train, transform=Compose([*steps, Normalize(mean, std)]),
                           **params)


def check_num_classes(dataset: Dataset, model_num_classes: int) -> int:
    """Make sure every label of ``dataset`` has an output in the model's classifier.

    Returns:
        The dataset's number of classes.

    Raises:
        DataError: the dataset has more classes than the model has outputs.
    """
    classes = getattr(dataset, "classes", None)
    targets = getattr(dataset, "targets", None)
    if classes:
        n = len(classes)
    elif targets:
        n = int(max(targets)) + 1
    else:
        raise DataError("cannot tell the number of classes: the dataset has neither "
                        "'.classes' nor '.targets'")
    if n > model_num_classes:
        raise DataError(f"the dataset has {n} classes but the model's classifier has only "
                        f"{model_num_classes} outputs; pick a model built for this dataset or "
                        f"pass num_classes={n}")
    return n
