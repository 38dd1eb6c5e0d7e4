"""Exact TF-IDF ingredients of image documents in one pass and bounded memory.

With every image a document, a channel's score needs its mean over *all* images before a
single image can be counted: ``df`` counts the images at or above the mean and ``tf_sum``
adds up their shares ``F / column sum``. Keeping every image's pooled vector until the
mean is known costs 4 bytes per image per channel (406 MB for ResNet-56 on CIFAR-10's
50,000 images, 2.7 GB for ResNet-50 on 25,600). :class:`SampleCounts` keeps instead:

* per channel, the running sum (and sum of squares) of its values;
* a *certified interval* ``[low, high]`` around the running mean: images above it are
  counted at once (``df`` and ``tf_sum``), images below it are dropped, and only images
  inside it are kept as ``(channel, value, share)`` entries. The interval starts as the
  whole line and narrows to ``mean +- z * std / sqrt(n)`` as images arrive; it never
  widens, so every image is classified exactly for any mean inside it;
* the number of zero values, which need no share (a zero's share is 0), so channels that
  rarely fire cost nothing.

At the end each channel whose final mean lies in its interval gets ``df`` and ``tf_sum``
exactly: the counts above plus the kept entries at or above the mean. The mean of images
in a random order stays within a few standard errors of its running value, so with
``z = 7`` the kept entries are a few percent of the images (about ``6 / sqrt(n)`` of
them) and a channel falls outside its interval about once in 10^11. A channel that does
(images in a strongly ordered sequence can move the mean that far) is counted again by a
second pass over the images with the mean known (:class:`MeanCounts`), so the result is
exact either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["MeanCounts", "SampleCounts", "shares"]

# Standard errors of the running mean the certified interval spans on each side.
Z_WIDTH = 7.0
# Images seen before the interval first narrows (its width needs a spread estimate).
WARMUP_IMAGES = 256
# Non-zero values a channel needs before its spread is trusted to narrow its interval.
MIN_NONZERO = 128


def shares(values: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Each value's share of its image's total in its layer (float64; 0 for an all-zero layer).

    Args:
        values: ``[images, channels]`` float64, the layers' blocks side by side.
        offsets: ``(start, end)`` column range of each layer.
    """
    layout = _Layout(offsets)
    values = values.clone()
    return layout.divide_(values, layout.totals(values))


class _Layout:
    """Where each layer's block lies in a row block, for per-layer totals of every image."""

    def __init__(self, offsets: Sequence[tuple[int, int]]):
        self.layers = len(offsets)
        # Consecutive layers of one width are summed as one [images, layers, width] view.
        self.runs: list[tuple[int, int, int]] = []  # (first layer, layers, width)
        for i, (lo, hi) in enumerate(offsets):
            first, count, width = self.runs[-1] if self.runs else (0, 0, -1)
            if width == hi - lo and offsets[first][0] + count * width == lo:
                self.runs[-1] = (first, count + 1, width)
            else:
                self.runs.append((i, 1, hi - lo))
        self.starts = [offsets[first][0] for first, _, _ in self.runs]

    def totals(self, values: torch.Tensor) -> torch.Tensor:
        """``[images, layers]`` sum of each layer's block; an all-zero block's total is inf,
        so that every share of it is 0 (the published TF of an image without activation)."""
        n = values.shape[0]
        out = values.new_empty(n, self.layers)
        for start, (first, count, width) in zip(self.starts, self.runs):
            block = values[:, start:start + count * width].reshape(n, count, width)
            torch.sum(block, dim=2, out=out[:, first:first + count])
        return out.masked_fill_(out == 0, math.inf)

    def divide_(self, values: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
        """``values`` divided in place by their image's layer total: the shares."""
        n = values.shape[0]
        for start, (first, count, width) in zip(self.starts, self.runs):
            block = values[:, start:start + count * width].view(n, count, width)
            block.div_(totals[:, first:first + count, None])
        return values


def _up32(threshold: torch.Tensor) -> torch.Tensor:
    """The smallest float32 at or above each float64 threshold.

    For a float32 value v, ``v >= t`` exactly when ``v >= _up32(t)``: comparing the
    float32 rows against these is exact and needs no float64 copy of them.
    """
    rounded = threshold.float()
    low = rounded.double() < threshold
    return torch.where(low, torch.nextafter(rounded, torch.tensor(math.inf)), rounded)


class SampleCounts:
    """Streaming, exact ``(df, tf_sum)`` of image documents (see the module notes).

    Args:
        offsets: ``(start, end)`` column range of each layer in a row block.
        z: half-width of the certified interval in standard errors of the running mean.
        warmup: images seen before the interval first narrows (default
            :data:`WARMUP_IMAGES`).
    """

    def __init__(self, offsets: Sequence[tuple[int, int]], *, z: float = Z_WIDTH,
                 warmup: int | None = None):
        self.layout = _Layout(offsets)
        total = sum(hi - lo for lo, hi in offsets)
        self.z, self.warmup = z, WARMUP_IMAGES if warmup is None else warmup
        self.images = 0
        self.sums = torch.zeros(total, dtype=torch.float64)
        self.squares = torch.zeros(total, dtype=torch.float64)
        self.warm: list[torch.Tensor] | None = []  # rows of the first images, as they are
        self.offsets = list(offsets)
        self.nonzero = torch.zeros(total, dtype=torch.long)
        self.low = torch.full((total,), -math.inf, dtype=torch.float64)
        self.high = torch.full((total,), math.inf, dtype=torch.float64)
        self._thresholds()
        self.above_df = torch.zeros(total, dtype=torch.float64)
        self.above_tf = torch.zeros(total, dtype=torch.float64)
        # Entries inside the interval, in pieces appended per batch and merged on compaction.
        self.channel: list[torch.Tensor] = []
        self.value: list[torch.Tensor] = []
        self.share: list[torch.Tensor] = []
        self.kept = 0
        self._next_compaction = (0, 0)  # (images, entries) that trigger the next compaction
        self._buffer = torch.empty(0, total, dtype=torch.float64)  # see _values

    def add(self, rows: torch.Tensor) -> None:
        """Count one batch: ``[images, channels]`` pooled values (non-negative, on the CPU).

        The first :attr:`warmup` images are kept as they are (the interval needs a spread
        estimate first); later ones are classified at once.
        """
        rows = rows.float().contiguous()
        values = self._values(rows)
        self.images += rows.shape[0]
        self.sums += values.sum(dim=0)
        self.squares += torch.mul(values, values, out=self._square[:rows.shape[0]]).sum(dim=0)
        # Counted as bytes: count_nonzero and bool sums widen every flag to int64 first.
        fired = torch.ne(rows, 0, out=self._inside[:rows.shape[0]]).view(torch.uint8)
        self.nonzero += fired.sum(dim=0, dtype=torch.int32)
        if self.warm is not None:
            self.warm.append(rows.clone())
            if self.images >= self.warmup:
                self._narrow()
                warm, self.warm = self.warm, None
                for block in warm:
                    self._classify(block, self._values(block))
                self._next_compaction = (2 * self.images, max(2 * self.kept, 1 << 16))
            return
        self._classify(rows, values)
        images, entries = self._next_compaction
        if self.images >= images or self.kept >= entries:
            self._compact()

    def _values(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` in float64, in a buffer reused from batch to batch: a fresh tensor of
        this size per batch costs page faults that outweigh the arithmetic."""
        n = rows.shape[0]
        if self._buffer.shape[0] < n:
            shape = (n, rows.shape[1])
            self._buffer = torch.empty(shape, dtype=torch.float64)
            self._square = torch.empty(shape, dtype=torch.float64)
            self._above = torch.empty(shape, dtype=torch.bool)
            self._inside = torch.empty(shape, dtype=torch.bool)
        return self._buffer[:n].copy_(rows)

    def _classify(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Count the images above the intervals and keep those inside them.

        Values are compared in float32 against thresholds rounded up to float32 (exact, see
        :func:`_up32`). ``values`` (contiguous ``rows`` in float64) is overwritten with the
        shares. Entries are kept in row-major order, the order :meth:`finish` adds them in.
        """
        n = rows.shape[0]
        above = torch.ge(rows, self.high32, out=self._above[:n])
        inside = torch.ge(rows, self.low32, out=self._inside[:n])
        inside ^= above  # low32 <= high32, and low32 > 0
        share = self.layout.divide_(values, self.layout.totals(values))
        flat = inside.view(-1).nonzero().squeeze(1)
        if flat.numel():
            # A value's share is the one of the shares matrix at its place: the same float64
            # division either way, so gathering it is exact.
            self.channel.append(flat.remainder(rows.shape[1]).to(torch.int32))
            self.value.append(rows.view(-1).index_select(0, flat))
            self.share.append(share.view(-1).index_select(0, flat))
            self.kept += int(flat.numel())
        # 1.0 above, 0.0 elsewhere: a product keeps exactly the shares above (all finite and
        # non-negative) and is many times faster than masked_fill_; the counts stay integers.
        mask = self._square[:n].copy_(above)  # the squares are summed by now
        self.above_df += mask.sum(dim=0)
        self.above_tf += share.mul_(mask).sum(dim=0)

    def memory_bytes(self) -> int:
        """Bytes the kept entries take now (the per-channel vectors aside)."""
        return self.kept * (4 + 4 + 8)

    def _narrow(self) -> None:
        """Shrink every interval towards ``mean +- z * std / sqrt(images)``."""
        n = self.images
        mean = self.sums / n
        std = (self.squares / n - mean * mean).clamp_min(0).sqrt()
        half = self.z * std / math.sqrt(n)
        low = torch.maximum(self.low, mean - half)
        high = torch.minimum(self.high, mean + half)
        # A channel without spread yet (all values alike so far), with few non-zero values
        # (a rarely firing channel: its spread is not known yet, and only its non-zero
        # values are kept anyway), or whose estimate left the interval it already has,
        # keeps that interval: narrowing it would be a guess.
        ok = (std > 0) & (low <= high) & (self.nonzero >= MIN_NONZERO)
        self.low = torch.where(ok, low, self.low)
        self.high = torch.where(ok, high, self.high)
        self._thresholds()

    def _thresholds(self) -> None:
        # Zeros are counted apart (a zero adds no share), so the interval starts above 0.
        self.low32 = _up32(self.low).clamp_min(torch.finfo(torch.float32).smallest_normal
                                               / 2**23)
        self.high32 = _up32(self.high)

    def _compact(self) -> None:
        self._narrow()
        if self.channel:
            col = torch.cat(self.channel).long()
            value, share = torch.cat(self.value), torch.cat(self.share)
            above = value >= self.high32[col]
            # One index list per mask, in ascending order: the entries are added in the
            # order they were kept, whatever the selection costs.
            hit = above.nonzero().squeeze(1)
            self.above_df.index_add_(0, col.index_select(0, hit),
                                     torch.ones(hit.numel(), dtype=torch.float64))
            self.above_tf.index_add_(0, col.index_select(0, hit), share.index_select(0, hit))
            keep = above.logical_not_().logical_and_(value >= self.low32[col]).nonzero()
            keep = keep.squeeze(1)
            self.channel = [col.index_select(0, keep).to(torch.int32)]
            self.value = [value.index_select(0, keep)]
            self.share = [share.index_select(0, keep)]
            self.kept = int(keep.numel())
        self._next_compaction = (2 * self.images, max(2 * self.kept, 1 << 16))

    def finish(self, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(df, tf_sum, exact)`` given each channel's mean over all documents.

        ``exact[j]`` is False where the mean lies outside channel j's certified interval;
        its ``df`` and ``tf_sum`` must then be counted again (:class:`MeanCounts`).
        """
        mean = mean.double()
        if self.warm is not None:  # too few images to narrow anything: count them all
            counts = MeanCounts(self.offsets, mean)
            for block in self.warm:
                counts.add(block)
            return counts.df, counts.tf, torch.ones_like(mean, dtype=torch.bool)
        zeros = (self.images - self.nonzero).double()
        df = self.above_df + torch.where(mean <= 0, zeros, 0.0)
        tf = self.above_tf.clone()
        if self.channel:
            col = torch.cat(self.channel).long()
            value, share = torch.cat(self.value), torch.cat(self.share)
            hit = value.double() >= mean[col]
            df.index_add_(0, col[hit], torch.ones_like(share[hit]))
            tf.index_add_(0, col[hit], share[hit])
        exact = (self.low <= mean) & (mean <= self.high)
        return df, tf, exact


class MeanCounts:
    """``(df, tf_sum)`` of image documents when every channel's mean is already known.

    The second reading of the images for the rare channel :class:`SampleCounts` could not
    settle; it also re-adds the values, so a loader that yields other images the second
    time is noticed (:attr:`sums`).
    """

    def __init__(self, offsets: Sequence[tuple[int, int]], mean: torch.Tensor):
        self.offsets = list(offsets)
        self.mean = mean.double()
        self.images = 0
        self.sums = torch.zeros_like(self.mean)
        self.df = torch.zeros_like(self.mean)
        self.tf = torch.zeros_like(self.mean)

    def add(self, rows: torch.Tensor) -> None:
        """Count one batch: ``[images, channels]`` pooled values."""
        values = rows.double()
        hit = values >= self.mean
        self.images += values.shape[0]
        self.sums += values.sum(dim=0)
        self.df += torch.count_nonzero(hit, dim=0)
        self.tf += shares(values, self.offsets).mul_(hit).sum(dim=0)
