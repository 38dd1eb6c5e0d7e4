"""The run directory: one owner at a time, never silently overwritten, never mixed up.

A run directory is recognised by its own marker, ``run.json``: which command wrote it,
with which configuration, and every file it wrote there. A file is listed in the marker
before it is written (every cdprune write goes through :mod:`cdprune.fileio`, which calls
back here), so even a run killed half-way lists all it left behind. A ``config.yaml`` or a
lock file alone never makes a folder a run.

A new run refuses a directory that holds another run or anything else; ``--overwrite``
removes only the files the marker lists, and refuses a directory that also holds files
cdprune did not write or an input of the same command; ``--resume`` continues only a run
of the same command and configuration, and never replaces a file it did not write. The
two flags exclude each other. All of this is decided while holding the directory's lock,
so two processes cannot both find it empty.

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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..fileio import add_write_hook, atomic_write_text, remove_write_hook
from ..finetune.distributed import is_main_process
from .files import CONFIG, LAST, LOCK, MANIFEST, PRUNED

__all__ = ["RunDir", "adopt_writes", "config_identity"]

logger = logging.getLogger(__name__)

# Temporary files of cdprune.checkpoint.atomic_write_bytes: ".NAME.XXXXXXXX.tmp".
_TEMP_NAME = re.compile(r"^\.(?P<name>[^/]+)\.[A-Za-z0-9_]{8}\.tmp$")
MANIFEST_FORMAT = "cdprune.run/2"
# Commands whose run can be continued with --resume (they fine-tune, epoch by epoch).
RESUMABLE = ("run", "finetune")
# Options that do not change what a run computes, or that a resume may change on purpose
# (a longer schedule): they are left out of the configuration a resume must match.
VOLATILE = frozenset({"command", "resume", "overwrite", "no_progress", "log_interval",
                      "workers", "device",
                      "data_root", "download", "epochs", "max_iters", "eval_batch_size",
                      "output_dir", "config", "debug", "quick"})
# Datasets that fine-tuning holds in memory and augments per batch without DataLoader
# workers (cdprune.finetune.fastdata): there, -j cannot change what a run computes.
_IN_MEMORY = ("cifar10", "cifar100", "digits")
# How many entries a refusal names.
_SHOWN = 3


def config_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a configuration that decides a run's results, as plain JSON data."""
    plain = json.loads(json.dumps({k: v for k, v in config.items() if k not in VOLATILE},
                                  default=str, sort_keys=True))
    return plain


def _digest(identity: Mapping[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, as written or with links resolved."""
    for a, b in ((os.path.abspath(path), os.path.abspath(folder)),
                 (os.path.realpath(path), os.path.realpath(folder))):
        if a == b or a.startswith(b.rstrip(os.sep) + os.sep):
            return True
    return False


def _shown(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run.json`` of a run directory, checked field by field; ``None`` if absent.

    Raises:
        CheckpointError: the file is there but unreadable, or not a record of a run.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    fix = ("cdprune cannot tell which files there it wrote, so it touches none of them: "
           "choose another --output-dir (or remove the directory yourself)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"'{path}' is corrupt ({exc}); {fix}") from None
    if isinstance(data, dict) and data.get("format") == "cdprune.run/1":
        raise CheckpointError(f"'{path}' was written by an older cdprune that did not list "
                              f"its files; {fix}")
    if not (isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT
            and isinstance(data.get("stage"), str)
            and isinstance(data.get("config"), dict)
            and isinstance(data.get("files"), list)
            and all(isinstance(f, str) for f in data["files"])):
        raise CheckpointError(f"'{path}' is not a cdprune run record; {fix}")
    return data


class RunDir:
    """An output directory owned by one run: never silently overwritten, locked while used.

    Args:
        path: the directory.
        resume: continue the run that wrote there before (same command, same config).
        overwrite: replace the run there: the files its ``run.json`` lists are removed once
            the lock is held. Refused together with ``resume``, for a directory that also
            holds files cdprune did not write, and when an input lies inside it.
        stage: the command writing the run (``run``, ``stats``, ...), recorded in
            ``run.json``; ``None`` records nothing and checks nothing on resume.
        config: the configuration of the run; its result-deciding part is recorded, and
            a resume with another one is refused. Its ``workers`` and ``epochs`` are
            checked on resume too (another ``-j`` where it would change the result, fewer
            epochs than the run finished).
        inputs: what this run reads, by flag (``{"--stats": path}``): none of them may lie
            inside the directory when ``overwrite`` would clear it.
        replaces: with this stage recorded in ``run.json``, the directory is replaced
            without ``overwrite`` (the demo replaces its own earlier runs).

    Raises:
        ConfigError: the directory is a file or a broken link, holds another run or files
            no run wrote and the flags do not allow it, or another process holds it.
        CheckpointError: ``run.json`` is there but unreadable.

    A run that fails before writing anything but its bookkeeping files leaves nothing
    behind: if the directory did not exist before, it is removed again. Temporary files
    that a killed writer left (``.NAME.*.tmp``) are deleted once the lock is held.
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = False,
                 overwrite: bool = False, stage: str | None = None,
                 config: Mapping[str, Any] | None = None,
                 inputs: Mapping[str, str | os.PathLike | None] | None = None,
                 replaces: str | None = None):
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        self.stage = stage
        self.identity = config_identity(config) if config is not None else None
        self.config = dict(config or {})
        self.inputs = {flag: Path(p) for flag, p in (inputs or {}).items() if p}
        self.replaces = replaces
        self.main = is_main_process()  # under torchrun only rank 0 owns (and writes) the run
        self._fh = None
        self._created: Path | None = None
        self._replace = False  # set by _check_existing: clear the old run on entry
        self._files: set[str] = set()  # what this run owns, relative to the directory
        self._old: set[str] = set()  # what the run it replaces owned
        if resume and overwrite:
            raise ConfigError("{resume} and {overwrite} exclude each other: {resume} continues "
                              "the run in the output directory, {overwrite} removes it; give "
                              "one of them")
        if not self.main:
            return
        if self.path.is_symlink() and not self.path.exists():
            raise ConfigError(f"{{output_dir}} '{self.path}' is a broken or looping symbolic "
                              "link; point it at a directory or choose another {output_dir}")
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{{output_dir}} '{self.path}' is a file, not a directory; choose "
                              "another {output_dir}")
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
        return sorted(p for p in self.path.iterdir() if p.name != LOCK)

    def _walk(self) -> Iterator[str]:
        """Every file, link and empty folder under the directory, relative, lock left out."""
        for root, dirs, files in os.walk(self.path):
            rel = Path(root).relative_to(self.path)
            for d in list(dirs):
                if os.path.islink(os.path.join(root, d)):  # a link is an entry, not followed
                    dirs.remove(d)
                    files.append(d)
            if not dirs and not files and rel != Path("."):
                yield rel.as_posix() + "/"
            for name in sorted(files):
                if rel == Path(".") and name == LOCK:
                    continue
                yield (rel / name).as_posix()

    def _foreign(self, owned: set[str], limit: int = 20) -> list[str]:
        """Entries the marker does not list (a killed write's temporaries of listed files
        count as listed); at most ``limit``."""
        found = []
        for rel in self._walk():
            parent, _, name = rel.rpartition("/")
            temp = _TEMP_NAME.match(name)
            if rel in owned or (temp and f"{parent}/{temp['name']}".lstrip("/") in owned):
                continue
            if rel.endswith("/") and any(o.startswith(rel) for o in owned):
                continue
            found.append(rel)
            if len(found) >= limit:
                break
        return found

    def manifest(self) -> dict[str, Any] | None:
        """``run.json`` of the run in the directory, or ``None`` if there is none.

        Raises:
            CheckpointError: the file is there but unreadable, or not a record of a run.
        """
        return read_manifest(self.path)

    def _check_existing(self) -> None:
        existing = self._existing()
        if not existing:
            return
        record = self.manifest()
        where = f"output directory '{self.path}'"
        if record is None:
            names = _shown([p.name for p in existing])
            raise ConfigError(f"{where} is not empty ({names}) and holds no cdprune run "
                              f"(no {MANIFEST}): files no cdprune run wrote are left "
                              "alone, with or without {overwrite}; choose another "
                              "{output_dir}")
        owned = {MANIFEST, *record["files"]}
        if self.overwrite or (self.replaces and record["stage"] == self.replaces):
            self._check_inputs()
            foreign = self._foreign(owned)
            if foreign:
                raise ConfigError(
                    f"{where} holds files that no cdprune run wrote ({_shown(foreign)}) "
                    f"beside the run: {{overwrite}} removes only the files its "
                    f"{MANIFEST} lists and never a folder holding others; move them "
                    "out, or choose another {output_dir}")
            self._replace, self._old = True, owned
            return
        if not self.resume:
            raise ConfigError(f"{where} already holds a run (written by `cdprune "
                              f"{record['stage']}`); {self._flag_hint()}, or choose another "
                              "{output_dir}")
        self._files = set(owned)
        if record.get("clearing"):
            raise ConfigError(f"{where} holds a run whose {{overwrite}} was interrupted while "
                              "removing the old run's files; run the command again with "
                              "{overwrite} (without {resume})")
        if self.stage is None:
            return
        if record["stage"] != self.stage:
            raise ConfigError(f"{where} was written by `cdprune {record['stage']}`, not "
                              f"`cdprune {self.stage}`; {{resume}} continues only the same "
                              "command: pass {overwrite} to replace it, or choose another "
                              "{output_dir}")
        if self.identity is not None and record["config"] != self.identity:
            old, new = record["config"], self.identity
            diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            shown = ", ".join(f"{k} {old.get(k)!r} there, {new.get(k)!r} now"
                              for k in diff[:3])
            raise ConfigError(f"{where} holds a run with another configuration ({shown}); "
                              "{resume} needs the same options: repeat them, or pass "
                              "{overwrite} to start again")
        self._check_workers(record)
        self._check_epochs()

    def _check_inputs(self) -> None:
        """--overwrite clears the directory: nothing this command reads may lie inside it."""
        for flag, path in self.inputs.items():
            if (path.exists() or path.is_symlink()) and _inside(path, self.path):
                raise ConfigError(f"{flag} '{path}' lies inside {{output_dir}} '{self.path}', "
                                  "which {overwrite} would clear; move it out of the "
                                  "directory, or choose another {output_dir}")

    def _workers_free(self) -> bool:
        """Whether another -j leaves the result unchanged: fine-tuning data held in memory
        (no DataLoader workers draw the augmentation), in a single process."""
        c = self.config
        return (c.get("fast_data", True) is not False
                and str(c.get("dataset") or "").lower() in _IN_MEMORY
                and int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1)

    def _check_workers(self, record: Mapping[str, Any]) -> None:
        before, now = record.get("workers"), self.config.get("workers")
        if before is None or now is None or int(before) == int(now) or self._workers_free():
            return
        why = ("the fast data path off ({fast_data})" if self.config.get("fast_data") is False
               else f"dataset '{self.config.get('dataset')}'")
        raise ConfigError(f"{{resume}} with {{workers}} {now}, but the run in '{self.path}' was "
                          f"started with {{workers}} {before}: with {why} every DataLoader "
                          "worker draws its own augmentation stream, so another {workers} "
                          f"would change the result; resume with {{workers}} {before}")

    def _check_epochs(self) -> None:
        """A finished run's record is never rewritten by a resume with fewer epochs."""
        epochs = self.config.get("epochs")
        last = self.path / LAST
        if self.stage not in RESUMABLE or epochs is None or not last.is_file():
            return
        from ..checkpoint import safe_torch_load

        try:
            done = safe_torch_load(last).get("epoch")
        except (CheckpointError, AttributeError):
            return  # a damaged last.pth: fine-tuning refuses it in its own words
        if isinstance(done, int) and not isinstance(done, bool) and epochs < done:
            raise ConfigError(f"{{epochs}} {epochs} is fewer than the {done} epochs the run in "
                              f"'{self.path}' already finished; {{resume}} continues a run and "
                              f"never shortens its record: give {{epochs}} {done} or more, or "
                              "choose another {output_dir}")

    def _busy(self) -> ConfigError:
        return ConfigError(f"another cdprune process is using '{self.path}' (lock file "
                           f"{LOCK}); wait for it to finish or choose another --output-dir")

    def _locked_elsewhere(self) -> bool:
        """Whether a live process holds the lock (checked before anything is read or written).

        Only called before this process takes the lock: closing any descriptor of the
        file would release a POSIX lock this process holds.
        """
        lock = self.path / LOCK
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

    # ------------------------------------------------------------------ the marker
    def _write_manifest(self, *, clearing: bool = False) -> None:
        if self.stage is None:
            return
        doc = {"format": MANIFEST_FORMAT, "stage": self.stage,
               "config_hash": _digest(self.identity or {}), "config": self.identity or {},
               "files": sorted(self._files | (self._old if clearing else set()))}
        if self.config.get("workers") is not None:
            doc["workers"] = int(self.config["workers"])
        if clearing:
            doc["clearing"] = True
        atomic_write_text(self.path / MANIFEST,
                          json.dumps(doc, indent=1, sort_keys=True) + "\n")

    def _own(self, path: Path) -> None:
        """Write hook: list ``path`` in ``run.json`` before it is written (paths inside the
        directory only); refuse to replace a file this run does not own."""
        try:
            rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(self.path))
        except ValueError:
            return
        name = rel.as_posix()
        if name in self._files or name == MANIFEST:
            return
        if os.path.lexists(path):
            raise ConfigError(f"'{path}' exists and no cdprune run wrote it; it is left alone: "
                              f"move it out of '{self.path}', or choose another {{output_dir}}")
        self._files.add(name)
        self._write_manifest()

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
        fh = open(self.path / LOCK, "a+")  # noqa: SIM115 - held for the run's life
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
            if not self.resume:
                self._files = set()
            self._files |= {MANIFEST, CONFIG}
            if self._replace:
                self._clear()
            self._remove_stale_temporaries()
            self._write_manifest()
            add_write_hook(self._own)
        except BaseException:
            self._release()
            raise
        return self

    def _clear(self) -> None:
        """Remove the old run's files: only those its ``run.json`` lists, nothing else.

        The new run's marker comes first, flagged as clearing and still listing the old
        files: a run killed half-way is never resumed from the old run's checkpoints, and
        ``--overwrite`` can finish the job.
        """
        logger.info("removing the previous run in %s (%d files)", self.path, len(self._old))
        self._write_manifest(clearing=True)
        folders = set()
        for rel in sorted(self._old - {MANIFEST, CONFIG}):
            entry = self.path / rel
            folders.update(p for p in Path(rel).parents if p != Path("."))
            temps = entry.parent.glob(f".{entry.name}.*.tmp") if entry.parent.is_dir() else ()
            for stale in [entry, *temps]:
                if stale == entry or _TEMP_NAME.match(stale.name):
                    if os.path.lexists(stale) and (stale.is_symlink() or not stale.is_dir()):
                        stale.unlink()
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            try:
                (self.path / folder).rmdir()  # only when empty: nothing unlisted goes
            except OSError:
                pass
        (self.path / CONFIG).unlink(missing_ok=True)

    def _remove_stale_temporaries(self) -> None:
        for folder in (self.path, self.path / PRUNED):  # left by a writer that was killed
            for stale in folder.glob(".*.tmp"):
                match = _TEMP_NAME.match(stale.name)
                rel = (stale.parent / match["name"]).relative_to(self.path).as_posix() \
                    if match else None
                if match and stale.is_file() and rel in self._files:
                    logger.info("removing %s, left by an interrupted write", stale)
                    stale.unlink(missing_ok=True)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._fh is None:
            return
        remove_write_hook(self._own)
        if exc_type is not None and self._created is not None:
            self._remove_if_untouched()
        self._release()

    def _release(self) -> None:
        if self._fh is None:
            return
        remove_write_hook(self._own)
        fcntl.lockf(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None

    def _remove_if_untouched(self) -> None:
        """After a failure: remove the new directory if the run wrote no results into it."""
        own = {LOCK, CONFIG, MANIFEST}
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
        """Write the resolved configuration to ``config.yaml`` (rank 0 only).

        Every option, set or default, and the command's own inputs, as the flat mapping a
        YAML config file holds: ``cdprune COMMAND -c config.yaml --output-dir OTHER``
        repeats the run. The command and the config file it read are said in a comment.
        """
        import yaml

        if not self.main:
            return self.path / CONFIG
        clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in config.items()
                 if k not in ("command", "config")}
        command = config.get("command") or self.stage
        head = (f"# cdprune {command}: the resolved configuration of this run"
                + (f" (defaults from {config['config']})" if config.get("config") else "")
                + f"\n# repeat it: cdprune {command} -c config.yaml --output-dir OTHER\n")
        return atomic_write_text(self.path / CONFIG,
                                 head + yaml.safe_dump(clean, sort_keys=True))


@contextmanager
def adopt_writes(folder: str | os.PathLike) -> Iterator[None]:
    """List files written meanwhile into the run directory that holds ``folder``.

    For commands that add to a finished run without being one (``cdprune export`` writes
    ``model.onnx`` beside the weights): their files join the run's ``run.json``, so a later
    ``--overwrite`` removes them too instead of refusing the directory. ``folder`` is the
    run directory or one below it (``pruned/``). Nothing happens outside a run directory,
    or while another process holds the run (a warning says so).
    """
    folder = Path(folder)
    run_path = next((d for d in (folder, folder.parent)
                     if (d / MANIFEST).is_file()), None)
    if run_path is None or not is_main_process():
        yield
        return
    try:
        fh = open(run_path / LOCK, "a+")  # noqa: SIM115 - closed below
    except OSError:
        yield
        return
    with fh:
        try:
            fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            logger.warning("another process is using '%s': the files written now are not "
                           "listed in its %s, and --overwrite will refuse the directory "
                           "until they are moved", run_path, MANIFEST)
            yield
            return
        try:
            try:
                doc = read_manifest(run_path)
            except CheckpointError:
                doc = None
            if doc is None:
                yield
                return
            files = set(doc["files"])

            def own(path: Path) -> None:
                try:
                    rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(run_path))
                except ValueError:
                    return
                name = rel.as_posix()
                if name in files or name == MANIFEST:
                    return
                if os.path.lexists(path):
                    raise ConfigError(f"'{path}' exists and no cdprune run wrote it; it is "
                                      "left alone: move it, or choose another output path")
                files.add(name)
                doc["files"] = sorted(files)
                atomic_write_text(run_path / MANIFEST,
                                  json.dumps(doc, indent=1, sort_keys=True) + "\n")

            add_write_hook(own)
            try:
                yield
            finally:
                remove_write_hook(own)
        finally:
            fcntl.lockf(fh.fileno(), fcntl.LOCK_UN)
