"""The ``cdprune`` command: statistics, pruning, fine-tuning, evaluation, the demo.

Only this module prints. Errors a user can cause become one line on stderr and exit
code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CdpruneError, ConfigError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("cdprune")
_OUTPUT = {"rank": 0}


def _say(*args: Any, **kwargs: Any) -> None:
    """Print to the user; under torchrun only rank 0 speaks."""
    if _OUTPUT["rank"] == 0:
        print(*args, **kwargs)

# Training defaults of the paper's CIFAR recipe.
DEFAULTS: dict[str, Any] = {
    "model": None, "checkpoint": None, "dataset": "cifar10", "data_root": "data",
    "download": False, "batch_size": 128, "eval_batch_size": None, "workers": 2,
    "mean": None, "std": None, "cutout": False, "stop_batch": None, "stats_batch_size": 128,
    "documents": "sample", "stats_dtype": "float32", "coe": 0.0, "tap": None,
    "normalize": None, "allocation": None, "variant": None, "sparsity": None,
    "macs_reduction": None, "macs_target": None, "macs_convention": "physical",
    "val_split": None, "compile": False, "eval_every": None, "fast_data": None,
    "scope": "auto", "max_layer_pruning": 0.9, "round_to": None,
    "ignore_layers": None, "epochs": 300, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "lr_schedule": "cosine", "lr_warmup_epochs": 0, "label_smoothing": 0.0, "amp": False,
    "max_iters": None, "sync_bn": False, "train_subset": None, "seed": 0, "device": None, "output_dir": None,
    "resume": False, "overwrite": False, "no_progress": False,
}


class UsageError(ConfigError):
    """A command line argparse cannot parse; ``prog`` names the (sub)command."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), raised, not exited."""

    def error(self, message: str):  # type: ignore[override]
        hint = ("give only one of them" if "not allowed with" in message
                else f"see `{self.prog} --help`")
        raise UsageError(self.prog, f"{message}; {hint}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("-c", "--config", help="YAML file whose keys set defaults for these flags")
    g.add_argument("--output-dir", help="run directory (refused if it holds another run)")
    g.add_argument("--overwrite", action="store_true", default=None,
                   help="reuse an output directory that holds another run")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    g.add_argument("--no-progress", action="store_true", default=None,
                   help="hide progress bars")
    g.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="zoo name (see `cdprune models`), torchvision:NAME or "
                                   "timm:NAME")
    g.add_argument("--checkpoint", "--pretrained_dir", "--pretrained-dir", dest="checkpoint",
                   help="weights of the base model (.pth, .pth.tar, .th, .pt, .safetensors)")


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="cifar10, cifar100, imagenet, digits (default cifar10)")
    g.add_argument("--data-root", "--dataroot", dest="data_root", help="dataset folder")
    g.add_argument("--download", action="store_true", default=None,
                   help="download CIFAR if missing (verified by MD5)")
    g.add_argument("-b", "--batch-size", dest="batch_size", type=_positive_int,
                   help="training batch size (default 128)")
    g.add_argument("-j", "--workers", type=int, help="data loading workers (default 2)")
    g.add_argument("--mean", type=_float, nargs=3, help="input normalisation mean; the "
                   "checkpoint's own (a wrong one silently costs accuracy)")
    g.add_argument("--std", type=_float, nargs=3, help="input normalisation std")
    g.add_argument("--train-subset", type=_positive_int,
                   help="fine-tune on a seeded random subset of this many training images")
    g.add_argument("--val-split", type=_positive_int, help="hold this many training images "
                   "out to choose the best epoch on, so the test set is never used for it")


def _add_stats(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("statistics")
    g.add_argument("--stop-batch", "--stop_batch", dest="stop_batch", type=int,
                   help="batches of training images to sample for statistics")
    g.add_argument("--stats-batch-size", type=_positive_int, help="default 128")
    g.add_argument("--documents", choices=["sample", "class"],
                   help="TF-IDF documents: every image (published code) or every class")
    g.add_argument("--stats-dtype", choices=["float32", "float16"],
                   help="storage of per-image values; float16 halves memory")
    g.add_argument("--coe", type=_float, help="balance coefficient (0: none)")
    g.add_argument("--tap", choices=["conv", "act"], help="where a filter's activation is "
                   "read: conv output before BatchNorm, or after BatchNorm and ReLU")
    g.add_argument("--normalize", choices=["none", "max", "mean"],
                   help="per-layer score scaling before the global ranking")
    g.add_argument("--variant", choices=["published"], help="force every CDP option "
                   "(tap, documents, normalize, allocation) to the published code's")


def _add_prune(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning")
    target = g.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=_float, help="fraction of filters to remove")
    target.add_argument("--macs-reduction", type=_float,
                        help="fraction of MACs to remove (hit within 0.3 points)")
    target.add_argument("--macs-target", help="MACs to keep, absolute with K/M/G, e.g. "
                        "60.02M (in --macs-convention)")
    g.add_argument("--macs-convention", choices=["physical", "paper"],
                   help="what --macs-target counts: the network that runs (default) or "
                   "the CDP paper's counter on masks")
    g.add_argument("--scope", choices=["auto", "internal", "all"],
                   help="channels that may be pruned (default auto)")
    g.add_argument("--max-layer-pruning", type=_float,
                   help="most a layer may lose (default 0.9)")
    g.add_argument("--round-to", type=_positive_int, help="keep widths multiples of this")
    g.add_argument("--allocation", choices=["global", "uniform"], help="global: one "
                   "ranking of all filters; uniform: every layer loses the same fraction")
    g.add_argument("--ignore-layers", nargs="+", help="module names never pruned")
    g.add_argument("--stats", help="statistics file (default: <output-dir>/stats.safetensors)")


def _add_train(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--epochs", type=int, help="default 300")
    g.add_argument("--max-iters", type=_positive_int, help="stop after this many iterations")
    g.add_argument("--lr", type=_float, help="initial learning rate (default 0.1)")
    g.add_argument("--momentum", type=_float, help="default 0.9 (Nesterov)")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=_float,
                   help="default 5e-4")
    g.add_argument("--lr-scheduler", dest="lr_schedule", choices=["cosine", "step"],
                   help="default cosine")
    g.add_argument("--lr-warmup-epochs", "--warmup", dest="lr_warmup_epochs", type=_float,
                   help="linear warmup, per iteration (default 0)")
    g.add_argument("--label-smoothing", type=_float, help="default 0")
    g.add_argument("--cutout", action="store_true", default=None, help="Cutout 16x16")
    g.add_argument("--amp", action="store_true", default=None, help="mixed precision (CUDA)")
    g.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm (DDP)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the "
                   "model for training")
    g.add_argument("--eval-every", type=_positive_int, help="evaluate every N epochs (and "
                   "after the last; default 1)")
    g.add_argument("--no-fast-data", dest="fast_data", action="store_false", default=None,
                   help="keep the DataLoader for in-memory datasets instead of holding them "
                   "on the device and augmenting whole batches there")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue from <output-dir>/last.pth")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cdprune`` command."""
    parser = _Parser(
        prog="cdprune", description="Prune convolutional networks with CDP "
        "(class-wise discriminative power): statistics, scores, physical pruning, fine-tuning.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"cdprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    specs = {
        "stats": ("collect activation statistics and CDP scores (step 1)",
                  (_add_model, _add_data, _add_stats)),
        "prune": ("prune a checkpoint with a statistics file (step 2)",
                  (_add_model, _add_data, _add_stats, _add_prune)),
        "finetune": ("fine-tune a pruned model directory (step 3)", (_add_model, _add_data,
                                                                     _add_train)),
        "eval": ("evaluate a checkpoint or a pruned model directory", (_add_model, _add_data)),
        "run": ("statistics, pruning and fine-tuning in one go",
                (_add_model, _add_data, _add_stats, _add_prune, _add_train)),
        "export": ("export a pruned model to ONNX or TorchScript, verified", ()),
        "compare": ("prune with several criteria at equal MACs and compare accuracy",
                    (_add_model, _add_data, _add_stats, _add_train)),
        "demo": ("the offline demo on scikit-learn's digits", ()),
        "models": ("list the model zoo", ()),
    }
    for name, (help_text, adders) in specs.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           argument_default=None)
        for add in adders:
            add(p)
        if name in ("finetune", "eval", "export"):
            p.add_argument("--model-dir", help="pruned model directory (plan.json + weights) "
                           "or a run directory holding pruned/")
        if name == "export":
            p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
            p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
            p.add_argument("--dynamic-batch", action="store_true",
                           help="exported model accepts any batch size")
            p.add_argument("--output", help="output file (default: next to plan.json)")
        if name == "compare":
            g = p.add_argument_group("comparison")
            g.add_argument("--macs-reduction", type=_float, nargs="+", dest="macs_targets",
                           help="one or more MACs targets, e.g. 0.3 0.5 0.7")
            g.add_argument("--criteria", nargs="+", help="default: all of "
                           "cdp cdp_class l1 bn_scale taylor fpgm random")
            g.add_argument("--random-seeds", type=int, nargs="+", help="default 0 1 2")
            g.add_argument("--scope", choices=["auto", "internal", "all"])
            g.add_argument("--allocation", choices=["global", "uniform"],
                           help="how every criterion's scores become per-layer removals")
        if name == "demo":
            p.add_argument("--quick", action="store_true", help="shorter run (smoke test)")
        if name != "models":
            _add_common(p)
    return parser


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file '{file}' does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{file}' is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{file}' must hold a mapping of flag: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in DEFAULTS:
            import difflib

            close = difflib.get_close_matches(name, list(DEFAULTS), n=2)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"config file '{file}': unknown key '{key}'{hint}")
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"config file '{file}': {key} is {value}; give a finite number")
        out[name] = value
    return out


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the YAML config, then the flags given on the command line."""
    config = dict(DEFAULTS)
    if getattr(args, "config", None):
        config.update(_load_yaml(args.config))
    for key, value in vars(args).items():
        if key in DEFAULTS and value is not None:
            config[key] = value
    for key in ("model_dir", "stats", "quick", "format", "opset", "dynamic_batch", "output",
                "macs_targets", "criteria", "random_seeds"):
        if getattr(args, key, None) is not None:
            config[key] = getattr(args, key)
    config["command"] = args.command
    _validate(config)
    return config


def _validate(config: dict[str, Any]) -> None:
    checks = [
        ("stop_batch", lambda v: v is None or v > 0, "a positive number of batches"),
        ("batch_size", lambda v: v > 0, "a positive integer"),
        ("epochs", lambda v: v >= 0, "0 or more"),
        ("coe", lambda v: v >= 0, "0 (no balancing) or a positive number"),
        ("lr", lambda v: v > 0, "a positive number"),
        ("sparsity", lambda v: v is None or 0 < v < 1, "a fraction in (0, 1)"),
        ("macs_reduction", lambda v: v is None or 0 < v < 1, "a fraction in (0, 1)"),
        ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("workers", lambda v: v >= 0, "0 or more"),
    ]
    for key, ok, valid in checks:
        value = config.get(key)
        flag = "--" + key.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag} is {value}; it must be {valid}")
        try:
            good = ok(value)
        except TypeError:  # e.g. a string in a YAML config
            good = False
        if not good:
            raise ConfigError(f"{flag} {value!r} is invalid; it must be {valid}"
                              if isinstance(value, str) else
                              f"{flag} {value} is invalid; it must be {valid}")
    targets = [k for k in ("sparsity", "macs_reduction", "macs_target")
               if config.get(k) is not None]
    if config["command"] in ("prune", "run") and len(targets) != 1:
        raise ConfigError("give exactly one of --sparsity, --macs-reduction or --macs-target")
    if config.get("macs_target") is not None:
        from .targets import parse_macs

        parse_macs(config["macs_target"])
    if config.get("macs_convention") not in ("physical", "paper"):
        raise ConfigError(f"--macs-convention {config.get('macs_convention')!r} is invalid; "
                          "it must be physical or paper")
    if config["command"] in ("stats", "prune", "run") and not config.get("model"):
        raise ConfigError("--model is required (see `cdprune models`)")


def _run_dir(config: dict[str, Any]):
    from .pipeline import RunDir

    if not config.get("output_dir"):
        raise ConfigError("--output-dir is required: every run writes a directory")
    return RunDir(config["output_dir"], resume=bool(config.get("resume")),
                  overwrite=bool(config.get("overwrite")))


# Each command checks what it can (the output directory, data, model, checkpoint, input
# files) before it enters the run directory, so bad input leaves no files behind.
def _cmd_stats(config: dict[str, Any]) -> None:
    from .pipeline import build_data, build_model, run_stats

    run = _run_dir(config)
    data = build_data(config, need_train=False)
    model = build_model(config, data.num_classes)
    with run:
        run.write_config(config)
        path = run_stats(config, run, data=data, model=model)
    _say(f"statistics: {path}\nscores: {run.path / 'scores.safetensors'}")


def _print_summary(summary: dict[str, Any]) -> None:
    _say(f"MACs {summary['macs_before'] / 1e6:.2f}M -> {summary['macs_after'] / 1e6:.2f}M "
          f"(-{100 * summary['macs_reduction']:.1f}%), params "
          f"{summary['params_before'] / 1e6:.3f}M -> {summary['params_after'] / 1e6:.3f}M")
    if summary.get("macs_paper_after"):
        _say(f"MACs in the paper's mask convention: {summary['macs_paper_after'] / 1e6:.2f}M")
    if "acc_base" in summary:
        _say(f"accuracy: base {summary['acc_base']:.2f}%, right after pruning "
              f"{summary['acc_pruned']:.2f}%")


def _cmd_prune(config: dict[str, Any]) -> None:
    from .pipeline import (
        build_data,
        build_model,
        check_ignore_layers,
        finish_report,
        load_stats,
        run_prune,
    )

    run = _run_dir(config)
    data = build_data(config, need_train=False, need_stats=False)
    model = build_model(config, data.num_classes)
    check_ignore_layers(config, model)
    stats = load_stats(config, model)
    with run:
        run.write_config(config)
        summary = run_prune(config, run, data=data, model=model, stats=stats)
        finish_report(run, config, summary)
    _print_summary(summary)
    _say(f"pruned model: {run.path / 'pruned'}\nreport: {run.path / 'report.md'}")


def _cmd_finetune(config: dict[str, Any]) -> None:
    from .pipeline import (
        build_data,
        finetune_accuracy,
        finish_report,
        load_pruned_dir,
        run_finetune,
    )

    run = _run_dir(config)
    data = build_data(config, need_stats=False)
    model, plan = load_pruned_dir(config.get("model_dir") or run.path, config, data.num_classes)
    with run:
        run.write_config(config)
        result = run_finetune(config, run, data=data, model=model, plan=plan)
        accuracy = finetune_accuracy(config, data, model, result)
        finish_report(run, config, None, finetuned=accuracy)
    _say(f"{_accuracy_line(accuracy)} after {result.epochs_run} epochs; "
          f"checkpoints in {run.path}")


def _accuracy_line(accuracy: dict[str, float]) -> str:
    """The headline (last epoch on the test set) and the best epoch, labelled."""
    if "finetuned" not in accuracy:
        return "no epoch ran"
    line = f"final-epoch top-1 {accuracy['finetuned']:.2f}%"
    if "finetuned_best_on_test" in accuracy:
        line += (f" (best epoch {accuracy['finetuned_best_on_test']:.2f}%, chosen on the "
                 "test set)")
    if "finetuned_selected_on_val" in accuracy:
        line += (f" (epoch chosen on held-out training images: "
                 f"{accuracy['finetuned_selected_on_val']:.2f}%)")
    return line


def _cmd_eval(config: dict[str, Any]) -> None:
    from .evaluate import evaluate
    from .pipeline import _device, build_data, build_model, load_pruned_dir

    data = build_data(config, need_train=False, need_stats=False)
    if config.get("model_dir"):
        model, _ = load_pruned_dir(config["model_dir"], config, data.num_classes)
    else:
        if not config.get("model"):
            raise ConfigError("give --model (and --checkpoint) or --model-dir")
        model = build_model(config, data.num_classes)
    device = _device(config)
    result = evaluate(model.to(device), data.val, device=device,
                      progress=not config.get("no_progress"))
    _say(json.dumps(result.to_dict(), indent=1))


def _cmd_run(config: dict[str, Any]) -> None:
    from .pipeline import (
        build_data,
        build_model,
        check_ignore_layers,
        finetune_accuracy,
        finish_report,
        gather_stats,
        run_finetune,
        run_prune,
    )

    run = _run_dir(config)
    data = build_data(config)
    summary_path = run.path / "prune_summary.json"
    resumed = bool(config.get("resume")) and summary_path.is_file()  # stages 1-2 done before
    if not resumed:
        model = build_model(config, data.num_classes)
        check_ignore_layers(config, model)
    with run:
        run.write_config(config)
        if resumed:
            summary = json.loads(summary_path.read_text())
        else:
            # Statistics are written together with the pruned model, once pruning succeeded.
            stats = gather_stats(config, data, model)
            summary = run_prune(config, run, data=data, model=model, stats=stats,
                                save_stats=True)
            _print_summary(summary)
        result = run_finetune(config, run, data=data)
        accuracy = finetune_accuracy(config, data, None, result, run_path=run.path)
        finish_report(run, config, summary, finetuned=accuracy)
    _say(f"fine-tuned: {_accuracy_line(accuracy)}\nreport: {run.path / 'report.md'}")


def _cmd_compare(config: dict[str, Any]) -> None:
    import torch

    from .compare import compare_criteria, write_comparison
    from .criteria import CRITERIA
    from .pipeline import _device, build_data, build_model, cdp_options
    from .train import TrainConfig

    targets = config.get("macs_targets")
    if not targets:
        raise ConfigError("give one or more targets: --macs-reduction 0.5 [0.3 0.7 ...]")
    for target in targets:
        if not 0 < target < 1:
            raise ConfigError(f"--macs-reduction {target} is invalid; it must be a fraction "
                              "in (0, 1)")
    options = cdp_options(config)
    run = _run_dir(config)
    data = build_data(config)
    model = build_model(config, data.num_classes)
    with run:
        run.write_config(config)
        fields = TrainConfig.__dataclass_fields__
        budget = TrainConfig(**{k: config[k] for k in fields if config.get(k) is not None})
        rows = compare_criteria(
            model, train_loader=data.train, val_loader=data.val, stats_loader=data.stats,
            example_inputs=torch.randn(2, *data.input_size), macs_reductions=targets,
            criteria=config.get("criteria") or CRITERIA, finetune=budget,
            output_dir=run.path, random_seeds=config.get("random_seeds") or (0, 1, 2),
            stats_max_batches=config.get("stop_batch"), num_classes=data.num_classes,
            coe=config.get("coe") or 0.0, scope=config.get("scope") or "auto",
            cdp_options={k: v for k, v in {**options["stats"], **options["scores"]}.items()
                         if k in ("tap", "normalize", "variant")},
            allocation=options["prune"].get("allocation", "global"),
            device=_device(config), progress=not config.get("no_progress"),
            on_row=lambda r: _say(f"{r['criterion']:>9s}{'' if r['seed'] is None else r['seed']}"
                                   f" -{100 * r['macs_target']:.0f}% MACs: "
                                   f"{r['acc_pruned']:.2f}% pruned, "
                                   f"{r['acc_finetuned']:.2f}% fine-tuned", flush=True))
        meta = {k: config.get(k) for k in ("model", "checkpoint", "dataset", "epochs",
                                             "max_iters", "lr", "train_subset", "stop_batch",
                                             "stats_batch_size", "seed", "scope", "tap",
                                             "normalize", "allocation", "variant")}
        _, md = write_comparison(run.path, rows, meta)
    _say(md.read_text())


def _cmd_models(config: dict[str, Any]) -> None:
    from .models import list_models, model_spec

    for name in list_models():
        spec = model_spec(name)
        _say(f"{name:16s} input {tuple(spec.input_size)}  classes {spec.num_classes}")


def _cmd_demo(config: dict[str, Any]) -> None:
    from .demo import run_demo

    run_demo(config.get("output_dir") or "runs/demo", quick=bool(config.get("quick")),
             overwrite=True, progress=not config.get("no_progress"), printer=_say)


def _cmd_export(config: dict[str, Any]) -> None:
    import tempfile

    from .checkpoint import atomic_write_text
    from .export import export, export_latency
    from .models import create_model
    from .pipeline import pruned_dir
    from .pruning import load_pruned, read_plan

    if not config.get("model_dir"):
        raise ConfigError("--model-dir is required: a directory written by `cdprune prune`")
    directory = pruned_dir(config["model_dir"])
    plan = read_plan(directory)
    name = plan.get("zoo_model")
    if not name or not plan.get("input_size"):
        raise ConfigError(f"'{directory}' holds a user model; export it from Python with "
                          "cdprune.export.export(model, path, input_size=...)")
    num_classes = (plan.get("extra") or {}).get("num_classes")
    model = load_pruned(directory, create_model(name, num_classes=num_classes))
    fmt = config["format"]
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    out = Path(config.get("output") or directory / f"model{suffix}")
    size = tuple(plan["input_size"])
    result = export(model, out, format=fmt, input_size=size, opset=config["opset"],
                    dynamic_batch=bool(config.get("dynamic_batch")))
    with tempfile.TemporaryDirectory() as tmp:
        base = export(create_model(name, num_classes=num_classes).eval(),
                      Path(tmp) / f"base{suffix}", format=fmt, input_size=size,
                      opset=config["opset"])
        lat_base = export_latency(base.path, fmt, size)
        lat_pruned = export_latency(result.path, fmt, size)
        base_size = base.size_bytes
    summary = {**result.to_dict(), "base_size_bytes": base_size,
               "latency_base_ms": round(1e3 * lat_base, 3),
               "latency_pruned_ms": round(1e3 * lat_pruned, 3),
               "speedup": round(lat_base / lat_pruned, 3)}
    atomic_write_text(directory / f"export_{fmt}.json", json.dumps(summary, indent=1) + "\n")
    _say(f"exported {out} ({result.size_bytes / 1e6:.2f} MB, unpruned {base_size / 1e6:.2f} MB)"
          f"; max difference from PyTorch {result.max_abs_diff:.1e}")
    _say(f"{fmt} latency, batch 1, CPU: unpruned {summary['latency_base_ms']:.2f} ms, pruned "
          f"{summary['latency_pruned_ms']:.2f} ms ({summary['speedup']:.2f}x)")


COMMANDS = {"stats": _cmd_stats, "prune": _cmd_prune, "finetune": _cmd_finetune,
            "eval": _cmd_eval, "run": _cmd_run, "export": _cmd_export,
            "compare": _cmd_compare, "demo": _cmd_demo, "models": _cmd_models}


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (some errors quote multi-line library messages)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cdprune`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return 2
    if not args.command:
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        config = resolve_config(args)
        from .distributed import cleanup, init_distributed

        info = init_distributed()  # a no-op unless started by torchrun
        _OUTPUT["rank"] = info.rank
        if info.rank != 0:  # one voice: other ranks log only warnings and errors
            logging.getLogger().setLevel(logging.WARNING)
        import torch

        torch.manual_seed(config.get("seed") or 0)  # model init, sampling, pruning ties
        try:
            COMMANDS[args.command](config)
        finally:
            cleanup()
    except (CdpruneError, ValueError, FileNotFoundError, NotADirectoryError,
            PermissionError) as exc:
        if debug:
            raise
        print(f"cdprune {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or debug:
            raise
        where = f" while writing '{exc.filename}'" if exc.filename else ""
        print(f"cdprune {args.command}: error: no space left on device{where}: the disk is "
              "full; free some space and run the command again (fine-tuning continues with "
              "--resume) or choose another --output-dir; files written before are intact",
              file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # training diverged
        if debug:
            raise
        print(f"cdprune {args.command}: error: {exc}; lower --lr or check the data",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cdprune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
