"""Typed stage options: one field gives the flag, the YAML key, the type, the default, the help."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import pytest

from cdprune.cli.config_io import CHOICES, KEY_TYPES, load_yaml
from cdprune.cli.main import DEFAULTS, build_parser, main, resolve_config, yaml_names
from cdprune.errors import ConfigError
from cdprune.finetune.config import TrainConfig
from cdprune.options import (
    CompactConfig,
    OptionError,
    PruneConfig,
    StatsConfig,
    add_options,
    defaults,
    key_types,
    option,
    option_specs,
)

# The commands whose flags include every option of a stage.
STAGES = [(StatsConfig, ("stats", "prune", "run")), (PruneConfig, ("prune", "run")),
          (CompactConfig, ("compact",)), (TrainConfig, ("finetune", "run", "compare"))]


def _subparser(command: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions
                  if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _help(command: str) -> str:
    return _subparser(command).format_help()


@pytest.mark.parametrize("cls,commands", STAGES)
def test_every_field_is_a_flag_a_yaml_key_and_a_default(cls, commands, tmp_path):
    specs = option_specs(cls)
    flagged = [f.name for f in fields(cls) if "help" in f.metadata]
    assert [s.name for s in specs] == flagged and flagged
    for spec in specs:
        assert DEFAULTS[spec.name] == spec.default
        assert KEY_TYPES[spec.name] == spec.kind
        if spec.choices:
            assert CHOICES[spec.name] == spec.choices
        if spec.default not in (None, False) and not spec.negate:
            shown = " ".join(map(str, spec.default)) if isinstance(spec.default, list) \
                else spec.default
            assert f"(default: {shown})" in spec.help
        for command in commands:
            dests = {a.dest: a for a in _subparser(command)._actions}
            assert spec.name in dests, (command, spec.name)
            assert spec.flags[0] in dests[spec.name].option_strings
            assert dests[spec.name].help == spec.help
        # The YAML key: the option's name, or its flag with dashes.
        for key in (spec.name, spec.flags[0][2:]):
            value = {"bool": True, "int": 3, "float": 0.5, "str": spec.choices[0]
                     if spec.choices else "x", "strs": ["conv1"], "size": "60M",
                     "ints": [3, 5]}[spec.kind]
            path = tmp_path / "c.yaml"
            path.write_text(f"{key}: {value}\n")
            assert load_yaml(path, DEFAULTS, yaml_names(commands[0])) == {spec.name: value}


def test_export_options_are_the_export_flags():
    from cdprune.export import ExportConfig

    dests = {a.dest: a for a in _subparser("export")._actions}
    for spec in option_specs(ExportConfig):
        assert spec.flags[0] in dests[spec.name].option_strings
        assert dests[spec.name].default is None  # unset on the command line: the default
    args = build_parser().parse_args(["export", "--model-dir", "d", "--format", "torchscript"])
    config = resolve_config(args)
    assert config["format"] == "torchscript" and "opset" not in config  # its default applies


def test_an_option_is_one_field():
    @dataclass
    class Wider(PruneConfig):
        new_knob: int = option(3, "a knob for the test", positive=True)

    assert defaults(Wider)["new_knob"] == 3 and key_types(Wider)["new_knob"] == "int"
    parser = argparse.ArgumentParser()
    add_options(parser, Wider)
    assert "a knob for the test (default: 3)" in " ".join(parser.format_help().split())
    assert parser.parse_args(["--new-knob", "5"]).new_knob == 5
    assert parser.parse_args([]).new_knob is None  # unset: the config and defaults decide
    with pytest.raises(SystemExit):
        parser.parse_args(["--new-knob", "0"])  # positive: argparse refuses it


@pytest.mark.parametrize("config,key,text", [
    (StatsConfig(stop_batch=0), "stop_batch", "--stop-batch 0 is invalid; it must be a "
     "positive number of batches"),
    (StatsConfig(coe=-1.0), "coe", "--coe -1.0 is invalid"),
    (StatsConfig(stats_images=0), "stats_images", "--stats-images 0 is invalid; it must be a "
     "positive number of images"),
    (PruneConfig(sparsity=1.0), "sparsity", "--sparsity 1.0 is invalid; it must be a fraction"),
    (PruneConfig(max_layer_pruning=0.0), "max_layer_pruning", "--max-layer-pruning 0.0 is "
     "invalid; it must be a fraction in (0, 1]"),
    (PruneConfig(round_to=0), "round_to", "--round-to 0 is invalid"),
])
def test_validate_names_the_option_and_the_cli_names_the_flag(config, key, text):
    with pytest.raises(OptionError) as info:
        config.validate()
    assert info.value.key == key and f"{key}=" in str(info.value)
    assert info.value.as_flag().startswith(text)


def test_prune_target_is_required_only_when_asked():
    PruneConfig().validate()
    with pytest.raises(ConfigError, match="exactly one of --sparsity, --macs-reduction, --macs-target or --latency-reduction"):
        PruneConfig().validate(need_target=True)
    with pytest.raises(ConfigError, match="exactly one"):
        PruneConfig(sparsity=0.3, macs_target="60M").validate(need_target=True)
    PruneConfig(macs_reduction=0.5).validate(need_target=True)
    PruneConfig(macs_target="60.02M").validate(need_target=True)
    PruneConfig(latency_reduction=0.4).validate(need_target=True)
    with pytest.raises(ConfigError, match="latency_batch|--latency-batch"):
        PruneConfig(latency_reduction=0.4, latency_batch=0).validate()
    with pytest.raises(ConfigError, match="MACs target"):
        PruneConfig(macs_target="lots").validate()


def test_cli_shows_a_stage_error_under_its_flag(capsys):
    assert main(["prune", "--model", "resnet20", "--random-init", "--sparsity", "0.3",
                 "--max-layer-pruning", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-layer-pruning 0.0 is invalid" in err and "max_layer_pruning=" not in err


@pytest.mark.parametrize("key", ["lr-scheduler", "lr_scheduler", "lr_schedule", "lr-schedule"])
def test_yaml_keys_are_flag_names_with_dashes_or_underscores(key, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: step\nwd: 0.001\ndataroot: /data\n")
    args = build_parser().parse_args(["finetune", "-c", str(path), "--model-dir", "x"])
    config = resolve_config(args)
    assert config["lr_schedule"] == "step" and config["weight_decay"] == 0.001
    assert config["data_root"] == "/data"


def test_yaml_key_given_twice_or_unknown_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr-scheduler: step\nlr_schedule: cosine\n")
    with pytest.raises(ConfigError, match="sets lr_schedule twice"):
        load_yaml(path, DEFAULTS, yaml_names("finetune"))
    path.write_text("lr-schedular: step\n")
    with pytest.raises(ConfigError, match="unknown key 'lr-schedular'; did you mean"):
        load_yaml(path, DEFAULTS, yaml_names("finetune"))


@pytest.mark.parametrize("command,absent,present", [
    ("stats", ["--batch-size", "--train-subset", "--val-subset", "--epochs", "--lr "],
     ["--stop-batch", "--stats-batch-size", "--output-dir", "--seed"]),
    ("eval", ["--overwrite", "--seed", "--output-dir", "training batch size", "--train-subset"],
     ["evaluation batch size", "--val-subset", "--device"]),
    ("export", ["--output-dir", "--overwrite", "--device"], ["--output OUTPUT"]),
    ("demo", ["--device", "--batch-size"], ["--output-dir", "--quick"]),
    ("finetune", ["--stop-batch", "--sparsity"], ["training batch size", "--train-subset",
                                                  "--lr-scheduler"]),
])
def test_help_lists_only_the_flags_a_command_reads(command, absent, present):
    text = _help(command)
    for flag in absent:
        assert flag not in text, (command, flag)
    for flag in present:
        assert flag in text, (command, flag)


def test_flags_left_out_of_help_are_still_accepted():
    # One set of flags serves every step of a script.
    args = build_parser().parse_args(["stats", "-b", "64", "--train-subset", "10"])
    assert args.batch_size == 64 and args.train_subset == 10
    args = build_parser().parse_args(["eval", "--seed", "3", "--output-dir", "x"])
    assert args.seed == 3


def test_help_shows_defaults_from_the_configs():
    text = " ".join(_help("prune").split())
    assert "most a layer may lose (default: 0.9)" in text
    assert "batch size of the statistics pass (default: 128)" in text


def _resolve(*argv: str) -> dict:
    return resolve_config(build_parser().parse_args(list(argv)))


def test_gpus_is_a_device(tmp_path):
    base = ["eval", "--model", "resnet20", "--random-init"]
    assert _resolve(*base, "--gpus", "1")["device"] == "cuda:1"
    assert _resolve(*base, "--gpus", "1", "--device", "cuda:1")["device"] == "cuda:1"
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node 2"):
        _resolve(*base, "--gpus", "0,1")
    with pytest.raises(ConfigError, match="disagree"):
        _resolve(*base, "--gpus", "0", "--device", "cpu")
    with pytest.raises(ConfigError, match="GPU indices"):
        _resolve(*base, "--gpus", "first")


def test_resume_path_is_the_pruned_checkpoint_to_finetune():
    config = _resolve("finetune", "--model-dir", "p", "--resume", "p/pruned.pth")
    assert config["checkpoint"] == "p/pruned.pth" and config["resume"] is False
    assert _resolve("finetune", "--model-dir", "p", "--resume")["resume"] is True
    with pytest.raises(ConfigError, match="finetune --model-dir"):
        _resolve("run", "--model", "resnet20", "--random-init", "--sparsity", "0.3",
                 "--resume", "x.pth")
    with pytest.raises(ConfigError, match="different weights"):
        _resolve("finetune", "--model-dir", "p", "--resume", "a.pth", "--checkpoint", "b.pth")


def test_lr_steps_set_the_step_milestones(tmp_path):
    config = _resolve("finetune", "--model-dir", "p", "--lr-scheduler", "step",
                      "--lr-steps", "30", "60", "90")
    train = TrainConfig.from_config(config)
    assert train.milestones == [30, 60, 90] and train.lr_schedule == "step"
    assert _resolve("finetune", "--model-dir", "p")["milestones"] == [150, 225]
    path = tmp_path / "c.yaml"
    path.write_text("lr-steps: [10, 20]\n")
    assert _resolve("finetune", "--model-dir", "p", "-c", str(path))["milestones"] == [10, 20]
    with pytest.raises(OptionError, match="milestones=.* it must be increasing") as info:
        _resolve("finetune", "--model-dir", "p", "--lr-steps", "90", "30")
    assert info.value.as_flag().startswith("--lr-steps [90, 30] is invalid")


def test_no_fast_data_turns_the_option_off():
    assert _resolve("finetune", "--model-dir", "p")["fast_data"] is True
    assert _resolve("finetune", "--model-dir", "p", "--no-fast-data")["fast_data"] is False
