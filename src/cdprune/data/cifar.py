"""CIFAR-10/100 read from the official python archive layout, and its download.

The batch files are pickles, so they are opened with a restricted unpickler that can only
rebuild plain containers and numeric numpy arrays; by default their sizes are also checked
against the official files before anything is read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .transforms import ToFloat, Transform

logger = logging.getLogger(__name__)


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


class CifarBase(Dataset):
    """The CIFAR-10/100 Python-pickle batches held in memory (shared by the fast loaders)."""
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


class CIFAR10(CifarBase):
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


class CIFAR100(CifarBase):
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
