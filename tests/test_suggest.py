"""The shared helpers: did-you-mean hints, atomic writes and the version module."""

from __future__ import annotations

import pytest

from cdprune import fileio
from cdprune.suggest import did_you_mean


@pytest.mark.parametrize("name, candidates, kwargs, expected", [
    ("conv", ["conv22", "conv1", "fc"], {}, "did you mean conv1, conv22?"),  # closest first
    ("conv", ["conv22", "conv1"], {"n": 1}, "did you mean conv1?"),
    ("lyer", ["layer"], {"before": "; "}, "; did you mean layer?"),
    ("resnt20", ["resnet20"], {"after": " "}, "did you mean resnet20? "),
    ("zzz", ["conv1", "fc"], {"before": "; "}, ""),
    ("abc", {"abd": 1, "xyz": 2}, {}, "did you mean abd?"),  # any iterable of names
])
def test_did_you_mean(name, candidates, kwargs, expected):
    assert did_you_mean(name, candidates, **kwargs) == expected


def test_cutoff_decides_what_is_close_enough():
    assert did_you_mean("resnet", ["resnet110"], cutoff=0.9) == ""
    assert did_you_mean("resnet", ["resnet110"], cutoff=0.5) == "did you mean resnet110?"


def test_atomic_write_text_makes_its_folder_and_leaves_no_temporary(tmp_path):
    path = fileio.atomic_write_text(tmp_path / "sub" / "a.txt", "héllo")
    assert path.read_bytes() == "héllo".encode()
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]  # no temporary left


def test_version_lives_in_its_own_module():
    import cdprune
    from cdprune.version import __version__

    assert cdprune.__version__ == __version__ and __version__.count(".") >= 2
