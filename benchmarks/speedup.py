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

With ``--latency-target F`` it compares instead, per model and batch size: CDP's global
ranking at the MACs target, the latency-aware allocation at the same MACs target, a
latency target F (both with widths rounded to the multiple timed fastest), and
Torch-Pruning's L1 magnitude pruner at the same MACs; the bound on speed-up / MACs ratio
that channel pruning can reach at all (``efficiency_bound``: only the time above the
network with every group cut to 1/32, ``floor_ms``, shrinks with the MACs); the CIFAR
models' accuracy right
after pruning and after BatchNorm recalibration; the ONNX Runtime latency of the exported
models; and the machine's load average at each row.

    python benchmarks/speedup.py --latency-target 0.4 --cases resnet56-B resnet50 \\
        resnet56-A --csv benchmarks/results/latency_target.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from cdprune import collect_stats, load_weights, prune, tfidf_scores
from cdprune.measure.macs import count_macs
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
    iters = max(3, int(64 / batch) // 2) if size == 32 else (10 if batch == 1 else 2)
    latency(base, x, 2)
    latency(pruned, x, 2)
    tb, tp = [], []
    for _ in range(rounds):  # alternate so drifts in machine load hit both alike
        tb.append(latency(base, x, iters))
        tp.append(latency(pruned, x, iters))
    return statistics.median(tb), statistics.median(tp)


def compare_pairs(base, pruned, size, batch, rounds) -> tuple[float, float, float, float]:
    """Medians of base and pruned, the median of per-pair speed-ups, and its spread
    (max / min of the per-pair speed-ups): how noisy the machine was."""
    x = torch.randn(batch, 3, size, size)
    iters = max(2, 16 // batch) if size == 32 else (4 if batch == 1 else 1)
    latency(base, x, 2)
    latency(pruned, x, 2)
    tb, tp = [], []
    for _ in range(rounds):
        tb.append(latency(base, x, iters))
        tp.append(latency(pruned, x, iters))
    speedups = [b / p for b, p in zip(tb, tp)]
    return (statistics.median(tb), statistics.median(tp), statistics.median(speedups),
            max(speedups) / min(speedups))


METHODS = ("cdp-global@macs", "cdp-latency-alloc@macs", "cdp@latency-target", "tp-l1@macs")


def floor_network(model: torch.nn.Module, scores, size: int) -> torch.nn.Module:
    """The model with every prunable group cut to 1/32 of its channels: what remains is
    the time channel pruning cannot remove (per-operator overhead, the residual stream
    where it is not pruned, the stem's input)."""
    return prune(model, scores, example_inputs=torch.randn(1, 3, size, size),
                 sparsity=0.96, max_layer_pruning=31 / 32).model.eval()


def efficiency_bound(base_s: float, floor_s: float, macs_ratio: float) -> float:
    """The best speed-up / MACs ratio channel pruning can reach when only the time above
    the floor shrinks with the MACs: base / (floor + (base - floor) / ratio) / ratio."""
    return base_s / (floor_s + (base_s - floor_s) / macs_ratio) / macs_ratio


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def tp_l1(model: torch.nn.Module, size: int, target: float) -> torch.nn.Module:
    """Torch-Pruning's L1 magnitude pruner (same ratio per layer, classifier kept) at the
    MACs reduction ``target``, by bisection on its pruning ratio."""
    import copy

    import torch_pruning as tp

    from cdprune.pruning import custom_pruners

    x = torch.randn(1, 3, size, size)
    base = count_macs(model, (3, size, size))
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        ratio = (lo + hi) / 2
        work = copy.deepcopy(model)
        heads = [m for m in work.modules() if isinstance(m, torch.nn.Linear)]
        pruner = tp.pruner.MetaPruner(work, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=heads,
                                      customized_pruners=custom_pruners())
        pruner.step()
        reduction = 1 - count_macs(work, (3, size, size)) / base
        if best is None or abs(reduction - target) < abs(best[0] - target):
            best = (reduction, work)
        if abs(reduction - target) <= 0.003:
            break
        lo, hi = (ratio, hi) if reduction < target else (lo, ratio)
    return best[1].eval()


def accuracy(model, data_root, option, images, recal_images):
    """Top-1 on the first ``images`` test images, right after pruning and after
    re-estimating BatchNorm statistics on ``recal_images`` training images."""
    import copy

    from cdprune import evaluate, recalibrate_bn
    from cdprune.data import build_dataset, build_loader, subset

    mean, std = NORMALISATION[option]
    test = build_dataset("cifar10", data_root, train=False, augment=False, mean=mean, std=std)
    loader = build_loader(subset(test, images, seed=0), 200, shuffle=False, seed=0)
    before = evaluate(model, loader, progress=False).top1
    recal = copy.deepcopy(model)
    recalibrate_bn(recal, cifar_stats_loader(data_root, option, recal_images), recal_images)
    return before, evaluate(recal, loader, progress=False).top1


def onnx_ms(base, pruned, size, batch, threads) -> tuple[float, float]:
    import tempfile

    from cdprune.export import compare_latency, export

    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, m in (("base", base), ("pruned", pruned)):
            paths[name] = f"{tmp}/{name}.onnx"
            export(m, paths[name], input_size=(3, size, size))
        t = compare_latency(paths, "onnx", (3, size, size), batch_size=batch, warmup=2,
                            repeats=max(5, 40 // batch), threads=threads)
    return 1e3 * t["base"], 1e3 * t["pruned"]


def latency_main(args) -> None:
    from cdprune import LatencySettings

    torch.set_num_threads(args.threads)
    header = ["case", "method", "batch", "round_to", "macs_ratio", "base_ms", "pruned_ms",
              "speedup", "efficiency", "efficiency_bound", "floor_ms", "speedup_spread",
              "latency_target", "latency_reduction_bench",
              "latency_reduction_prune", "latency_reduction_search", "prune_says_hit",
              "target_hit", "acc_base", "acc_pruned", "acc_recal",
              "onnx_base_ms", "onnx_pruned_ms", "onnx_speedup", "load_avg"]
    print(",".join(header), flush=True)
    out = open(args.csv, "w", newline="") if args.csv else None
    writer = csv.writer(out) if out else None
    if writer:
        writer.writerow(header)
    for case in args.cases:
        size = 224 if case == "resnet50" else 32
        option = case[-1] if case.startswith("resnet56") else None
        if option:
            model = create_model("resnet56" if option == "A" else "resnet56b")
            load_weights(model, Path(args.weights_dir) / CHECKPOINTS[option])
            model.eval()
            scores = tfidf_scores(collect_stats(model, cifar_stats_loader(
                args.data_root, option, args.stats_images), progress=False))
            batches = (1, 64)
        else:
            model = create_model("resnet50").eval()
            images = [torch.randn(8, 3, 224, 224) for _ in range(4)]
            scores = tfidf_scores(collect_stats(model, images, progress=False))
            batches = tuple(args.resnet50_batches)
        example = torch.randn(2, 3, size, size)
        acc_base = None
        if option and args.eval_images:
            from cdprune import evaluate
            from cdprune.data import build_dataset, build_loader, subset
            mean, std = NORMALISATION[option]
            test = build_dataset("cifar10", args.data_root, train=False, augment=False,
                                 mean=mean, std=std)
            acc_base = evaluate(model, build_loader(subset(test, args.eval_images, seed=0), 200,
                                                    shuffle=False, seed=0), progress=False).top1
        shared = {}  # models that do not depend on the batch size
        for batch in batches:
            settings = LatencySettings(batch_size=batch, threads=args.threads,
                                       cache_dir=args.cache_dir, warmup=1, repeats=3)
            runs = []
            if "macs" not in shared:
                shared["macs"] = prune(model, scores, example_inputs=example,
                                       macs_reduction=args.macs_reduction)
                shared["tp"] = (tp_l1(model, size, args.macs_reduction)
                                if "tp-l1@macs" in args.methods else None)
            runs.append(("cdp-global@macs", shared["macs"].model, shared["macs"], None))
            if "cdp-latency-alloc@macs" in args.methods:
                r = prune(model, scores, example_inputs=example,
                          macs_reduction=args.macs_reduction, allocation="latency",
                          latency=settings)
                runs.append(("cdp-latency-alloc@macs", r.model, r, None))
            if "cdp@latency-target" in args.methods:
                r = prune(model, scores, example_inputs=example,
                          latency_reduction=args.latency_target, latency=settings)
                runs.append(("cdp@latency-target", r.model, r, args.latency_target))
            runs.append(("tp-l1@macs", shared["tp"], None, None))
            runs = [r for r in runs if r[0] in args.methods]
            base_macs = count_macs(model, (3, size, size))
            if "floor" not in shared:
                shared["floor"] = floor_network(model, scores, size)
            floor_base, floor_s, _, _ = compare_pairs(model, shared["floor"], size, batch,
                                                      args.rounds)
            for method, pruned, result, target in runs:
                pruned.eval()
                ratio = base_macs / count_macs(pruned, (3, size, size))
                tb, tp_, speedup, spread = compare_pairs(model, pruned, size, batch,
                                                         args.rounds)
                measured = 1 - 1 / speedup
                info = (result.extra.get("latency") if result is not None else None) or {}
                acc = (accuracy(pruned, args.data_root, option, args.eval_images,
                                args.recal_images) if option and args.eval_images
                       else (None, None))
                onnx = onnx_ms(model, pruned, size, batch, args.threads) if args.onnx else None
                row = [case, method, batch,
                       (result.plan.get("round_to") if result is not None else None) or "-",
                       f"{ratio:.3f}", f"{1e3 * tb:.2f}", f"{1e3 * tp_:.2f}", f"{speedup:.3f}",
                       f"{speedup / ratio:.3f}",
                       f"{efficiency_bound(floor_base, floor_s, ratio):.3f}",
                       f"{1e3 * floor_s:.2f}", f"{spread:.2f}", target if target else "-",
                       f"{measured:.3f}",
                       f"{info['measured']:.3f}" if info else "-",
                       f"{info['search_measured']:.3f}" if "search_measured" in info else "-",
                       info.get("hit", "-"),
                       (abs(measured - target) <= 0.05 * target) if target else "-",
                       f"{acc_base:.2f}" if acc_base is not None else "-",
                       f"{acc[0]:.2f}" if acc[0] is not None else "-",
                       f"{acc[1]:.2f}" if acc[1] is not None else "-",
                       f"{onnx[0]:.2f}" if onnx else "-", f"{onnx[1]:.2f}" if onnx else "-",
                       f"{onnx[0] / onnx[1]:.3f}" if onnx else "-", load_average()]
                print(",".join(str(v) for v in row), flush=True)
                if writer:
                    writer.writerow(row)
                    out.flush()
    if out:
        out.close()


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
    parser.add_argument("--latency-target", type=float,
                        help="compare MACs and latency targets (see the module docstring)")
    parser.add_argument("--cases", nargs="+", default=["resnet56-B", "resnet50", "resnet56-A"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--resnet50-batches", type=int, nargs="+", default=[1])
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--recal-images", type=int, default=512)
    parser.add_argument("--no-onnx", dest="onnx", action="store_false")
    parser.add_argument("--cache-dir", default=None, help="latency table cache (default none)")
    args = parser.parse_args()
    if args.latency_target:
        return latency_main(args)
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
