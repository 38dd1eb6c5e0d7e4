"""Absolute MACs targets, both conventions, and held-out model selection."""

from __future__ import annotations

import json

import pytest
import torch

from cdprune import count_macs, prune
from cdprune.cli import main
from cdprune.errors import ConfigError
from cdprune.importance.criteria import l1_scores
from cdprune.measure.macs import paper_macs
from cdprune.models import create_model
from cdprune.pruning.targets import parse_macs, reduction_for_target
from cdprune.runs.inputs import build_data


@pytest.mark.parametrize("text,macs", [("60.02M", 60_020_000), ("2.089G", 2_089_000_000),
                                       ("920000k", 920_000_000), (" 1500 ", 1500),
                                       (4.5e6, 4_500_000), ("1e3K", 1_000_000)])
def test_parse_macs_reads_suffixes(text, macs):
    assert parse_macs(text) == macs


@pytest.mark.parametrize("bad", ["60.02 MB", "M", "-5M", "0", "abc", "1.2.3M"])
def test_parse_macs_names_the_bad_value(bad):
    with pytest.raises(ConfigError, match="MACs target"):
        parse_macs(bad)


def test_physical_target_is_a_fraction_of_the_base_and_out_of_range_is_refused():
    assert reduction_for_target(30, 120, "physical") == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="below the unpruned"):
        reduction_for_target(130, 120, "physical")
    with pytest.raises(ConfigError, match="convention"):
        reduction_for_target(30, 120, "flops")


def test_paper_target_is_met_in_the_paper_convention():
    model = create_model("resnet20", num_classes=10)
    example = torch.randn(2, 3, 32, 32)
    base = count_macs(model, example_inputs=example)
    target = 22_000_000
    scores = l1_scores(model)

    def prune_at(r):
        return prune(model, scores, example_inputs=example, macs_reduction=r, scope="all")

    r = reduction_for_target(target, base, "paper", prune_at, model, example)
    result = prune_at(r)
    assert abs(paper_macs(model, result.plan["kept"], example_inputs=example) - target) \
        <= 0.003 * base
    # The residual stream is pruned: physically the network is smaller than the target.
    assert result.macs_after < target


DIGITS = ["--model", "digits_cnn", "--dataset", "digits", "-b", "64", "-j", "0",
          "--no-progress", "--stats-batch-size", "64", "--stop-batch", "4"]


def test_val_split_holds_training_images_out_and_never_uses_test_images():
    config = {"dataset": "digits", "batch_size": 64, "seed": 0, "val_split": 200}
    data = build_data(config, need_stats=False)
    plain = build_data({**config, "val_split": None}, need_stats=False)
    held = set(data.select.dataset.indices)
    kept = set(data.train.dataset.indices)
    assert len(held) == 200 and not held & kept
    assert len(held) + len(kept) == len(plain.train.dataset)
    with pytest.raises(ConfigError, match="val_split 1000000 must hold out"):
        build_data({**config, "val_split": 10**6}, need_stats=False)


@pytest.mark.slow
def test_run_reports_final_and_selected_accuracy_with_a_paper_target(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", *DIGITS, "--random-init", "--macs-target", "0.1M", "--macs-convention", "paper",
                 "--epochs", "2", "--lr", "0.05", "--val-split", "150", "--output-dir",
                 str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "final-epoch top-1" in printed and "held-out training images" in printed
    assert "MACs in the paper's mask convention: 100k" in printed
    report = json.loads((out / "report.json").read_text())
    assert abs(report["pruning"]["macs_paper_after"] - 100_000) \
        <= 0.003 * report["pruning"]["macs_before"]
    acc = report["accuracy"]
    assert {"finetuned", "finetuned_selected_on_val", "val_best"} <= set(acc)
    assert "finetuned_best_on_test" not in acc  # the test set chose nothing
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert acc["val_best"] == max(h["val_top1"] for h in history)


def test_macs_target_excludes_the_other_targets(capsys):
    code = main(["prune", *DIGITS, "--macs-target", "0.1M", "--sparsity", "0.3",
                 "--output-dir", "unused"])
    assert code == 2
    assert "not allowed with" in capsys.readouterr().err
