"""Run reports: ``report.json`` and ``report.md`` plus PNG plots, written atomically.

A report collects what a user wants to know after a run: MACs and parameters before and
after pruning, accuracy of the base model, right after pruning and after fine-tuning,
per-layer widths, and the versions and seed that make the run reproducible.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write_bytes, atomic_write_text
from .files import REPORT_JSON, REPORT_MD

__all__ = ["environment", "format_count", "plot_scores", "plot_training", "plot_widths",
           "write_report"]

logger = logging.getLogger(__name__)


def environment() -> dict[str, str]:
    """Versions and machine facts recorded in every report."""
    import torch_pruning

    from ..version import __version__

    return {
        "cdprune": __version__, "torch": torch.__version__,
        "torch_pruning": _distribution_version("torch-pruning")
        or getattr(torch_pruning, "__version__", "unknown"),
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu_threads": str(torch.get_num_threads()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def _distribution_version(name: str) -> str | None:
    """The installed distribution's version (a package's ``__version__`` can lag behind)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def format_count(value: Any, digits: int = 3) -> str:
    """A count with ``digits`` significant digits and a unit: 853k, 1.23M, 0.98G, 412."""
    if value is None:
        return "-"
    value = float(value)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g}{unit}"
    return f"{value:.{digits}g}"


def _fmt_m(value: Any) -> str:
    """MACs and parameters with four significant digits: a paper's 60.02M stays checkable."""
    return format_count(value, digits=4)


def _fmt_acc(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.2f}%"


def _markdown(report: Mapping[str, Any]) -> str:
    lines = [f"# cdprune report: {report.get('title', 'run')}", ""]
    prune = report.get("pruning") or {}
    acc = report.get("accuracy") or {}
    if prune:
        ratio = prune["macs_before"] / max(1, prune["macs_after"])
        if prune.get("criterion"):
            lines += [f"Filters ranked by the `{prune['criterion']}` criterion.", ""]
        if prune.get("stats_images"):
            lines += [f"Statistics from {prune['stats_images']:,} training images (chosen "
                      f"by `{prune.get('stats_sample', '--stats-images')}`).", ""]
        lines += [
            "| | before | after | change |", "| --- | --- | --- | --- |",
            f"| MACs | {_fmt_m(prune['macs_before'])} | {_fmt_m(prune['macs_after'])} | "
            f"-{100 * (1 - prune['macs_after'] / prune['macs_before']):.1f}% "
            f"({ratio:.2f}x fewer) |",
            *([f"| MACs, paper's mask convention | {_fmt_m(prune['macs_paper_before'])} | "
               f"{_fmt_m(prune['macs_paper_after'])} | -"
               f"{100 * (1 - prune['macs_paper_after'] / prune['macs_paper_before']):.1f}% |"]
              if prune.get("macs_paper_after") else []),
            f"| parameters | {_fmt_m(prune['params_before'])} | {_fmt_m(prune['params_after'])}"
            f" | -{100 * (1 - prune['params_after'] / prune['params_before']):.1f}% |",
            "",
        ]
    if acc:
        lines += ["| accuracy (top-1) | value |", "| --- | --- |"]
        recal = prune.get("bn_recalibrate_images")
        recal_label = ("after BatchNorm recalibration" + (f" ({recal} images)" if recal else ""))
        for key, label in (("base", "base model"), ("pruned", "right after pruning"),
                           ("masked", "masked network"),
                           ("compacted", "compact network, right after compaction"),
                           ("recalibrated", recal_label),
                           ("finetuned", "after fine-tuning (final epoch)"),
                           ("finetuned_best_on_test",
                            "best epoch after fine-tuning (chosen on the test set)"),
                           ("val_best", "best epoch on the held-out training images"),
                           ("finetuned_selected_on_val",
                            "best epoch chosen on held-out training images, on the test set")):
            if key in acc:
                lines.append(f"| {label} | {_fmt_acc(acc[key])} |")
        lines.append("")
    if prune.get("prune_mode") == "mask":
        lines += _masked_lines(prune)
    if report.get("deployable"):
        lines += _deployable_lines(report["deployable"], acc)
    if prune.get("macs_paper_after"):
        lines += ["Physical MACs count the network that runs; the paper's mask convention "
                  "(the CDP code's own counter) credits masked outputs of convolutions "
                  "that feed residual sums, which a physical network must keep.", ""]
    for key, value in (report.get("latency") or {}).items():
        lines.append(f"- latency {key}: {value}")
    if prune.get("widths_before"):
        lines += ["", "## Per-layer widths", "", "| layer | before | after | kept |",
                  "| --- | --- | --- | --- |"]
        after = prune["widths_after"]
        for name, before in prune["widths_before"].items():
            lines.append(f"| {name} | {before} | {after.get(name, before)} | "
                         f"{100 * after.get(name, before) / before:.0f}% |")
    if report.get("config"):
        lines += ["", "## Configuration", "", "```json",
                  json.dumps(report["config"], indent=1, default=str), "```"]
    if report.get("environment"):
        lines += ["", "## Environment", ""]
        lines += [f"- {k}: {v}" for k, v in report["environment"].items()]
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def _masked_lines(prune: Mapping[str, Any]) -> list[str]:
    """The three costs of a masked network: as it runs, by the paper's count, and cut."""
    compact = prune.get("compact")
    lines = ["## Masked network", "",
             f"{prune.get('removed_filters')} filters are masked (weights held at zero; "
             "BatchNorm kept and trained), as the published code does"
             + (f" at sparsity {prune['published_sparsity']}"
                if prune.get("published_sparsity") is not None else "") + ".", "",
             "| network | MACs | parameters |", "| --- | --- | --- |",
             f"| masked, as it runs | {_fmt_m(prune.get('macs_masked_runs'))} | "
             f"{_fmt_m(prune.get('params_after'))} |",
             f"| masked, paper's count (every masked filter and its next conv's inputs "
             f"credited) | {_fmt_m(prune.get('macs_paper_after'))} | - |",
             f"| plain channel cut of the masks (physical) | "
             f"{_fmt_m(prune.get('macs_channel_cut'))} | "
             f"{_fmt_m(prune.get('params_channel_cut'))} |"]
    if compact and compact.get("unsupported"):
        lines.append(f"| compact network (physical) | not built: {compact['unsupported']} "
                     "| - |")
    elif compact:
        lines.append(f"| compact network (physical) | {_fmt_m(compact.get('macs'))} | "
                     f"{_fmt_m(compact.get('params'))} |")
    lines += ["", "A plain channel cut removes a masked filter only where no other "
              "convolution writes its channel: residual-output filters stay, so it runs at "
              "more MACs than the paper's count.", ""]
    return lines


def _deployable_lines(final: Mapping[str, Any], acc: Mapping[str, Any]) -> list[str]:
    """The fine-tuned masked network beside its compact (deployable) network."""
    if final.get("unsupported"):
        return ["## The deployable network", "", f"Not built: {final['unsupported']}.", ""]
    recal = final.get("acc_recalibrated")
    compact_acc = _fmt_acc(recal if recal is not None else final.get("acc_compacted"))
    return [
        "## The masked network and the deployable network", "",
        "The fine-tuned masked network (the published code's network: its accuracy is the "
        "one the paper reports) beside the compact network made from it, which removes "
        "every masked filter physically (saved in `compact/`). Latency: "
        f"{final.get('latency_method', '-')}.", "",
        "| network | paper MACs | physical MACs | parameters | top-1 | latency |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| masked (fine-tuned) | {_fmt_m(final.get('macs_paper'))} | "
        f"{_fmt_m(final.get('macs_masked'))} | {_fmt_m(final.get('params_masked'))} | "
        f"{_fmt_acc(acc.get('finetuned'))} | {final.get('latency_masked_ms', '-')} ms |",
        f"| compact | - | {_fmt_m(final.get('macs'))} | {_fmt_m(final.get('params'))} | "
        f"{compact_acc} | {final.get('latency_compact_ms', '-')} ms |", "",
        f"Compact network: {_fmt_acc(final.get('acc_compacted'))} straight after compaction"
        + (f", {_fmt_acc(recal)} after BatchNorm recalibration on "
           f"{final.get('bn_recalibrate_images')} training images" if recal is not None
           else "")
        + f"; largest output difference from the masked network {final.get('max_abs_error', 0):.2e}"
        + (f"; {final['speedup']:.2f}x faster than the masked network"
           if final.get("speedup") else "") + ".", ""]


def write_report(directory: str | os.PathLike, report: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``directory`` (atomically).

    Args:
        directory: the run directory.
        report: plain data; recognised keys are ``title``, ``pruning`` (from
            ``PruneResult.summary()``), ``accuracy`` (``base``/``pruned``/``finetuned``
            top-1 in percent), ``latency``, ``config``, ``environment``, ``plots``.
    """
    directory = Path(directory)
    doc = dict(report)
    doc.setdefault("environment", environment())
    js = atomic_write_text(directory / REPORT_JSON,
                           json.dumps(doc, indent=1, default=str) + "\n")
    md = atomic_write_text(directory / REPORT_MD, _markdown(doc))
    return js, md


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def load_pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_widths(path: str | os.PathLike, widths_before: Mapping[str, int],
                widths_after: Mapping[str, int]) -> Path:
    """Bar chart of channels kept versus original, one bar per Conv2d."""
    plt = load_pyplot()
    names = list(widths_before)
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(names)), 4))
    xs = range(len(names))
    ax.bar(xs, [widths_before[n] for n in names], color="#cccccc", label="original")
    ax.bar(xs, [widths_after.get(n, widths_before[n]) for n in names], color="#1f77b4",
           label="kept")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("channels")
    ax.set_title("Channels kept per layer")
    ax.legend()
    return save_figure(fig, Path(path))


def plot_scores(path: str | os.PathLike, scores: Mapping[str, torch.Tensor]) -> Path:
    """Box plot of the CDP score distribution of each layer."""
    plt = load_pyplot()
    names = list(scores)
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(names)), 4))
    ax.boxplot([scores[n].float().numpy() for n in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("CDP score")
    ax.set_title("Score distribution per layer")
    return save_figure(fig, Path(path))


def plot_training(path: str | os.PathLike, history: Sequence[Mapping[str, Any]]) -> Path:
    """Training loss and validation accuracy per epoch."""
    plt = load_pyplot()
    epochs = [h.get("epoch", i) for i, h in enumerate(history)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    losses = [h.get("train_loss") for h in history]
    accs = [h.get("val_top1") for h in history]
    if len(history) == 1:  # a lone point is hard to see: bars with their value written on
        for ax, values, color, fmt in ((ax1, losses, "#1f77b4", "{:.3f}"),
                                       (ax2, accs, "#2ca02c", "{:.2f}%")):
            bars = ax.bar(epochs, values, width=0.5, color=color)
            ax.bar_label(bars, labels=[fmt.format(v) for v in values])
            ax.set_xticks(epochs)
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    else:
        ax1.plot(epochs, losses, marker="o")
        evaluated = [(e, a) for e, a in zip(epochs, accs) if a is not None]  # --eval-every
        ax2.plot([e for e, _ in evaluated], [a for _, a in evaluated], marker="o",
                 color="#2ca02c")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation top-1 (%)")
    fig.suptitle("Fine-tuning")
    return save_figure(fig, Path(path))
