"""report.json and report.md for a given summary, format_count and the plots."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cdprune.runs.report import (
    environment,
    format_count,
    plot_scores,
    plot_training,
    plot_widths,
    write_report,
)

PRUNING = {"macs_before": 4_000_000, "macs_after": 1_000_000, "macs_reduction": 0.75,
           "params_before": 20_000, "params_after": 12_000, "removed_filters": 12,
           "candidate_filters": 48, "sparsity": 0.25,
           "widths_before": {"conv1": 16, "conv2": 32}, "widths_after": {"conv1": 8}}
ENV = {"cdprune": "0.0.test", "torch": "x"}


def _write(tmp_path, **report):
    report.setdefault("environment", ENV)
    js, md = write_report(tmp_path, report)
    return json.loads(js.read_text()), md.read_text()


@pytest.mark.parametrize("value, text", [
    (None, "-"), (0, "0"), (412, "412"), (7100, "7.1k"), (853_000, "853k"),
    (1_234_000, "1.23M"), (980_000_000, "980M"), (1_500_000_000, "1.5G"), (-2500, "-2.5k"),
])
def test_format_count(value, text):
    assert format_count(value) == text


def test_json_holds_the_summary_as_given(tmp_path):
    acc = {"base": 91.5, "pruned": 40.25, "finetuned": 90.0}
    doc, _ = _write(tmp_path, title="resnet20", pruning=PRUNING, accuracy=acc,
                    config={"model": "resnet20", "seed": 3}, plots=["widths.png"])
    assert doc["title"] == "resnet20" and doc["pruning"] == PRUNING
    assert doc["accuracy"] == acc and doc["config"] == {"model": "resnet20", "seed": 3}
    assert doc["environment"] == ENV and doc["plots"] == ["widths.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]


def test_markdown_tables_show_the_numbers(tmp_path):
    _, md = _write(tmp_path, title="resnet20", pruning=PRUNING,
                   accuracy={"base": 91.5, "pruned": 40.25, "finetuned": 90.0},
                   latency={"pruned_ms": 1.5}, config={"seed": 3}, plots=["widths.png"])
    assert md.startswith("# cdprune report: resnet20\n")
    assert "| MACs | 4M | 1M | -75.0% (4.00x fewer) |" in md
    assert "| parameters | 20k | 12k | -40.0% |" in md
    assert "| base model | 91.50% |" in md and "| right after pruning | 40.25% |" in md
    tuned = [line for line in md.splitlines() if line.startswith("| after fine-tuning")]
    assert len(tuned) == 1 and tuned[0].endswith("| 90.00% |")
    assert "recalibration" not in md  # not measured, not shown
    assert "- latency pruned_ms: 1.5" in md
    # a layer missing from widths_after kept all its channels
    assert "| conv1 | 16 | 8 | 50% |" in md and "| conv2 | 32 | 32 | 100% |" in md
    assert '"seed": 3' in md and "- cdprune: 0.0.test" in md and "![widths.png](widths.png)" in md


def test_recalibration_row_names_its_images_and_nan_is_a_dash(tmp_path):
    _, md = _write(tmp_path, pruning={**PRUNING, "bn_recalibrate_images": 256},
                   accuracy={"pruned": math.nan, "recalibrated": 55.0})
    assert "| after BatchNorm recalibration (256 images) | 55.00% |" in md
    assert "| right after pruning | - |" in md
    assert "base model" not in md and "after fine-tuning" not in md


def test_an_empty_report_still_names_the_run_and_the_environment(tmp_path):
    js, md = write_report(tmp_path, {})
    doc = json.loads(js.read_text())
    assert set(doc) == {"environment"} and doc["environment"]["cdprune"]
    text = md.read_text()
    assert text.startswith("# cdprune report: run\n") and "## Environment" in text
    assert "| MACs |" not in text and "## Per-layer widths" not in text


def test_environment_records_the_versions():
    env = environment()
    assert {"cdprune", "torch", "torch_pruning", "python", "platform"} <= set(env)
    assert env["torch"] == torch.__version__


@pytest.mark.parametrize("history", [
    [{"epoch": 1, "train_loss": 0.5, "val_top1": 80.0}],
    [{"epoch": e, "train_loss": 1 / e, "val_top1": 50.0 + e} for e in (1, 2, 3)],
])
def test_plots_are_png_files(tmp_path, history):
    paths = [plot_widths(tmp_path / "w.png", {"a": 4, "b": 8}, {"a": 2}),
             plot_scores(tmp_path / "s.png", {"a": torch.rand(4), "b": torch.rand(8)}),
             plot_training(tmp_path / "t.png", history)]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
