"""No traceback from any file of a run directory: every file mutated, every reader asked.

A reference run is made once; each example copies it, mutates one of its files (its
structure where it has one: a JSON/YAML value replaced or deleted, a checkpoint entry
replaced by a tensor of another kind or by plain data; or its bytes: truncated, flipped,
emptied) and runs the commands that read a run directory. Each must exit 0, or 2 with one
line naming the problem; none may raise, print a traceback or touch the run directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdprune.cli import main

STRUCTURED = ("config.yaml", "run.json", "report.json", "prune_summary.json",
              "pruned/plan.json", "metrics.jsonl", "last.pth", "best.pth",
              "pruned/model.safetensors", "stats.safetensors", "scores.safetensors")

# Values a hostile or damaged file may hold where something else was expected.
ODD_VALUES = [None, [], {}, "x", "", -1, 0, 10**30, 1e308, math.nan, math.inf, True,
              [1, "a"], {"1": 2}, {"a": [None]}, "../../etc/passwd", [[1e308]]]


def _odd_tensors() -> list[Any]:
    out = [torch.empty(2, 2, device="meta"), torch.zeros(3, dtype=torch.int8),
           torch.zeros(2, 2).to_sparse(), torch.tensor([math.nan]), torch.zeros(0),
           torch.zeros(10_000, 1), torch.zeros(2, dtype=torch.bool), "tensor", [1.0, 2.0]]
    try:
        out.append(torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.qint8))
    except RuntimeError:  # a build without quantization kernels
        pass
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "run"
    code = main(["run", "--model", "digits_cnn", "--random-init", "--dataset", "digits", "-b",
                 "64", "-j", "0", "--stop-batch", "2", "--stats-batch-size", "64",
                 "--macs-reduction", "0.4", "--scope", "all", "--epochs", "1", "--no-progress",
                 "--output-dir", str(out)])
    assert code == 0
    for name in STRUCTURED:
        assert (out / name).is_file(), name
    return out


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside nested dicts and lists (the root included)."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:8]):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple, value: Any, delete: bool) -> Any:
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _mutate_structure(path: Path, data: st.DataObject) -> None:
    name = path.name
    odd = data.draw(st.sampled_from(ODD_VALUES + ["TENSOR"]), label="value")
    delete = data.draw(st.booleans(), label="delete")
    if name.endswith(".pth"):
        doc = torch.load(path, weights_only=True)
        paths = [p for p in _paths(doc) if not any(isinstance(k, int) for k in p)]
        where = data.draw(st.sampled_from(paths), label="where")
        if odd == "TENSOR":
            odd = data.draw(st.sampled_from(_odd_tensors()), label="tensor")
        if data.draw(st.booleans(), label="int key") and isinstance(doc.get("model"), dict):
            doc["model"][7] = torch.zeros(1)
        torch.save(_set(doc, where, odd, delete), path)
    elif name.endswith(".safetensors"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(path)
        key = data.draw(st.sampled_from(sorted(tensors)), label="tensor key")
        choice = data.draw(st.sampled_from(["drop", "int", "shape", "nan", "huge"]),
                           label="change")
        if choice == "drop":
            del tensors[key]
        elif choice == "int":
            tensors[key] = tensors[key].to(torch.int32)
        elif choice == "shape":
            tensors[key] = torch.zeros(3, 1)
        elif choice == "nan":
            tensors[key] = torch.full_like(tensors[key].float(), math.nan)
        else:
            tensors[key] = torch.zeros(1, 100_000)
        save_file(tensors, str(path))
    else:
        text = path.read_text()
        odd = "x" if odd == "TENSOR" else odd
        if name.endswith(".jsonl"):
            docs = [json.loads(line) for line in text.splitlines() if line.strip()]
            where = data.draw(st.sampled_from(_paths(docs)[1:]), label="where")
            path.write_text("\n".join(json.dumps(d) for d in _set(docs, where, odd, delete)
                                      if d is not None) + "\n")
            return
        doc = yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)
        where = data.draw(st.sampled_from(_paths(doc)), label="where")
        doc = _set(doc, where, odd, delete)
        path.write_text(yaml.safe_dump(doc) if name.endswith(".yaml") else json.dumps(doc))


def _mutate_bytes(path: Path, data: st.DataObject) -> None:
    raw = path.read_bytes()
    how = data.draw(st.sampled_from(["truncate", "flip", "empty", "garbage"]), label="bytes")
    if how == "truncate":
        raw = raw[:data.draw(st.integers(0, max(0, len(raw) - 1)), label="at")]
    elif how == "flip":
        at = data.draw(st.integers(0, max(0, len(raw) - 1)), label="at")
        raw = raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:] if raw else raw
    elif how == "empty":
        raw = b""
    else:
        raw = bytes(data.draw(st.binary(min_size=1, max_size=64), label="garbage"))
    path.write_bytes(raw)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".cdprune.lock"}


def _check_commands(run: Path, scratch: Path, capsys) -> None:
    before = _snapshot(run)
    commands = [
        ["eval", "--dataset", "digits", "-j", "0", "--no-progress", "--model-dir", str(run)],
        ["export", "--model-dir", str(run), "--output", str(scratch / "m.onnx"),
         "--no-latency"],
    ]
    for argv in commands:
        capsys.readouterr()
        code = main(argv)  # an exception here is a traceback the user would see
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert code in (0, 2), (argv[0], code, err)
        if code == 2:
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith(f"cdprune {argv[0]}: error: "), err
        assert _snapshot(run) == before, f"{argv[0]} changed the run directory"


def _fuzz(reference: Path, data: st.DataObject, capsys, names: tuple[str, ...]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(reference, run)
        name = data.draw(st.sampled_from(names), label="file")
        if data.draw(st.booleans(), label="structured"):
            _mutate_structure(run / name, data)
        else:
            _mutate_bytes(run / name, data)
        _check_commands(run, Path(tmp), capsys)


SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=6, **SETTINGS)
@given(data=st.data())
def test_mutated_run_directory_files_quick(reference, data, capsys):
    _fuzz(reference, data, capsys, STRUCTURED)


@pytest.mark.slow
@pytest.mark.parametrize("name", STRUCTURED)
def test_every_file_of_a_run_directory_mutated(reference, name, capsys):
    @settings(max_examples=30, **SETTINGS)
    @given(data=st.data())
    def check(data):
        _fuzz(reference, data, capsys, (name,))

    check()
