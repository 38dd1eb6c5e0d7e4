"""Fine-tuning a (pruned) network: SGD, a per-iteration schedule, exact resume.

:func:`fine_tune` trains with SGD (Nesterov momentum, weight decay on every parameter as
the published code does, BatchNorm and biases included), label-smoothed cross-entropy and a
learning rate that changes every iteration: an optional linear warmup, then cosine decay
to zero or step decay at epoch milestones.

Every epoch ends with a validation pass and an atomic checkpoint ``last.pth`` (and
``best.pth`` when top-1 improved) in plain data that ``torch.load(weights_only=True)``
accepts. ``resume=True`` continues from ``last.pth`` with the *same* result as a run that
was never interrupted, because nothing random carries over between epochs: at the start of
epoch ``e`` the torch, CUDA, Python and NumPy generators, the loader's and sampler's
generators, and ``DistributedSampler.set_epoch(e)`` are all set from ``(seed, e, rank)``.
Data order and augmentation therefore depend only on the seed and the epoch number.
(Loaders with ``persistent_workers=True`` keep worker processes, and their random state,
across epochs; random augmentations in such workers are not reproduced on resume.)

Under ``torch.distributed`` (see :mod:`cdprune.distributed`) the model is wrapped in
DistributedDataParallel, metrics are summed over ranks so every rank reports global
numbers, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import atomic_torch_save, atomic_write_text, safe_torch_load
from .distributed import (
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    get_rank,
    is_distributed,
    is_main_process,
)
from .errors import CheckpointError, ConfigError, DataError
from .evaluate import evaluate, model_device
from .options import option

__all__ = [
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "build_scheduler",
    "fine_tune",
    "lr_factor",
    "seed_epoch",
]

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "step")
LAST = "last.pth"
BEST = "best.pth"
METRICS = "metrics.jsonl"
CHECKPOINT_VERSION = 1
_POSTFIX_EVERY = 10  # iterations between progress-bar updates (each one waits for the GPU)


# ----------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Hyper-parameters of fine-tuning (defaults: the published CIFAR recipe).

    Attributes:
        epochs: passes over the training data.
        lr: peak learning rate.
        momentum: SGD momentum, in [0, 1).
        nesterov: Nesterov momentum (needs momentum > 0).
        weight_decay: L2 penalty, applied to every parameter.
        batch_size: images per batch per process. :func:`fine_tune` takes ready loaders,
            so this records what the caller built them with.
        lr_schedule: ``"cosine"`` (to zero at the last iteration) or ``"step"``.
        milestones: epochs at which the step schedule multiplies the rate by ``gamma``.
        gamma: step-schedule factor, in (0, 1].
        lr_warmup_epochs: epochs (may be fractional) of linear warmup from ``lr / n`` to
            ``lr``, counted in iterations; the main schedule starts after it.
        label_smoothing: cross-entropy label smoothing, in [0, 1).
        amp: mixed precision on CUDA (ignored on CPU): bfloat16 autocast where the GPU
            supports it, else float16 autocast with gradient scaling.
        channels_last: channels-last memory format; CUDA only.
        compile: train through ``torch.compile(model)`` (evaluation uses the plain model).
        fast_data: when the training and validation loaders read an in-memory dataset
            (CIFAR, digits, synthetic) with the standard transforms, replace them by
            :class:`cdprune.fastdata.DeviceBatches`: the whole dataset on the training
            device, augmented a batch at a time there, no loader workers. Same order and
            augmentation for the same seed and epoch on every device; not the same draws
            as the DataLoader path. Other loaders are used as given.
        eval_every: evaluate every this many epochs (the last epoch always); epochs in
            between record no validation numbers.
        max_iters: stop after this many iterations in total (a quick look). The schedule
            is still the one planned for ``epochs``; it is merely cut short.
        seed: root of all per-epoch randomness (see the module docstring).
        sync_bn: convert BatchNorm to SyncBatchNorm under torch.distributed on CUDA (the
            layers are swapped back after training; ignored elsewhere).
        clip_grad_norm: clip the global gradient norm to this value.
        log_every: iterations between log lines.
    """

    # Fields with a help are command-line flags too (see cdprune.options); the others are
    # set from Python, or by another flag group (batch size, seed).
    epochs: int = option(300, "passes over the training data")
    lr: float = option(0.1, "initial learning rate")
    momentum: float = option(0.9, "SGD momentum (Nesterov)")
    nesterov: bool = True
    weight_decay: float = option(5e-4, "weight decay", flags=("--wd", "--weight-decay"))
    batch_size: int = 128
    lr_schedule: str = option("cosine", "learning-rate schedule", flags=("--lr-scheduler",),
                              choices=SCHEDULES)
    milestones: list[int] = option([150, 225], "epochs at which --lr-scheduler step "
                                   "multiplies the rate by 0.1", flags=("--lr-steps",),
                                   metavar="EPOCH")
    gamma: float = 0.1
    lr_warmup_epochs: float = option(0.0, "linear warmup, per iteration",
                                     flags=("--lr-warmup-epochs", "--warmup"))
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    amp: bool = option(False, "mixed precision (CUDA)")
    channels_last: bool = False
    compile: bool = option(False, "torch.compile the model for training")
    fast_data: bool = option(True, "keep the DataLoader for in-memory datasets instead of "
                             "holding them on the device and augmenting whole batches there",
                             flags=("--no-fast-data",), negate=True, show_default=False)
    eval_every: int = option(1, "evaluate every N epochs (and after the last)", positive=True)
    max_iters: int | None = option(None, "stop after this many iterations", positive=True)
    seed: int = 0
    sync_bn: bool = option(False, "SyncBatchNorm (DDP)")
    clip_grad_norm: float | None = None
    log_every: int = 50

    def __post_init__(self) -> None:
        if isinstance(self.milestones, (list, tuple)):
            self.milestones = list(self.milestones)
        self.validate()

    def validate(self) -> None:
        """Check every value; raise :class:`ConfigError` naming the first bad one."""
        _check_int("epochs", self.epochs, 0)
        _check_float("lr", self.lr, 0.0, None, low_open=True)
        _check_float("momentum", self.momentum, 0.0, 1.0, high_open=True)
        _check_bool("nesterov", self.nesterov)
        if self.nesterov and self.momentum == 0:
            raise ConfigError(f"nesterov=True needs momentum > 0, got momentum="
                              f"{self.momentum!r}; set momentum (e.g. 0.9) or nesterov=False")
        _check_float("weight_decay", self.weight_decay, 0.0, None)
        _check_int("batch_size", self.batch_size, 1)
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got "
                              f"{self.lr_schedule!r}")
        if not isinstance(self.milestones, list):
            raise ConfigError(f"milestones must be a list of epochs, got {self.milestones!r}")
        ms = self.milestones
        if (not all(isinstance(m, (int, np.integer)) and not isinstance(m, bool) and m >= 1
                    for m in ms) or any(b <= a for a, b in zip(ms, ms[1:]))):
            raise ConfigError(f"milestones must be strictly increasing epoch numbers >= 1, "
                              f"got {ms!r}")
        _check_float("gamma", self.gamma, 0.0, 1.0, low_open=True)
        _check_float("lr_warmup_epochs", self.lr_warmup_epochs, 0.0, None)
        if self.epochs > 0 and self.lr_warmup_epochs > self.epochs:
            raise ConfigError(f"lr_warmup_epochs={self.lr_warmup_epochs} exceeds "
                              f"epochs={self.epochs}; use a warmup of at most {self.epochs}")
        _check_float("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        for name in ("amp", "channels_last", "compile", "fast_data", "sync_bn"):
            _check_bool(name, getattr(self, name))
        _check_int("eval_every", self.eval_every, 1)
        if self.max_iters is not None:
            _check_int("max_iters", self.max_iters, 1)
        _check_int("seed", self.seed, 0)
        if self.clip_grad_norm is not None:
            _check_float("clip_grad_norm", self.clip_grad_norm, 0.0, None, low_open=True)
        _check_int("log_every", self.log_every, 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON- and ``weights_only``-safe)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build a config from plain data; unknown keys are an error, missing ones default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; valid options "
                              f"are {', '.join(sorted(known))}")
        return cls(**dict(data))


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float | None, *,
                 low_open: bool = False, high_open: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.number))
          and math.isfinite(value)
          and (value > low if low_open else value >= low)
          and (high is None or (value < high if high_open else value <= high)))
    if not ok:
        lo = f"{'(' if low_open else '['}{low}"
        hi = f"{high}{')' if high_open else ']'}" if high is not None else "inf)"
        raise ConfigError(f"{name} must be a number in {lo}, {hi}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


# --------------------------------------------------------------------------- schedule
def lr_factor(iteration: int, config: TrainConfig, iters_per_epoch: int) -> float:
    """Multiplier of ``config.lr`` for optimizer step ``iteration`` (0-based).

    Warmup covers the first ``round(lr_warmup_epochs * iters_per_epoch)`` steps, rising
    linearly to 1 (step ``i`` uses ``(i + 1) / warmup``). Cosine then falls from 1 to 0 over
    the remaining steps of ``epochs`` (reaching 0 right after the last one); step decay
    multiplies by ``gamma`` once per milestone passed, milestones being epoch numbers.
    """
    total = config.epochs * iters_per_epoch
    warmup = round(config.lr_warmup_epochs * iters_per_epoch)
    if iteration < warmup:
        return (iteration + 1) / warmup
    if config.lr_schedule == "cosine":
        progress = min(1.0, (iteration - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    passed = sum(iteration >= m * iters_per_epoch for m in config.milestones)
    return config.gamma ** passed


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    iters_per_epoch: int) -> LambdaLR:
    """A scheduler to step once per iteration, following :func:`lr_factor`."""
    def factor(iteration: int) -> float:
        return lr_factor(iteration, config, iters_per_epoch)

    return LambdaLR(optimizer, factor)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD over every trainable parameter, with weight decay on all of them."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (all have "
                          "requires_grad=False); nothing to fine-tune")
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           nesterov=config.nesterov, weight_decay=config.weight_decay)


# ----------------------------------------------------------------------- randomness
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


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: Mapping[str, Any]) -> None:
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
@dataclass
class TrainResult:
    """What :func:`fine_tune` did.

    Attributes:
        best_acc: best validation top-1 (percent) over all epochs, resumed ones included;
            NaN when no epoch ran.
        final_acc: validation top-1 after the last epoch; NaN when no epoch ran.
        epochs_run: epochs completed in total (a partial epoch cut by ``max_iters`` counts).
        history: one record per epoch (the lines of ``metrics.jsonl``).
        last_checkpoint: ``output_dir/last.pth``.
        best_checkpoint: ``output_dir/best.pth``, or None before any epoch.
        metrics_path: ``output_dir/metrics.jsonl``.
        stopped_early: ``max_iters`` or the callback ended training before ``epochs``.
    """

    best_acc: float
    final_acc: float
    epochs_run: int
    history: list[dict[str, Any]]
    last_checkpoint: Path
    best_checkpoint: Path | None
    metrics_path: Path
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready data (paths as strings)."""
        out = asdict(self)
        for key in ("last_checkpoint", "best_checkpoint", "metrics_path"):
            out[key] = None if out[key] is None else str(out[key])
        return out


# ----------------------------------------------------------------------- helpers
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(obj: Any, where: str = "extra_state") -> None:
    """Refuse anything ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise ConfigError(f"{where} has a key {key!r} of type {type(key).__name__}; "
                                  "use str or int keys")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise ConfigError(f"{where} is a {type(obj).__name__}; checkpoints hold only dicts, lists, "
                      "numbers, strings, None and tensors, so convert it to plain data")


def _to_sync_batchnorm(model: nn.Module) -> dict[str, nn.Module]:
    """Swap BatchNorm layers for SyncBatchNorm in place; return the originals by name.

    SyncBatchNorm shares the original layers' parameter and buffer tensors, so putting the
    originals back afterwards (:func:`_restore_modules`) keeps everything trained.
    """
    originals = {name: m for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and name}
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise ConfigError("sync_bn needs a network containing BatchNorm layers, not a bare "
                          "BatchNorm layer")
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    return originals


def _restore_modules(model: nn.Module, originals: Mapping[str, nn.Module]) -> None:
    for name, module in originals.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module.train(parent.training)
        setattr(parent, child, module)


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    # Rewritten whole (atomically) each epoch, so it always matches last.pth exactly, even
    # after a crash between the two writes and a resume.
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))


def _load_resume(path: Path, model: nn.Module, config: TrainConfig) -> dict[str, Any]:
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
                                  "the file is damaged: start again without --resume (or "
                                  "with --overwrite)")
    if len(state["history"]) != state["epoch"]:
        raise CheckpointError(f"cannot resume from '{path}': its history has "
                              f"{len(state['history'])} epochs but it says epoch "
                              f"{state['epoch']}; the file is damaged: start again")


def _replan(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, saved: Mapping[str, Any],
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


# --------------------------------------------------------------------------- training
def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bfloat16 where the GPU has it (no gradient scaling needed), else float16; None off."""
    if not config.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _fast_loader(loader: Any, device: torch.device, config: TrainConfig) -> Any:
    """``loader`` as :class:`~cdprune.fastdata.DeviceBatches` when it can be, else itself."""
    from torch.utils.data import RandomSampler, SequentialSampler

    from .fastdata import device_batches_from

    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return loader
    if isinstance(loader.sampler, RandomSampler) and not loader.sampler.replacement:
        shuffle = True
    elif isinstance(loader.sampler, SequentialSampler):
        shuffle = False
    else:  # distributed or custom sampling: keep the caller's loader
        return loader
    fast = device_batches_from(loader.dataset, loader.batch_size, shuffle=shuffle,
                               drop_last=loader.drop_last, seed=config.seed, device=device,
                               channels_last=config.channels_last and device.type == "cuda")
    if fast is not None:
        logger.info("data held on %s, augmented per batch: %r", device, fast)
    return loader if fast is None else fast


def _train_epoch(net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                 scheduler: LambdaLR, scaler: torch.amp.GradScaler,
                 criterion: nn.Module, device: torch.device, config: TrainConfig,
                 epoch: int, iteration: int, limit: int | None, progress: bool
                 ) -> tuple[torch.Tensor, int]:
    """One pass over ``loader``; returns ``[loss_sum, correct, count]`` and the new iteration."""
    amp_dtype = _amp_dtype(config, device)
    autocast = (torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None
                else nullcontext())
    memory_format = (torch.channels_last if config.channels_last and device.type == "cuda"
                     else torch.preserve_format)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    total = len(loader) if limit is None else min(len(loader), limit - iteration)
    net.train()
    bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
               dynamic_ncols=True, disable=not progress or not is_main_process())
    for step, batch in enumerate(loader):
        if limit is not None and iteration >= limit:
            break
        images = batch[0].to(device, non_blocking=True, memory_format=memory_format)
        targets = batch[1].to(device, non_blocking=True)
        with autocast:
            logits = net(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(net.parameters(), config.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        iteration += 1
        n = targets.numel()
        sums += torch.stack([loss.detach().double() * n,
                             (logits.detach().argmax(1) == targets).sum().double(),
                             torch.tensor(float(n), dtype=torch.float64, device=device)])
        bar.update(1)
        show = not bar.disable and (step + 1) % _POSTFIX_EVERY == 0
        log = (step + 1) % config.log_every == 0
        if show or log:
            loss_sum, correct, count = sums.tolist()
            # Under torch.distributed these sums are this rank's only; the epoch-end check
            # (after all-reduce) is the one all ranks agree on, so none waits forever.
            if not math.isfinite(loss_sum) and not is_distributed():
                raise FloatingPointError(
                    f"training loss became {loss_sum} at epoch {epoch + 1}, iteration "
                    f"{iteration}; lower lr (now {config.lr}) or set clip_grad_norm")
            if show:
                bar.set_postfix(loss=f"{loss_sum / count:.4f}",
                                acc=f"{100 * correct / count:.2f}", refresh=False)
            if log:
                logger.info("epoch %d iter %d: loss %.4f, acc %.2f%%, lr %.5g", epoch + 1,
                            iteration, loss_sum / count, 100 * correct / count,
                            optimizer.param_groups[0]["lr"])
    bar.close()
    return sums, iteration


def fine_tune(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
              config: TrainConfig, *, output_dir: str | Path,
              device: torch.device | str | None = None, resume: bool = False,
              extra_state: Mapping[str, Any] | None = None, progress: bool = True,
              callback: Callable[[dict[str, Any]], bool | None] | None = None
              ) -> TrainResult:
    """Train ``model`` in place and checkpoint every epoch into ``output_dir``.

    Writes (rank 0 only) ``last.pth`` each epoch, ``best.pth`` when validation top-1
    improves, and ``metrics.jsonl`` with one JSON record per epoch (epoch, lr, iterations,
    train_loss, train_acc, val_loss, val_top1, val_top5, time, and train_time: the
    training pass alone, without validation and checkpoint). ``last.pth`` holds the
    model, optimizer, scheduler and gradient-scaler states, the epoch, best accuracy,
    history, generator states, the config and ``extra_state``; ``best.pth`` holds the model
    (under ``"model"``, so :func:`cdprune.checkpoint.load_weights` reads it), epoch,
    accuracy, config and ``extra_state``. On return ``model`` holds the *last* weights.

    Args:
        model: the network; it is moved to ``device``.
        train_loader: training batches ``(images, labels)``; must have a length. Under
            torch.distributed give it a ``DistributedSampler``.
        val_loader: validation batches, evaluated after every epoch (sharded or not; see
            :func:`cdprune.evaluate.evaluate`).
        config: hyper-parameters.
        output_dir: where checkpoints and metrics go (created if needed).
        device: where to train; by default the model's device. Under torch.distributed
            with CUDA pass each rank its own GPU.
        resume: continue from ``output_dir/last.pth``; when it does not exist yet (a run
            interrupted before its first epoch ended) training starts afresh, with a warning.
        extra_state: plain data to store under ``"extra"`` in both checkpoints, e.g. the
            pruning plan needed to rebuild a pruned architecture.
        progress: show a progress bar per epoch (rank 0 only).
        callback: called on every rank with each epoch's record after it is saved;
            returning True stops training (early stopping, time budgets).

    Raises:
        ConfigError: invalid config or non-plain ``extra_state``.
        DataError: an empty or length-less training loader.
        CheckpointError: ``last.pth`` is unreadable or does not fit ``model``.
        FloatingPointError: the training loss became NaN or infinite.
    """
    config.validate()
    if extra_state is not None:
        _check_plain(extra_state)
        extra_state = dict(extra_state)
    try:
        iters_per_epoch = len(train_loader)
    except TypeError:
        raise DataError("the training loader has no length (an iterable dataset?); "
                        "fine_tune needs a map-style dataset to plan the schedule") from None
    if iters_per_epoch == 0:
        raise DataError("the training loader yields no batches; check the dataset is not "
                        "empty and batch_size/drop_last")
    output_dir = Path(output_dir)
    last_path, best_path, metrics_path = (output_dir / LAST, output_dir / BEST,
                                          output_dir / METRICS)
    main = is_main_process()
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    if config.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    state: dict[str, Any] | None = None
    if resume and last_path.is_file():
        state = _load_resume(last_path, model, config)
        logger.info("resuming from %s after epoch %d", last_path, state["epoch"])
    elif resume:
        logger.warning("resume requested but %s does not exist; starting from scratch",
                       last_path)
    elif main and last_path.exists():
        logger.warning("%s exists and will be overwritten (pass resume=True to continue it)",
                       last_path)

    originals: dict[str, nn.Module] = {}
    if config.sync_bn and is_distributed() and device.type == "cuda":
        originals = _to_sync_batchnorm(model)
    elif config.sync_bn:
        # DistributedDataParallel accepts SyncBatchNorm only on GPUs.
        logger.warning("sync_bn needs torch.distributed on CUDA; keeping plain BatchNorm")
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, iters_per_epoch)
    if config.amp and device.type != "cuda":
        logger.warning("amp needs CUDA; training in float32 on %s", device)
    # Gradient scaling only for float16: bfloat16 has float32's exponent range.
    use_amp = _amp_dtype(config, device) == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if config.fast_data and not is_distributed():
        train_loader = _fast_loader(train_loader, device, config)
        val_loader = _fast_loader(val_loader, device, config)
    start_epoch, iteration, best_acc = 0, 0, -math.inf
    history: list[dict[str, Any]] = []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if use_amp and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, iteration = int(state["epoch"]), int(state["iteration"])
        _replan(optimizer, scheduler, state.get("config") or {}, config, iteration,
                iters_per_epoch)
        best_acc = float(state["best_acc"])
        history = list(state["history"])
        _set_rng_state(state["rng"])

    net: nn.Module = model
    if is_distributed():
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    stopped_early = False
    try:
        for epoch in range(start_epoch, config.epochs):
            if config.max_iters is not None and iteration >= config.max_iters:
                stopped_early = True
                break
            seed_epoch(train_loader, config.seed, epoch)
            lr = optimizer.param_groups[0]["lr"]
            started = time.perf_counter()
            sums, iteration = _train_epoch(net, train_loader, optimizer, scheduler, scaler,
                                           criterion, device, config, epoch, iteration,
                                           config.max_iters, progress)
            train_time = time.perf_counter() - started
            broadcast_buffers(model)  # identical BatchNorm statistics on every rank
            loss_sum, correct, count = all_reduce_sum(sums).tolist()
            if not math.isfinite(loss_sum):
                raise FloatingPointError(
                    f"training loss became {loss_sum} in epoch {epoch + 1}; lower lr (now "
                    f"{config.lr}) or set clip_grad_norm")
            last = (epoch + 1 == config.epochs or (config.max_iters is not None
                                                   and iteration >= config.max_iters))
            val = (evaluate(model, val_loader, device=device, progress=progress)
                   if last or (epoch + 1) % config.eval_every == 0 else None)
            record = {
                "epoch": epoch + 1, "lr": lr, "iterations": iteration,
                "train_loss": loss_sum / count, "train_acc": 100.0 * correct / count,
                "val_loss": val.loss if val else None, "val_top1": val.top1 if val else None,
                "val_top5": val.top5 if val else None,
                "time": time.perf_counter() - started, "train_time": train_time,
            }
            history.append(record)
            improved = val is not None and val.top1 > best_acc
            if val is not None:
                best_acc = max(best_acc, val.top1)
            if main:
                weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                if improved:  # best first: a crash before last.pth just redoes this epoch
                    atomic_torch_save({"version": CHECKPOINT_VERSION, "model": weights,
                                       "epoch": epoch + 1, "best_acc": best_acc,
                                       "config": config.to_dict(), "extra": extra_state},
                                      best_path)
                atomic_torch_save({
                    "version": CHECKPOINT_VERSION, "model": weights,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if use_amp else None,
                    "epoch": epoch + 1, "iteration": iteration, "best_acc": best_acc,
                    "history": history, "rng": _rng_state(), "config": config.to_dict(),
                    "extra": extra_state,
                }, last_path)
                _write_metrics(metrics_path, history)
            barrier()
            logger.info("epoch %d/%d: loss %.4f, train %.2f%%, val %s (best %.2f%%), "
                        "lr %.4g, %.1f s", epoch + 1, config.epochs, record["train_loss"],
                        record["train_acc"], f"{val.top1:.2f}%" if val else "-", best_acc,
                        lr, record["time"])
            if callback is not None and callback(record):
                stopped_early = epoch + 1 < config.epochs
                break
            if config.max_iters is not None and iteration >= config.max_iters:
                stopped_early = epoch + 1 < config.epochs
                break
    finally:
        if originals:
            _restore_modules(model, originals)
    return TrainResult(
        best_acc=best_acc if math.isfinite(best_acc) else math.nan,
        final_acc=next((h["val_top1"] for h in reversed(history) if h["val_top1"] is not None),
                       math.nan),
        epochs_run=history[-1]["epoch"] if history else 0,
        history=history,
        last_checkpoint=last_path,
        best_checkpoint=best_path if history else None,
        metrics_path=metrics_path,
        stopped_early=stopped_early,
    )
