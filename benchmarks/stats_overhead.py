"""Overhead of a CDP statistics pass relative to plain inference over the same batches.

The passes run in this process on the same pre-made batches, interleaved (each pass
first in turn) and repeated, at each thread count in one run. Rounds are short (two
batches per pass) and many, so a slow minute of a shared machine lands on every pass of a
round alike. Time is CPU time: the main thread's at 1 thread (the others' load on a
shared machine does not count), the process's at more; wall-clock ratios are printed
beside. The ratio is the median of the per-round ratios, with their quartiles (target: at
most 1.05). The statistics pass is ``collect_stats`` as ``cdprune`` runs it (image
documents, streamed), scoring excluded; its first batch is the one the collector watches
to find the conv outputs whose ReLU it may take in place. A third pass pools only the raw
conv outputs' spatial means (``ratio_cpu_mean_only``): what a fused ReLU+mean, reading
each output once and writing nothing, would cost at best. Random inputs are enough: the
cost does not depend on the pixel values.

    python benchmarks/stats_overhead.py --threads 1 2 --repeats 21
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from cdprune.importance.stats import collect_stats
from cdprune.models import create_model

CASES = {  # name: (model, input size, batch size, batches)
    "resnet56-cifar": ("resnet56", 32, 128, 2),
    "resnet50-224": ("resnet50", 224, 16, 2),
}


def plain_pass(model, batches):
    with torch.inference_mode():
        for x in batches:
            model(x)


def stats_pass(model, batches):
    collect_stats(model, batches, progress=False)


def mean_only_pass(model, batches):
    """Plain inference plus, for every conv, the spatial mean of its raw output into a
    reused buffer: the least any pass pooling every conv output can cost (a fused
    ReLU+mean reads the output once, as this does). Not CDP's values: no ReLU."""
    buffers = {}

    def hook(module, inputs, output):
        buf = buffers.get(module)
        if buf is None or buf.shape != output.shape[:2]:
            buf = buffers[module] = torch.empty(output.shape[:2])
        torch.mean(output, dim=(2, 3), out=buf)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d)]
    try:
        plain_pass(model, batches)
    finally:
        for h in handles:
            h.remove()


def timed(fn, model, batches, threads: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one pass."""
    clock = time.thread_time if threads == 1 else time.process_time
    cpu, wall = clock(), time.perf_counter()
    fn(model, batches)
    return clock() - cpu, time.perf_counter() - wall


def measure(name: str, threads: int, repeats: int, batches: int | None = None) -> dict:
    model_name, size, batch, count = CASES[name]
    count = batches or count
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    batches = [torch.randn(batch, 3, size, size) for _ in range(count)]
    passes = (plain_pass, stats_pass, mean_only_pass)
    for fn in passes:  # warm up allocator and kernels
        fn(model, batches[:1])
    cpu = {fn: [] for fn in passes}
    ratios = {fn: [] for fn in passes[1:]}
    wall_ratios = []
    for r in range(repeats):
        order = passes[r % 3:] + passes[:r % 3]  # each pass first in turn
        out = {fn: timed(fn, model, batches, threads) for fn in order}
        for fn in passes:
            cpu[fn].append(out[fn][0])
        for fn in passes[1:]:
            ratios[fn].append(out[fn][0] / out[plain_pass][0])
        wall_ratios.append(out[stats_pass][1] / out[plain_pass][1])
    quartiles = statistics.quantiles(ratios[stats_pass], n=4)
    return {"case": name, "threads": threads, "images": batch * count,
            "plain_cpu_s": statistics.median(cpu[plain_pass]),
            "stats_cpu_s": statistics.median(cpu[stats_pass]),
            "ratio_cpu": statistics.median(ratios[stats_pass]),
            "ratio_cpu_q1": quartiles[0], "ratio_cpu_q3": quartiles[2],
            "ratio_wall": statistics.median(wall_ratios),
            "ratio_cpu_mean_only": statistics.median(ratios[mean_only_pass])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batches", type=int, help="batches per pass (default: the case's)")
    args = parser.parse_args()
    print(f"# machine: {platform.machine()} {platform.processor()}, torch {torch.__version__};"
          f" {args.repeats} interleaved rounds; CPU time (thread at 1 thread, process above)")
    print("case,threads,images,plain_cpu_s,stats_cpu_s,ratio_cpu,ratio_cpu_q1,"
          "ratio_cpu_q3,ratio_wall,ratio_cpu_mean_only", flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in args.cases:
            r = measure(name, threads, args.repeats, args.batches)
            print(f"{r['case']},{r['threads']},{r['images']},{r['plain_cpu_s']:.3f},"
                  f"{r['stats_cpu_s']:.3f},{r['ratio_cpu']:.3f},{r['ratio_cpu_q1']:.3f},"
                  f"{r['ratio_cpu_q3']:.3f},{r['ratio_wall']:.3f},"
                  f"{r['ratio_cpu_mean_only']:.3f}", flush=True)


if __name__ == "__main__":
    main()
