"""Does the verdict on a criterion change with the fine-tuning budget?

The ablation (``ablation.py``) ranks criteria after one short fine-tuning epoch. A ranking
after one epoch need not hold after many: a criterion that keeps a network easy to recover
in one epoch is not necessarily the one with the best end point. This study prunes one
pretrained checkpoint to the same MACs with each criterion and fine-tunes every pruned
model over the *full* training set for several budgets (epochs), each budget its own run
with its own cosine schedule, and records the final-epoch and the best-epoch test accuracy.

Budgets are the outer loop, so a study cut short has every criterion at the smaller
budgets. Each finished (criterion, budget) run is appended to ``rows.jsonl`` (and skipped
when the study is restarted); ``--summary`` rewrites ``budget.md`` and ``budget.png``.

    python benchmarks/budget.py --model resnet20 \\
        --checkpoint ../shared/weights/cifar10/resnet20-optionA-akamaster.th --norm akamaster \\
        --data-root ../shared/data --out benchmarks/results/budget_resnet20A \\
        --configs cdp cdp-act-uniform l1-uniform random-uniform --budgets 1 3 8
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from ablation import NORMS, read_rows, spec  # same configurations as the ablation

from cdprune import collect_stats, evaluate, fine_tune, load_weights, prune, tfidf_scores
from cdprune.data import build_dataset, build_loader, subset
from cdprune.fileio import atomic_write_text
from cdprune.finetune.config import TrainConfig
from cdprune.finetune.fastdata import device_batches_from
from cdprune.importance.criteria import l1_scores, random_scores
from cdprune.models import create_model


def prune_all(args: argparse.Namespace, model: torch.nn.Module, plain_train: Any
              ) -> dict[str, Any]:
    """Prune once per configuration (pruning does not depend on the budget)."""
    example = torch.randn(2, 3, 32, 32)
    stats_cache: dict[tuple, Any] = {}
    out = {}
    for name in args.configs:
        s = spec(name)
        if s["kind"] == "l1":
            scores = l1_scores(model)
        elif s["kind"] == "random":
            scores = random_scores(model, args.seed)
        else:
            key = (s["tap"], s["documents"])
            if key not in stats_cache:
                loader = build_loader(subset(plain_train, args.stats_images, 0), 128,
                                      shuffle=False)
                stats_cache[key] = collect_stats(model, loader, documents=s["documents"],
                                                 num_classes=10, tap=s["tap"], progress=False)
            scores = tfidf_scores(stats_cache[key], coe=s["coe"], normalize=s["normalize"])
        out[name] = prune(model, scores, example_inputs=example,
                          macs_reduction=args.macs_reduction, scope=args.scope,
                          allocation=s["allocation"])
    return out


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    mean, std = NORMS[args.norm]
    rows_path = args.out / "rows.jsonl"
    done = {(r["config"], r["epochs"]) for r in read_rows(rows_path)}
    model = create_model(args.model, num_classes=10)
    load_weights(model, args.checkpoint)
    model.eval()
    common = dict(mean=mean, std=std)
    test = build_dataset("cifar10", args.data_root, train=False, **common)
    val = device_batches_from(test, 500, shuffle=False)
    plain_train = build_dataset("cifar10", args.data_root, train=True, augment=False, **common)
    train_set = build_dataset("cifar10", args.data_root, train=True, cutout=args.cutout,
                              **common)
    base_acc = evaluate(model, val, progress=False).top1
    pruned = prune_all(args, model, plain_train)
    for budget in args.budgets:
        for name in args.configs:
            if (name, budget) in done:
                continue
            result = pruned[name]
            net = copy.deepcopy(result.model).eval()
            acc_pruned = evaluate(net, val, progress=False).top1
            train = device_batches_from(train_set, args.batch_size, shuffle=True,
                                        seed=args.seed)
            cfg = TrainConfig(epochs=budget, lr=args.lr, seed=args.seed,
                              batch_size=args.batch_size, weight_decay=args.weight_decay)
            start = time.perf_counter()
            res = fine_tune(net, train, val, cfg, progress=False,
                            output_dir=args.scratch / args.out.name / f"{name}-e{budget}")
            row = {"config": name, "epochs": budget, "seed": args.seed, "lr": args.lr,
                   "macs_before": result.macs_before, "macs": result.macs_after,
                   "params": result.params_after, "acc_base": base_acc,
                   "acc_pruned": acc_pruned, "acc_final": res.final_acc,
                   "acc_best_on_test": res.best_acc,
                   "curve": [round(h["val_top1"], 2) for h in res.history],
                   "seconds": round(time.perf_counter() - start, 1),
                   "seconds_per_epoch": round((time.perf_counter() - start) / budget, 1)}
            with open(rows_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{name:18s} {budget:3d} epochs: MACs {result.macs_after / 1e6:6.2f}M  "
                  f"final {res.final_acc:5.2f}  best(test) {res.best_acc:5.2f}  "
                  f"({row['seconds']:.0f} s)", flush=True)


def summarise(out: Path, meta: dict[str, Any]) -> str:
    rows = read_rows(out / "rows.jsonl")
    configs = list(dict.fromkeys(r["config"] for r in rows))
    budgets = sorted({r["epochs"] for r in rows})
    cell = {(r["config"], r["epochs"]): r for r in rows}
    base = rows[0]["acc_base"] if rows else math.nan
    macs0 = rows[0]["macs_before"] if rows else 0
    lines = [f"# {meta['title']}", "",
             f"Base model top-1: {base:.2f}%, {macs0 / 1e6:.2f}M MACs. Each cell is one run "
             "(seed 0): **final-epoch** test top-1, with the best epoch's test top-1 in "
             "brackets (chosen on the test set, so optimistic). Each budget is its own run "
             "with its own cosine schedule.", "",
             "Recipe: statistics from 5,120 un-augmented training images (CDP), pruning "
             "through `prune()` with scope `auto` (block-internal channels), then SGD with "
             "Nesterov momentum 0.9, lr 0.01 cosine to zero, weight decay 5e-4, batch 128, "
             "random crop (pad 4) and flip, no Cutout, over all 50,000 training images; "
             "the test set is evaluated after every epoch. lr 0.01 is the rate of "
             "Torch-Pruning's published 100-epoch ResNet-56 logs and of the one-epoch "
             "ablation, so the 1-epoch column is comparable with it.", "",
             f"Machine: {meta.get('machine', '?')}; a 2-core VM shared with other jobs. "
             "The study ran with 1 thread (the first row, `cdp` at 1 epoch, with 2, in a "
             "first start that was stopped, `log_threads2.txt`): with other jobs on the "
             "cores, 2 threads per process slowed training steps ten-fold.", "",
             "```bash", meta["command"], "```", "",
             "| config | MACs | pruned | " + " | ".join(f"{b} epoch{'s' * (b > 1)}"
                                                    for b in budgets) + " |",
             "| --- | --- | --- |" + " --- |" * len(budgets)]
    for name in configs:
        first = next(r for r in rows if r["config"] == name)
        cells = []
        for b in budgets:
            r = cell.get((name, b))
            cells.append("-" if r is None else
                         f"{r['acc_final']:.2f} ({r['acc_best_on_test']:.2f})")
        lines.append(f"| {name} | {first['macs'] / 1e6:.2f}M | {first['acc_pruned']:.2f} | "
                     + " | ".join(cells) + " |")
    secs = [r["seconds_per_epoch"] for r in rows]
    if secs:
        lines += ["", f"Seconds per epoch (training + test pass): {min(secs):.0f}-"
                  f"{max(secs):.0f} on this shared machine."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "budget.md", text)
    plot(out, rows, configs, budgets)
    return text


def plot(out: Path, rows: list[dict[str, Any]], configs: list[str], budgets: list[int]
         ) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed; no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in configs:
        pts = sorted((r["epochs"], r["acc_final"]) for r in rows if r["config"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.minorticks_off()  # only the budgets themselves as ticks
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("fine-tuning budget (epochs over 50,000 images)")
    ax.set_ylabel("final-epoch test top-1 (%)")
    if rows:
        ax.axhline(rows[0]["acc_base"], color="grey", ls="--", lw=1, label="unpruned")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("ResNet-20 (option A), -50% MACs")
    fig.tight_layout()
    fig.savefig(out / "budget.png", dpi=120)
    plt.close(fig)


def machine() -> str:
    from cdprune.measure.latency import cpu_model

    return (f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--norm", choices=sorted(NORMS))
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, default=Path("runs/budget_scratch"),
                        help="fine-tuning checkpoints (not results)")
    parser.add_argument("--configs", nargs="+",
                        default=["cdp", "cdp-act-uniform", "l1-uniform", "random-uniform"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 3, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--macs-reduction", type=float, default=0.5)
    parser.add_argument("--scope", default="auto")
    parser.add_argument("--stats-images", type=int, default=5120)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--cutout", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--title", default="Accuracy against fine-tuning budget")
    parser.add_argument("--summary", action="store_true", help="only rewrite budget.md/.png")
    args = parser.parse_args(argv)
    meta_path = args.out / "meta.json"
    if args.summary:
        meta = json.loads(meta_path.read_text())
    else:
        missing = [n for n in ("model", "checkpoint", "norm", "data_root")
                   if getattr(args, n) is None]
        if missing:
            parser.error("missing " + ", ".join("--" + n.replace("_", "-") for n in missing))
        torch.set_num_threads(args.threads)
        command = "python benchmarks/budget.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        meta = {"title": args.title, "command": command, "machine": machine()}
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
        run(args)
    print(summarise(args.out, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
