"""Batches from a dataset held whole on the training device, augmented per batch there.

Small datasets (CIFAR, digits, synthetic) fit in device memory many times over: CIFAR-10's
50,000 training images are 150 MB as uint8. Keeping them there as one tensor and doing
crop, flip, normalisation and Cutout on a whole batch at once removes the per-image Python
work, the collation and the host-to-device copy that otherwise bound a short epoch: no
DataLoader workers are needed.

:class:`DeviceBatches` behaves like a loader to :func:`cdprune.fine_tune`: it has a length,
yields ``(images, labels)`` batches, and draws all its randomness (order, crop offsets,
flips, Cutout centres) from its own CPU ``generator``, which
:func:`cdprune.finetune.resume.seed_epoch` reseeds each epoch. An epoch therefore depends only on the
seed and the epoch number, on any device, and resume stays exact.

The augmentation is the one :func:`cdprune.data.cifar_transforms` applies image by image:
zero-pad and crop (the pad is black, i.e. applied before normalisation), mirror with
probability ``flip``, normalise, then zero a Cutout square (after normalisation, so the hole
holds the mean). :func:`device_batches_from` reads these settings off a dataset's
``Compose`` and returns None for anything it does not recognise, so callers fall back to
the ordinary loader.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data import (
    Compose,
    Cutout,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    ToFloat,
)
from ..data import Subset as _Subset
from ..data.cifar import CifarBase
from ..data.toy import InMemoryImages
from ..errors import ConfigError, DataError

__all__ = ["AugmentParams", "DeviceBatches", "augment_batch", "device_batches_from",
           "draw_params"]

logger = logging.getLogger(__name__)


class AugmentParams(NamedTuple):
    """Random choices for one batch (CPU tensors of length B)."""

    top: torch.Tensor  # crop offset in the padded image, 0..2*padding
    left: torch.Tensor
    flip: torch.Tensor  # bool
    cy: torch.Tensor  # Cutout centre, 0..H-1
    cx: torch.Tensor


def draw_params(batch: int, height: int, width: int, *, padding: int, flip: float,
                cutout: int, generator: torch.Generator) -> AugmentParams:
    """Draw crop offsets, flips and Cutout centres for ``batch`` images from ``generator``."""
    span = 2 * padding + 1
    top = torch.randint(0, span, (batch,), generator=generator)
    left = torch.randint(0, span, (batch,), generator=generator)
    flips = torch.rand(batch, generator=generator) < flip
    cy = torch.randint(0, height, (batch,), generator=generator)
    cx = torch.randint(0, width, (batch,), generator=generator)
    if flip <= 0:
        flips.zero_()
    if not cutout:
        cy.zero_()
        cx.zero_()
    return AugmentParams(top, left, flips, cy, cx)


def augment_batch(images: torch.Tensor, params: AugmentParams | None, *, mean: torch.Tensor,
                  std: torch.Tensor, padding: int = 0, cutout: int = 0) -> torch.Tensor:
    """Crop, flip, normalise and cut out a batch in a few tensor operations.

    Args:
        images: uint8 (scaled by 1/255) or float [B, C, H, W] images.
        params: the random choices (see :func:`draw_params`); None means no augmentation,
            only normalisation.
        mean: per-channel mean, shape [C] (on the images' device).
        std: per-channel std, shape [C].
        padding: zero padding of the random crop.
        cutout: side of the Cutout square; 0 for none.

    Returns:
        float32 [B, C, H, W].
    """
    x = images.float()
    if images.dtype == torch.uint8:
        x = x.mul_(1.0 / 255.0)
    b, c, h, w = x.shape
    if params is not None:
        device = x.device
        top, left = params.top.to(device), params.left.to(device)
        flip = params.flip.to(device)
        if padding:
            x = F.pad(x, (padding, padding, padding, padding))
        # One gather does crop and flip: row r of the output reads row top + r of the
        # padded image, column j reads left + j, or left + W - 1 - j when mirrored.
        rows = top[:, None] + torch.arange(h, device=device)  # [B, H]
        cols = torch.arange(w, device=device).expand(b, w)
        cols = torch.where(flip[:, None], w - 1 - cols, cols) + left[:, None]  # [B, W]
        width = x.shape[-1]
        flat = (rows[:, :, None] * width + cols[:, None, :]).view(b, 1, h * w)
        x = x.flatten(2).gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    if params is not None and cutout:
        device = x.device
        half = cutout // 2
        cy, cx = params.cy.to(device)[:, None], params.cx.to(device)[:, None]
        ys = torch.arange(h, device=device)[None]
        xs = torch.arange(w, device=device)[None]
        in_y = (ys >= cy - half) & (ys < cy + cutout - half)  # [B, H]
        in_x = (xs >= cx - half) & (xs < cx + cutout - half)  # [B, W]
        hole = (in_y[:, :, None] & in_x[:, None, :])[:, None]
        x = x.masked_fill(hole, 0.0)
    return x


class DeviceBatches:
    """Shuffled, augmented batches of an in-memory dataset, made on its device.

    Args:
        images: uint8 or float [N, C, H, W]; moved to ``device`` once.
        targets: N integer labels.
        batch_size: images per batch.
        mean: normalisation mean, one value per channel.
        std: normalisation std.
        padding: zero padding of the random crop; 0 for no crop.
        flip: probability of mirroring left-right.
        cutout: side of the Cutout square; 0 for none.
        shuffle: a new order every epoch (else the stored order).
        drop_last: drop the last incomplete batch.
        seed: initial seed of :attr:`generator`.
        device: where the data and the batches live.
        channels_last: yield channels-last batches (for CUDA convolutions).
    """

    def __init__(self, images: torch.Tensor, targets: Sequence[int] | torch.Tensor,
                 batch_size: int, *, mean: Sequence[float], std: Sequence[float],
                 padding: int = 0, flip: float = 0.0, cutout: int = 0, shuffle: bool = True,
                 drop_last: bool = False, seed: int = 0,
                 device: torch.device | str = "cpu", channels_last: bool = False):
        if images.dim() != 4:
            raise DataError(f"DeviceBatches needs images [N, C, H, W], got shape "
                            f"{tuple(images.shape)}")
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ConfigError(f"mean/std need {images.shape[1]} values (one per channel), "
                              f"got mean={tuple(mean)!r}, std={tuple(std)!r}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.targets = torch.as_tensor(targets, dtype=torch.long).to(self.device)
        if len(self.targets) != len(self.images):
            raise DataError(f"{len(self.images)} images but {len(self.targets)} labels")
        self.batch_size = int(batch_size)
        self.mean = torch.tensor([float(m) for m in mean], device=self.device)
        self.std = torch.tensor([float(s) for s in std], device=self.device)
        self.padding, self.flip, self.cutout = int(padding), float(flip), int(cutout)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.channels_last = channels_last
        #: All randomness comes from here (CPU, so a seed means the same on every device).
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def augments(self) -> bool:
        return bool(self.padding or self.flip > 0 or self.cutout)

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        order = (torch.randperm(n, generator=self.generator) if self.shuffle
                 else torch.arange(n))
        _, _, h, w = self.images.shape
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            params = (draw_params(len(idx), h, w, padding=self.padding, flip=self.flip,
                                  cutout=self.cutout, generator=self.generator)
                      if self.augments else None)
            idx = idx.to(self.device)
            x = augment_batch(self.images[idx], params, mean=self.mean, std=self.std,
                              padding=self.padding, cutout=self.cutout)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.targets[idx]

    def __repr__(self) -> str:
        return (f"DeviceBatches(n={len(self.images)}, batch_size={self.batch_size}, "
                f"padding={self.padding}, flip={self.flip}, cutout={self.cutout}, "
                f"device={self.device})")


def _recipe(transform: Any) -> dict[str, Any] | None:
    """Crop padding, flip rate, Cutout and normalisation of a recognised pipeline, else None.

    Accepted: ``Compose([ToFloat?, RandomCrop?, RandomHorizontalFlip?, Normalize, Cutout?])``
    with the crop the size of the image, i.e. what :func:`cdprune.data.build_dataset` builds
    for CIFAR, digits and synthetic images.
    """
    steps = list(transform.transforms) if isinstance(transform, Compose) else None
    if not steps:
        return None
    out: dict[str, Any] = {"padding": 0, "flip": 0.0, "cutout": 0, "crop": None}
    if isinstance(steps[0], ToFloat):
        steps.pop(0)
    if steps and isinstance(steps[0], RandomCrop):
        out["crop"], out["padding"] = steps[0].size, steps[0].padding
        steps.pop(0)
    if steps and isinstance(steps[0], RandomHorizontalFlip):
        out["flip"] = steps[0].p
        steps.pop(0)
    if not steps or not isinstance(steps[0], Normalize):
        return None
    out["mean"], out["std"] = steps[0].mean, steps[0].std
    steps.pop(0)
    if steps and isinstance(steps[0], Cutout):
        out["cutout"] = steps[0].size
        steps.pop(0)
    return None if steps else out


def device_batches_from(dataset: Dataset, batch_size: int, *, shuffle: bool,
                        drop_last: bool = False, seed: int = 0,
                        device: torch.device | str = "cpu",
                        channels_last: bool = False) -> DeviceBatches | None:
    """A :class:`DeviceBatches` equivalent to loading ``dataset`` with its own transform.

    Works for CIFAR-10/100, digits and synthetic images (and :class:`cdprune.data.Subset`
    views of them) whose transform is one :func:`cdprune.data.build_dataset` makes. Returns
    None for anything else (files read from disk, custom transforms), and the caller keeps
    its DataLoader.
    """
    indices = None
    base = dataset
    if isinstance(dataset, _Subset):
        indices, base = torch.as_tensor(dataset.indices, dtype=torch.long), dataset.dataset
    if not isinstance(base, (CifarBase, InMemoryImages)):
        return None
    recipe = _recipe(base.transform)
    if recipe is None:
        logger.debug("transform %r not recognised; keeping the DataLoader", base.transform)
        return None
    images, targets = base.data, torch.as_tensor(base.targets, dtype=torch.long)
    if images.dim() != 4 or (recipe["crop"] is not None
                             and tuple(recipe["crop"]) != tuple(images.shape[-2:])):
        return None
    if images.dtype != torch.uint8 and not images.is_floating_point():
        return None
    if indices is not None:
        images, targets = images[indices], targets[indices]
    return DeviceBatches(images, targets, batch_size, mean=recipe["mean"], std=recipe["std"],
                         padding=recipe["padding"], flip=recipe["flip"],
                         cutout=recipe["cutout"], shuffle=shuffle, drop_last=drop_last,
                         seed=seed, device=device, channels_last=channels_last)
