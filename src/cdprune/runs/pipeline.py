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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import CdpruneError, ConfigError, UnsupportedModelError
from ..fileio import atomic_write_text
from ..finetune.distributed import barrier
from ..options import OptionsError
from ..progress import stage as logged_stage
from ..pruning.config import CompactConfig, PruneConfig
from .files import (
    CLASSES,
    COMPACT,
    PRUNE_SUMMARY,
    PRUNED,
    REPORT_JSON,
    REPORT_MD,
    SCORES,
    SCORES_PLOT,
    STATS,
    TRAINING_PLOT,
    WIDTHS_PLOT,
)
from .inputs import (
    Data,
    build_data,
    build_model,
    check_base_accuracy,
    resolve_device,
)
from .locate import find_run_model
from .modeldir import load_pruned_dir
from .report import environment, plot_scores, plot_training, plot_widths, write_report
from .rundir import RunDir

if TYPE_CHECKING:
    from ..importance.activations import ActivationStats

__all__ = ["compact_summary", "criterion_scores", "finetune_accuracy", "finish_report",
           "gather_stats", "load_masks", "load_stats", "needs_batches", "needs_stats",
           "pruned_extra", "run_compact", "run_finetune", "run_prune", "run_stats",
           "write_stats"]

logger = logging.getLogger(__name__)


def _example(input_size: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(2, *input_size)


def _metric(result: Any) -> float:
    return float(result.top1)


# ---------------------------------------------------------------------- stages
def cdp_options(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The CDP options a config sets, per stage: ``stats``, ``scores`` and ``prune``.

    Options the config leaves unset are omitted, so the library's defaults apply.
    ``variant: published`` reaches every stage; an individual option set to another value
    beside it is refused when the configuration is validated, so nothing is overridden.
    """
    variant = config.get("variant") or None
    # The cdp_class criterion is CDP with one document per class.
    documents = "class" if config.get("criterion") == "cdp_class" else config.get("documents")
    stats = {"documents": documents, "tap": config.get("tap"), "variant": variant}
    scores = {"coe": config.get("coe") or 0.0, "normalize": config.get("normalize"),
              "variant": variant}
    prune = {"allocation": "global" if variant == "published" else config.get("allocation")}
    return {stage: {k: v for k, v in opts.items() if v is not None}
            for stage, opts in (("stats", stats), ("scores", scores), ("prune", prune))}


def needs_stats(config: Mapping[str, Any]) -> bool:
    """Whether the run's criterion ranks filters by activation statistics (CDP's)."""
    from ..importance.criteria import get_criterion

    return get_criterion(PruneConfig.from_config(config).criterion).statistics


def needs_batches(config: Mapping[str, Any]) -> bool:
    """Whether the run's criterion reads labelled training batches (Taylor)."""
    from ..importance.criteria import get_criterion

    return get_criterion(PruneConfig.from_config(config).criterion).batches


def criterion_scores(config: Mapping[str, Any], model: nn.Module, data: Data,
                     stats: ActivationStats | None) -> dict[str, torch.Tensor]:
    """Per-filter scores of the configured criterion (``criterion``, CDP by default).

    CDP's criteria score the given statistics with the config's TF-IDF options; every
    other registered criterion scores ``model`` from what its :class:`ScoreContext` needs.
    """
    from ..importance.criteria import ScoreContext, get_criterion
    from ..importance.scoring import tfidf_scores

    criterion = get_criterion(PruneConfig.from_config(config).criterion)
    if criterion.statistics:
        if stats is None:
            raise ConfigError(f"criterion {criterion.name!r} needs activation statistics; "
                              "collect them first (`cdprune stats`) or run `cdprune run`")
        return tfidf_scores(stats, **cdp_options(config)["scores"])
    context = ScoreContext(example_inputs=_example(data.input_size), batches=data.train,
                           seed=int(config.get("seed") or 0), device=resolve_device(config),
                           progress=not config.get("no_progress"))
    with logged_stage(f"{criterion.label} scores"):
        return criterion.score(model, context)


def gather_stats(config: Mapping[str, Any], data: Data, model: nn.Module) -> ActivationStats:
    """Collect the activation statistics the config asks for; nothing is written."""
    device = resolve_device(config)
    model.to(device)
    started = time.perf_counter()
    # build_data already sampled stop_batch batches of images (split across ranks under
    # torchrun), so the loader is used whole. Augmented statistics (--stats-augment) draw
    # their crops and flips from the seed, not from the generator's state so far.
    with torch.random.fork_rng(devices=[]), logged_stage("statistics"):
        torch.manual_seed(int(config.get("seed") or 0))
        stats = _collect(config, data, model, device)
    stats.meta.update(model=config["model"], dataset=config["dataset"],
                      seconds=round(time.perf_counter() - started, 2),
                      stats_augment=bool(config.get("stats_augment")),
                      stats_sample=config.get("stats_sample") or "random")
    return stats


def _collect(config: Mapping[str, Any], data: Data, model: nn.Module, device: torch.device
             ) -> ActivationStats:
    from ..importance.stats import collect_stats

    return collect_stats(model, data.stats, **cdp_options(config)["stats"],
                         num_classes=data.num_classes, device=device,
                         dtype=torch.float16 if config.get("stats_dtype") == "float16"
                         else torch.float32, progress=not config.get("no_progress"))


def write_stats(run: RunDir, config: Mapping[str, Any], stats: ActivationStats) -> Path:
    """Write ``stats.safetensors``, ``scores.safetensors`` and ``scores.png`` (rank 0 only)."""
    from ..importance.scoring import tfidf_scores

    path = run.path / STATS
    if run.main:
        stats.save(path)
        scores = tfidf_scores(stats, **cdp_options(config)["scores"])
        _save_scores(run.path / SCORES, scores)
        plot_scores(run.path / SCORES_PLOT, scores)
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
    return atomic_write_text(run.path / CLASSES,
                             json.dumps(list(data.classes), indent=1) + "\n")


def _save_scores(path: Path, scores: Mapping[str, torch.Tensor]) -> None:
    from ..checkpoint import save_weights

    save_weights({k: v.contiguous() for k, v in scores.items()}, path)


def load_stats(config: Mapping[str, Any], model: nn.Module,
               path: str | os.PathLike | None = None) -> ActivationStats:
    """The statistics file of ``--stats`` (or ``path``), checked against ``model``."""
    from ..importance.activations import ActivationStats

    if not path and not config.get("stats") and not config.get("output_dir"):
        raise OptionsError("{stats} is required: the statistics file `cdprune stats` wrote")
    path = path or config.get("stats") or Path(config["output_dir"]) / STATS
    return ActivationStats.load(path, model=model)


def run_prune(config: Mapping[str, Any], run: RunDir, *, data: Data | None = None,
              model: nn.Module | None = None, stats_path: str | os.PathLike | None = None,
              stats: ActivationStats | None = None, save_stats: bool = False
              ) -> dict[str, Any]:
    """Prune the base model with the configured criterion's scores; write ``pruned/``.

    CDP's statistics come from ``stats`` when given, else from ``stats_path``, ``--stats``
    or ``<run>/stats.safetensors``; other criteria read none. With ``save_stats`` they are
    written to the run directory too, but only once pruning succeeded: a target that
    cannot be reached leaves no files behind.

    Returns the pruning summary (``PruneResult.summary()``, with the criterion) with
    accuracies added.
    """
    from ..measure.evaluate import evaluate
    from ..pruning import prune, save_pruned

    data = data or build_data(config, need_train=needs_batches(config), need_stats=False)
    model = model or build_model(config, data.num_classes)
    # Pruning traces and counts on the CPU with a CPU example batch: a model the
    # statistics left on a GPU comes back first (evaluation moves it again).
    model.cpu()
    if stats is None and needs_stats(config):
        stats = load_stats(config, model, stats_path or config.get("stats")
                           or run.path / STATS)
    options = cdp_options(config)
    scores = criterion_scores(config, model, data, stats)
    device = resolve_device(config)
    example = _example(data.input_size)
    stage = PruneConfig.from_config(config)  # unset options take the stage's defaults
    kwargs = dict(ignored_layers=stage.ignore_layers or None, scope=stage.scope,
                  max_layer_pruning=stage.max_layer_pruning, round_to=stage.round_to,
                  **options["prune"])
    mode = stage.resolved_mode(config.get("variant"))
    if config.get("variant") == "published":
        result, extra = _published_prune(config, stage, model, scores, example, mode)
    else:
        reduction = stage.macs_reduction
        if stage.macs_target is not None:
            reduction = _reduction_for_target(config, model, scores, example, kwargs)
        latency = None
        if stage.latency_reduction is not None or options["prune"].get("allocation") == "latency":
            from ..measure.latency import LatencySettings

            latency = LatencySettings(batch_size=stage.latency_batch,
                                      device="cuda" if device.type == "cuda" else "cpu")
        with logged_stage("pruning"):
            result = prune(model, scores, example_inputs=example, sparsity=stage.sparsity,
                           macs_reduction=reduction,
                           latency_reduction=stage.latency_reduction, latency=latency,
                           **kwargs)
        extra = {}
        if mode == "mask":  # the same filters, masked in the whole architecture
            from ..pruning.masking import masked_result, removed_by_plan

            result = masked_result(model, removed_by_plan(result.plan, result.widths_before),
                                   example_inputs=example, target=result.plan.get("target"))
    summary = {"criterion": stage.criterion, **result.summary()}
    summary.update(extra)
    if stats is not None:  # how many images the scores rest on, and how they were chosen
        summary["stats_images"] = stats.num_samples
        summary["stats_sample"] = (f"stop_batch {config['stop_batch']}"
                                   if config.get("stop_batch") else "stats_images")
    if "latency" in result.extra:
        summary["latency"] = result.extra["latency"]
    summary.update(macs_conventions(model, result, example))
    summary.update(_mask_costs(model, result, example, mode))
    progress = not config.get("no_progress")
    evaluated = not (config.get("skip_eval") or config.get("no_eval"))
    if evaluated:
        with logged_stage("evaluation of the base and pruned models"):
            base = evaluate(model.to(device), data.val, device=device, progress=progress)
            summary["acc_base"] = _metric(base)
            check_base_accuracy(config, base.top1, base.num_samples)
            summary["acc_pruned"] = _metric(evaluate(result.model.to(device), data.val,
                                                     device=device, progress=progress))
    if config.get("bn_recalibrate"):
        # Before fine-tuning and before saving: pruned/ holds the recalibrated model.
        from ..finetune.batchnorm import recalibrate_bn

        recal = data.recal or build_data({**config, "train_subset": None}, need_stats=False
                                         ).recal
        summary["bn_recalibrate_images"] = recalibrate_bn(
            result.model.to(device), recal, int(config["bn_recalibrate"]), device=device)
        if evaluated:
            summary["acc_recalibrated"] = _metric(evaluate(result.model, data.val,
                                                           device=device, progress=progress))
    from ..pruning.masking import removed_by_plan

    result.plan["removed_filters"] = removed_by_plan(result.plan, result.widths_before)
    summary["removed_by_layer"] = result.plan["removed_filters"]
    if save_stats and stats is not None:
        write_stats(run, config, stats)
    if run.main:
        write_classes(run, config, data)
        save_pruned(run.path / PRUNED, result, model_name=config["model"],
                    input_size=data.input_size, extra=pruned_extra(config, data))
        plot_widths(run.path / WIDTHS_PLOT, result.widths_before, result.widths_after)
    if run.main:
        atomic_write_text(run.path / PRUNE_SUMMARY, json.dumps(summary, indent=1) + "\n")
    barrier()
    return summary


def pruned_extra(config: Mapping[str, Any], data: Data) -> dict[str, Any]:
    """What a pruned model's ``plan.json`` records of its data: dataset, classes and the
    normalisation, so evaluating, fine-tuning and exporting it need no flags repeated."""
    extra = {"dataset": config["dataset"], "num_classes": data.num_classes,
             "mean": list(data.mean) if data.mean else config.get("mean"),
             "std": list(data.std) if data.std else config.get("std")}
    if str(config["dataset"]).lower() == "folder" and data.classes:
        extra["classes"] = list(data.classes)
    return extra


def _published_prune(config: Mapping[str, Any], stage: PruneConfig, model: nn.Module,
                     scores: Mapping[str, torch.Tensor], example: torch.Tensor, mode: str
                     ) -> tuple[Any, dict[str, Any]]:
    """The published code's selection (one ranking of every Conv2d filter), masked or cut.

    ``--sparsity`` is the published fraction of all filters; ``--macs-target`` (paper
    convention) and ``--macs-reduction`` search that sparsity on the paper's count.
    """
    from ..measure.macs import paper_macs
    from ..pruning.masking import (
        channel_cut,
        masked_result,
        published_search,
        published_selection,
    )
    from ..pruning.targets import parse_macs

    if stage.latency_reduction is not None:
        raise OptionsError("{variant} published selects by sparsity or MACs, not by latency; "
                           "drop {variant} published or give {sparsity}/{macs_target}")
    for key, value in (("ignore_layers", stage.ignore_layers), ("round_to", stage.round_to)):
        if value:  # the published ranking has neither; silently dropping them would mislead
            raise OptionsError(f"{{{key}}} does not apply to {{variant}} published, which "
                               "ranks every Conv2d filter as the published code does; drop "
                               f"{{{key}}} or {{variant}} published")
    if stage.macs_target is not None and (config.get("macs_convention") or "physical") \
            != "paper":
        raise OptionsError("{variant} published counts {macs_target} as the published code "
                           "does; add {macs_convention} paper (or give {sparsity})")
    if stage.sparsity is not None:
        sparsity = stage.sparsity
        removed = published_selection(scores, sparsity)
    else:
        if stage.macs_target is not None:
            target = parse_macs(stage.macs_target)
        else:
            target = round(paper_macs(model, {}, example_inputs=example)
                           * (1 - float(stage.macs_reduction)))
        sparsity, removed = published_search(model, scores, target, example_inputs=example)
    goal = {"sparsity": stage.sparsity, "macs_target": stage.macs_target,
            "macs_reduction": stage.macs_reduction, "published_sparsity": sparsity}
    if mode == "mask":
        result = masked_result(model, removed, example_inputs=example, target=goal)
    else:
        result = channel_cut(model, removed, example_inputs=example)
        result.plan["target"] = goal
        result.plan["published_masks"] = removed
    return result, {"published_sparsity": sparsity, "prune_mode": mode,
                    "selected_filters": sum(map(len, removed.values()))}


def _mask_costs(model: nn.Module, result: Any, example: torch.Tensor, mode: str
                ) -> dict[str, Any]:
    """For a masked network: what a plain channel cut of its masks would run at, and the
    slot of the compact network's numbers (filled where compaction exists)."""
    if mode != "mask":
        return {"prune_mode": mode}
    from ..pruning.masking import channel_cut

    cut = channel_cut(model, result.plan["masked"], example_inputs=example)
    return {"prune_mode": "mask", "macs_masked_runs": result.macs_after,
            "macs_channel_cut": cut.macs_after, "params_channel_cut": cut.params_after,
            "compact": compact_summary(model, result, example)}


def compact_summary(model: nn.Module, result: Any, example: torch.Tensor) -> dict[str, Any]:
    """MACs and parameters of the compact (deployable) network of a masked pruning.

    The compact network removes every masked filter physically and carries the masked
    channels' constants in biases (:func:`~cdprune.pruning.compact`). Its size depends on
    the masks alone, so it is measured here, before fine-tuning. A model compaction does
    not know gives ``{"unsupported": reason}``, which the report shows instead of a figure.
    """
    from ..errors import UnsupportedModelError
    from ..measure.macs import count_macs, count_params
    from ..pruning import compact

    try:
        small, info = compact(result.model, result.plan["masked"], example_inputs=example)
    except UnsupportedModelError as exc:
        name = type(model).__name__
        return {"unsupported": f"compaction does not know {name} (see `cdprune compact`)",
                "reason": str(exc)}
    return {"macs": count_macs(small, example_inputs=example[:1]),
            "params": count_params(small), "info": info.to_dict()}


def _reduction_for_target(config: Mapping[str, Any], model: nn.Module, scores: Any,
                          example: torch.Tensor, kwargs: Mapping[str, Any]) -> float:
    """``--macs-target`` (absolute, in ``--macs-convention``) as a MACs-reduction fraction."""
    from ..measure.macs import count_macs
    from ..pruning import prune
    from ..pruning.targets import parse_macs, reduction_for_target

    return reduction_for_target(
        parse_macs(config["macs_target"]), count_macs(model, example_inputs=example),
        config.get("macs_convention") or "physical",
        prune_at=lambda r: prune(model, scores, example_inputs=example, macs_reduction=r,
                                 **kwargs),
        model=model, example_inputs=example)


def macs_conventions(model: nn.Module, result: Any, example: torch.Tensor) -> dict[str, Any]:
    """The pruning's MACs in the paper's mask convention, beside the physical count."""
    from ..measure.macs import paper_macs

    return {"macs_paper_before": result.macs_before,
            "macs_paper_after": paper_macs(model, result.plan["kept"], example_inputs=example)}


def run_finetune(config: Mapping[str, Any], run: RunDir, *, data: Data | None = None,
                 model: nn.Module | None = None, plan: Mapping[str, Any] | None = None
                 ) -> Any:
    """Fine-tune ``model`` (by default the pruned model in ``run/pruned``)."""
    from ..finetune.config import TrainConfig
    from ..finetune.loop import fine_tune

    data = data or build_data(config, need_stats=False)
    if model is None:
        # --checkpoint of `cdprune run` is the unpruned base model: not for these weights.
        model, plan = load_pruned_dir(config.get("model_dir") or run.path,
                                      {**config, "checkpoint": None}, data.num_classes)
    train_cfg = TrainConfig.from_config(config)
    write_classes(run, config, data)
    # With --val-split the epochs are judged on held-out training images, not the test set.
    with logged_stage(f"fine-tuning ({train_cfg.epochs} epoch"
                      f"{'' if train_cfg.epochs == 1 else 's'})"):
        result = fine_tune(model, data.train, data.select or data.val, train_cfg,
                           output_dir=run.path,
                           device=resolve_device(config), resume=bool(config.get("resume")),
                           extra_state={"plan": dict(plan)} if plan else None,
                           progress=not config.get("no_progress"),
                           masks=(plan or {}).get("masked"))
    if result.history and run.main:
        plot_training(run.path / TRAINING_PLOT, result.history)
    return result


def load_masks(path: str | os.PathLike) -> dict[str, list[int]]:
    """The masked filters of ``--removed-filters``: ``{conv name: [indices]}``, as a JSON
    file of its own or under ``removed_filters`` in a run's ``report.json``."""
    from ..errors import CheckpointError

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{{removed_filters}} '{path}' does not exist; give the JSON file of "
                          "the masked filters (or the masked run's report.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as exc:
        raise CheckpointError(f"{{removed_filters}} '{path}' is not a JSON file ({exc})") from None
    if isinstance(doc, dict) and isinstance(doc.get("removed_filters"), dict):
        doc = doc["removed_filters"]
    if not isinstance(doc, dict) or not all(
            isinstance(k, str) and isinstance(v, list) for k, v in doc.items()):
        raise CheckpointError(f"{{removed_filters}} '{path}' must map conv names to lists of "
                              "filter indices, e.g. {\"layer1.0.conv1\": [0, 5]}")
    return doc


def run_compact(config: Mapping[str, Any], run: RunDir, *, data: Data, model: nn.Module,
                masks: Mapping[str, list[int]]) -> dict[str, Any]:
    """Compact the masked ``model``; recalibrate, fine-tune and evaluate as configured.

    Writes the compact network to ``pruned/`` (a compact plan: ``eval``/``export
    --model-dir`` read it) and, with ``--compact-epochs``, the fine-tuning checkpoints to
    the run directory, as ``cdprune run`` does.

    Returns:
        The summary: what :func:`cdprune.compact` reported (MACs in both conventions,
        parameters, filters per kind, output error) and the accuracies.
    """
    from ..pruning import read_plan, save_compact
    from .deployable import deployable_network

    small, info, numbers = deployable_network(
        model, masks, val_loader=data.val, example_inputs=next(iter(data.val))[0][:64],
        recal_loader=data.recal, recal_images=int(config.get("bn_recalibrate") or 0),
        device=resolve_device(config), progress=not config.get("no_progress"),
        evaluated=not config.get("no_eval"), latency_rounds=0)
    if small is None:
        raise UnsupportedModelError(numbers["reason"])
    if not config.get("no_eval"):
        from ..measure.evaluate import evaluate
        from ..pruning import mask_filters

        numbers["acc_masked"] = _metric(evaluate(
            mask_filters(model, masks), data.val, device=resolve_device(config),
            progress=not config.get("no_progress")))
    summary: dict[str, Any] = {
        "compact": info.to_dict(), "macs_before": info.macs_masked, "macs_after": info.macs,
        "macs_reduction": 1 - info.macs / info.macs_masked,
        "macs_paper_before": info.macs_masked, "macs_paper_after": info.macs_paper,
        "params_before": info.params_masked, "params_after": info.params,
        **{k: numbers[k] for k in ("acc_masked", "acc_compacted", "bn_recalibrate_images",
                                   "acc_recalibrated") if k in numbers}}
    if run.main:
        extra = pruned_extra(config, data)
        save_compact(run.path / PRUNED, small, masks, info, model_name=config["model"],
                     input_size=data.input_size, extra=extra)
        atomic_write_text(run.path / PRUNE_SUMMARY, json.dumps(summary, indent=1) + "\n")
    barrier()
    epochs = CompactConfig.from_config(config).compact_epochs
    if epochs:
        result = run_finetune({**config, "epochs": epochs}, run, data=data, model=small,
                              plan=read_plan(run.path / PRUNED))
        summary["finetuned"] = finetune_accuracy(config, data, small, result)
    return summary


def compact_finetuned(config: Mapping[str, Any], run: RunDir, data: Data, result: Any
                      ) -> dict[str, Any] | None:
    """After a masked run's fine-tuning: the deployable network, measured beside the masked.

    The fine-tuned masked network (its last epoch) is compacted (every masked filter
    removed, the masked channels' constants carried in biases), its BatchNorm statistics
    re-estimated on ``compact_recalibrate`` plain training images, and it is evaluated and
    timed against the masked network (which runs at the full architecture's cost), both
    at batch 1 on the run's device, alternately. The compact network is saved to
    ``compact/`` (``eval``/``export --model-dir`` read it).

    Returns:
        None for a run that did not mask or did not fine-tune; ``{"unsupported": reason}``
        for an architecture compaction does not know; else MACs, parameters, the output
        error of compaction, accuracies (``acc_compacted`` straight after compaction,
        ``acc_recalibrated`` after recalibration) and latencies.
    """
    from ..checkpoint import safe_torch_load
    from ..pruning import read_plan, save_compact
    from .deployable import deployable_network

    plan = read_plan(run.path / PRUNED)
    masks = plan.get("masked")
    if not masks or not result.history or result.last_checkpoint is None:
        return None
    model, _ = load_pruned_dir(run.path, config, data.num_classes)
    model.load_state_dict(safe_torch_load(result.last_checkpoint)["model"])
    images = CompactConfig.from_config(config).compact_recalibrate
    recal = build_data({**config, "train_subset": None, "bn_recalibrate": images},
                       need_stats=False).recal if images else None
    small, info, out = deployable_network(
        model, masks, val_loader=data.val, example_inputs=next(iter(data.val))[0][:64],
        recal_loader=recal, recal_images=images, device=resolve_device(config),
        progress=not config.get("no_progress"))
    if small is None:
        return out
    if run.main:
        extra = pruned_extra(config, data)
        save_compact(run.path / COMPACT, small, masks, info, model_name=config["model"],
                     input_size=data.input_size, extra=extra)
    barrier()
    return out


def finetune_accuracy(config: Mapping[str, Any], data: Data, model: nn.Module | None,
                      result: Any, *, run_path: str | os.PathLike | None = None
                      ) -> dict[str, float]:
    """Test accuracy after fine-tuning, labelled by how the weights were chosen.

    ``finetuned``: the last epoch's weights on the test set (the headline). Without
    ``--val-split``, ``finetuned_best_on_test``: the best epoch's test accuracy, chosen on
    the test set itself (what the CDP paper reports; optimistic). With ``--val-split``,
    ``finetuned_selected_on_val``: the test accuracy of the epoch that scored best on the
    held-out training images, and ``val_best``: that held-out score. ``model`` is the
    fine-tuned model; None rebuilds it from the pruned model under ``run_path`` (or
    ``--model-dir``) and ``last.pth``.
    """
    import copy

    from ..checkpoint import safe_torch_load
    from ..measure.evaluate import evaluate

    if not result.history:
        return {}
    if data.select is None:
        return {"finetuned": result.final_acc, "finetuned_best_on_test": result.best_acc}
    if model is None:
        model, _ = load_pruned_dir(config.get("model_dir") or run_path, config,
                                   data.num_classes)
        model.load_state_dict(safe_torch_load(result.last_checkpoint)["model"])
    device = resolve_device(config)
    progress = not config.get("no_progress")
    out = {"finetuned": float(evaluate(model.to(device), data.val, device=device,
                                       progress=progress).top1),
           "val_best": result.best_acc}
    if result.best_checkpoint is not None and result.best_checkpoint.is_file():
        best = copy.deepcopy(model)
        best.load_state_dict(safe_torch_load(result.best_checkpoint)["model"])
        out["finetuned_selected_on_val"] = float(evaluate(best.to(device), data.val,
                                                          device=device,
                                                          progress=progress).top1)
    return out



@dataclass
class RunOutcome:
    """What :func:`run_all` did.

    Attributes:
        summary: the pruning's summary (MACs, parameters, accuracies before fine-tuning).
        accuracy: the fine-tuned accuracies (:func:`finetune_accuracy`).
        deployable: a masked run's compact network (:func:`compact_finetuned`), else None.
        report: the ``report.md`` written.
        finetune: what :func:`~cdprune.fine_tune` returned.
    """

    summary: dict[str, Any]
    accuracy: dict[str, float]
    deployable: dict[str, Any] | None
    report: Path
    finetune: Any


def run_all(config: Mapping[str, Any], run: RunDir, *, data: Data,
            model: nn.Module | None = None,
            on_pruned: Callable[[dict[str, Any]], None] | None = None,
            latency: Mapping[str, Any] | None = None) -> RunOutcome:
    """The whole pipeline: statistics, pruning, fine-tuning, the deployable network, report.

    ``cdprune run`` and the demo are this function. The statistics are collected only
    when the criterion reads them; a masked run ends with its compact network measured
    beside it. With ``config["resume"]`` and a finished pruning in ``run`` (its
    ``prune_summary.json``), statistics and pruning are not run again and fine-tuning
    continues from ``last.pth``.

    Args:
        config: the flat run configuration.
        run: the run directory, entered.
        data: the run's data (:func:`~cdprune.runs.inputs.build_data`).
        model: the base model; may be None only when resuming after the pruning.
        on_pruned: called with the pruning's summary as soon as it exists.
        latency: lines for the report's latency section.
    """
    summary_path = run.path / PRUNE_SUMMARY
    if config.get("resume") and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    else:
        if model is None:
            raise ConfigError("run_all needs the base model unless it resumes a run whose "
                              "pruning finished")
        # Statistics (CDP's criteria only) are written together with the pruned model,
        # once pruning succeeded.
        stats = gather_stats(config, data, model) if needs_stats(config) else None
        summary = run_prune(config, run, data=data, model=model, stats=stats,
                            save_stats=True)
        if on_pruned is not None:
            on_pruned(summary)
    result = run_finetune(config, run, data=data)
    accuracy = finetune_accuracy(config, data, None, result, run_path=run.path)
    deployable = compact_finetuned(config, run, data, result)
    _, report = finish_report(run, config, summary, finetuned=accuracy, latency=latency,
                              deployable=deployable)
    return RunOutcome(summary, accuracy, deployable, report, result)


def finish_report(run: RunDir, config: Mapping[str, Any], summary: Mapping[str, Any] | None,
                  finetuned: float | Mapping[str, float] | None = None,
                  latency: Mapping[str, Any] | None = None,
                  plan: Mapping[str, Any] | None = None,
                  deployable: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``report.json``/``report.md`` for what the run did (rank 0 only).

    ``finetuned`` is a top-1 or the mapping of :func:`finetune_accuracy`; ``deployable``
    what :func:`compact_finetuned` measured for a masked run. The filters
    removed (or masked), ``{conv: original indices}``, go under ``removed_filters``: from
    the pruning ``summary``, else from the pruned model's ``plan`` (or the run's
    ``pruned/plan.json``).
    """
    if not run.main:
        return run.path / REPORT_JSON, run.path / REPORT_MD
    accuracy = {}
    if summary:
        for key, src in (("base", "acc_base"), ("pruned", "acc_pruned"),
                         ("masked", "acc_masked"), ("compacted", "acc_compacted"),
                         ("recalibrated", "acc_recalibrated")):
            if summary.get(src) is not None:
                accuracy[key] = summary[src]
    if isinstance(finetuned, Mapping):
        accuracy.update({k: v for k, v in finetuned.items() if not math.isnan(v)})
    elif finetuned is not None and not math.isnan(finetuned):
        accuracy["finetuned"] = finetuned
    plots = [p.name for p in sorted(run.path.glob("*.png"))]
    pruning = dict(summary) if summary else None
    removed = pruning.pop("removed_by_layer", None) if pruning else None
    if removed is None:
        removed = _removed_of_run(run, config, plan)
    return write_report(run.path, {
        "title": f"{config.get('model')} on {config.get('dataset')}",
        "pruning": pruning, "removed_filters": removed, "accuracy": accuracy,
        "latency": dict(latency or {}), "config": dict(config), "plots": plots,
        "deployable": dict(deployable) if deployable else None,
        "environment": environment(), "seed": config.get("seed"),
    })


def _removed_of_run(run: RunDir, config: Mapping[str, Any], plan: Mapping[str, Any] | None
                    ) -> dict[str, list[int]] | None:
    """The ``removed_filters`` a pruned model recorded, when the report has no summary."""
    if plan is None:
        from ..pruning import read_plan

        try:
            plan = read_plan(find_run_model(config.get("model_dir") or run.path,
                                            "pruned").pruned_dir)
        except (OSError, CdpruneError):
            return None
    return plan.get("removed_filters")

