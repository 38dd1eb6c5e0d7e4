"""CPU time of one epoch of each CIFAR row's masked network, measured per iteration.

A masked network computes as much as the unpruned one, so one recipe epoch costs the
base network's training steps (batch 512, 98 per epoch over 50,000 images) with the masks
re-applied after each, plus a test pass over 10,000 images. The steps are timed here in
*process* CPU time (one thread), which a machine shared with other jobs inflates less
than wall time; the epoch is the measured per-step time times the steps in an epoch.
Rows go to ``paper_epoch_cpu.csv``.

    python benchmarks/paper_epoch_cpu.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch
from budget import machine
from torch import nn

from cdprune.models import create_model
from cdprune.pruning.masking import FilterMasks, mask_filters, published_selection

ROWS = {"resnet20_20M": ("resnet20", 0.40), "resnet56_60M": ("resnet56", 0.41),
        "resnet56_50M": ("resnet56", 0.52), "vgg16_103M": ("vgg16_cifar", 0.65)}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats


def measure(row: str, steps: int, batch: int) -> dict[str, float | str]:
    name, sparsity = ROWS[row]
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    scores = {n: torch.rand(m.out_channels) for n, m in model.named_modules()
              if isinstance(m, nn.Conv2d)}
    removed = published_selection(scores, sparsity)
    mask_filters(model, removed)
    masks = FilterMasks(model, removed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        masks.zero_grads()
        opt.step()
        masks.after_step(opt)

    test = torch.randn(500, 3, 32, 32)

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(test)

    train_s = timed(step, steps)
    eval_s = timed(infer, max(1, steps // 2))
    iters = math.ceil(50000 / batch)
    return {"row": row, "model": name, "batch": batch, "train_step_s": round(train_s, 3),
            "test_batch_s": round(eval_s, 3),
            "epoch_cpu_s": round(iters * train_s + 20 * eval_s, 1),
            "masked": sum(map(len, removed.values())), "machine": machine()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    path = args.out / "paper_epoch_cpu.csv"
    args.out.mkdir(parents=True, exist_ok=True)
    for row in args.rows:
        result = measure(row, args.steps, args.batch)
        new = not path.exists()
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, list(result))
            if new:
                writer.writeheader()
            writer.writerow(result)
        print(result, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
