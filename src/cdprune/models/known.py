"""Public checkpoints whose input normalisation and accuracy are known.

A checkpoint evaluated with another normalisation than it was trained with loses accuracy
silently (a few tenths of a point to many points). The checkpoints below are recognised by
the SHA-256 of their bytes, so nothing depends on the file name; for them cdprune uses the
right mean and std when none is given, and can tell when an accuracy is far below the
known one. Accuracies are top-1 on the full CIFAR-10 test set, without augmentation.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

__all__ = ["KNOWN_CHECKPOINTS", "KnownCheckpoint", "known_checkpoint"]

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


class KnownCheckpoint(NamedTuple):
    """What is known about one public checkpoint."""

    name: str
    model: str
    dataset: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    top1: float


def _entry(name: str, model: str, norm: tuple, top1: float) -> KnownCheckpoint:
    return KnownCheckpoint(name, model, "cifar10", norm[0], norm[1], top1)


# Option A: github.com/akamaster/pytorch_resnet_cifar10; option B: chenyaofo/pytorch-cifar-models.
KNOWN_CHECKPOINTS: dict[str, KnownCheckpoint] = {
    "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8":
        _entry("resnet20-optionA-akamaster", "resnet20", _IMAGENET, 91.73),
    "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850":
        _entry("resnet32-optionA-akamaster", "resnet32", _IMAGENET, 92.63),
    "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4":
        _entry("resnet44-optionA-akamaster", "resnet44", _IMAGENET, 93.10),
    "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367":
        _entry("resnet56-optionA-akamaster", "resnet56", _IMAGENET, 93.39),
    "eb80202b9fc54073b36fa88baeed99801c2afe3375e5d4b757145b44f7395f05":
        _entry("resnet20-optionB-chenyaofo", "resnet20b", _CIFAR10, 92.60),
    "4a8f68a8314a4aa60a2cac04f7d416c2c030c730be6e143ffd718adbaf3d7163":
        _entry("resnet32-optionB-chenyaofo", "resnet32b", _CIFAR10, 93.53),
    "fe235e59808bd556f963389e632bf8b126d83823353e0ea0a71c3376a0caece4":
        _entry("resnet44-optionB-chenyaofo", "resnet44b", _CIFAR10, 94.01),
    "121838a9bcb81e5cc9033e292be0381f98147211f2d8e799164df17f7a8b924e":
        _entry("resnet56-optionB-chenyaofo", "resnet56b", _CIFAR10, 94.37),
}

_MAX_BYTES = 1 << 30  # larger files are not hashed (no known checkpoint is that large)
_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str | None:
    stat = path.stat()
    if stat.st_size > _MAX_BYTES:
        return None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _CACHE[key] = digest.hexdigest()
    return _CACHE[key]


def known_checkpoint(path: str | os.PathLike) -> KnownCheckpoint | None:
    """The :class:`KnownCheckpoint` whose bytes ``path`` holds, or ``None``."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = _sha256(path)
    return KNOWN_CHECKPOINTS.get(digest) if digest else None
