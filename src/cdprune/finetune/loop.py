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

Under ``torch.distributed`` (see :mod:`cdprune.finetune.distributed`) the model is wrapped in
DistributedDataParallel, metrics are summed over ranks so every rank reports global
numbers, and only rank 0 writes files.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from ..errors import ConfigError, DataError
from ..fileio import atomic_torch_save
from ..measure.evaluate import evaluate, model_device
from ..options import OptionsError
from ..progress import progress as progress_bar
from ..runs.files import BEST, LAST, METRICS
from .config import TrainConfig, build_optimizer, build_scheduler
from .distributed import (
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    is_distributed,
    is_main_process,
)
from .resume import (
    CHECKPOINT_VERSION,
    check_plain,
    load_resume,
    replan,
    restore_rng_state,
    rng_state,
    seed_epoch,
    write_metrics,
)

if TYPE_CHECKING:
    from ..pruning.masking import FilterMasks

__all__ = ["TrainResult", "autocast_dtype", "fine_tune"]

logger = logging.getLogger(__name__)


class DivergedError(OptionsError, FloatingPointError):
    """The training loss stopped being a finite number: the learning rate is too high for
    this model (or the data are broken). The message names the ``lr`` option."""

    def __init__(self, what: str, lr: float):
        super().__init__(what + f"; lower {{lr}} (now {lr}) or check the data")



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



# --------------------------------------------------------------------------- training
def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bfloat16 where the GPU has it (no gradient scaling needed), else float16; None off."""
    if not config.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _fast_loader(loader: Any, device: torch.device, config: TrainConfig) -> Any:
    """``loader`` as :class:`~cdprune.finetune.fastdata.DeviceBatches` when it can be, else itself."""
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
                 epoch: int, iteration: int, limit: int | None, progress: bool,
                 masks: FilterMasks | None = None) -> tuple[torch.Tensor, int]:
    """One pass over ``loader``; returns ``[loss_sum, correct, count]`` and the new iteration."""
    amp_dtype = autocast_dtype(config, device)
    autocast = (torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None
                else nullcontext())
    memory_format = (torch.channels_last if config.channels_last and device.type == "cuda"
                     else torch.preserve_format)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    total = len(loader) if limit is None else min(len(loader), limit - iteration)
    net.train()
    bar = progress_bar(total, f"epoch {epoch + 1}/{config.epochs}", "iteration",
                       bar=progress and is_main_process(), items="images")
    quiet = not is_main_process()  # one voice under torchrun
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
        if masks is not None:
            masks.zero_grads()
        if config.clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(net.parameters(), config.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if masks is not None:
            masks.after_step(optimizer)
        scheduler.step()
        iteration += 1
        n = targets.numel()
        sums += torch.stack([loss.detach().double() * n,
                             (logits.detach().argmax(1) == targets).sum().double(),
                             torch.tensor(float(n), dtype=torch.float64, device=device)])
        show = not quiet and bar.wants_postfix(step)
        log = (step + 1) % config.log_every == 0
        if show or log:
            loss_sum, correct, count = sums.tolist()
            # Under torch.distributed these sums are this rank's only; the epoch-end check
            # (after all-reduce) is the one all ranks agree on, so none waits forever.
            if not math.isfinite(loss_sum) and not is_distributed():
                raise DivergedError(f"training loss became {loss_sum} at epoch {epoch + 1}, "
                                    f"iteration {iteration}", config.lr)
            if show:
                bar.set_postfix(loss=f"{loss_sum / count:.4f}",
                                acc=f"{100 * correct / count:.2f}%",
                                lr=f"{optimizer.param_groups[0]['lr']:.4g}", refresh=False)
            if log and not bar.disable:  # without a bar, the progress lines say it
                logger.info("epoch %d iter %d: loss %.4f, acc %.2f%%, lr %.5g", epoch + 1,
                            iteration, loss_sum / count, 100 * correct / count,
                            optimizer.param_groups[0]["lr"])
        if not quiet:
            bar.update(1, items=n)
    bar.close()
    return sums, iteration


def fine_tune(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
              config: TrainConfig, *, output_dir: str | Path,
              device: torch.device | str | None = None, resume: bool = False,
              extra_state: Mapping[str, Any] | None = None, progress: bool = True,
              callback: Callable[[dict[str, Any]], bool | None] | None = None,
              masks: Mapping[str, Sequence[int]] | None = None) -> TrainResult:
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
            :func:`cdprune.measure.evaluate.evaluate`).
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
        masks: ``{conv name: filter indices}`` held at zero throughout (a masked
            network, see :mod:`cdprune.pruning.masking`): their weights and conv bias are
            zeroed before training and after every step, their gradients and momentum
            kept at zero. Stored under ``"masks"`` in both checkpoints.

    Raises:
        ConfigError: invalid config or non-plain ``extra_state``.
        DataError: an empty or length-less training loader.
        CheckpointError: ``last.pth`` is unreadable or does not fit ``model``.
        FloatingPointError: the training loss became NaN or infinite.
    """
    config.validate()
    if extra_state is not None:
        check_plain(extra_state)
        extra_state = dict(extra_state)
    if masks:
        extra_state = {**(extra_state or {}),
                       "masks": {str(k): [int(i) for i in v] for k, v in masks.items()}}
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
        state = load_resume(last_path, model, config)
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
    use_amp = autocast_dtype(config, device) == torch.float16
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
        replan(optimizer, scheduler, state.get("config") or {}, config, iteration,
               iters_per_epoch)
        best_acc = float(state["best_acc"])
        history = list(state["history"])
        restore_rng_state(state["rng"])

    held = None
    if masks:
        from ..pruning.masking import FilterMasks

        held = FilterMasks(model, masks)
    if held is not None:
        held.after_step(optimizer)  # zero from the start, resumed buffers included
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
                                           config.max_iters, progress, held)
            train_time = time.perf_counter() - started
            broadcast_buffers(model)  # identical BatchNorm statistics on every rank
            loss_sum, correct, count = all_reduce_sum(sums).tolist()
            if not math.isfinite(loss_sum):
                raise DivergedError(f"training loss became {loss_sum} in epoch {epoch + 1}",
                                    config.lr)
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
                    "history": history, "rng": rng_state(), "config": config.to_dict(),
                    "extra": extra_state,
                }, last_path)
                write_metrics(metrics_path, history)
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
