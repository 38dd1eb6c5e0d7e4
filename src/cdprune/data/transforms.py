"""Image transforms on tensors, drawn from torch's RNG, and the standard pipelines.

Written without torchvision so that a seeded loader reproduces the augmentation of every
batch (see :class:`cdprune.data.loaders.SeededLoader`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError

# Channel statistics. The CIFAR-10 pair is the one the chenyaofo CIFAR checkpoints were
# trained with; the ImageNet pair is also what the akamaster CIFAR ResNets expect.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5070, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pixel mean and std of scikit-learn's digits after scaling to [0, 1] (all 1797 images).
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)


Transform = Callable[[torch.Tensor], torch.Tensor]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        pair = (size, size)
    else:
        pair = tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) <= 0:
        raise ConfigError(f"image size must be a positive int or (height, width), got {size!r}")
    return pair  # type: ignore[return-value]


def _check_image(img: torch.Tensor, what: str) -> None:
    if img.dim() != 3:
        raise DataError(f"{what} expects an image tensor [C, H, W], got shape "
                        f"{tuple(img.shape)}; put ToFloat() first in the pipeline")


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of a [C, H, W] image; uint8 stays uint8."""
    if tuple(img.shape[-2:]) == size:
        return img
    x = img.float() if not img.is_floating_point() else img
    out = F.interpolate(x.unsqueeze(0), size=size, mode="bilinear", align_corners=False,
                        antialias=True).squeeze(0)
    if not img.is_floating_point():
        out = out.round().clamp(0, 255).to(img.dtype)
    return out


class Compose:
    """Apply transforms one after another."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class ToFloat:
    """uint8 image (HWC or CHW, or HW for grey) -> float32 [C, H, W] in [0, 1].

    A 3-d tensor is read as channels-first when its first dimension is 1, 3 or 4 and as
    channels-last otherwise (so a 32x32x3 array becomes 3x32x32). Float input is already
    scaled and passes through as float32.
    """

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.dim() == 2:
            img = img.unsqueeze(0)
        if img.dim() != 3:
            raise DataError(f"ToFloat expects an image with 2 or 3 dimensions, got shape "
                            f"{tuple(img.shape)}")
        if img.shape[0] not in (1, 3, 4) and img.shape[-1] in (1, 3, 4):
            img = img.permute(2, 0, 1)
        if img.dtype == torch.uint8:
            return img.float().div_(255.0)
        if img.is_floating_point():
            return img.float()
        raise DataError(f"ToFloat expects uint8 or float images, got {img.dtype}")

    def __repr__(self) -> str:
        return "ToFloat()"


class Normalize:
    """Per-channel ``(x - mean) / std`` on a float [C, H, W] image."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std) or len(mean) == 0:
            raise ConfigError(f"mean and std need one value per channel, got mean={mean!r}, "
                              f"std={std!r}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"std values must be positive, got {std!r}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean).view(-1, 1, 1)
        self._std = torch.tensor(self.std).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _check_image(img, "Normalize")
        if img.shape[0] != len(self.mean):
            raise DataError(f"Normalize has {len(self.mean)} channel(s) of mean/std but the "
                            f"image has {img.shape[0]}; pass mean/std matching the dataset")
        if not img.is_floating_point():
            raise DataError("Normalize expects a float image; put ToFloat() before it")
        return (img - self._mean.to(img)) / self._std.to(img)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class RandomCrop:
    """Zero-pad each border by ``padding`` pixels, then crop ``size`` at a random place."""

    def __init__(self, size: int | Sequence[int], padding: int = 0):
        if padding < 0:
            raise ConfigError(f"padding must be >= 0, got {padding}")
        self.size = _pair(size)
        self.padding = int(padding)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _check_image(img, "RandomCrop")
        if self.padding:
            p = self.padding
            img = F.pad(img, (p, p, p, p))
        h, w = self.size
        height, width = img.shape[-2:]
        if height < h or width < w:
            raise DataError(f"RandomCrop of {self.size} does not fit a padded image of "
                            f"{height}x{width}")
        top = int(torch.randint(0, height - h + 1, ()).item())
        left = int(torch.randint(0, width - w + 1, ()).item())
        return img[:, top:top + h, left:left + w]

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()).item() < self.p:
            return img.flip(-1)
        return img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Cutout:
    """Zero one ``size`` x ``size`` square whose centre is uniform over the image.

    The square is clipped at the borders, so near an edge less than ``size**2`` pixels are
    zeroed. As in DeVries & Taylor's reference code it is applied after normalisation, so the
    hole holds the dataset mean rather than black.
    """

    def __init__(self, size: int = 16):
        if size <= 0:
            raise ConfigError(f"Cutout size must be positive, got {size}")
        self.size = int(size)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _check_image(img, "Cutout")
        height, width = img.shape[-2:]
        cy = int(torch.randint(0, height, ()).item())
        cx = int(torch.randint(0, width, ()).item())
        half = self.size // 2
        y0, y1 = max(cy - half, 0), min(cy + self.size - half, height)
        x0, x1 = max(cx - half, 0), min(cx + self.size - half, width)
        img = img.clone()
        img[:, y0:y1, x0:x1] = 0
        return img

    def __repr__(self) -> str:
        return f"Cutout(size={self.size})"


class RandomResizedCrop:
    """Crop a random area and aspect ratio, then resize to ``size`` (Inception-style).

    The crop covers a fraction of the image area drawn uniformly from ``scale`` and has an
    aspect ratio (width / height) drawn log-uniformly from ``ratio``. When ten draws in a row
    do not fit inside the image, the largest centred crop with a ratio inside ``ratio`` is
    used instead.
    """

    def __init__(self, size: int | Sequence[int] = 224,
                 scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ConfigError(f"scale must satisfy 0 < min <= max <= 1, got {scale!r}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ConfigError(f"ratio must satisfy 0 < min <= max, got {ratio!r}")
        self.size = _pair(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def _box(self, height: int, width: int) -> tuple[int, int, int, int]:
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * torch.empty(()).uniform_(*self.scale).item()
            aspect = math.exp(torch.empty(()).uniform_(log_lo, log_hi).item())
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, ()).item())
                left = int(torch.randint(0, width - w + 1, ()).item())
                return top, left, h, w
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            h, w = height, width
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _check_image(img, "RandomResizedCrop")
        top, left, h, w = self._box(*img.shape[-2:])
        return _resize(img[:, top:top + h, left:left + w], self.size)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class Resize:
    """Resize so the shorter side is ``size`` (aspect kept), bilinear with antialiasing.

    A pair ``(h, w)`` resizes to exactly that shape instead.
    """

    def __init__(self, size: int | Sequence[int] = 256):
        self.size: int | tuple[int, int] = int(size) if isinstance(size, int) else _pair(size)
        if isinstance(self.size, int) and self.size <= 0:
            raise ConfigError(f"Resize size must be positive, got {size}")

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _check_image(img, "Resize")
        if isinstance(self.size, tuple):
            return _resize(img, self.size)
        height, width = img.shape[-2:]
        if height <= width:
            out = (self.size, int(self.size * width / height))
        else:
            out = (int(self.size * height / width), self.size)
        return _resize(img, out)

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class CenterCrop:
    """Crop ``size`` from the centre; an image smaller than that is zero-padded first."""

    def __init__(self, size: int | Sequence[int] = 224):
        self.size = _pair(size)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _check_image(img, "CenterCrop")
        h, w = self.size
        height, width = img.shape[-2:]
        if height < h or width < w:
            pad_h, pad_w = max(h - height, 0), max(w - width, 0)
            img = F.pad(img, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
            height, width = img.shape[-2:]
        top = int(round((height - h) / 2))
        left = int(round((width - w) / 2))
        return img[:, top:top + h, left:left + w]

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size})"


def cifar_transforms(train: bool, mean: Sequence[float] = CIFAR10_MEAN,
                     std: Sequence[float] = CIFAR10_STD, cutout: bool = False, *,
                     cutout_size: int = 16, size: int = 32, padding: int = 4) -> Compose:
    """The standard CIFAR pipeline: 4-pixel padded random crop and flip when training.

    Args:
        train: add the augmentation (crop, flip and optionally Cutout).
        mean: per-channel mean the model was trained with.
        std: per-channel std the model was trained with.
        cutout: add Cutout after normalisation (training only).
        cutout_size: side of the Cutout square.
        size: image side.
        padding: zero padding of the random crop.
    """
    steps: list[Transform] = [ToFloat()]
    if train:
        steps += [RandomCrop(size, padding=padding), RandomHorizontalFlip()]
    steps.append(Normalize(mean, std))
    if train and cutout:
        steps.append(Cutout(cutout_size))
    return Compose(steps)


def imagenet_transforms(train: bool, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD, *, crop_size: int = 224,
                        resize_size: int = 256) -> Compose:
    """The standard ImageNet pipeline.

    Training: random resized crop to ``crop_size`` and flip. Evaluation: shorter side to
    ``resize_size``, then the central ``crop_size`` square.
    """
    steps: list[Transform] = [ToFloat()]
    if train:
        steps += [RandomResizedCrop(crop_size), RandomHorizontalFlip()]
    else:
        steps += [Resize(resize_size), CenterCrop(crop_size)]
    steps.append(Normalize(mean, std))
    return Compose(steps)


# Input normalisation in any pixel scale (0-1 or 0-255) lies well inside these bounds;
# beyond them a value is a slip or damage, and the model would see garbage.
MAX_MEAN = 1e3
STD_RANGE = (1e-6, 1e3)


def normalisation_problem(mean: Any, std: Any, channels: int | None = None,
                          where: str = "") -> str | None:
    """What is wrong with a mean and std read from a configuration or a file; ``None`` if
    nothing.

    Each must be a list of finite numbers, one per input channel (or one for all), the
    mean within +-1000 and the std within 1e-6 and 1000.
    """
    for key, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        if not isinstance(values, list) or not values or not all(_is_number(v)
                                                                 for v in values):
            return f"{where}{key} must be a list of numbers, got {values!r}"[:200]
        bad = next((v for v in values if not math.isfinite(v)), None)
        low, high = (-MAX_MEAN, MAX_MEAN) if key == "mean" else STD_RANGE
        bad = bad if bad is not None else next((v for v in values if not low <= v <= high),
                                               None)
        if bad is not None:
            return f"{where}{key} holds {bad}; each value must be a finite number in " \
                   f"[{low:g}, {high:g}]"
        if channels is not None and len(values) not in (1, channels):
            return (f"{where}{key} has {len(values)} values for {channels}-channel inputs; "
                    f"it needs 1 or {channels}")
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
