"""Datasets, tensor transforms and seeded data loaders.

CDP reads class-labelled images twice: a sample of training images for the activation
statistics, and the usual training/validation splits for fine-tuning and evaluation. This
module provides both without torchvision:

* CIFAR-10/100 read from the official python archive layout. The batch files are pickles,
  so they are opened with a restricted unpickler that can only rebuild plain containers and
  numeric numpy arrays; by default their sizes are also checked against the official files
  before anything is read.
* ImageNet-style class folders read with PIL, scikit-learn's bundled 8x8 digits (offline, for
  the demo) and a small synthetic class-conditional set for tests.
* Transforms written on tensors with torch's random number generator, so a seeded loader
  reproduces both the order and the augmentation of every batch.

Every item is ``(float image tensor [C, H, W], int label)``; every dataset exposes
``.classes`` (list of names) and ``.targets`` (list of int labels).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import random
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.data import Subset as _TorchSubset

from .errors import ConfigError, DataError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DATASETS",
    "CIFAR10",
    "CIFAR100",
    "CenterCrop",
    "Compose",
    "Cutout",
    "DatasetInfo",
    "Digits",
    "ImageFolder",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
    "SeededLoader",
    "Subset",
    "SyntheticImages",
    "ToFloat",
    "build_dataset",
    "build_loader",
    "check_num_classes",
    "cifar_transforms",
    "dataset_info",
    "download_cifar",
    "imagenet_transforms",
    "subset",
]

logger = logging.getLogger(__name__)

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

DATASETS = ("cifar10", "cifar100", "imagenet", "digits", "synthetic", "folder")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

Transform = Callable[[torch.Tensor], torch.Tensor]


# ============================================================================ transforms
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


# ============================================================================ CIFAR
class _CifarSpec(NamedTuple):
    title: str
    folder: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    sizes: dict[str, int]  # byte sizes of the files in the official archive


_CIFAR_SPECS = {
    "cifar10": _CifarSpec(
        title="CIFAR-10", folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta", label_key="labels", names_key="label_names",
        # The batches differ by a few hundred bytes: labels are pickled as variable-length ints.
        sizes={"data_batch_1": 31035704, "data_batch_2": 31035320, "data_batch_3": 31035999,
               "data_batch_4": 31035696, "data_batch_5": 31035623, "test_batch": 31035526,
               "batches.meta": 158},
    ),
    "cifar100": _CifarSpec(
        title="CIFAR-100", folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",), test_files=("test",), meta_file="meta",
        label_key="fine_labels", names_key="fine_label_names",
        sizes={"train": 155249918, "test": 31049707, "meta": 1473},
    ),
}


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: what rebuilds a plain numpy array."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    def plain_dtype(*args: Any) -> np.dtype:
        dtype = np.dtype(*args)
        if dtype.hasobject:
            raise pickle.UnpicklingError("refusing a numpy array of Python objects")
        return dtype

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): plain_dtype,
    }
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except the numpy array rebuilders.

    Plain containers, strings, bytes and numbers need no globals, so the official batch files
    load, while a tampered file that names anything else (``os.system``, ``eval``...) is
    refused before the object is even looked up.
    """

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _CifarUnpickler._allowed is None:
            _CifarUnpickler._allowed = _numpy_globals()
        found = _CifarUnpickler._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return found


def _fix_hint(spec: _CifarSpec, root: Path) -> str:
    files = ", ".join(spec.train_files + spec.test_files + (spec.meta_file,))
    return (f"Download {spec.url} (md5 {spec.md5}) and extract it into {root}, so that "
            f"{root / spec.folder} holds {files}; or pass download=True (`--download` on "
            "the command line) when online.")


def _read_batch(path: Path, spec: _CifarSpec, root: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            obj = _CifarUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # any decoding failure means the file is not a valid batch
        raise DataError(f"{path} is not a valid {spec.title} python batch file ({exc}). "
                        f"{_fix_hint(spec, root)}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a {spec.title} dictionary. "
                        f"{_fix_hint(spec, root)}")
    return obj


def _resolve_cifar_folder(root: Path, spec: _CifarSpec) -> Path:
    """``root`` may be the folder holding ``cifar-10-batches-py`` or that folder itself."""
    if (root / spec.folder).is_dir():
        return root / spec.folder
    if root.name == spec.folder or (root / spec.meta_file).exists():
        return root
    return root / spec.folder


def _check_cifar_files(folder: Path, names: Sequence[str], spec: _CifarSpec, root: Path,
                       verify_sizes: bool) -> None:
    for name in names:
        path = folder / name
        expected = spec.sizes[name]
        if not path.is_file():
            raise DataError(f"{spec.title} file {path} is missing (expected {expected} bytes). "
                            f"{_fix_hint(spec, root)}")
        actual = path.stat().st_size
        if verify_sizes and actual != expected:
            raise DataError(f"{spec.title} file {path} is {actual} bytes but the official file "
                            f"is {expected} bytes: it is incomplete or not the official one. "
                            f"{_fix_hint(spec, root)}")


class _CifarBase(Dataset):
    _key = "cifar10"

    def __init__(self, root: str | os.PathLike, train: bool = True,
                 transform: Transform | None = None, *, download: bool = False,
                 verify_sizes: bool = True, progress: bool = False):
        spec = _CIFAR_SPECS[self._key]
        root = Path(root).expanduser()
        if not root.exists() and not download:
            raise FileNotFoundError(f"{spec.title} root folder {root} does not exist. "
                                    f"{_fix_hint(spec, root)}")
        folder = _resolve_cifar_folder(root, spec)
        parent = folder.parent
        names = (spec.train_files if train else spec.test_files) + (spec.meta_file,)
        if download and not all((folder / n).is_file() for n in names):
            download_cifar(self._key, parent, progress=progress)
        _check_cifar_files(folder, names, spec, parent, verify_sizes)

        arrays: list[np.ndarray] = []
        labels: list[int] = []
        for name in names[:-1]:
            path = folder / name
            batch = _read_batch(path, spec, parent)
            data, lab = batch.get("data"), batch.get(spec.label_key)
            if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
                    or data.shape[1] != 3 * 32 * 32 or not isinstance(lab, list)
                    or len(lab) != data.shape[0]):
                raise DataError(f"{path} lacks the {spec.title} layout ('data': uint8 "
                                f"[N, 3072], '{spec.label_key}': N ints). "
                                f"{_fix_hint(spec, parent)}")
            arrays.append(data)
            labels.extend(int(v) for v in lab)
        meta = _read_batch(folder / spec.meta_file, spec, parent)
        names_list = meta.get(spec.names_key)
        if not isinstance(names_list, list) or not all(isinstance(n, str) for n in names_list):
            raise DataError(f"{folder / spec.meta_file} lacks '{spec.names_key}'. "
                            f"{_fix_hint(spec, parent)}")
        #: uint8 images [N, 3, 32, 32] (the file layout: channel planes, row-major).
        self.data = torch.from_numpy(np.concatenate(arrays).reshape(-1, 3, 32, 32))
        self.targets: list[int] = labels
        self.classes: list[str] = list(names_list)
        bad = [t for t in labels if not 0 <= t < len(self.classes)]
        if bad:
            raise DataError(f"{folder} has label {bad[0]} outside 0..{len(self.classes) - 1}")
        self.transform = transform
        self.train = train
        self.root = folder
        logger.info("loaded %s %s: %d images from %s", spec.title, "train" if train else "test",
                    len(labels), folder)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.data[index]
        img = self.transform(img) if self.transform is not None else ToFloat()(img)
        return img, self.targets[index]


class CIFAR10(_CifarBase):
    """CIFAR-10 from the official python layout (``root/cifar-10-batches-py/``).

    Args:
        root: the folder holding ``cifar-10-batches-py``, or that folder itself.
        train: the 50000 training images, else the 10000 test images.
        transform: applied to each uint8 [3, 32, 32] image; ``None`` gives ToFloat only.
        download: fetch and extract the official archive when files are missing.
        verify_sizes: refuse files whose size differs from the official ones (tests with
            tiny hand-made batches turn this off; the unpickler stays restricted either way).
        progress: show a progress bar while downloading.
    """

    _key = "cifar10"


class CIFAR100(_CifarBase):
    """CIFAR-100 (fine labels) from the official layout (``root/cifar-100-python/``).

    Arguments as for :class:`CIFAR10`.
    """

    _key = "cifar100"


def _safe_members(tar: tarfile.TarFile, archive: str) -> list[tarfile.TarInfo]:
    members = []
    for member in tar.getmembers():
        parts = Path(member.name).parts
        if member.name.startswith(("/", "\\")) or Path(member.name).is_absolute() \
                or ".." in parts:
            raise DataError(f"refusing to extract {archive}: member {member.name!r} would "
                            f"escape the target folder")
        if not (member.isfile() or member.isdir()):
            raise DataError(f"refusing to extract {archive}: member {member.name!r} is a link "
                            f"or special file")
        members.append(member)
    return members


def download_cifar(name: str, root: str | os.PathLike, *, progress: bool = False) -> Path:
    """Download, verify (MD5) and extract the official CIFAR archive into ``root``.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        root: folder that will hold ``cifar-10-batches-py`` / ``cifar-100-python``.
        progress: show a download progress bar.

    Returns:
        The extracted batches folder.

    Raises:
        DataError: no network, checksum mismatch or an unsafe archive member; the message
            says which files to place where instead.
    """
    if name not in _CIFAR_SPECS:
        raise ConfigError(f"no official archive for {name!r}; valid: {sorted(_CIFAR_SPECS)}")
    spec = _CIFAR_SPECS[name]
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    archive_name = spec.url.rsplit("/", 1)[-1]
    fd, tmp_name = tempfile.mkstemp(prefix=f".{archive_name}.", suffix=".part", dir=root)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec.url, timeout=60) as resp:
                headers = getattr(resp, "headers", None)
                total = headers.get("Content-Length") if headers is not None else None
                from tqdm.auto import tqdm

                with tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                          desc=archive_name, disable=not progress) as bar:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DataError(f"could not download {spec.url} ({exc}). {_fix_hint(spec, root)}") \
                from exc
        if digest.hexdigest() != spec.md5:
            raise DataError(f"{spec.url} downloaded with md5 {digest.hexdigest()}, expected "
                            f"{spec.md5}: the download is corrupt or was altered. "
                            f"{_fix_hint(spec, root)}")
        try:
            with tarfile.open(tmp, "r:gz") as tar:
                for member in _safe_members(tar, archive_name):
                    target = root / member.name
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None  # regular files always have data
                    part = target.with_name(f".{target.name}.part")
                    with source, open(part, "wb") as dst:
                        shutil.copyfileobj(source, dst)
                    os.replace(part, target)
        except (tarfile.TarError, EOFError) as exc:
            raise DataError(f"{archive_name} is not a valid tar.gz archive ({exc}). "
                            f"{_fix_hint(spec, root)}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("downloaded and extracted %s into %s", archive_name, root)
    return root / spec.folder


# ============================================================================ folders
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


# ============================================================================ small sets
class _InMemoryImages(Dataset):
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


class Digits(_InMemoryImages):
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
        bunch = load_digits()
        images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)
        labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
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


class SyntheticImages(_InMemoryImages):
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


# ============================================================================ factory
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
            raise ConfigError(f"dataset {key!r} needs a data root folder (root=... or "
                              f"--data-root)")
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
        return _class_folders(Path(root), train, do_augment, mean, std,
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


def _class_folders(root: Path, train: bool, augment: bool, mean: Sequence[float],
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


# ============================================================================ loaders
class Subset(_TorchSubset):
    """A torch ``Subset`` that keeps ``.classes`` and exposes the chosen ``.targets``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        super().__init__(dataset, list(indices))
        self.classes: list[str] = list(getattr(dataset, "classes", []))
        parent_targets = getattr(dataset, "targets", None)
        self.targets: list[int] = ([int(parent_targets[i]) for i in self.indices]
                                   if parent_targets is not None else [])


def subset(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """A reproducible random subset of ``n`` items (indices kept in ascending order).

    Used to sample training images for the activation statistics. Asking for more items
    than the dataset has returns all of them (with a warning in the log).
    """
    total = len(dataset)  # type: ignore[arg-type]
    if n <= 0:
        raise ConfigError(f"subset size must be positive, got {n}")
    if n >= total:
        if n > total:
            logger.warning("subset of %d requested from %d items; using all of them", n, total)
        return Subset(dataset, range(total))
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(total, generator=g)[:n].sort().values
    return Subset(dataset, picked.tolist())


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and numpy's RNGs in a loader worker from its torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class SeededLoader(DataLoader):
    """A DataLoader whose augmentation is reproducible also without worker processes.

    Worker processes get their torch seed from the loader's generator (PyTorch does this).
    With ``num_workers=0`` the transforms run in the main process; this loader then draws a
    seed from its generator each epoch and runs the transforms on a private RNG stream,
    swapped in around each batch, so augmentation does not depend on (nor disturb) the
    caller's global RNG.
    """

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        if self.num_workers > 0:
            return batches
        return self._private_rng(batches)

    def _private_rng(self, batches: Iterator[Any]) -> Iterator[Any]:
        seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())
        private = torch.Generator().manual_seed(seed).get_state()
        while True:
            outer = torch.get_rng_state()
            torch.set_rng_state(private)
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                private = torch.get_rng_state()
                torch.set_rng_state(outer)
            yield batch


def build_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, workers: int = 0,
                 seed: int = 0, drop_last: bool = False, distributed: bool = False,
                 deterministic: bool = True, pin_memory: bool = False) -> SeededLoader:
    """A DataLoader whose order and augmentation are fixed by ``seed``.

    Args:
        dataset: any map-style dataset.
        batch_size: images per batch (per process when distributed).
        shuffle: shuffle every epoch.
        workers: loader worker processes.
        seed: seed of the shuffling and augmentation streams.
        drop_last: drop the last incomplete batch.
        distributed: split the data over the processes of the initialised process group
            with a seeded ``DistributedSampler``; call ``loader.sampler.set_epoch(epoch)``
            each epoch to reshuffle.
        deterministic: ``False`` seeds from fresh entropy instead of ``seed``.
        pin_memory: pin batches for faster host-to-GPU copies.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    if not deterministic:
        seed = int.from_bytes(os.urandom(8), "little") >> 2
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ConfigError("distributed=True needs an initialised torch.distributed "
                              "process group (launch with torchrun)")
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
    return SeededLoader(dataset, batch_size=batch_size,
                        shuffle=shuffle if sampler is None else False, sampler=sampler,
                        num_workers=workers, generator=generator, worker_init_fn=_seed_worker,
                        drop_last=drop_last, pin_memory=pin_memory)


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
