"""Fine-tuning throughput: cdprune's fine_tune against a bare PyTorch loop and a DataLoader.

Three ways to train the same pruned network on the same CIFAR-10 images, timed in
interleaved rounds (A B C A B C ...) so that drift on a shared machine hits all alike:

* ``bare``: a plain loop (forward, loss, backward, SGD step, scheduler step) over the
  batches of :class:`cdprune.finetune.fastdata.DeviceBatches`; nothing else.
* ``fine_tune``: :func:`cdprune.fine_tune` with the same batches (its default path for an
  in-memory dataset), stopped after the same number of iterations by ``max_iters``, timed
  by its own ``train_time`` (the training pass); the whole call, with the end-of-epoch
  validation (one batch) and checkpoint that a real epoch spreads over hundreds of
  steps, is reported on its own line.
* ``dataloader``: :func:`cdprune.fine_tune` with ``fast_data=False``: the per-image
  transforms of a DataLoader (``--workers``).
* ``data only``: producing the same batches (crop, flip, normalise, Cutout) with
  DeviceBatches and with the DataLoader, without a model.

Images per second are medians over the rounds; ratios are to ``bare``. With ``--epochs``,
the projected time of a full fine-tune (``epochs`` x 50,000 images) is printed.

    python benchmarks/train_speed.py --data-root ../shared/data --threads 1 --steps 20 \\
        --rounds 3 --csv benchmarks/results/train_speed.csv
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from budget import machine
from torch import nn

from cdprune import TrainConfig, fine_tune, prune
from cdprune.data import build_dataset, build_loader, subset
from cdprune.finetune.config import build_optimizer, build_scheduler
from cdprune.finetune.fastdata import device_batches_from
from cdprune.finetune.loop import autocast_dtype
from cdprune.finetune.resume import seed_epoch
from cdprune.importance.criteria import l1_scores
from cdprune.models import create_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare(model: nn.Module, batches, cfg: TrainConfig, device: torch.device) -> float:
    """Seconds for ``cfg.max_iters`` plain training steps over ``batches``."""
    model.train()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(batches))
    criterion = nn.CrossEntropyLoss()
    dtype = autocast_dtype(cfg, device)
    seed_epoch(batches, cfg.seed, 0)
    _sync(device)
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        if step == cfg.max_iters:
            break
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    _sync(device)
    return time.perf_counter() - start


def cdprune_loop(model: nn.Module, loader, val, cfg: TrainConfig, device: torch.device,
                 whole: list[float]) -> float:
    """Seconds of fine_tune's training pass; the whole call (with the per-epoch validation
    and checkpoint, which a real epoch amortises over hundreds of steps) goes to ``whole``."""
    with tempfile.TemporaryDirectory() as scratch:
        _sync(device)
        start = time.perf_counter()
        res = fine_tune(model, loader, val, cfg, output_dir=scratch, device=device,
                        progress=False)
        _sync(device)
        whole.append(time.perf_counter() - start)
        return res.history[-1]["train_time"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--macs-reduction", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16/fp16 autocast (CUDA)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--epochs", type=int, default=300, help="for the projection")
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    base = create_model(args.model, num_classes=10)
    pruned = prune(base, l1_scores(base), example_inputs=torch.randn(2, 3, 32, 32),
                   macs_reduction=args.macs_reduction, allocation="uniform").model
    train_set = build_dataset("cifar10", args.data_root, train=True, cutout=True)
    val_set = subset(build_dataset("cifar10", args.data_root, train=False), args.batch_size)
    cfg = TrainConfig(epochs=1, lr=0.01, max_iters=args.steps, amp=args.amp,
                      channels_last=args.channels_last, batch_size=args.batch_size)
    slow_cfg = TrainConfig(**{**cfg.to_dict(), "fast_data": False})
    fast = device_batches_from(train_set, args.batch_size, shuffle=True, device=device,
                               channels_last=args.channels_last and device.type == "cuda")
    loader = build_loader(train_set, args.batch_size, shuffle=True, workers=args.workers)
    val = build_loader(val_set, args.batch_size, shuffle=False)

    def fresh() -> nn.Module:
        model = copy.deepcopy(pruned).to(device)
        if args.channels_last and device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model

    whole: dict[str, list[float]] = {"fine_tune": [], "dataloader": []}
    runs = {
        "bare": lambda: bare(fresh(), fast, cfg, device),
        "fine_tune": lambda: cdprune_loop(fresh(), loader, val, cfg, device,
                                          whole["fine_tune"]),
        "dataloader": lambda: cdprune_loop(fresh(), loader, val, slow_cfg, device,
                                           whole["dataloader"]),
    }
    for run in runs.values():  # warm-up: allocations, caches, lazy initialisation
        run()
    for values in whole.values():
        values.clear()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(run())
    times["fine_tune (with validation + checkpoint)"] = whole["fine_tune"]
    # The data paths alone (no model): what each costs to produce the same number of batches.
    for name, source in (("data only: DeviceBatches", fast), ("data only: DataLoader", loader)):
        spent = []
        for _ in range(args.rounds):
            seed_epoch(source, 0, 0)
            start = time.perf_counter()
            for step, _batch in enumerate(source):
                if step + 1 == args.steps:
                    break
            _sync(device)
            spent.append(time.perf_counter() - start)
        times[name] = spent
    images = args.steps * args.batch_size
    rows = []
    ref = images / statistics.median(times["bare"])
    print(f"{args.model} pruned -{args.macs_reduction:.0%} MACs, batch {args.batch_size}, "
          f"{args.steps} steps x {args.rounds} rounds on {device} ({machine()})")
    for name, values in times.items():
        speed = images / statistics.median(values)
        epoch_s = 50000 / speed
        rows.append({"path": name, "images_per_s": round(speed, 1),
                     "ratio_to_bare": round(speed / ref, 3),
                     "spread": f"{images / max(values):.0f}-{images / min(values):.0f}",
                     "epoch_s": round(epoch_s, 1),
                     f"projected_{args.epochs}_epochs_min": round(epoch_s * args.epochs / 60, 1),
                     "device": str(device), "threads": args.threads,
                     "machine": machine()})
        print(f"{name:42s} {speed:8.1f} img/s  x{speed / ref:.3f} of bare  "
              f"(rounds {rows[-1]['spread']} img/s)  epoch {epoch_s:.0f} s, {args.epochs} "
              f"epochs {epoch_s * args.epochs / 60:.0f} min")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
