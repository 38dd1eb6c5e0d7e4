"""The run directory: one owner at a time, never silently overwritten, never mixed up.

A run directory records which command wrote it and with which configuration in
``run.json``. A new run refuses a directory that holds another run; ``--overwrite``
clears the old run's files before the new one writes any; ``--resume`` continues only a
run of the same command and configuration. All of this is decided while holding the
directory's lock, so two processes cannot both find it empty.

The lock is a POSIX record lock (``fcntl.lockf``). Unlike ``flock``, it is owned by the
process and not inherited by ``fork``: DataLoader worker processes do not keep a killed
run's directory locked, and the lock goes the moment its holder dies, even by ``kill -9``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .distributed import is_main_process
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write_text

__all__ = ["RunDir", "config_identity"]

logger = logging.getLogger(__name__)

# Temporary files of cdprune.checkpoint.atomic_write_bytes: ".NAME.XXXXXXXX.tmp".
_TEMP_NAME = re.compile(r"^\.[^/]+\.[A-Za-z0-9_]{8}\.tmp$")
MANIFEST_FORMAT = "cdprune.run/1"
# Commands whose run can be continued with --resume (they fine-tune, epoch by epoch).
RESUMABLE = ("run", "finetune")
# Options that do not change what a run computes, or that a resume may change on purpose
# (a longer schedule): they are left out of the configuration a resume must match.
VOLATILE = frozenset({"command", "resume", "overwrite", "no_progress", "log_interval",
                      "workers", "device",
                      "data_root", "download", "epochs", "max_iters", "eval_batch_size",
                      "output_dir", "config", "debug", "quick"})


def config_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a configuration that decides a run's results, as plain JSON data."""
    plain = json.loads(json.dumps({k: v for k, v in config.items() if k not in VOLATILE},
                                  default=str, sort_keys=True))
    return plain


def _digest(identity: Mapping[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RunDir:
    """An output directory owned by one run: never silently overwritten, locked while used.

    Args:
        path: the directory.
        resume: continue the run that wrote there before (same command, same config).
        overwrite: replace the run there: its files are removed once the lock is held.
        stage: the command writing the run (``run``, ``stats``, ...), recorded in
            ``run.json``; ``None`` records nothing and checks nothing on resume.
        config: the configuration of the run; its result-deciding part is recorded, and
            a resume with another one is refused.
        keep: paths inside the directory that this run reads (``--stats``, a pruned
            model): kept when ``overwrite`` clears the directory.
        replaces: with this stage recorded in ``run.json``, the directory is replaced
            without ``overwrite`` (the demo replaces its own earlier runs).

    Raises:
        ConfigError: the directory is a file or a broken link, holds another run and
            neither ``resume`` nor ``overwrite`` allows it, or another process holds it.

    A run that fails before writing anything but its bookkeeping files leaves nothing
    behind: if the directory did not exist before, it is removed again. Temporary files
    that a killed writer left (``.NAME.*.tmp``) are deleted once the lock is held.
    """

    LOCK = ".cdprune.lock"
    CONFIG = "config.yaml"
    MANIFEST = "run.json"

    def __init__(self, path: str | os.PathLike, *, resume: bool = False,
                 overwrite: bool = False, stage: str | None = None,
                 config: Mapping[str, Any] | None = None,
                 keep: Iterable[str | os.PathLike] = (), replaces: str | None = None):
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        self.stage = stage
        self.identity = config_identity(config) if config is not None else None
        self.keep = [Path(p) for p in keep if p]
        self.replaces = replaces
        self.main = is_main_process()  # under torchrun only rank 0 owns (and writes) the run
        self._fh = None
        self._created: Path | None = None
        self._replace = False  # set by _check_existing: clear the old run on entry
        if not self.main:
            return
        if self.path.is_symlink() and not self.path.exists():
            raise ConfigError(f"--output-dir '{self.path}' is a broken or looping symbolic "
                              "link; point it at a directory or choose another --output-dir")
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--output-dir '{self.path}' is a file, not a directory; choose "
                              "another --output-dir")
        if self._locked_elsewhere():
            raise self._busy()
        self._check_existing()  # early, before any work; again under the lock

    # ------------------------------------------------------------------ checks
    def _flag_hint(self) -> str:
        if self.stage in RESUMABLE:
            return "pass --resume to continue it, --overwrite to replace it"
        return "pass --overwrite to replace it"

    def _existing(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if p.name != self.LOCK)

    def manifest(self) -> dict[str, Any] | None:
        """``run.json`` of the run in the directory, or ``None`` if there is none.

        Raises:
            CheckpointError: the file is there but unreadable.
        """
        path = self.path / self.MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"'{path}' is corrupt ({exc}); pass --overwrite to replace "
                                  "the run") from None
        if not (isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT
                and isinstance(data.get("stage"), str)
                and isinstance(data.get("config"), dict)):
            raise CheckpointError(f"'{path}' is not a cdprune run record; pass --overwrite to "
                                  "replace the run")
        return data

    def _check_existing(self) -> None:
        existing = self._existing()
        if not existing:
            return
        record = self.manifest()
        where = f"output directory '{self.path}'"
        ours = record is not None or any((self.path / n).is_file()
                                         for n in (self.CONFIG, self.LOCK))
        if not ours:
            if self.overwrite or self.resume:
                raise ConfigError(f"{where} holds files that no cdprune run wrote "
                                  f"({existing[0].name}, ...); it is left alone: choose "
                                  "another --output-dir")
            raise ConfigError(f"{where} is not empty ({existing[0].name}, ...); choose "
                              "another --output-dir")
        if self.overwrite or (record and self.replaces and record["stage"] == self.replaces):
            self._replace = True
            return
        written = f" (written by `cdprune {record['stage']}`)" if record else ""
        if not self.resume:
            raise ConfigError(f"{where} already holds a run{written}; {self._flag_hint()}, "
                              "or choose another --output-dir")
        if self.stage is None:
            return
        if record is None:
            raise ConfigError(f"{where} holds a run without {self.MANIFEST} (an older cdprune "
                              "wrote it); it cannot be resumed safely: pass --overwrite to "
                              "start again, or choose another --output-dir")
        if record["stage"] != self.stage:
            raise ConfigError(f"{where} was written by `cdprune {record['stage']}`, not "
                              f"`cdprune {self.stage}`; --resume continues only the same "
                              "command: pass --overwrite to replace it, or choose another "
                              "--output-dir")
        if self.identity is not None and record["config"] != self.identity:
            old, new = record["config"], self.identity
            diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            shown = ", ".join(f"{k} {old.get(k)!r} there, {new.get(k)!r} now"
                              for k in diff[:3])
            raise ConfigError(f"{where} holds a run with another configuration ({shown}); "
                              "--resume needs the same options: repeat them, or pass "
                              "--overwrite to start again")

    def _busy(self) -> ConfigError:
        return ConfigError(f"another cdprune process is using '{self.path}' (lock file "
                           f"{self.LOCK}); wait for it to finish or choose another --output-dir")

    def _locked_elsewhere(self) -> bool:
        """Whether a live process holds the lock (checked before anything is read or written).

        Only called before this process takes the lock: closing any descriptor of the
        file would release a POSIX lock this process holds.
        """
        lock = self.path / self.LOCK
        if not lock.is_file():
            return False
        try:
            fh = open(lock, "r+")  # noqa: SIM115 - a write lock needs a writable descriptor
        except PermissionError:
            return False  # a read-only directory: taking the lock will say so
        with fh:
            try:
                fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    return True
                raise
            fcntl.lockf(fh.fileno(), fcntl.LOCK_UN)
        return False

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> RunDir:
        if not self.main:
            return self
        missing = None  # the topmost folder this run creates, removed again if it fails early
        for folder in (self.path, *self.path.parents):
            if folder.exists():
                break
            missing = folder
        self.path.mkdir(parents=True, exist_ok=True)
        fh = open(self.path / self.LOCK, "a+")  # noqa: SIM115 - held for the run's life
        try:
            fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise self._busy() from None
            raise
        self._fh = fh
        self._created = missing
        try:
            self._check_existing()  # under the lock: nobody can fill the directory meanwhile
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            if self._replace:
                self._clear()
            self._remove_stale_temporaries()
            if self.stage is not None and not (self.resume and self.manifest()):
                atomic_write_text(self.path / self.MANIFEST, json.dumps({
                    "format": MANIFEST_FORMAT, "stage": self.stage,
                    "config_hash": _digest(self.identity or {}),
                    "config": self.identity or {}}, indent=1, sort_keys=True) + "\n")
        except BaseException:
            self._release()
            raise
        return self

    def _clear(self) -> None:
        """Remove the old run's files (not the lock, not what this run reads)."""
        keep = {p.resolve() for p in self.keep}
        entries = self._existing()
        # run.json goes first: a run killed half-way through clearing is never taken for
        # the old run by --resume.
        entries.sort(key=lambda p: p.name != self.MANIFEST)
        logger.info("removing the previous run in %s (%d entries)", self.path, len(entries))
        for entry in entries:
            resolved = entry.resolve()
            if any(k == resolved or resolved in k.parents for k in keep):
                continue  # an input of this run, or a folder holding one
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _remove_stale_temporaries(self) -> None:
        for folder in (self.path, self.path / "pruned"):  # left by a writer that was killed
            for stale in folder.glob(".*.tmp"):
                if _TEMP_NAME.match(stale.name) and stale.is_file():
                    logger.info("removing %s, left by an interrupted write", stale)
                    stale.unlink(missing_ok=True)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._fh is None:
            return
        if exc_type is not None and self._created is not None:
            self._remove_if_untouched()
        self._release()

    def _release(self) -> None:
        if self._fh is None:
            return
        fcntl.lockf(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None

    def _remove_if_untouched(self) -> None:
        """After a failure: remove the new directory if the run wrote no results into it."""
        own = {self.LOCK, self.CONFIG, self.MANIFEST}
        if any(p.name not in own for p in self.path.iterdir()):
            return  # results of finished stages (checkpoints...) are kept for --resume
        for name in own:
            (self.path / name).unlink(missing_ok=True)
        folder = self.path
        while True:
            try:
                folder.rmdir()
            except OSError:
                return
            if folder == self._created:
                return
            folder = folder.parent

    def write_config(self, config: Mapping[str, Any]) -> Path:
        """Write the resolved configuration to ``config.yaml`` (rank 0 only)."""
        import yaml

        if not self.main:
            return self.path / self.CONFIG
        clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in config.items()}
        return atomic_write_text(self.path / self.CONFIG,
                                 yaml.safe_dump(clean, sort_keys=True))
