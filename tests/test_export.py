import builtins

import pytest
import torch

from cdprune.errors import ConfigError
from cdprune.export import export, export_latency
from cdprune.models import create_model
from cdprune.pruning import load_pruned, prune, save_pruned

from .helpers import random_scores, randomize_bn


def pruned_resnet20(option: str = "") -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(create_model(f"resnet20{option}"))
    return prune(model, random_scores(model), example_inputs=torch.randn(2, 3, 32, 32),
                 macs_reduction=0.4, scope="all").model


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("case", ["tiny_cnn", "resnet20", "resnet20b"])
@pytest.mark.slow
def test_export_matches_pytorch(tmp_path, fmt, case):
    if case == "tiny_cnn":
        torch.manual_seed(0)
        model, size = randomize_bn(create_model("tiny_cnn")), (3, 16, 16)
    else:
        model, size = pruned_resnet20("b" if case.endswith("b") else ""), (3, 32, 32)
    result = export(model, tmp_path / f"m.{fmt}", format=fmt, input_size=size,
                    dynamic_batch=True)
    assert result.path.is_file() and result.size_bytes == result.path.stat().st_size
    assert result.max_abs_diff <= 1e-4
    assert export_latency(result.path, fmt, size, iters=3, warmup=1) > 0


def test_export_reloaded_pruned_model(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(create_model("resnet20"))
    result = prune(model, random_scores(model), example_inputs=torch.randn(2, 3, 32, 32),
                   sparsity=0.3)
    save_pruned(tmp_path / "run", result, model_name="resnet20", input_size=(3, 32, 32))
    loaded = load_pruned(tmp_path / "run", create_model("resnet20"))
    out = export(loaded, tmp_path / "m.onnx", format="onnx", input_size=(3, 32, 32))
    assert out.max_abs_diff <= 1e-4


def test_export_errors(tmp_path, monkeypatch):
    model = create_model("tiny_cnn")
    with pytest.raises(ConfigError, match="not supported"):
        export(model, tmp_path / "m.tflite", format="tflite", input_size=(3, 16, 16))
    with pytest.raises(ConfigError, match="cannot write"):
        export(model, tmp_path, format="torchscript", input_size=(3, 16, 16))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write"):
        export(model, blocker / "sub" / "m.pt", format="torchscript", input_size=(3, 16, 16))
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(ConfigError, match=r"cdprune\[dev\]"):
        export(model, tmp_path / "m.onnx", format="onnx", input_size=(3, 16, 16))


def test_export_model_dir_writes_the_file_and_its_record(tmp_path):
    import json

    from cdprune.export import ExportConfig, export_model_dir

    torch.manual_seed(0)
    model = randomize_bn(create_model("tiny_cnn"))
    result = prune(model, random_scores(model), example_inputs=torch.randn(2, 3, 16, 16),
                   sparsity=0.3)
    save_pruned(tmp_path / "pruned", result, model_name="tiny_cnn", input_size=(3, 16, 16))
    summary = export_model_dir(tmp_path / "pruned",
                               ExportConfig(format="torchscript", no_latency=True),
                               weights="pruned")
    assert (tmp_path / "pruned" / "model.pt").is_file() and summary["weights"] == "pruned"
    assert summary["base_model"] == "tiny_cnn" and "speedup" not in summary
    record = json.loads((tmp_path / "pruned" / "export_torchscript.json").read_text())
    assert record["max_abs_diff"] < 1e-4 and "base_model" not in record
    with pytest.raises(ConfigError, match="format='tflite'"):
        export_model_dir(tmp_path / "pruned", ExportConfig(format="tflite"))


@pytest.mark.parametrize("opset", [-1, 0, 6, 99, 10**20])
def test_opset_outside_the_exporters_range_is_one_line(opset, tmp_path, capsys):
    from cdprune.cli import main
    from cdprune.export import onnx_opsets

    low, high = onnx_opsets()
    assert not low <= opset <= high
    code = main(["export", "--model-dir", str(tmp_path), "--opset", str(opset)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--opset {opset} is invalid" in err and f"from {low} to {high}" in err
