"""Small in-memory datasets: scikit-learn's 8x8 digits (offline demo) and synthetic images."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .transforms import Transform


class InMemoryImages(Dataset):
    """Images held as one float tensor ``data`` [N, C, H, W] with ``targets`` and ``transform``."""

    data: torch.Tensor
    targets: list[int]
    transform: Transform | None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.data[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


class Digits(InMemoryImages):
    """scikit-learn's bundled 8x8 handwritten digits as 1-channel images in [0, 1].

    The 1797 images are split per class (stratified) with a fixed seed, so train and test
    are disjoint, balanced and the same on every machine. Needs scikit-learn (offline).

    Args:
        train: the training part, else the test part.
        transform: applied to each float [1, 8, 8] image.
        test_fraction: share of each class kept for testing.
        seed: seed of the split.
    """

    def __init__(self, train: bool = True, transform: Transform | None = None, *,
                 test_fraction: float = 0.2, seed: int = 0):
        if not 0 < test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise DataError("the 'digits' dataset needs scikit-learn: pip install scikit-learn "
                            "(or pip install 'cdprune[dev]')") from exc
        images, labels = _digits_arrays(load_digits)
        g = torch.Generator().manual_seed(seed)
        chosen = []
        for c in range(10):
            idx = torch.nonzero(labels == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            n_test = max(1, round(len(idx) * test_fraction))
            chosen.append(idx[n_test:] if train else idx[:n_test])
        keep = torch.cat(chosen).sort().values
        self.data = images[keep].unsqueeze(1).contiguous()  # float [N, 1, 8, 8]
        self.targets: list[int] = labels[keep].tolist()
        self.classes: list[str] = [str(d) for d in range(10)]
        self.transform = transform
        self.train = train


@functools.cache
def _digits_arrays(load_digits: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as float images in [0, 1] and int64 labels, read once per process:
    every command and split builds its part by indexing (a copy), never by changing them."""
    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return images, labels


class SyntheticImages(InMemoryImages):
    """Small class-conditional images for tests: a smooth per-class pattern plus noise.

    Each class has its own low-frequency mean image, so a small CNN learns the task in a few
    steps and per-class activation statistics differ. The class patterns come from ``seed``
    alone, the noise from ``seed`` and ``train``, so train and test share classes but not
    images. Labels are balanced and shuffled.

    Args:
        num_samples: number of images.
        num_classes: number of classes.
        image_size: (C, H, W).
        seed: seed of patterns, labels and noise.
        train: pick the training noise stream, else the test one.
        noise: std of the Gaussian noise around the class pattern.
        transform: applied to each float [C, H, W] image.
    """

    def __init__(self, num_samples: int, num_classes: int,
                 image_size: tuple[int, int, int] = (3, 16, 16), seed: int = 0, *,
                 train: bool = True, noise: float = 0.5, transform: Transform | None = None):
        if num_samples <= 0 or num_classes <= 0:
            raise ConfigError(f"num_samples and num_classes must be positive, got "
                              f"{num_samples} and {num_classes}")
        if len(image_size) != 3 or min(image_size) <= 0:
            raise ConfigError(f"image_size must be (C, H, W), got {image_size!r}")
        c, h, w = (int(s) for s in image_size)
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randn(num_classes, c, max(h // 4, 1), max(w // 4, 1), generator=g)
        self.patterns = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        g = torch.Generator().manual_seed(seed * 2 + (0 if train else 1) + 7919)
        labels = torch.arange(num_samples) % num_classes
        labels = labels[torch.randperm(num_samples, generator=g)]
        self.data = self.patterns[labels] + noise * torch.randn(num_samples, c, h, w,
                                                                generator=g)
        self.targets: list[int] = labels.tolist()
        self.classes: list[str] = [f"class_{i}" for i in range(num_classes)]
        self.transform = transform
