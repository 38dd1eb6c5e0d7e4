"""The deploy path: the final model of a run, evaluated and exported from the CLI.

A run that prunes and fine-tunes must hand its fine-tuned weights to ``eval``, ``export``
and the Python API; exports check only themselves and write nothing when they fail;
comparisons survive a miss and an interruption; BatchNorm recalibration, evaluation bounds,
class-folder datasets, known checkpoints' normalisation and the report details.
"""

from __future__ import annotations

import json
import math
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cdprune
from cdprune.cli import main
from cdprune.data import build_dataset
from cdprune.errors import CheckpointError, ConfigError
from cdprune.export import ExportError, check_output, compare_latency, export
from cdprune.models import create_model

from .helpers import SmallNet, make_loader

DATA = ["--dataset", "digits", "-b", "64", "-j", "0", "--no-progress"]
RUN = ["--model", "digits_cnn", "--random-init", *DATA, "--stats-batch-size", "64",
       "--stop-batch", "2", "--scope", "all", "--macs-reduction", "0.5", "--lr", "0.05"]


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def eval_top1(capsys, *args) -> tuple[float, dict]:
    code, out, err = cli(capsys, "eval", "--dataset", "digits", "-j", "0", "--no-progress",
                         *args)
    assert code == 0, err
    doc = json.loads(out)
    return doc["top1"], doc


def onnx_top1(path: Path) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    val = build_dataset("digits", train=False)
    images = torch.stack([val[i][0] for i in range(len(val))]).numpy()
    labels = np.array([val[i][1] for i in range(len(val))])
    logits = sess.run(None, {"input": images})[0]  # the whole set in one (dynamic) batch
    return 100.0 * float((logits.argmax(1) == labels).mean())


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory) -> Path:
    """A pruned, BN-recalibrated and fine-tuned (2 epochs) digits run."""
    out = tmp_path_factory.mktemp("deploy") / "run"
    assert main(["run", *RUN, "--epochs", "2", "--bn-recalibrate", "128",
                 "--output-dir", str(out)]) == 0
    return out


# ---------------------------------------------------------------- 1: the final model
@pytest.mark.slow
def test_eval_and_onnx_give_the_finetuned_accuracy(tuned_run, capsys, tmp_path):
    report = json.loads((tuned_run / "report.json").read_text())
    tuned, pruned = report["accuracy"]["finetuned"], report["accuracy"]["recalibrated"]
    assert abs(tuned - pruned) > 1, "the test needs fine-tuning to change the accuracy"

    top1, doc = eval_top1(capsys, "--model-dir", tuned_run)
    # the final model is the last epoch's: its accuracy is the headline, whichever epoch
    # scored best on the test set
    assert top1 == pytest.approx(tuned) and doc["weights"] == "last"
    assert eval_top1(capsys, "--model-dir", tuned_run, "--weights", "pruned")[0] \
        == pytest.approx(pruned)
    history = [json.loads(line) for line in (tuned_run / "metrics.jsonl").read_text().splitlines()]
    assert eval_top1(capsys, "--model-dir", tuned_run, "--weights", "last")[0] \
        == pytest.approx(history[-1]["val_top1"])
    # --checkpoint with --model-dir is loaded into the pruned architecture, not ignored
    assert eval_top1(capsys, "--model-dir", tuned_run, "--weights", "pruned", "--checkpoint",
                     tuned_run / "last.pth")[0] == pytest.approx(tuned)

    code, out, err = cli(capsys, "export", "--model-dir", tuned_run, "--output",
                         tmp_path / "m.onnx", "--no-progress")
    assert code == 0, err
    assert "from the last weights" in out and "latency" in out and "threads for both" in out
    assert onnx_top1(tmp_path / "m.onnx") == pytest.approx(tuned, abs=0.3)
    summary = json.loads((tmp_path / "export_onnx.json").read_text())
    assert summary["weights"] == "last" and summary["dynamic_batch"] is True

    api = cdprune.load_run_model(tuned_run)
    fresh = cdprune.load_run_model(tuned_run, "pruned")
    x = torch.randn(4, 1, 8, 8)
    assert not torch.allclose(api(x), fresh(x))


@pytest.mark.slow
def test_a_finetune_directory_is_a_model_dir(tuned_run, capsys, tmp_path):
    ft = tmp_path / "ft"
    code, _, err = cli(capsys, "finetune", *DATA, "--model-dir", tuned_run, "--weights", "best",
                       "--epochs", "1", "--lr", "0.01", "--train-subset", "128",
                       "--output-dir", ft)
    assert code == 0, err
    last = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()][-1]
    assert eval_top1(capsys, "--model-dir", ft)[0] == pytest.approx(last["val_top1"])
    # the demo's layout: run/pruned beside run/finetune
    demo = tmp_path / "demo"
    shutil.copytree(tuned_run / "pruned", demo / "pruned")
    (demo / "finetune").mkdir()
    shutil.copy(tuned_run / "best.pth", demo / "finetune" / "best.pth")
    found = cdprune.find_run_model(demo)
    assert found.kind == "best" and found.weights == demo / "finetune" / "best.pth"
    assert cdprune.find_run_model(demo / "finetune").pruned_dir == demo / "pruned"


@pytest.mark.slow
def test_checkpoint_from_another_pruned_model_is_refused(tuned_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tuned_run / "pruned", other / "pruned")
    plan = json.loads((other / "pruned" / "plan.json").read_text())
    state = torch.load(tuned_run / "best.pth", weights_only=True)
    state["extra"]["plan"]["steps"] = plan["steps"][:1]
    torch.save(state, other / "best.pth")
    with pytest.raises(CheckpointError, match="fine-tuned from another pruned model"):
        cdprune.load_run_model(other)


def test_find_run_model_without_finetuning(tmp_path):
    from cdprune.pruning import prune, save_pruned

    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    scores = {n: torch.rand(m.out_channels) for n, m in model.named_modules()
              if isinstance(m, nn.Conv2d)}
    result = prune(model, scores, example_inputs=torch.randn(2, 3, 16, 16), sparsity=0.3,
                   scope="all")
    save_pruned(tmp_path / "run" / "pruned", result, model_name="tiny_cnn",
                input_size=(3, 16, 16))
    assert cdprune.find_run_model(tmp_path / "run").kind == "pruned"
    with pytest.raises(ConfigError, match="has no best.pth"):
        cdprune.find_run_model(tmp_path / "run", "best")
    with pytest.raises(ConfigError, match="weights 'newest'"):
        cdprune.find_run_model(tmp_path / "run", "newest")
    with pytest.raises(FileNotFoundError, match="holds no model"):
        cdprune.find_run_model(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(cdprune.load_run_model(tmp_path / "run")(x), result.model.eval()(x),
                          atol=1e-6)
    # Fine-tuned: the final model is the last epoch's, not the epoch that scored best.
    weights = result.model.state_dict()
    for name, epoch in (("best.pth", 1), ("last.pth", 3)):
        torch.save({"version": 1, "model": {k: v + epoch for k, v in weights.items()},
                    "epoch": epoch}, tmp_path / "run" / name)
    found = cdprune.find_run_model(tmp_path / "run")
    assert found.kind == "last" and found.weights.name == "last.pth"
    assert cdprune.find_run_model(tmp_path / "run", "best").weights.name == "best.pth"


# ---------------------------------------------------------------- 2: export
def _pruned_tiny() -> nn.Module:
    torch.manual_seed(0)
    return create_model("tiny_cnn").eval()


def test_export_checks_its_own_outputs_and_writes_nothing_on_failure(tmp_path, monkeypatch):
    import cdprune.export as ex

    real = ex._runner

    def drifting(data, fmt, threads=None):
        run = real(data, fmt, threads)
        return lambda x: run(x) + 1e-2

    monkeypatch.setattr(ex, "_runner", drifting)
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.pt")):
        with pytest.raises(ExportError, match="nothing was written"):
            export(_pruned_tiny(), tmp_path / name, format=fmt, input_size=(3, 16, 16))
    assert list(tmp_path.iterdir()) == []


def test_export_check_scales_with_large_outputs(tmp_path, monkeypatch):
    # Logits in the tens of thousands (random weights, no final norm): float32 rounding
    # alone exceeds 1e-4 there, which once refused correct exports (timm's MixNet).
    import cdprune.export as ex

    model = _pruned_tiny()
    with torch.no_grad():
        model.fc.weight.mul_(1e5)
    with torch.no_grad():
        scale = float(model(torch.randn(2, 3, 16, 16)).abs().max())
    assert scale > 1e3
    real = ex._runner
    for drift, ok in ((1e-3, True), (scale * 1e-2, False)):
        monkeypatch.setattr(ex, "_runner", lambda data, fmt, threads=None, d=drift:
                            (lambda run: (lambda x: run(x) + d))(real(data, fmt, threads)))
        path = tmp_path / f"m{int(ok)}.pt"
        if ok:
            assert export(model, path, format="torchscript", input_size=(3, 16, 16)).path == path
        else:
            with pytest.raises(ExportError, match="its largest output"):
                export(model, path, format="torchscript", input_size=(3, 16, 16))
            assert not path.exists()


@pytest.mark.slow
def test_failed_export_from_the_cli_leaves_no_file(tuned_run, tmp_path, capsys, monkeypatch):
    import cdprune.export as ex

    real = ex._runner
    monkeypatch.setattr(ex, "_runner", lambda data, fmt, threads=None:
                        (lambda x: real(data, fmt, threads)(x) + 1.0))
    code, _, err = cli(capsys, "export", "--model-dir", tuned_run, "--output",
                       tmp_path / "m.onnx")
    assert code == 2 and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(ex, "_runner", real)
    code, out, err = cli(capsys, "export", "--model-dir", tuned_run, "--output",
                         tmp_path / "m.onnx", "--static-batch", "--no-latency")
    assert code == 0 and "latency" not in out, err
    summary = json.loads((tmp_path / "export_onnx.json").read_text())
    assert summary["dynamic_batch"] is False and "speedup" not in summary


def test_onnx_export_takes_any_batch_by_default(tmp_path):
    import onnxruntime as ort

    model = _pruned_tiny()
    result = export(model, tmp_path / "m.onnx", input_size=(3, 16, 16))
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 16, 16)
    got = sess.run(None, {"input": x.numpy()})[0]
    assert got.shape == (5, 10)
    assert np.allclose(got, model(x).detach().numpy(), atol=1e-4)
    static = export(model, tmp_path / "s.onnx", input_size=(3, 16, 16), dynamic_batch=False)
    sess = ort.InferenceSession(str(static.path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error type
        sess.run(None, {"input": x.numpy()})


@pytest.mark.parametrize("name,fmt,says", [
    ("best.pth", "onnx", "never replaces checkpoints"),
    ("weights.safetensors", "torchscript", "never replaces checkpoints"),
    ("model.pt", "onnx", "does not end in .onnx"),
    ("state.pt", "torchscript", "is not a TorchScript model"),
])
def test_export_never_replaces_a_checkpoint(tmp_path, name, fmt, says):
    target = tmp_path / name
    torch.save({"w": torch.ones(2)}, target)
    before = target.read_bytes()
    with pytest.raises(ConfigError, match=says):
        export(_pruned_tiny(), target, format=fmt, input_size=(3, 16, 16))
    assert target.read_bytes() == before


def test_torchscript_export_may_replace_an_earlier_export(tmp_path):
    first = export(_pruned_tiny(), tmp_path / "m.pt", format="torchscript",
                   input_size=(3, 16, 16))
    assert check_output(first.path, "torchscript") == first.path


def test_latency_is_measured_side_by_side_with_the_same_threads(tmp_path):
    a = export(_pruned_tiny(), tmp_path / "a.pt", format="torchscript", input_size=(3, 16, 16))
    threads = torch.get_num_threads()
    lat = compare_latency({"a": a.path, "b": a.path}, "torchscript", (3, 16, 16), warmup=1,
                          repeats=3, threads=2)
    assert set(lat) == {"a", "b"} and all(v > 0 for v in lat.values())
    assert torch.get_num_threads() == threads  # restored


# ---------------------------------------------------------------- 3: class folders
def _folder(root: Path, classes: int, per_class: int = 6, size: int = 20) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (size, size, 3)) + 60 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


@pytest.mark.slow
def test_folder_dataset_any_number_of_classes(tmp_path, capsys):
    _folder(tmp_path / "img", classes=3)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", "--model", "tiny_cnn", "--random-init", "--dataset",
                       "folder", "--data-root", tmp_path / "img", "-b", "6", "-j", "0",
                       "--no-progress", "--sparsity", "0.3", "--scope", "all", "--epochs", "1",
                       "--lr", "0.01", "--output-dir", out)
    assert code == 0, err
    assert json.loads((out / "classes.json").read_text()) == ["class_0", "class_1", "class_2"]
    plan = json.loads((out / "pruned" / "plan.json").read_text())
    assert plan["extra"]["num_classes"] == 3 and len(plan["extra"]["classes"]) == 3
    code, text, err = cli(capsys, "eval", "--dataset", "folder", "--data-root", tmp_path / "img",
                          "-j", "0", "--model-dir", out)
    assert code == 0, err
    assert json.loads(text)["num_samples"] == 18


# ---------------------------------------------------------------- 5: compare
@pytest.mark.slow
def test_compare_records_unreachable_targets_and_resumes(tmp_path, capsys, monkeypatch):
    import cdprune.runs.compare as compare

    out = tmp_path / "cmp"
    args = ["compare", "--model", "digits_cnn", "--random-init", *DATA, "--stop-batch", "2",
            "--macs-reduction", "0.4", "0.99", "--criteria", "l1", "fpgm", "--epochs", "0",
            "--scope", "all", "--output-dir", out]
    real_prune, calls = compare.prune, []

    def stop_at_third(*a, **k):
        calls.append(k["macs_reduction"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_prune(*a, **k)

    monkeypatch.setattr(compare, "prune", stop_at_third)
    code, text, _ = cli(capsys, *args)
    assert code == 130
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [(r["macs_target"], r["criterion"]) for r in rows] == [(0.4, "l1"), (0.4, "fpgm")]
    assert "nan" not in text and "fine-tuned" not in text
    assert (out / "compare.md").is_file()

    monkeypatch.setattr(compare, "prune", real_prune)
    code, text, err = cli(capsys, *args, "--resume")
    assert code == 0, err
    assert "resuming: 2 finished rows" in text and text.count(" -40% MACs:") == 0
    doc = json.loads((out / "compare.json").read_text())
    status = {(r["macs_target"], r["criterion"]): r["status"] for r in doc["rows"]}
    assert status == {(0.4, "l1"): "done", (0.4, "fpgm"): "done",
                      (0.99, "l1"): "unreachable", (0.99, "fpgm"): "unreachable"}
    assert "unreachable" in (out / "compare.md").read_text()
    assert "nan" not in text


def test_compare_library_keeps_done_rows(tmp_path):
    from cdprune.runs.compare import compare_criteria

    torch.manual_seed(0)
    net = SmallNet(width=32).eval()
    loader = make_loader(n=32, batch_size=16, seed=1)
    kwargs = dict(train_loader=loader, val_loader=loader, stats_loader=loader,
                  example_inputs=torch.randn(2, 3, 8, 8), output_dir=tmp_path, num_classes=4,
                  progress=False)
    first = compare_criteria(net, macs_reductions=[0.5], criteria=["l1"], **kwargs)
    marked = [{**first[0], "seconds": -1.0}]
    again = compare_criteria(net, macs_reductions=[0.5], criteria=["l1", "fpgm"], done=marked,
                             bn_recalibrate=16, recal_loader=loader, **kwargs)
    assert again[0]["seconds"] == -1.0 and again[1]["criterion"] == "fpgm"
    assert not math.isnan(again[1]["acc_recalibrated"])


# ---------------------------------------------------------------- 6: BN recalibration
def test_recalibrate_bn_averages_exactly_the_asked_images():
    torch.manual_seed(0)
    net = SmallNet().eval()
    loader = make_loader(n=48, batch_size=16)
    images = torch.cat([x for x, _ in loader])[:40]
    momentum = net.bn1.momentum
    assert cdprune.recalibrate_bn(net, loader, 40) == 40
    with torch.no_grad():
        conv = net.conv1(images)
    assert torch.allclose(net.bn1.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not net.training and net.bn1.momentum == momentum
    with pytest.raises(ConfigError, match="positive"):
        cdprune.recalibrate_bn(net, loader, 0)


@pytest.mark.slow
def test_bn_recalibration_is_its_own_report_row(tuned_run, capsys):
    report = json.loads((tuned_run / "report.json").read_text())
    assert set(report["accuracy"]) == {"base", "pruned", "recalibrated", "finetuned",
                                      "finetuned_best_on_test"}
    assert report["pruning"]["bn_recalibrate_images"] == 128
    assert "after BatchNorm recalibration (128 images)" in (tuned_run / "report.md").read_text()


# ---------------------------------------------------------------- 7: bounded evaluation
def test_val_subset_is_seeded():
    from cdprune.runs.inputs import build_data

    config = {"dataset": "digits", "batch_size": 32, "val_subset": 50, "seed": 3}
    a = build_data(config, need_train=False, need_stats=False).val.dataset
    b = build_data(config, need_train=False, need_stats=False).val.dataset
    assert len(a) == 50 and a.indices == b.indices


@pytest.mark.slow
def test_prune_no_eval_skips_both_evaluations(tmp_path, capsys, monkeypatch):
    import importlib

    module = importlib.import_module("cdprune.measure.evaluate")  # the package exports the function
    stats = tmp_path / "s"
    assert cli(capsys, "stats", "--model", "digits_cnn", "--random-init", *DATA,
               "--stop-batch", "2", "--output-dir", stats)[0] == 0
    calls = []
    real = module.evaluate
    monkeypatch.setattr(module, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, out, err = cli(capsys, "prune", "--model", "digits_cnn", "--random-init", *DATA,
                         "--stats", stats / "stats.safetensors", "--sparsity", "0.3",
                         "--no-eval", "--output-dir", tmp_path / "p")
    assert code == 0, err
    assert calls == [] and "accuracy" not in out
    assert "acc_base" not in json.loads((tmp_path / "p" / "prune_summary.json").read_text())


# ---------------------------------------------------------------- 8: normalisation
def test_known_checkpoint_sets_and_checks_normalisation(tmp_path, monkeypatch, caplog):
    import hashlib

    from cdprune.models import known
    from cdprune.runs.inputs import build_data, check_base_accuracy, known_normalisation

    ckpt = tmp_path / "w.pth"
    torch.save({"w": torch.ones(1)}, ckpt)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    entry = known.KnownCheckpoint("test-net", "digits_cnn", "digits", (0.5,), (0.25,), 95.0)
    monkeypatch.setitem(known.KNOWN_CHECKPOINTS, digest, entry)
    config = {"dataset": "digits", "checkpoint": str(ckpt), "batch_size": 64}
    assert known_normalisation(config) == {"mean": (0.5,), "std": (0.25,)}
    assert build_data(config, need_train=False, need_stats=False).mean == (0.5,)
    assert known_normalisation({**config, "mean": [0.3], "std": [0.4]}) is None
    assert known_normalisation({**config, "dataset": "cifar10"}) is None
    assert check_base_accuracy(config, 94.5, 10000) is None
    message = check_base_accuracy(config, 90.0, 10000)
    assert message and "--mean 0.5 --std 0.25" in message and "far below the 95.00%" in message
    assert check_base_accuracy(config, 90.0, 50) is None  # 50 images cannot tell


# ---------------------------------------------------------------- 9: report details
@pytest.mark.parametrize("value,text", [(853018, "853k"), (7140, "7.14k"), (412, "412"),
                                        (1_234_567, "1.23M"), (4.1e9, "4.1G")])
def test_counts_keep_three_significant_digits(value, text):
    from cdprune.runs.report import format_count

    assert format_count(value) == text


def test_environment_names_the_installed_torch_pruning():
    from cdprune.runs.report import environment

    assert environment()["torch_pruning"] == metadata.version("torch-pruning")


def test_one_epoch_training_plot_draws_bars(tmp_path, monkeypatch):
    import cdprune.runs.report as report

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig) or path)
    report.plot_training(tmp_path / "t.png", [{"epoch": 1, "train_loss": 0.7, "val_top1": 80}])
    assert all(len(ax.patches) == 1 for ax in figures[0].axes)


@pytest.mark.slow
def test_no_progress_bars_off_a_terminal(tmp_path, capsys):
    code, out, err = cli(capsys, "stats", "--model", "digits_cnn", "--random-init",
                         "--dataset", "digits", "-j", "0", "--stop-batch", "2",
                         "--output-dir", tmp_path / "s")
    assert code == 0 and "\r" not in err
