"""Progress a person can follow: log lines at a steady rhythm when no bar is shown."""

import logging
import subprocess
import sys

import pytest

from cdprune import progress as progress_mod
from cdprune.progress import Progress, progress, set_log_interval


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_mod.time, "perf_counter", fake)
    return fake


def test_lines_come_at_the_interval_with_rate_and_eta(clock, caplog):
    caplog.set_level(logging.INFO, logger="cdprune.progress")
    bar = Progress(100, "statistics", items="images", interval=30)
    for _ in range(100):
        clock.now += 1.0  # one batch a second: a line every 30 batches
        bar.update(1, items=128)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines  # at 30, 60 and 90 s, and the end
    assert lines[0] == "statistics: 30/100 batches (3,840 images), 1 batch/s, ETA 1 min 10 s"
    assert lines[-1].startswith("statistics: 100/100 batches (12,800 images)")
    assert lines[-1].endswith("done in 1 min 40 s")


def test_postfix_goes_into_the_line_and_is_asked_for_only_when_due(clock, caplog):
    caplog.set_level(logging.INFO, logger="cdprune.progress")
    bar = Progress(None, "epoch 1/3", "iteration", interval=10)
    clock.now = 5
    assert not bar.wants_postfix(0)
    clock.now = 10
    assert bar.wants_postfix(1)
    bar.set_postfix(loss="0.5000", acc="81.00%")
    bar.update(2)
    assert caplog.records[-1].getMessage() == ("epoch 1/3: 2 iterations, 0.2 iteration/s, "
                                               "loss 0.5000, acc 81.00%")


def test_a_short_loop_logs_nothing_and_zero_turns_lines_off(clock, caplog):
    caplog.set_level(logging.INFO, logger="cdprune.progress")
    quick = Progress(10, "evaluation", interval=30)
    for _ in range(10):
        clock.now += 0.1
        quick.update()
    quick.close()
    off = Progress(10, "evaluation", interval=0)
    for _ in range(10):
        clock.now += 100
        off.update()
    off.close()
    assert not caplog.records


def test_progress_gives_a_bar_or_lines_and_the_interval_is_process_wide():
    set_log_interval(7)
    try:
        lines = progress(5, "eval", bar=False)
        assert isinstance(lines, Progress) and lines.interval == 7
        bar = progress(5, "eval", bar=True)
        bar.update(1, items=3)  # a bar takes the same calls
        assert bar.n == 1 and not bar.wants_postfix(0)
        bar.close()
    finally:
        set_log_interval(30)


@pytest.mark.slow
def test_a_run_without_a_terminal_logs_stages_and_progress(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "cdprune.cli", "run", "--model", "digits_cnn", "--random-init",
         "--dataset", "digits", "-b", "16", "-j", "0", "--stats-batch-size", "8",
         "--macs-reduction", "0.5", "--scope", "all", "--epochs", "2", "--lr", "0.05",
         "--output-dir", str(out), "--log-interval", "0.001"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    log = proc.stderr
    for stage in ("statistics", "pruning", "evaluation of the base and pruned models",
                  "fine-tuning (2 epochs)"):
        assert f"{stage}: started" in log and f"{stage}: finished in" in log, stage
    assert "statistics: " in log and " images), " in log and "ETA" in log
    epoch_lines = [line for line in log.splitlines() if "epoch 2/2: " in line
                   and "iterations (" in line]
    assert epoch_lines and "loss" in epoch_lines[0] and "lr" in epoch_lines[0]
    assert "\r" not in log  # no bars in a file or a pipe
