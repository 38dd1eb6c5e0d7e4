import pytest

from cdprune.cli import main
from cdprune.runs.demo import run_demo


@pytest.mark.slow
def test_quick_demo_runs_the_whole_pipeline(tmp_path):
    lines = []
    out = run_demo(tmp_path / "demo", quick=True, progress=False, printer=lines.append)
    assert abs(1 - out["macs_after"] / out["macs_before"] - 0.5) <= 0.003
    assert out["acc_base"] > 50  # a few epochs on digits are enough to learn something
    assert out["acc_finetuned"] > out["acc_pruned"] - 1e-9 or out["acc_finetuned"] > 50
    text = "\n".join(lines)
    assert "MACs" in text and "accuracy" in text and "report:" in text
    for name in ("report.md", "report.json", "widths.png", "scores.png", "training.png",
                 "pruned/plan.json", "stats.safetensors"):
        assert (tmp_path / "demo" / name).is_file(), name


@pytest.mark.slow
def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--quick", "--no-progress", "--output-dir", str(tmp_path / "d")]) == 0
    assert "CPU latency" in capsys.readouterr().out
