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

from .checkpoint import apply_weights, read_state_dict
from .distributed import barrier
from .errors import CheckpointError, ConfigError, DataError
from .fileio import atomic_write_text
from .report import environment, plot_scores, plot_training, plot_widths, write_report
from .rundir import RunDir
from .suggest import did_you_mean

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
        hint = (f"; for class folders with {rows} classes use --dataset folder"
                if str(dataset).lower() == "imagenet" else "")
        raise DataError(f"checkpoint '{config['checkpoint']}' has a {rows}-class classifier "
                        f"('{key}' has {rows} outputs) but dataset '{dataset}' has "
                        f"{num_classes} classes; use a checkpoint trained on {dataset}, or the "
                        f"--dataset the checkpoint was trained on{hint}")


def _given(config: Mapping[str, Any], key: str, default: Any) -> Any:
    """The value the config sets, even a falsy one; ``default`` only when it sets none."""
    value = config.get(key)
    return default if value is None else value


def check_ignore_layers(config: Mapping[str, Any], model: nn.Module) -> None:
    """Refuse ``--ignore-layers`` names that are not modules of the model (before any work).

    Also refuses a ``--round-to`` no layer is wide enough for (see
    :func:`cdprune.config_io.check_round_to`).
    """
    from .config_io import check_round_to

    check_round_to(config, model)
    named = [name for name, _ in model.named_modules() if name]
    for name in config.get("ignore_layers") or ():
        if name not in named:
            hint = (did_you_mean(name, named)
                    or f"module names look like {', '.join(named[:3])}")
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
    recal: Any = None  # un-augmented training images for BatchNorm recalibration
    classes: list[str] | None = None  # class names, for --dataset folder
    mean: tuple[float, ...] | None = None  # input normalisation in use
    std: tuple[float, ...] | None = None


def build_data(config: Mapping[str, Any], *, need_train: bool = True,
               need_stats: bool = True) -> Data:
    """Datasets for statistics, fine-tuning and evaluation, as the config describes."""
    from .data import build_dataset, build_loader, check_num_classes, dataset_info, subset

    name = config["dataset"]
    num_classes, input_size, mean, std = dataset_info(name)
    known = known_normalisation(config)
    mean = tuple(config.get("mean") or (known or {}).get("mean") or mean)
    std = tuple(config.get("std") or (known or {}).get("std") or std)
    common: dict[str, Any] = dict(mean=mean, std=std, download=bool(config.get("download")))
    folder = str(name).lower() == "folder"
    if folder:  # any class folders, at the model's input size
        input_size = tuple(config.get("input_size") or _model_input_size(config))
        common["image_size"] = input_size
    root = config.get("data_root")
    workers = int(config.get("workers") or 0)
    seed = int(config.get("seed") or 0)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()

    val_set = build_dataset(name, root, train=False, **common)
    classes = list(getattr(val_set, "classes", []) or []) or None
    if folder:
        num_classes = len(classes or [])
    check_num_classes(val_set, num_classes)
    if config.get("val_subset") and config["val_subset"] < len(val_set):
        val_set = subset(val_set, config["val_subset"], seed)
    val = build_loader(val_set, config.get("eval_batch_size") or config["batch_size"],
                       shuffle=False, workers=workers, seed=seed, distributed=distributed)
    train = stats = None
    if need_train:
        train_set = build_dataset(name, root, train=True, cutout=bool(config.get("cutout")),
                                  **common)
        check_num_classes(train_set, num_classes)
        if folder and list(train_set.classes) != classes:
            raise DataError(f"the train and val folders of '{root}' hold different classes "
                            f"({len(train_set.classes)} vs {len(classes or [])}); give both "
                            "the same class folders")
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
    recal = None
    if need_train and config.get("bn_recalibrate"):
        plain = build_dataset(name, root, train=True, augment=False, **common)
        count = min(len(plain), int(config["bn_recalibrate"]))
        recal = build_loader(subset(plain, count, seed + 1),
                             config.get("stats_batch_size") or config["batch_size"],
                             shuffle=True, workers=workers, seed=seed + 1)
    return Data(num_classes, tuple(input_size), train, val, stats, recal, classes, mean, std)


def _model_input_size(config: Mapping[str, Any]) -> tuple[int, ...]:
    from .models import model_spec

    if not config.get("model"):
        raise ConfigError("--dataset folder needs --model (its input size sets the image "
                          "size) or --model-dir")
    return tuple(model_spec(config["model"]).input_size)


def known_normalisation(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """Mean and std of a recognised public ``--checkpoint`` (see ``cdprune.models.known``).

    Used when the config gives no ``--mean``/``--std`` and the checkpoint was trained on the
    config's dataset; ``None`` otherwise.
    """
    from .models.known import known_checkpoint

    if not config.get("checkpoint") or (config.get("mean") and config.get("std")):
        return None
    known = known_checkpoint(config["checkpoint"])
    if known is None or str(config.get("dataset")).lower() != known.dataset:
        return None
    logger.info("checkpoint '%s' is %s: normalising inputs with its mean %s and std %s",
                config["checkpoint"], known.name, known.mean, known.std)
    return {"mean": known.mean, "std": known.std}


def check_base_accuracy(config: Mapping[str, Any], top1: float, images: int) -> str | None:
    """Warn when a recognised checkpoint scores far below its known accuracy.

    "Far" is more than 1 point and three standard errors of ``images`` test images; the
    usual cause is another input normalisation than the checkpoint's. Returns the warning.
    """
    from .models.known import known_checkpoint

    known = known_checkpoint(config["checkpoint"]) if config.get("checkpoint") else None
    if known is None or str(config.get("dataset")).lower() != known.dataset or images <= 0:
        return None
    p = known.top1 / 100
    margin = max(1.0, 300 * math.sqrt(p * (1 - p) / images))
    if top1 >= known.top1 - margin:
        return None
    nums = " ".join(f"{v:g}" for v in known.mean), " ".join(f"{v:g}" for v in known.std)
    message = (f"base model top-1 {top1:.2f}% is far below the {known.top1:.2f}% known for "
               f"checkpoint '{config['checkpoint']}' ({known.name}); it expects inputs "
               f"normalised with --mean {nums[0]} --std {nums[1]}")
    logger.warning("%s", message)
    return message


def model_dir_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """Fill what the pruned model of ``--model-dir`` recorded: input size, mean and std.

    The values the user gave win; the run's own normalisation is the right default for
    evaluating, fine-tuning or exporting its model.
    """
    from .deploy import find_run_model
    from .pruning import read_plan

    out = dict(config)
    if not config.get("model_dir"):
        return out
    plan = read_plan(find_run_model(config["model_dir"], "pruned").pruned_dir)
    extra = plan.get("extra") or {}
    if plan.get("input_size"):
        out.setdefault("input_size", list(plan["input_size"]))
    same_data = str(extra.get("dataset") or "").lower() == str(config.get("dataset")).lower()
    if same_data and not config.get("mean") and not config.get("std") and extra.get("mean") \
            and extra.get("std"):
        out["mean"], out["std"] = list(extra["mean"]), list(extra["std"])
    return out


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
    write_classes(run, config, data)
    barrier()  # other ranks read the file next
    return path


def write_classes(run: RunDir, config: Mapping[str, Any], data: Data) -> Path | None:
    """Record the class names of a ``--dataset folder`` run in ``classes.json``.

    Output index i of the model is ``classes[i]`` (the sorted folder names).
    """
    if not run.main or str(config.get("dataset")).lower() != "folder" or not data.classes:
        return None
    return atomic_write_text(run.path / "classes.json",
                             json.dumps(list(data.classes), indent=1) + "\n")


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
    latency = None
    if config.get("latency_reduction") is not None or options["prune"].get(
            "allocation") == "latency":
        from .latency import LatencySettings
        latency = LatencySettings(batch_size=config.get("latency_batch") or 1,
                                  device="cuda" if device.type == "cuda" else "cpu")
    result = prune(model, scores, example_inputs=_example(data.input_size),
                   sparsity=config.get("sparsity"), macs_reduction=config.get("macs_reduction"),
                   latency_reduction=config.get("latency_reduction"), latency=latency,
                   ignored_layers=config.get("ignore_layers") or None,
                   scope=config.get("scope") or "auto",
                   max_layer_pruning=_given(config, "max_layer_pruning", 0.9),
                   round_to=config.get("round_to") or None, **options["prune"])
    summary = result.summary()
    if "latency" in result.extra:
        summary["latency"] = result.extra["latency"]
    progress = not config.get("no_progress")
    evaluated = not (config.get("skip_eval") or config.get("no_eval"))
    if evaluated:
        base = evaluate(model.to(device), data.val, device=device, progress=progress)
        summary["acc_base"] = _metric(base)
        check_base_accuracy(config, base.top1, base.num_samples)
        summary["acc_pruned"] = _metric(evaluate(result.model.to(device), data.val,
                                                 device=device, progress=progress))
    if config.get("bn_recalibrate"):
        # Before fine-tuning and before saving: pruned/ holds the recalibrated model.
        from .batchnorm import recalibrate_bn

        recal = data.recal or build_data({**config, "train_subset": None}, need_stats=False
                                         ).recal
        summary["bn_recalibrate_images"] = recalibrate_bn(
            result.model.to(device), recal, int(config["bn_recalibrate"]), device=device)
        if evaluated:
            summary["acc_recalibrated"] = _metric(evaluate(result.model, data.val,
                                                           device=device, progress=progress))
    if save_stats:
        write_stats(run, config, stats)
    if run.main:
        extra = {"dataset": config["dataset"], "num_classes": data.num_classes,
                 "mean": list(data.mean) if data.mean else config.get("mean"),
                 "std": list(data.std) if data.std else config.get("std")}
        if str(config["dataset"]).lower() == "folder" and data.classes:
            extra["classes"] = list(data.classes)
        write_classes(run, config, data)
        save_pruned(run.path / "pruned", result, model_name=config["model"],
                    input_size=data.input_size, extra=extra)
        plot_widths(run.path / "widths.png", result.widths_before, result.widths_after)
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
        # --checkpoint of `cdprune run` is the unpruned base model: not for these weights.
        model, plan = load_pruned_dir(config.get("model_dir") or run.path,
                                      {**config, "checkpoint": None}, data.num_classes)
    fields = TrainConfig.__dataclass_fields__
    train_cfg = TrainConfig(**{k: config[k] for k in fields if config.get(k) is not None})
    write_classes(run, config, data)
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
                    num_classes: int | None, weights: str | None = None
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the pruned model saved under ``path`` (a run or pruned-model directory).

    ``weights`` (default ``config["weights"]``, else ``"pruned"``) picks the fine-tuned or
    pruned-only weights (see :func:`cdprune.deploy.find_run_model`); ``--checkpoint`` in
    the config, when given, is loaded into the pruned architecture instead.

    Raises:
        ConfigError: ``--model`` names another architecture than the plan was made for.
        DataError: the pruned model has another number of classes than the dataset.
        CheckpointError: the plan or the weights do not fit the base model.
    """
    model, plan, _ = load_model_dir(path, config, num_classes, weights)
    return model, plan


def load_model_dir(path: str | os.PathLike, config: Mapping[str, Any],
                   num_classes: int | None, weights: str | None = None
                   ) -> tuple[nn.Module, dict[str, Any], Any]:
    """:func:`load_pruned_dir`, also returning the :class:`~cdprune.deploy.RunModel` used."""
    from .deploy import find_run_model, read_finetuned
    from .pruning import load_pruned, read_plan

    found = find_run_model(path, weights or config.get("weights") or "pruned")
    directory = found.pruned_dir
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
    if num_classes is None and isinstance(planned, int):
        num_classes = planned
    base = build_model({**config, "model": name, "checkpoint": None, "dataset": None}, num_classes)
    try:
        model = load_pruned(directory, base)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (pruned model '{directory}'); prune {name} again with "
                              "`cdprune prune`, or point --model-dir at a directory pruned "
                              f"from {name}") from None
    if config.get("checkpoint"):  # honoured, never ignored: weights of the pruned model
        from .deploy import RunModel

        source = config["checkpoint"]
        try:
            apply_weights(model, read_state_dict(source), source=source)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}. With --model-dir, --checkpoint must hold weights of "
                                  f"the pruned model (e.g. a fine-tuned best.pth), not of the "
                                  "unpruned base model; leave out --checkpoint to use the "
                                  "run's own weights") from None
        found = RunModel(directory, Path(source), "checkpoint")
    elif found.finetuned:
        apply_weights(model, read_finetuned(found, plan), source=found.weights)
    logger.info("loaded the %s weights of the pruned model from %s", found.kind, found.weights)
    return model, plan, found


def finish_report(run: RunDir, config: Mapping[str, Any], summary: Mapping[str, Any] | None,
                  finetuned: float | None = None, latency: Mapping[str, Any] | None = None
                  ) -> tuple[Path, Path]:
    """Write ``report.json``/``report.md`` for what the run did (rank 0 only)."""
    if not run.main:
        return run.path / "report.json", run.path / "report.md"
    accuracy = {}
    if summary:
        for key, src in (("base", "acc_base"), ("pruned", "acc_pruned"),
                         ("recalibrated", "acc_recalibrated")):
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
