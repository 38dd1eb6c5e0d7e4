"""A latency model measured on the device itself, and an allocation that spends it.

MACs are a poor proxy for speed: a channel of an 8x8 layer costs as many MACs per
position as one of a 32x32 layer but far less time, memory-bound layers and per-operator
overhead cost time without MACs, and kernels run faster at some widths than at others.
So, as in hardware-aware pruning with latency lookup tables (HALP, Shen et al. 2022),
every Conv2d/Linear layer is *timed* at a grid of input and output widths on the device,
with the batch size and threads the model will run with; between grid points the table
interpolates bilinearly. A convolution is timed together with a BatchNorm and a ReLU of
its output width, because these memory-bound operators shrink with it.

Measurements are expensive and noisy, so they are cached (one JSON file per device,
batch size, threads, torch version and set of layer shapes) and every timing is a median
of repeats after warm-up. The timer is injectable: tests pass a fake one that returns a
number computed from the layer's shape.

The allocation (:func:`greedy_order`) is independent of any criterion: scores choose
*which* channels of a group go (each group's units come lowest-score first), the table
decides *how many* go from each group, by repeatedly removing the unit that loses the
least score per second of predicted latency saved.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..fileio import atomic_write_text

__all__ = ["CLOCK_READERS", "LatencySettings", "LatencyTable", "Timer", "UnitChange",
           "cache_dir_default", "compare_networks", "cpu_clock", "device_name",
           "fastest_multiple", "greedy_order", "measure_network", "multiple_from_timings",
           "time_calls", "time_layer", "wall_clock"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "cdprune.latency/2"
# Grid of width fractions timed per layer; between them the table interpolates. A layer's
# compute is bilinear in its widths (a + b * in * out), which bilinear interpolation
# reproduces exactly from any grid, so three points per axis lose little against four and
# take about half the timings.
FRACTIONS = (0.25, 0.5, 1.0)
MULTIPLES = (1, 2, 4, 8, 16)

# A timer gets a module and its input and returns the seconds of one forward pass.
Timer = Callable[[nn.Module, torch.Tensor], float]


# The clocks a timing can read: wall time, or the CPU time of the whole process.
CLOCK_READERS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_calls(calls: Sequence[Callable[[], Any]], *, warmup: int, repeats: int,
               clock: str = "wall", sync: Callable[[], None] | None = None
               ) -> list[list[float]]:
    """Seconds of every timed call of each callable: the one timing loop of cdprune.

    Each callable is first called ``warmup`` times untimed (allocator, caches, lazy
    initialisation), one after the other; then ``repeats`` rounds call every callable
    once in turn (A, B, A, B, ...), so that a busier moment of a shared machine slows
    all of them alike. Callers keep the median, which the odd slow call barely moves.

    Args:
        calls: the work to time, each a callable without arguments.
        warmup: untimed calls of each callable first.
        repeats: timed calls of each callable.
        clock: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``:
            every thread of the process counted, waits for a core not; CPU work only).
        sync: called before and after each timed call, e.g. ``torch.cuda.synchronize``
            so that a GPU's queued work is inside the reading.

    Returns:
        One list of ``repeats`` seconds per callable, in the order of ``calls``.

    Raises:
        ConfigError: an unknown clock or a negative count.
    """
    if clock not in CLOCK_READERS:
        raise ConfigError(f"clock {clock!r} is not known; use one of "
                          f"{', '.join(CLOCK_READERS)}")
    if warmup < 0 or repeats < 0:
        raise ConfigError(f"need warmup >= 0 and repeats >= 0; got warmup={warmup}, "
                          f"repeats={repeats}")
    now = CLOCK_READERS[clock]
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, seconds in zip(calls, times):
            if sync is not None:
                sync()
            start = now()
            call()
            if sync is not None:
                sync()
            seconds.append(now() - start)
    return times


def wall_clock(warmup: int = 3, repeats: int = 9) -> Timer:
    """A timer: ``warmup`` untimed runs, then the median of ``repeats`` timed ones.

    Runs under ``torch.inference_mode``; on CUDA it synchronises around each run.
    """
    def timer(module: nn.Module, x: torch.Tensor) -> float:
        sync = torch.cuda.synchronize if x.is_cuda else None
        with torch.inference_mode():
            (times,) = time_calls([lambda: module(x)], warmup=warmup, repeats=repeats,
                                  sync=sync)
        return statistics.median(times)
    return timer


def cpu_clock(warmup: int = 3, repeats: int = 9) -> Timer:
    """A timer on the CPU time of the whole process (every PyTorch thread counted).

    A run on a shared machine that waits for a core is not charged for the wait, so a
    busy moment moves CPU time far less than wall time; ``warmup`` untimed runs, then the
    median of ``repeats`` timed ones. For the CPU only (a GPU's work is not CPU time).
    """
    def timer(module: nn.Module, x: torch.Tensor) -> float:
        with torch.inference_mode():
            (times,) = time_calls([lambda: module(x)], warmup=warmup, repeats=repeats,
                                  clock="cpu")
        return statistics.median(times)
    return timer


def device_name(device: str | torch.device = "cpu") -> str:
    """What the timings belong to: the CPU model (or the GPU's name) and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_model()}:{os.cpu_count()} cores"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` where there is one), for result records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir_default() -> Path:
    """``$XDG_CACHE_HOME/cdprune/latency`` (``~/.cache/cdprune/latency``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cdprune" / "latency"


@dataclass
class LatencySettings:
    """How latency is measured for a latency target.

    Attributes:
        batch_size: the batch the model will run with (timings depend on it).
        threads: CPU threads while timing (``torch.set_num_threads``); None keeps torch's.
        device: where to time ("cpu" or "cuda").
        timer: seconds of one forward pass of a module on an input; default
            :func:`wall_clock`. Tests pass a fake one.
        cache_dir: where measured tables are kept; None: no cache.
        tolerance: the measured reduction must land within this fraction of the target
            (0.05: a -40% target accepts -38% to -42%).
        max_rounds: whole-network measurements spent homing in on the target.
        round_to: "auto" times the layers and keeps widths at the multiple that runs
            fastest (at most half the narrowest prunable layer); an int fixes it; None
            leaves widths free.
        warmup, repeats: untimed and timed runs of a whole network timed alone (the
            median is kept; the original's reference time); ``warmup`` also precedes the
            alternating pairs below.
        table_warmup, table_repeats: the same for the cells of the latency table and the
            width-multiple probe. The cells of one layer shape are timed interleaved
            (each round times every cell once), so a busy moment slows all of them alike
            and the per-cell median needs few rounds; the monotone fit then drops what
            outliers remain.
        clock: what the default timer reads: "auto" (CPU time of the process on the CPU,
            wall time on a GPU), "cpu" or "wall".
        search_rounds: alternating base/pruned pairs (one forward pass of each) that
            time each round of the search for a latency target.
        confirm_rounds: alternating base/pruned pairs of the independent re-measurement that
            decides whether a latency target was hit (the search's own rounds choose the
            pruning, so their best is biased towards the target).
    """

    batch_size: int = 1
    threads: int | None = None
    device: str = "cpu"
    timer: Timer | None = None
    cache_dir: str | os.PathLike | None = field(default_factory=cache_dir_default)
    tolerance: float = 0.05
    max_rounds: int = 6
    round_to: int | str | None = "auto"
    warmup: int = 2
    repeats: int = 7
    table_warmup: int = 1
    table_repeats: int = 3
    clock: str = "auto"
    search_rounds: int = 15
    confirm_rounds: int = 27

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise ConfigError(f"clock={self.clock!r} is not valid; use one of "
                              f"{', '.join(CLOCKS)}")

    def clock_name(self) -> str:
        """The clock the default timer reads: "cpu" or "wall"."""
        if self.clock == "auto":
            return "wall" if str(self.device).startswith("cuda") else "cpu"
        return self.clock

    def get_timer(self) -> Timer:
        if self.timer is not None:
            return self.timer
        clock = cpu_clock if self.clock_name() == "cpu" else wall_clock
        return clock(self.warmup, self.repeats)


CLOCKS = ("auto", "cpu", "wall")


class _Threads:
    """Sets torch's thread count for a block and restores it after."""

    def __init__(self, threads: int | None):
        self.threads, self.before = threads, torch.get_num_threads()

    def __enter__(self) -> _Threads:
        if self.threads:
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.before)


def measure_network(model: nn.Module, example: torch.Tensor, settings: LatencySettings
                    ) -> float:
    """Seconds of one forward pass of the whole model at the settings' batch size."""
    x = _batch(example, settings)
    was_training = model.training
    model.eval()
    try:
        with _Threads(settings.threads):
            return settings.get_timer()(model.to(settings.device), x)
    finally:
        model.train(was_training)


def _batch(example: torch.Tensor, settings: LatencySettings) -> torch.Tensor:
    sample = example[:1]
    return sample.expand(settings.batch_size, *sample.shape[1:]).contiguous().to(
        settings.device)


# ------------------------------------------------------------------ the lookup table
@dataclass(frozen=True)
class LayerShape:
    """Everything but the widths that decides a layer's latency."""

    kind: str  # "conv", "dw" (depthwise) or "linear"
    in_ch: int
    out_ch: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    spatial: tuple[int, ...] = ()  # input H, W (conv) or the extra dims (linear)

    def key(self) -> str:
        return json.dumps([self.kind, self.in_ch, self.out_ch, self.kernel, self.stride,
                           self.padding, self.dilation, self.groups, self.spatial])

    def build(self, c_in: int, c_out: int, device: str | torch.device = "cpu"
              ) -> tuple[nn.Module, tuple[int, ...]]:
        """The layer at these widths (with BatchNorm and ReLU for convs) and its input
        shape, on ``device``, in eval mode.

        Its parameters and buffers are all 0.01 rather than randomly initialised: a
        dense layer's time does not depend on the values (as long as they are normal
        floats), and the random initialisation cost a fifth of building a table.
        """
        if self.kind == "linear":
            module: nn.Module = nn.Linear(c_in, c_out, device="meta")
            size: tuple[int, ...] = (*self.spatial, c_in)
        else:
            groups = c_in if self.kind == "dw" else self.groups
            module = nn.Sequential(
                nn.Conv2d(c_in, c_out, self.kernel, self.stride, self.padding, self.dilation,
                          groups=groups, bias=False, device="meta"),
                nn.BatchNorm2d(c_out, device="meta"), nn.ReLU())
            size = (c_in, *self.spatial)
        for part in module.modules():  # real tensors for the meta ones, all 0.01
            for name, p in list(part.named_parameters(recurse=False)):
                setattr(part, name, nn.Parameter(torch.full(p.shape, 0.01, device=device),
                                                 requires_grad=False))
            for name, b in list(part.named_buffers(recurse=False)):
                part.register_buffer(name, torch.full(b.shape, 0.01, dtype=b.dtype,
                                                      device=device) if b.is_floating_point()
                                     else torch.zeros(b.shape, dtype=b.dtype, device=device))
        return module.eval(), size

    def grid(self) -> tuple[list[int], list[int]]:
        """Widths timed on each axis: fractions of the full width, kept divisible."""
        step = self.groups if self.kind == "conv" else 1
        def axis(full: int) -> list[int]:
            ws = {max(step, round(f * full / step) * step) for f in FRACTIONS}
            return sorted(w for w in ws if w <= full) or [full]
        if self.kind == "dw":  # one width: input and output shrink together
            ws = axis(self.out_ch)
            return ws, ws
        return axis(self.in_ch), axis(self.out_ch)


def layer_shape(module: nn.Module, input_shape: Sequence[int]) -> LayerShape:
    """The :class:`LayerShape` of a Conv2d or Linear seen with this input shape."""
    if isinstance(module, nn.Linear):
        return LayerShape("linear", module.in_features, module.out_features,
                          spatial=tuple(int(s) for s in input_shape[1:-1]))
    depthwise = module.groups > 1 and module.groups == module.in_channels
    return LayerShape("dw" if depthwise else "conv", module.in_channels, module.out_channels,
                      tuple(module.kernel_size), tuple(module.stride), tuple(module.padding),
                      tuple(module.dilation), 1 if depthwise else module.groups,
                      tuple(int(s) for s in input_shape[-2:]))


def layer_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, LayerShape]:
    """Shapes of every Conv2d and Linear, by module name, from one forward pass."""
    names = {m: n for n, m in model.named_modules()}
    shapes: dict[str, LayerShape] = {}

    def hook(m: nn.Module, inputs: Any, out: Any) -> None:
        shapes.setdefault(names[m], layer_shape(m, inputs[0].shape))

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return shapes


def time_layer(shape: LayerShape, widths: Sequence[tuple[int, int]],
               settings: LatencySettings) -> list[float]:
    """Seconds of one forward pass of the layer at each ``(in, out)`` width.

    The widths are timed interleaved with :func:`time_calls` (``table_warmup`` untimed
    calls each, then ``table_repeats`` rounds over all of them) and each keeps its median.
    Widths with the same input width share one input tensor. An injected
    ``settings.timer`` (tests) is called once per width instead.
    """
    inputs: dict[int, torch.Tensor] = {}
    layers = []
    for c_in, c_out in widths:
        module, size = shape.build(c_in, c_out, settings.device)
        if c_in not in inputs:  # the values do not matter, only that they are normal
            inputs[c_in] = torch.full((settings.batch_size, *size), 0.5,
                                      device=settings.device)
        layers.append((module, inputs[c_in]))
    if settings.timer is not None:
        return [float(settings.timer(module, x)) for module, x in layers]
    sync = torch.cuda.synchronize if str(settings.device).startswith("cuda") else None
    with torch.inference_mode():
        times = time_calls([functools.partial(module, x) for module, x in layers],
                           warmup=settings.table_warmup, repeats=settings.table_repeats,
                           clock=settings.clock_name(), sync=sync)
    return [statistics.median(t) for t in times]


class LatencyTable:
    """Measured seconds per layer shape on a grid of widths, interpolated between.

    Build it with :meth:`measure`; read it with :meth:`predict` (one layer at given
    widths) or :meth:`network` (a whole set of layers).
    """

    def __init__(self, tables: dict[str, dict[str, Any]], key: dict[str, Any],
                 path: Path | None = None, notes: dict[str, Any] | None = None):
        self.tables = tables  # shape key -> {"in": [...], "out": [...], "s": [[...]]}
        self.smooth = {k: _monotone(t["in"], t["out"], t["s"]) for k, t in tables.items()}
        self.key = key
        self.path = path  # the cache file, if any
        self.notes = notes or {}  # other measured facts kept with the table (round_to)
        self.measured = 0  # layer timings taken (not read from the cache)

    def note(self, name: str, value: Any) -> None:
        """Keep a measured fact with the table (and in its cache file)."""
        self.notes[name] = value
        self._save()

    def _save(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({"key": self.key, "tables": self.tables,
                                                     "notes": self.notes}))

    @classmethod
    def measure(cls, shapes: Iterable[LayerShape], settings: LatencySettings,
                signature: str = "") -> LatencyTable:
        """Time every distinct shape on its grid, or read the timings from the cache."""
        shapes = sorted(set(shapes), key=LayerShape.key)
        key = {"format": CACHE_FORMAT, "device": device_name(settings.device),
               "batch_size": settings.batch_size, "threads": settings.threads or
               torch.get_num_threads(), "torch": torch.__version__, "timer": getattr(
                   settings.timer, "__qualname__", f"{settings.clock_name()}_clock"),
               "layers": hashlib.sha256("\n".join(
                   [signature] + [s.key() for s in shapes]).encode()).hexdigest()[:16]}
        path = None
        if settings.cache_dir is not None:
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
            path = Path(settings.cache_dir) / f"latency-{digest[:20]}.json"
            cached = _read_cache(path, key)
            if cached is not None:
                logger.info("latency table read from %s", path)
                return cls(cached.get("tables", {}), key, path, cached.get("notes"))
        table = cls({}, key, path)
        with _Threads(settings.threads):
            for shape in shapes:
                ins, outs = shape.grid()
                cells = [(i, j) for i, c_in in enumerate(ins) for j, c_out in enumerate(outs)
                         if shape.kind != "dw" or c_in == c_out]
                seconds = time_layer(shape, [(ins[i], outs[j]) for i, j in cells], settings)
                grid: list[list[float | None]] = [[None] * len(outs) for _ in ins]
                for (i, j), value in zip(cells, seconds):
                    grid[i][j] = value
                table.measured += len(cells)
                table.tables[shape.key()] = {"in": ins, "out": outs, "s": grid}
                table.smooth[shape.key()] = _monotone(ins, outs, grid)
        logger.info("latency table: %d layer timings on %s", table.measured, key["device"])
        table._save()
        return table

    def predict(self, shape: LayerShape, c_in: int, c_out: int) -> float:
        """Seconds of the layer at these widths (bilinear between timed widths)."""
        t = self.tables[shape.key()]
        grid = self.smooth[shape.key()]
        if shape.kind == "dw":
            w = min(c_in, c_out)
            diag = [grid[i][i] for i in range(len(t["in"]))]
            return _interp(t["in"], diag, w)
        rows = [_interp(t["out"], row, c_out) for row in grid]
        return _interp(t["in"], rows, c_in)

    def network(self, shapes: dict[Hashable, LayerShape],
                widths: dict[Hashable, tuple[int, int]]) -> float:
        """Sum of the layers' predicted seconds at the given (in, out) widths."""
        return sum(self.predict(s, *widths.get(k, (s.in_ch, s.out_ch)))
                   for k, s in shapes.items())


def _monotone(ins: Sequence[int], outs: Sequence[int], grid: list[list[float | None]]
              ) -> list[list[float | None]]:
    """The timed grid with the outliers a busy machine leaves taken out.

    A layer never gets faster with more channels, nor more than twice as much slower per
    channel added: each timing is first capped at twice its narrower neighbour's scaled
    to the wider width, then lowered to the fastest timing at any wider width. A load
    spike during one timing would otherwise read as a layer whose last channels cost
    hundreds of times the rest, and the allocation would chase that phantom saving.
    """
    g = [list(row) for row in grid]
    for i, row in enumerate(g):  # along the output width
        for j in range(1, len(row)):
            if row[j] is not None and row[j - 1] is not None:
                row[j] = min(row[j], 2 * row[j - 1] * outs[j] / outs[j - 1])
        if i:  # along the input width
            for j, v in enumerate(row):
                if v is not None and g[i - 1][j] is not None:
                    row[j] = min(v, 2 * g[i - 1][j] * ins[i] / ins[i - 1])
    for i in range(len(g) - 1, -1, -1):
        for j in range(len(g[i]) - 1, -1, -1):
            wider = [g[a][b] for a in range(i, len(g)) for b in range(j, len(g[i]))
                     if g[a][b] is not None and (a, b) != (i, j)]
            if g[i][j] is not None and wider:
                g[i][j] = min(g[i][j], min(wider))
    return g


def _interp(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys); below the first point, towards (0, 0)."""
    if x <= 0:
        return 0.0
    if x <= xs[0]:
        return ys[0] * x / xs[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1] * x / xs[-1]  # wider than timed: proportional


def _read_cache(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:  # another layout, or elsewhere
        return None
    return data


# -------------------------------------------------------------- width rounding
def fastest_multiple(shape: LayerShape, settings: LatencySettings,
                     multiples: Sequence[int] = MULTIPLES, margin: float = 0.03) -> int:
    """The output-channel multiple whose widths run fastest for this layer.

    The layer is timed at the output widths within ``max(multiples)`` of half its
    width (the widths pruning produces: the even ones and the odd ones 1 mod 8), its
    input width fixed, all interleaved. A straight line
    through all timings is the trend (fixed overhead plus a cost per channel); each
    width's timing over the trend says how much faster or slower than its neighbours it
    runs. For each multiple, the median of that ratio over the widths divisible by it:
    the lowest wins, and a smaller multiple within ``margin`` of it is preferred, since
    it constrains the allocation less.
    """
    full, span = shape.out_ch, max(multiples)
    # The even widths and the odd ones 1 mod 8: odd widths were half the probe, and a
    # few of them judge a multiple of 1 as well as all of them do.
    widths = [w for w in range(max(1, full // 2 - span + 1), min(full, full // 2 + span) + 1)
              if (w % 2 == 0 or w % 8 == 1) and (shape.kind != "conv" or w % shape.groups == 0)]
    with _Threads(settings.threads):
        timed = time_layer(shape, [(w if shape.kind == "dw" else shape.in_ch, w)
                                   for w in widths], settings)
    return multiple_from_timings(dict(zip(widths, timed)), multiples, margin)


def multiple_from_timings(seconds: dict[int, float], multiples: Sequence[int] = MULTIPLES,
                          margin: float = 0.03) -> int:
    """The width multiple whose widths run fastest against the trend of ``seconds``
    (output width -> seconds): see :func:`fastest_multiple`."""
    ws, ts = list(seconds), list(seconds.values())
    mean_w, mean_t = statistics.fmean(ws), statistics.fmean(ts)
    var = sum((w - mean_w) ** 2 for w in ws) or 1.0
    slope = sum((w - mean_w) * (t - mean_t) for w, t in zip(ws, ts)) / var
    # A noisy fit can dip to zero at the narrow end; never divide by less than the
    # fastest timing seen.
    trend = {w: max(mean_t + slope * (w - mean_w), min(ts)) for w in ws}
    costs = {m: statistics.median(seconds[w] / trend[w] for w in ws if w % m == 0)
             for m in multiples if any(w % m == 0 for w in ws) and trend}
    best = min(costs.values())
    chosen = min(m for m, c in costs.items() if c <= best * (1 + margin))
    logger.info("time over trend by width multiple: %s; rounding to %d",
                {m: f"{c:.3f}" for m, c in costs.items()}, chosen)
    return chosen


# ------------------------------------------------------------------ allocation
@dataclass
class UnitChange:
    """One removable unit of a group: its score and how many channels it takes from
    each layer, as ``(layer, input channels removed, output channels removed)``."""

    group: int
    score: float
    changes: list[tuple[Hashable, int, int]]


def greedy_order(groups: Sequence[Sequence[UnitChange]], shapes: dict[Hashable, LayerShape],
                 table: LatencyTable) -> list[tuple[int, int, float]]:
    """The order in which units go: each step, the unit losing least score per second.

    Args:
        groups: per group, its units in the only order they may go (lowest score first).
        shapes: every timed layer by key; layers outside it cost nothing.
        table: the measured latency table.

    Returns:
        ``(group, unit index, predicted seconds of the layers after this step)`` per
        step. Units whose removal saves no predicted time come last, by score.
    """
    widths = {k: [s.in_ch, s.out_ch] for k, s in shapes.items()}
    cost = {k: table.predict(s, *widths[k]) for k, s in shapes.items()}
    total = sum(cost.values())
    nxt = [0] * len(groups)

    def saving(unit: UnitChange) -> tuple[float, dict[Hashable, float]]:
        removed: dict[Hashable, list[int]] = {}
        for layer, d_in, d_out in unit.changes:
            if layer in shapes:
                r = removed.setdefault(layer, [0, 0])
                r[0] += d_in
                r[1] += d_out
        after = {k: table.predict(shapes[k], widths[k][0] - r[0], widths[k][1] - r[1])
                 for k, r in removed.items()}
        return sum(cost[k] - v for k, v in after.items()), after

    def ratio(g: int) -> tuple[float, float]:
        unit = groups[g][nxt[g]]
        saved, _ = saving(unit)
        if saved <= 0:
            return (math.inf, unit.score)
        return (max(unit.score, 0.0) / saved, unit.score)

    keys = {g: ratio(g) for g in range(len(groups)) if groups[g]}
    touches: dict[Hashable, set[int]] = {}
    for g, units in enumerate(groups):
        for unit in units:
            for layer, _, _ in unit.changes:
                touches.setdefault(layer, set()).add(g)
    order = []
    while keys:
        g = min(keys, key=lambda i: (keys[i], i))
        unit = groups[g][nxt[g]]
        saved, after = saving(unit)
        for layer, d_in, d_out in unit.changes:
            if layer in widths:
                widths[layer][0] -= d_in
                widths[layer][1] -= d_out
        cost.update(after)
        total -= saved
        order.append((g, nxt[g], total))
        nxt[g] += 1
        dirty = {g} | {h for layer, _, _ in unit.changes for h in touches.get(layer, ())}
        for h in dirty:
            if h in keys or h == g:
                if nxt[h] < len(groups[h]):
                    keys[h] = ratio(h)
                else:
                    keys.pop(h, None)
    return order


def check_fraction(name: str, value: Any) -> None:
    """Raise a ConfigError unless ``value`` is a fraction in (0, 1)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0 < value < 1):
        raise ConfigError(f"{name}={value} is outside (0, 1); give a fraction such as 0.4")


def compare_networks(base: nn.Module, pruned: nn.Module, example: torch.Tensor,
                     settings: LatencySettings, rounds: int = 15
                     ) -> tuple[float, float, float]:
    """Seconds of one forward pass of ``base`` and ``pruned``, timed alternately.

    After ``settings.warmup`` untimed passes of each, ``rounds`` pairs time one pass of
    each in turn (A, B, A, B, ...), so that a busier moment of a shared machine slows
    both alike. Returns the medians of each and the median of the per-pair ratios
    pruned / base, which cancels slow drifts in load better than a ratio of medians.
    One pass per network and pair, rather than a median of several, gives more pairs for
    the same time. An injected ``settings.timer`` is called once per network and pair.
    """
    if settings.timer is not None:
        tb, tp = [], []
        for _ in range(rounds):
            tb.append(measure_network(base, example, settings))
            tp.append(measure_network(pruned, example, settings))
    else:
        x = _batch(example, settings)
        modes = base.training, pruned.training
        base.eval().to(settings.device)
        pruned.eval().to(settings.device)
        sync = torch.cuda.synchronize if x.is_cuda else None
        try:
            with _Threads(settings.threads), torch.inference_mode():
                tb, tp = time_calls([lambda: base(x), lambda: pruned(x)],
                                    warmup=settings.warmup, repeats=rounds,
                                    clock=settings.clock_name(), sync=sync)
        finally:
            base.train(modes[0])
            pruned.train(modes[1])
    return (statistics.median(tb), statistics.median(tp),
            statistics.median(p / b for b, p in zip(tb, tp)))
