"""Overhead of a CDP statistics pass relative to plain inference over the same batches.

The statistics pass is one ``collect_stats`` call as ``cdprune`` runs it (image documents,
streamed, scoring excluded). Its loader interleaves the comparison batch by batch: before
or after handing a batch to ``collect_stats`` it runs the same batch through an identical
copy of the model with no hooks (plain inference), through a copy whose hooks take every
conv output's ReLU into a reused scratch and its mean into a row buffer (``scratch``: the
collector before it took the ReLU in place, same values) and through a copy that pools
only the raw conv outputs' spatial means (``mean_only``: what a fused ReLU+mean, reading
each output once and writing nothing, would cost at best), the position of the
statistics pass rotating from batch to batch. A slow moment of a shared machine therefore
lands on all four passes of a batch alike. Time is CPU time: the main thread's at 1 thread (other
processes' load does not count), the process's at more; wall-clock ratios beside.

Reported per case and thread count:
  ratio_cpu          median over batches of (statistics batch / plain batch), with its
                     quartiles: what each batch costs (target: at most 1.05)
  ratio_cpu_ci_low/high  a 95% bootstrap interval of that median (a shared VM's batches
                     scatter by +-5%: the interval says what the median can tell apart)
  ratio_cpu_total    the whole ``collect_stats`` call (setup, the first batch it watches,
                     the final counting) over the plain batches' sum
  ratio_cpu_scratch  the scratch-ReLU pass, per batch, median
  ratio_cpu_mean_only  the mean-only pass, per batch, median

Random inputs are enough: the cost does not depend on the pixel values.

    python benchmarks/stats_overhead.py --threads 1 2
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import statistics
import time

import torch

from cdprune.importance.stats import collect_stats
from cdprune.models import create_model

CASES = {  # name: (model, input size, batch size, batches)
    "resnet56-cifar": ("resnet56", 32, 128, 240),
    "resnet50-224": ("resnet50", 224, 16, 80),
}


def add_mean_only_hooks(model: torch.nn.Module) -> None:
    """For every conv, the spatial mean of its raw output into a reused buffer (not CDP's
    values: no ReLU)."""
    buffers = {}

    def hook(module, inputs, output):
        buf = buffers.get(module)
        if buf is None or buf.shape != output.shape[:2]:
            buf = buffers[module] = torch.empty(output.shape[:2])
        torch.mean(output, dim=(2, 3), out=buf)

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)


def add_scratch_hooks(model: torch.nn.Module) -> None:
    """For every conv, ReLU into one reused scratch, then the spatial mean into its block
    of a reused row buffer: the pooled values of a statistics pass, without the in-place
    ReLU."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    spans, start = {}, 0
    for m in convs:
        spans[m] = (start, start + m.out_channels)
        start += m.out_channels
    state = {"scratch": torch.empty(0), "rows": torch.empty(0, start)}

    def hook(module, inputs, output):
        if state["scratch"].numel() < output.numel():
            state["scratch"] = torch.empty(output.numel())
        if state["rows"].shape[0] < output.shape[0]:
            state["rows"] = torch.empty(output.shape[0], start)
        relu = torch.clamp_min(output, 0,
                               out=state["scratch"][:output.numel()].view(output.shape))
        lo, hi = spans[module]
        torch.mean(relu, dim=(2, 3), dtype=torch.float32,
                   out=state["rows"][:output.shape[0], lo:hi])

    for m in convs:
        m.register_forward_hook(hook)


def median_interval(ratios: list[float], draws: int = 2000) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median (seeded: reruns agree)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios)))
                     for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def measure(name: str, threads: int, batches: int | None = None) -> dict:
    model_name, size, batch, count = CASES[name]
    count = batches or count
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    plain, scratch, mean_only = (copy.deepcopy(model) for _ in range(3))
    add_scratch_hooks(scratch)
    add_mean_only_hooks(mean_only)
    distinct = [torch.randn(batch, 3, size, size) for _ in range(4)]
    clock = time.thread_time if threads == 1 else time.process_time
    times = {"plain": [], "scratch": [], "mean_only": [], "stats": []}
    copies = {"plain": plain, "scratch": scratch, "mean_only": mean_only}
    walls = {"plain": [], "stats": []}

    def run(which, x):
        cpu, wall = clock(), time.perf_counter()
        with torch.inference_mode():
            copies[which](x)
        times[which].append(clock() - cpu)
        if which in walls:
            walls[which].append(time.perf_counter() - wall)

    def loader():
        for i in range(count):
            x = distinct[i % len(distinct)]
            order = ("plain", "scratch", "mean_only")
            position = i % 4  # where the statistics batch sits among the four
            for which in order[:position]:
                run(which, x)
            cpu, wall = clock(), time.perf_counter()
            yield x, torch.zeros(batch, dtype=torch.long)
            times["stats"].append(clock() - cpu)
            walls["stats"].append(time.perf_counter() - wall)
            for which in order[position:]:
                run(which, x)

    for m in (model, plain, scratch, mean_only):  # warm up allocator and kernels
        with torch.inference_mode():
            m(distinct[0])
    start = clock()
    collect_stats(model, loader(), progress=False)
    call = clock() - start - sum(sum(times[k]) for k in copies)
    ratios = [s / p for s, p in zip(times["stats"], times["plain"])]
    quartiles = statistics.quantiles(ratios, n=4)
    low, high = median_interval(ratios)
    return {"case": name, "threads": threads, "images": batch * count,
            "plain_cpu_s": sum(times["plain"]), "stats_cpu_s": call,
            "ratio_cpu": statistics.median(ratios),
            "ratio_cpu_q1": quartiles[0], "ratio_cpu_q3": quartiles[2],
            "ratio_cpu_ci_low": low, "ratio_cpu_ci_high": high,
            "ratio_cpu_total": call / sum(times["plain"]),
            "ratio_wall": statistics.median(
                s / p for s, p in zip(walls["stats"], walls["plain"])),
            "ratio_cpu_scratch": statistics.median(
                m / p for m, p in zip(times["scratch"], times["plain"])),
            "ratio_cpu_mean_only": statistics.median(
                m / p for m, p in zip(times["mean_only"], times["plain"]))}


COLUMNS = ("case", "threads", "images", "plain_cpu_s", "stats_cpu_s", "ratio_cpu",
           "ratio_cpu_q1", "ratio_cpu_q3", "ratio_cpu_ci_low", "ratio_cpu_ci_high",
           "ratio_cpu_total", "ratio_wall",
           "ratio_cpu_scratch", "ratio_cpu_mean_only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batches", type=int, help="batches per case (default: the case's)")
    args = parser.parse_args()
    print(f"# machine: {platform.machine()} {platform.processor()}, torch {torch.__version__};"
          " interleaved per batch; CPU time (thread at 1 thread, process above)")
    print(",".join(COLUMNS), flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in args.cases:
            r = measure(name, threads, args.batches)
            print(",".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                           for c in COLUMNS), flush=True)


if __name__ == "__main__":
    main()
