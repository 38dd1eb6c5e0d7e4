"""Statistics as the published code reads them: augmented images, the first images."""

from __future__ import annotations

import pytest
import torch

import cdprune.data as data_module
from cdprune.models import create_model
from cdprune.runs.inputs import build_data
from cdprune.runs.pipeline import gather_stats

from ..data.test_data import make_cifar10


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "data", n=16)
    real = data_module.cifar._check_cifar_files
    monkeypatch.setattr(data_module.cifar, "_check_cifar_files",
                        lambda folder, names, spec, root, verify: real(folder, names, spec,
                                                                       root, False))
    return tmp_path / "data"


def _config(root, **extra):
    return {"dataset": "cifar10", "data_root": str(root), "batch_size": 8,
            "stats_batch_size": 8, "stop_batch": 3, "seed": 0, "no_progress": True,
            "model": "resnet20", "device": "cpu", **extra}


def _values(config):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).eval()
    data = build_data(config, need_train=False)
    stats = gather_stats(config, data, model)
    # What the scores rest on: the streamed per-channel counts of every layer.
    return stats, torch.cat([torch.cat([df.float(), tf.float()])
                             for df, tf in (stats.reduced[n] for n in stats.layers)])


def test_augmented_statistics_are_seeded_and_differ_from_plain_ones(cifar):
    plain, plain_v = _values(_config(cifar))
    torch.rand(5)  # the global generator's state must not matter
    aug, aug_v = _values(_config(cifar, stats_augment=True))
    again, again_v = _values(_config(cifar, stats_augment=True))
    other, other_v = _values(_config(cifar, stats_augment=True, seed=1))
    assert torch.equal(aug_v, again_v)
    assert not torch.equal(aug_v, plain_v)
    assert aug.meta["stats_augment"] is True and plain.meta["stats_augment"] is False
    assert other_v.shape == aug_v.shape


def test_first_images_sample_reads_the_dataset_in_order(cifar):
    config = _config(cifar, stats_sample="first", stop_batch=2)
    data = build_data(config, need_train=False)
    assert list(data.stats.dataset.indices) == list(range(16))
    random = build_data(_config(cifar, stop_batch=2), need_train=False)
    assert list(random.stats.dataset.indices) != list(range(16))
