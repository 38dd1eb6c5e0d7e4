"""Fine-tuning options and the learning-rate schedule they imply.

:class:`TrainConfig` holds every hyper-parameter of :func:`cdprune.train.fine_tune` and
checks it on construction; :func:`lr_factor`, :func:`build_scheduler` and
:func:`build_optimizer` turn it into SGD with a per-iteration schedule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .errors import ConfigError
from .options import option

__all__ = ["TrainConfig", "build_optimizer", "build_scheduler", "lr_factor"]

SCHEDULES = ("cosine", "step")


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
