"""Wall time of prune() with a MACs target, next to the time of one inference pass.

    python benchmarks/prune_time.py --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from cdprune import prune
from cdprune.models import create_model

CASES = {"resnet50": 224, "resnet56": 32, "resnet56b": 32, "mobilenet_v2": 224}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--macs-reduction", type=float, default=0.5)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.machine()} {platform.processor()}, {args.threads} threads, "
          f"torch {torch.__version__}")
    print("case,macs_reduction_target,macs_reduction,prune_s,forward_s")
    for name in args.cases:
        size = CASES[name]
        torch.manual_seed(0)
        model = create_model(name).eval()
        g = torch.Generator().manual_seed(0)
        scores = {n: torch.rand(m.out_channels, generator=g) for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Conv2d)}
        x = torch.randn(1, 3, size, size)
        times, result = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = prune(model, scores, example_inputs=x, macs_reduction=args.macs_reduction)
            times.append(time.perf_counter() - start)
        with torch.inference_mode():
            start = time.perf_counter()
            model(x)
            fwd = time.perf_counter() - start
        print(f"{name},{args.macs_reduction},{result.macs_reduction:.4f},"
              f"{statistics.median(times):.3f},{fwd:.3f}")


if __name__ == "__main__":
    main()
