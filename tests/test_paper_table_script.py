"""benchmarks/paper_table_gpu.py: joins and checks the data parts, runs, writes its table."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from cdprune.models import create_model

from .data.test_data import make_cifar10

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_table_gpu.py"


def _script():
    spec = importlib.util.spec_from_file_location("paper_table_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parts(tmp_path: Path) -> tuple[Path, str]:
    """Tiny CIFAR-10 and a random ResNet-20 checkpoint, packed as the device parts are."""
    make_cifar10(tmp_path / "src", n=16)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    blob = buf.getvalue()
    parts = tmp_path / "parts"
    parts.mkdir()
    step = -(-len(blob) // 4)
    for i, c in enumerate("abcd"):
        (parts / f"cifar-{c}").write_bytes(blob[i * step:(i + 1) * step])
    weights = tmp_path / "w" / "weights" / "cifar10"
    weights.mkdir(parents=True)
    torch.save(create_model("resnet20", num_classes=10).state_dict(),
               weights / "resnet20-optionA-akamaster.th")
    with tarfile.open(parts / "weights.tgz", "w:gz") as tar:
        tar.add(tmp_path / "w" / "weights", arcname="weights")
    return parts, hashlib.md5(blob).hexdigest()


def test_damaged_parts_are_refused(tmp_path):
    parts, md5 = _parts(tmp_path)
    script = _script()
    with pytest.raises(SystemExit, match="md5 of the joined parts"):
        script.unpack(parts, tmp_path / "work", "0" * 32)
    (parts / "cifar-c").unlink()
    with pytest.raises(SystemExit, match="cifar-c"):
        script.unpack(parts, tmp_path / "work2", md5)


@pytest.mark.slow
def test_smoke_mode_runs_a_row_and_writes_the_table(tmp_path, monkeypatch):
    parts, md5 = _parts(tmp_path)
    script = _script()
    # The runs are child processes: a sitecustomize there lets the tiny CIFAR files
    # through the check of the official file sizes.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import cdprune.data.cifar as c\n"
        "real = c._check_cifar_files\n"
        "c._check_cifar_files = lambda f, n, s, r, v: real(f, n, s, r, False)\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    out = tmp_path / "out"
    code = script.main(["--parts", str(parts), "--md5", md5, "--work", str(tmp_path / "work"),
                        "--out", str(out), "--rows", "resnet20_20M", "--device", "cpu",
                        "--epochs", "1", "--subset", "32", "--stats-batches", "1",
                        "--val-subset", "16", "--no-compile", "--poll", "1"])
    log = (out / "resnet20_20M.log").read_text()
    assert code == 0, log[-2000:]
    table = json.loads((out / "table.json").read_text())
    row = table["rows"][0]
    assert row["status"] == "done" and row["epochs"] == 1
    assert abs(row["macs_paper"] - 20.76e6) < 0.01 * 40.55e6
    assert table["info"]["final"] and table["info"]["torch"] == torch.__version__
    text = (out / "table.md").read_text()
    compact = "n/a (no compaction in this cdprune)" if script.compaction() is None else "M |"
    assert compact in text
