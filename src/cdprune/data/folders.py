"""Class-folder datasets read with PIL: ``root/<class>/**/<image>``."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .transforms import (
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    ToFloat,
    Transform,
    imagenet_transforms,
)

logger = logging.getLogger(__name__)


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _load_rgb(path: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class ImageFolder(Dataset):
    """Images in ``root/<class name>/**/<file>``; classes are the sorted folder names.

    Images are read with PIL, converted to RGB and handed to ``transform`` as uint8
    [3, H, W] (``None`` gives ToFloat only).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        DataError: no class folders, or a class folder without images.
    """

    def __init__(self, root: str | os.PathLike, transform: Transform | None = None, *,
                 extensions: Sequence[str] = IMG_EXTENSIONS):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist; expected one "
                                    f"sub-folder per class holding its images")
        exts = tuple(e.lower() for e in extensions)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir()
                         and not p.name.startswith("."))
        if not classes:
            raise DataError(f"no class folders in {root}; expected {root}/<class>/<image> "
                            f"with image suffixes {', '.join(exts)}")
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(classes):
            files = sorted(p for p in (root / name).rglob("*")
                           if p.is_file() and p.suffix.lower() in exts)
            if not files:
                raise DataError(f"class folder {root / name} holds no images with suffixes "
                                f"{', '.join(exts)}; add images or remove the folder")
            self.samples.extend((f, label) for f in files)
        self.classes: list[str] = classes
        self.targets: list[int] = [label for _, label in self.samples]
        self.root = root
        self.transform = transform
        logger.info("found %d images in %d classes under %s", len(self.samples),
                    len(classes), root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        img = _load_rgb(path)
        img = self.transform(img) if self.transform is not None else ToFloat()(img)
        return img, label


def class_folders(root: Path, train: bool, augment: bool, mean: Sequence[float],
                  std: Sequence[float], image_size: Sequence[int], **kwargs: Any) -> ImageFolder:
    """``root/train|val/<class>/<image>`` at the model's input size.

    Small images (side up to 64, CIFAR-like) are resized to the side and augmented with a
    padded random crop and flip; larger ones get the ImageNet pipeline at that size.
    """
    folder = root / ("train" if train else "val")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist; expected {root}/train/<class>/ and "
            f"{root}/val/<class>/ (any number of classes, one folder each)")
    side = int(image_size[-1])
    if side <= 64:
        steps: list[Transform] = [ToFloat(), Resize((side, side))]
        if augment:
            steps += [RandomCrop(side, padding=max(side // 8, 1)), RandomHorizontalFlip()]
        tf = Compose([*steps, Normalize(mean, std)])
    else:
        tf = imagenet_transforms(augment, mean, std, crop_size=side,
                                 resize_size=round(side * 256 / 224))
    return ImageFolder(folder, tf, **kwargs)
