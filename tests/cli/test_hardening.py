"""No silent overwrite, no wrong model after a crash, every bad input one line.

The run directory (``run.json``, ``--overwrite``, ``--resume``, the lock), strict typed
configuration, the error boundary of the CLI, and resume with a longer schedule.
Single bad-input messages live in ``test_reliability.CASES`` (the Troubleshooting table).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cdprune import checkpoint, fileio
from cdprune.cli import main
from cdprune.errors import ConfigError
from cdprune.fileio import atomic_write_bytes
from cdprune.models import create_model
from cdprune.runs import files
from cdprune.runs.rundir import RunDir

DATA = ("--dataset", "digits", "-b", "64", "-j", "0", "--no-progress")
TUNE = ("--train-subset", "256", "--lr", "0.05")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "base.pth"
    torch.manual_seed(0)
    torch.save(create_model("digits_cnn").state_dict(), path)
    return path


def _run(base: Path, out: Path, *extra: str, sparsity: str = "0.3",
         epochs: str = "1") -> list[str]:
    return ["run", "--model", "digits_cnn", "--checkpoint", str(base), *DATA, "--stop-batch",
            "2", "--stats-batch-size", "64", *TUNE, "--sparsity", sparsity, "--epochs", epochs,
            "--output-dir", str(out), *extra]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != files.LOCK}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _conv2_width(out: Path) -> int:
    from safetensors.torch import load_file

    return load_file(out / "pruned" / "model.safetensors")["conv2.weight"].shape[0]


# ============================================================== strict configuration
@pytest.mark.parametrize("yaml_text,key", [
    ('overwrite: "false"\n', "overwrite"),
    ('resume: "no"\n', "resume"),
    ("overwrite: 'off'\n", "overwrite"),
    ("overwrite: 1\n", "overwrite"),
])
@pytest.mark.slow
def test_a_quoted_boolean_never_overwrites_a_run(yaml_text, key, tmp_path, base, capsys):
    out = tmp_path / "run"
    assert main(_run(base, out)) == 0
    before = _files(out)
    (tmp_path / "y.yaml").write_text(yaml_text)
    capsys.readouterr()
    assert main(_run(base, out, "-c", str(tmp_path / "y.yaml"), sparsity="0.5")) == 2
    line = _one_line(capsys)
    assert f"{key} must be true or false" in line and "y.yaml" in line
    assert _files(out) == before


@pytest.mark.parametrize("yaml_text,needle", [
    ("seed: [1, 2]\n", "seed must be an integer, got a list"),
    ("device: [cpu]\n", "device must be a string, got a list"),
    ('eval_batch_size: "x"\n', "eval_batch_size must be an integer, got the string 'x'"),
    ("sparsity: yes\n", "sparsity must be a number, got True"),
    ("ignore_layers: conv1\n", "ignore_layers must be a list of names"),
    ("documents: word\n", "--documents 'word' is invalid; it must be one of sample, class"),
    ("1: 3\n", "keys must be flag names, got 1 (int)"),
])
def test_yaml_values_are_checked_per_key(yaml_text, needle, tmp_path, capsys):
    (tmp_path / "y.yaml").write_text(yaml_text)
    argv = ["stats", "--model", "digits_cnn", *DATA, "-c", str(tmp_path / "y.yaml"),
            "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert needle in _one_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,value", [("1e-5", 1e-5), ("5E-4", 5e-4), ("-2.5e-3", -2.5e-3),
                                        ("0.0005", 5e-4), ("3", 3.0)])
def test_yaml_numbers_in_exponent_form_are_numbers(text, value, tmp_path):
    """YAML 1.1 reads 1e-5 as a string; a number written without quotes is a number."""
    from cdprune.cli.main import DEFAULTS
    from cdprune.cli.yamlfile import load_yaml

    (tmp_path / "y.yaml").write_text(f"weight_decay: {text}\nlr: '1e-5'\n")
    with pytest.raises(ConfigError, match="lr must be a number, got the string '1e-5'"):
        load_yaml(tmp_path / "y.yaml", DEFAULTS)
    (tmp_path / "y.yaml").write_text(f"weight_decay: {text}\n")
    assert load_yaml(tmp_path / "y.yaml", DEFAULTS) == {"weight_decay": value}


@pytest.mark.parametrize("device", ["mps", "xpu", "meta", "hpu", "cuda:x", "CPU"])
def test_only_cpu_and_cuda_devices(device, tmp_path, capsys):
    argv = ["stats", "--model", "digits_cnn", *DATA, "--device", device,
            "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert f"--device {device!r} is not supported; use cpu, cuda or cuda:N" in _one_line(capsys)


@pytest.mark.parametrize("flag_values", [("--mean", "0.5", "--std", "0.25"),
                                         ("--mean", "0.5")])
@pytest.mark.slow
def test_mean_and_std_for_one_channel_data(flag_values, tmp_path, base):
    out = tmp_path / "run"
    assert main(_run(base, out, *flag_values, epochs="0")) == 0
    plan = json.loads((out / "pruned" / "plan.json").read_text())
    assert plan["extra"]["mean"] == [0.5]


def test_max_layer_pruning_is_used_as_given(tmp_path, base):
    """A falsy-looking value must reach pruning as given, never replaced by the default."""
    out = tmp_path / "run"
    assert main(_run(base, out, "--max-layer-pruning", "0.05", "--scope", "all",
                     epochs="0")) == 0
    plan = json.loads((out / "pruned" / "plan.json").read_text())
    assert plan["max_layer_pruning"] == 0.05


def test_prune_refuses_a_target_that_removes_nothing(small_net):
    from cdprune.pruning import prune

    scores = {n: torch.rand(m.out_channels) for n, m in small_net.named_modules()
              if isinstance(m, nn.Conv2d)}
    with pytest.raises(ConfigError, match="removes no channel.*smaller round_to"):
        prune(small_net, scores, example_inputs=torch.randn(1, 3, 8, 8), sparsity=0.3,
              round_to=16, scope="all")


# ============================================================== the run directory
@pytest.mark.slow
def test_overwrite_clears_the_old_run_before_the_new_one_writes(tmp_path, base, capsys,
                                                                 monkeypatch):
    """Killed right after --overwrite started, a --resume must not fine-tune the old model."""
    from cdprune.runs import pipeline

    out = tmp_path / "run"
    assert main(_run(base, out, epochs="2")) == 0
    assert _conv2_width(out) < 32
    old_width = _conv2_width(out)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for SIGKILL right after config.yaml says 0.7

    monkeypatch.setattr(pipeline, "gather_stats", killed)
    assert main(_run(base, out, "--overwrite", sparsity="0.7", epochs="2")) == 130
    monkeypatch.undo()
    left = {p.name for p in out.iterdir()}
    assert left <= {files.LOCK, files.CONFIG, files.MANIFEST}, left
    assert json.loads((out / "run.json").read_text())["config"]["sparsity"] == 0.7

    assert main(_run(base, out, "--resume", sparsity="0.7", epochs="2")) == 0
    summary = json.loads((out / "prune_summary.json").read_text())
    assert _conv2_width(out) < old_width  # pruned again, at 0.7
    assert summary["removed_filters"] > 0
    assert checkpoint.safe_torch_load(out / "last.pth")["epoch"] == 2


@pytest.mark.parametrize("stage", ["prune", "stats"])
def test_resume_refuses_a_directory_of_another_command(stage, tmp_path, base, capsys):
    out = tmp_path / "run"
    argv = [stage, "--model", "digits_cnn", "--checkpoint", str(base), *DATA,
            "--stop-batch", "2", "--output-dir", str(out)]
    if stage == "prune":
        assert main(["stats", *argv[1:], "--output-dir", str(tmp_path / "s")]) == 0
        argv += ["--stats", str(tmp_path / "s" / "stats.safetensors"), "--sparsity", "0.3"]
    assert main(argv) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(_run(base, out, "--resume")) == 2
    line = _one_line(capsys)
    assert f"was written by `cdprune {stage}`" in line and "--overwrite" in line
    assert _files(out) == before


def test_resume_refuses_another_configuration(tmp_path, base, capsys):
    out = tmp_path / "run"
    assert main(_run(base, out)) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(_run(base, out, "--resume", sparsity="0.7")) == 2
    line = _one_line(capsys)
    assert "another configuration (sparsity 0.3 there, 0.7 now)" in line
    assert "--overwrite" in line
    assert _files(out) == before


@pytest.mark.parametrize("command", ["stats", "prune"])
def test_refusal_names_only_flags_the_command_has(command, tmp_path, base, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("earlier run\n")
    argv = [command, "--model", "digits_cnn", "--random-init", *DATA, "--output-dir", str(out)]
    if command == "prune":
        argv += ["--sparsity", "0.3", "--stats", str(tmp_path / "s.safetensors")]
    assert main(argv) == 2
    line = _one_line(capsys)
    assert "--overwrite" in line and "--resume" not in line


def test_overwrite_refuses_a_directory_holding_its_inputs(tmp_path, base, capsys):
    """prune --overwrite in the directory holding its statistics: refused, nothing removed."""
    out = tmp_path / "run"
    stats = ["--model", "digits_cnn", "--checkpoint", str(base), *DATA, "--stop-batch", "2",
             "--output-dir", str(out)]
    assert main(["stats", *stats]) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(["prune", *stats, "--sparsity", "0.3", "--overwrite"]) == 2
    line = _one_line(capsys)
    assert "stats.safetensors' lies inside --output-dir" in line and "--overwrite" in line
    assert _files(out) == before
    assert main(["prune", *stats[:-1], str(tmp_path / "pruned"), "--sparsity", "0.3",
                 "--stats", str(out / "stats.safetensors")]) == 0  # what the message says


def test_overwrite_refuses_a_directory_no_run_wrote(tmp_path, base, capsys):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert main(_run(base, out, "--overwrite")) == 2
    assert "no cdprune run wrote" in _one_line(capsys)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_existing_run_check_happens_under_the_lock(tmp_path, base):
    """Two processes that both found the directory empty: the second one is refused."""
    out = tmp_path / "run"
    late = RunDir(out)  # checked while still empty
    assert main(["stats", "--model", "digits_cnn", "--checkpoint", str(base), *DATA,
                 "--stop-batch", "2", "--output-dir", str(out)]) == 0
    before = _files(out)
    with pytest.raises(ConfigError, match="already holds a run"):
        with late:
            pass
    assert _files(out) == before


def test_demo_refuses_another_run_and_replaces_its_own(tmp_path, base, capsys):
    out = tmp_path / "d"
    assert main(_run(base, out, epochs="1")) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(["demo", "--quick", "--no-progress", "--output-dir", str(out)]) == 2
    assert "written by `cdprune run`" in _one_line(capsys)
    assert _files(out) == before

    mine = tmp_path / "mine"
    with RunDir(mine, stage="demo", config={}) as run:
        atomic_write_bytes(run.path / "last.pth", b"left by an earlier demo")
    with RunDir(mine, stage="demo", config={"quick": True}, replaces="demo") as run:
        assert not (run.path / "last.pth").exists()


@pytest.mark.slow
def test_demo_with_overwrite_leaves_no_old_file(tmp_path, base):
    out = tmp_path / "d"
    assert main(_run(base, out, epochs="1")) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(["demo", "--quick", "--no-progress", "--overwrite",
                 "--output-dir", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["stage"] == "demo"
    # Every file there now is one the demo wrote: the old run's are gone or rewritten.
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert present - {"run.json", ".cdprune.lock"} <= set(record["files"])
    assert all(not p.exists() or p.stat().st_mtime_ns != t for p, t in before.items()
               if p.name not in ("run.json", ".cdprune.lock"))


# ============================================================== resume
def _tiny_training(tmp_path: Path):
    from cdprune.finetune.config import TrainConfig

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.arange(64) % 4
    loader = DataLoader(TensorDataset(x, y), batch_size=16)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 4))

    return loader, model, lambda epochs: TrainConfig(epochs=epochs, lr=0.1, batch_size=16)


def test_resume_with_more_epochs_replans_the_schedule(tmp_path, caplog):
    from cdprune.finetune.config import lr_factor
    from cdprune.finetune.loop import fine_tune

    loader, model, cfg = _tiny_training(tmp_path)
    fine_tune(model(), loader, loader, cfg(2), output_dir=tmp_path, progress=False)
    with caplog.at_level(logging.WARNING):
        result = fine_tune(model(), loader, loader, cfg(4), output_dir=tmp_path, resume=True,
                           progress=False)
    lrs = [r["lr"] for r in result.history]
    assert lrs[2] == pytest.approx(0.1 * lr_factor(8, cfg(4), 4))
    assert all(lr > 0 for lr in lrs)
    assert any("re-planned for 4 epochs" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage,needle", [
    (lambda s: s.pop("optimizer"), "lacks 'optimizer'"),
    (lambda s: s.update(history="x"), "malformed 'history'"),
    (lambda s: s.update(epoch="2"), "malformed 'epoch'"),
    (lambda s: s.update(history=s["history"][:-1]), "history has 1 epochs"),
])
@pytest.mark.slow
def test_a_damaged_last_pth_is_one_line(damage, needle, tmp_path, base, capsys):
    out = tmp_path / "run"
    assert main(_run(base, out, epochs="2")) == 0
    state = checkpoint.safe_torch_load(out / "last.pth")
    damage(state)
    fileio.atomic_torch_save(state, out / "last.pth")
    capsys.readouterr()
    assert main(_run(base, out, "--resume", epochs="3")) == 2
    line = _one_line(capsys)
    assert needle in line and "last.pth" in line


_STUCK_IN_TRAINING = r'''
import sys, time, torch
calls = [0]
step = torch.optim.SGD.step
def stuck(self, *a, **k):
    calls[0] += 1
    if calls[0] == 3:
        print("STUCK", flush=True)
        time.sleep(600)
    return step(self, *a, **k)
torch.optim.SGD.step = stuck
from cdprune.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["2", "0"])
def test_sigkill_with_loader_workers_then_resume_at_once(workers, tmp_path, base):
    """kill -9 while DataLoader workers run: the lock goes with the process at once."""
    out = tmp_path / "run"
    argv = _run(base, out, epochs="2")
    argv[argv.index("-j") + 1] = workers
    script = tmp_path / "stuck.py"
    script.write_text(_STUCK_IN_TRAINING)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if line.strip() == "STUCK" or not line:
                break
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main([*argv, "--resume"]) == 0  # immediately: no "another cdprune process"
    assert checkpoint.safe_torch_load(out / "last.pth")["epoch"] == 2


@pytest.mark.slow
def test_resnet18_with_a_last_batch_of_one_image(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--model", "resnet18", "--random-init", "--dataset", "synthetic", "-j", "0",
            "--no-progress", "--stop-batch", "1", "-b", "4", "--train-subset", "5",
            "--sparsity", "0.3", "--epochs", "1", "--output-dir", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "last.pth").is_file()


# ============================================================== the error boundary
@pytest.mark.parametrize("code,needle", [
    (errno.EROFS, "the file system is read-only; choose another --output-dir"),
    (errno.EACCES, "permission denied"),
    (errno.ELOOP, "a symbolic link on the way loops"),
    (errno.EIO, "check the path and the disk"),
])
def test_file_system_errors_are_one_line(code, needle, tmp_path, base, capsys, monkeypatch):
    real = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name == "run":
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    assert main(_run(base, tmp_path / "run")) == 2
    line = _one_line(capsys)
    assert line.startswith("cdprune run: error: cannot use") and needle in line


def test_disk_full_in_stats_suggests_a_flag_stats_has(tmp_path, base, capsys, monkeypatch):
    real = checkpoint.atomic_write_bytes

    def full(path, data):
        if Path(path).name == "scores.safetensors":  # after stats.safetensors was written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", full)
    argv = ["stats", "--model", "digits_cnn", "--checkpoint", str(base), *DATA,
            "--stop-batch", "2", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    line = _one_line(capsys)
    assert "no space left on device" in line and "with --overwrite" in line
    assert "--resume" not in line
    monkeypatch.undo()
    assert main(argv) == 2  # the directory holds a run now
    assert main([*argv, "--overwrite"]) == 0  # what the message suggests works


def test_no_hint_names_an_option_the_command_lacks(tmp_path, capsys, monkeypatch):
    from cdprune.finetune.loop import DivergedError
    from cdprune.runs import pipeline

    def diverged(*args, **kwargs):
        raise DivergedError("training loss became nan at epoch 1, iteration 3", 0.1)

    monkeypatch.setattr(pipeline, "run_finetune", diverged)
    argv = ["run", "--model", "digits_cnn", "--random-init", *DATA, "--stop-batch", "1",
            "--sparsity", "0.3",
            "--epochs", "1", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    line = _one_line(capsys)
    assert "lower --lr (now 0.1)" in line and "lower lr" not in line
