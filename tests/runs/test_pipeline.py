"""The pipeline's stage functions on the digits CNN with tiny settings."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn

from cdprune.cli.main import DEFAULTS
from cdprune.errors import ConfigError
from cdprune.importance.activations import ActivationStats
from cdprune.runs import inputs as runsetup
from cdprune.runs import modeldir, pipeline
from cdprune.runs.rundir import RunDir

pytest.importorskip("sklearn")  # the digits dataset


def _config(out, **overrides) -> dict:
    config = dict(DEFAULTS)
    config.update(model="digits_cnn", dataset="digits", batch_size=64, stats_batch_size=64,
                  workers=0, stop_batch=2, no_progress=True, sparsity=0.3, epochs=1,
                  max_iters=3, lr=0.01, output_dir=str(out))
    config.update(overrides)
    return config


def _convs(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stats")
    config = _config(out)
    torch.manual_seed(0)
    model = runsetup.build_model(config, 10)
    with RunDir(out, stage="stats", config=config) as run:
        path = pipeline.run_stats(config, run, model=model)
    return config, model, path


def test_run_stats_writes_statistics_and_scores(stats_run):
    config, model, path = stats_run
    out = path.parent
    assert path.name == "stats.safetensors"
    assert {"stats.safetensors", "scores.safetensors", "scores.png"} <= {
        p.name for p in out.iterdir()}
    stats = ActivationStats.load(path, model=model)
    assert stats.documents == "sample" and stats.num_samples == 2 * 64  # --stop-batch 2
    assert stats.channels == _convs(model)
    assert stats.meta["model"] == "digits_cnn" and stats.meta["dataset"] == "digits"
    from cdprune.checkpoint import read_state_dict

    scores = read_state_dict(out / "scores.safetensors")
    assert {k: v.numel() for k, v in scores.items()} == _convs(model)
    assert all(torch.isfinite(v).all() for v in scores.values())


def test_run_prune_from_the_statistics_file(stats_run, tmp_path):
    config, model, path = stats_run
    config = _config(tmp_path, stats=str(path))
    with RunDir(tmp_path, stage="prune", config=config) as run:
        summary = pipeline.run_prune(config, run, model=model)
    assert summary["macs_after"] < summary["macs_before"]
    assert abs(summary["sparsity"] - 0.3) < 0.05
    assert 0 <= summary["acc_pruned"] <= 100 and 0 <= summary["acc_base"] <= 100
    assert summary["stats_images"] == 128 and summary["stats_sample"] == "stop_batch 2"
    assert json.loads((tmp_path / "prune_summary.json").read_text()) == summary
    assert (tmp_path / "widths.png").is_file() and not (tmp_path / "stats.safetensors").exists()
    pruned, plan = modeldir.load_pruned_dir(tmp_path, {**config, "checkpoint": None}, 10)
    assert _convs(pruned) == summary["widths_after"]
    assert plan["steps"]


def test_run_prune_with_statistics_in_memory_saves_them(stats_run, tmp_path):
    config, model, path = stats_run
    stats = ActivationStats.load(path, model=model)
    config = _config(tmp_path, no_eval=True)
    with RunDir(tmp_path, stage="prune", config=config) as run:
        summary = pipeline.run_prune(config, run, model=model, stats=stats, save_stats=True)
    assert "acc_base" not in summary and "acc_pruned" not in summary  # --no-eval
    assert (tmp_path / "stats.safetensors").is_file() and (tmp_path / "pruned").is_dir()


def test_an_unreachable_target_writes_nothing(stats_run, tmp_path):
    config, model, path = stats_run
    config = _config(tmp_path / "run", stats=str(path), sparsity=None, macs_reduction=0.99)
    with pytest.raises(ConfigError):
        with RunDir(tmp_path / "run", stage="prune", config=config) as run:
            pipeline.run_prune(config, run, model=model)
    assert not (tmp_path / "run").exists()


def test_run_finetune_trains_the_pruned_model(stats_run, tmp_path):
    config, model, path = stats_run
    prune_dir = tmp_path  # writes tmp_path/pruned, the sibling of tmp_path/finetune
    prune_config = _config(prune_dir, stats=str(path), no_eval=True)
    with RunDir(prune_dir, stage="prune", config=prune_config) as run:
        summary = pipeline.run_prune(prune_config, run, model=model)
    out = tmp_path / "finetune"
    config = _config(out, model_dir=str(prune_dir))
    with RunDir(out, stage="finetune", config=config) as run:
        result = pipeline.run_finetune(config, run)
    assert result.epochs_run == 1 and len(result.history) == 1
    assert result.history[0]["iterations"] == 3  # --max-iters 3
    assert not math.isnan(result.final_acc)
    assert {"last.pth", "best.pth", "metrics.jsonl", "training.png"} <= {
        p.name for p in out.iterdir()}
    tuned, _, found = modeldir.load_model_dir(out, {**config, "checkpoint": None}, 10,
                                              weights="best")
    assert found.weights == out / "best.pth"
    assert _convs(tuned) == summary["widths_after"]


@pytest.mark.parametrize("overrides, expected", [
    ({}, {"stats": {"documents": "sample"}, "scores": {"coe": 0.0}, "prune": {}}),
    ({"tap": "act", "normalize": "max", "allocation": "uniform", "coe": 2.0},
     {"stats": {"documents": "sample", "tap": "act"},
      "scores": {"coe": 2.0, "normalize": "max"}, "prune": {"allocation": "uniform"}}),
    ({"variant": "published", "allocation": "uniform"},
     {"stats": {"documents": "sample", "variant": "published"},
      "scores": {"coe": 0.0, "variant": "published"}, "prune": {"allocation": "global"}}),
])
def test_cdp_options_per_stage(overrides, expected):
    assert pipeline.cdp_options({**DEFAULTS, **overrides}) == expected


def _stats_images(data) -> int:
    return sum(len(batch[0]) for batch in data.stats)


def test_statistics_read_a_seeded_sample_unless_stop_batch_is_given(tmp_path, caplog):
    from cdprune.importance.config import StatsConfig

    assert StatsConfig().stats_images == 10240 and DEFAULTS["stop_batch"] is None
    with caplog.at_level(logging.INFO, logger="cdprune.runs.inputs"):
        data = runsetup.build_data(_config(tmp_path, stop_batch=None, stats_images=100),
                                   need_train=False)
    assert _stats_images(data) == 100
    assert "a seeded sample of 100 of the" in caplog.text  # the log says what is read
    again = runsetup.build_data(_config(tmp_path, stop_batch=None, stats_images=100),
                                need_train=False)
    assert list(again.stats.dataset.indices) == list(data.stats.dataset.indices)
    # An explicit --stop-batch reads what it asks, whatever --stats-images says.
    data = runsetup.build_data(_config(tmp_path, stop_batch=1, stats_images=100),
                               need_train=False)
    assert _stats_images(data) == 64
    # The default sample is larger than the digits training set: all of it is read.
    data = runsetup.build_data(_config(tmp_path, stop_batch=None), need_train=False)
    assert _stats_images(data) == len(data.stats.dataset) > 1000
