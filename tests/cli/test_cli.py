import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cdprune.cli import main

DATA = ["--dataset", "digits", "-b", "64", "-j", "0", "--no-progress"]
FAST = ["--model", "digits_cnn", "--random-init", *DATA, "--stats-batch-size", "64",
        "--stop-batch", "4"]


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def test_models_lists_the_zoo(capsys):
    assert run_cli("models") == 0
    out = capsys.readouterr().out
    for name in ("resnet56", "resnet56b", "vgg16_cifar", "resnet50", "mobilenet_v2"):
        assert name in out


@pytest.mark.slow
def test_run_end_to_end_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code = run_cli("run", *FAST, "--macs-reduction", "0.5", "--scope", "all", "--epochs", "1",
                   "--lr", "0.05", "--output-dir", out)
    assert code == 0, capsys.readouterr().err
    for name in ("config.yaml", "stats.safetensors", "scores.safetensors", "pruned/plan.json",
                 "pruned/model.safetensors", "last.pth", "best.pth", "metrics.jsonl",
                 "report.md", "report.json", "widths.png", "scores.png", "training.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert abs(report["pruning"]["macs_reduction"] - 0.5) <= 0.003
    assert set(report["accuracy"]) == {"base", "pruned", "finetuned", "finetuned_best_on_test"}
    assert report["environment"]["torch"] == torch.__version__
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["macs_reduction"] == 0.5 and config["model"] == "digits_cnn"
    assert "MACs" in (out / "report.md").read_text()


@pytest.mark.slow
def test_two_step_workflow_and_eval_and_export(tmp_path, capsys):
    stats_dir, prune_dir, tune_dir = tmp_path / "s", tmp_path / "p", tmp_path / "f"
    assert run_cli("stats", *FAST, "--documents", "class", "--output-dir", stats_dir) == 0
    assert run_cli("prune", *FAST, "--stats", stats_dir / "stats.safetensors", "--sparsity",
                   "0.3", "--output-dir", prune_dir) == 0
    assert (prune_dir / "pruned" / "plan.json").is_file()
    assert run_cli("finetune", *DATA, "--model-dir", prune_dir, "--epochs", "1",
                   "--output-dir", tune_dir) == 0
    capsys.readouterr()
    assert run_cli("eval", "--dataset", "digits", "-j", "0", "--no-progress",
                   "--model-dir", prune_dir) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["top1"] <= 100 and result["num_samples"] > 0
    assert run_cli("export", "--model-dir", prune_dir, "--format", "onnx") == 0
    assert (prune_dir / "pruned" / "model.onnx").is_file()
    assert "latency" in capsys.readouterr().out


def test_cdp_options_reach_every_stage_and_published_pins_them(tmp_path, capsys):
    from safetensors.torch import load_file

    from cdprune import ActivationStats, tfidf_scores

    variant_flags = ["--tap", "act", "--normalize", "mean", "--allocation", "uniform"]
    # published with explicit other options: refused with them named, never replaced
    assert run_cli("prune", *FAST, *variant_flags, "--variant", "published", "--stats",
                   tmp_path / "none.safetensors", "--sparsity", "0.5", "--output-dir",
                   tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "--tap act, --normalize mean, --allocation uniform were given too" in err
    for name, extra in (("v", variant_flags), ("p", ["--variant", "published"])):
        out = tmp_path / name
        assert run_cli("stats", *FAST, *extra[:4], *extra[6:], "--output-dir", out / "s") == 0
        assert run_cli("prune", *FAST, *extra, "--stats", out / "s" / "stats.safetensors",
                       "--sparsity", "0.5", "--output-dir", out / "p") == 0
    stats = {n: ActivationStats.load(tmp_path / n / "s" / "stats.safetensors") for n in "vp"}
    assert stats["v"].meta["tap"] == "act" and stats["p"].meta["tap"] == "conv"
    saved = load_file(tmp_path / "v" / "s" / "scores.safetensors")
    assert all(abs(float(v.mean()) - 1) < 1e-5 for v in saved.values())  # normalised
    published = load_file(tmp_path / "p" / "s" / "scores.safetensors")
    expected = tfidf_scores(stats["p"], variant="published")
    assert all(torch.equal(published[k], expected[k]) for k in expected)
    plans = {n: json.loads((tmp_path / n / "p" / "pruned" / "plan.json").read_text())
             for n in "vp"}
    assert plans["v"]["allocation"] == "uniform"
    # published: the published code's network, every conv filter ranked and masked
    assert plans["p"]["mode"] == "mask" and plans["p"]["steps"] == []
    assert sum(map(len, plans["p"]["masked"].values())) == 80 - int(80 * 0.5) + 1
    # uniform: every layer keeps about half of its filters
    widths = {"conv1": 16, "conv2": 32, "conv3": 32}
    fractions = [len(plans["v"]["kept"][k]) / w for k, w in widths.items()]
    assert all(0.4 <= f <= 0.6 for f in fractions), fractions


def test_yaml_config_sets_defaults_and_flags_win(tmp_path):
    from cdprune.cli.main import build_parser, resolve_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: resnet20\nrandom-init: true\nlr: 0.05\nmacs-reduction: 0.4\nepochs: 3\n")
    args = build_parser().parse_args(["run", "-c", str(cfg), "--epochs", "7"])
    config = resolve_config(args)
    assert config["model"] == "resnet20" and config["lr"] == 0.05
    assert config["macs_reduction"] == 0.4 and config["epochs"] == 7


@pytest.mark.parametrize("argv,needle", [
    (["prune", "--model", "resnet20", "--sparsity", "1.5"], "--sparsity"),
    (["prune", "--model", "resnet20"], "exactly one"),
    (["run", "--model", "resnet20", "--macs-reduction", "0.5", "--stop-batch", "0"],
     "--stop-batch"),
    (["run", "--model", "resnet20", "--macs-reduction", "0.5", "--coe", "-1"], "--coe"),
    (["run", "--model", "resnet20", "--macs-reduction", "0.5", "--epochs", "-2"], "--epochs"),
    (["run", "--model", "resnet2O", "--random-init", "--macs-reduction", "0.5",
      "--output-dir", "{tmp}/x", "--dataset", "digits"], "resnet20"),
    (["eval", "--model", "digits_cnn", "--dataset", "digits", "--checkpoint", "{tmp}/none.pth"],
     "does not exist"),
    (["prune", "--model", "resnet20", "--latency-reduction", "1.2"], "--latency-reduction"),
    (["prune", "--model", "resnet20", "--latency-reduction", "0"], "--latency-reduction"),
    (["prune", "--model", "resnet20", "--latency-reduction", "0.4", "--macs-reduction", "0.5"],
     "not allowed with"),
    (["run", "--model", "resnet20", "--latency-reduction", "0.4", "--latency-batch", "0"],
     "--latency-batch"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_existing_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.md").write_text("previous run")
    for extra in ((), ("--overwrite",)):  # files no cdprune run wrote: never removed
        assert run_cli("stats", *FAST, "--output-dir", out, *extra) == 2
        assert "choose another --output-dir" in capsys.readouterr().err
        assert (out / "report.md").read_text() == "previous run"


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(ValueError, match="sparsity"):
        run_cli("prune", "--model", "resnet20", "--sparsity", "2", "--debug")


def _finetune_cmd(out: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cdprune.cli", "finetune", *DATA, "--model-dir",
            str(out.parent / "pruned_src"), "--epochs", str(epochs), "--lr", "0.05",
            "--output-dir", str(out), *extra]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    assert run_cli("run", *FAST, "--macs-reduction", "0.5", "--scope", "all", "--epochs", "0",
                   "--output-dir", tmp_path / "src") == 0
    (tmp_path / "pruned_src").symlink_to(tmp_path / "src" / "pruned")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_finetune_cmd(full, 6), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_finetune_cmd(killed, 6), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 1 <= done < 6, "the run must be killed part-way"
    subprocess.run(_finetune_cmd(killed, 6, "--resume"), check=True, env=env,
                   capture_output=True)
    a = torch.load(full / "last.pth", weights_only=True)["model"]
    b = torch.load(killed / "last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_process_gloo_run(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "cdprune.cli", "run",
           *FAST, "--macs-reduction", "0.5", "--scope", "all", "--epochs", "1",
           "--output-dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "report.json").is_file() and (out / "last.pth").is_file()
    assert proc.stdout.count("fine-tuned: final-epoch top-1") == 1  # only rank 0 prints


def test_prune_to_latency_target_records_the_timings(tmp_path, monkeypatch):
    """--latency-reduction reaches prune() with --latency-batch; a fake timer stands in for
    the clock (the latency model's own tests cover real measurement logic)."""
    from cdprune.measure import latency

    def fake(module, x):  # seconds from the convolutions' weights: shrinks with pruning
        return sum(m.weight.numel() for m in module.modules()
                   if isinstance(m, torch.nn.Conv2d)) * x.shape[0] * 1e-9

    real_post_init = latency.LatencySettings.__post_init__

    def post_init(self):  # every LatencySettings the run makes times with the fake
        real_post_init(self)
        self.timer = self.timer or fake

    monkeypatch.setattr(latency.LatencySettings, "__post_init__", post_init)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert run_cli("run", *FAST, "--latency-reduction", "0.3", "--latency-batch", "4",
                   "--epochs", "0", "--output-dir", out) == 0
    summary = json.loads((out / "report.json").read_text())
    info = json.dumps(summary)
    assert '"latency"' in info and '"batch_size": 4' in info and '"hit": true' in info


def test_a_runs_config_yaml_repeats_it(tmp_path, capsys):
    """config.yaml holds every option and the command's inputs as a YAML config: -c with
    it resolves to the same configuration (but for the output directory)."""
    import yaml

    from cdprune.cli.main import build_parser, resolve_config
    from cdprune.runs.rundir import RunDir

    first = resolve_config(build_parser().parse_args(
        [str(a) for a in ["prune", *FAST, "--macs-reduction", "0.4", "--scope", "all",
                          "--stats", tmp_path / "s.safetensors", "--output-dir", tmp_path / "a"]]))
    run = RunDir(tmp_path / "a", stage="prune", config=first)
    with run:
        path = run.write_config(first)
    assert path.read_text().startswith("# cdprune prune: the resolved configuration")
    again = resolve_config(build_parser().parse_args(
        ["prune", "-c", str(path), "--output-dir", str(tmp_path / "b")]))
    differ = {k for k in set(first) | set(again) if first.get(k) != again.get(k)}
    assert differ == {"output_dir", "config"}, differ
    assert again["stats"] == str(tmp_path / "s.safetensors")  # the command's input too
    assert "command" not in yaml.safe_load(path.read_text())
