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
        --data-root ../shared/data --out benchmarks/results/compact --finetune-images 20000

Rows can run in separate processes (``--rows 3 0 --out A``, ``--rows 2 4 1 5 --out B``)
and be joined afterwards (``--combine A B --out benchmarks/results/compact``).
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
import torch.nn.functional as F
from check_pretrained import AKAMASTER, cpu_name, read_test_batch

from cdprune import (
    collect_stats,
    compact,
    load_weights,
    mask_filters,
    recalibrate_bn,
    tfidf_scores,
)
from cdprune.fileio import atomic_write_text
from cdprune.measure.evaluate import measure_latency
from cdprune.measure.macs import paper_macs
from cdprune.models import create_model

# label, checkpoint, zoo model, paper sparsity or None, paper MACs target (M), masked
# fine-tuning epochs before compaction
ROWS = [
    ("ResNet-56 A, s=0.4", "resnet56-optionA-akamaster.th", "resnet56", 0.4, 60.02, 0),
    ("ResNet-56 A, 49.84M", "resnet56-optionA-akamaster.th", "resnet56", None, 49.84, 0),
    ("ResNet-20 A, 20.76M", "resnet20-optionA-akamaster.th", "resnet20", None, 20.76, 0),
    ("ResNet-20 A, 20.76M, masked fine-tune", "resnet20-optionA-akamaster.th", "resnet20",
     None, 20.76, 1),
    # A light masking that leaves the pretrained network working without training.
    ("ResNet-20 A, s=0.1", "resnet20-optionA-akamaster.th", "resnet20", 0.1, None, 0),
    ("ResNet-56 A, s=0.1", "resnet56-optionA-akamaster.th", "resnet56", 0.1, None, 0),
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


def predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = []
    model.eval()
    with torch.inference_mode():
        for x, _ in batches(images, torch.zeros(len(images)), 500):
            out.append(model(x).argmax(1))
    return torch.cat(out)


def masked_finetune(model: torch.nn.Module, masks: dict[str, list[int]], images: torch.Tensor,
                    labels: torch.Tensor, epochs: int, lr: float, seed: int = 0) -> None:
    """SGD on the masked network, masks re-applied after every step (the published
    training, in a plain loop): random crop (padding 4) and flip, batch 128, Nesterov
    momentum 0.9, weight decay 5e-4, cosine from ``lr`` to zero."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    steps = epochs * ((len(labels) + 127) // 128)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + np.cos(np.pi * min(i, steps) / steps)))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(labels), 128):
            idx = order[start:start + 128]
            padded = F.pad(images[idx].float(), (4, 4, 4, 4))
            dx = torch.randint(0, 9, (len(idx),), generator=gen).tolist()
            dy = torch.randint(0, 9, (len(idx),), generator=gen).tolist()
            flip = torch.rand(len(idx), generator=gen) < 0.5
            crops = torch.stack([padded[i, :, y:y + 32, x:x + 32]
                                 for i, (x, y) in enumerate(zip(dx, dy))])
            crops[flip] = crops[flip].flip(3)
            x, y = batches(crops.to(torch.uint8), labels[idx], 128)[0]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            mask_filters(model, masks)
    model.eval()


def latency(model: torch.nn.Module, batch: int, threads: int) -> float:
    return measure_latency(model.eval(), (3, 32, 32), batch_size=batch, warmup=3,
                           iters=20 if batch == 1 else 5, threads=threads) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-dir", type=Path)
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--stats-images", type=int, default=1280)
    parser.add_argument("--recal-images", type=int, default=1280)
    parser.add_argument("--finetune-images", type=int, default=50000,
                        help="training images of the masked fine-tuning rows")
    parser.add_argument("--lr", type=float, default=0.01, help="masked fine-tuning rate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="*", help="row indices, in the order to run "
                        "(default: all)")
    parser.add_argument("--out", type=Path, required=True, help="folder for CSV + Markdown")
    parser.add_argument("--combine", type=Path, nargs="+", metavar="DIR",
                        help="write the rows of these earlier --out folders as one table "
                        "(in the order of the rows) into --out, and measure nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.combine:
        records = [{k: _value(v) for k, v in row.items()} for folder in args.combine
                   for row in csv.DictReader(open(folder / "compact.csv", newline=""))]
        labels = [row[0] for row in ROWS]
        records.sort(key=lambda r: labels.index(r["row"]) if r["row"] in labels else len(labels))
        write(args, records)
        return 0
    if args.weights_dir is None or args.data_root is None:
        parser.error("--weights-dir and --data-root are required to measure")

    test_x, test_y = read_test_batch(args.data_root)
    stats_x, stats_y = read_train(args.data_root, args.stats_images, seed=0)
    recal_x, recal_y = read_train(args.data_root, args.recal_images, seed=1)
    probe = batches(test_x[:256], test_y[:256], 256)[0][0]
    example = torch.zeros(1, 3, 32, 32)
    records = []
    for index in args.rows if args.rows else range(len(ROWS)):
        label, file, name, sparsity, target, epochs = ROWS[index]
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
        if epochs:
            train_x, train_y = read_train(args.data_root, args.finetune_images, seed=2)
            masked_finetune(masked, masks, train_x, train_y, epochs, args.lr)
        small, info = compact(masked, masks, example_inputs=probe)
        roles = {"stem": 0, "block-first": 0, "residual-output": 0}
        for conv, idxs in masks.items():
            roles["stem" if conv == "conv1" else "block-first" if conv.endswith("conv1")
                  else "residual-output"] += len(idxs)
        preds = {"masked": predict(masked, test_x), "compact": predict(small, test_x)}
        # Recalibrating the masked network itself re-estimates its masked channels' BN
        # statistics too (mean and variance 0: the constant becomes beta).
        masked_recal = copy.deepcopy(masked)
        recalibrate_bn(masked_recal, batches(recal_x, recal_y), args.recal_images)
        preds["masked_recal"] = predict(masked_recal, test_x)
        recalibrate_bn(small, batches(recal_x, recal_y), args.recal_images)
        preds["compact_recal"] = predict(small, test_x)
        acc = {k: 100.0 * (p == test_y).float().mean().item() for k, p in preds.items()}
        agree = {k: 100.0 * (preds[k] == preds["masked"]).float().mean().item()
                 for k in ("compact", "compact_recal")}
        record = {
            "row": label, "checkpoint": file, "masked_finetune_epochs": epochs,
            "finetune_images": args.finetune_images if epochs else 0,
            "filters": total, "masked": count, "sparsity": round(count / total, 4),
            "masked_stem": roles["stem"], "masked_block_first": roles["block-first"],
            "masked_residual_output": roles["residual-output"],
            "removed_exact": info.removed_exact, "removed_border": info.removed_border,
            "kept_masked": info.kept_masked,
            "paper_macs_M": round(info.macs_paper / 1e6, 2),
            "masked_macs_M": round(info.macs_masked / 1e6, 2),
            "compact_macs_M": round(info.macs / 1e6, 2),
            "masked_params": info.params_masked, "compact_params": info.params,
            "max_abs_error": float(f"{info.max_abs_error:.4g}"),
            "acc_masked": round(acc["masked"], 2),
            "acc_masked_recal": round(acc["masked_recal"], 2),
            "acc_compact": round(acc["compact"], 2),
            "acc_compact_recal": round(acc["compact_recal"], 2),
            "agree_compact": round(agree["compact"], 2),
            "agree_compact_recal": round(agree["compact_recal"], 2),
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


def _value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


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
        "# The published (masked) network and its compaction",
        "",
        "`python benchmarks/compact.py --weights-dir ../shared/weights/cifar10 --data-root "
        "../shared/data --out benchmarks/results/compact --finetune-images 20000` (rows run "
        "in two processes, `--rows 3 0` and `--rows 2 4 1 5`, joined with `--combine`)",
        "",
        f"Selection: published CDP scores from {args.stats_images} un-augmented training "
        "images (seeded draw), one global ranking of all conv filters, the `int(N*s)+1` "
        "lowest masked (rows with a MACs figure: the count whose paper MACs come closest). "
        "Rows without masked fine-tuning are the pretrained weights with the filters "
        "masked; the fine-tuned row trains the masked network first (plain SGD loop, masks "
        f"re-applied after every step, lr {args.lr} cosine, crop+flip). Recalibration: "
        f"{args.recal_images} other training images. Top-1 on the 10,000 CIFAR-10 test "
        "images (masked + recal: the masked network itself recalibrated, which turns each "
        "masked channel's constant into its BN beta); agreement: test images on which the "
        "compact network predicts the masked "
        "network's class; max abs error: largest logit difference to the masked network "
        "on 256 test images, before recalibration. Latency: median CPU forward time "
        "(noisy on this shared machine).",
        "",
        machine,
        "",
        "| row | masked (stem / first / res-out) | paper MACs | physical MACs masked -> "
        "compact | params masked -> compact | removed exact / border-folded | max abs "
        "error | top-1 masked (+ recal) | compact | compact + recal | agreement compact "
        "(+ recal) | latency b1 / b64 masked -> compact (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        lines.append(
            f"| {r['row']} | {r['masked']} of {r['filters']} ({r['masked_stem']} / "
            f"{r['masked_block_first']} / {r['masked_residual_output']}) | "
            f"{r['paper_macs_M']}M | {r['masked_macs_M']}M -> {r['compact_macs_M']}M | "
            f"{r['masked_params']:,} -> {r['compact_params']:,} | {r['removed_exact']} / "
            f"{r['removed_border']} | {r['max_abs_error']} | {r['acc_masked']} "
            f"({r['acc_masked_recal']}) | "
            f"{r['acc_compact']} | {r['acc_compact_recal']} | {r['agree_compact']}% "
            f"({r['agree_compact_recal']}%) | {r['latency_b1_masked_ms']} / "
            f"{r['latency_b64_masked_ms']} -> {r['latency_b1_compact_ms']} / "
            f"{r['latency_b64_compact_ms']} |")
    lines.append("")
    atomic_write_text(args.out / "compact.md", "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
