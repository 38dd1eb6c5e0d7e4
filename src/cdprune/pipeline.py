"""The three stages wired together: statistics, pruning, fine-tuning, with a run directory.

Each stage is a function taking a plain config mapping (what the CLI resolves from flags
and YAML) and a run directory, so the same runs are available from Python. Every stage
writes its outputs atomically and records what it did in ``report.json``/``report.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoint import apply_weights, atomic_write_text, read_state_dict
from .distributed import barrier
from .errors import CheckpointError, ConfigError, DataError
from .report import environment, plot_scores, plot_training, plot_widths, write_report
from .rundir import RunDir

if TYPE_CHECKING:
    from .stats import ActivationStats

__all__ = ["RunDir", "build_data", "build_model", "check_ignore_layers", "gather_stats",
           "load_stats", "run_finetune", "run_prune", "run_stats", "write_stats"]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------- building blocks
def _device(config: Mapping[str, Any]) -> torch.device:
    default = "cpu"
    if torch.cuda.is_available():
        default = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"  # torchrun: one GPU per rank
    name = config.get("device") or default
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a valid device; use cpu, cuda or cuda:N"
                          ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but CUDA is not available; use "
                          "--device cpu")
    return device


def build_model(config: Mapping[str, Any], num_classes: int | None = None) -> nn.Module:
    """The base model named in the config, with its checkpoint loaded when one is given.

    Raises:
        DataError: the checkpoint's classifier has another number of outputs than the
            dataset has classes (``num_classes``).
    """
    from .models import create_model

    model = create_model(config["model"], num_classes=num_classes)
    if config.get("dataset"):
        from .config_io import check_input_channels

        check_input_channels(config, model)
    if config.get("checkpoint"):
        state = read_state_dict(config["checkpoint"])
        if num_classes is not None:
            _check_classifier(model, state, config, num_classes)
        apply_weights(model, state, source=config["checkpoint"])
    return model


def _check_classifier(model: nn.Module, state: Mapping[str, torch.Tensor],
                      config: Mapping[str, Any], num_classes: int) -> None:
    """A checkpoint trained for N classes cannot serve a dataset of M != N classes."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1][1].out_features != num_classes:
        return  # no recognisable classifier: the key/shape check of apply_weights decides
    key = f"{linears[-1][0]}.weight"
    rows = state[key].shape[0] if key in state and state[key].dim() == 2 else num_classes
    if rows != num_classes:
        dataset = config.get("dataset")
        raise DataError(f"checkpoint '{config['checkpoint']}' has a {rows}-class classifier "
                        f"('{key}' has {rows} outputs) but dataset '{dataset}' has "
                        f"{num_classes} classes; use a checkpoint trained on {dataset}, or the "
                        "--dataset the checkpoint was trained on")


def _given(config: Mapping[str, Any], key: str, default: Any) -> Any:
    """The value the config sets, even a falsy one; ``default`` only when it sets none."""
    value = config.get(key)
    return default if value is None else value


def check_ignore_layers(config: Mapping[str, Any], model: nn.Module) -> None:
    """Refuse ``--ignore-layers`` names that are not modules of the model (before any work).

    Also refuses a ``--round-to`` no layer is wide enough for (see
    :func:`cdprune.config_io.check_round_to`).
    """
    import difflib

    from .config_io import check_round_to

    check_round_to(config, model)
    named = [name for name, _ in model.named_modules() if name]
    for name in config.get("ignore_layers") or ():
        if name not in named:
            close = difflib.get_close_matches(name, named, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else \
                f"module names look like {', '.join(named[:3])}"
            raise ConfigError(f"--ignore-layers: '{name}' is not a layer of "
                              f"{config.get('model')}; {hint}")


@dataclass
class Data:
    """Datasets and loaders of one run."""

    num_classes: int
    input_size: tuple[int, ...]
    train: Any
    val: Any
    stats: Any


def build_data(config: Mapping[str, Any], *, need_train: bool = True,
               need_stats: bool = True) -> Data:
    """Datasets for statistics, fine-tuning and evaluation, as the config describes."""
    from .data import build_dataset, build_loader, check_num_classes, dataset_info, subset

    name = config["dataset"]
    num_classes, input_size, mean, std = dataset_info(name)
    mean = tuple(config.get("mean") or mean)
    std = tuple(config.get("std") or std)
    common = dict(mean=mean, std=std, download=bool(config.get("download")))
    root = config.get("data_root")
    workers = int(config.get("workers") or 0)
    seed = int(config.get("seed") or 0)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()

    val_set = build_dataset(name, root, train=False, **common)
    check_num_classes(val_set, num_classes)
    val = build_loader(val_set, config.get("eval_batch_size") or config["batch_size"],
                       shuffle=False, workers=workers, seed=seed, distributed=distributed)
    train = stats = None
    if need_train:
        train_set = build_dataset(name, root, train=True, cutout=bool(config.get("cutout")),
                                  **common)
        check_num_classes(train_set, num_classes)
        if config.get("train_subset"):
            train_set = subset(train_set, min(len(train_set), config["train_subset"]), seed)
        # A last batch of one image cannot train BatchNorm on 1x1 feature maps: drop it.
        single = len(train_set) > config["batch_size"] and \
            len(train_set) % config["batch_size"] == 1
        train = build_loader(train_set, config["batch_size"], shuffle=True, workers=workers,
                             seed=seed, drop_last=single, distributed=distributed)
    if need_stats:
        # Statistics read un-augmented training images, a seeded random sample of them.
        stats_set = build_dataset(name, root, train=True, augment=False, **common)
        batch = config.get("stats_batch_size") or config["batch_size"]
        stop = config.get("stop_batch")
        if stop and stop * batch > len(stats_set):
            logger.warning("--stop-batch %d asks for %d batches of %d images, but the training "
                           "set has only %d images (%d batches); using all of them", stop, stop,
                           batch, len(stats_set), math.ceil(len(stats_set) / batch))
        elif stop:
            stats_set = subset(stats_set, stop * batch, seed)
        stats = build_loader(stats_set, batch, shuffle=False, workers=workers, seed=seed,
                             distributed=distributed)
    return Data(num_classes, tuple(input_size), train, val, stats)


def _example(input_size: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(2, *input_size)


def _metric(result: Any) -> float:
    return float(result.top1)


# ---------------------------------------------------------------------- stages
def cdp_options(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The CDP options a config sets, per stage: ``stats``, ``scores`` and ``prune``.

    Options the config leaves unset are omitted, so the library's defaults apply.
    ``variant: published`` reaches every stage and wins over the individual options.
    """
    variant = config.get("variant") or None
    stats = {"documents": config.get("documents"), "tap": config.get("tap"),
             "variant": variant}
    scores = {"coe": config.get("coe") or 0.0, "normalize": config.get("normalize"),
              "variant": variant}
    prune = {"allocation": "global" if variant == "published" else config.get("allocation")}
    return {stage: {k: v for k, v in opts.items() if v is not None}
            for stage, opts in (("stats", stats), ("scores", scores), ("prune", prune))}


def gather_stats(config: Mapping[str, Any], data: Data, model: nn.Module) -> ActivationStats:
    """Collect the activation statistics the config asks for; nothing is written."""
    from .stats import collect_stats

    device = _device(config)
    model.to(device)
    started = time.perf_counter()
    # build_data already sampled stop_batch batches of images (split across ranks under
    # torchrun), so the loader is used whole.
    stats = collect_stats(model, data.stats, **cdp_options(config)["stats"],
                          num_classes=data.num_classes, device=device,
                          dtype=torch.float16 if config.get("stats_dtype") == "float16"
                          else torch.float32, progress=not config.get("no_progress"))
    stats.meta.update(model=config["model"], dataset=config["dataset"],
                      seconds=round(time.perf_counter() - started, 2))
    return stats


def write_stats(run: RunDir, config: Mapping[str, Any], stats: ActivationStats) -> Path:
    """Write ``stats.safetensors``, ``scores.safetensors`` and ``scores.png`` (rank 0 only)."""
    from .scoring import tfidf_scores

    path = run.path / "stats.safetensors"
    if run.main:
        stats.save(path)
        scores = tfidf_scores(stats, **cdp_options(config)["scores"])
        _save_scores(run.path / "scores.safetensors", scores)
        plot_scores(run.path / "scores.png", scores)
    return path


def run_stats(config: Mapping[str, Any], run: RunDir, data: Data | None = None,
              model: nn.Module | None = None) -> Path:
    """Collect activation statistics and write ``stats.safetensors`` and ``scores.safetensors``."""
    data = data or build_data(config, need_train=False)
    model = model or build_model(config, data.num_classes)
    path = write_stats(run, config, gather_stats(config, data, model))
    barrier()  # other ranks read the file next
    return path


def _save_scores(path: Path, scores: Mapping[str, torch.Tensor]) -> None:
    from .checkpoint import save_weights

    save_weights({k: v.contiguous() for k, v in scores.items()}, path)


def load_stats(config: Mapping[str, Any], model: nn.Module,
               path: str | os.PathLike | None = None) -> ActivationStats:
    """The statistics file of ``--stats`` (or ``path``), checked against ``model``."""
    from .stats import ActivationStats

    if not path and not config.get("stats") and not config.get("output_dir"):
        raise ConfigError("--stats is required: the statistics file `cdprune stats` wrote")
    path = path or config.get("stats") or Path(config["output_dir"]) / "stats.safetensors"
    return ActivationStats.load(path, model=model)


def run_prune(config: Mapping[str, Any], run: RunDir, *, data: Data | None = None,
              model: nn.Module | None = None, stats_path: str | os.PathLike | None = None,
              stats: ActivationStats | None = None, save_stats: bool = False
              ) -> dict[str, Any]:
    """Prune the base model with CDP scores; write ``pruned/``.

    The statistics come from ``stats`` when given, else from ``stats_path``, ``--stats``
    or ``<run>/stats.safetensors``. With ``save_stats`` they are written to the run
    directory too, but only once pruning succeeded: a target that cannot be reached
    leaves no files behind.

    Returns the pruning summary (``PruneResult.summary()``) with accuracies added.
    """
    from .evaluate import evaluate
    from .pruning import prune, save_pruned
    from .scoring import tfidf_scores

    data = data or build_data(config, need_train=False, need_stats=False)
    model = model or build_model(config, data.num_classes)
    if stats is None:
        stats = load_stats(config, model, stats_path or config.get("stats")
                           or run.path / "stats.safetensors")
    options = cdp_options(config)
    scores = tfidf_scores(stats, **options["scores"])
    device = _device(config)
    result = prune(model, scores, example_inputs=_example(data.input_size),
                   sparsity=config.get("sparsity"), macs_reduction=config.get("macs_reduction"),
                   ignored_layers=config.get("ignore_layers") or None,
                   scope=config.get("scope") or "auto",
                   max_layer_pruning=_given(config, "max_layer_pruning", 0.9),
                   round_to=config.get("round_to") or None, **options["prune"])
    if save_stats:
        write_stats(run, config, stats)
    if run.main:
        save_pruned(run.path / "pruned", result, model_name=config["model"],
                    input_size=data.input_size,
                    extra={"dataset": config["dataset"], "num_classes": data.num_classes,
                           "mean": config.get("mean"), "std": config.get("std")})
        plot_widths(run.path / "widths.png", result.widths_before, result.widths_after)
    summary = result.summary()
    progress = not config.get("no_progress")
    if not config.get("skip_eval"):
        summary["acc_base"] = _metric(evaluate(model.to(device), data.val, device=device,
                                               progress=progress))
        summary["acc_pruned"] = _metric(evaluate(result.model.to(device), data.val,
                                                 device=device, progress=progress))
    if run.main:
        atomic_write_text(run.path / "prune_summary.json", json.dumps(summary, indent=1) + "\n")
    barrier()
    return summary


def run_finetune(config: Mapping[str, Any], run: RunDir, *, data: Data | None = None,
                 model: nn.Module | None = None, plan: Mapping[str, Any] | None = None
                 ) -> Any:
    """Fine-tune ``model`` (by default the pruned model in ``run/pruned``)."""
    from .train import TrainConfig, fine_tune

    data = data or build_data(config, need_stats=False)
    if model is None:
        model, plan = load_pruned_dir(config.get("model_dir") or run.path, config,
                                      data.num_classes)
    fields = TrainConfig.__dataclass_fields__
    train_cfg = TrainConfig(**{k: config[k] for k in fields if config.get(k) is not None})
    result = fine_tune(model, data.train, data.val, train_cfg, output_dir=run.path,
                       device=_device(config), resume=bool(config.get("resume")),
                       extra_state={"plan": dict(plan)} if plan else None,
                       progress=not config.get("no_progress"))
    if result.history and run.main:
        plot_training(run.path / "training.png", result.history)
    return result


def pruned_dir(path: str | os.PathLike) -> Path:
    """The pruned-model directory: ``path`` itself or the ``pruned/`` of a run directory."""
    path = Path(path)
    return path / "pruned" if (path / "pruned" / "plan.json").is_file() else path


def load_pruned_dir(path: str | os.PathLike, config: Mapping[str, Any],
                    num_classes: int | None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the pruned model saved under ``path`` (a run or pruned-model directory).

    Raises:
        ConfigError: ``--model`` names another architecture than the plan was made for.
        DataError: the pruned model has another number of classes than the dataset.
        CheckpointError: the plan or the weights do not fit the base model.
    """
    from .pruning import load_pruned, read_plan

    directory = pruned_dir(path)
    plan = read_plan(directory)
    zoo = plan.get("zoo_model")
    asked = config.get("model")
    if asked and zoo and str(asked).lower() != str(zoo).lower():
        raise ConfigError(f"--model {asked} does not match the model '{directory}' was pruned "
                          f"from ({zoo}); leave out --model or pass --model {zoo}")
    name = asked or zoo
    if not name:
        raise ConfigError(f"'{directory}' holds a user model; pass --model with a zoo name, "
                          "or load it from Python with cdprune.load_pruned")
    planned = (plan.get("extra") or {}).get("num_classes")
    if num_classes is not None and isinstance(planned, int) and planned != num_classes:
        dataset = (plan.get("extra") or {}).get("dataset") or "its own dataset"
        raise DataError(f"the pruned model in '{directory}' has {planned} classes but dataset "
                        f"'{config.get('dataset')}' has {num_classes}; use it with "
                        f"--dataset {dataset}")
    base = build_model({**config, "model": name, "checkpoint": None}, num_classes)
    try:
        return load_pruned(directory, base), plan
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (pruned model '{directory}'); prune {name} again with "
                              "`cdprune prune`, or point --model-dir at a directory pruned "
                              f"from {name}") from None


def finish_report(run: RunDir, config: Mapping[str, Any], summary: Mapping[str, Any] | None,
                  finetuned: float | None = None, latency: Mapping[str, Any] | None = None
                  ) -> tuple[Path, Path]:
    """Write ``report.json``/``report.md`` for what the run did (rank 0 only)."""
    if not run.main:
        return run.path / "report.json", run.path / "report.md"
    accuracy = {}
    if summary:
        for key, src in (("base", "acc_base"), ("pruned", "acc_pruned")):
            if summary.get(src) is not None:
                accuracy[key] = summary[src]
    if finetuned is not None and not math.isnan(finetuned):
        accuracy["finetuned"] = finetuned
    plots = [p.name for p in sorted(run.path.glob("*.png"))]
    return write_report(run.path, {
        "title": f"{config.get('model')} on {config.get('dataset')}",
        "pruning": dict(summary) if summary else None, "accuracy": accuracy,
        "latency": dict(latency or {}), "config": dict(config), "plots": plots,
        "environment": environment(), "seed": config.get("seed"),
    })


@contextmanager
def timed(label: str):
    """Log how long a stage took."""
    started = time.perf_counter()
    yield
    logger.info("%s took %.1f s", label, time.perf_counter() - started)
