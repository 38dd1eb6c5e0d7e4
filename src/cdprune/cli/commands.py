"""What each ``cdprune`` subcommand does, given its merged configuration.

:data:`COMMANDS` maps a subcommand to a function that calls the library and prints the
outcome; :mod:`cdprune.cli` parses the command line and turns errors into one line.
Only these two modules print.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..finetune.config import TrainConfig
from ..options import from_mapping
from ..pruning.config import CompactConfig, PruneConfig
from ..runs.files import COMPACT, COMPARE_JSON, PRUNE_SUMMARY, PRUNED, STATS
from ..runs.inputs import build_data, build_inputs
from ..runs.modeldir import check_model_dir

__all__ = ["COMMANDS", "set_rank"]

_OUTPUT = {"rank": 0}


def set_rank(rank: int) -> None:
    """This process's rank under torchrun: only rank 0 prints."""
    _OUTPUT["rank"] = rank


def _say(*args: Any, **kwargs: Any) -> None:
    """Print to the user; under torchrun only rank 0 speaks."""
    if _OUTPUT["rank"] == 0:
        print(*args, **kwargs)


def _run_dir(config: dict[str, Any]):
    from ..runs.rundir import RunDir

    if not config.get("output_dir"):
        raise ConfigError("--output-dir is required: every run writes a directory")
    out = Path(config["output_dir"])
    # What this run reads: --overwrite refuses to clear a directory holding any of it.
    inputs = {"-c/--config": config.get("config"), "--data-root": config.get("data_root"),
              "--checkpoint": config.get("checkpoint"), "--stats": config.get("stats"),
              "--model-dir": config.get("model_dir")}
    if config["command"] == "prune" and not config.get("stats"):
        inputs["--stats (default: <output-dir>/stats.safetensors)"] = out / STATS
    if config["command"] == "finetune" and not config.get("model_dir"):
        inputs["--model-dir (default: the output directory's pruned/)"] = out / PRUNED
    return RunDir(out, resume=bool(config.get("resume")),
                  overwrite=bool(config.get("overwrite")), stage=config["command"],
                  config=config, inputs=inputs)


# Each command checks what it can (the output directory, data, model, checkpoint, input
# files) before it enters the run directory, so bad input leaves no files behind.
def _cmd_stats(config: dict[str, Any]) -> None:
    from ..runs.pipeline import run_stats

    run = _run_dir(config)
    data, model = build_inputs(config, need_train=False)
    with run:
        run.write_config(config)
        path = run_stats(config, run, data=data, model=model)
    _say(f"statistics: {path}\nscores: {run.path / 'scores.safetensors'}")


def _print_summary(summary: dict[str, Any]) -> None:
    from ..runs.report import format_count as n

    _say(f"criterion {summary.get('criterion', 'cdp')}: MACs {n(summary['macs_before'])} -> {n(summary['macs_after'])} "
         f"(-{100 * summary['macs_reduction']:.1f}%), params "
         f"{n(summary['params_before'])} -> {n(summary['params_after'])}")
    if summary.get("macs_paper_after"):
        _say(f"MACs in the paper's mask convention: {n(summary['macs_paper_after'])}")
    if summary.get("prune_mode") == "mask":
        sparsity = summary.get("published_sparsity")
        _say(f"{summary['removed_filters']} filters masked"
             + (f" (published sparsity {sparsity})" if sparsity is not None else "")
             + f"; the masked network runs at {n(summary['macs_after'])} MACs, a plain "
             f"channel cut of its masks at {n(summary.get('macs_channel_cut'))}")
    if "acc_base" in summary:
        _say(f"accuracy: base {summary['acc_base']:.2f}%, right after pruning "
             f"{summary['acc_pruned']:.2f}%" + (
                 f", after BatchNorm recalibration ({summary['bn_recalibrate_images']} images) "
                 f"{summary['acc_recalibrated']:.2f}%" if "acc_recalibrated" in summary else ""))


def _cmd_prune(config: dict[str, Any]) -> None:
    from ..runs.inputs import check_ignore_layers
    from ..runs.pipeline import finish_report, load_stats, needs_batches, needs_stats, run_prune

    run = _run_dir(config)
    data, model = build_inputs(config, need_train=bool(config.get("bn_recalibrate"))
                               or needs_batches(config), need_stats=False)
    check_ignore_layers(config, model)
    stats = load_stats(config, model) if needs_stats(config) else None
    with run:
        run.write_config(config)
        summary = run_prune(config, run, data=data, model=model, stats=stats)
        finish_report(run, config, summary)
    _print_summary(summary)
    _say(f"pruned model: {run.path / 'pruned'}\nreport: {run.path / 'report.md'}")


def _cmd_finetune(config: dict[str, Any]) -> None:
    from ..runs.inputs import build_data
    from ..runs.modeldir import load_pruned_dir, model_dir_defaults
    from ..runs.pipeline import finetune_accuracy, finish_report, run_finetune

    run = _run_dir(config)
    config = model_dir_defaults(config)
    check_model_dir(config.get("model_dir") or run.path, config)  # before any data is read
    data = build_data(config, need_stats=False)
    model, plan = load_pruned_dir(config.get("model_dir") or run.path, config, data.num_classes)
    with run:
        run.write_config(config)
        result = run_finetune(config, run, data=data, model=model, plan=plan)
        accuracy = finetune_accuracy(config, data, model, result)
        finish_report(run, config, None, finetuned=accuracy, plan=plan)
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
    from ..measure.evaluate import evaluate
    from ..runs.inputs import build_data, check_base_accuracy, resolve_device
    from ..runs.modeldir import load_model_dir, model_dir_defaults

    config = model_dir_defaults(config)
    found = None
    if config.get("model_dir"):
        check_model_dir(config["model_dir"], config)  # before any data is read
        data = build_data(config, need_train=False, need_stats=False)
        model, _, found = load_model_dir(config["model_dir"], config, data.num_classes,
                                         config.get("weights") or "final")
    else:
        if not config.get("model"):
            raise ConfigError("give --model (and --checkpoint) or --model-dir")
        data, model = build_inputs(config, need_train=False, need_stats=False)
    device = resolve_device(config)
    result = evaluate(model.to(device), data.val, device=device,
                      progress=not config.get("no_progress"))
    doc = result.to_dict()
    if found is not None:
        doc.update(weights=found.kind, weights_file=str(found.weights))
    elif config.get("checkpoint"):
        check_base_accuracy(config, result.top1, len(data.val.dataset))
    _say(json.dumps(doc, indent=1))


def _cmd_run(config: dict[str, Any]) -> None:
    from ..runs.inputs import build_data, check_ignore_layers
    from ..runs.pipeline import needs_stats, run_all
    from ..runs.report import format_count as n

    run = _run_dir(config)
    resumed = bool(config.get("resume")) and (run.path / PRUNE_SUMMARY).is_file()
    model = None
    if resumed:  # statistics and pruning finished before
        data = build_data(config, need_stats=False)
    else:
        data, model = build_inputs(config, need_stats=needs_stats(config))
        check_ignore_layers(config, model)
    with run:
        run.write_config(config)
        outcome = run_all(config, run, data=data, model=model, on_pruned=_print_summary)
    _say(f"fine-tuned: {_accuracy_line(outcome.accuracy)}")
    deployable = outcome.deployable
    if deployable and not deployable.get("unsupported"):
        acc = deployable.get("acc_recalibrated", deployable["acc_compacted"])
        _say(f"compact network: {n(deployable['macs'])} MACs, {n(deployable['params'])} "
             f"parameters, top-1 {acc:.2f}, {deployable['speedup']:.2f}x faster than the "
             f"masked network ({run.path / COMPACT})")
    elif deployable:
        _say(f"compact network: not built ({deployable['unsupported']})")
    _say(f"report: {outcome.report}")


def _cmd_compact(config: dict[str, Any]) -> None:
    from ..runs.pipeline import finish_report, load_masks, run_compact
    from ..runs.report import format_count as n

    run = _run_dir(config)
    masks = load_masks(config["removed_filters"])
    epochs = bool(config.get("compact_epochs"))
    data, model = build_inputs(config, need_train=bool(config.get("bn_recalibrate")) or epochs,
                               need_stats=False)
    with run:
        run.write_config(config)
        summary = run_compact(config, run, data=data, model=model, masks=masks)
        finetuned = summary.pop("finetuned", None)
        finish_report(run, config, summary, finetuned=finetuned)
    info = summary["compact"]
    _say(f"MACs {n(info['macs_masked'])} masked ({n(info['macs_paper'])} in the paper's mask "
         f"convention) -> {n(info['macs'])} compact, params {n(info['params_masked'])} -> "
         f"{n(info['params'])}; filters removed exactly {info['removed_exact']}, folded with "
         f"border effects {info['removed_border']}, kept {info['kept_masked']}; max output "
         f"difference {info['max_abs_error']:.3g}")
    if "acc_masked" in summary:
        _say(f"accuracy: masked {summary['acc_masked']:.2f}%, compact "
             f"{summary['acc_compacted']:.2f}%" + (
                 f", after BatchNorm recalibration {summary['acc_recalibrated']:.2f}%"
                 if "acc_recalibrated" in summary else ""))
    if finetuned:
        _say(f"after {config['compact_epochs']} epochs: {_accuracy_line(finetuned)}")
    _say(f"compact model: {run.path / 'pruned'}\nreport: {run.path / 'report.md'}")


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

    from ..importance.criteria import criterion_names
    from ..runs.compare import compare_criteria, read_comparison, write_comparison
    from ..runs.inputs import resolve_device
    from ..runs.pipeline import cdp_options, pruned_extra

    targets = config.get("macs_targets")
    if not targets:
        raise ConfigError("give one or more targets: --macs-reduction 0.5 [0.3 0.7 ...]")
    for target in targets:
        if not 0 < target < 1:
            raise ConfigError(f"--macs-reduction {target} is invalid; it must be a fraction "
                              "in (0, 1)")
    options = cdp_options(config)
    run = _run_dir(config)
    data, model = build_inputs(config)
    done: list[dict[str, Any]] = []
    previous = run.path / COMPARE_JSON
    if config.get("resume") and previous.is_file():
        done = read_comparison(previous)
        _say(f"resuming: {len(done)} finished rows in {previous} are kept", flush=True)
    meta = {k: config.get(k) for k in ("model", "checkpoint", "dataset", "epochs",
                                         "max_iters", "lr", "train_subset", "val_subset",
                                         "stop_batch", "stats_images", "stats_batch_size",
                                         "seed", "scope",
                                         "tap", "normalize", "allocation", "variant",
                                         "bn_recalibrate")}
    # The values used, not the unset ones (None leaves the choice to the library).
    meta.update(tap=options["stats"].get("tap", "conv"),
                normalize=options["scores"].get("normalize", "none"),
                allocation=options["prune"].get("allocation", "global"),
                scope=config.get("scope") or "auto")
    meta = {k: v for k, v in meta.items() if v is not None}
    rows: list[dict[str, Any]] = []

    def on_row(row: dict[str, Any]) -> None:
        rows.append(row)
        if run.main:  # tables after every finished criterion: nothing is lost on a stop
            write_comparison(run.path, [*rows, *(r for r in done if r not in rows)], meta)
        _say(_compare_line(row), flush=True)

    mode = from_mapping(PruneConfig, config).resolved_mode(config.get("variant"))
    compact = from_mapping(CompactConfig, config)
    recal = data.recal
    if mode == "mask" and recal is None and compact.compact_recalibrate:
        recal = build_data({**config, "train_subset": None,
                            "bn_recalibrate": compact.compact_recalibrate},
                           need_stats=False).recal
    meta["prune_mode"] = mode
    with run:
        run.write_config(config)
        budget = from_mapping(TrainConfig, config)
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
            device=resolve_device(config), progress=not config.get("no_progress"),
            on_row=on_row, done=done, bn_recalibrate=int(config.get("bn_recalibrate") or 0),
            recal_loader=recal, model_name=config["model"],
            pruned_extra=pruned_extra(config, data), prune_mode=mode,
            compact_recalibrate=compact.compact_recalibrate)
        _, md = write_comparison(run.path, all_rows, meta)
    _say(md.read_text())


def _cmd_models(config: dict[str, Any]) -> None:
    from ..models import list_models, model_spec

    for name in list_models():
        spec = model_spec(name)
        _say(f"{name:16s} input {str(tuple(spec.input_size)):15s}  classes {spec.num_classes}")
    _say("\nCIFAR ResNets: resnetN has option-A shortcuts (identity, zero-padded channels where "
         "the width doubles; e.g. the akamaster checkpoints), resnetNb option B (1x1 conv + "
         "BatchNorm there; e.g. the chenyaofo checkpoints). Any torchvision:NAME or timm:NAME "
         "works too.")


def _cmd_demo(config: dict[str, Any]) -> None:
    from ..runs.demo import run_demo

    run_demo(config.get("output_dir") or "runs/demo", quick=bool(config.get("quick")),
             overwrite=bool(config.get("overwrite")), progress=not config.get("no_progress"),
             criterion=config.get("criterion") or "cdp", printer=_say)


def _cmd_export(config: dict[str, Any]) -> None:
    from ..export import ExportConfig, export_model_dir

    if not config.get("model_dir"):
        raise ConfigError("--model-dir is required: a run directory, or a pruned model "
                          "directory written by `cdprune prune`")
    options = from_mapping(ExportConfig, config)
    s = export_model_dir(config["model_dir"], options, weights=config.get("weights") or "final",
                         checkpoint=config.get("checkpoint"))
    _say(f"exported {s['path']} ({s['size_bytes'] / 1e6:.2f} MB) from the {s['weights']} "
         f"weights ({s['weights_file']}); largest difference from its PyTorch outputs "
         f"{s['max_abs_diff']:.1e}")
    if "speedup" in s:
        _say(f"{options.format} latency ({s['latency_method']}): unpruned {s['base_model']} "
             f"{s['latency_base_ms']:.3f} ms, pruned {s['latency_pruned_ms']:.3f} ms "
             f"({s['speedup']:.2f}x)")


COMMANDS = {"stats": _cmd_stats, "prune": _cmd_prune, "finetune": _cmd_finetune,
            "eval": _cmd_eval, "run": _cmd_run, "compact": _cmd_compact, "export": _cmd_export,
            "compare": _cmd_compare, "demo": _cmd_demo, "models": _cmd_models}

