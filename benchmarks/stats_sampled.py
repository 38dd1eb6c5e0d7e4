"""Does the sampled statistics default remove the same filters as the whole training set?

For each pretrained CIFAR-10 ResNet, the pooled activations of all 50,000 training images
are collected once (in dataset order). Scores from all of them, and from seeded samples of
them drawn exactly as ``cdprune run`` draws its default sample (``subset(train, n, seed)``),
each prune the model to the same MACs reductions; the table gives the share of the
filters removed with all 50,000 images that the sample removes too (``overlap``), and the
MACs each reached. Rows go to ``rows.jsonl`` as each model finishes (a model already
there is skipped), and ``stats_sampled.md``/``.csv`` are rewritten from them.

    python benchmarks/stats_sampled.py --data-root ../shared/data \\
        --weights ../shared/weights/cifar10 --out benchmarks/results/stats_sampled
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from cdprune import collect_stats, load_weights, prune, tfidf_scores
from cdprune.data import build_dataset, build_loader, subset
from cdprune.importance.activations import ActivationStats
from cdprune.models import create_model
from cdprune.models.known import known_checkpoint

MODELS = {  # label: (model, checkpoint file)
    "ResNet-20 A": ("resnet20", "resnet20-optionA-akamaster.th"),
    "ResNet-56 A": ("resnet56", "resnet56-optionA-akamaster.th"),
    "ResNet-56 B": ("resnet56b", "resnet56-optionB-chenyaofo.pth"),
}


def removed(result: Any) -> set[tuple[str, int]]:
    """The (layer, filter) pairs a pruning removed."""
    return {(name, i) for name, kept in result.plan["kept"].items()
            if name in result.widths_before
            for i in set(range(result.widths_before[name])) - set(kept)}


def sample_stats(full: ActivationStats, indices: list[int]) -> ActivationStats:
    """The statistics the same images would give when collected on their own."""
    return ActivationStats(documents="sample", layers=full.layers, channels=full.channels,
                           num_samples=len(indices), features=full.features[indices],
                           fingerprint=full.fingerprint, meta=dict(full.meta))


def run_model(label: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    name, file = MODELS[label]
    checkpoint = args.weights / file
    known = known_checkpoint(str(checkpoint))
    model = create_model(name, num_classes=10)
    load_weights(model, checkpoint)
    model.eval()
    train = build_dataset("cifar10", args.data_root, train=True, augment=False,
                          mean=known.mean, std=known.std)
    started = time.perf_counter()
    full = collect_stats(model, build_loader(train, 128, shuffle=False), progress=False,
                         keep_features=True)
    seconds = time.perf_counter() - started
    print(f"{label}: statistics of {full.num_samples} images in {seconds:.0f} s", flush=True)
    example = torch.randn(2, 3, 32, 32)

    def prune_at(scores: dict[str, torch.Tensor], reduction: float) -> Any:
        return prune(model, scores, example_inputs=example, macs_reduction=reduction)

    reference = {r: prune_at(tfidf_scores(full), r) for r in args.macs_reductions}
    rows = []
    for images in args.images:
        for seed in args.seeds:
            indices = list(subset(train, images, seed).indices)
            scores = tfidf_scores(sample_stats(full, indices))
            for reduction, ref in reference.items():
                result = prune_at(scores, reduction)
                ref_set, own = removed(ref), removed(result)
                rows.append({"model": label, "images": images, "seed": seed,
                             "macs_reduction": reduction, "removed_full": len(ref_set),
                             "removed": len(own), "common": len(own & ref_set),
                             "overlap": len(own & ref_set) / max(1, len(ref_set)),
                             "macs_full": ref.macs_after, "macs": result.macs_after,
                             "stats_seconds_full": round(seconds, 1)})
            print(f"{label}: {images} images seed {seed}: overlap "
                  + ", ".join(f"{r['macs_reduction']:.0%} {r['overlap']:.3f}"
                              for r in rows[-len(reference):]), flush=True)
    return rows


def summary(rows: list[dict[str, Any]], out: Path, machine: str, command: str) -> None:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["macs_reduction"], r["images"]), []).append(r)
    csv = ["model,macs_reduction,images,seeds,overlap_mean,overlap_min,removed_full,"
           "macs_full_M,macs_sample_M"]
    md = ["# Sampled statistics against all 50,000 training images", "", machine, "",
          "Share of the filters that scores from all 50,000 CIFAR-10 training images remove "
          "which scores from a seeded sample remove too, at the same MACs reduction "
          "(global CDP ranking, published arithmetic). Mean and minimum over seeds.", "",
          "```bash", command, "```", "",
          "| model | MACs reduction | images | seeds | overlap mean | overlap min | "
          "filters removed (all images) | MACs all images | MACs sample |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (label, reduction, images), members in sorted(groups.items()):
        overlaps = [m["overlap"] for m in members]
        macs = statistics.mean(m["macs"] for m in members) / 1e6
        macs_full = members[0]["macs_full"] / 1e6
        csv.append(f"{label},{reduction},{images},{len(members)},{statistics.mean(overlaps):.4f},"
                   f"{min(overlaps):.4f},{members[0]['removed_full']},{macs_full:.2f},{macs:.2f}")
        md.append(f"| {label} | {reduction:.0%} | {images:,} | {len(members)} | "
                  f"{statistics.mean(overlaps):.3f} | {min(overlaps):.3f} | "
                  f"{members[0]['removed_full']} | {macs_full:.2f}M | {macs:.2f}M |")
    (out / "stats_sampled.csv").write_text("\n".join(csv) + "\n")
    (out / "stats_sampled.md").write_text("\n".join(md) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--weights", type=Path, default=Path("../shared/weights/cifar10"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stats_sampled"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--images", type=int, nargs="+", default=[1280, 5120, 10240, 20480])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--macs-reductions", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summary", action="store_true", help="only rewrite the tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rows.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] \
        if rows_path.exists() else []
    machine = (f"Machine: {platform.machine()} {platform.processor()}, {args.threads} "
               f"thread(s), torch {torch.__version__}")
    command = ("python benchmarks/stats_sampled.py --data-root ../shared/data "
               "--weights ../shared/weights/cifar10 --out benchmarks/results/stats_sampled")
    if not args.summary:
        for label in args.models:
            if any(r["model"] == label for r in rows):
                continue
            new = run_model(label, args)
            with open(rows_path, "a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in new)
            rows += new
            summary(rows, args.out, machine, command)
    summary(rows, args.out, machine, command)


if __name__ == "__main__":
    main()
