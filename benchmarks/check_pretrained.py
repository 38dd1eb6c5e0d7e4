"""Check that the public CIFAR-10 ResNet checkpoints load into the zoo and score as published.

Each checkpoint is read with :func:`cdprune.load_weights` (safe loading, strict key and
shape check) into the matching zoo model, then top-1 accuracy is measured on the full
10,000-image CIFAR-10 test set, normalised as the checkpoint expects. A run passes when
every accuracy is within ``--tolerance`` points of the reference measured with the
checkpoints' own code. The test batch is read straight from the official python pickle
layout with numpy, so this check does not depend on cdprune's data module.

    python benchmarks/check_pretrained.py --weights-dir ../shared/weights/cifar10 \\
        --data-root ../shared/data --out benchmarks/results/pretrained_accuracy.md
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cdprune import load_weights
from cdprune.fileio import atomic_write_text
from cdprune.measure.macs import count_macs, count_params
from cdprune.models import create_model

AKAMASTER = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CHENYAOFO = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
# file, zoo model, normalisation, reference accuracy (../shared/weights/README.md)
CHECKPOINTS = [
    ("resnet20-optionA-akamaster.th", "resnet20", AKAMASTER, 91.73),
    ("resnet32-optionA-akamaster.th", "resnet32", AKAMASTER, 92.63),
    ("resnet44-optionA-akamaster.th", "resnet44", AKAMASTER, 93.10),
    ("resnet56-optionA-akamaster.th", "resnet56", AKAMASTER, 93.39),
    ("resnet20-optionB-chenyaofo.pth", "resnet20b", CHENYAOFO, 92.60),
    ("resnet32-optionB-chenyaofo.pth", "resnet32b", CHENYAOFO, 93.53),
    ("resnet44-optionB-chenyaofo.pth", "resnet44b", CHENYAOFO, 94.01),
    ("resnet56-optionB-chenyaofo.pth", "resnet56b", CHENYAOFO, 94.37),
]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_test_batch(data_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 test images as uint8 ``(10000, 3, 32, 32)`` and labels."""
    folder = data_root / "cifar-10-batches-py"
    path = folder / "test_batch" if folder.is_dir() else data_root / "test_batch"
    with open(path, "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")  # the official dataset file, trusted
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return torch.from_numpy(images.copy()), torch.tensor(batch[b"labels"])


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             mean: tuple[float, ...], std: tuple[float, ...], batch_size: int) -> float:
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    correct = 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(labels), batch_size):
            x = (images[start:start + batch_size].float() / 255.0 - m) / s
            correct += (model(x).argmax(1) == labels[start:start + batch_size]).sum().item()
    return 100.0 * correct / len(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-dir", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=None, help="write a markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    images, labels = read_test_batch(args.data_root)
    rows, ok = [], True
    for file, name, (mean, std), reference in CHECKPOINTS:
        start = time.perf_counter()
        model = load_weights(create_model(name), args.weights_dir / file)
        acc = accuracy(model, images, labels, mean, std, args.batch_size)
        seconds = time.perf_counter() - start
        passed = abs(acc - reference) <= args.tolerance
        ok &= passed
        macs = count_macs(model, (3, 32, 32))
        rows.append(f"| `{file}` | `{name}` | {macs / 1e6:.2f} | {count_params(model):,} | "
                    f"{reference:.2f} | {acc:.2f} | {acc - reference:+.2f} | "
                    f"{'ok' if passed else 'FAIL'} | {seconds:.0f} |")
        print(rows[-1], flush=True)

    report = "\n".join([
        "# Public CIFAR-10 checkpoints in the cdprune zoo",
        "",
        "Produced by `python benchmarks/check_pretrained.py --weights-dir ../shared/weights/"
        "cifar10 --data-root ../shared/data`.",
        "Each checkpoint is loaded with `cdprune.load_weights` (strict) into the zoo model and "
        f"scored on the 10,000 CIFAR-10 test images (batch {args.batch_size}, no augmentation, "
        "each file's own normalisation). Pass: within "
        f"{args.tolerance} points of the reference accuracy.",
        "",
        f"Machine: {os.cpu_count()}-core {platform.machine()} CPU ({cpu_name()}), "
        f"{args.threads} threads "
        f"(`torch.set_num_threads({args.threads})`), Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.system()}.",
        "",
        "| checkpoint | zoo model | MACs (M) | params | reference acc | measured acc | "
        "diff | result | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Overall: {'all within tolerance' if ok else 'SOME OUTSIDE TOLERANCE'}.",
        "",
    ])
    if args.out is not None:
        atomic_write_text(args.out, report)
    print(f"overall: {'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
