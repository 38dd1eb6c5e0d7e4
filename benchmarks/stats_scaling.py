"""How statistics collection and scoring scale: time and peak memory as work doubles.

Statistics: ResNet-20 (CIFAR) on random 32x32 images, the number of sampled images
doubling; each size runs in a fresh subprocess so its peak resident memory (ru_maxrss) is
its own, and the statistics kept (streamed: per-channel counts, whatever the images) are
printed beside it. Scoring: tfidf on a random [channels, 1024] matrix, the channels doubling.
Printed ratios between consecutive rows should stay near 2 (linear growth).

    python benchmarks/stats_scaling.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

CHILD = """
import json, resource, sys, time, torch
from cdprune.models import create_model
from cdprune.importance.stats import collect_stats
torch.set_num_threads(int(sys.argv[2]))
n, batch = int(sys.argv[1]), 128
model = create_model("resnet20").eval()
class Batches:  # re-readable, made batch by batch: the images cost no memory
    def __iter__(self):
        return (torch.randn(batch, 3, 32, 32) for _ in range(n // batch))
batches = Batches()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
stats = collect_stats(model, batches, progress=False)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
held = sum(t.nbytes for pair in (stats.reduced or {}).values() for t in pair)
print(json.dumps({"images": n, "seconds": seconds, "peak_mb": peak / 1024,
                  "feature_mb": held / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--channels", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.machine()} {platform.processor()}, {args.threads} threads, "
          f"torch {torch.__version__}")
    print("stage,size,seconds,time_ratio,peak_rss_mb,statistics_mb")
    prev = None
    for n in args.sizes:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(args.threads)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = row["seconds"] / prev if prev else float("nan")
        prev = row["seconds"]
        print(f"statistics,{n} images,{row['seconds']:.2f},{ratio:.2f},{row['peak_mb']:.0f},"
              f"{row['feature_mb']:.3f}")
    from cdprune.importance.scoring import tfidf

    prev = None
    for c in args.channels:
        f = torch.rand(c, 1024)
        tfidf(f)
        start = time.perf_counter()
        for _ in range(3):
            tfidf(f)
        seconds = (time.perf_counter() - start) / 3
        ratio = seconds / prev if prev else float("nan")
        prev = seconds
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"scoring,{c} channels,{seconds:.4f},{ratio:.2f},{peak:.0f},"
              f"{f.nbytes / 2**20:.1f}")


if __name__ == "__main__":
    main()
