"""CDP variants and baselines at equal MACs on real CIFAR-10: the evidence for the default.

Every configuration prunes the same pretrained model to the same MACs target through the
same :func:`cdprune.prune` (same scope, limits and group reduction), and every pruned
model is measured the same three ways on the full test set:

* right after pruning;
* after BatchNorm recalibration: running statistics re-estimated on 2,560 training
  images, no weight changes (a cheap predictor of fine-tuned accuracy that is not
  dominated, as raw pruned accuracy is, by shifted BatchNorm statistics);
* after a short fine-tune (optional; same images, same schedule, one seed per run).

Rows are appended to ``rows.jsonl`` in the output folder as each run finishes, and a run
already there is skipped, so an interrupted study resumes where it stopped. ``--summary``
rewrites ``ablation.md`` from the rows.

    python benchmarks/ablation.py --model resnet56 \\
        --checkpoint ../shared/weights/cifar10/resnet56-optionA-akamaster.th \\
        --norm akamaster --data-root ../shared/data --out benchmarks/results/ablation_resnet56A \\
        --configs cdp cdp-class cdp-act l1 random --seeds 0 1 2 --finetune
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdprune import collect_stats, evaluate, fine_tune, load_weights, prune, tfidf_scores
from cdprune.data import build_dataset, build_loader, subset
from cdprune.fileio import atomic_write_text
from cdprune.finetune.config import TrainConfig
from cdprune.importance.criteria import l1_scores, random_scores
from cdprune.models import create_model

NORMS = {"akamaster": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
         "chenyaofo": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))}

_CDP = dict(kind="cdp", tap="conv", documents="sample", coe=0.0, normalize=None,
            allocation="global")
# name -> what differs from the published CDP configuration (first entry).
CONFIGS: dict[str, dict[str, Any]] = {
    "cdp": {},
    "cdp-class": dict(documents="class"),
    "cdp-act": dict(tap="act"),
    "cdp-act-class": dict(tap="act", documents="class"),
    "cdp-coe1": dict(coe=1.0),
    "cdp-coe8": dict(coe=8.0),
    "cdp-norm-max": dict(normalize="max"),
    "cdp-norm-mean": dict(normalize="mean"),
    "cdp-act-norm-mean": dict(tap="act", normalize="mean"),
    "cdp-uniform": dict(allocation="uniform"),
    "cdp-class-uniform": dict(documents="class", allocation="uniform"),
    "cdp-act-uniform": dict(tap="act", allocation="uniform"),
    "cdp-act-class-uniform": dict(tap="act", documents="class", allocation="uniform"),
    "l1": dict(kind="l1"),
    "l1-uniform": dict(kind="l1", allocation="uniform"),
    "random": dict(kind="random"),
    "random-uniform": dict(kind="random", allocation="uniform"),
}


def spec(name: str) -> dict[str, Any]:
    """A config name, optionally ``@N`` for N statistics images, as a full specification."""
    base, _, images = name.partition("@")
    if base not in CONFIGS:
        raise SystemExit(f"unknown config {base!r}; choose from {', '.join(CONFIGS)}")
    out = {**_CDP, **CONFIGS[base], "name": name}
    out["stats_images"] = int(images) if images else None
    return out


def recalibrate_bn(model: nn.Module, loader: Any, batches: int) -> None:
    """Re-estimate every BatchNorm's running mean and variance as a plain average."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if i == batches:
                break
            model(x)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


def stage_kept(result: Any) -> dict[str, float]:
    """Fraction of conv output channels kept per top-level module (a ResNet's stages)."""
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    for name, width in result.widths_before.items():
        stage = name.split(".")[0]
        before[stage] = before.get(stage, 0) + width
        after[stage] = after.get(stage, 0) + result.widths_after[name]
    return {s: round(after[s] / before[s], 3) for s in before if after[s] != before[s]}


def removed_channels(result: Any) -> dict[str, list[int]]:
    """Indices of the output channels removed from each pruned conv."""
    return {name: sorted(set(range(result.widths_before[name])) - set(kept))
            for name, kept in result.plan["kept"].items() if name in result.widths_before}


def agreement(row: Mapping[str, Any], ref: Mapping[str, Any]) -> float:
    """Fraction of the reference row's removed channels that ``row`` removes too."""
    ref_set = {(m, i) for m, idxs in ref["removed"].items() for i in idxs}
    own = {(m, i) for m, idxs in row["removed"].items() for i in idxs}
    return len(own & ref_set) / max(1, len(ref_set))


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    mean, std = NORMS[args.norm]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    done = {(r["config"], r["seed"]) for r in read_rows(rows_path)}

    model = create_model(args.model, num_classes=10)
    load_weights(model, args.checkpoint)
    model.eval()
    example = torch.randn(2, 3, 32, 32)
    common = dict(mean=mean, std=std)
    val = build_loader(build_dataset("cifar10", args.data_root, train=False, **common), 500,
                       shuffle=False)
    plain_train = build_dataset("cifar10", args.data_root, train=True, augment=False, **common)
    aug_train = subset(build_dataset("cifar10", args.data_root, train=True, **common),
                       args.train_subset, 0)
    recal = build_loader(subset(plain_train, 20 * 128, 1), 128, shuffle=True, seed=1)
    stats_cache: dict[tuple, Any] = {}

    def scores_for(s: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
        if s["kind"] == "l1":
            return l1_scores(model)
        if s["kind"] == "random":
            return random_scores(model, seed)
        n = s["stats_images"] or args.stats_images
        key = (s["tap"], s["documents"], n)
        if key not in stats_cache:
            loader = build_loader(subset(plain_train, n, 0), 128, shuffle=False)
            stats_cache[key] = collect_stats(model, loader, documents=s["documents"],
                                             num_classes=10, tap=s["tap"], progress=False)
        return tfidf_scores(stats_cache[key], coe=s["coe"], normalize=s["normalize"])

    base_acc = evaluate(model, val, progress=False).top1
    # Seeds outermost: a study cut short still has every configuration at the first seed.
    for seed in args.seeds:
        for name in args.configs:
            s = spec(name)
            if (name, seed) in done or (seed != args.seeds[0] and not args.finetune
                                        and s["kind"] != "random"):
                continue
            start = time.perf_counter()
            result = prune(model, scores_for(s, seed), example_inputs=example,
                           macs_reduction=args.macs_reduction, scope=args.scope,
                           allocation=s["allocation"])
            pruned = result.model.eval()
            acc_pruned = evaluate(pruned, val, progress=False).top1
            recal_model = copy.deepcopy(pruned)
            recalibrate_bn(recal_model, recal, 20)
            acc_recal = evaluate(recal_model, val, progress=False).top1
            acc_ft = None
            if args.finetune:
                cfg = TrainConfig(epochs=args.epochs, lr=args.lr, seed=seed, batch_size=128)
                train = build_loader(aug_train, 128, shuffle=True, seed=seed)
                scratch = args.scratch / args.out.name / f"{name}-seed{seed}"
                acc_ft = fine_tune(pruned, train, val, cfg, output_dir=scratch,
                                   progress=False).final_acc
            row = {"config": name, "seed": seed, **{k: s[k] for k in _CDP},
                   "stats_images": s["stats_images"] or args.stats_images,
                   "macs_before": result.macs_before, "macs": result.macs_after,
                   "params": result.params_after, "acc_base": base_acc,
                   "acc_pruned": acc_pruned, "acc_recal": acc_recal, "acc_finetuned": acc_ft,
                   "stage_kept": stage_kept(result),
                   "removed": removed_channels(result),
                   "seconds": round(time.perf_counter() - start, 1)}
            with open(rows_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{name:24s} seed {seed}: MACs {result.macs_after / 1e6:6.2f}M  pruned "
                  f"{acc_pruned:5.2f}  recal {acc_recal:5.2f}  tuned {acc_ft or math.nan:5.2f}  "
                  f"kept {row['stage_kept']}  ({row['seconds']:.0f} s)", flush=True)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stat(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def summarise(out: Path, title: str, command: str) -> str:
    rows = read_rows(out / "rows.jsonl")
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["config"], []).append(row)
    base = rows[0]["acc_base"] if rows else math.nan
    macs0 = rows[0]["macs_before"] if rows else 0
    lines = [f"# {title}", "", f"Base model top-1: {base:.2f}%, {macs0 / 1e6:.1f}M MACs. "
             "Top-1 in percent on the 10,000 test images; ± is the standard deviation over "
             "seeds (random scores and fine-tuning order change with the seed).", "",
             "```bash", command, "```", "",
             "| config | tap | documents | coe | normalize | allocation | stats images | "
             "MACs | seeds | pruned | BN recalibrated | fine-tuned | kept per stage | "
             "same removals as most images |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
             "| --- |"]
    for name, members in groups.items():
        r = members[0]
        same = [m for m in rows if m["config"].partition("@")[0] == name.partition("@")[0]
                and m["seed"] == r["seed"] and "removed" in m]
        ref = max(same, key=lambda m: m["stats_images"]) if len(same) > 1 else None
        agree = f"{agreement(r, ref):.3f}" if ref is not None and "removed" in r else "-"
        cdp = r["kind"] == "cdp"
        kept = ", ".join(f"{k} {v:.2f}" for k, v in r["stage_kept"].items())
        lines.append(
            f"| {name} | {r['tap'] if cdp else '-'} | {r['documents'] if cdp else '-'} | "
            f"{r['coe'] if cdp else '-'} | {(r['normalize'] or 'none') if cdp else '-'} | "
            f"{r['allocation']} | {r['stats_images'] if cdp else '-'} | "
            f"{statistics.fmean(m['macs'] for m in members) / 1e6:.2f}M | {len(members)} | "
            f"{_stat([m['acc_pruned'] for m in members])} | "
            f"{_stat([m['acc_recal'] for m in members])} | "
            f"{_stat([m['acc_finetuned'] for m in members])} | {kept} | {agree} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "ablation.md", text)
    return text


def digest(folders: Sequence[Path]) -> str:
    """One table across studies: BN-recalibrated and fine-tuned top-1 per configuration."""
    studies = {f: read_rows(f / "rows.jsonl") for f in folders}
    names = list(dict.fromkeys(r["config"] for rows in studies.values() for r in rows))
    titles = [json.loads((f / "meta.json").read_text())["title"].split(",")[0]
              if (f / "meta.json").exists() else f.name for f in folders]
    lines = ["| config | " + " | ".join(titles) + " |",
             "| --- |" + " --- |" * len(folders)]
    for name in names:
        cells = []
        for rows in studies.values():
            members = [r for r in rows if r["config"] == name]
            if not members:
                cells.append("-")
                continue
            tuned = _stat([m["acc_finetuned"] for m in members])
            cells.append(_stat([m["acc_recal"] for m in members])
                         + (f" → {tuned}" if tuned != "-" else "")
                         + (f" (n={len(members)})" if len(members) > 1 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--norm", choices=sorted(NORMS))
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--scratch", type=Path, default=Path("runs/ablation_scratch"),
                        help="fine-tuning checkpoints (not results)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--macs-reduction", type=float, default=0.5)
    parser.add_argument("--scope", default="auto")
    parser.add_argument("--stats-images", type=int, default=5120)
    parser.add_argument("--finetune", action="store_true")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--title", default="CDP ablation")
    parser.add_argument("--summary", action="store_true", help="only rewrite ablation.md")
    parser.add_argument("--digest", type=Path, nargs="+", metavar="DIR",
                        help="print one table across finished studies and exit")
    args = parser.parse_args(argv)
    needed = ["out"] if args.summary else ["model", "checkpoint", "norm", "data_root", "out"]
    missing = [n for n in needed if getattr(args, n) is None] if not args.digest else []
    if missing:
        parser.error("missing " + ", ".join("--" + n.replace("_", "-") for n in missing))
    if args.digest:
        print(digest(args.digest))
        return 0
    meta_path = args.out / "meta.json"
    if args.summary and meta_path.exists():  # keep the title and command of the study
        meta = json.loads(meta_path.read_text())
    else:
        command = "python benchmarks/ablation.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        meta = {"title": args.title, "command": command}
    if not args.summary:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
        run(args)
    print(summarise(args.out, meta["title"], meta["command"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
