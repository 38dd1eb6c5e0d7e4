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
    "macs_reduction": None, "scope": "auto", "max_layer_pruning": 0.9, "round_to": None,
    "ignore_layers": None, "epochs": 300, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "lr_schedule": "cosine", "lr_warmup_epochs": 0, "label_smoothing": 0.0, "amp": False,
    "max_iters": None, "sync_bn": False, "train_subset": None, "seed": 0, "device": None, "output_dir": None,
    "resume": False, "overwrite": False, "no_progress": False,
}
# Deployment and evaluation options (kept apart so that the table above stays as it was).
DEFAULTS.update({"random_init": False, "weights": None, "val_subset": None, "no_eval": False,
                 "bn_recalibrate": None, "latency_reduction": None, "latency_batch": None})


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
                   help="weights of the base model (.pth, .pth.tar, .th, .pt, .safetensors); "
                   "with --model-dir: weights of the pruned model")
    g.add_argument("--random-init", action="store_true", default=None,
                   help="use randomly initialised weights when no --checkpoint is given "
                   "(for tests; pruning random weights is meaningless otherwise)")


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="cifar10, cifar100, imagenet, folder (any class folders),"
                   " digits (default cifar10)")
    g.add_argument("--data-root", "--dataroot", dest="data_root", help="dataset folder")
    g.add_argument("--download", action="store_true", default=None,
                   help="download CIFAR if missing (verified by MD5)")
    g.add_argument("-b", "--batch-size", dest="batch_size", type=_positive_int,
                   help="training batch size (default 128)")
    g.add_argument("-j", "--workers", type=int, help="data loading workers (default 2)")
    g.add_argument("--mean", type=_float, nargs="+", help="input normalisation mean, one "
                   "value per channel or one for all; the checkpoint's own (a wrong one "
                   "silently costs accuracy)")
    g.add_argument("--std", type=_float, nargs="+", help="input normalisation std")
    g.add_argument("--train-subset", type=_positive_int,
                   help="fine-tune on a seeded random subset of this many training images")
    g.add_argument("--val-subset", type=_positive_int,
                   help="evaluate on a seeded random subset of this many validation images")


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
    target.add_argument("--latency-reduction", type=_float,
                        help="fraction of latency to remove, timed on this machine "
                        "(within 5%% of the target)")
    g.add_argument("--latency-batch", type=_positive_int,
                   help="batch size the latency target is timed at (default 1)")
    g.add_argument("--scope", choices=["auto", "internal", "all"],
                   help="channels that may be pruned (default auto)")
    g.add_argument("--max-layer-pruning", type=_float,
                   help="most a layer may lose (default 0.9)")
    g.add_argument("--round-to", type=_positive_int, help="keep widths multiples of this")
    g.add_argument("--allocation", choices=["global", "uniform", "latency"], help="global: "
                   "one ranking of all filters; uniform: every layer loses the same "
                   "fraction; latency: least score lost per second saved, timed here "
                   "(default with --latency-reduction)")
    g.add_argument("--ignore-layers", nargs="+", help="module names never pruned")
    g.add_argument("--stats", help="statistics file (default: <output-dir>/stats.safetensors)")
    _add_after_pruning(g)


def _add_after_pruning(g: Any) -> None:
    g.add_argument("--bn-recalibrate", type=_positive_int, metavar="N",
                   help="re-estimate BatchNorm statistics on N training images after pruning "
                   "(before fine-tuning); reported as its own accuracy row")
    g.add_argument("--no-eval", action="store_true", default=None,
                   help="do not evaluate the base and pruned models after pruning")


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
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue from <output-dir>/last.pth")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cdprune`` command."""
    parser = _Parser(
        prog="cdprune", description="Prune convolutional networks with CDP "
        "(class-wise discriminative power): statistics, scores, physical pruning, fine-tuning.")
    from .criteria import criterion_names
    from .version import __version__

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
            p.add_argument("--model-dir", help="run directory (its final model), fine-tune "
                           "directory, or pruned model directory (plan.json + weights)")
            final = "pruned" if name == "finetune" else "final"
            p.add_argument("--weights", choices=["final", "best", "last", "pruned"],
                           help="which weights of --model-dir: final (best.pth when "
                           "fine-tuning ran, else the pruned model), best, last or pruned "
                           f"(default {final})")
        if name == "export":
            p.add_argument("--checkpoint", help="weights of the pruned model to export "
                           "instead of the run's own")
            p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
            p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
            batch = p.add_mutually_exclusive_group()
            batch.add_argument("--dynamic-batch", action="store_true", default=None,
                               help="exported model accepts any batch size (the default)")
            batch.add_argument("--static-batch", action="store_true", default=None,
                               help="exported ONNX model accepts batch size 1 only")
            p.add_argument("--output", help="output file (default: model.onnx or model.pt "
                           "next to the weights exported)")
            p.add_argument("--no-latency", action="store_true", default=None,
                           help="skip the latency comparison with the unpruned architecture")
        if name == "compare":
            g = p.add_argument_group("comparison")
            g.add_argument("--macs-reduction", type=_float, nargs="+", dest="macs_targets",
                           help="one or more MACs targets, e.g. 0.3 0.5 0.7")
            g.add_argument("--criteria", nargs="+", help="default: all of "
                           + " ".join(criterion_names()))
            g.add_argument("--random-seeds", type=int, nargs="+", help="default 0 1 2")
            g.add_argument("--scope", choices=["auto", "internal", "all"])
            g.add_argument("--allocation", choices=["global", "uniform"],
                           help="how every criterion's scores become per-layer removals")
            g.add_argument("--bn-recalibrate", type=_positive_int, metavar="N",
                           help="also report accuracy after re-estimating BatchNorm "
                           "statistics on N training images")
        if name == "demo":
            p.add_argument("--quick", action="store_true", help="shorter run (smoke test)")
        if name != "models":
            _add_common(p)
    return parser


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the YAML config, then the flags given on the command line."""
    from .config_io import load_yaml

    config = dict(DEFAULTS)
    if getattr(args, "config", None):
        config.update(load_yaml(args.config, DEFAULTS))
    for key, value in vars(args).items():
        if key in DEFAULTS and value is not None:
            config[key] = value
    for key in ("model_dir", "stats", "quick", "format", "opset", "dynamic_batch", "output",
                "macs_targets", "criteria", "random_seeds", "static_batch", "no_latency"):
        if getattr(args, key, None) is not None:
            config[key] = getattr(args, key)
    config["command"] = args.command
    from .config_io import validate

    validate(config)
    return config


def _run_dir(config: dict[str, Any]):
    from .pipeline import RunDir

    if not config.get("output_dir"):
        raise ConfigError("--output-dir is required: every run writes a directory")
    from .pipeline import pruned_dir

    # What this run reads from inside its own directory survives --overwrite.
    keep = [config.get("stats"), config.get("checkpoint")]
    if config["command"] == "prune" and not config.get("stats"):
        keep.append(Path(config["output_dir"]) / "stats.safetensors")
    if config.get("model_dir"):
        keep.append(pruned_dir(config["model_dir"]))
    elif config["command"] == "finetune":
        keep.append(Path(config["output_dir"]) / "pruned")
    return RunDir(config["output_dir"], resume=bool(config.get("resume")),
                  overwrite=bool(config.get("overwrite")), stage=config["command"],
                  config=config, keep=keep)


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
    from .report import format_count as n

    _say(f"MACs {n(summary['macs_before'])} -> {n(summary['macs_after'])} "
         f"(-{100 * summary['macs_reduction']:.1f}%), params "
         f"{n(summary['params_before'])} -> {n(summary['params_after'])}")
    if "acc_base" in summary:
        _say(f"accuracy: base {summary['acc_base']:.2f}%, right after pruning "
             f"{summary['acc_pruned']:.2f}%" + (
                 f", after BatchNorm recalibration ({summary['bn_recalibrate_images']} images) "
                 f"{summary['acc_recalibrated']:.2f}%" if "acc_recalibrated" in summary else ""))


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
    data = build_data(config, need_train=bool(config.get("bn_recalibrate")), need_stats=False)
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
        finish_report,
        load_pruned_dir,
        model_dir_defaults,
        run_finetune,
    )

    run = _run_dir(config)
    config = model_dir_defaults(config)
    data = build_data(config, need_stats=False)
    model, plan = load_pruned_dir(config.get("model_dir") or run.path, config, data.num_classes)
    with run:
        run.write_config(config)
        result = run_finetune(config, run, data=data, model=model, plan=plan)
        finish_report(run, config, None, finetuned=result.best_acc)
    _say(f"best top-1 {result.best_acc:.2f}% after {result.epochs_run} epochs; "
          f"checkpoints in {run.path}")


def _cmd_eval(config: dict[str, Any]) -> None:
    from .evaluate import evaluate
    from .pipeline import (
        _device,
        build_data,
        build_model,
        check_base_accuracy,
        load_model_dir,
        model_dir_defaults,
    )

    config = model_dir_defaults(config)
    data = build_data(config, need_train=False, need_stats=False)
    found = None
    if config.get("model_dir"):
        model, _, found = load_model_dir(config["model_dir"], config, data.num_classes,
                                         config.get("weights") or "final")
    else:
        if not config.get("model"):
            raise ConfigError("give --model (and --checkpoint) or --model-dir")
        model = build_model(config, data.num_classes)
    device = _device(config)
    result = evaluate(model.to(device), data.val, device=device,
                      progress=not config.get("no_progress"))
    doc = result.to_dict()
    if found is not None:
        doc.update(weights=found.kind, weights_file=str(found.weights))
    elif config.get("checkpoint"):
        check_base_accuracy(config, result.top1, len(data.val.dataset))
    _say(json.dumps(doc, indent=1))


def _cmd_run(config: dict[str, Any]) -> None:
    from .pipeline import (
        build_data,
        build_model,
        check_ignore_layers,
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
        finish_report(run, config, summary, finetuned=result.best_acc)
    _say(f"fine-tuned: best top-1 {result.best_acc:.2f}%\nreport: {run.path / 'report.md'}")


def _compare_line(r: dict[str, Any]) -> str:
    name = f"{r['criterion']:>9s}{'' if r['seed'] is None else r['seed']}"
    head = f"{name} -{100 * r['macs_target']:.0f}% MACs: "
    if r.get("status") == "unreachable":
        return head + f"unreachable ({r['error']})"
    parts = [f"{r['acc_pruned']:.2f}% pruned"]
    for key, label in (("acc_recalibrated", "after BN recalibration"),
                       ("acc_finetuned", "fine-tuned")):
        if not math.isnan(r.get(key, math.nan)):
            parts.append(f"{r[key]:.2f}% {label}")
    return head + ", ".join(parts)


def _cmd_compare(config: dict[str, Any]) -> None:
    import torch

    from .compare import compare_criteria, write_comparison
    from .criteria import criterion_names
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
    done: list[dict[str, Any]] = []
    previous = run.path / "compare.json"
    if config.get("resume") and previous.is_file():
        try:
            done = list(json.loads(previous.read_text())["rows"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot resume: '{previous}' is not a comparison written by "
                              f"cdprune ({exc}); remove it or choose another --output-dir"
                              ) from None
        _say(f"resuming: {len(done)} finished rows in {previous} are kept", flush=True)
    meta = {k: config.get(k) for k in ("model", "checkpoint", "dataset", "epochs",
                                         "max_iters", "lr", "train_subset", "val_subset",
                                         "stop_batch", "stats_batch_size", "seed", "scope",
                                         "tap", "normalize", "allocation", "variant",
                                         "bn_recalibrate")}
    rows: list[dict[str, Any]] = []

    def on_row(row: dict[str, Any]) -> None:
        rows.append(row)
        if run.main:  # tables after every finished criterion: nothing is lost on a stop
            write_comparison(run.path, [*rows, *(r for r in done if r not in rows)], meta)
        _say(_compare_line(row), flush=True)

    with run:
        run.write_config(config)
        fields = TrainConfig.__dataclass_fields__
        budget = TrainConfig(**{k: config[k] for k in fields if config.get(k) is not None})
        all_rows = compare_criteria(
            model, train_loader=data.train, val_loader=data.val, stats_loader=data.stats,
            example_inputs=torch.randn(2, *data.input_size), macs_reductions=targets,
            criteria=config.get("criteria") or criterion_names(), finetune=budget,
            output_dir=run.path, random_seeds=config.get("random_seeds") or (0, 1, 2),
            stats_max_batches=config.get("stop_batch"), num_classes=data.num_classes,
            coe=config.get("coe") or 0.0, scope=config.get("scope") or "auto",
            cdp_options={k: v for k, v in {**options["stats"], **options["scores"]}.items()
                         if k in ("tap", "normalize", "variant")},
            allocation=options["prune"].get("allocation", "global"),
            device=_device(config), progress=not config.get("no_progress"),
            on_row=on_row, done=done, bn_recalibrate=int(config.get("bn_recalibrate") or 0),
            recal_loader=data.recal)
        _, md = write_comparison(run.path, all_rows, meta)
    _say(md.read_text())


def _cmd_models(config: dict[str, Any]) -> None:
    from .models import list_models, model_spec

    for name in list_models():
        spec = model_spec(name)
        _say(f"{name:16s} input {tuple(spec.input_size)}  classes {spec.num_classes}")


def _cmd_demo(config: dict[str, Any]) -> None:
    from .demo import run_demo

    run_demo(config.get("output_dir") or "runs/demo", quick=bool(config.get("quick")),
             overwrite=bool(config.get("overwrite")), progress=not config.get("no_progress"),
             printer=_say)


def _cmd_export(config: dict[str, Any]) -> None:
    import tempfile

    from .export import check_output, compare_latency, export
    from .fileio import atomic_write_text
    from .models import create_model
    from .pipeline import load_model_dir

    if not config.get("model_dir"):
        raise ConfigError("--model-dir is required: a run directory, or a pruned model "
                          "directory written by `cdprune prune`")
    model, plan, found = load_model_dir(config["model_dir"], {**config, "model": None}, None,
                                        config.get("weights") or "final")
    name = plan.get("zoo_model")
    if not name or not plan.get("input_size"):
        raise ConfigError(f"'{found.pruned_dir}' holds a user model; export it from Python "
                          "with cdprune.export.export(model, path, input_size=...)")
    num_classes = (plan.get("extra") or {}).get("num_classes")
    fmt = config["format"]
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    folder = found.weights.parent if found.kind in ("best", "last") else found.pruned_dir
    out = check_output(config.get("output") or folder / f"model{suffix}", fmt)
    size = tuple(plan["input_size"])
    dynamic = not config.get("static_batch")
    result = export(model, out, format=fmt, input_size=size, opset=config["opset"],
                    dynamic_batch=dynamic)
    summary = {**result.to_dict(), "weights": found.kind, "weights_file": str(found.weights),
               "dynamic_batch": dynamic or fmt == "torchscript"}
    record = out.parent / f"export_{fmt}.json"  # written now, completed after the timing
    atomic_write_text(record, json.dumps(summary, indent=1) + "\n")
    _say(f"exported {out} ({result.size_bytes / 1e6:.2f} MB) from the {found.kind} weights "
         f"({found.weights}); largest difference from its PyTorch outputs "
         f"{result.max_abs_diff:.1e}")
    if not config.get("no_latency"):
        import torch

        threads = torch.get_num_threads()
        warmup, repeats = 10, 50
        with tempfile.TemporaryDirectory() as tmp:
            # The unpruned architecture, exported the same way; latency does not depend on
            # the weight values, so its initial weights serve (no verification needed).
            base = export(create_model(name, num_classes=num_classes).eval(),
                          Path(tmp) / f"base{suffix}", format=fmt, input_size=size,
                          opset=config["opset"], dynamic_batch=dynamic, checks=0)
            lat = compare_latency({"base": base.path, "pruned": result.path}, fmt, size,
                                  warmup=warmup, repeats=repeats, threads=threads)
        summary.update(base_size_bytes=base.size_bytes,
                       latency_base_ms=round(1e3 * lat["base"], 3),
                       latency_pruned_ms=round(1e3 * lat["pruned"], 3),
                       speedup=round(lat["base"] / lat["pruned"], 3),
                       latency_method=f"batch 1, CPU, {threads} threads for both, median of "
                       f"{repeats} interleaved runs after {warmup} warm-up runs")
        _say(f"{fmt} latency ({summary['latency_method']}): unpruned {name} "
             f"{summary['latency_base_ms']:.3f} ms, pruned {summary['latency_pruned_ms']:.3f} "
             f"ms ({summary['speedup']:.2f}x)")
        atomic_write_text(record, json.dumps(summary, indent=1) + "\n")


COMMANDS = {"stats": _cmd_stats, "prune": _cmd_prune, "finetune": _cmd_finetune,
            "eval": _cmd_eval, "run": _cmd_run, "export": _cmd_export,
            "compare": _cmd_compare, "demo": _cmd_demo, "models": _cmd_models}


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (some errors quote multi-line library messages)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


_OS_HINTS = {
    errno.EROFS: "the file system is read-only; choose another --output-dir",
    errno.EACCES: "permission denied; check the permissions or choose another path",
    errno.EPERM: "permission denied; check the permissions or choose another path",
    errno.ELOOP: "a symbolic link on the way loops; fix the link or choose another path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder, not a file; check the path",
    errno.ENOENT: "it does not exist; check the path",
}


def _describe(exc: BaseException, command: str) -> str:
    """One line that says what went wrong and how to go on."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing '{exc.filename}'" if exc.filename else ""
        again = ("run the same command with --resume (fine-tuning continues from the last "
                 "finished epoch) or --overwrite" if command in ("run", "finetune")
                 else "run the same command with --overwrite")
        return (f"no space left on device{where}: the disk is full; free some space and "
                f"{again}, or choose another --output-dir; files written before are intact")
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        where = f" '{exc.filename}'" if exc.filename else ""
        hint = _OS_HINTS.get(exc.errno, "check the path and the disk")
        return f"cannot use{where}: {exc.strerror}; {hint}"
    if isinstance(exc, FloatingPointError):  # training diverged
        # The library's advice names Python options; the command's flags replace it.
        return f"{_one_line(exc).split('; lower lr')[0]}; lower --lr or check the data"
    if isinstance(exc, RecursionError):
        return "an input file is nested too deeply to be read; check the files given"
    if isinstance(exc, MemoryError):
        return ("out of memory while reading the input; check the files given, or lower "
                "--batch-size / --stop-batch")
    return _one_line(exc)


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
        return _main(args, debug)
    except KeyboardInterrupt:
        print("cdprune: interrupted", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace, debug: bool) -> int:
    try:
        config = resolve_config(args)
        if not sys.stderr.isatty():  # logs and pipes get plain log lines, no \r bars
            config["no_progress"] = True
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
    except KeyboardInterrupt:
        raise
    except (CdpruneError, ValueError, OSError, FloatingPointError, RecursionError,
            MemoryError) as exc:
        # The one error boundary: whatever bad input, a bad file or the file system did,
        # the user gets one line and exit code 2; --debug shows the traceback.
        if debug:
            raise
        print(f"cdprune {args.command}: error: {_describe(exc, args.command)}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
