"""Every registered criterion reaches ``prune``, ``run``, ``compare`` and ``demo``."""

import json

import pytest

from cdprune.cli import main
from cdprune.importance.criteria import criterion_names, get_criterion
from cdprune.pruning.config import PruneConfig

DATA = ["--dataset", "digits", "-b", "64", "-j", "0", "--no-progress"]
FAST = ["--model", "digits_cnn", "--random-init", *DATA, "--stats-batch-size", "64",
        "--stop-batch", "4"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def test_prune_config_offers_every_registered_criterion():
    spec = PruneConfig.__dataclass_fields__["criterion"]
    assert tuple(spec.metadata["choices"]) == criterion_names()
    assert PruneConfig().criterion == "cdp"
    # Only CDP's criteria read activation statistics; Taylor reads training batches.
    assert {c for c in criterion_names() if get_criterion(c).statistics} == {"cdp", "cdp_class"}
    assert {c for c in criterion_names() if get_criterion(c).batches} == {"taylor"}


@pytest.mark.parametrize("criterion", ["l1", "taylor", "fpgm", "bn_scale"])
def test_prune_without_statistics_for_weight_and_gradient_criteria(criterion, tmp_path,
                                                                    capsys):
    out = tmp_path / "p"
    assert run_cli("prune", *FAST, "--criterion", criterion, "--sparsity", "0.3",
                   "--output-dir", out) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["pruning"]["criterion"] == criterion
    assert report["config"]["criterion"] == criterion
    assert f"`{criterion}` criterion" in (out / "report.md").read_text()
    assert not (out / "stats.safetensors").exists()  # no statistics were read or written
    assert f"criterion {criterion}" in capsys.readouterr().out


def test_criteria_rank_differently_through_the_cli(tmp_path):
    widths = {}
    for criterion in ("l1", "random"):
        out = tmp_path / criterion
        assert run_cli("prune", *FAST, "--criterion", criterion, "--sparsity", "0.4",
                       "--no-eval", "--output-dir", out) == 0
        plan = json.loads((out / "pruned" / "plan.json").read_text())
        widths[criterion] = plan["kept"]
    assert widths["l1"] != widths["random"]


def test_prune_with_cdp_still_needs_its_statistics(tmp_path, capsys):
    assert run_cli("prune", *FAST, "--sparsity", "0.3", "--output-dir", tmp_path / "p") == 2
    assert "stats" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["l1", "cdp_class"])
def test_run_end_to_end_with_a_criterion(criterion, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("run", *FAST, "--criterion", criterion, "--macs-reduction", "0.4",
                   "--scope", "all", "--epochs", "1", "--lr", "0.05",
                   "--output-dir", out) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["pruning"]["criterion"] == criterion
    assert abs(report["pruning"]["macs_reduction"] - 0.4) <= 0.05
    assert "finetuned" in report["accuracy"]
    # Statistics are collected for CDP's criteria only.
    assert (out / "stats.safetensors").is_file() == get_criterion(criterion).statistics


def test_published_variant_refuses_another_criterion(tmp_path, capsys):
    assert run_cli("prune", *FAST, "--criterion", "l1", "--variant", "published",
                   "--sparsity", "0.3", "--output-dir", tmp_path / "p") == 2
    err = capsys.readouterr().err
    assert "--variant published" in err and "--criterion l1" in err


def test_unknown_criterion_is_one_line(tmp_path, capsys):
    assert run_cli("prune", *FAST, "--criterion", "l3", "--sparsity", "0.3",
                   "--output-dir", tmp_path / "p") == 2
    assert "l1" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_takes_a_criterion(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", "--quick", "--criterion", "fpgm", "--output-dir", out,
                   "--no-progress") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pruning"]["criterion"] == "fpgm"
    assert not (out / "stats.safetensors").exists()
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.rstrip().endswith("pruned"))
    rows = [line for line in lines if line.startswith(("MACs", "CPU latency"))]
    # The table's columns line up whatever the label lengths.
    column = header.index("base") + len("base")
    assert all(row[column - 1] != " " and row[column] == " " for row in rows), rows


def test_compare_accepts_criterion_as_alias(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert run_cli("compare", *FAST, "--criterion", "l1", "--macs-reduction", "0.3",
                   "--epochs", "0", "--output-dir", out) == 0, capsys.readouterr().err
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert {r["criterion"] for r in rows} == {"l1"}


def test_compare_header_shows_the_values_used(tmp_path):
    out = tmp_path / "cmp"
    assert run_cli("compare", *FAST, "--criteria", "l1", "--macs-reduction", "0.3",
                   "--epochs", "0", "--output-dir", out) == 0
    text = (out / "compare.md").read_text()
    assert "None" not in text
    for line in ("- tap: conv", "- allocation: global", "- normalize: none", "- scope: auto"):
        assert line in text


def test_models_says_what_the_b_suffix_means(capsys):
    assert run_cli("models") == 0
    assert "resnetNb option B" in capsys.readouterr().out


def test_report_md_keeps_four_digits_of_macs():
    from cdprune.runs.report import _markdown

    text = _markdown({"pruning": {"macs_before": 125_485_706, "macs_after": 60_020_000,
                                  "params_before": 853_018, "params_after": 400_000}})
    assert "125.5M" in text and "60.02M" in text


@pytest.mark.parametrize("command, hint", [("run", "--resume"), ("stats", "--overwrite")])
def test_interrupt_says_how_to_go_on(command, hint, monkeypatch, capsys, tmp_path):
    from cdprune.cli import commands as cli_commands

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli_commands.COMMANDS, command, interrupted)
    argv = [command, *FAST, "--output-dir", tmp_path / "r"]
    if command == "run":
        argv += ["--sparsity", "0.3"]
    assert run_cli(*argv) == 130
    err = capsys.readouterr().err
    assert f"cdprune {command}: interrupted" in err and hint in err


@pytest.mark.slow
def test_every_compare_result_is_a_model_directory(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert run_cli("compare", *FAST, "--criteria", "l1", "fpgm", "--macs-reduction", "0.3",
                   "--epochs", "1", "--output-dir", out) == 0, capsys.readouterr().err
    rows = json.loads((out / "compare.json").read_text())["rows"]
    capsys.readouterr()
    for row in rows:
        model_dir = out / row["model_dir"]
        assert (model_dir / "pruned" / "plan.json").is_file() and (model_dir / "last.pth").is_file()
        assert run_cli("eval", "--dataset", "digits", "-j", "0", "--no-progress",
                       "--model-dir", model_dir) == 0, capsys.readouterr().err
        doc = json.loads(capsys.readouterr().out)
        # The final weights are the fine-tuned ones, whose accuracy the table reports.
        assert doc["weights"] == "last"
        assert doc["top1"] == pytest.approx(row["acc_finetuned"], abs=1e-6)
        export = tmp_path / f"{row['criterion']}.onnx"
        assert run_cli("export", "--model-dir", model_dir, "--output", export) == 0, \
            capsys.readouterr().err
        assert export.is_file() and "exported" in capsys.readouterr().out


def test_orphaned_fine_tune_error_names_only_files_that_exist(tmp_path):
    from cdprune.runs.locate import find_run_model

    (tmp_path / "last.pth").write_bytes(b"x")  # fine-tuned weights, no pruned model beside
    with pytest.raises(FileNotFoundError) as info:
        find_run_model(tmp_path, "final")
    message = str(info.value)
    assert str(tmp_path / "last.pth") in message and "best.pth" not in message


@pytest.mark.parametrize("argv, needle", [
    (["--model", "resnet-56", "--random-init"], "resnet56"),
    (["--model", "resnet56", "--checkpoint", "no_such.pth"], "no_such.pth"),
])
def test_model_and_checkpoint_are_checked_before_any_data_is_read(argv, needle, tmp_path,
                                                                  capsys, monkeypatch):
    import cdprune.data.factory as factory

    def no_data(*args, **kwargs):
        raise AssertionError("data were read before the model was checked")

    monkeypatch.setattr(factory, "build_dataset", no_data)
    code = run_cli("stats", *argv, "--dataset", "cifar10", "--data-root", tmp_path / "nodata",
                   "--output-dir", tmp_path / "s")
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "data were read" not in err, err


def test_a_known_checkpoint_of_another_model_names_it(tmp_path):
    import torch

    from cdprune.errors import CheckpointError
    from cdprune.models import create_model, known
    from cdprune.runs.inputs import build_model

    path = tmp_path / "b.pth"
    torch.save(create_model("resnet20b", num_classes=10).state_dict(), path)
    entry = known.KnownCheckpoint("resnet20-optionB-test", "resnet20b", "cifar10",
                                  (0.5,) * 3, (0.25,) * 3, 90.0)
    digest = known._sha256(path)
    known.KNOWN_CHECKPOINTS[digest] = entry
    try:
        with pytest.raises(CheckpointError, match="pass model resnet20b"):
            build_model({"model": "resnet20", "checkpoint": str(path), "dataset": "cifar10"}, 10)
    finally:
        del known.KNOWN_CHECKPOINTS[digest]


@pytest.mark.parametrize("folders, hint", [(3, "hold 3 classes"), (10, "use --dataset folder")])
def test_class_count_hint_is_computed_from_the_folders(folders, hint, tmp_path):
    import torch

    from cdprune.errors import DataError
    from cdprune.models import create_model
    from cdprune.runs.inputs import build_model

    for i in range(folders):
        (tmp_path / "val" / f"class{i}").mkdir(parents=True)
    path = tmp_path / "ten.pth"
    torch.save(create_model("resnet18", num_classes=10).state_dict(), path)
    config = {"model": "resnet18", "checkpoint": str(path), "dataset": "imagenet",
              "data_root": str(tmp_path)}
    with pytest.raises(DataError, match=hint) as info:
        build_model(config, 1000)
    assert "10-class classifier" in str(info.value)


@pytest.mark.parametrize("command", ["eval", "finetune"])
def test_a_model_directory_for_other_images_is_one_line(command, tmp_path, capsys):
    pruned = tmp_path / "p"
    assert run_cli("prune", *FAST, "--criterion", "l1", "--sparsity", "0.3", "--no-eval",
                   "--output-dir", pruned) == 0
    capsys.readouterr()
    argv = [command, "--dataset", "cifar10", "--data-root", tmp_path / "nodata", "-j", "0",
            "--model-dir", pruned]
    if command == "finetune":
        argv += ["--output-dir", tmp_path / "f"]
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert "reads 1-channel images" in err and "--dataset digits" in err, err


def test_compare_as_the_published_network_masks_and_says_so(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert run_cli("compare", *FAST, "--variant", "published", "--criteria", "l1",
                   "--macs-reduction", "0.3", "--epochs", "1", "--max-iters", "2",
                   "--output-dir", out) == 0, capsys.readouterr().err
    doc = json.loads((out / "compare.json").read_text())
    row = doc["rows"][0]
    assert doc["meta"]["prune_mode"] == "mask"
    # masked as published: the network runs whole; the paper's count credits the masks
    assert row["macs_reduction"] == 0 and row["macs_paper"] < 0.75 * row["macs"]
    plan = json.loads((out / row["model_dir"] / "pruned" / "plan.json").read_text())
    assert plan["masked"]
    # compaction does not know this small CNN: the row says so instead of a number
    assert "DigitsCNN" in row["compact"]["unsupported"]
