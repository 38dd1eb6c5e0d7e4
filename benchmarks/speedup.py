"""Real CPU speed-up of physically pruned models next to their MACs ratio, in one run.

For each case the base model is pruned to a MACs target with CDP scores, then base and
pruned models are timed alternately (same process, same threads, same inputs) at batch
sizes 1 and 64. ``efficiency`` = measured speed-up / MACs ratio: 1.0 means the pruned
model is exactly as much faster as its MACs promise.

CIFAR ResNet-56 uses the pretrained checkpoints and CDP statistics from real CIFAR-10
training images; ResNet-50 (no ImageNet here) uses random weights and statistics from
random images: speed depends on the widths, not on the weights.

    python benchmarks/speedup.py --weights-dir ../shared/weights/cifar10 \\
        --data-root ../shared/data --threads 2
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from cdprune import collect_stats, load_weights, prune, tfidf_scores
from cdprune.macs import count_macs
from cdprune.models import create_model

NORMALISATION = {  # the checkpoints' own input normalisation (../shared/weights/README.md)
    "A": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "B": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}
CHECKPOINTS = {"A": "resnet56-optionA-akamaster.th", "B": "resnet56-optionB-chenyaofo.pth"}


def cifar_stats_loader(data_root: str, option: str, images: int):
    from cdprune.data import build_dataset, build_loader, subset

    mean, std = NORMALISATION[option]
    ds = build_dataset("cifar10", data_root, train=True, augment=False, mean=mean, std=std)
    return build_loader(subset(ds, images, seed=0), 128, shuffle=False, seed=0)


def latency(model: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        return (time.perf_counter() - start) / iters


def compare(base: torch.nn.Module, pruned: torch.nn.Module, size: int, batch: int,
            rounds: int) -> tuple[float, float]:
    x = torch.randn(batch, 3, size, size)
    iters = max(3, int(64 / batch) * 4) if size == 32 else (10 if batch == 1 else 2)
    latency(base, x, 2)
    latency(pruned, x, 2)
    tb, tp = [], []
    for _ in range(rounds):  # alternate so drifts in machine load hit both alike
        tb.append(latency(base, x, iters))
        tp.append(latency(pruned, x, iters))
    return statistics.median(tb), statistics.median(tp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-dir", default="../shared/weights/cifar10")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stats-images", type=int, default=1280)
    parser.add_argument("--macs-reduction", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, nargs="+", default=[0, 4, 8],
                        help="width rounding to compare (0: none)")
    parser.add_argument("--skip-resnet50", action="store_true")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cases = []
    for option in ("A", "B"):
        model = create_model("resnet56" if option == "A" else "resnet56b")
        load_weights(model, Path(args.weights_dir) / CHECKPOINTS[option])
        loader = cifar_stats_loader(args.data_root, option, args.stats_images)
        cases.append((f"resnet56-{option}", model.eval(), 32,
                      tfidf_scores(collect_stats(model, loader, progress=False))))
    if not args.skip_resnet50:
        model = create_model("resnet50").eval()
        images = [torch.randn(8, 3, 224, 224) for _ in range(4)]
        cases.append(("resnet50-random", model, 224,
                      tfidf_scores(collect_stats(model, images, progress=False))))

    print(f"# {platform.machine()} {platform.processor()}, {args.threads} threads, "
          f"torch {torch.__version__}, {sys.platform}")
    header = ["case", "scope", "round_to", "macs_base_M", "macs_pruned_M", "macs_ratio",
              "batch", "base_ms", "pruned_ms", "speedup", "efficiency"]
    rows = []
    print(",".join(header))
    for name, model, size, scores in cases:
        for round_to in args.round_to:
            result = prune(model, scores, example_inputs=torch.randn(1, 3, size, size),
                           macs_reduction=args.macs_reduction, round_to=round_to or None)
            pruned = result.model.eval()
            ratio = result.macs_before / result.macs_after
            assert result.macs_after == count_macs(pruned, (3, size, size))
            for batch in (1, 64):
                tb, tp = compare(model, pruned, size, batch if size == 32 else min(batch, 16),
                                 args.rounds)
                row = [name, result.plan["scope"], round_to, f"{result.macs_before / 1e6:.2f}",
                       f"{result.macs_after / 1e6:.2f}", f"{ratio:.3f}",
                       batch if size == 32 else min(batch, 16), f"{1e3 * tb:.2f}",
                       f"{1e3 * tp:.2f}", f"{tb / tp:.3f}", f"{tb / tp / ratio:.3f}"]
                rows.append(row)
                print(",".join(str(v) for v in row), flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)


if __name__ == "__main__":
    main()
