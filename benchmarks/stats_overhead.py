"""Overhead of a CDP statistics pass relative to plain inference over the same batches.

Both passes run in this process, interleaved and repeated, on the same pre-made batches;
the ratio of the medians is printed (target: at most 1.05). Random inputs are enough: the
cost does not depend on the pixel values.

    python benchmarks/stats_overhead.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from cdprune.models import create_model
from cdprune.stats import collect_stats

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


def measure(name: str, repeats: int) -> dict:
    model_name, size, batch, count = CASES[name]
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    batches = [torch.randn(batch, 3, size, size) for _ in range(count)]
    plain_pass(model, batches[:1])  # warm up allocator and kernels
    stats_pass(model, batches[:1])
    plain, stats = [], []
    for _ in range(repeats):
        for fn, out in ((plain_pass, plain), (stats_pass, stats)):
            start = time.perf_counter()
            fn(model, batches)
            out.append(time.perf_counter() - start)
    p, s = statistics.median(plain), statistics.median(stats)
    return {"case": name, "images": batch * count, "plain_s": p, "stats_s": s, "ratio": s / p}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# machine: {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}")
    print("case,images,plain_s,stats_s,ratio")
    for name in args.cases:
        r = measure(name, args.repeats)
        print(f"{r['case']},{r['images']},{r['plain_s']:.3f},{r['stats_s']:.3f},"
              f"{r['ratio']:.3f}")


if __name__ == "__main__":
    main()
