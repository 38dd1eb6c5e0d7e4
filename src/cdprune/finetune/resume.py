"""What makes a fine-tuning resume exact: per-epoch seeds, generator states, checkpoints.

``last.pth`` holds plain data only (``torch.load(weights_only=True)`` reads it back);
:func:`seed_epoch` sets every generator from ``(seed, epoch, rank)`` so nothing random
carries over between epochs, and a resume checks the file before it trusts it.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from ..checkpoint import safe_torch_load
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write_text
from .config import TrainConfig, lr_factor
from .distributed import get_rank

__all__ = ["seed_epoch"]

# Resume warnings belong to training, whose logger users already listen to.
logger = logging.getLogger("cdprune.finetune.loop")

CHECKPOINT_VERSION = 1


# ------------------------------------------------------------------------ seeding
def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    # SeedSequence mixes the three numbers, so seed 1 epoch 0 is unrelated to seed 0 epoch 1.
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def seed_epoch(loader: DataLoader, seed: int, epoch: int) -> int:
    """Set every random generator that one epoch of ``loader`` may draw from.

    Seeds torch (CPU and CUDA), Python's ``random`` and NumPy globally, the loader's and its
    sampler's own generators, and calls ``set_epoch`` on a sampler that has it
    (``DistributedSampler``, whose order depends on its own seed and the epoch). The seed
    also mixes in the process rank so that ranks draw different augmentations.

    Returns:
        The derived seed.
    """
    value = _epoch_seed(seed, epoch, get_rank())
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)
    batch_sampler = getattr(loader, "batch_sampler", None)
    samplers = [getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)]
    for owner in [loader, *samplers]:
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(value)
    for sampler in samplers:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
    return value


def rng_state() -> dict[str, Any]:
    """All global generator states as plain lists and tensors (``weights_only``-safe)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        "numpy": {"name": np_name, "keys": np_keys.tolist(), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back the generator states that :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))


# ------------------------------------------------------------------------- result


# ----------------------------------------------------------------------- helpers
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def check_plain(obj: Any, where: str = "extra_state") -> None:
    """Refuse anything ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise ConfigError(f"{where} has a key {key!r} of type {type(key).__name__}; "
                                  "use str or int keys")
            check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise ConfigError(f"{where} is a {type(obj).__name__}; checkpoints hold only dicts, lists, "
                      "numbers, strings, None and tensors, so convert it to plain data")



def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """Write one JSON line per finished epoch to ``metrics.jsonl``."""
    # Rewritten whole (atomically) each epoch, so it always matches last.pth exactly, even
    # after a crash between the two writes and a resume.
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))


def load_resume(path: Path, model: nn.Module, config: TrainConfig) -> dict[str, Any]:
    """Load a ``last.pth`` training checkpoint into ``model`` and return its state."""
    state = safe_torch_load(path)
    if not isinstance(state, Mapping) or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"'{path}' is not a cdprune training checkpoint (version "
                              f"{CHECKPOINT_VERSION}); resume from a last.pth that fine_tune "
                              "wrote, or start without resume")
    _check_resume_state(state, path)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"cannot resume from '{path}': its weights do not fit the model "
            f"({str(exc).splitlines()[0][:300]}); resume with the same (pruned) "
            "architecture") from None
    saved = state.get("config") or {}
    changed = sorted(k for k, v in config.to_dict().items() if k in saved and saved[k] != v)
    if changed:
        logger.warning("resuming with changed options: %s", ", ".join(
            f"{k} {saved[k]!r} -> {getattr(config, k)!r}" for k in changed))
    return state


def _check_resume_state(state: Mapping[str, Any], path: Path) -> None:
    """Every field a resume reads has its type: refuse a damaged ``last.pth`` in one line."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    expected = {
        "model": lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
        "optimizer": lambda v: isinstance(v, Mapping) and "param_groups" in v,
        "scheduler": lambda v: isinstance(v, Mapping),
        "epoch": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "iteration": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "best_acc": number,
        "history": lambda v: isinstance(v, list) and all(isinstance(r, Mapping) for r in v),
        "rng": lambda v: isinstance(v, Mapping),
    }
    for key, ok in expected.items():
        if key not in state or not ok(state[key]):
            what = "lacks" if key not in state else "has a malformed"
            raise CheckpointError(f"cannot resume from '{path}': it {what} '{key}' entry; "
                                  "the file is damaged: start again without resuming (or "
                                  "overwrite the run)")
    if len(state["history"]) != state["epoch"]:
        raise CheckpointError(f"cannot resume from '{path}': its history has "
                              f"{len(state['history'])} epochs but it says epoch "
                              f"{state['epoch']}; the file is damaged: start again")


def replan(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, saved: Mapping[str, Any],
           config: TrainConfig, iteration: int, iters_per_epoch: int) -> None:
    """On a resume whose schedule changed (more epochs...), follow the new schedule at once.

    The scheduler computes every step from the current config, but the optimizer keeps the
    learning rate of the old schedule's last step (0 at the end of a cosine) until the next
    step; it is set from the new schedule here, and the change is logged.
    """
    keys = ("epochs", "lr_schedule", "lr_warmup_epochs", "milestones", "gamma")
    changed = [k for k in keys if k in saved and saved[k] != getattr(config, k)]
    if not changed:
        return
    factor = lr_factor(iteration, config, iters_per_epoch)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    logger.warning("resuming with %s changed: the learning-rate schedule is re-planned for %d "
                   "epochs (%s); training continues at lr %.4g", ", ".join(changed),
                   config.epochs, config.lr_schedule, optimizer.param_groups[0]["lr"])


