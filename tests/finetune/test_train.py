"""Tests for cdprune.finetune.loop: config, schedule, checkpoints, exact resume, metrics, DDP."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import cdprune.finetune.loop as train_mod
from cdprune.checkpoint import load_weights
from cdprune.errors import CheckpointError, ConfigError
from cdprune.finetune.config import TrainConfig, build_optimizer, build_scheduler, lr_factor
from cdprune.finetune.loop import TrainResult, fine_tune
from cdprune.finetune.resume import seed_epoch
from cdprune.measure.evaluate import EvalResult

torch.set_num_threads(1)

NUM_CLASSES = 4
RECORD_KEYS = {"epoch", "lr", "iterations", "train_loss", "train_acc", "val_loss", "val_top1",
               "val_top5", "time", "train_time"}


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class ClassImages(Dataset):
    """Class-conditional noise images with random flips and noise from three generators."""

    def __init__(self, n: int, augment: bool, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.targets = (torch.arange(n) % NUM_CLASSES).tolist()
        means = torch.linspace(-1, 1, NUM_CLASSES).view(-1, 1, 1, 1)
        self.images = torch.randn(n, 3, 8, 8, generator=g) * 0.5 + means[self.targets]
        self.augment = augment

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = self.images[i]
        if self.augment:
            if random.random() < 0.5:
                img = img.flip(-1)
            img = img + 0.05 * torch.randn_like(img) + float(np.random.uniform(-0.05, 0.05))
        return img, self.targets[i]


def _loaders(n_train: int = 64, n_val: int = 32, batch_size: int = 16):
    train = DataLoader(ClassImages(n_train, augment=True), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator())
    val = DataLoader(ClassImages(n_val, augment=False, seed=1), batch_size=batch_size)
    return train, val


def _model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def _cfg(**kwargs) -> TrainConfig:
    base = {"epochs": 3, "lr": 0.05, "lr_warmup_epochs": 0.5, "label_smoothing": 0.1,
            "log_every": 2}
    return TrainConfig(**{**base, **kwargs})


class _Killed(Exception):
    pass


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, name", [
    ({"epochs": -1}, "epochs"), ({"epochs": 1.5}, "epochs"), ({"lr": 0}, "lr"),
    ({"lr": -0.1}, "lr"), ({"lr": math.nan}, "lr"), ({"batch_size": 0}, "batch_size"),
    ({"label_smoothing": 1.0}, "label_smoothing"), ({"label_smoothing": -0.1}, "label_smoothing"),
    ({"momentum": 1.0}, "momentum"), ({"momentum": 0.0}, "nesterov"),
    ({"weight_decay": -1e-4}, "weight_decay"), ({"lr_schedule": "linear"}, "lr_schedule"),
    ({"milestones": [10, 5]}, "milestones"), ({"milestones": [0]}, "milestone"),
    ({"gamma": 0}, "gamma"), ({"lr_warmup_epochs": -1}, "lr_warmup_epochs"),
    ({"lr_warmup_epochs": 400}, "lr_warmup_epochs"), ({"max_iters": 0}, "max_iters"),
    ({"seed": -1}, "seed"), ({"clip_grad_norm": 0.0}, "clip_grad_norm"),
    ({"log_every": 0}, "log_every"), ({"amp": "yes"}, "amp"),
])
def test_config_rejects_bad_values_naming_them(kwargs, name):
    with pytest.raises(ConfigError, match=name) as info:
        TrainConfig(**kwargs)
    assert isinstance(info.value, ValueError)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_config_defaults_and_dict_round_trip():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay, cfg.batch_size, cfg.epochs,
            cfg.lr_schedule) == (0.1, 0.9, True, 5e-4, 128, 300, "cosine")
    custom = TrainConfig(epochs=7, lr_schedule="step", milestones=(2, 5), max_iters=9)
    data = custom.to_dict()
    assert json.loads(json.dumps(data)) == data and data["milestones"] == [2, 5]
    assert TrainConfig.from_dict(data) == custom
    with pytest.raises(ConfigError, match="lr_scheduler"):
        TrainConfig.from_dict({"lr_scheduler": "step"})


# ------------------------------------------------------------------------- schedule
def test_warmup_is_linear_then_cosine_reaches_zero():
    cfg = TrainConfig(epochs=10, lr_warmup_epochs=2)
    ipe = 5  # 50 iterations, 10 of warmup
    assert [lr_factor(i, cfg, ipe) for i in range(10)] == pytest.approx(
        [(i + 1) / 10 for i in range(10)])
    assert lr_factor(10, cfg, ipe) == pytest.approx(1.0)
    assert lr_factor(30, cfg, ipe) == pytest.approx(0.5)  # half way through 40 cosine steps
    assert lr_factor(50, cfg, ipe) == pytest.approx(0.0, abs=1e-12)
    assert 0 < lr_factor(49, cfg, ipe) < 0.01
    values = [lr_factor(i, cfg, ipe) for i in range(10, 51)]
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_cosine_without_warmup_starts_at_one():
    cfg = TrainConfig(epochs=4)
    assert lr_factor(0, cfg, 3) == 1.0
    assert lr_factor(12, cfg, 3) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_converts_epoch_milestones_to_iterations():
    cfg = TrainConfig(epochs=10, lr_schedule="step", milestones=[3, 6], gamma=0.1)
    ipe = 5
    assert lr_factor(14, cfg, ipe) == 1.0
    assert lr_factor(15, cfg, ipe) == pytest.approx(0.1)
    assert lr_factor(29, cfg, ipe) == pytest.approx(0.1)
    assert lr_factor(30, cfg, ipe) == pytest.approx(0.01)
    warm = TrainConfig(epochs=10, lr_schedule="step", milestones=[3], lr_warmup_epochs=1)
    assert lr_factor(0, warm, ipe) == pytest.approx(0.2) and lr_factor(5, warm, ipe) == 1.0


def test_scheduler_sets_the_optimizer_rate_every_iteration():
    cfg = TrainConfig(epochs=3, lr=0.2, lr_warmup_epochs=1)
    opt = build_optimizer(TinyNet(), cfg)
    sched = build_scheduler(opt, cfg, iters_per_epoch=4)
    for i in range(12):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * lr_factor(i, cfg, 4))
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    group = opt.param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.9 and group["weight_decay"] == 5e-4


def test_seed_epoch_fixes_the_data_order_per_epoch():
    loader, _ = _loaders()
    orders = []
    for epoch in (0, 1, 0):
        seed_epoch(loader, 3, epoch)
        orders.append(torch.cat([y for _, y in loader]).tolist()
                      + [torch.cat([x for x, _ in loader]).sum().item()])
    assert orders[0] == orders[2] and orders[0] != orders[1]


# ------------------------------------------------------------------------- training
def test_label_smoothing_enters_the_training_loss(tmp_path):
    losses = {}
    for smoothing in (0.0, 0.3):
        train, val = _loaders()
        model = _model()
        reference = _model()
        seed_epoch(train, 0, 0)  # the exact first batch fine_tune will see
        images, labels = next(iter(train))
        expected = F.cross_entropy(reference.train()(images), labels,
                                   label_smoothing=smoothing).item()
        cfg = _cfg(epochs=1, max_iters=1, label_smoothing=smoothing)
        result = fine_tune(model, train, val, cfg, output_dir=tmp_path / str(smoothing),
                           progress=False)
        losses[smoothing] = result.history[0]["train_loss"]
        assert losses[smoothing] == pytest.approx(expected, rel=1e-5)
    assert losses[0.3] != pytest.approx(losses[0.0], rel=1e-3)


def test_checkpoint_is_plain_data_with_everything_needed(tmp_path):
    train, val = _loaders()
    plan = {"widths": {"conv": 6}, "ratio": 0.5, "names": ["conv", "fc"], "t": torch.ones(2)}
    result = fine_tune(_model(), train, val, _cfg(epochs=2), output_dir=tmp_path,
                       extra_state={"plan": plan}, progress=False)
    assert isinstance(result, TrainResult)
    assert result.last_checkpoint == tmp_path / "last.pth"
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "iteration", "best_acc",
            "history", "rng", "config", "extra"} <= set(state)
    assert state["epoch"] == 2 and state["iteration"] == 8 and state["scaler"] is None
    assert state["scheduler"]["last_epoch"] == 8
    assert state["config"] == _cfg(epochs=2).to_dict()
    assert state["extra"]["plan"]["widths"] == {"conv": 6}
    assert torch.equal(state["extra"]["plan"]["t"], torch.ones(2))
    assert set(state["rng"]) == {"torch", "cuda", "python", "numpy"}
    assert len(state["rng"]["python"]["state"]) == 625 and len(state["rng"]["numpy"]["keys"]) == 624
    assert state["optimizer"]["state"], "momentum buffers must be saved"
    assert state["best_acc"] == result.best_acc == max(h["val_top1"] for h in result.history)
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["extra"]["plan"]["ratio"] == 0.5 and best["best_acc"] == result.best_acc
    fresh = load_weights(_model(seed=5), tmp_path / "best.pth")  # read through the safe loader
    assert fresh.fc.weight.shape == (NUM_CLASSES, 6)


def test_resume_after_a_kill_gives_identical_weights(tmp_path):
    train, val = _loaders()
    cfg = _cfg(epochs=3)
    whole = _model()
    full = fine_tune(whole, train, val, cfg, output_dir=tmp_path / "whole", progress=False)

    def kill_after_first(record):
        if record["epoch"] == 1:
            raise _Killed

    train, val = _loaders()
    with pytest.raises(_Killed):
        fine_tune(_model(), train, val, cfg, output_dir=tmp_path / "cut", progress=False,
                  callback=kill_after_first)
    assert torch.load(tmp_path / "cut" / "last.pth", weights_only=True)["epoch"] == 1
    random.seed(123)  # a "new process": other global RNG states, a different initial model
    np.random.seed(123)
    torch.manual_seed(123)
    train, val = _loaders()
    resumed_model = _model(seed=99)
    resumed = fine_tune(resumed_model, train, val, cfg, output_dir=tmp_path / "cut",
                        resume=True, progress=False)
    whole_state, resumed_state = whole.state_dict(), resumed_model.state_dict()
    assert whole_state.keys() == resumed_state.keys()
    for key in whole_state:
        assert torch.equal(whole_state[key], resumed_state[key]), key
    timing = ("time", "train_time")
    strip = [{k: v for k, v in h.items() if k not in timing} for h in full.history]
    assert [{k: v for k, v in h.items() if k not in timing} for h in resumed.history] == strip
    assert resumed.epochs_run == 3 and resumed.best_acc == full.best_acc
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resume_of_a_finished_run_trains_nothing(tmp_path):
    train, val = _loaders()
    first = fine_tune(_model(), train, val, _cfg(epochs=1), output_dir=tmp_path, progress=False)
    model = _model(seed=7)
    again = fine_tune(model, train, val, _cfg(epochs=1), output_dir=tmp_path, resume=True,
                      progress=False)
    assert again.history == first.history
    saved = torch.load(tmp_path / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_resume_without_checkpoint_starts_fresh_and_mismatch_is_an_error(tmp_path, caplog):
    train, val = _loaders()
    with caplog.at_level("WARNING", logger="cdprune.finetune.loop"):
        result = fine_tune(_model(), train, val, _cfg(epochs=1), output_dir=tmp_path,
                           resume=True, progress=False)
    assert result.epochs_run == 1 and "starting from scratch" in caplog.text
    torch.manual_seed(0)
    with pytest.raises(CheckpointError, match="do not fit"):
        fine_tune(TinyNet(num_classes=3), train, val, _cfg(epochs=2), output_dir=tmp_path,
                  resume=True, progress=False)


def test_a_failing_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    train, val = _loaders()
    cfg = _cfg(epochs=2)
    fine_tune(_model(), train, val, cfg, output_dir=tmp_path, progress=False,
              callback=lambda record: True)  # stop after epoch 1
    before = (tmp_path / "last.pth").read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # fails after the bytes went to the temp file
    with pytest.raises(OSError, match="No space"):
        fine_tune(_model(), train, val, cfg, output_dir=tmp_path, resume=True, progress=False)
    monkeypatch.undo()
    assert (tmp_path / "last.pth").read_bytes() == before
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "last.pth",
                                                          "metrics.jsonl"]


def test_best_checkpoint_updates_only_on_improvement(tmp_path, monkeypatch):
    accuracies = iter([50.0, 40.0, 60.0, 60.0])

    def fake_evaluate(model, loader, **kwargs):
        return EvalResult(top1=next(accuracies), top5=100.0, loss=1.0,
                          per_class_accuracy=[], num_samples=1, images_per_second=1.0)

    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)
    best_epochs = []

    def watch(record):
        best_epochs.append(torch.load(tmp_path / "best.pth", weights_only=True)["epoch"])

    train, val = _loaders()
    result = fine_tune(_model(), train, val, _cfg(epochs=4), output_dir=tmp_path,
                       progress=False, callback=watch)
    assert best_epochs == [1, 1, 3, 3]
    assert result.best_acc == 60.0 and result.final_acc == 60.0
    assert torch.load(tmp_path / "last.pth", weights_only=True)["best_acc"] == 60.0


def test_metrics_lines_match_history_and_the_model_learns(tmp_path):
    train, val = _loaders()
    result = fine_tune(_model(), train, val, _cfg(epochs=8, lr=0.3), output_dir=tmp_path,
                       progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history and len(lines) == 8
    assert [r["epoch"] for r in lines] == list(range(1, 9))
    assert [r["iterations"] for r in lines] == list(range(4, 33, 4))
    for record in lines:
        assert set(record) == RECORD_KEYS
        assert all(math.isfinite(v) for v in record.values())
    assert lines[0]["lr"] == pytest.approx(0.3 / 2)  # first warmup step of 2
    assert result.best_acc > 75.0  # 4 classes: chance is 25%
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert json.loads(json.dumps(result.to_dict()))["epochs_run"] == 8


def test_max_iters_stops_mid_epoch(tmp_path):
    train, val = _loaders()
    model = _model()
    steps = []
    model.register_forward_hook(lambda m, i, o: steps.append(1) if m.training else None)
    result = fine_tune(model, train, val, _cfg(epochs=5, max_iters=6), output_dir=tmp_path,
                       progress=False)
    assert len(steps) == 6
    assert result.epochs_run == 2 and result.stopped_early
    assert result.history[-1]["iterations"] == 6
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 6 and state["iteration"] == 6
    again = fine_tune(model, train, val, _cfg(epochs=5, max_iters=6), output_dir=tmp_path,
                      resume=True, progress=False)
    assert len(steps) == 6 and again.epochs_run == 2 and again.stopped_early


def test_callback_can_stop_training_and_zero_epochs_do_nothing(tmp_path):
    train, val = _loaders()
    result = fine_tune(_model(), train, val, _cfg(epochs=3), output_dir=tmp_path / "a",
                       progress=False, callback=lambda r: r["epoch"] == 2)
    assert result.epochs_run == 2 and result.stopped_early
    nothing = fine_tune(_model(), train, val, _cfg(epochs=0), output_dir=tmp_path / "b",
                        progress=False)
    assert math.isnan(nothing.best_acc) and nothing.history == []
    assert not (tmp_path / "b" / "last.pth").exists()


def test_bad_inputs_are_refused(tmp_path):
    train, val = _loaders()
    with pytest.raises(ConfigError, match="extra_state\\['plan'\\]"):
        fine_tune(_model(), train, val, _cfg(), output_dir=tmp_path, progress=False,
                  extra_state={"plan": object()})
    with pytest.raises(FloatingPointError, match="lower lr"):
        fine_tune(_model(), train, val, _cfg(lr=1e30, lr_warmup_epochs=0), output_dir=tmp_path,
                  progress=False)
    assert not (tmp_path / "last.pth").exists()


def test_amp_and_clipping_run_on_cpu(tmp_path, caplog):
    train, val = _loaders()
    with caplog.at_level("WARNING", logger="cdprune.finetune.loop"):
        result = fine_tune(_model(), train, val,
                           _cfg(epochs=1, amp=True, channels_last=True, clip_grad_norm=1.0),
                           output_dir=tmp_path, progress=False)
    assert result.epochs_run == 1 and "amp needs CUDA" in caplog.text


# ------------------------------------------------------------------ distributed
def test_sync_batchnorm_swap_shares_tensors_and_restores_the_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                          nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    bn_inner = model[2][1]
    originals = train_mod._to_sync_batchnorm(model)
    assert set(originals) == {"1", "2.1"}
    assert isinstance(model[2][1], nn.SyncBatchNorm)
    assert model[2][1].weight is bn_inner.weight
    assert model[2][1].running_mean is bn_inner.running_mean
    with torch.no_grad():
        model[2][1].weight.fill_(3.0)
        model[2][1].running_mean.fill_(2.0)
    model.eval()
    train_mod._restore_modules(model, originals)
    assert model[2][1] is bn_inner and type(model[1]) is nn.BatchNorm2d
    assert torch.all(bn_inner.weight == 3.0) and torch.all(bn_inner.running_mean == 2.0)
    assert not bn_inner.training


_DDP_SCRIPT = """
import json, os, sys
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, {test_dir!r})
from test_train import ClassImages, TinyNet, _cfg
from cdprune.finetune.distributed import cleanup, init_distributed
from cdprune.measure.evaluate import evaluate
from cdprune.finetune.loop import fine_tune

torch.set_num_threads(1)
info = init_distributed()
assert info.is_distributed and info.world_size == 2, info
train_set, val_set = ClassImages(64, augment=True), ClassImages(32, augment=False, seed=1)
train = DataLoader(train_set, batch_size=8, sampler=DistributedSampler(train_set, seed=0))
val = DataLoader(val_set, batch_size=8, sampler=DistributedSampler(val_set, shuffle=False))
torch.manual_seed(info.rank)  # different initial weights: DDP must broadcast rank 0's
model = TinyNet()
out = {out_dir!r}
result = fine_tune(model, train, val, _cfg(epochs=2, sync_bn=True),
                   output_dir=os.path.join(out, "run"), progress=False)
torch.save(model.state_dict(), os.path.join(out, f"rank{{info.rank}}.pth"))
full = evaluate(model, DataLoader(val_set, batch_size=8), progress=False)  # not sharded
with open(os.path.join(out, f"history{{info.rank}}.json"), "w") as fh:
    json.dump({{"history": result.history, "bn": type(model.bn).__name__,
               "full_top1": full.top1}}, fh)
cleanup()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_train_in_lockstep(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT).format(
        test_dir=str(Path(__file__).parent), out_dir=str(tmp_path)))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["best.pth", "last.pth", "metrics.jsonl"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    rank0 = torch.load(tmp_path / "rank0.pth", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pth", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    saved = torch.load(run / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in rank0.items())
    out0 = json.loads((tmp_path / "history0.json").read_text())
    out1 = json.loads((tmp_path / "history1.json").read_text())
    timing = ("time", "train_time")
    strip = [{k: v for k, v in h.items() if k not in timing} for h in out0["history"]]
    assert strip == [{k: v for k, v in h.items() if k not in timing} for h in out1["history"]]
    assert out0["history"][0]["iterations"] == 4  # 64 images / 2 ranks / batch 8
    # the sharded validation, summed over ranks, equals one pass over all 32 images
    assert out0["history"][-1]["val_top1"] == pytest.approx(out0["full_top1"])
    assert out0["bn"] == out1["bn"] == "BatchNorm2d"  # sync_bn is for CUDA only
