"""Accuracy, loss and speed of a classifier.

:func:`evaluate` runs a model over a loader once and reports top-1/top-5 accuracy (in
percent), the mean loss and per-class accuracy. Under ``torch.distributed`` with a sharded
loader (a ``DistributedSampler``) each rank reads its shard and the counts are summed, so
every rank returns the global numbers. :func:`measure_latency` times forward passes for
reports.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ..errors import ConfigError, DataError
from ..finetune.distributed import all_reduce_sum, is_distributed, is_main_process
from ..progress import progress as progress_bar
from .latency import time_calls

__all__ = ["EvalResult", "evaluate", "measure_latency", "model_device"]

logger = logging.getLogger(__name__)

TOP_K = 5


@dataclass
class EvalResult:
    """What :func:`evaluate` measured.

    Attributes:
        top1: top-1 accuracy in percent.
        top5: top-5 accuracy in percent (top-k with k = number of classes when there are
            fewer than five, so it is 100 for a 4-class problem).
        loss: mean loss per sample.
        per_class_accuracy: top-1 accuracy in percent for each class index; ``None`` for a
            class with no samples in the data (so the list has one entry per model output
            and never holds NaN).
        num_samples: images evaluated (summed over ranks).
        images_per_second: throughput of the whole pass, data loading included.
    """

    top1: float
    top5: float
    loss: float
    per_class_accuracy: list[float | None]
    num_samples: int
    images_per_second: float

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready data."""
        return asdict(self)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode and restore each one's own mode afterwards.

    Restoring per module (rather than ``model.train(was_training)``) keeps deliberately
    frozen parts, such as BatchNorm layers held in eval mode during training, as they were.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def _is_sharded(loader: DataLoader) -> bool:
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    return (isinstance(sampler, DistributedSampler)
            or isinstance(getattr(batch_sampler, "sampler", None), DistributedSampler))


def _check_targets(targets: torch.Tensor, num_classes: int) -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise DataError(
            f"labels must lie in [0, {num_classes - 1}] but this batch has labels from "
            f"{int(targets.min())} to {int(targets.max())}; check the dataset and that "
            "the model's num_classes matches it")


def evaluate(model: nn.Module, loader: DataLoader, *, device: torch.device | str | None = None,
             num_classes: int | None = None,
             criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             progress: bool = True, max_batches: int | None = None) -> EvalResult:
    """Measure accuracy and loss of ``model`` on the batches of ``loader``.

    The model runs in eval mode under ``torch.inference_mode``; every submodule's mode is
    restored afterwards, also on error.

    Args:
        model: a classifier returning logits ``[B, num_classes]``; it must already be on
            ``device``.
        loader: yields ``(images, labels, ...)`` batches; extra items are ignored.
        device: where batches are sent; by default the model's device.
        num_classes: length of ``per_class_accuracy``; by default the logits' width. It
            may not exceed the logits' width.
        criterion: loss returning the *mean* over a batch (default cross-entropy); the
            reported loss is the mean over all samples.
        progress: show a progress bar (rank 0 only).
        max_batches: stop after this many batches (a quick look).

    Raises:
        DataError: the loader yields nothing, or a label is outside the model's classes.
        ConfigError: bad ``num_classes`` or ``max_batches``.
    """
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"max_batches must be a positive integer or None, got {max_batches}")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer or None, got {num_classes}")
    device = torch.device(device) if device is not None else model_device(model)
    criterion = criterion or nn.CrossEntropyLoss()
    total = len(loader) if hasattr(loader, "__len__") else None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)

    # Sums live on the device so the loop never waits for the GPU.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.int64, device=device)
    topk = torch.zeros((), dtype=torch.int64, device=device)
    class_correct: torch.Tensor | None = None
    class_count: torch.Tensor | None = None
    started = time.perf_counter()
    with eval_mode(model), torch.inference_mode():
        main = is_main_process()
        bar = progress_bar(total, "evaluation", bar=progress and main, items="images")
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            images = batch[0].to(device, non_blocking=True)
            targets = batch[1].to(device, non_blocking=True)
            logits = model(images)
            if class_correct is None:
                width = logits.shape[1]
                if num_classes is None:
                    num_classes = width
                elif num_classes > width:
                    raise ConfigError(f"num_classes={num_classes} but the model outputs only "
                                      f"{width} logits; pass num_classes <= {width}")
                class_correct = torch.zeros(num_classes, dtype=torch.int64, device=device)
                class_count = torch.zeros(num_classes, dtype=torch.int64, device=device)
            _check_targets(targets, num_classes)
            loss_sum += criterion(logits, targets).double() * targets.numel()
            k = min(TOP_K, logits.shape[1])
            hits = logits.topk(k, dim=1).indices == targets.unsqueeze(1)
            first = hits[:, 0]
            top1 += first.sum()
            topk += hits.any(dim=1).sum()
            class_count += torch.bincount(targets, minlength=num_classes)[:num_classes]
            class_correct += torch.bincount(targets[first], minlength=num_classes)[:num_classes]
            if main:
                bar.update(1, items=targets.numel())
        bar.close()

    if class_correct is None:
        raise DataError("the evaluation loader yielded no batches; check the dataset is not "
                        "empty")
    if is_distributed() and _is_sharded(loader):
        # Note: DistributedSampler pads the last shard with repeated samples, so the global
        # numbers can count a few images twice when the data does not divide evenly.
        packed = torch.cat([torch.stack([top1, topk]), class_correct, class_count])
        all_reduce_sum(packed)
        all_reduce_sum(loss_sum)
        top1, topk = packed[0], packed[1]
        class_correct = packed[2:2 + num_classes]
        class_count = packed[2 + num_classes:]
    elapsed = time.perf_counter() - started
    n = int(class_count.sum())
    counts = class_count.tolist()
    per_class = [None if c == 0 else 100.0 * hit / c
                 for hit, c in zip(class_correct.tolist(), counts)]
    return EvalResult(
        top1=100.0 * int(top1) / n,
        top5=100.0 * int(topk) / n,
        loss=float(loss_sum) / n,
        per_class_accuracy=per_class,
        num_samples=n,
        images_per_second=n / elapsed if elapsed > 0 else math.inf,
    )


def measure_latency(model: nn.Module, input_size: Sequence[int], batch_size: int = 1,
                    warmup: int = 5, iters: int = 20, threads: int | None = None,
                    device: torch.device | str = "cpu") -> float:
    """Median wall time of one forward pass, in seconds per batch.

    Args:
        model: the network, already on ``device`` (it is not moved).
        input_size: ``(C, H, W)`` of one image.
        batch_size: images per forward pass.
        warmup: untimed passes first (allocator, caches, lazy init).
        iters: timed passes; the median is robust to the odd slow one.
        threads: CPU threads during the measurement (restored afterwards); by default
            the current setting.
        device: where the input is made; CUDA work is synchronised before each reading.

    Raises:
        ConfigError: a non-positive size or count, or a model on another device.
    """
    if batch_size < 1 or iters < 1 or warmup < 0:
        raise ConfigError(f"need batch_size >= 1, iters >= 1, warmup >= 0; got "
                          f"batch_size={batch_size}, iters={iters}, warmup={warmup}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be a positive integer or None, got {threads}")
    if len(input_size) == 0 or any(int(s) < 1 for s in input_size):
        raise ConfigError(f"input_size must be positive sizes like (3, 32, 32), got "
                          f"{tuple(input_size)}")
    device = torch.device(device)
    own = model_device(model)
    if own.type != device.type:
        raise ConfigError(f"the model is on {own} but device={str(device)!r}; move it with "
                          f"model.to({str(device)!r}) first")
    x = torch.randn(batch_size, *(int(s) for s in input_size), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with eval_mode(model), torch.inference_mode():
            (times,) = time_calls([lambda: model(x)], warmup=warmup, repeats=iters, sync=sync)
    finally:
        torch.set_num_threads(old_threads)
    return float(statistics.median(times))
