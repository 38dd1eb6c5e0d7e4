"""Reliability: bad input, killed processes, full disks, concurrent runs, determinism.

Every bad-input case lives in ``CASES`` below. The same list drives the tests and renders
the Troubleshooting table of README.md (see ``render_troubleshooting`` and
``tools/gen_troubleshooting.py``), so the table cannot drift from what the code does.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from cdprune import checkpoint, fileio
from cdprune.cli import main
from cdprune.errors import CdpruneError, CheckpointError
from cdprune.models import create_model

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
START, END = "<!-- troubleshooting:start -->", "<!-- troubleshooting:end -->"

DATA = ("--dataset", "digits", "-b", "64", "-j", "0", "--no-progress")
BASE = ("--model", "digits_cnn", "--checkpoint", "{assets}/good.pth", *DATA)
OUT = ("--output-dir", "{out}")
STATS = ("--stats", "{assets}/stats.safetensors")
FAST_STATS = ("--stop-batch", "2", "--stats-batch-size", "64")
TUNE = ("--train-subset", "256", "--lr", "0.05")
CIFAR_FIX = "Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


# ============================================================================ the cases
@dataclass(frozen=True)
class Case:
    """One kind of bad input and what cdprune must say about it.

    Attributes:
        id: test id.
        area: README sub-table (numbers, files, data, models).
        problem: what the user did (first README column, Markdown).
        says: words of the message that name the problem.
        fix: words of the same message that say how to fix it.
        argv: the CLI call ({tmp}, {assets}, {out} are filled in); empty for a case that
            only the Python API can reach.
        setup: makes the bad files in the test's tmp folder.
        library: for API-only cases: does the call that must raise.
        exit_code: 2 for errors; 0 for a problem cdprune works around with a warning.
        never: words the message must not contain (advice that would be unsafe).
    """

    id: str
    area: str
    problem: str
    says: tuple[str, ...]
    fix: str
    argv: tuple[str, ...] = ()
    setup: Callable[[Path, Path], None] | None = None
    library: Callable[[Path, Path], None] | None = None
    exit_code: int = 2
    never: tuple[str, ...] = ()


class _Payload:
    """Unpickling this runs a shell command that creates ``pwned`` (a live code payload)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _good_state(num_classes: int = 10) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("digits_cnn", num_classes=num_classes).state_dict()


def _empty_ckpt(tmp: Path, assets: Path) -> None:
    (tmp / "empty.pth").write_bytes(b"")


def _truncated_ckpt(tmp: Path, assets: Path) -> None:
    raw = (assets / "good.pth").read_bytes()
    (tmp / "truncated.pth").write_bytes(raw[: len(raw) // 2])


def _text_ckpt(tmp: Path, assets: Path) -> None:
    (tmp / "notes.pth").write_text("these are my notes, not weights\n")


def _payload_ckpt(tmp: Path, assets: Path) -> None:
    torch.save({"state_dict": _good_state(), "trainer": _Payload(tmp / "pwned")},
               tmp / "evil.pth")


def _mismatched_ckpt(tmp: Path, assets: Path) -> None:
    state = _good_state()
    del state["conv3.weight"]
    state["conv1.weight"] = torch.zeros(8, 1, 3, 3)
    state["head.bias"] = torch.zeros(10)
    torch.save(state, tmp / "mismatch.pth")


def _five_class_ckpt(tmp: Path, assets: Path) -> None:
    torch.save(_good_state(num_classes=5), tmp / "five.pth")


def _nan_ckpt(tmp: Path, assets: Path) -> None:
    state = _good_state()
    state["conv2.weight"].fill_(float("nan"))
    torch.save(state, tmp / "nan.pth")


def _truncated_stats(tmp: Path, assets: Path) -> None:
    raw = (assets / "stats.safetensors").read_bytes()
    (tmp / "stats.safetensors").write_bytes(raw[: len(raw) // 2])


def _foreign_stats(tmp: Path, assets: Path) -> None:
    from cdprune.importance.stats import collect_stats

    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    batches = [(torch.randn(8, 3, 8, 8), torch.arange(8) % 4)]
    collect_stats(model, batches, progress=False).save(tmp / "tiny_cnn.safetensors")


def _edit_plan(tmp: Path, assets: Path, name: str, edit: Callable[[Path], None]) -> None:
    shutil.copytree(assets / "pruned", tmp / name)
    edit(tmp / name / "plan.json")


def _foreign_plan(tmp: Path, assets: Path) -> None:
    def edit(path: Path) -> None:
        plan = json.loads(path.read_text())
        plan["steps"][0]["module"] = "layer1.0.conv1"  # a ResNet layer digits_cnn lacks
        path.write_text(json.dumps(plan))

    _edit_plan(tmp, assets, "foreign", edit)


def _corrupt_plan(tmp: Path, assets: Path) -> None:
    _edit_plan(tmp, assets, "corrupt", lambda p: p.write_text('{"format": "cdprune.plan/1", '))


def _nan_config(tmp: Path, assets: Path) -> None:
    (tmp / "config.yaml").write_text("model: digits_cnn\ndataset: digits\ncoe: .nan\n")


def _cifar(tmp: Path, assets: Path, test_batch: int | None) -> None:
    folder = tmp / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes(b"\0" * 158)
    if test_batch is not None:
        (folder / "test_batch").write_bytes(b"\0" * test_batch)


def _empty_class(tmp: Path, assets: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for name in ("cat", "dog"):
            folder = tmp / "imagenet" / split / name
            folder.mkdir(parents=True)
            if split == "val" or name == "cat":  # train/dog stays empty
                Image.new("RGB", (4, 4)).save(folder / "0.png")


def _three_class_folders(tmp: Path, assets: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for name in ("ant", "bee", "fly"):
            folder = tmp / "insects" / split / name
            folder.mkdir(parents=True)
            Image.new("RGB", (16, 16)).save(folder / "0.png")
    torch.manual_seed(0)
    torch.save(create_model("tiny_cnn", num_classes=3).state_dict(), tmp / "three.pth")


def _weights_beside(tmp: Path, assets: Path) -> None:
    shutil.copy(assets / "good.pth", tmp / "best.pth")


def _no_conv(tmp: Path, assets: Path) -> None:
    from cdprune.importance.stats import collect_stats

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    collect_stats(mlp, [torch.randn(4, 1, 8, 8)], progress=False)


def _yaml(text: str | bytes) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, assets: Path) -> None:
        path = tmp / "y.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


# 324 bytes of nested YAML aliases: expanded, 9**9 strings ("billion laughs").
ALIAS_BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def _numpy_ckpt(tmp: Path, assets: Path) -> None:
    import numpy as np

    torch.save({"state_dict": _good_state(), "mean": np.zeros(3)}, tmp / "numpy.pth")


def _int_keys_ckpt(tmp: Path, assets: Path) -> None:
    torch.save({i: v for i, v in enumerate(_good_state().values())}, tmp / "intkeys.pth")


def _rewrite_stats(tmp: Path, assets: Path, edit: Callable[[dict, dict], None]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(assets / "stats.safetensors"), framework="pt") as fh:
        header = json.loads(fh.metadata()["cdprune"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    edit(header, tensors)
    save_file(tensors, str(tmp / "stats.safetensors"), metadata={"cdprune": json.dumps(header)})


def _stats_no_layers(tmp: Path, assets: Path) -> None:
    _rewrite_stats(tmp, assets, lambda header, tensors: header.pop("layers"))


def _stats_bad_class_tensors(tmp: Path, assets: Path) -> None:
    def edit(header: dict, tensors: dict) -> None:
        total = sum(header["channels"])
        header["documents"] = "class"
        tensors.clear()
        tensors["class_sums"] = torch.ones(10, total, dtype=torch.float64)
        tensors["class_counts"] = torch.ones(10, 2)  # must be one integer count per class

    _rewrite_stats(tmp, assets, edit)


def _reduced_stats(tmp: Path, assets: Path, tf_value: float | None = None,
                   num_samples: int | None = None) -> None:
    """The multi-process (reduced) form of the statistics, with one value spoilt."""
    from cdprune.importance.activations import ActivationStats

    stats = ActivationStats.load(assets / "stats.safetensors")
    reduced = {}
    for layer in stats.layers:
        _, df, tf_sum = stats.sufficient(layer)
        reduced[layer] = (df, tf_sum.clone())
    if tf_value is not None:
        reduced[stats.layers[-1]][1][0] = tf_value
    stats.reduced, stats.features = reduced, None
    if num_samples is not None:
        stats.num_samples = num_samples
    stats.save(tmp / "stats.safetensors")


def _plan_json(text: str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, assets: Path) -> None:
        def edit(path: Path) -> None:
            plan = json.loads(path.read_text())
            path.write_text(text.replace("STEPS", json.dumps(plan["steps"])))

        _edit_plan(tmp, assets, "bad", edit)
    return setup


def _plan_field(**fields) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, assets: Path) -> None:
        def edit(path: Path) -> None:
            path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))

        _edit_plan(tmp, assets, "bad", edit)
    return setup


def _plan_extra(**fields) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, assets: Path) -> None:
        def edit(path: Path) -> None:
            plan = json.loads(path.read_text())
            plan["extra"].update(fields)
            path.write_text(json.dumps(plan))

        _edit_plan(tmp, assets, "bad", edit)
    return setup


def _int8_ckpt(tmp: Path, assets: Path) -> None:
    state = _good_state()
    state["conv1.weight"] = (state["conv1.weight"] * 100).to(torch.int8)
    torch.save(state, tmp / "int8.pth")


def _dangling_link(tmp: Path, assets: Path) -> None:
    (tmp / "out").symlink_to(tmp / "nowhere")


def _looping_link(tmp: Path, assets: Path) -> None:
    (tmp / "out").symlink_to(tmp / "out")


BAD_PLAN = ("finetune", *DATA, "--model-dir", "{tmp}/bad", "--epochs", "1", *OUT)
PRUNE_WITH = ("prune", *BASE, "--stats", "{tmp}/stats.safetensors", "--sparsity", "0.3", *OUT)
RUN = ("run", *BASE, *FAST_STATS, "--epochs", "1")

CASES: list[Case] = [
    # ------------------------------------------------------------------ numbers
    Case("sparsity-zero", "numbers", "`--sparsity 0` (or below)",
         ("--sparsity 0.0 is invalid",), "it must be a fraction in (0, 1)",
         ("prune", *BASE, *STATS, "--sparsity", "0", *OUT)),
    Case("sparsity-one", "numbers", "`--sparsity 1` (or above)",
         ("--sparsity 1.0 is invalid",), "it must be a fraction in (0, 1)",
         ("prune", *BASE, *STATS, "--sparsity", "1", *OUT)),
    Case("macs-negative", "numbers", "`--macs-reduction -0.5` (0 or below)",
         ("--macs-reduction -0.5 is invalid",), "it must be a fraction in (0, 1)",
         ("prune", *BASE, *STATS, "--macs-reduction", "-0.5", *OUT)),
    Case("macs-above-one", "numbers", "`--macs-reduction 1.5` (1 or above)",
         ("--macs-reduction 1.5 is invalid",), "it must be a fraction in (0, 1)",
         ("prune", *BASE, *STATS, "--macs-reduction", "1.5", *OUT)),
    Case("both-targets", "numbers", "both `--sparsity` and `--macs-reduction`",
         ("--macs-reduction: not allowed with argument --sparsity",), "give only one of them",
         ("prune", *BASE, *STATS, "--sparsity", "0.3", "--macs-reduction", "0.5", *OUT)),
    Case("no-target", "numbers", "none of `--sparsity`, `--macs-reduction`, `--macs-target`, "
         "`--latency-reduction`",
         ("--sparsity, --macs-reduction, --macs-target or --latency-reduction",),
         "give exactly one of",
         ("prune", *BASE, *STATS, *OUT)),
    Case("latency-above-one", "numbers", "`--latency-reduction 1.5` (1 or above)",
         ("--latency-reduction 1.5 is invalid",), "it must be a fraction in (0, 1)",
         ("prune", *BASE, *STATS, "--latency-reduction", "1.5", *OUT)),
    Case("unreachable-macs", "numbers",
         "a MACs target the constraints cannot reach (`--macs-reduction 0.9 "
         "--max-layer-pruning 0.5`)",
         ("MACs reduction of 0.9 is unreachable", "at most"),
         "lower the target or raise max_layer_pruning",
         ("run", *BASE, *FAST_STATS, "--macs-reduction", "0.9", "--max-layer-pruning", "0.5",
          "--epochs", "1", *OUT)),
    Case("stop-batch-zero", "numbers", "`--stop-batch 0`",
         ("--stop-batch 0 is invalid",), "it must be a positive number of batches",
         ("stats", *BASE, "--stop-batch", "0", *OUT)),
    Case("stop-batch-negative", "numbers", "`--stop-batch -3`",
         ("--stop-batch -3 is invalid",), "it must be a positive number of batches",
         ("stats", *BASE, "--stop-batch", "-3", *OUT)),
    Case("batch-size-zero", "numbers", "`-b 0`",
         ("-b/--batch-size", "got 0"), "must be a positive integer",
         ("stats", *BASE, "-b", "0", *OUT)),
    Case("epochs-negative", "numbers", "`--epochs -2`",
         ("--epochs -2 is invalid",), "it must be 0 or more",
         ("finetune", *DATA, "--model-dir", "{assets}/pruned", "--epochs", "-2", *OUT)),
    Case("coe-negative", "numbers", "`--coe -1`",
         ("--coe -1.0 is invalid",), "it must be 0 (no balancing) or a positive number",
         ("stats", *BASE, "--coe", "-1", *OUT)),
    Case("coe-reverses-ranking", "numbers", "`--coe` at or above e x the narrowest layer's "
         "width (`--coe 100`: the balance factor would turn negative and keep the least "
         "discriminative filters)",
         ("--coe 100 is invalid", "layer 'conv1' (16 channels) the balance factor "
                                  "ln(16/100) + 1 = -0.833"),
         "give a --coe below e x 16 = 43.49", ("stats", *BASE, "--coe", "100", *OUT)),
    Case("variant-with-explicit-options", "numbers", "`--variant published` with explicit "
         "options it would replace (`--tap act --documents class`)",
         ("--variant published sets every CDP option", "--tap act, --documents class were "
                                                       "given too"),
         "drop --variant published to use them, or drop them",
         ("stats", *BASE, "--variant", "published", "--tap", "act", "--documents", "class",
          *OUT)),
    Case("workers-beyond-the-machine", "numbers", "`-j 99999999999999999999` (more loader "
         "workers than CPUs)", ("--workers 99999999999999999999 is invalid",),
         "the CPUs this process may use",
         ("stats", "--model", "digits_cnn", "--checkpoint", "{assets}/good.pth", "--dataset",
          "digits", "-j", "99999999999999999999", "--no-progress", *OUT)),
    Case("resume-with-overwrite", "numbers", "`--resume` together with `--overwrite`",
         ("--resume and --overwrite exclude each other",), "give one of them",
         ("finetune", *DATA, "--model-dir", "{assets}/pruned", "--epochs", "1", "--resume",
          "--overwrite", *OUT)),
    Case("yaml-duplicate-key", "numbers", "a key given twice in a YAML config (`lr: 0.02` ... "
         "`lr: 5`)", ("y.yaml' sets 'lr' twice (lines 1 and 2)",), "keep one",
         ("stats", "-c", "{tmp}/y.yaml", *BASE, *OUT), setup=_yaml("lr: 0.02\nlr: 5\n")),
    Case("nan-in-config", "numbers", "`.nan` in a YAML config (`coe: .nan`)",
         ("config.yaml': coe is nan",), "give a finite number",
         ("stats", "-c", "{tmp}/config.yaml", "--checkpoint", "{assets}/good.pth", *DATA, *OUT),
         setup=_nan_config),
    Case("round-to-too-wide", "numbers", "`--round-to` at least as wide as the widest layer "
         "(nothing could be removed)", ("--round-to 64 removes nothing", "conv2) has 32 "
                                        "channels"), "give a --round-to below 32",
         (*RUN, "--sparsity", "0.3", "--round-to", "64", *OUT)),
    Case("max-layer-pruning-zero", "numbers", "`--max-layer-pruning 0` (no layer could lose "
         "a filter)", ("--max-layer-pruning 0.0 is invalid",), "a fraction in (0, 1]",
         (*RUN, "--sparsity", "0.3", "--max-layer-pruning", "0", *OUT)),
    Case("seed-negative", "numbers", "`--seed -1`", ("--seed -1 is invalid",),
         "an integer from 0 to 4294967295", (*RUN, "--sparsity", "0.3", "--seed", "-1", *OUT)),
    Case("seed-overflow", "numbers", "a seed too large for the random generators",
         ("--seed 99999999999999999999 is invalid",), "an integer from 0 to 4294967295",
         (*RUN, "--sparsity", "0.3", "--seed", "99999999999999999999", *OUT)),
    Case("momentum-zero", "numbers", "`--momentum 0`", ("--momentum 0.0 is invalid",),
         "fine-tuning uses Nesterov momentum", (*RUN, "--sparsity", "0.3", "--momentum", "0",
                                                *OUT)),
    Case("lr-huge", "numbers", "an absurd learning rate (`--lr 1e30`)",
         ("--lr 1e+30 is invalid",), "a positive number up to 10",
         (*RUN, "--sparsity", "0.3", "--lr", "1e30", *OUT)),
    Case("warmup-longer-than-training", "numbers", "`--lr-warmup-epochs` above `--epochs`",
         ("--lr-warmup-epochs 5.0 is invalid",), "no longer than the training (epochs=1)",
         (*RUN, "--sparsity", "0.3", "--lr-warmup-epochs", "5", *OUT)),
    Case("device-unknown", "numbers", "`--device mps` (also xpu, meta, hpu...)",
         ("--device 'mps' is not supported",), "use cpu, cuda or cuda:N",
         (*RUN, "--sparsity", "0.3", "--device", "mps", *OUT)),
    Case("mean-channels", "numbers", "`--mean`/`--std` with another number of values than "
         "the data has channels", ("--mean has 3 values", "dataset 'digits' has 1 input "
                                   "channel"), "give 1 value",
         (*RUN, "--sparsity", "0.3", "--mean", "0.1", "0.2", "0.3", *OUT)),
    Case("yaml-quoted-bool", "numbers", "a quoted boolean in a YAML config "
         "(`overwrite: \"false\"`)",
         ("y.yaml': overwrite must be true or false, got the string 'false'",),
         "write it without quotes", ("stats", "-c", "{tmp}/y.yaml", *BASE, *OUT),
         setup=_yaml('overwrite: "false"\n')),
    Case("yaml-wrong-type", "numbers", "a YAML value of the wrong type (`seed: [1, 2]`)",
         ("y.yaml': seed must be an integer, got a list",), "seed must be an integer",
         ("stats", "-c", "{tmp}/y.yaml", *BASE, *OUT), setup=_yaml("seed: [1, 2]\n")),
    Case("yaml-alias-bomb", "numbers", "a YAML file of nested aliases (\"billion laughs\")",
         ("y.yaml' uses 72 YAML aliases",), "write the values out",
         ("stats", "-c", "{tmp}/y.yaml", *BASE, *OUT), setup=_yaml(ALIAS_BOMB)),
    Case("yaml-not-utf8", "numbers", "a YAML config that is not UTF-8",
         ("y.yaml' is not UTF-8 text",), "save it as UTF-8",
         ("stats", "-c", "{tmp}/y.yaml", *BASE, *OUT), setup=_yaml(b"model: caf\xe9\n")),
    # ------------------------------------------------------------------ files
    Case("checkpoint-numpy", "files", "a checkpoint holding numpy arrays (pickled objects)",
         ("refused to load", "Unsupported global", "numpy"),
         "re-save the weights as a plain state_dict or .safetensors",
         ("stats", "--model", "digits_cnn", "--checkpoint", "{tmp}/numpy.pth", *DATA, *OUT),
         setup=_numpy_ckpt, never=("weights_only", "False")),
    Case("checkpoint-int-keys", "files", "a `.pth` whose keys are not parameter names",
         ("intkeys.pth' is not a state dict: key 0 (int) is not a parameter name",),
         "re-save the weights with model.state_dict()",
         ("stats", "--model", "digits_cnn", "--checkpoint", "{tmp}/intkeys.pth", *DATA, *OUT),
         setup=_int_keys_ckpt),
    Case("stats-no-layers", "files", "statistics file without its `layers` field",
         ("stats.safetensors' is malformed ('layers' must be",),
         "collect the statistics again with", PRUNE_WITH, setup=_stats_no_layers),
    Case("stats-bad-class-tensors", "files", "statistics file with malformed class tensors",
         ("stats.safetensors' is inconsistent",), "collect the statistics again", PRUNE_WITH,
         setup=_stats_bad_class_tensors),
    Case("stats-reduced-nan", "files", "multi-process statistics holding NaN",
         ("stats.safetensors' holds NaN or infinite values",), "collect the statistics again",
         PRUNE_WITH, setup=lambda tmp, assets: _reduced_stats(tmp, assets, float("nan"))),
    Case("stats-reduced-no-images", "files", "multi-process statistics of 0 images",
         ("'num_samples' must be a positive integer, got 0",),
         "collect the statistics again with", PRUNE_WITH,
         setup=lambda tmp, assets: _reduced_stats(tmp, assets, num_samples=0)),
    Case("plan-step-not-mapping", "files", "`plan.json` with malformed steps (`[\"x\"]`)",
         ("plan.json' is malformed (step 0 is a str",), "the file is corrupt, prune again",
         BAD_PLAN, setup=_plan_field(steps=["x"])),
    Case("plan-extra-not-mapping", "files", "`plan.json` whose `extra` is not a mapping",
         ("plan.json' is malformed (extra must be a mapping",),
         "the file is corrupt, prune again", BAD_PLAN, setup=_plan_field(extra="str")),
    Case("plan-bad-input-size", "files", "`plan.json` with a bad `input_size`",
         ("plan.json' is malformed (input_size must be a list",),
         "the file is corrupt, prune again", BAD_PLAN, setup=_plan_field(input_size=[0, -8])),
    Case("plan-negative-classes", "files", "`plan.json` with a negative number of classes",
         ("extra.num_classes must be a positive integer, got -1",),
         "the file is corrupt, prune again", BAD_PLAN,
         setup=_plan_field(extra={"dataset": "digits", "num_classes": -1})),
    Case("plan-deep-nesting", "files", "`plan.json` nested 200,000 levels deep",
         ("plan.json' is nested too deeply",), "the file is corrupt, prune again", BAD_PLAN,
         setup=_plan_json('{"format": "cdprune.plan/1", "steps": STEPS, "extra": '
                          + "[" * 200_000 + "]" * 200_000 + "}")),
    Case("output-dir-dangling-link", "files", "`--output-dir` is a broken symbolic link",
         ("is a broken or looping symbolic link",), "choose another --output-dir",
         (*RUN, "--sparsity", "0.3", *OUT), setup=_dangling_link),
    Case("output-dir-looping-link", "files", "`--output-dir` is a symbolic link to itself",
         ("is a broken or looping symbolic link",), "choose another --output-dir",
         (*RUN, "--sparsity", "0.3", *OUT), setup=_looping_link),
    Case("output-dir-not-utf8", "files", "`--output-dir` that is not valid UTF-8",
         ("--output-dir", "is not valid UTF-8",), "rename it with UTF-8 characters only",
         (*RUN, "--sparsity", "0.3", "--output-dir", "{tmp}/run\udcff")),
    Case("export-suffix", "files", "`export --output` naming a file of another format "
         "(`run/best.pth`)", ("--output", "best.pth' is a weights file name",),
         "choose a name ending in .onnx",
         ("export", "--model-dir", "{assets}/pruned", "--output", "{tmp}/best.pth")),
    Case("checkpoint-missing", "files", "`--checkpoint` file missing",
         ("missing.pth' does not exist",), "check the path",
         ("stats", "--model", "digits_cnn", "--checkpoint", "{tmp}/missing.pth", *DATA, *OUT)),
    Case("checkpoint-not-given", "files", "no `--checkpoint` for `stats`, `prune`, `run` or "
         "`compare` (random weights are never pruned silently)",
         ("--checkpoint is missing",), "pass --checkpoint FILE, or --random-init",
         ("stats", "--model", "digits_cnn", *DATA, *OUT)),
    Case("checkpoint-empty", "files", "empty checkpoint (0 bytes)",
         ("is empty (0 bytes)",), "re-download or re-save it",
         ("stats", "--model", "digits_cnn", "--checkpoint", "{tmp}/empty.pth", *DATA, *OUT),
         setup=_empty_ckpt),
    Case("checkpoint-truncated", "files", "truncated checkpoint (an interrupted download)",
         ("truncated or not a PyTorch checkpoint",), "re-download or re-save it",
         ("stats", "--model", "digits_cnn", "--checkpoint", "{tmp}/truncated.pth", *DATA, *OUT),
         setup=_truncated_ckpt),
    Case("checkpoint-not-weights", "files", "a file that is not a checkpoint",
         ("truncated or not a PyTorch checkpoint",), "re-download or re-save it",
         ("stats", "--model", "digits_cnn", "--checkpoint", "{tmp}/notes.pth", *DATA, *OUT),
         setup=_text_ckpt),
    Case("checkpoint-code-payload", "files",
         "a checkpoint carrying a pickled code payload (it is never run)",
         ("refused to load", "could run code", "nothing in it was run"),
         "re-save the weights as a plain state_dict or .safetensors",
         ("stats", "--model", "digits_cnn", "--checkpoint", "{tmp}/evil.pth", *DATA, *OUT),
         setup=_payload_ckpt),
    Case("checkpoint-mismatch", "files", "checkpoint keys or shapes that do not fit `--model`",
         ("missing keys (1): conv3.weight", "unexpected keys (1): head.bias",
          "shape mismatches (1): conv1.weight: file (8, 1, 3, 3) vs model (16, 1, 3, 3)"),
         "check the model name and that the dataset has the checkpoint's number of classes",
         ("stats", "--model", "digits_cnn", "--checkpoint", "{tmp}/mismatch.pth", *DATA, *OUT),
         setup=_mismatched_ckpt),
    Case("stats-truncated", "files", "truncated statistics file (`--stats`)",
         ("cannot read statistics file", "truncated"), "collect the statistics again with",
         ("prune", *BASE, "--stats", "{tmp}/stats.safetensors", "--sparsity", "0.3", *OUT),
         setup=_truncated_stats),
    Case("stats-other-model", "files", "statistics collected on another architecture",
         ("statistics come from a different architecture",),
         "collect statistics again with this model",
         ("prune", *BASE, "--stats", "{tmp}/tiny_cnn.safetensors", "--sparsity", "0.3", *OUT),
         setup=_foreign_stats),
    Case("plan-other-model", "files", "`plan.json` made for another architecture",
         ("plan step names module 'layer1.0.conv1', which the base model lacks",),
         "prune digits_cnn again",
         ("finetune", *DATA, "--model-dir", "{tmp}/foreign", "--epochs", "1", *OUT),
         setup=_foreign_plan),
    Case("plan-wrong-model-flag", "files", "`--model` differs from the model `plan.json` was "
         "made from", ("--model tiny_cnn does not match", "(digits_cnn)"),
         "leave out --model or pass --model digits_cnn",
         ("finetune", "--model", "tiny_cnn", *DATA, "--model-dir", "{assets}/pruned",
          "--epochs", "1", *OUT)),
    Case("model-dir-empty", "files", "`--model-dir` holds no model",
         ("holds no model",), "point --model-dir at a directory written by cdprune prune, run "
         "or finetune", ("eval", *DATA, "--model-dir", "{tmp}", )),
    Case("weights-not-finetuned", "files", "`--weights best` (or `last`) where no fine-tuning "
         "ran", ("--weights best", "has no best.pth (fine-tuning did not run there)"),
         "use --weights pruned, or fine-tune first",
         ("eval", *DATA, "--model-dir", "{assets}/pruned", "--weights", "best")),
    Case("checkpoint-into-pruned", "files", "`--checkpoint` with `--model-dir` holding weights "
         "of the unpruned base model", ("do not fit the model",
                                        "--checkpoint must hold weights of the pruned model"),
         "leave out --checkpoint to use the run's own weights",
         ("eval", *DATA, "--model-dir", "{assets}/pruned", "--checkpoint", "{assets}/good.pth")),
    Case("export-over-checkpoint", "files", "`cdprune export --output` naming a weights file",
         ("is a weights file name (.pth)", "never replaces checkpoints"),
         "choose a name ending in .onnx",
         ("export", "--model-dir", "{assets}/pruned", "--output", "{tmp}/best.pth"),
         setup=_weights_beside),
    Case("plan-std-nan", "files", "`plan.json` whose recorded std is NaN (`extra.std: [NaN]`)",
         ("plan.json' is malformed (extra.std holds nan",), "the file is corrupt, prune again",
         ("eval", *DATA, "--model-dir", "{tmp}/bad"), setup=_plan_extra(std=[float("nan")])),
    Case("plan-mean-absurd", "files", "`plan.json` with an absurd mean (`extra.mean: [1e308]`)",
         ("plan.json' is malformed (extra.mean holds 1e+308",),
         "the file is corrupt, prune again",
         ("eval", *DATA, "--model-dir", "{tmp}/bad"), setup=_plan_extra(mean=[1e308])),
    Case("plan-classes-absurd", "files", "`plan.json` with an absurd number of classes",
         ("extra.num_classes must be a positive integer, got 1000000000000 (at most 1000000)",),
         "the file is corrupt, prune again",
         ("eval", *DATA, "--model-dir", "{tmp}/bad"), setup=_plan_extra(num_classes=10**12)),
    Case("plan-input-size-edited", "files", "`plan.json` whose `input_size` was edited "
         "(export and eval would check the model at a resolution it was not pruned for)",
         ("MACs at its recorded input_size [1, 16, 16], but plan.json records",),
         "prune again, or restore plan.json",
         ("export", "--model-dir", "{tmp}/bad"), setup=_plan_field(input_size=[1, 16, 16])),
    Case("checkpoint-int8", "files", "a checkpoint whose weights are int8 or bool (quantised "
         "or damaged; never cast silently)",
         ("stores 'conv1.weight' as torch.int8 but the model's tensor is torch.float32",),
         "Re-save the weights in torch.float32",
         ("stats", "--model", "digits_cnn", "--checkpoint", "{tmp}/int8.pth", *DATA, *OUT),
         setup=_int8_ckpt),
    Case("plan-corrupt", "files", "corrupt `plan.json`",
         ("plan.json' is not valid JSON",), "the file is corrupt, prune again",
         ("finetune", *DATA, "--model-dir", "{tmp}/corrupt", "--epochs", "1", *OUT),
         setup=_corrupt_plan),
    # ------------------------------------------------------------------ data
    Case("data-root-missing", "data", "`--data-root` does not exist",
         ("CIFAR-10 root folder", "does not exist"), CIFAR_FIX,
         ("stats", "--model", "resnet20", "--random-init", "--dataset", "cifar10", "--data-root",
          "{tmp}/nowhere", "-j", "0", "--no-progress", *OUT)),
    Case("cifar-file-missing", "data", "CIFAR folder without one of its batch files",
         ("test_batch is missing",), CIFAR_FIX,
         ("stats", "--model", "resnet20", "--random-init", "--dataset", "cifar10", "--data-root",
          "{tmp}/cifar", "-j", "0", "--no-progress", *OUT),
         setup=lambda tmp, assets: _cifar(tmp, assets, None)),
    Case("cifar-file-short", "data", "CIFAR batch file cut short",
         ("is 1000 bytes but the official file is 31035526 bytes",), CIFAR_FIX,
         ("stats", "--model", "resnet20", "--random-init", "--dataset", "cifar10", "--data-root",
          "{tmp}/cifar", "-j", "0", "--no-progress", *OUT),
         setup=lambda tmp, assets: _cifar(tmp, assets, 1000)),
    Case("imagefolder-empty-class", "data", "ImageFolder class folder without images",
         ("dog holds no images",), "add images or remove the folder",
         ("stats", "--model", "resnet18", "--random-init", "--dataset", "imagenet", "--data-root",
          "{tmp}/imagenet", "-j", "0", "--no-progress", *OUT),
         setup=_empty_class),
    Case("imagenet-fewer-classes", "data", "`--dataset imagenet` with class folders and a "
         "checkpoint of another number of classes than 1000",
         ("has a 3-class classifier", "dataset 'imagenet' has 1000 classes"),
         "for class folders with 3 classes use --dataset folder",
         ("stats", "--model", "tiny_cnn", "--checkpoint", "{tmp}/three.pth", "--dataset",
          "imagenet", "--data-root", "{tmp}/insects", "-j", "0", "--no-progress", *OUT),
         setup=_three_class_folders),
    Case("fewer-batches", "data",
         "`--stop-batch` larger than the training set (a warning; exit code 0)",
         ("--stop-batch 1000 asks for 1000 batches", "has only"), "using all of them",
         ("stats", *BASE, "--stop-batch", "1000", "--stats-batch-size", "64", *OUT),
         exit_code=0),
    Case("class-count", "data", "checkpoint trained for another number of classes than the "
         "dataset has", ("has a 5-class classifier", "dataset 'digits' has 10 classes"),
         "use a checkpoint trained on digits, or the --dataset the checkpoint was trained on",
         ("stats", "--model", "digits_cnn", "--checkpoint", "{tmp}/five.pth", *DATA, *OUT),
         setup=_five_class_ckpt),
    Case("nan-activations", "data", "NaN or inf activations (diverged weights)",
         ("activations of layer 'conv2' contain NaN or inf",),
         "check the checkpoint (diverged weights?) and the input normalisation",
         ("stats", "--model", "digits_cnn", "--checkpoint", "{tmp}/nan.pth", *DATA, *OUT),
         setup=_nan_ckpt),
    Case("few-images", "data", "statistics from very few images (a warning; exit code 0)",
         ("CDP scores from only 4 images",), "a larger stop_batch",
         ("stats", *BASE, "--stop-batch", "1", "--stats-batch-size", "4", *OUT), exit_code=0),
    # ------------------------------------------------------------------ models
    Case("unknown-model", "models", "unknown model name (`--model resnet2O`)",
         ("unknown model 'resnet2O'", "resnet20"), "did you mean",
         ("stats", "--model", "resnet2O", "--random-init", *DATA, *OUT)),
    Case("no-conv2d", "models", "a model without `nn.Conv2d` (Python API: `collect_stats`)",
         ("has no nn.Conv2d layer",), "CDP scores convolution filters",
         library=_no_conv),
    Case("model-input-channels", "models", "a model for RGB images on 1-channel data "
         "(`--model resnet18 --dataset digits`)",
         ("--model resnet18 reads 3-channel images but dataset 'digits' has 1-channel",),
         "choose a model built for this dataset",
         ("stats", "--model", "resnet18", "--random-init", *DATA, *OUT)),
    Case("ignore-layers-unknown", "models", "`--ignore-layers` names a layer the model lacks",
         ("--ignore-layers: 'conv9' is not a layer of digits_cnn",), "did you mean conv3, conv2, conv1?",
         ("run", *BASE, *FAST_STATS, "--macs-reduction", "0.5", "--ignore-layers", "conv9",
          "--epochs", "1", *OUT)),
]

AREAS = {"numbers": "Numbers", "files": "Files", "data": "Data", "models": "Models"}


def render_troubleshooting(cases: list[Case] = CASES) -> str:
    """The README table: one row per case, grouped by area."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines: list[str] = []
    for area, title in AREAS.items():
        lines += ["", f"**{title}**", "",
                  "| Problem | The message names it | and says how to fix it |",
                  "| --- | --- | --- |"]
        for case in (c for c in cases if c.area == area):
            says = " … ".join(f"`{cell(w)}`" for w in case.says)
            lines.append(f"| {cell(case.problem)} | {says} | `{cell(case.fix)}` |")
    return "\n".join(lines[1:]) + "\n"


def readme_section(text: str) -> str:
    """What README.md holds between the troubleshooting markers."""
    if START not in text or END not in text:
        raise AssertionError(f"README.md lacks the markers {START} ... {END}")
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


# ============================================================================ fixtures
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Good inputs shared by the cases: weights, statistics and a pruned model (digits_cnn)."""
    from cdprune.data import build_dataset, build_loader, subset
    from cdprune.importance.scoring import tfidf_scores
    from cdprune.importance.stats import collect_stats
    from cdprune.pruning import prune, save_pruned

    folder = tmp_path_factory.mktemp("assets")
    torch.save(_good_state(), folder / "good.pth")
    model = create_model("digits_cnn")
    model.load_state_dict(_good_state())
    images = subset(build_dataset("digits", train=True), 128, seed=0)
    stats = collect_stats(model, build_loader(images, 64, shuffle=False), progress=False)
    stats.save(folder / "stats.safetensors")
    result = prune(model, tfidf_scores(stats), example_inputs=torch.randn(2, 1, 8, 8),
                   sparsity=0.3, scope="all")
    save_pruned(folder / "pruned", result, model_name="digits_cnn", input_size=(1, 8, 8),
                extra={"dataset": "digits", "num_classes": 10})
    return folder


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def _fill(argv: tuple[str, ...], tmp: Path, assets: Path) -> list[str]:
    return [a.format(tmp=tmp, assets=assets, out=tmp / "out") for a in argv]


# ============================================================================ bad input
def test_case_ids_are_unique_and_complete():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    for case in CASES:
        assert case.area in AREAS and case.says and case.fix
        assert "`" not in "".join((*case.says, case.fix)), "the table quotes them as code"
        assert bool(case.argv) != bool(case.library), case.id


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, tmp_path, assets, capsys, caplog):
    if case.setup:
        case.setup(tmp_path, assets)
    before, before_assets = _snapshot(tmp_path), _snapshot(assets)

    if case.library:
        with pytest.raises(CdpruneError) as info:
            case.library(tmp_path, assets)
        message = str(info.value)
        assert "\n" not in message
    else:
        code = main(_fill(case.argv, tmp_path, assets))
        err = capsys.readouterr().err
        assert "Traceback" not in err
        if case.exit_code == 0:  # worked around: a logged warning, and the run succeeds
            assert code == 0, err
            warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
            message = next((w for w in warnings if case.says[0] in w), "")
            assert (tmp_path / "out" / "stats.safetensors").is_file()
        else:
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1, err
            message = lines[0]
            assert message.startswith(f"cdprune {case.argv[0]}: error: ")
    for word in (*case.says, case.fix):
        assert word in message, f"{word!r} not in {message!r}"
    for word in case.never:
        assert word not in message, f"{word!r} in {message!r}"

    assert not (tmp_path / "pwned").exists(), "a code payload ran"
    assert _snapshot(assets) == before_assets
    if case.exit_code != 0:
        assert not (tmp_path / "out").exists(), "a failed command left its output directory"
        assert _snapshot(tmp_path) == before, "a failed command wrote or changed files"


def test_failure_keeps_an_existing_run_untouched(tmp_path, assets, capsys):
    """--overwrite with bad input: the earlier run's files are still all there."""
    from cdprune.fileio import atomic_write_bytes
    from cdprune.runs.rundir import RunDir

    out = tmp_path / "out"
    with RunDir(out, stage="stats", config={}) as run:
        run.write_config({"earlier": "run"})
        atomic_write_bytes(out / "last.pth", b"earlier weights")
    before = _snapshot(out)
    argv = _fill(("stats", "--model", "digits_cnn", "--checkpoint", "{tmp}/missing.pth", *DATA,
                  *OUT, "--overwrite"), tmp_path, assets)
    assert main(argv) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_debug_shows_the_traceback(tmp_path, assets):
    argv = _fill(("stats", "--model", "digits_cnn", "--checkpoint", "{tmp}/missing.pth", *DATA,
                  *OUT, "--debug"), tmp_path, assets)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(argv)


def test_readme_troubleshooting_table_is_current():
    assert readme_section(README.read_text()) == render_troubleshooting(), (
        "README.md's Troubleshooting table is out of date: run "
        "`python tools/gen_troubleshooting.py`")


# ============================================================================ faults
class _FullDisk:
    """A file whose write stores half the bytes, then fails as a full disk does."""

    def __init__(self, fh):
        self.fh = fh

    def write(self, data: bytes) -> int:
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


def _fill_disk_for(monkeypatch, pattern: str) -> None:
    """Writes of temporary files whose name matches ``pattern`` hit a full disk."""
    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        fh = real(fd, *args, **kwargs)
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        return _FullDisk(fh) if re.search(pattern, name) else fh

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_disk_full_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    fileio.atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    _fill_disk_for(monkeypatch, r"^\.last\.pth\.")
    with pytest.raises(OSError) as info:
        fileio.atomic_torch_save({"epoch": 2, "w": torch.zeros(3)}, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left
    assert checkpoint.safe_torch_load(path)["epoch"] == 1


@pytest.mark.slow
def test_disk_full_during_finetuning_is_one_line(tmp_path, assets, capsys, monkeypatch):
    out = tmp_path / "out"
    tune = ("finetune", *DATA, "--model-dir", "{assets}/pruned", *TUNE, *OUT)
    assert main(_fill((*tune, "--epochs", "1"), tmp_path, assets)) == 0
    before = _snapshot(out)
    capsys.readouterr()
    _fill_disk_for(monkeypatch, r"^\.(last|best)\.pth\.")
    assert main(_fill((*tune, "--epochs", "2", "--resume"), tmp_path, assets)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(rf"no space left on device while writing '{re.escape(str(out))}/"
                     r"(last|best)\.pth': the disk is full", lines[0]), lines[0]
    after = _snapshot(out)
    for name in ("last.pth", "best.pth", "metrics.jsonl"):
        assert after[name] == before[name], name
    assert not list(out.glob(".*.tmp"))
    monkeypatch.undo()  # space freed: the run continues
    assert main(_fill((*tune, "--epochs", "2", "--resume"), tmp_path, assets)) == 0
    assert checkpoint.safe_torch_load(out / "last.pth")["epoch"] == 2


# A child process that runs the CLI and hangs (to be killed) while writing the nth
# temporary file of a given target: after half the bytes, as a slow disk would.
_STUCK_WRITER = r'''
import os, sys, time
target, nth = sys.argv[1], int(sys.argv[2])
real_fdopen, seen = os.fdopen, [0]

class Stuck:
    def __init__(self, fh):
        self.fh = fh
    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        print("STUCK", flush=True)
        time.sleep(600)
    def __getattr__(self, name):
        return getattr(self.fh, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.fh.close()

def fdopen(fd, *args, **kwargs):
    fh = real_fdopen(fd, *args, **kwargs)
    if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{target}."):
        seen[0] += 1
        if seen[0] == nth:
            return Stuck(fh)
    return fh

os.fdopen = fdopen
from cdprune.cli import main
sys.exit(main(sys.argv[3:]))
'''


def _run_until_stuck(tmp_path: Path, target: str, nth: int, argv: list[str]
                     ) -> subprocess.Popen:
    script = tmp_path / "stuck_writer.py"
    script.write_text(_STUCK_WRITER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), target, str(nth), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line.strip() == "STUCK":
                return proc
            if not line:
                break
    proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"the child never got stuck writing {target}: {err[-2000:]}")


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])  # 2: the default, loader worker processes
def test_sigkill_mid_checkpoint_write_then_resume_matches(workers, tmp_path, assets):
    data = tuple(workers if i and DATA[i - 1] == "-j" else a for i, a in enumerate(DATA))
    tune = ("finetune", *data, "--model-dir", "{assets}/pruned", *TUNE, "--epochs", "3")
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(_fill((*tune, "--output-dir", str(full)), tmp_path, assets)) == 0

    argv = _fill((*tune, "--output-dir", str(killed)), tmp_path, assets)
    proc = _run_until_stuck(tmp_path, "last.pth", 2, argv)  # epoch 2's last.pth, half written
    intact = (killed / "last.pth").read_bytes()
    _kill(proc)
    partial = list(killed.glob(".last.pth.*.tmp"))
    assert partial and 0 < partial[0].stat().st_size < len(intact) * 0.75
    assert (killed / "last.pth").read_bytes() == intact
    assert checkpoint.safe_torch_load(killed / "last.pth")["epoch"] == 1  # the previous one

    assert main([*argv, "--resume"]) == 0
    assert not list(killed.glob(".*.tmp"))  # the stale temporary file was cleared
    a = checkpoint.safe_torch_load(full / "last.pth")
    b = checkpoint.safe_torch_load(killed / "last.pth")
    assert a["epoch"] == b["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_killed_statistics_stage_leaves_no_partial_file(tmp_path, assets, capsys):
    from cdprune.importance.activations import ActivationStats

    out = tmp_path / "out"
    argv = _fill(("stats", *BASE, "--stop-batch", "4", "--stats-batch-size", "64", *OUT),
                 tmp_path, assets)
    proc = _run_until_stuck(tmp_path, "stats.safetensors", 1, argv)
    _kill(proc)
    assert not (out / "stats.safetensors").exists()
    partial = next(out.glob(".stats.safetensors.*.tmp"))
    with pytest.raises(FileNotFoundError):
        ActivationStats.load(out / "stats.safetensors")
    # Had the file been written in place, a rerun would meet this: it is refused too.
    shutil.copy(partial, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="truncated"):
        ActivationStats.load(tmp_path / "partial.safetensors")
    prune = ("prune", *BASE, "--sparsity", "0.3", "--output-dir", "{tmp}/pruned")
    for stats in (out / "stats.safetensors", tmp_path / "partial.safetensors"):
        assert main(_fill((*prune, "--stats", str(stats)), tmp_path, assets)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(stats) in err[0]
    assert not (tmp_path / "pruned").exists()

    assert main([*argv, "--overwrite"]) == 0  # the rerun collects afresh
    assert not list(out.glob(".*.tmp"))
    assert ActivationStats.load(out / "stats.safetensors").num_samples == 4 * 64


_HOLD_RUN_DIR = r'''
import sys, time
from cdprune.runs.rundir import RunDir
with RunDir(sys.argv[1]):
    print("LOCKED", flush=True)
    time.sleep(600)
'''


@pytest.mark.slow
def test_second_run_on_the_same_directory_is_refused(tmp_path, assets, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_RUN_DIR, str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        before = _snapshot(out)
        argv = _fill(("stats", *BASE, "--stop-batch", "2", *OUT), tmp_path, assets)
        for extra in ([], ["--overwrite"]):
            assert main([*argv, *extra]) == 2
            err = capsys.readouterr().err
            assert "another cdprune process is using" in err and len(err.splitlines()) == 1
        # The real command, with its real logging set-up: one line on stderr, exit code 2.
        proc = subprocess.run([sys.executable, "-m", "cdprune.cli", *argv], text=True,
                              capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.splitlines() == [
            f"cdprune stats: error: another cdprune process is using '{out}' (lock file "
            ".cdprune.lock); wait for it to finish or choose another --output-dir"]
        assert _snapshot(out) == before
    finally:
        _kill(holder)
    assert main(argv) == 0  # the lock died with its holder


# ============================================================================ determinism
@pytest.mark.slow
def test_same_seed_same_everything_on_cpu(tmp_path, assets):
    from importlib import metadata

    from safetensors.torch import load_file

    import cdprune

    argv = ("run", *BASE, "--stop-batch", "4", "--stats-batch-size", "64", "--macs-reduction",
            "0.5", "--scope", "all", "--epochs", "1", *TUNE, "--seed", "3")
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert main(_fill((*argv, "--output-dir", str(out)), tmp_path, assets)) == 0
    a, b = runs
    for name in ("stats.safetensors", "scores.safetensors", "pruned/model.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    plan_a, plan_b = (json.loads((r / "pruned" / "plan.json").read_text()) for r in runs)
    assert plan_a["steps"] and plan_a["steps"] == plan_b["steps"]
    assert plan_a["kept"] == plan_b["kept"]
    wa, wb = (checkpoint.safe_torch_load(r / "last.pth")["model"] for r in runs)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    report = json.loads((a / "report.json").read_text())
    assert report["seed"] == 3
    assert report["environment"]["torch"] == torch.__version__
    # the installed distribution's version (the package's __version__ can lag behind it)
    assert report["environment"]["torch_pruning"] == metadata.version("torch-pruning")
    assert report["environment"]["cdprune"] == cdprune.__version__
