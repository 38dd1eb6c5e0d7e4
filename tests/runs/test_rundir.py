"""A run directory is cdprune's only by its marker: nothing else is ever removed.

``run.json`` lists every file a run wrote; ``--overwrite`` removes those and nothing else,
refuses a directory that holds anything more or an input of the same command, and is
refused together with ``--resume``. The last test walks every combination of the two
flags over directories holding user files and inputs.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from cdprune.cli import main
from cdprune.errors import ConfigError
from cdprune.fileio import atomic_write_bytes
from cdprune.models import create_model
from cdprune.runs import files
from cdprune.runs.rundir import RunDir

DATA = ("--dataset", "digits", "-b", "64", "-j", "0", "--no-progress")
TUNE = ("--train-subset", "64", "--lr", "0.05", "--epochs", "1")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A base checkpoint and a pruned model of digits_cnn."""
    from cdprune.pruning import prune, save_pruned

    folder = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    model = create_model("digits_cnn")
    torch.save(model.state_dict(), folder / "base.pth")
    scores = {n: torch.rand(m.out_channels) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Conv2d)}
    result = prune(model, scores, example_inputs=torch.randn(2, 1, 8, 8), sparsity=0.3,
                   scope="all")
    save_pruned(folder / "pruned", result, model_name="digits_cnn", input_size=(1, 8, 8),
                extra={"dataset": "digits", "num_classes": 10})
    return folder


def _stats(assets: Path, out: Path, *extra: str) -> list[str]:
    return ["stats", "--model", "digits_cnn", "--checkpoint", str(assets / "base.pth"), *DATA,
            "--stop-batch", "1", "--output-dir", str(out), *extra]


def _finetune(assets: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", *DATA, "--model-dir", str(assets / "pruned"), *TUNE,
            "--output-dir", str(out), *extra]


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*")) if p.name != files.LOCK}


def _user_files(folder: Path) -> dict[str, str]:
    files = {"notes.txt": "my notes", "src/train.py": "print('my code')\n"}
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return files


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ the marker
def test_run_json_lists_every_file_the_run_wrote(tmp_path, assets):
    out = tmp_path / "run"
    assert main(_finetune(assets, out)) == 0
    record = json.loads((out / "run.json").read_text())
    on_disk = {k for k, v in _tree(out).items() if v is not None}
    assert set(record["files"]) == on_disk
    assert {"run.json", "config.yaml", "last.pth", "metrics.jsonl"} <= on_disk


def test_a_file_is_listed_before_it_is_written(tmp_path):
    """Killed between listing and writing, the marker already names the file."""
    out = tmp_path / "run"
    seen = []
    with RunDir(out, stage="stats", config={}) as run:
        def spy(path: Path) -> None:
            seen.append(json.loads((run.path / "run.json").read_text())["files"])

        from cdprune import fileio

        fileio.add_write_hook(spy)
        try:
            atomic_write_bytes(run.path / "sub" / "weights.bin", b"x")
        finally:
            fileio.remove_write_hook(spy)
    assert "sub/weights.bin" in seen[-1]  # read when that file was about to be written


def test_a_run_never_replaces_a_file_it_did_not_write(tmp_path, assets):
    """A user's file put into a run directory is never replaced by --resume."""
    out = tmp_path / "run"
    with RunDir(out, stage="finetune", config={}) as run:
        (run.path / "report.md").write_text("mine")
        with pytest.raises(ConfigError, match="no cdprune run wrote it"):
            atomic_write_bytes(run.path / "report.md", b"cdprune's")
    assert (out / "report.md").read_text() == "mine"


# ------------------------------------------------------------------ cases 1-4
def test_a_config_yaml_does_not_make_a_folder_a_run(tmp_path, assets, capsys):
    """Case 1: a project folder with a config.yaml is no run: never cleared, never 'a run'."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.yaml").write_text("stop_batch: 1\n")
    files = _user_files(proj)
    before = _tree(proj)
    for extra in ((), ("--overwrite",)):
        assert main(_stats(assets, proj, "-c", str(proj / "config.yaml"), *extra)) == 2
        err = _error(capsys)
        assert "holds no cdprune run" in err and "already holds a run" not in err
        assert "choose another --output-dir" in err
        assert _tree(proj) == before
    assert all((proj / rel).read_text() == text for rel, text in files.items())


def test_overwrite_keeps_the_config_file_it_reads(tmp_path, assets, capsys):
    """Case 2: the -c recipe inside the run directory survives --overwrite (refused)."""
    out = tmp_path / "run"
    assert main(_stats(assets, out)) == 0
    (out / "recipe.yaml").write_text("stop_batch: 1\n")
    before = _tree(out)
    capsys.readouterr()
    assert main(_stats(assets, out, "-c", str(out / "recipe.yaml"), "--overwrite")) == 2
    err = _error(capsys)
    assert "-c/--config" in err and "recipe.yaml' lies inside --output-dir" in err
    assert _tree(out) == before


def _image_folders(root: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for k, name in enumerate(("ant", "bee")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16, 16), color=(40 * k + i, 0, 0)).save(folder / f"{i}.png")


def test_overwrite_keeps_a_data_root_inside(tmp_path, assets, capsys):
    """Case 3: --data-root inside the output directory: refused, all images kept."""
    out = tmp_path / "run"
    argv = ["stats", "--model", "tiny_cnn", "--random-init", "--dataset", "folder",
            "--data-root", str(out / "data"), "-b", "4", "-j", "0", "--no-progress",
            "--output-dir", str(out)]
    assert main(_stats(assets, out)) == 0
    _image_folders(out / "data")
    before = _tree(out)
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 2
    err = _error(capsys)
    assert "--data-root" in err and "lies inside --output-dir" in err
    assert _tree(out) == before
    assert len(list((out / "data").rglob("*.png"))) == 12


def test_resume_with_overwrite_is_refused(tmp_path, assets, capsys):
    """Case 4: --resume --overwrite together removes nothing."""
    out = tmp_path / "run"
    assert main(_finetune(assets, out)) == 0
    before = _tree(out)
    capsys.readouterr()
    assert main(_finetune(assets, out, "--resume", "--overwrite")) == 2
    err = _error(capsys)
    assert "--resume and --overwrite exclude each other" in err
    assert _tree(out) == before
    with pytest.raises(ConfigError, match="exclude each other"):
        RunDir(out, resume=True, overwrite=True, stage="finetune")


def test_overwrite_refuses_user_files_beside_a_run_and_names_them(tmp_path, assets, capsys):
    out = tmp_path / "run"
    assert main(_finetune(assets, out)) == 0
    _user_files(out)
    before = _tree(out)
    capsys.readouterr()
    assert main(_finetune(assets, out, "--overwrite")) == 2
    err = _error(capsys)
    assert "no cdprune run wrote (notes.txt, src/train.py)" in err
    assert _tree(out) == before


def test_overwrite_removes_exactly_the_listed_files(tmp_path, assets):
    out = tmp_path / "run"
    assert main(_finetune(assets, out)) == 0
    assert main(_finetune(assets, out, "--overwrite", "--epochs", "2")) == 0
    record = json.loads((out / "run.json").read_text())
    assert "clearing" not in record
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 2


def test_an_interrupted_overwrite_is_not_resumed(tmp_path, assets, capsys, monkeypatch):
    """Killed while clearing: the marker says so, --resume refuses, --overwrite finishes."""
    out = tmp_path / "run"
    assert main(_finetune(assets, out)) == 0

    def killed(self):
        self._write_manifest(clearing=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "_clear", killed)
    assert main(_finetune(assets, out, "--overwrite")) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(_finetune(assets, out, "--resume")) == 2
    assert "--overwrite was interrupted" in _error(capsys)
    assert main(_finetune(assets, out, "--overwrite")) == 0


# ------------------------------------------------------------------ every combination
STATES = ("user files only", "run + user files", "run + input inside",
          "run + its own file as input", "run")


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory) -> Path:
    """A finished fine-tuning run, copied for each combination."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_finetune(assets, out)) == 0
    return out


def _prepare(state: str, out: Path, assets: Path, finished: Path
             ) -> tuple[dict[str, bytes], list[str]]:
    """Fill ``out``; return the user's files (never to be touched) and extra flags."""
    extra: list[str] = []
    if state != "user files only":
        shutil.copytree(finished, out)
    out.mkdir(parents=True, exist_ok=True)
    if state in ("user files only", "run + user files"):
        _user_files(out)
        (out / "config.yaml").write_text("epochs: 1\n") if state == "user files only" else None
    if state == "run + input inside":
        shutil.copytree(assets / "pruned", out / "mine")
        (out / "recipe.yaml").write_text("lr: 0.05\n")
        extra = ["--model-dir", str(out / "mine"), "-c", str(out / "recipe.yaml")]
    if state == "run + its own file as input":  # listed in run.json, and read by the command
        extra = ["--model-dir", str(assets / "pruned"), "--checkpoint", str(out / "best.pth")]
    user = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.name != files.LOCK and not _listed(out, p)}
    if state == "run + its own file as input":
        user["best.pth"] = (out / "best.pth").read_bytes()
    return user, extra


def _listed(out: Path, path: Path) -> bool:
    try:
        files = json.loads((out / "run.json").read_text()).get("files", [])
    except FileNotFoundError:
        return False
    return path.relative_to(out).as_posix() in files


@pytest.mark.parametrize("state", STATES)
def test_no_flag_combination_deletes_a_user_file(state, tmp_path, assets, finished, capsys):
    outcomes = {}
    for overwrite, resume in itertools.product((False, True), repeat=2):
        out = tmp_path / f"{overwrite}-{resume}"
        user, extra = _prepare(state, out, assets, finished)
        flags = ["--overwrite"] * overwrite + ["--resume"] * resume
        argv = _finetune(assets, out, *flags)
        if extra:
            argv = [a for a in argv if a != str(assets / "pruned")]
            argv = [*argv[:argv.index("--model-dir")], *argv[argv.index("--model-dir") + 1:]]
            argv += extra
        code = main(argv)
        capsys.readouterr()
        outcomes[overwrite, resume] = code
        left = {rel: (out / rel).read_bytes() for rel in user if (out / rel).is_file()}
        assert left == user, (state, flags)
    assert outcomes[True, True] == 2
    if state == "run":  # nothing but the run: both flags work on their own
        assert outcomes[True, False] == 0 and outcomes[False, True] == 0
    else:  # user files or inputs beside the run: --overwrite refuses
        assert outcomes[True, False] == 2
    assert outcomes[False, False] == 2


# ------------------------------------------------------------------ resume
def _interrupted(assets: Path, out: Path, monkeypatch, *extra: str) -> None:
    """Fine-tune for 2 epochs, stopped (as by a kill) once epoch 1 is saved."""
    from cdprune.finetune import loop as train

    real = train.write_metrics

    def stop(path, history):
        real(path, history)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "write_metrics", stop)
    assert main(_finetune(assets, out, "--epochs", "2", *extra)) == 130
    monkeypatch.undo()


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "last.pth", weights_only=True)["model"]


@pytest.mark.slow
def test_resume_with_another_j_is_exact_with_data_in_memory(tmp_path, assets, monkeypatch):
    """Case 6, fast data: -j does not reach the training data, so it may change."""
    whole = tmp_path / "whole"
    assert main(_finetune(assets, whole, "--epochs", "2")) == 0
    out = tmp_path / "resumed"
    _interrupted(assets, out, monkeypatch)
    argv = _finetune(assets, out, "--epochs", "2", "--resume")
    argv[argv.index("-j") + 1] = "2"
    assert main(argv) == 0
    for key, value in _weights(whole).items():
        assert torch.equal(_weights(out)[key], value), key


def test_resume_with_another_j_is_refused_without_fast_data(tmp_path, assets, monkeypatch,
                                                             capsys):
    """Case 6, --no-fast-data: each loader worker draws its own augmentation, so another -j
    would give a model matching neither run: refused in one line, the run untouched."""
    out = tmp_path / "run"
    _interrupted(assets, out, monkeypatch, "--no-fast-data")
    before = _tree(out)
    capsys.readouterr()
    argv = _finetune(assets, out, "--epochs", "2", "--resume", "--no-fast-data")
    argv[argv.index("-j") + 1] = "2"
    assert main(argv) == 2
    err = _error(capsys)
    assert "--resume with --workers 2, but the run" in err and "started with --workers 0" in err
    assert "the fast data path off (--no-fast-data)" in err and "resume with --workers 0" in err
    assert _tree(out) == before
    argv[argv.index("-j") + 1] = "0"
    assert main(argv) == 0  # the same -j resumes


def test_resume_never_shortens_a_finished_run(tmp_path, assets, capsys):
    """Case 11: --resume --epochs 0 on a finished 2-epoch run rewrites no record."""
    out = tmp_path / "run"
    assert main(_finetune(assets, out, "--epochs", "2")) == 0
    before = _tree(out)
    capsys.readouterr()
    assert main(_finetune(assets, out, "--epochs", "0", "--resume")) == 2
    err = _error(capsys)
    assert "--epochs 0 is fewer than the 2 epochs" in err and "give --epochs 2 or more" in err
    assert _tree(out) == before
    assert main(_finetune(assets, out, "--epochs", "2", "--resume")) == 0


@pytest.mark.slow
def test_export_files_join_the_run_and_overwrite_removes_them(tmp_path, assets):
    """cdprune export writes beside a run's weights: its files are listed, so a later
    --overwrite replaces the run instead of refusing files 'no cdprune run wrote'."""
    out = tmp_path / "run"
    assert main(_finetune(assets, out)) == 0
    assert main(["export", "--model-dir", str(out), "--format", "torchscript",
                 "--no-latency"]) == 0
    files = json.loads((out / "run.json").read_text())["files"]
    assert {"model.pt", "export_torchscript.json"} <= set(files)
    assert main(_finetune(assets, out, "--overwrite")) == 0
    assert not (out / "model.pt").exists()
