"""The ``cdprune`` command: statistics, pruning, fine-tuning, evaluation, the demo.

This module parses the command line and is the one error boundary; what each subcommand
does is in :mod:`cdprune.cli.commands`. Only these two modules print. Errors a user can
cause become one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import CdpruneError, ConfigError
from ..export import ExportConfig
from ..finetune.config import TrainConfig
from ..importance.config import StatsConfig
from ..pruning.config import CompactConfig, PruneConfig
from ..runs.config import DataConfig, ModelConfig, RunConfig, RunOptions, validate
from .commands import COMMANDS, set_rank
from .flags import add_options, finite_float, render

__all__ = ["build_parser", "main"]

logger = logging.getLogger("cdprune")

# Every option's default, from the run's typed configuration (training: the paper's CIFAR
# recipe).
DEFAULTS: dict[str, Any] = RunConfig.defaults()
# A command's own inputs: not options of the run, so kept out of the defaults, of the YAML
# config and of every run's identity.
COMMAND_INPUTS = ("model_dir", "stats", "removed_filters", "quick", "macs_targets", "criteria",
                  "random_seeds", *(f.name for f in dataclasses.fields(ExportConfig)))


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


def _add_common(p: argparse.ArgumentParser, uses: Sequence[str]) -> None:
    """The flags of the run; ``uses`` picks among "output" (the run directory), "seed"
    and "device". A flag the command does not read is accepted (one set of flags serves
    every step of a script) but left out of its ``--help``."""
    g = p.add_argument_group("run")
    g.add_argument("-c", "--config", help="YAML file whose keys set defaults for these flags "
                   "(keys: flag names, with dashes or underscores)")
    hidden = [*(() if "output" in uses else ("output_dir", "overwrite")),
              *(() if "seed" in uses else ("seed",)),
              *(() if "device" in uses else ("device",))]
    add_options(g, RunOptions, skip=("resume",), hidden=hidden)
    g.add_argument("--gpus", metavar="N[,N...]", help=argparse.SUPPRESS if "device" not in uses
                   else "the CDP scripts' GPU list: one index is --device cuda:N; several GPUs "
                   "run under torchrun")
    g.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def _add_model(p: argparse.ArgumentParser) -> None:
    add_options(p.add_argument_group("model"), ModelConfig, skip=("weights",))


def _add_data(p: argparse.ArgumentParser, uses: Sequence[str] = ("train", "val")) -> None:
    """The data flags; ``uses`` says which splits the command reads beyond the sampled
    statistics images: "train" (fine-tuning) and "val" (evaluation)."""
    hidden = [*(() if uses else ("batch_size", "eval_batch_size")),
              *(() if "train" in uses else ("train_subset", "val_split")),
              *(() if "val" in uses else ("val_subset",))]
    what = "training" if "train" in uses else "evaluation"
    add_options(p.add_argument_group("data"), DataConfig, skip=("cutout",), hidden=hidden,
                help={"batch_size": f"{what} batch size (default: {DEFAULTS['batch_size']})"})


def _add_stats(p: argparse.ArgumentParser) -> None:
    add_options(p.add_argument_group("statistics"), StatsConfig)


def _add_prune(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning")
    add_options(g, PruneConfig, skip=_AFTER_PRUNING)
    g.add_argument("--stats", help="statistics file (default: <output-dir>/stats.safetensors)")
    add_options(g, PruneConfig, only=_AFTER_PRUNING)


_AFTER_PRUNING = ("bn_recalibrate", "no_eval")


def _add_train(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning")
    add_options(g, TrainConfig)
    add_options(g, DataConfig, only=("cutout",))
    add_options(g, RunOptions, only=("resume",))


def _add_compact(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compaction")
    g.add_argument("--removed-filters", metavar="JSON", help="the masked filters: a JSON file "
                   "{conv name: [filter indices]}, or a report.json holding removed_filters "
                   "(--checkpoint holds the masked network's weights)")
    add_options(g, CompactConfig, skip=("compact_recalibrate",))  # it has --bn-recalibrate
    add_options(g, PruneConfig, only=_AFTER_PRUNING)
    g = p.add_argument_group("fine-tuning (with --compact-epochs)")
    add_options(g, TrainConfig, skip=("epochs",))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cdprune`` command."""
    parser = _Parser(
        prog="cdprune", description="Prune convolutional networks with CDP "
        "(class-wise discriminative power): statistics, scores, physical pruning, fine-tuning.")
    from ..importance.criteria import criterion_names
    from ..version import __version__

    parser.add_argument("--version", action="version", version=f"cdprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train, val, everything = ("train", "val"), ("val",), ("output", "seed", "device")
    # command: (help, flag groups, data splits it reads, run flags it uses)
    specs = {
        "stats": ("collect activation statistics and CDP scores (step 1)",
                  (_add_model, _add_stats), (), everything),
        "prune": ("prune a checkpoint with a statistics file (step 2)",
                  (_add_model, _add_stats, _add_prune), train, everything),
        "finetune": ("fine-tune a pruned model directory (step 3)", (_add_model, _add_train),
                     train, everything),
        "eval": ("evaluate a checkpoint or a pruned model directory", (_add_model,), val,
                 ("device",)),
        "run": ("statistics, pruning and fine-tuning in one go",
                (_add_model, _add_stats, _add_prune, _add_train), train, everything),
        "compact": ("turn a masked network (filters zeroed, as the published CDP code "
                    "prunes) into a physically smaller one", (_add_model, _add_compact), train,
                    everything),
        "export": ("export a pruned model to ONNX or TorchScript, verified", (), None, ()),
        "compare": ("prune with several criteria at equal MACs and compare accuracy",
                    (_add_model, _add_stats, _add_train), train, everything),
        "demo": ("the offline demo on scikit-learn's digits", (), None, ("output", "seed")),
        "models": ("list the model zoo", (), None, None),
    }
    for name, (help_text, adders, splits, uses) in specs.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           argument_default=None)
        for add in adders[:1]:
            add(p)
        if splits is not None:
            _add_data(p, splits)
        for add in adders[1:]:
            add(p)
        if name in ("finetune", "eval", "export"):
            p.add_argument("--model-dir", help="run directory (its final model), fine-tune "
                           "directory, or pruned model directory (plan.json + weights)")
            final = "pruned" if name == "finetune" else "final"
            add_options(p, ModelConfig, only=("weights",), help={"weights": (
                "which weights of --model-dir: final (the last epoch, last.pth, when "
                "fine-tuning ran, else the pruned model), best (best.pth: chosen on the test "
                f"set unless --val-split), last or pruned (default {final})")})
        if name == "export":
            add_options(p, ModelConfig, only=("checkpoint",), help={
                "checkpoint": "weights of the pruned model to export instead of the run's own"})
            add_options(p, ExportConfig)
        if name == "run":
            add_options(p.add_argument_group("the deployable network (masked runs)"),
                        CompactConfig, only=("compact_recalibrate",))
        if name == "compare":
            g = p.add_argument_group("comparison")
            g.add_argument("--macs-reduction", type=finite_float, nargs="+", dest="macs_targets",
                           help="one or more MACs targets, e.g. 0.3 0.5 0.7")
            g.add_argument("--criteria", "--criterion", nargs="+", dest="criteria",
                           help="default: all of " + " ".join(criterion_names()))
            g.add_argument("--random-seeds", type=int, nargs="+", help="default 0 1 2")
            add_options(g, PruneConfig, only=("scope", "allocation", "bn_recalibrate",
                                              "prune_mode"))
            add_options(g, CompactConfig, only=("compact_recalibrate",))
        if name == "demo":
            p.add_argument("--quick", action="store_true", help="shorter run (smoke test)")
            add_options(p, PruneConfig, only=("criterion",))
        if uses is not None:
            _add_common(p, uses)
    return parser


def yaml_names(command: str) -> dict[str, str]:
    """The names a YAML config may give an option of ``command``: every long flag of it,
    without its dashes (``lr-scheduler``, ``lr_scheduler``), mapped to the option; the
    command's own inputs (``model_dir``, ``stats``...) included."""
    sub = next(a for a in build_parser()._actions
               if isinstance(a, argparse._SubParsersAction)).choices[command]
    names = {}
    for action in sub._actions:
        if action.dest in DEFAULTS or action.dest in COMMAND_INPUTS:
            for text in action.option_strings:
                if text.startswith("--"):
                    names.setdefault(text[2:].replace("-", "_"), action.dest)
    return names


def _official_flags(args: argparse.Namespace) -> None:
    """The CDP scripts' ``--gpus`` and ``--resume PATH``, as the flags they mean here."""
    gpus = getattr(args, "gpus", None)
    if gpus is not None:
        ids = [s.strip() for s in gpus.split(",")]
        if not all(i.isdigit() for i in ids):
            raise ConfigError(f"--gpus {gpus!r} is invalid; give GPU indices such as 0 or 0,1")
        if len(ids) > 1:
            raise ConfigError(
                f"--gpus {gpus} names {len(ids)} GPUs, but cdprune runs one process per GPU; "
                f"start it with CUDA_VISIBLE_DEVICES={gpus} torchrun --nproc_per_node "
                f"{len(ids)} -m cdprune.cli {args.command} ...")
        device = f"cuda:{ids[0]}"
        if args.device not in (None, device):
            raise ConfigError(f"--gpus {gpus} and --device {args.device} disagree; give one")
        args.device = device
    resume = getattr(args, "resume", None)
    if isinstance(resume, str):
        if args.command != "finetune":
            raise ConfigError(f"--resume {resume}: a path names the pruned model's weights to "
                              "fine-tune, which `cdprune finetune --model-dir DIR` does; here "
                              "--resume takes no value (it continues the output directory)")
        if args.checkpoint not in (None, resume):
            raise ConfigError(f"--resume {resume} and --checkpoint {args.checkpoint} name "
                              "different weights; give one")
        args.checkpoint, args.resume = resume, None


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the YAML config, then the flags given on the command line; checked."""
    from .yamlfile import load_yaml

    _official_flags(args)
    config = dict(DEFAULTS)
    if getattr(args, "config", None):
        names = yaml_names(args.command)
        inputs = {k: None for k in COMMAND_INPUTS if k in names.values()}
        config.update(load_yaml(args.config, {**DEFAULTS, **inputs}, names=names))
        config["config"] = str(args.config)  # an input: --overwrite never clears it
    for key, value in vars(args).items():
        if key in DEFAULTS and value is not None:
            config[key] = value
    for key in COMMAND_INPUTS:
        if getattr(args, key, None) is not None:
            config[key] = getattr(args, key)
    config["command"] = command = args.command
    validate(config, need_target=command in ("prune", "run"))
    _check_command(config)
    return config


def _check_command(config: dict[str, Any]) -> None:
    """What each command needs beyond valid options."""
    command, get = config["command"], config.get
    if command in ("stats", "prune", "run", "compact") and not get("model"):
        raise ConfigError("--model is required (see `cdprune models`)")
    if command == "compact" and not get("removed_filters"):
        raise ConfigError("--removed-filters is required: a JSON file mapping conv names to "
                          "the masked filters' indices (or a report.json holding "
                          "removed_filters)")
    if command in ("stats", "prune", "run", "compare", "compact") and not get(
            "checkpoint") and not get("random_init"):
        raise ConfigError(f"--checkpoint is missing: {command} needs the trained weights of the "
                          "base model; pass --checkpoint FILE, or --random-init to use randomly "
                          "initialised weights on purpose")


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
    if isinstance(exc, CdpruneError) and exc.template:  # options named: show their flags
        return " ".join(render(exc).split())
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
        if args.command in ("run", "finetune", "compare"):
            hint = ("; finished work is kept: run the same command with --resume to "
                    "continue it")
        else:
            hint = "; run the same command with --overwrite to start it again"
        print(f"cdprune {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace, debug: bool) -> int:
    try:
        config = resolve_config(args)
        if not sys.stderr.isatty():  # logs and pipes get plain log lines, no \r bars
            config["no_progress"] = True
        from ..progress import set_log_interval

        set_log_interval(config["log_interval"])
        from ..finetune.distributed import cleanup, init_distributed

        info = init_distributed()  # a no-op unless started by torchrun
        set_rank(info.rank)
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
