"""The published code's network against cdprune's block-internal one, at the same paper MACs.

The CDP recipes land on the paper's MACs figures in the paper's counting convention. The
published code gets there by masking filters chosen in one ranking of *every* conv
filter (stem and residual outputs included) and fine-tuning the masked network; cdprune's
default removes block-internal filters only, physically. This study prunes one pretrained
checkpoint to the same paper-convention MACs three ways and fine-tunes each over the full
training set for a few epochs (lr 0.01 cosine, as the budget study):

* ``published-masked``: ``--variant published`` (masks, the published selection);
* ``cdp-block-internal``: the same CDP scores, ``--prune-mode remove --scope auto``
  (the recipes' behaviour before the published variant selected as published);
* ``l1-block-internal``: filter L1 norms instead of CDP scores, otherwise as above.

Each finished row is appended to ``rows.jsonl`` (and skipped on restart); ``--summary``
rewrites ``paper_network.md``. For the masked network the table gives its MACs three ways:
as it runs (nothing saved), by the paper's count, and what a plain channel cut of its masks
realises. The compact network's columns are filled when this cdprune has a compaction
function (``cdprune.pruning.compact``); otherwise they say ``n/a``.

    python benchmarks/paper_network.py --model resnet20 \\
        --checkpoint ../shared/weights/cifar10/resnet20-optionA-akamaster.th --norm akamaster \\
        --data-root ../shared/data --macs-target 20.76M --epochs 2 \\
        --out benchmarks/results/paper_network_resnet20A
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from ablation import NORMS, read_rows
from budget import machine

from cdprune import (
    collect_stats,
    evaluate,
    fine_tune,
    load_weights,
    prune,
    recalibrate_bn,
    tfidf_scores,
)
from cdprune.data import build_dataset, build_loader, subset
from cdprune.fileio import atomic_write_text
from cdprune.finetune.config import TrainConfig
from cdprune.finetune.fastdata import device_batches_from
from cdprune.importance.criteria import l1_scores
from cdprune.measure.macs import count_macs, count_params, paper_macs
from cdprune.models import create_model
from cdprune.pruning.masking import (
    channel_cut,
    masked_result,
    published_search,
    removed_by_plan,
)
from cdprune.pruning.targets import parse_macs, reduction_for_target

CONFIGS = ("published-masked", "cdp-block-internal", "l1-block-internal")


def compaction() -> Any:
    """cdprune's compaction function when this version has one, else None (said in the
    table, never silently)."""
    import cdprune.pruning as pruning

    fn = getattr(pruning, "compact", None)
    return fn if callable(fn) else None


def cdp_scores(args: argparse.Namespace, model: torch.nn.Module, mean: Any, std: Any
               ) -> dict[str, torch.Tensor]:
    """Published CDP scores from seeded crop-and-flip training images (--stats-augment)."""
    aug = build_dataset("cifar10", args.data_root, train=True, augment=True, mean=mean,
                        std=std)
    loader = build_loader(subset(aug, args.stats_images, args.seed), 500, shuffle=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        stats = collect_stats(model, loader, num_classes=10, variant="published",
                              progress=False)
    return tfidf_scores(stats, variant="published")


def prune_all(args: argparse.Namespace, model: torch.nn.Module, mean: Any, std: Any
              ) -> dict[str, Any]:
    example = torch.randn(2, 3, 32, 32)
    target = parse_macs(args.macs_target)
    base = count_macs(model, example_inputs=example)
    started = time.perf_counter()
    scores = {"cdp": cdp_scores(args, model, mean, std), "l1": l1_scores(model)}
    print(f"statistics: {time.perf_counter() - started:.0f} s", flush=True)
    out = {}
    for name in args.configs:
        if name == "published-masked":
            sparsity, removed = published_search(model, scores["cdp"], target,
                                                 example_inputs=example)
            result = masked_result(model, removed, example_inputs=example)
            cut = channel_cut(model, removed, example_inputs=example)
            out[name] = dict(result=result, removed=removed, sparsity=sparsity,
                             macs_cut=cut.macs_after, params_cut=cut.params_after)
        else:
            scored = scores["cdp" if name.startswith("cdp") else "l1"]

            def at(r: float, scored: Any = scored) -> Any:
                return prune(model, scored, example_inputs=example, macs_reduction=r,
                             scope="auto")

            r = reduction_for_target(target, base, "paper", prune_at=at, model=model,
                                     example_inputs=example)
            result = at(r)
            out[name] = dict(result=result, sparsity=None, macs_cut=result.macs_after,
                             params_cut=result.params_after,
                             removed=removed_by_plan(result.plan, result.widths_before))
        res = out[name]["result"]
        out[name]["macs_paper"] = paper_macs(model, res.plan["kept"], example_inputs=example)
    return out


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    mean, std = NORMS[args.norm]
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rows.jsonl"
    done = {r["config"] for r in read_rows(rows_path)}
    model = create_model(args.model, num_classes=10)
    load_weights(model, args.checkpoint)
    model.eval()
    test = build_dataset("cifar10", args.data_root, train=False, mean=mean, std=std)
    val = device_batches_from(test, 500, shuffle=False)
    train_set = build_dataset("cifar10", args.data_root, train=True, mean=mean, std=std)
    if args.train_images:  # fewer images than the protocol's 50,000: the table says so
        train_set = subset(train_set, args.train_images, args.seed)
    base_acc = evaluate(model, val, progress=False).top1
    pruned = prune_all(args, model, mean, std)
    compact = compaction()
    for name in args.configs:
        if name in done:
            continue
        entry = pruned[name]
        result = entry["result"]
        net = copy.deepcopy(result.model).eval()
        acc_pruned = evaluate(net, val, progress=False).top1
        train = device_batches_from(train_set, args.batch_size, shuffle=True, seed=args.seed)
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed,
                          batch_size=args.batch_size, weight_decay=args.weight_decay,
                          eval_every=args.eval_every)
        masks = entry["removed"] if name == "published-masked" else None
        start = time.perf_counter()
        res = fine_tune(net, train, val, cfg, progress=False, masks=masks,
                        output_dir=args.scratch / args.out.name / name)
        seconds = time.perf_counter() - start
        row = {"config": name, "epochs": args.epochs, "seed": args.seed, "lr": args.lr,
               "macs_before": result.macs_before, "macs_paper": entry["macs_paper"],
               "macs_runs": result.macs_after, "macs_channel_cut": entry["macs_cut"],
               "params": result.params_after, "params_channel_cut": entry["params_cut"],
               "filters_removed": sum(map(len, entry["removed"].values())),
               "published_sparsity": entry["sparsity"], "acc_base": base_acc,
               "acc_pruned": acc_pruned, "acc_final": res.final_acc,
               "acc_best_on_test": res.best_acc,
               "curve": [round(h["val_top1"], 2) for h in res.history
                         if h["val_top1"] is not None],
               "seconds": round(seconds, 1),
               "seconds_per_epoch": round(seconds / max(1, res.epochs_run), 1),
               "compact": None}
        if masks is not None and compact is not None:
            out = compact(copy.deepcopy(net).eval(), masks, input_size=(3, 32, 32))
            small = out[0] if isinstance(out, tuple) else out
            acc_raw = evaluate(small, val, progress=False).top1
            # Folding a block-first filter's constant is inexact at the borders: a
            # BatchNorm recalibration on plain training images absorbs most of it.
            plain = device_batches_from(train_set, 500, shuffle=True, seed=args.seed)
            recalibrate_bn(small, plain, 5000)
            row["compact"] = {"macs": count_macs(small, input_size=(3, 32, 32)),
                              "params": count_params(small), "acc_raw": acc_raw,
                              "acc": evaluate(small, val, progress=False).top1}
        with open(rows_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{name:20s} paper {row['macs_paper'] / 1e6:6.2f}M runs "
              f"{row['macs_runs'] / 1e6:6.2f}M cut {row['macs_channel_cut'] / 1e6:6.2f}M  "
              f"pruned {acc_pruned:5.2f}  final {res.final_acc:5.2f}  ({seconds:.0f} s)",
              flush=True)
        summarise(args.out)


def _m(value: Any) -> str:
    return "n/a" if value is None else f"{value / 1e6:.2f}M"


def summarise(out: Path) -> str:
    meta = json.loads((out / "meta.json").read_text())
    rows = read_rows(out / "rows.jsonl")
    base = rows[0] if rows else {}
    lines = [f"# {meta.get('title') or 'The published network against block-internal pruning'}",
             "",
             f"Base model top-1: {base.get('acc_base', float('nan')):.2f}%, "
             f"{base.get('macs_before', 0) / 1e6:.2f}M MACs. One run per row (seed "
             f"{meta.get('seed', 0)}); accuracy is test top-1 on all 10,000 test images after "
             f"{meta.get('epochs')} epochs over "
             + (f"a seeded sample of {meta['train_images']:,} training images (NOT the "
                "50,000 of the protocol)" if meta.get("train_images")
                else "all 50,000 training images")
             + " (final epoch; the best epoch, chosen on the test set, in brackets).", "",
             "Recipe: CDP statistics as published (tap before BatchNorm, every image a "
             f"document) from {meta.get('stats_images')} seeded crop-and-flip training "
             "images; every configuration pruned to the same MACs in the paper's counting "
             f"convention ({meta.get('macs_target')}); SGD with Nesterov momentum 0.9, lr "
             f"{meta.get('lr')} cosine to zero, weight decay {meta.get('weight_decay')}, "
             f"batch {meta.get('batch_size')}, random crop (pad 4) and flip, no Cutout.", "",
             "MACs columns: *paper* is the published counter on masks; *runs* is what the "
             "network as trained computes (a masked network saves nothing); *channel cut* is "
             "the physical network a plain channel cut of the removed filters gives (for the "
             "block-internal rows, the network itself). The compact network removes every "
             "masked filter and carries the masked channels' constants in biases; its accuracy "
             "is given straight after compaction and after a BatchNorm recalibration on "
             "5,000 plain training images (no further training).", "",
             f"Machine: {meta.get('machine', '?')}; a 2-core VM shared with other jobs.", "",
             "```bash", meta.get("command", ""), "```", "",
             "| config | filters removed | paper MACs | runs at | channel cut | params (cut) "
             "| pruned | fine-tuned | compact MACs | compact acc (raw; BN recalibrated) "
             "| s/epoch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        compact = r.get("compact")
        label = r["config"] + (f" (sparsity {r['published_sparsity']})"
                               if r.get("published_sparsity") else "")
        raw = f"{compact['acc_raw']:.2f}; " if compact and "acc_raw" in compact else ""
        small = (f"{_m(compact['macs'])} | {raw}{compact['acc']:.2f}" if compact else
                 ("n/a (no compaction in this version) | n/a"
                  if r["config"] == "published-masked" else "- | -"))
        lines.append(
            f"| {label} | {r['filters_removed']} | {_m(r['macs_paper'])} | "
            f"{_m(r['macs_runs'])} | {_m(r['macs_channel_cut'])} | "
            f"{r['params_channel_cut'] / 1e3:.0f}k | {r['acc_pruned']:.2f} | "
            f"{r['acc_final']:.2f} ({r['acc_best_on_test']:.2f}) | {small} | "
            f"{r['seconds_per_epoch']:.0f} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "paper_network.md", text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--norm", choices=sorted(NORMS), default="akamaster")
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, default=Path("runs/paper_network_scratch"),
                        help="fine-tuning checkpoints (not results)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--macs-target", default="20.76M")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats-images", type=int, default=50000)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=None,
                        help="fine-tune on a seeded sample of this many training images "
                        "(default: all 50,000)")
    parser.add_argument("--eval-every", type=int, default=1,
                        help="test every N epochs (and after the last)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--summary", action="store_true",
                        help="only rewrite paper_network.md")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summary:
        if args.checkpoint is None or args.data_root is None:
            parser.error("--checkpoint and --data-root are required")
        torch.set_num_threads(args.threads)
        command = "python benchmarks/paper_network.py " + shlex.join(
            argv if argv is not None else sys.argv[1:])
        meta = vars(args) | {"machine": machine(), "command": command}
        old = args.out / "meta.json"
        if old.is_file():  # configurations run as separate processes into one table
            before = json.loads(old.read_text()).get("command", "")
            if command not in before.splitlines():
                meta["command"] = before + "\n" + command
        atomic_write_text(args.out / "meta.json",
                          json.dumps(meta, indent=1, default=str) + "\n")
        run(args)
    print(summarise(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
