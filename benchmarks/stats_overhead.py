"""Overhead of a CDP statistics pass relative to plain inference over the same batches.

Both passes run in this process on the same pre-made batches, interleaved (their order
alternating every round) and repeated, at each thread count in one run. Time is CPU time:
the main thread's at 1 thread (the others' load on a shared machine does not count), the
process's at more; wall-clock ratios are printed beside. The ratio is the median of the
per-round ratios (target: at most 1.05). The statistics pass is ``collect_stats`` as
``cdprune`` runs it (image documents, streamed), scoring excluded. Random inputs are
enough: the cost does not depend on the pixel values.

    python benchmarks/stats_overhead.py --threads 1 2 --repeats 7
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
    "resnet56-cifar": ("resnet56", 32, 128, 8),
    "resnet50-224": ("resnet50", 224, 16, 4),
}


def plain_pass(model, batches):
    with torch.inference_mode():
        for x in batches:
            model(x)


def stats_pass(model, batches):
    collect_stats(model, batches, progress=False)


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
    plain_pass(model, batches[:1])  # warm up allocator and kernels
    stats_pass(model, batches[:1])
    cpu_ratios, wall_ratios, plain_cpu, stats_cpu = [], [], [], []
    for r in range(repeats):
        order = (plain_pass, stats_pass) if r % 2 == 0 else (stats_pass, plain_pass)
        out = {fn: timed(fn, model, batches, threads) for fn in order}
        plain_cpu.append(out[plain_pass][0])
        stats_cpu.append(out[stats_pass][0])
        cpu_ratios.append(out[stats_pass][0] / out[plain_pass][0])
        wall_ratios.append(out[stats_pass][1] / out[plain_pass][1])
    return {"case": name, "threads": threads, "images": batch * count,
            "plain_cpu_s": statistics.median(plain_cpu),
            "stats_cpu_s": statistics.median(stats_cpu),
            "ratio_cpu": statistics.median(cpu_ratios),
            "ratio_cpu_min": min(cpu_ratios), "ratio_cpu_max": max(cpu_ratios),
            "ratio_wall": statistics.median(wall_ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batches", type=int, help="batches per pass (default: the case's)")
    args = parser.parse_args()
    print(f"# machine: {platform.machine()} {platform.processor()}, torch {torch.__version__};"
          f" {args.repeats} interleaved rounds; CPU time (thread at 1 thread, process above)")
    print("case,threads,images,plain_cpu_s,stats_cpu_s,ratio_cpu,ratio_cpu_min,"
          "ratio_cpu_max,ratio_wall", flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in args.cases:
            r = measure(name, threads, args.repeats, args.batches)
            print(f"{r['case']},{r['threads']},{r['images']},{r['plain_cpu_s']:.3f},"
                  f"{r['stats_cpu_s']:.3f},{r['ratio_cpu']:.3f},{r['ratio_cpu_min']:.3f},"
                  f"{r['ratio_cpu_max']:.3f},{r['ratio_wall']:.3f}", flush=True)


if __name__ == "__main__":
    main()
