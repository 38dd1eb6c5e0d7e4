"""Atomic file writing: readers see the old file or the new one, never half of it.

Everything cdprune writes goes to a temporary file in the destination folder first and is
then moved into place with ``os.replace``, so a crash or a full disk never leaves a
half-written file under the real name.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["add_write_hook", "atomic_torch_save", "atomic_write_bytes", "atomic_write_text",
           "remove_write_hook"]

# Read once: os.umask can only be read by setting it, which is not thread-safe per write.
_UMASK = os.umask(0)
os.umask(_UMASK)


# Called with every path about to be written, before anything is created: a run directory
# records each file it owns before the file exists (see cdprune.runs.rundir).
_WRITE_HOOKS: list[Callable[[Path], None]] = []


def add_write_hook(hook: Callable[[Path], None]) -> None:
    """Call ``hook(path)`` before every atomic write; it may raise to refuse the write."""
    _WRITE_HOOKS.append(hook)


def remove_write_hook(hook: Callable[[Path], None]) -> None:
    """Stop calling a hook added by :func:`add_write_hook` (no error if it is not there)."""
    if hook in _WRITE_HOOKS:
        _WRITE_HOOKS.remove(hook)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The bytes go to a temporary file in the same folder (same file system, so the final
    rename is atomic), are flushed and fsynced, then moved over ``path``. On any error the
    temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    for hook in list(_WRITE_HOOKS):
        hook(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600; give the file the permissions open() would have.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:
            # A failed write (a full disk) names no file; say which one it was.
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 text (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically ``torch.save`` an object made of plain data and tensors.

    The object should be loadable with ``weights_only=True``: dicts, lists, numbers,
    strings and tensors only.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())
