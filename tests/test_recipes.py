"""The paper's recipes in configs/: valid, faithful to the protocol, and runnable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import cdprune.data as data_module
from cdprune.cli.main import DEFAULTS, main
from cdprune.cli.yamlfile import load_yaml
from cdprune.pruning.targets import parse_macs

from .data.test_data import make_cifar10

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TABLE = {  # the paper's rows: model, MACs after pruning
    "cifar10/resnet56_60M.yaml": ("resnet56", 60.02e6),
    "cifar10/resnet56_50M.yaml": ("resnet56", 49.84e6),
    "cifar10/resnet20_20M.yaml": ("resnet20", 20.76e6),
    "cifar10/vgg16_103M.yaml": ("vgg16_cifar", 103.3e6),
    "imagenet/resnet50_2089M.yaml": ("resnet50", 2089e6),
    "imagenet/resnet18_920M.yaml": ("resnet18", 920e6),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_every_row_of_the_table_has_a_valid_recipe(name):
    config = load_yaml(str(CONFIGS / name), DEFAULTS)  # unknown keys would raise
    model, macs = TABLE[name]
    assert config["model"] == model
    assert parse_macs(config["macs_target"]) == round(macs)
    assert config["macs_convention"] == "paper" and config["variant"] == "published"
    assert config["prune_mode"] == "mask"  # the published code's network
    assert config["lr_schedule"] == "cosine" and config["momentum"] == 0.9
    if name.startswith("cifar10/"):
        assert (config["epochs"], config["lr"], config["weight_decay"], config["batch_size"],
                config["cutout"]) == (300, 0.1, 5e-4, 512, True)
        # The published statistics and normalisation, pinned.
        assert config["stats_augment"] is True
        assert (config["mean"], config["std"]) == ([0.4914, 0.4822, 0.4465],
                                                   [0.2471, 0.2435, 0.2616])
        assert "Lands on published sparsity" in (CONFIGS / name).read_text()
    else:
        assert config["stats_augment"] is False and config["stats_sample"] == "random"
        assert "stats_sample: first" in (CONFIGS / name).read_text()
    assert sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")) \
        == sorted(TABLE)


@pytest.mark.slow
def test_a_shortened_recipe_runs_end_to_end(tmp_path, monkeypatch, capsys):
    make_cifar10(tmp_path / "data", n=16)  # 80 training and 16 test images
    real = data_module.cifar._check_cifar_files
    monkeypatch.setattr(data_module.cifar, "_check_cifar_files",
                        lambda folder, names, spec, root, verify: real(folder, names, spec,
                                                                       root, False))
    out = tmp_path / "run"
    code = main(["run", "--random-init", "-c", str(CONFIGS / "cifar10/resnet20_20M.yaml"),
                 "--data-root", str(tmp_path / "data"), "--output-dir", str(out),
                 "--epochs", "2", "-b", "16", "--stats-batch-size", "16", "--stop-batch", "2",
                 "-j", "0", "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    pruning = report["pruning"]
    # The paper-convention target of the row is met within 0.3 points of the base MACs.
    assert abs(pruning["macs_paper_after"] - 20.76e6) <= 0.003 * pruning["macs_before"]
    assert pruning["macs_after"] > 0
    accuracy = report["accuracy"]
    assert {"finetuned", "finetuned_best_on_test"} <= set(accuracy)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[0]["lr"] == 0.1
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["cutout"] is True and config["batch_size"] == 16
    assert "paper's mask convention" in (out / "report.md").read_text()
    # The published network: masks over every kind of convolution, listed per layer.
    assert pruning["prune_mode"] == "mask" and pruning["macs_after"] == pruning["macs_before"]
    removed = report["removed_filters"]
    assert sum(map(len, removed.values())) == pruning["removed_filters"]
    assert any(n.endswith(".conv2") for n in removed) and any(n.endswith(".conv1")
                                                              for n in removed)
    from cdprune import ActivationStats

    assert ActivationStats.load(out / "stats.safetensors").meta["stats_augment"] is True
    # ... and the deployable network made from it, measured beside it.
    deploy = report["deployable"]
    assert deploy["macs"] < pruning["macs_before"] and deploy["params"] < deploy["params_masked"]
    assert deploy["macs_paper"] == pruning["macs_paper_after"]
    assert deploy["bn_recalibrate_images"] == 80  # all the training images there are
    assert deploy["latency_compact_ms"] > 0 and deploy["latency_masked_ms"] > 0
    assert "The masked network and the deployable network" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["eval", "--model-dir", str(out / "compact"), "--data-root",
                 str(tmp_path / "data"), "-j", "0", "--device", "cpu", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(
        deploy["acc_recalibrated"])
    # export of the run deploys the compact network, not the masks
    assert main(["export", "--model-dir", str(out), "--format", "torchscript",
                 "--no-latency", "--output", str(tmp_path / "m.pt")]) == 0
    exported = torch.jit.load(str(tmp_path / "m.pt"))
    assert sum(p.numel() for p in exported.parameters()) == deploy["params"]
