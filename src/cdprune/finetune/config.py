"""Fine-tuning options and the learning-rate schedule they imply.

:class:`TrainConfig` holds every hyper-parameter of :func:`cdprune.finetune.loop.fine_tune` and
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

from ..errors import ConfigError
from ..options import OptionError, from_mapping, option

__all__ = ["TrainConfig", "build_optimizer", "build_scheduler", "lr_factor"]

SCHEDULES = ("cosine", "step")
MAX_SEED = 2**32 - 1  # what numpy's and torch's generators take


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
            :class:`cdprune.finetune.fastdata.DeviceBatches`: the whole dataset on the training
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

    # Fields with a help are user-facing options too (see cdprune.options); the others are
    # set from Python, or by the run's options of the same name (batch size, seed).
    epochs: int = option(300, "passes over the training data")
    lr: float = option(0.1, "initial learning rate")
    momentum: float = option(0.9, "SGD momentum (Nesterov)")
    nesterov: bool = True
    weight_decay: float = option(5e-4, "weight decay")
    batch_size: int = 128
    lr_schedule: str = option("cosine", "learning-rate schedule", choices=SCHEDULES)
    milestones: list[int] = option([150, 225], "epochs at which {lr_schedule} step "
                                   "multiplies the rate by 0.1")
    gamma: float = 0.1
    lr_warmup_epochs: float = option(0.0, "linear warmup, per iteration")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    amp: bool = option(False, "mixed precision (CUDA)")
    channels_last: bool = False
    compile: bool = option(False, "torch.compile the model for training")
    fast_data: bool = option(True, "hold in-memory datasets on the device and augment whole "
                             "batches there instead of using the DataLoader",
                             show_default=False)
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
        """Check every value; raise :class:`OptionError` naming the first bad one."""
        _int("epochs", self.epochs, 0, "0 or more")
        _number("lr", self.lr, _real(self.lr) and self.lr > 0, "a positive number")
        _number("momentum", self.momentum, 0 <= self.momentum < 1 if _real(self.momentum)
                else False, "in [0, 1)")
        if not isinstance(self.nesterov, bool):
            raise OptionError("nesterov", self.nesterov, "true or false")
        if self.nesterov and self.momentum == 0:
            raise OptionError("momentum", self.momentum, "in (0, 1): fine-tuning uses "
                              "Nesterov momentum, which needs one (or set nesterov=False)")
        _number("weight_decay", self.weight_decay, _real(self.weight_decay)
                and self.weight_decay >= 0, "0 or more")
        _int("batch_size", self.batch_size, 1, "a positive integer")
        if self.lr_schedule not in SCHEDULES:
            raise OptionError("lr_schedule", self.lr_schedule, f"one of {', '.join(SCHEDULES)}")
        ms = self.milestones
        if (not isinstance(ms, list) or not all(_integer(m) and m >= 1 for m in ms)
                or any(b <= a for a, b in zip(ms, ms[1:]))):
            raise OptionError("milestones", ms, "increasing epoch numbers from 1, e.g. "
                              "[150, 225]")
        _number("gamma", self.gamma, 0 < self.gamma <= 1 if _real(self.gamma) else False,
                "in (0, 1]")
        _number("lr_warmup_epochs", self.lr_warmup_epochs, _real(self.lr_warmup_epochs)
                and self.lr_warmup_epochs >= 0, "0 or more")
        if self.epochs > 0 and self.lr_warmup_epochs > self.epochs:
            raise OptionError("lr_warmup_epochs", self.lr_warmup_epochs,
                              f"no longer than the training (epochs={self.epochs})")
        _number("label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1
                if _real(self.label_smoothing) else False, "in [0, 1)")
        for name in ("amp", "channels_last", "compile", "fast_data", "sync_bn"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(name, getattr(self, name), "true or false")
        _int("eval_every", self.eval_every, 1, "a positive number of epochs")
        if self.max_iters is not None:
            _int("max_iters", self.max_iters, 1, "a positive integer")
        _int("seed", self.seed, 0, f"an integer from 0 to {MAX_SEED}", MAX_SEED)
        if self.clip_grad_norm is not None:
            _number("clip_grad_norm", self.clip_grad_norm, _real(self.clip_grad_norm)
                    and self.clip_grad_norm > 0, "a positive number")
        _int("log_every", self.log_every, 1, "a positive integer")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainConfig:
        """From a flat configuration (unset keys take the defaults)."""
        return from_mapping(cls, config)

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


def _integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    return (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            and math.isfinite(value))


def _int(name: str, value: Any, low: int, valid: str, high: int | None = None) -> None:
    if not _integer(value) or value < low or (high is not None and value > high):
        raise OptionError(name, value, valid)


def _number(name: str, value: Any, ok: bool, valid: str) -> None:
    if not _real(value) or not ok:
        raise OptionError(name, value, valid)


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
