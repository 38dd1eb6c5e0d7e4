"""Activation statistics for CDP: one pooled value per channel per document.

For every scored Conv2d the output (before BatchNorm) goes through ReLU and a spatial mean,
giving one value per channel per image. Two kinds of *documents* are supported:

* ``"sample"`` (the published code): every sampled image is a document. The TF-IDF needs
  the mean over all documents before anything can be counted, so the pooled values of
  every image are kept: **4 bytes per sample per channel** in float32 (2 with
  ``dtype=torch.float16``). ResNet-56 has 2,032 scored channels, so 10,000 images cost
  81 MB; ResNet-50 has 26,560, so 50,000 images cost 5.3 GB (2.7 GB in float16).
* ``"class"`` (the paper's wording): every class is a document, the mean pooled vector of
  its images. Only per-class sums and counts are kept: **8 bytes per class per channel**
  (float64 sums), whatever the number of images.

The pass is streaming: all scored layers of a batch are gathered into one ``[B, channels]``
row block and copied once into a chunked buffer, so memory grows linearly and nothing is
re-concatenated batch after batch. Under ``torch.distributed`` each rank reads its shard and
the result is reduced exactly (see :meth:`ActivationStats.sufficient`).

This module collects; the statistics themselves, their views and their file are
:class:`~cdprune.activations.ActivationStats` (also importable from here).
"""


from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .activations import DOCUMENTS, ActivationStats, conv_layer_names, model_fingerprint
from .distributed import all_reduce_sum, is_distributed
from .errors import ConfigError, DataError
from .evaluate import eval_mode
from .progress import progress as progress_bar
from .suggest import did_you_mean

__all__ = ["ActivationStats", "collect_stats", "conv_layer_names", "model_fingerprint"]

logger = logging.getLogger(__name__)

TAPS = ("conv", "act")
_CHUNK_ROWS = 4096


# ---------------------------------------------------------------------- collection
class _Collector:
    """Forward hooks that pool each scored layer's output into one row block per batch.

    With ``tap="act"`` the value pooled is the output of the BatchNorm that reads the conv
    output (found by tensor identity while the model runs); a conv without one falls back
    to its own output.
    """

    def __init__(self, modules: Sequence[nn.Module], model: nn.Module, tap: str = "conv"):
        self.pooled: list[torch.Tensor | None] = [None] * len(modules)
        self.widths = [m.out_channels for m in modules]
        self.scratch = torch.empty(0)
        self.tap = tap
        if tap == "conv":
            self.handles = [m.register_forward_hook(self._hook(i))
                            for i, m in enumerate(modules)]
            return
        self.pending: dict[int, tuple[int, torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._conv_seen(i))
                        for i, m in enumerate(modules)]
        self.handles += [m.register_forward_hook(self._bn_hook) for m in model.modules()
                         if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _conv_seen(self, index: int):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self.pending[id(output)] = (index, output)
        return hook

    def _bn_hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        entry = self.pending.pop(id(inputs[0]), None)
        if entry is not None:
            self.pooled[entry[0]] = self._relu(output).mean(dim=(2, 3), dtype=torch.float32)

    def _relu(self, output: torch.Tensor) -> torch.Tensor:
        # Hooks run one after another, so one scratch buffer serves them all. Writing the
        # ReLU into reused memory instead of a fresh tensor avoids the page faults of a
        # large allocation per layer, which cost more than the ReLU itself on a CPU.
        n = output.numel()
        if (self.scratch.numel() < n or self.scratch.dtype != output.dtype
                or self.scratch.device != output.device):
            self.scratch = torch.empty(n, dtype=output.dtype, device=output.device)
        buf = self.scratch[:n].view(output.shape)
        return torch.clamp_min(output, 0, out=buf)

    def _hook(self, index: int):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            # ReLU then spatial mean; float32 even under autocast so sums stay accurate.
            self.pooled[index] = self._relu(output).mean(dim=(2, 3), dtype=torch.float32)
        return hook

    def take(self) -> torch.Tensor:
        if self.tap == "act":  # convs no BatchNorm read: their own output
            for index, output in self.pending.values():
                self.pooled[index] = self._relu(output).mean(dim=(2, 3), dtype=torch.float32)
            self.pending.clear()
        ran = next((p for p in self.pooled if p is not None), None)
        if ran is None:
            raise ConfigError("none of the scored layers ran in the model's forward pass")
        # A layer that does not run in eval mode (GoogLeNet's and Inception v3's auxiliary
        # classifiers) is never active: zeros. It is outside the traced graph, so never pruned.
        rows = torch.cat([ran.new_zeros(ran.shape[0], w) if p is None else p
                          for p, w in zip(self.pooled, self.widths)], dim=1)
        self.pooled = [None] * len(self.pooled)
        return rows

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.scratch = torch.empty(0)


def _resolve_layers(model: nn.Module, layers: Iterable[str] | None) -> list[str]:
    convs = conv_layer_names(model)
    if not convs:
        raise ConfigError(f"model {type(model).__name__} has no nn.Conv2d layer; CDP scores "
                          "convolution filters, so there is nothing to score")
    if layers is None:
        return convs
    layers = list(layers)
    named = dict(model.named_modules())
    for name in layers:
        if name not in named:
            hint = did_you_mean(name, convs, before="; ")
            raise ConfigError(f"layer '{name}' does not exist in the model{hint} "
                              "(list them with cdprune.stats.conv_layer_names(model))")
        if not isinstance(named[name], nn.Conv2d):
            raise ConfigError(f"layer '{name}' is a {type(named[name]).__name__}, not a Conv2d; "
                              "only Conv2d layers can be scored")
    return [n for n in convs if n in set(layers)]


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
) -> ActivationStats:
    """Run images through ``model`` and gather the pooled activations CDP scores.

    Args:
        model: the pretrained network; its mode is restored afterwards.
        loader: yields image batches or ``(images, labels)``; labels are needed for
            ``documents="class"``. Under ``torch.distributed`` each rank passes its shard.
        layers: Conv2d names to score; all Conv2d layers by default.
        max_batches: stop after this many batches (the original ``--stop_batch``).
        documents: ``"sample"`` (every image a document, as published) or ``"class"``.
        num_classes: number of classes for class documents; inferred from the labels
            seen (over all ranks) when omitted.
        device: where to run; defaults to the device of the model's parameters.
        dtype: storage of per-sample values, ``torch.float32`` or ``torch.float16``.
        tap: where a filter's activation is read: ``"conv"``, the conv output before
            BatchNorm (published), or ``"act"``, the output of the BatchNorm that follows,
            i.e. what the next layer receives after its ReLU. Default ``"conv"``.
        variant: ``"published"`` forces every option to the published code's
            (``tap="conv"``, ``documents="sample"``) whatever else is passed.
        progress: show a progress bar.

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
        from .options import published_conflicts

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
        raise ConfigError(f"max_batches (--stop-batch) must be a positive integer, got "
                          f"{max_batches}; leave it unset to use the whole loader")
    if dtype not in (torch.float32, torch.float16):
        raise ConfigError(f"dtype {dtype} is not supported; use torch.float32 or torch.float16")
    names = _resolve_layers(model, layers)
    modules = dict(model.named_modules())
    channels = {n: modules[n].out_channels for n in names}
    total = sum(channels.values())
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)

    expected = None
    if max_batches is not None:
        expected = max_batches
    elif hasattr(loader, "__len__"):
        expected = len(loader)

    collector = _Collector([modules[n] for n in names], model, tap)
    chunks: list[torch.Tensor] = []
    filled = 0
    sums = counts = None
    labels_max = -1
    seen = 0
    batches = 0
    try:
        with eval_mode(model), torch.inference_mode():
            bar = progress_bar(expected, "statistics", bar=progress, items="images")
            for batch in loader:
                if max_batches is not None and batches >= max_batches:
                    break
                images, labels = _split_batch(batch)
                model(images.to(device, non_blocking=True))
                rows = collector.take()
                n = rows.shape[0]
                if documents == "sample":
                    rows = rows.to("cpu", dtype)
                    pos = 0
                    while pos < n:  # fill fixed-size chunks; no growing tensor is re-copied
                        if filled == 0 or filled == chunks[-1].shape[0]:
                            chunks.append(torch.empty(_CHUNK_ROWS, total, dtype=dtype))
                            filled = 0
                        take = min(n - pos, _CHUNK_ROWS - filled)
                        chunks[-1][filled:filled + take] = rows[pos:pos + take]
                        filled += take
                        pos += take
                else:
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
                        counts = torch.zeros(width, dtype=torch.float64, device=device)
                    elif width > sums.shape[0]:  # classes grow rarely; pad, do not re-cat rows
                        sums = torch.cat([sums, sums.new_zeros(width - sums.shape[0], total)])
                        counts = torch.cat([counts, counts.new_zeros(width - counts.shape[0])])
                    sums.index_add_(0, labels, rows.double())
                    counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
                seen += n
                batches += 1
                bar.update(1, items=n)
            bar.close()
    finally:
        collector.remove()

    if max_batches is not None and batches < max_batches:
        logger.warning("the loader yielded %d batches, fewer than the %d asked for; using the "
                       "%d images there are", batches, max_batches, seen)
    total_seen = int(all_reduce_sum(torch.tensor([seen], dtype=torch.int64, device=device)).item())
    if total_seen == 0:
        raise DataError("the loader yielded no images; check the dataset and --stop-batch")

    stats = ActivationStats(documents=documents, layers=names, channels=channels,
                            num_samples=total_seen, fingerprint=model_fingerprint(model),
                            meta={"batches": batches, "tap": tap})
    if documents == "class":
        stats.class_sums, stats.class_counts = _reduce_classes(sums, counts, total, device,
                                                               num_classes)
        _check_finite(stats.class_sums, stats)
        return stats

    if chunks:
        chunks[-1] = chunks[-1][:filled]
    else:  # a rank with an empty shard
        chunks = [torch.empty(0, total, dtype=dtype)]
    features = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    _check_finite(features, stats)
    if not is_distributed():
        stats.features = features
        return stats
    stats.reduced = _reduce_samples(features, stats, device)
    return stats


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


def _reduce_samples(features: torch.Tensor, stats: ActivationStats, device: torch.device
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exact distributed TF-IDF ingredients without gathering the N x C matrix.

    The mean over all documents needs every rank's channel sums; with it, each rank counts
    its own documents at or above the mean and sums their TF shares; both are sums, so an
    all-reduce of them equals the single-process result.
    """
    from .scoring import document_counts

    col = features.double().sum(dim=0).to(device)
    all_reduce_sum(col)
    mean = (col / stats.num_samples).cpu()
    reduced = {}
    for name, (lo, hi) in stats._offsets().items():
        df, tf_sum = document_counts(features[:, lo:hi].T, mean=mean[lo:hi], name=name)
        packed = torch.stack([df, tf_sum]).to(device)
        all_reduce_sum(packed)
        reduced[name] = (packed[0].cpu(), packed[1].cpu())
    return reduced


def _check_finite(values: torch.Tensor, stats: ActivationStats) -> None:
    if bool(torch.isfinite(values).all()):
        return
    bad = torch.isfinite(values).all(dim=0).logical_not().nonzero().flatten().tolist()
    for name, (lo, hi) in stats._offsets().items():
        if any(lo <= i < hi for i in bad):
            raise DataError(f"activations of layer '{name}' contain NaN or inf; check the "
                            "checkpoint (diverged weights?) and the input normalisation")
    raise DataError("activations contain NaN or inf")  # pragma: no cover - offsets cover all


def memory_bytes(channels: int, samples: int, documents: str = "sample",
                 dtype: torch.dtype = torch.float32, num_classes: int = 0) -> int:
    """Bytes the statistics of ``channels`` scored channels take (see the module notes)."""
    if documents == "class":
        return 8 * channels * num_classes
    return (2 if dtype == torch.float16 else 4) * channels * math.ceil(samples)

