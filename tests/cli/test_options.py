"""Typed stage options: one field gives the flag, the YAML key, the type, the default, the help."""

from __future__ import annotations

import argparse
import ast
import re
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from cdprune.cli.flags import NEGATED, add_options, flags, help_text, render
from cdprune.cli.main import DEFAULTS, build_parser, main, resolve_config, yaml_names
from cdprune.cli.yamlfile import load_yaml
from cdprune.errors import ConfigError
from cdprune.finetune.config import TrainConfig
from cdprune.importance.config import StatsConfig
from cdprune.options import OptionError, option, option_specs
from cdprune.pruning.config import CompactConfig, PruneConfig
from cdprune.runs.config import DataConfig, ModelConfig, RunConfig, RunOptions

# The commands whose flags include every option of a section.
STAGES = [(StatsConfig, ("stats", "prune", "run")), (PruneConfig, ("prune", "run")),
          (CompactConfig, ("compact",)), (TrainConfig, ("finetune", "run", "compare")),
          (ModelConfig, ("finetune",)), (DataConfig, ("run", "finetune")),
          (RunOptions, ("run", "finetune"))]
SPECS = RunConfig.specs()


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
        assert SPECS[spec.name] == spec  # one field, one option of the run
        if spec.default not in (None, False) and spec.name not in NEGATED:
            shown = " ".join(map(str, spec.default)) if isinstance(spec.default, list) \
                else spec.default
            assert f"(default: {shown})" in spec.help
        # compaction after a masked run or compare; `compact` has --bn-recalibrate instead
        where = ("run", "compare") if spec.name == "compact_recalibrate" else commands
        for command in where:
            dests = {a.dest: a for a in _subparser(command)._actions}
            assert spec.name in dests, (command, spec.name)
            assert flags(spec.name)[0] in dests[spec.name].option_strings
            if spec.name not in ("batch_size", "weights"):  # said per command
                assert dests[spec.name].help == help_text(spec)
        # The YAML key: the option's name, or its flag with dashes.
        for key in (spec.name, flags(spec.name)[-1][2:]):
            value = {"bool": True, "int": 3, "float": 0.5, "str": spec.choices[0]
                     if spec.choices else "x", "strs": ["conv1"], "size": "60M",
                     "ints": [3, 5], "floats": [0.5]}[spec.kind]
            path = tmp_path / "c.yaml"
            path.write_text(f"{key}: {value}\n")
            assert load_yaml(path, DEFAULTS, yaml_names(commands[0])) == {spec.name: value}


def test_export_options_are_the_export_flags():
    from cdprune.export import ExportConfig

    dests = {a.dest: a for a in _subparser("export")._actions}
    for spec in option_specs(ExportConfig):
        assert flags(spec.name)[0] in dests[spec.name].option_strings
        assert dests[spec.name].default is None  # unset on the command line: the default
    args = build_parser().parse_args(["export", "--model-dir", "d", "--format", "torchscript"])
    config = resolve_config(args)
    assert config["format"] == "torchscript" and "opset" not in config  # its default applies


def test_an_option_is_one_field():
    @dataclass
    class Wider(PruneConfig):
        new_knob: int = option(3, "a knob for the test", positive=True)

    spec = {s.name: s for s in option_specs(Wider)}["new_knob"]
    assert spec.default == 3 and spec.kind == "int"
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
    assert render(info.value).startswith(text)


def test_prune_target_is_required_only_when_asked():
    PruneConfig().validate()
    with pytest.raises(ConfigError, match="exactly one of sparsity, macs_reduction, "
                       "macs_target or latency_reduction") as info:
        PruneConfig().validate(need_target=True)
    assert "exactly one of --sparsity, --macs-reduction, --macs-target or " \
        "--latency-reduction" in render(info.value)
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
    assert render(info.value).startswith("--lr-steps [90, 30] is invalid")


def test_no_fast_data_turns_the_option_off():
    assert _resolve("finetune", "--model-dir", "p")["fast_data"] is True
    assert _resolve("finetune", "--model-dir", "p", "--no-fast-data")["fast_data"] is False


# Flags of the command line that are no option of a run: its own controls.
CLI_ONLY = {"help", "version", "config", "gpus", "debug", "command"}


def _all_actions():
    for command, sub in next(a for a in build_parser()._actions
                             if isinstance(a, argparse._SubParsersAction)).choices.items():
        for action in sub._actions:
            yield command, action


def test_the_command_line_is_generated_from_run_config():
    from cdprune.cli.main import COMMAND_INPUTS
    from cdprune.export import ExportConfig

    export = {s.name for s in option_specs(ExportConfig)}
    seen = set()
    for command, action in _all_actions():
        if action.dest in CLI_ONLY:
            continue
        seen.add(action.dest)
        # Every flag sets an option of the run, or is one command's own input.
        assert action.dest in SPECS or action.dest in COMMAND_INPUTS, (command, action.dest)
        if action.dest in SPECS:
            assert tuple(action.option_strings) == flags(action.dest)
            assert action.default is None  # unset: the YAML config and the defaults apply
            assert action.choices in (None, list(SPECS[action.dest].choices)) or \
                list(action.choices) == list(SPECS[action.dest].choices)
    assert set(SPECS) <= seen, sorted(set(SPECS) - seen)  # every option has a flag
    assert export <= seen


def test_yaml_keys_are_exactly_the_flags():
    from cdprune.cli.main import COMMAND_INPUTS

    for command, sub in next(a for a in build_parser()._actions
                             if isinstance(a, argparse._SubParsersAction)).choices.items():
        names = yaml_names(command)
        long_flags = {f[2:].replace("-", "_"): a.dest for a in sub._actions
                      for f in a.option_strings if f.startswith("--")
                      and (a.dest in SPECS or a.dest in COMMAND_INPUTS)}
        assert names == long_flags, command
    # and every option of the run can be set from YAML, under its own name
    assert set(DEFAULTS) == set(SPECS)


def test_the_resolved_config_round_trips_through_run_config(tmp_path):
    config = _resolve("run", "--model", "resnet20", "--random-init", "--macs-reduction", "0.5",
                      "--lr", "0.02", "--stats-images", "512", "--wd", "0.001", "-b", "64")
    typed = RunConfig.from_flat(config, need_target=True)
    assert typed.prune.macs_reduction == 0.5 and typed.train.lr == 0.02
    assert typed.train.weight_decay == 0.001 and typed.stats.stats_images == 512
    assert typed.data.batch_size == 64 and typed.train.batch_size == 64  # one key, two readers
    assert typed.flat() == {k: config[k] for k in SPECS}
    with pytest.raises(OptionError, match="lr=20.0 is invalid"):
        RunConfig.from_flat({**config, "lr": 20.0})


def test_no_option_is_defined_twice():
    owners = {}
    for name, cls in RunConfig.SECTIONS.items():
        for spec in option_specs(cls):
            assert spec.name not in owners, (spec.name, owners.get(spec.name), name)
            owners[spec.name] = name


def _source_files():
    import cdprune

    root = Path(cdprune.__file__).parent
    return root, sorted(root.rglob("*.py"))


def test_argparse_lives_in_the_cli_only():
    root, files = _source_files()
    users = [f.relative_to(root).as_posix() for f in files
             if re.search(r"^\s*(import argparse|from argparse)", f.read_text(), re.M)]
    assert users and all(u.startswith("cli/") for u in users), users


def test_the_library_never_imports_the_cli():
    root, files = _source_files()
    for f in files:
        rel = f.relative_to(root).as_posix()
        if rel.startswith("cli/"):
            continue
        text = f.read_text()
        assert not re.search(r"from \.+cli\b|cdprune\.cli\b.*import|import cdprune\.cli", text), rel


def test_no_import_cycles_between_modules():
    """Imports form no cycle, function-local ones included (type-only imports aside)."""
    root, files = _source_files()
    modules = {}
    for f in files:
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if package else parts)] = (f, package)
    graph = {}
    for name, (f, package) in modules.items():
        deps = set()
        tree = ast.parse(f.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test)
                       for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                base = name.split(".") if package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    deps.add(full if full in modules else target)
        graph[name] = {d for d in deps if d in modules and d != name}
    # A package's __init__ importing its own modules is how packages work; a module
    # importing back up into a package that imports it is a cycle.
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_library_errors_name_fields_and_the_cli_shows_flags():
    from cdprune.errors import CdpruneError, CheckpointError

    err = CheckpointError("give a smaller {macs_target}, or {scope} all; {\"conv1\": [0]}")
    assert str(err) == "give a smaller macs_target, or scope all; {\"conv1\": [0]}"
    assert render(err) == "give a smaller --macs-target, or --scope all; {\"conv1\": [0]}"
    plain = CdpruneError("nothing named here")
    assert plain.template is None and render(plain) == "nothing named here"


def test_a_missing_model_directory_names_its_field(tmp_path):
    """The library says ``model_dir``, the command line ``--model-dir``; callers that
    catch FileNotFoundError still do."""
    from cdprune.errors import MissingFileError
    from cdprune.runs.locate import find_run_model

    for path in (tmp_path / "absent", tmp_path):
        with pytest.raises(FileNotFoundError) as info:
            find_run_model(path)
        assert isinstance(info.value, MissingFileError)
        assert "point model_dir at" in str(info.value)
        assert "point --model-dir at" in render(info.value)
    (tmp_path / "last.pth").write_bytes(b"")  # fine-tuned weights, origin unknown
    with pytest.raises(MissingFileError) as info:
        find_run_model(tmp_path)
    assert f"--model-dir PRUNED_DIR --checkpoint {tmp_path / 'last.pth'}" in render(info.value)


def test_no_library_error_spells_a_flag():
    """Library errors name options by field ({field}); only the CLI knows flags."""
    root, files = _source_files()
    offenders = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        if rel.startswith("cli/"):
            continue
        text = f.read_text()
        for node in ast.walk(ast.parse(text)):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            for const in ast.walk(node.exc):
                if isinstance(const, ast.Constant) and isinstance(const.value, str) \
                        and re.search(r"(?<![\w-])--[a-z]", const.value):
                    offenders.append(f"{rel}:{node.lineno}: {const.value[:60]}")
    assert not offenders, offenders
