"""The CDP paper's four CIFAR-10 rows, full recipes, concurrently on one GPU.

One prepared command for a GPU machine that cannot see ``../shared``. It starts from the
parts ``bash ../shared/tools/cifar-for-device.sh`` writes into ``.device/`` (cifar-a ...
cifar-d, one tar.gz of ``cifar-10-batches-py`` split in four, and ``weights.tgz``):
joins them, checks the joined archive's md5, unpacks, then runs ``cdprune run -c RECIPE``
for the four rows (ResNet-20 20.76M, ResNet-56 60.02M and 49.84M, VGG-16 103.3M) as
concurrent processes on the one GPU. These networks are launch-bound, so several
processes share the GPU well; each holds its data on the device (cdprune's on-device
batches) and, with ``--compile``, runs a compiled model.

Results are written as they come: every ``--poll`` seconds ``table.md`` and ``table.json``
in ``--out`` (``$OUT`` when set) are rewritten from the runs' metrics, with the final
table once all runs end or ``--time-limit`` passes (runs still going are stopped and shown
as such). Columns: paper MACs of the masked network, physical MACs of the compact network
(from ``cdprune.pruning.compact`` when this cdprune has it, else ``n/a``), final and
best-epoch test accuracy of the masked network, the compact network's accuracy, epochs
run, wall time; the GPU's name, the driver, torch and cdprune versions head the table.

VGG-16 has no pretrained CIFAR checkpoint in ``weights.tgz``: give one with
``--vgg-checkpoint``, else its row trains a randomly initialised VGG-16 and says so (it
is then not the paper's row).

torch-pruning must be importable; where it is not installed, put its wheel (pure Python)
in ``.whl/`` and it is installed into ``--work`` first.

Smoke test on a CPU (one epoch on a few images, the data parts made from a local copy):

    python benchmarks/paper_table_gpu.py --device cpu --epochs 1 --subset 256 \\
        --stats-batches 1 --val-subset 200 --no-compile --out /tmp/paper_table

On the GPU machine, from the repository root, data parts in ``.device/``:

    python3 benchmarks/paper_table_gpu.py --md5 MD5_PRINTED_BY_THE_PACKING_SCRIPT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_NORM = (["0.485", "0.456", "0.406"], ["0.229", "0.224", "0.225"])
# row -> (recipe, checkpoint in weights.tgz or None, its normalisation or None: the recipe's)
ROWS: dict[str, tuple[str, str | None, tuple[list[str], list[str]] | None]] = {
    "resnet20_20M": ("configs/cifar10/resnet20_20M.yaml",
                     "weights/cifar10/resnet20-optionA-akamaster.th", IMAGENET_NORM),
    "resnet56_60M": ("configs/cifar10/resnet56_60M.yaml",
                     "weights/cifar10/resnet56-optionA-akamaster.th", IMAGENET_NORM),
    "resnet56_50M": ("configs/cifar10/resnet56_50M.yaml",
                     "weights/cifar10/resnet56-optionA-akamaster.th", IMAGENET_NORM),
    "vgg16_103M": ("configs/cifar10/vgg16_103M.yaml", None, None),
}
PAPER = {"resnet20_20M": 92.49, "resnet56_60M": 94.63, "resnet56_50M": 94.44,
         "vgg16_103M": 94.87}


def _say(text: str) -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------- data
def md5_of(paths: list[Path]) -> str:
    digest = hashlib.md5()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def unpack(parts_dir: Path, work: Path, expected: str | None) -> tuple[Path, Path]:
    """Join cifar-a..d, check the md5, unpack data and weights under ``work``."""
    data, weights = work / "data", work / "weights"
    if (data / "cifar-10-batches-py" / "test_batch").is_file():
        _say(f"data already unpacked in {data}")
    else:
        parts = [parts_dir / f"cifar-{c}" for c in "abcd"]
        missing = [str(p) for p in parts if not p.is_file()]
        if missing:
            raise SystemExit(f"data parts missing: {', '.join(missing)}; make them with "
                             "`bash ../shared/tools/cifar-for-device.sh` from the repo root")
        expected = expected or _read_md5(parts_dir)
        if not expected:
            raise SystemExit("give --md5 (printed by cifar-for-device.sh) or write it into "
                             f"{parts_dir / 'cifar.md5'}: the joined parts are checked")
        got = md5_of(parts)
        if got != expected:
            raise SystemExit(f"md5 of the joined parts is {got}, expected {expected}: a part "
                             "is missing or damaged; copy the parts again")
        _say(f"md5 of the joined parts: {got} (as expected)")
        joined = work / "cifar.tgz"
        work.mkdir(parents=True, exist_ok=True)
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out)
        data.mkdir(parents=True, exist_ok=True)
        with tarfile.open(joined) as tar:
            tar.extractall(data, filter="data")
        joined.unlink()
    if not weights.is_dir() and (parts_dir / "weights.tgz").is_file():
        with tarfile.open(parts_dir / "weights.tgz") as tar:
            tar.extractall(work, filter="data")
    return data, work


def _read_md5(parts_dir: Path) -> str | None:
    path = parts_dir / "cifar.md5"
    return path.read_text().split()[0] if path.is_file() else None


def ensure_torch_pruning(work: Path) -> dict[str, str]:
    """The environment for the runs: cdprune from this checkout, torch-pruning importable."""
    env = dict(os.environ)
    paths = [str(ROOT / "src")]
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        wheels = sorted((ROOT / ".whl").glob("torch_pruning-*.whl"))
        if not wheels:
            raise SystemExit("torch-pruning is not installed and no wheel is in .whl/; "
                             "download one where pip works (see benchmarks/README.md)") from None
        site = work / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                        "--no-deps", "--target", str(site), *map(str, wheels)], check=True)
        paths.append(str(site))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# ------------------------------------------------------------------------- runs
def command(args: argparse.Namespace, row: str, data: Path, work: Path) -> list[str]:
    recipe, checkpoint, norm = ROWS[row]
    cmd = [sys.executable, "-m", "cdprune.cli", "run", "-c", str(ROOT / recipe),
           "--data-root", str(data), "--output-dir", str(work / "runs" / row), "--overwrite",
           "--device", args.device, "--no-progress", "-j", "0"]
    ckpt = args.vgg_checkpoint if row.startswith("vgg") else (
        work / checkpoint if checkpoint else None)
    if ckpt:
        cmd += ["--checkpoint", str(ckpt)]
        if norm:
            cmd += ["--mean", *norm[0], "--std", *norm[1]]
    else:
        cmd += ["--random-init"]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    if args.subset:
        cmd += ["--train-subset", str(args.subset)]
    if args.val_subset:
        cmd += ["--val-subset", str(args.val_subset)]
    if args.stats_batches:
        cmd += ["--stop-batch", str(args.stats_batches)]
    if args.compile:
        cmd += ["--compile"]
    if args.amp:
        cmd += ["--amp"]
    return cmd


def versions(device: str) -> dict[str, str]:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from cdprune.version import __version__

    info = {"torch": torch.__version__, "cdprune": __version__,
            "python": platform.python_version(), "gpu": "none", "driver": "n/a"}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    else:
        from cdprune.measure.latency import cpu_model

        info["gpu"] = f"none (CPU: {cpu_model()})"
    return info


def compaction() -> Any:
    """cdprune's compaction function when this version has one, else None (the table then
    says n/a; nothing is estimated in its place)."""
    import cdprune.pruning as pruning

    fn = getattr(pruning, "compact", None)
    return fn if callable(fn) else None


def compact_numbers(run: Path, data: Path) -> dict[str, Any] | None:
    """MACs and accuracy of the compact network of a finished masked run, or None."""
    fn = compaction()
    report = json.loads((run / "report.json").read_text())
    if fn is None or not report.get("removed_filters"):
        return None
    from cdprune.data import build_dataset, build_loader
    from cdprune.measure.evaluate import evaluate
    from cdprune.measure.macs import count_macs
    from cdprune.runs.locate import load_run_model

    model = load_run_model(run, "final")
    out = fn(model.eval(), report["removed_filters"], input_size=(3, 32, 32))
    small = out[0] if isinstance(out, tuple) else out
    cfg = report["config"]
    test = build_dataset("cifar10", data, train=False, mean=cfg.get("mean"),
                         std=cfg.get("std"))
    device = "cuda" if cfg.get("device", "").startswith("cuda") else "cpu"
    acc = evaluate(small.to(device), build_loader(test, 1000, shuffle=False),
                   device=device, progress=False).top1
    return {"macs": count_macs(small, input_size=(3, 32, 32)), "acc": acc}


def row_state(row: str, work: Path, proc: subprocess.Popen | None, started: float,
              ended: float | None, data: Path, final: bool) -> dict[str, Any]:
    run = work / "runs" / row
    state: dict[str, Any] = {"row": row, "paper_top1": PAPER[row], "epochs": 0,
                             "status": "running" if proc and proc.poll() is None else
                             ("done" if proc and proc.returncode == 0 else
                              f"failed (exit {proc.returncode})" if proc else "not started"),
                             "wall_s": round((ended or time.time()) - started, 1)}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        history = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        accs = [h["val_top1"] for h in history if h.get("val_top1") is not None]
        state.update(epochs=len(history), last_top1=accs[-1] if accs else None,
                     best_top1=max(accs) if accs else None,
                     train_s_per_epoch=round(sum(h["train_time"] for h in history)
                                             / len(history), 2) if history else None)
    summary = run / "prune_summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        state.update(macs_paper=s.get("macs_paper_after"), macs_runs=s.get("macs_after"),
                     macs_channel_cut=s.get("macs_channel_cut"),
                     sparsity=s.get("published_sparsity"), masked=s.get("removed_filters"),
                     acc_base=s.get("acc_base"))
    if final and state["status"] == "done" and (run / "report.json").is_file():
        try:
            state["compact"] = compact_numbers(run, data)
        except Exception as exc:  # reported in the table, never hidden
            state["compact"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    return state


def _m(value: Any) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}M"


def _a(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_table(out: Path, states: list[dict[str, Any]], info: dict[str, Any]) -> str:
    have = compaction() is not None
    lines = ["# CDP paper table, CIFAR-10, masked network (published selection)", "",
             f"GPU: {info['gpu']}; driver {info['driver']}; torch {info['torch']}; cdprune "
             f"{info['cdprune']}; Python {info['python']}. Started {info['started']}, "
             f"{info['elapsed_s']:.0f} s so far{' (final)' if info.get('final') else ''}. "
             f"Options: {info['options']}.", "",
             "| row | status | epochs | paper MACs | compact MACs | masked final | masked best "
             "(test) | compact acc | paper top-1 | base | sparsity | s/epoch (train) | wall |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in states:
        compact = s.get("compact")
        if not have:
            cm, ca = "n/a (no compaction in this cdprune)", "n/a"
        elif compact is None:
            cm, ca = "-", "-"
        elif "error" in compact:
            cm, ca = f"error: {compact['error']}", "-"
        else:
            cm, ca = _m(compact["macs"]), _a(compact["acc"])
        lines.append(f"| {s['row']} | {s['status']} | {s['epochs']} | {_m(s.get('macs_paper'))} "
                     f"| {cm} | {_a(s.get('last_top1'))} | {_a(s.get('best_top1'))} | {ca} | "
                     f"{s['paper_top1']} | {_a(s.get('acc_base'))} | {s.get('sparsity', '-')} | "
                     f"{s.get('train_s_per_epoch', '-')} | {s['wall_s']:.0f} s |")
    if any(s["row"].startswith("vgg") and "random-init" in info["options"] for s in states):
        lines += ["", "VGG-16 trained from a random initialisation (no pretrained checkpoint "
                  "given): not the paper's row."]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps({"info": info, "rows": states}, indent=1,
                                               default=str) + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=Path, default=ROOT / ".device",
                        help="folder with cifar-a..d and weights.tgz")
    parser.add_argument("--md5", help="md5 of the joined parts (else .device/cifar.md5)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/paper_table"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or
                                                         ROOT / "runs" / "paper_table_gpu"))
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=None,
                        help="smoke test: epochs per row (default: the recipe's 300)")
    parser.add_argument("--subset", type=int, default=None,
                        help="smoke test: fine-tune on this many training images")
    parser.add_argument("--val-subset", type=int, default=None,
                        help="smoke test: evaluate on this many test images")
    parser.add_argument("--stats-batches", type=int, default=None,
                        help="smoke test: statistics batches (default: the recipe's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile each model (default: on CUDA)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 mixed precision (default: on CUDA; the projection in "
                        "benchmarks/README.md needs it to fit 10 minutes)")
    parser.add_argument("--vgg-checkpoint", type=Path, default=None)
    parser.add_argument("--poll", type=float, default=20.0)
    parser.add_argument("--time-limit", type=float, default=570.0,
                        help="stop the runs after this many seconds (the table says so)")
    args = parser.parse_args(argv)
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    if args.amp is None:
        args.amp = args.device.startswith("cuda")
    started = time.time()
    data, work = unpack(args.parts, args.work, args.md5)
    env = ensure_torch_pruning(work)
    sys.path[:0] = [p for p in env["PYTHONPATH"].split(os.pathsep) if p]
    info = versions(args.device) | {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "options": (" ".join(a for a in (argv if argv is not None else sys.argv[1:])
                             if not a.startswith("/")) or "defaults (full recipes)")
        + f" [compile {'on' if args.compile else 'off'}, amp {'on' if args.amp else 'off'}]"}
    if not args.vgg_checkpoint and "vgg16_103M" in args.rows:
        info["options"] += " (vgg16: random-init)"
    procs: dict[str, subprocess.Popen] = {}
    ended: dict[str, float] = {}
    logs = {}
    args.out.mkdir(parents=True, exist_ok=True)
    for row in args.rows:
        cmd = command(args, row, data, work)
        logs[row] = open(args.out / f"{row}.log", "w")  # noqa: SIM115 - closed below
        _say(f"{row}: {' '.join(cmd)}")
        procs[row] = subprocess.Popen(cmd, stdout=logs[row], stderr=subprocess.STDOUT,
                                      env=env, cwd=ROOT, start_new_session=True)
    try:
        while True:
            for row, proc in procs.items():
                if proc.poll() is not None and row not in ended:
                    ended[row] = time.time()
                    _say(f"{row}: exit {proc.returncode} after {ended[row] - started:.0f} s")
            running = [r for r, p in procs.items() if p.poll() is None]
            over = time.time() - started > args.time_limit
            if over and running:
                for row in running:
                    os.killpg(procs[row].pid, signal.SIGTERM)
                    _say(f"{row}: stopped at the time limit")
                time.sleep(2)
            final = not running or over
            info["elapsed_s"] = time.time() - started
            info["final"] = final
            states = [row_state(r, work, procs[r], started, ended.get(r), data, final)
                      for r in args.rows]
            if over:
                for s in states:
                    if s["status"].startswith("failed") and s["row"] in running:
                        s["status"] = "stopped at the time limit"
            text = write_table(args.out, states, info)
            if final:
                _say(text)
                break
            time.sleep(args.poll)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for fh in logs.values():
            fh.close()
    return 0 if all(p.returncode == 0 for p in procs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
