"""Activation statistics for CDP: one pooled value per channel per document.

For every scored Conv2d the output (before BatchNorm) goes through ReLU and a spatial mean,
giving one value per channel per image. Two kinds of *documents* are supported:

* ``"sample"`` (the published code): every sampled image is a document. The TF-IDF needs
  each channel's mean over all documents before any document can be counted; instead of
  keeping every image's vector until then (4 bytes per image per channel: 406 MB for
  ResNet-56 on 50,000 images), the pass streams them through
  :class:`~cdprune.importance.documents.SampleCounts`, which keeps per channel only running sums and
  the few images near the running mean, and yields the exact ``(df, tf_sum)`` the scores
  need (a second reading of the images settles the rare channel whose mean moved too far).
  ``keep_features=True``, or a loader that can be read only once, keeps every vector.
* ``"class"`` (the paper's wording): every class is a document, the mean pooled vector of
  its images. Only per-class sums and counts are kept: **8 bytes per class per channel**
  (float64 sums), whatever the number of images.

The hooks pool each scored layer of a batch into one ``[B, channels]`` row block. Under
``torch.distributed`` each rank reads its shard and the result is reduced exactly (see
:meth:`ActivationStats.sufficient`).

This module collects; the statistics themselves, their views and their file are
:class:`~cdprune.importance.activations.ActivationStats` (also importable from here).
"""


from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..finetune.distributed import all_reduce_sum, is_distributed
from ..measure.evaluate import eval_mode
from ..progress import progress as progress_bar
from ..suggest import did_you_mean
from .activations import (
    DOCUMENTS,
    ActivationStats,
    conv_layer_names,
    layer_width,
    model_fingerprint,
)
from .config import TAPS, published_conflicts
from .documents import MeanCounts, SampleCounts
from .hooks import Collector

__all__ = ["collect_stats"]

logger = logging.getLogger(__name__)

_CHUNK_ROWS = 4096


def _resolve_layers(model: nn.Module, layers: Iterable[str] | None) -> list[str]:
    convs = conv_layer_names(model)
    if not convs:
        raise ConfigError(f"model {type(model).__name__} has no nn.Conv2d layer; CDP scores "
                          "convolution filters, so there is nothing to score")
    if layers is None:
        # Region heads (two-stage detectors) run once per proposal: their rows are not
        # images, so they are not scored by default, and their channels stay.
        from ..measure.macs import region_layers

        regional = region_layers(model)
        named = dict(model.named_modules())
        return [n for n in convs if named[n] not in regional]
    layers = list(layers)
    named = dict(model.named_modules())
    for name in layers:
        if name not in named:
            hint = did_you_mean(name, convs, before="; ")
            raise ConfigError(f"layer '{name}' does not exist in the model{hint} "
                              "(list them with cdprune.importance.activations.conv_layer_names(model))")
        if name not in convs:
            raise ConfigError(f"layer '{name}' is a {type(named[name]).__name__}, not a Conv2d "
                              "(or a transformer's MLP hidden layer); only those layers can be "
                              "scored")
    wanted = set(layers)
    return [n for n in convs if n in wanted]


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    raise DataError(f"the loader yields {type(batch).__name__}; expected image tensors or "
                    "(images, labels) pairs")


def collect_stats(
    model: nn.Module,
    loader: Iterable,
    *,
    layers: Iterable[str] | None = None,
    max_batches: int | None = None,
    documents: str = "sample",
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    tap: str | None = None,
    variant: str | None = None,
    progress: bool = True,
    keep_features: bool = False,
) -> ActivationStats:
    """Run images through ``model`` and gather the pooled activations CDP scores.

    Args:
        model: the pretrained network; its mode is restored afterwards.
        loader: yields image batches or ``(images, labels)``; labels are needed for
            ``documents="class"``. Under ``torch.distributed`` each rank passes its shard.
        layers: Conv2d names to score; all Conv2d layers by default.
        max_batches: stop after this many batches (the published ``stop_batch``).
        documents: ``"sample"`` (every image a document, as published) or ``"class"``.
        num_classes: number of classes for class documents; inferred from the labels
            seen (over all ranks) when omitted.
        device: where to run; defaults to the device of the model's parameters.
        dtype: precision of per-sample values, ``torch.float32`` or ``torch.float16``
            (values are rounded to it before they are counted, and stored in it with
            ``keep_features``).
        tap: where a filter's activation is read: ``"conv"``, the conv output before
            BatchNorm (published), or ``"act"``, the output of the BatchNorm that follows,
            i.e. what the next layer receives after its ReLU. Default ``"conv"``.
        variant: ``"published"`` forces every option to the published code's
            (``tap="conv"``, ``documents="sample"``) whatever else is passed.
        progress: show a progress bar.
        keep_features: sample documents: keep every image's pooled vector
            (:attr:`ActivationStats.features`, 4 bytes per image per channel) instead of
            only what the scores need. The scores are the same either way.

    Returns:
        The statistics; under ``torch.distributed`` identical on every rank.

    Raises:
        ConfigError: bad argument, unknown layer, or a model without Conv2d.
        DataError: no batches, missing labels for class documents, labels out of range,
            or NaN/inf activations (the message names the layer).
    """
    if variant not in (None, "published"):
        raise ConfigError(f"variant={variant!r} is not valid; use 'published' or None")
    if variant == "published":
        given = {"tap": tap, "documents": documents}
        clash = [f"{k}={given[k]!r}" for k in published_conflicts(given)]
        if clash:
            raise ConfigError(f"variant='published' uses the published code's options, but "
                              f"{', '.join(clash)} was given too; leave out one of them")
        tap, documents = "conv", "sample"
    tap = tap or "conv"
    if tap not in TAPS:
        raise ConfigError(f"tap={tap!r} is not valid; use 'conv' (before BatchNorm, as "
                          "published) or 'act' (after BatchNorm and ReLU)")
    if documents not in DOCUMENTS:
        raise ConfigError(f"documents={documents!r} is not valid; use 'sample' or 'class'")
    if max_batches is not None and max_batches <= 0:
        raise ConfigError(f"max_batches must be a positive integer, got "
                          f"{max_batches}; leave it unset to use the whole loader")
    if dtype not in (torch.float32, torch.float16):
        raise ConfigError(f"dtype {dtype} is not supported; use torch.float32 or torch.float16")
    names = _resolve_layers(model, layers)
    modules = dict(model.named_modules())
    channels = {n: layer_width(modules[n]) for n in names}
    total = sum(channels.values())
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)

    offsets = list(ActivationStats(documents, names, channels, 1)._offsets().items())
    full_store = documents == "sample" and (keep_features or isinstance(loader, Iterator))
    counts = SampleCounts([span for _, span in offsets]) \
        if documents == "sample" and not full_store else None
    if documents == "sample" and full_store and not keep_features:
        logger.info("the loader can be read only once: keeping every image's pooled values "
                    "(%d bytes per image) until the means are known", total * dtype.itemsize)
    chunks: list[torch.Tensor] = []
    filled = 0
    sums = class_counts = None
    labels_max = -1

    def consume(rows: torch.Tensor, labels: torch.Tensor | None) -> None:
        nonlocal filled, sums, class_counts, labels_max
        _check_finite(rows, offsets)
        n = rows.shape[0]
        if documents == "sample":
            rows = rows.to("cpu", dtype)
            if counts is not None:
                counts.add(rows)
                return
            pos = 0
            while pos < n:  # fill fixed-size chunks; no growing tensor is re-copied
                if filled == 0 or filled == chunks[-1].shape[0]:
                    chunks.append(torch.empty(_CHUNK_ROWS, total, dtype=dtype))
                    filled = 0
                take = min(n - pos, _CHUNK_ROWS - filled)
                chunks[-1][filled:filled + take] = rows[pos:pos + take]
                filled += take
                pos += take
            return
        if labels is None:
            raise DataError("documents='class' needs labels: the loader must yield "
                            "(images, labels) pairs")
        labels = labels.to(device).long()
        labels_max = max(labels_max, int(labels.max()))
        if num_classes is not None and labels_max >= num_classes:
            raise DataError(f"label {labels_max} is out of range for num_classes="
                            f"{num_classes}; pass the dataset's class count")
        width = num_classes or labels_max + 1
        if sums is None:
            sums = torch.zeros(width, total, dtype=torch.float64, device=device)
            class_counts = torch.zeros(width, dtype=torch.float64, device=device)
        elif width > sums.shape[0]:  # classes grow rarely; pad, do not re-cat rows
            sums = torch.cat([sums, sums.new_zeros(width - sums.shape[0], total)])
            class_counts = torch.cat([class_counts,
                                      class_counts.new_zeros(width - class_counts.shape[0])])
        sums.index_add_(0, labels, rows.double())
        class_counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))

    collector = Collector([modules[n] for n in names], model, tap)
    try:
        batches, seen = _read(model, loader, collector, consume, device=device,
                              max_batches=max_batches, progress=progress)
    finally:
        collector.remove()

    if max_batches is not None and batches < max_batches:
        logger.warning("the loader yielded %d batches, fewer than the %d asked for; using the "
                       "%d images there are", batches, max_batches, seen)
    total_seen = int(all_reduce_sum(torch.tensor([seen], dtype=torch.int64, device=device)).item())
    if total_seen == 0:
        raise DataError("the loader yielded no images; check the dataset and max_batches")

    stats = ActivationStats(documents=documents, layers=names, channels=channels,
                            num_samples=total_seen, fingerprint=model_fingerprint(model),
                            meta={"batches": batches, "tap": tap})
    if documents == "class":
        stats.class_sums, stats.class_counts = _reduce_classes(sums, class_counts, total,
                                                               device, num_classes)
        _check_finite(stats.class_sums, offsets)
        return stats
    if counts is not None:
        stats.reduced = _settle(counts, stats, offsets, device, lambda c: _read(
            model, loader, Collector([modules[n] for n in names], model, tap), c.add,
            device=device, max_batches=max_batches, progress=progress, second=True))
        return stats

    if chunks:
        chunks[-1] = chunks[-1][:filled]
    else:  # a rank with an empty shard
        chunks = [torch.empty(0, total, dtype=dtype)]
    if keep_features and not is_distributed():
        stats.features = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        return stats
    stats.reduced = _reduce_samples(chunks, stats, device)
    return stats


def _read(model: nn.Module, loader: Iterable, collector: Collector,
          consume: Callable[..., None], *, device: torch.device, max_batches: int | None,
          progress: bool, second: bool = False) -> tuple[int, int]:
    """One statistics pass: every batch's pooled row block goes to ``consume``.

    Returns ``(batches, images)`` read. The collector's hooks are removed on the way out.
    """
    expected = max_batches if max_batches is not None else (
        len(loader) if hasattr(loader, "__len__") else None)
    seen = batches = 0
    try:
        with eval_mode(model), torch.inference_mode():
            bar = progress_bar(expected, "statistics (2nd reading)" if second
                               else "statistics", bar=progress, items="images")
            for batch in loader:
                if max_batches is not None and batches >= max_batches:
                    break
                images, labels = _split_batch(batch)
                collector.forward(model, images.to(device, non_blocking=True))
                rows = collector.take()
                if second:
                    consume(rows.to("cpu"))
                else:
                    consume(rows, labels)
                seen += rows.shape[0]
                batches += 1
                bar.update(1, items=rows.shape[0])
            bar.close()
    finally:
        collector.remove()
    return batches, seen


def _settle(counts: SampleCounts, stats: ActivationStats, offsets: list[tuple[str, tuple[int, int]]],
            device: torch.device, reread: Callable[[MeanCounts], tuple[int, int]]
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(df, tf_sum)`` over all documents (and ranks) from the streamed counts.

    Channels whose mean left the interval :class:`SampleCounts` certified are counted
    again by a second reading of the images with the mean known.
    """
    sums = all_reduce_sum(counts.sums.to(device)).cpu()
    mean = sums / stats.num_samples
    df, tf_sum, exact = counts.finish(mean)
    unsettled = int(all_reduce_sum(torch.tensor([int((~exact).sum())], device=device)).item())
    if unsettled:
        logger.info("%d channel mean%s moved outside the range kept while streaming (images "
                    "in a strongly ordered sequence?); reading the images a second time to "
                    "count %s exactly", unsettled, "" if unsettled == 1 else "s",
                    "it" if unsettled == 1 else "them")
        again = MeanCounts([span for _, span in offsets], mean)
        reread(again)
        if again.images != counts.images or not torch.allclose(again.sums, counts.sums,
                                                                rtol=1e-6, atol=1e-9):
            raise DataError("the loader yielded other images when read a second time (a "
                            "shuffled or augmented loader?); statistics need the same images "
                            "in every reading: pass a loader without shuffling or "
                            "augmentation")
        df = torch.where(exact, df, again.df)
        tf_sum = torch.where(exact, tf_sum, again.tf)
    packed = all_reduce_sum(torch.stack([df, tf_sum]).to(device)).cpu()
    return {name: (packed[0, lo:hi].clone(), packed[1, lo:hi].clone())
            for name, (lo, hi) in offsets}


def _reduce_classes(sums: torch.Tensor | None, counts: torch.Tensor | None, total: int,
                    device: torch.device, num_classes: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    width = torch.tensor([0 if sums is None else sums.shape[0]], device=device)
    if is_distributed():  # ranks may have seen different label ranges
        torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MAX)
    width = int(width.item()) if num_classes is None else num_classes
    full_sums = torch.zeros(width, total, dtype=torch.float64, device=device)
    full_counts = torch.zeros(width, dtype=torch.float64, device=device)
    if sums is not None:
        full_sums[:sums.shape[0]] = sums
        full_counts[:counts.shape[0]] = counts
    all_reduce_sum(full_sums)
    all_reduce_sum(full_counts)
    return full_sums.cpu(), full_counts.cpu()


def _reduce_samples(chunks: list[torch.Tensor], stats: ActivationStats, device: torch.device
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exact TF-IDF ingredients from every image's stored values, layer by layer.

    The mean over all documents needs every rank's channel sums; with it, each rank counts
    its own documents at or above the mean and sums their TF shares; both are sums, so an
    all-reduce of them equals the single-process result. One layer's block is gathered at
    a time, so the full matrix is never copied.
    """
    from .scoring import document_counts

    col = torch.stack([c.double().sum(dim=0) for c in chunks]).sum(dim=0).to(device)
    all_reduce_sum(col)
    mean = (col / stats.num_samples).cpu()
    reduced = {}
    for name, (lo, hi) in stats._offsets().items():
        block = torch.cat([c[:, lo:hi] for c in chunks])
        df, tf_sum = document_counts(block.T, mean=mean[lo:hi], name=name)
        packed = torch.stack([df, tf_sum]).to(device)
        all_reduce_sum(packed)
        reduced[name] = (packed[0].cpu(), packed[1].cpu())
    return reduced


def _check_finite(values: torch.Tensor, offsets: list[tuple[str, tuple[int, int]]]) -> None:
    # A NaN or inf term makes a sum non-finite, so a finite float64 sum clears every value
    # in one reduction; only a sum that overflowed needs the per-value test.
    if (math.isfinite(float(values.sum(dtype=torch.float64)))
            or bool(torch.isfinite(values).all())):
        return
    bad = torch.isfinite(values).all(dim=0).logical_not().nonzero().flatten().tolist()
    for name, (lo, hi) in offsets:
        if any(lo <= i < hi for i in bad):
            raise DataError(f"activations of layer '{name}' contain NaN or inf; check the "
                            "checkpoint (diverged weights?) and the input normalisation")
    raise DataError("activations contain NaN or inf")  # pragma: no cover - offsets cover all


def memory_bytes(channels: int, samples: int, documents: str = "sample",
                 dtype: torch.dtype = torch.float32, num_classes: int = 0) -> int:
    """Bytes the statistics of ``channels`` scored channels take when every image's vector
    is kept (``keep_features``, or class documents; see the module notes)."""
    if documents == "class":
        return 8 * channels * num_classes
    return (2 if dtype == torch.float16 else 4) * channels * math.ceil(samples)

