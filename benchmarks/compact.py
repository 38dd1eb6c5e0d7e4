"""The published network (masked) beside its compaction, on the public CIFAR-10 ResNets.

For each row: CDP statistics of the pretrained checkpoint on training images, the
published scores (tap at the conv output, every image a document), one global ranking
of *all* conv filters (stem, block-first, residual-output) and the published rule:
the ``int(N * s) + 1`` lowest are masked. ``s`` is the paper's sparsity where the row
gives one, else the number of masked filters is searched so that the paper's MACs
counter lands on the row's target. The masked network (conv filters zeroed, BatchNorm
kept) is then compacted with :func:`cdprune.compact`, and both are measured: MACs (the
paper's convention on the masks; physical MACs of each network), parameters, the largest
output difference on test images, top-1 on the 10,000 test images of the masked network,
of the compact network right after compaction and after BatchNorm recalibration on
training images, and CPU latency at batch 1 and 64. No fine-tuning anywhere: these are
the pretrained weights with filters masked.

    python benchmarks/compact.py --weights-dir ../shared/weights/cifar10 \\
        --data-root ../shared/data --out benchmarks/results/compact
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import pickle
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from check_pretrained import AKAMASTER, accuracy, cpu_name, read_test_batch

from cdprune import (
    collect_stats,
    compact,
    load_weights,
    mask_filters,
    recalibrate_bn,
    tfidf_scores,
)
from cdprune.evaluate import measure_latency
from cdprune.fileio import atomic_write_text
from cdprune.macs import paper_macs
from cdprune.models import create_model

# label, checkpoint, zoo model, paper sparsity or None, paper MACs target (M)
ROWS = [
    ("ResNet-56 A, s=0.4", "resnet56-optionA-akamaster.th", "resnet56", 0.4, 60.02),
    ("ResNet-56 A, 49.84M", "resnet56-optionA-akamaster.th", "resnet56", None, 49.84),
    ("ResNet-20 A, 20.76M", "resnet20-optionA-akamaster.th", "resnet20", None, 20.76),
]


def read_train(data_root: Path, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` training images (uint8), drawn without replacement with ``seed``."""
    folder = data_root / "cifar-10-batches-py"
    images, labels = [], []
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")  # the official dataset file, trusted
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels += batch[b"labels"]
    pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:count]
    return torch.from_numpy(np.concatenate(images))[pick], torch.tensor(labels)[pick]


def batches(images: torch.Tensor, labels: torch.Tensor, size: int = 128):
    mean = torch.tensor(AKAMASTER[0]).view(1, 3, 1, 1)
    std = torch.tensor(AKAMASTER[1]).view(1, 3, 1, 1)
    return [((images[i:i + size].float() / 255 - mean) / std, labels[i:i + size])
            for i in range(0, len(labels), size)]


def published_masks(model: torch.nn.Module, scores: dict[str, torch.Tensor], count: int
                    ) -> dict[str, list[int]]:
    """The ``count`` lowest-scoring filters over all convolutions, per layer."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    flat = torch.cat([scores[n] for n in names])
    owner = [(n, i) for n in names for i in range(len(scores[n]))]
    masks: dict[str, list[int]] = {n: [] for n in names}
    for k in torch.argsort(flat, stable=True)[:count].tolist():
        masks[owner[k][0]].append(owner[k][1])
    return {n: sorted(v) for n, v in masks.items() if v}


def paper_count(model, masks, example) -> int:
    kept = {n: [i for i in range(m.out_channels) if i not in set(masks.get(n, ()))]
            for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    return paper_macs(model, kept, example_inputs=example)


def count_for_target(model, scores, target: float, example) -> int:
    """Masked filters whose paper MACs come closest to ``target`` (bisection)."""
    total = sum(len(s) for s in scores.values())
    low, high = 1, total - 1
    while high - low > 1:
        mid = (low + high) // 2
        if paper_count(model, published_masks(model, scores, mid), example) > target:
            low = mid
        else:
            high = mid
    return min((low, high), key=lambda k: abs(
        paper_count(model, published_masks(model, scores, k), example) - target))


def latency(model: torch.nn.Module, batch: int, threads: int) -> float:
    return measure_latency(model.eval(), (3, 32, 32), batch_size=batch, warmup=3,
                           iters=20 if batch == 1 else 8, threads=threads) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-dir", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--stats-images", type=int, default=1280)
    parser.add_argument("--recal-images", type=int, default=1280)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="*", help="row indices (default: all)")
    parser.add_argument("--out", type=Path, required=True, help="folder for CSV + Markdown")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    test_x, test_y = read_test_batch(args.data_root)
    stats_x, stats_y = read_train(args.data_root, args.stats_images, seed=0)
    recal_x, recal_y = read_train(args.data_root, args.recal_images, seed=1)
    probe = batches(test_x[:256], test_y[:256], 256)[0][0]
    example = torch.zeros(1, 3, 32, 32)
    records = []
    for index, (label, file, name, sparsity, target) in enumerate(ROWS):
        if args.rows and index not in args.rows:
            continue
        start = time.perf_counter()
        model = load_weights(create_model(name), args.weights_dir / file).eval()
        stats = collect_stats(model, batches(stats_x, stats_y), variant="published",
                              progress=False)
        scores = tfidf_scores(stats, variant="published")
        total = sum(len(s) for s in scores.values())
        count = int(total * sparsity) + 1 if sparsity else count_for_target(
            model, scores, target * 1e6, example)
        masks = published_masks(model, scores, count)
        masked = mask_filters(copy.deepcopy(model), masks).eval()
        small, info = compact(masked, masks, example_inputs=probe)
        roles = {"stem": 0, "block-first": 0, "residual-output": 0}
        for conv, idxs in masks.items():
            roles["stem" if conv == "conv1" else "block-first" if conv.endswith("conv1")
                  else "residual-output"] += len(idxs)
        acc = {"masked": accuracy(masked, test_x, test_y, *AKAMASTER, 500),
               "compact": accuracy(small, test_x, test_y, *AKAMASTER, 500)}
        recalibrate_bn(small, batches(recal_x, recal_y), args.recal_images)
        acc["compact_recal"] = accuracy(small, test_x, test_y, *AKAMASTER, 500)
        record = {
            "row": label, "checkpoint": file, "filters": total, "masked": count,
            "sparsity": round(count / total, 4),
            "masked_stem": roles["stem"], "masked_block_first": roles["block-first"],
            "masked_residual_output": roles["residual-output"],
            "removed_exact": info.removed_exact, "removed_border": info.removed_border,
            "kept_masked": info.kept_masked,
            "paper_macs_M": round(info.macs_paper / 1e6, 2),
            "masked_macs_M": round(info.macs_masked / 1e6, 2),
            "compact_macs_M": round(info.macs / 1e6, 2),
            "masked_params": info.params_masked, "compact_params": info.params,
            "max_abs_error": float(f"{info.max_abs_error:.4g}"),
            "acc_masked": round(acc["masked"], 2), "acc_compact": round(acc["compact"], 2),
            "acc_compact_recal": round(acc["compact_recal"], 2),
            "latency_b1_masked_ms": round(latency(masked, 1, args.threads), 2),
            "latency_b1_compact_ms": round(latency(small, 1, args.threads), 2),
            "latency_b64_masked_ms": round(latency(masked, 64, args.threads), 1),
            "latency_b64_compact_ms": round(latency(small, 64, args.threads), 1),
            "seconds": round(time.perf_counter() - start),
        }
        records.append(record)
        print(record, flush=True)
        write(args, records)
    return 0


def write(args: argparse.Namespace, records: list[dict]) -> None:
    with open(args.out / "compact.csv.tmp", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    os.replace(args.out / "compact.csv.tmp", args.out / "compact.csv")
    machine = (f"Machine: {os.cpu_count()}-core {platform.machine()} CPU ({cpu_name()}), "
               f"{args.threads} threads, Python {platform.python_version()}, torch "
               f"{torch.__version__}, {platform.system()}.")
    lines = [
        "# The published (masked) network and its compaction, pretrained weights, no "
        "fine-tuning",
        "",
        "`python benchmarks/compact.py --weights-dir ../shared/weights/cifar10 --data-root "
        "../shared/data --out benchmarks/results/compact`",
        "",
        f"Selection: published CDP scores from {args.stats_images} un-augmented training "
        "images (seeded draw), one global ranking of all conv filters, the `int(N*s)+1` "
        "lowest masked (rows with a MACs figure: the count whose paper MACs come closest). "
        f"Recalibration: {args.recal_images} other training images. Accuracy: top-1 on the "
        "10,000 CIFAR-10 test images; output error: largest absolute logit difference to "
        "the masked network on 256 test images. Latency: median CPU forward time.",
        "",
        machine,
        "",
        "| row | masked (stem / first / res-out) | paper MACs | physical MACs masked -> "
        "compact | params masked -> compact | max abs error | top-1 masked | "
        "compact | compact + recal | latency b1 / b64 masked -> compact (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        lines.append(
            f"| {r['row']} | {r['masked']} of {r['filters']} ({r['masked_stem']} / "
            f"{r['masked_block_first']} / {r['masked_residual_output']}) | "
            f"{r['paper_macs_M']}M | {r['masked_macs_M']}M -> {r['compact_macs_M']}M | "
            f"{r['masked_params']:,} -> {r['compact_params']:,} | {r['max_abs_error']} | "
            f"{r['acc_masked']} | {r['acc_compact']} | "
            f"{r['acc_compact_recal']} | {r['latency_b1_masked_ms']} / "
            f"{r['latency_b64_masked_ms']} -> {r['latency_b1_compact_ms']} / "
            f"{r['latency_b64_compact_ms']} |")
    lines.append("")
    atomic_write_text(args.out / "compact.md", "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
