"""Which published sparsity each CIFAR recipe lands on, and what its masks cost.

Runs a recipe's statistics and selection exactly as ``cdprune run -c RECIPE`` would (its
statistics options, ``variant: published``, its paper-convention MACs target), without
fine-tuning, and records: the sparsity found, the filters masked by kind (stem,
block-first, residual-output, shortcut, plain), the masked network's MACs in the paper's
count and the physical MACs of a plain channel cut of its masks. Rows are appended to
``recipe_sparsity.csv``; ``recipe_sparsity.md`` is rewritten from them.

    python benchmarks/recipe_sparsity.py --recipe configs/cifar10/resnet56_60M.yaml \\
        configs/cifar10/resnet56_50M.yaml \\
        --checkpoint ../shared/weights/cifar10/resnet56-optionA-akamaster.th \\
        --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any

import torch
from budget import machine

from cdprune.cli.main import DEFAULTS
from cdprune.cli.yamlfile import load_yaml
from cdprune.fileio import atomic_write_text
from cdprune.importance.scoring import tfidf_scores
from cdprune.measure.macs import paper_macs
from cdprune.pruning.masking import channel_cut, kept_of, published_search
from cdprune.pruning.targets import parse_macs
from cdprune.runs.inputs import build_data, build_model
from cdprune.runs.pipeline import gather_stats

FIELDS = ["recipe", "checkpoint", "images", "sparsity", "masked", "filters", "stem",
          "block_first", "residual_output", "shortcut", "plain", "macs_base", "macs_paper",
          "macs_channel_cut", "seconds"]


def kind(name: str, first: str) -> str:
    """What a convolution is in a CIFAR ResNet or VGG, by its name."""
    if name == first:
        return "stem"
    if "shortcut" in name or "downsample" in name:
        return "shortcut"
    if name.startswith("layer") and name.endswith("conv1"):
        return "block_first"
    if name.startswith("layer") and name.endswith("conv2"):
        return "residual_output"
    return "plain"


_STATS: dict[tuple, Any] = {}  # recipes sharing model, weights and statistics options


def measure(args: argparse.Namespace, recipe: Path) -> dict[str, Any]:
    config = dict(load_yaml(str(recipe), DEFAULTS))
    config.update(data_root=str(args.data_root), device="cpu", workers=0, no_progress=True,
                  seed=args.seed, checkpoint=str(args.checkpoint) if args.checkpoint else None)
    if args.mean:
        config.update(mean=args.mean, std=args.std)
    if args.stop_batch:
        config["stop_batch"] = args.stop_batch
    started = time.perf_counter()
    data = build_data(config, need_train=False)
    model = build_model(config, data.num_classes).eval()
    key = (config["model"], str(args.checkpoint), config.get("stop_batch"),
           config.get("stats_batch_size"), config.get("stats_augment"), str(config.get("mean")))
    if key not in _STATS:
        _STATS[key] = gather_stats(config, data, model)
    stats = _STATS[key]
    scores = tfidf_scores(stats, variant="published")
    example = torch.randn(2, *data.input_size)
    sparsity, removed = published_search(model, scores, parse_macs(config["macs_target"]),
                                         example_inputs=example)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    counts = dict.fromkeys(("stem", "block_first", "residual_output", "shortcut", "plain"), 0)
    for name, idxs in removed.items():
        counts[kind(name, convs[0])] += len(idxs)
    cut = channel_cut(model, removed, example_inputs=example)
    images = len(data.stats.dataset)
    return {"recipe": recipe.name,
            "checkpoint": Path(args.checkpoint).name if args.checkpoint else "random init",
            "images": images, "sparsity": sparsity,
            "masked": sum(map(len, removed.values())), "filters": sum(s.numel() for s in
                                                                     scores.values()),
            **counts, "macs_base": cut.macs_before,
            "macs_paper": paper_macs(model, kept_of(model, removed), example_inputs=example),
            "macs_channel_cut": cut.macs_after,
            "seconds": round(time.perf_counter() - started, 1)}


def summarise(out: Path) -> str:
    with open(out / "recipe_sparsity.csv") as fh:
        rows = list(csv.DictReader(fh))
    lines = ["# The published sparsity each CIFAR recipe lands on", "",
             "Statistics and selection exactly as `cdprune run -c RECIPE` (published variant, "
             "crop-and-flip statistics seeded with 0, the recipe's paper-convention MACs "
             "target), no fine-tuning. Checkpoints with their own normalisation (the "
             "akamaster ResNets: the ImageNet pair). VGG-16 has no public CIFAR checkpoint "
             "here: its row is a randomly initialised network, so its sparsity only shows "
             "what the search does, not what a trained VGG-16 lands on.", "",
             f"Machine: {machine()}.", "",
             "| recipe | weights | images | sparsity | masked / filters | stem | block-first "
             "| residual-output | shortcut | plain | paper MACs | channel-cut MACs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['checkpoint']} | {r['images']} | {r['sparsity']} "
                     f"| {r['masked']} / {r['filters']} | {r['stem']} | {r['block_first']} | "
                     f"{r['residual_output']} | {r['shortcut']} | {r['plain']} | "
                     f"{int(r['macs_paper']) / 1e6:.2f}M | "
                     f"{int(r['macs_channel_cut']) / 1e6:.2f}M |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "recipe_sparsity.md", text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, nargs="+", required=True,
                        help="one or more recipes (statistics shared where they agree)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="pretrained weights (default: a random initialisation)")
    parser.add_argument("--mean", type=float, nargs=3)
    parser.add_argument("--std", type=float, nargs=3)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--stop-batch", type=int, default=None,
                        help="fewer statistics batches than the recipe's (say so)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "recipe_sparsity.csv"
    for recipe in args.recipe:
        row = measure(args, recipe)
        new = not path.exists()
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        print(row, flush=True)
    print(summarise(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
