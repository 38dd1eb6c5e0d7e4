"""Tests for cdprune.data: datasets on hand-made files, transforms, seeded loaders."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from cdprune import data as D
from cdprune.data import cifar as cifar_module
from cdprune.errors import ConfigError, DataError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


# ----------------------------------------------------------------------------- helpers
def _write_batch(path: Path, n: int, seed: int, label_key: str = "labels",
                 num_classes: int = 10) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
    path.write_bytes(pickle.dumps({"batch_label": "b", "data": pixels, label_key: labels,
                                   "filenames": [f"{i}.png" for i in range(n)]}, protocol=4))
    return pixels, labels


def make_cifar10(root: Path, n: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        written[name] = _write_batch(folder / name, n, seed=i)
    (folder / "batches.meta").write_bytes(pickle.dumps(
        {"label_names": CIFAR10_NAMES, "num_vis": 3072}, protocol=2))
    return written


def make_cifar100(root: Path, n: int = 5) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {name: _write_batch(folder / name, n, seed=i, label_key="fine_labels",
                                  num_classes=100)
               for i, name in enumerate(["train", "test"])}
    (folder / "meta").write_bytes(pickle.dumps(
        {"fine_label_names": [f"c{i}" for i in range(100)],
         "coarse_label_names": [f"s{i}" for i in range(20)]}, protocol=2))
    return written


class _Payload:
    """Unpickling this would create the marker file (a stand-in for arbitrary code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# ----------------------------------------------------------------------------- CIFAR
def test_cifar10_reads_train_and_test(tmp_path):
    written = make_cifar10(tmp_path)
    train = D.CIFAR10(tmp_path, train=True, verify_sizes=False)
    test = D.CIFAR10(tmp_path / "cifar-10-batches-py", train=False, verify_sizes=False)
    assert len(train) == 20 and len(test) == 4
    assert train.classes == CIFAR10_NAMES
    expected = [lab for k in range(1, 6) for lab in written[f"data_batch_{k}"][1]]
    assert train.targets == expected
    assert test.targets == written["test_batch"][1]

    img, label = train[5]  # second image of data_batch_2
    assert isinstance(label, int) and label == expected[5]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    raw = torch.from_numpy(written["data_batch_2"][0][1].reshape(3, 32, 32))
    torch.testing.assert_close(img, raw.float() / 255)


def test_cifar100_layout_uses_fine_labels(tmp_path):
    written = make_cifar100(tmp_path)
    train = D.CIFAR100(tmp_path, train=True, verify_sizes=False)
    test = D.CIFAR100(tmp_path, train=False, verify_sizes=False)
    assert len(train.classes) == 100 and train.classes[7] == "c7"
    assert train.targets == written["train"][1]
    assert test.targets == written["test"][1]
    assert train[0][0].shape == (3, 32, 32)


def test_cifar_missing_root_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        D.CIFAR10(tmp_path / "nowhere")


def test_cifar_missing_batch_names_file_size_and_fix(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError) as info:
        D.CIFAR10(tmp_path, verify_sizes=False)
    msg = str(info.value)
    assert "data_batch_3" in msg and "31035999 bytes" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert str(tmp_path) in msg
    # the test split does not need the training batches
    assert len(D.CIFAR10(tmp_path, train=False, verify_sizes=False)) == 4


def test_cifar_verify_sizes_rejects_short_file(tmp_path):
    make_cifar10(tmp_path)
    with pytest.raises(DataError, match=r"data_batch_1 is \d+ bytes but the official file is "
                                        r"31035704 bytes"):
        D.CIFAR10(tmp_path, train=True, verify_sizes=True)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"data": _Payload(str(marker)), "labels": []}, protocol=2)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(evil)
    with pytest.raises(DataError, match="refusing to load global"):
        D.CIFAR10(tmp_path, train=False, verify_sizes=False)
    assert not marker.exists()
    # sanity: a plain unpickler would have run it
    pickle.loads(evil)
    assert marker.exists()


def test_object_arrays_are_refused(tmp_path):
    make_cifar10(tmp_path)
    obj = np.array([{"x": 1}], dtype=object)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({"data": obj, "labels": [0]}, protocol=4))
    with pytest.raises(DataError, match="array of Python objects"):
        D.CIFAR10(tmp_path, train=False, verify_sizes=False)


def test_wrong_layout_is_data_error(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}))
    with pytest.raises(DataError, match="lacks the CIFAR-10 layout"):
        D.CIFAR10(tmp_path, train=False, verify_sizes=False)


# ----------------------------------------------------------------------------- download
def _fake_archive(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_download_without_network_says_what_to_place_where(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as info:
        D.CIFAR10(tmp_path / "data", download=True)
    msg = str(info.value)
    assert "no network" in msg and "cifar-10-python.tar.gz" in msg
    assert str(tmp_path / "data" / "cifar-10-batches-py") in msg and "data_batch_1" in msg
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.endswith(".part")]


def test_download_md5_mismatch_is_refused(tmp_path, monkeypatch):
    blob = _fake_archive({"cifar-10-batches-py/batches.meta": b"x"})
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(blob))
    with pytest.raises(DataError, match="expected c58f30108f718f92721af3b95e74349a"):
        D.download_cifar("cifar10", tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing extracted, partial archive removed


def _patch_archive(monkeypatch, blob: bytes) -> None:
    spec = cifar_module._CIFAR_SPECS["cifar10"]._replace(md5=hashlib.md5(blob).hexdigest())
    monkeypatch.setitem(cifar_module._CIFAR_SPECS, "cifar10", spec)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(blob))


def test_download_extracts_a_verified_archive(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_cifar10(src, n=2)
    folder = src / "cifar-10-batches-py"
    blob = _fake_archive({f"cifar-10-batches-py/{p.name}": p.read_bytes()
                          for p in sorted(folder.iterdir())})
    _patch_archive(monkeypatch, blob)
    ds = D.CIFAR10(tmp_path / "dl", train=False, download=True, verify_sizes=False)
    assert len(ds) == 2 and ds.classes == CIFAR10_NAMES


@pytest.mark.parametrize("name", ["../escape", "/abs/path"])
def test_download_rejects_unsafe_members(tmp_path, monkeypatch, name):
    _patch_archive(monkeypatch, _fake_archive({name: b"x"}))
    with pytest.raises(DataError, match="escape the target folder"):
        D.download_cifar("cifar10", tmp_path / "dl")
    assert not (tmp_path / "escape").exists()


# ----------------------------------------------------------------------------- folders
def _png(path: Path, color: tuple[int, int, int], size=(12, 10)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_reads_classes_sorted(tmp_path):
    _png(tmp_path / "zebra" / "a.png", (255, 0, 0))
    _png(tmp_path / "ant" / "b.PNG", (0, 255, 0))
    _png(tmp_path / "ant" / "c.png", (0, 0, 255))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ds = D.ImageFolder(tmp_path)
    assert ds.classes == ["ant", "zebra"] and ds.targets == [0, 0, 1]
    img, label = ds[2]
    assert label == 1 and img.shape == (3, 10, 12)
    torch.testing.assert_close(img[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        D.ImageFolder(tmp_path / "missing")
    with pytest.raises(DataError, match="no class folders"):
        D.ImageFolder(tmp_path)
    _png(tmp_path / "cat" / "a.png", (1, 2, 3))
    (tmp_path / "dog").mkdir()
    with pytest.raises(DataError, match=r"dog holds no images"):
        D.ImageFolder(tmp_path)


def test_build_imagenet_uses_train_and_val(tmp_path):
    for split in ("train", "val"):
        for k, cls in enumerate(["a", "b"]):
            _png(tmp_path / split / cls / "x.jpg", (40 * k, 80, 120), size=(300, 260))
    train = D.build_dataset("imagenet", tmp_path, train=True)
    val = D.build_dataset("imagenet", tmp_path, train=False)
    assert train[0][0].shape == (3, 224, 224) and val[1][0].shape == (3, 224, 224)
    assert val.classes == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="val"):
        D.build_dataset("imagenet", tmp_path / "train", train=False)


# ----------------------------------------------------------------------------- transforms
def test_to_float_accepts_hwc_and_chw():
    hwc = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8)
    chw = D.ToFloat()(hwc)
    assert chw.shape == (3, 32, 32) and chw.dtype == torch.float32
    torch.testing.assert_close(chw, hwc.permute(2, 0, 1).float() / 255)
    torch.testing.assert_close(D.ToFloat()(hwc.permute(2, 0, 1)), chw)


def test_normalize_math():
    img = torch.rand(3, 4, 4)
    out = D.Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))(img)
    torch.testing.assert_close(out[1], (img[1] - 0.2) / 0.25)
    with pytest.raises(DataError, match="channel"):
        D.Normalize((0.5,), (0.5,))(img)
    with pytest.raises(ConfigError):
        D.Normalize((0.5,), (0.0,))


def test_random_crop_with_padding_keeps_size_and_content():
    torch.manual_seed(0)
    img = torch.rand(3, 32, 32) + 1.0  # no zeros inside
    crops = [D.RandomCrop(32, padding=4)(img) for _ in range(30)]
    assert all(c.shape == (3, 32, 32) for c in crops)
    # every crop is a shifted window of the zero-padded image
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
    for c in crops[:5]:
        assert any(torch.equal(c, padded[:, t:t + 32, s:s + 32])
                   for t in range(9) for s in range(9))
    assert any((c == 0).any() for c in crops)  # some crops show the padding
    assert not all(torch.equal(c, crops[0]) for c in crops)


def test_horizontal_flip_flips():
    img = torch.arange(12.0).view(1, 3, 4)
    torch.testing.assert_close(D.RandomHorizontalFlip(p=1.0)(img), img.flip(-1))
    torch.testing.assert_close(D.RandomHorizontalFlip(p=0.0)(img), img)


def test_cutout_zeroes_one_square():
    torch.manual_seed(0)
    full = 0
    for _ in range(50):
        out = D.Cutout(16)(torch.ones(3, 32, 32))
        zero = out[0] == 0
        assert torch.equal(zero, out[1] == 0)
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert 0 < h <= 16 and 0 < w <= 16
        assert int(zero.sum()) == h * w  # one solid rectangle
        assert rows.max() - rows.min() + 1 == h and cols.max() - cols.min() + 1 == w
        full += (h, w) == (16, 16)
    assert full > 0  # a centre away from the borders zeroes the whole 16x16 square


def test_random_resized_crop_output_size():
    torch.manual_seed(0)
    t = D.RandomResizedCrop(224)
    for shape in [(3, 300, 400), (3, 50, 500), (3, 224, 224)]:
        assert t(torch.rand(*shape)).shape == (3, 224, 224)


def test_resize_and_center_crop():
    img = torch.rand(3, 300, 500)
    resized = D.Resize(256)(img)
    assert resized.shape == (3, 256, 426)
    assert D.CenterCrop(224)(resized).shape == (3, 224, 224)
    tall = D.Resize(256)(torch.rand(3, 400, 300))
    assert tall.shape == (3, 341, 256)
    const = torch.full((3, 50, 70), 0.25)
    torch.testing.assert_close(D.Resize(30)(const), torch.full((3, 30, 42), 0.25))
    small = D.CenterCrop(8)(torch.ones(1, 4, 4))
    assert small.shape == (1, 8, 8) and small.sum() == 16


def test_transform_factories():
    train = D.cifar_transforms(True, cutout=True)
    kinds = [type(t).__name__ for t in train.transforms]
    assert kinds == ["ToFloat", "RandomCrop", "RandomHorizontalFlip", "Normalize", "Cutout"]
    evaluation = D.cifar_transforms(False, cutout=True)
    assert [type(t).__name__ for t in evaluation.transforms] == ["ToFloat", "Normalize"]
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert train(img).shape == (3, 32, 32)
    out = D.imagenet_transforms(False)(torch.randint(0, 256, (3, 240, 320), dtype=torch.uint8))
    assert out.shape == (3, 224, 224)


# ----------------------------------------------------------------------------- small sets
def test_digits_split_and_shapes():
    pytest.importorskip("sklearn")
    train = D.build_dataset("digits", train=True)
    test = D.build_dataset("digits", train=False)
    assert len(train) + len(test) == 1797 and 340 <= len(test) <= 380
    assert train.classes == [str(d) for d in range(10)]
    assert set(test.targets) == set(range(10))
    img, label = train[0]
    assert img.shape == (1, 8, 8) and img.dtype == torch.float32 and 0 <= label < 10
    assert D.Digits(train=False).data.max() <= 1.0
    assert D.Digits(train=False).targets == test.targets  # deterministic split
    assert D.dataset_info("digits").input_size == (1, 8, 8)


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match="pip install scikit-learn"):
        D.Digits()


def test_synthetic_is_deterministic_and_class_conditional():
    a = D.SyntheticImages(64, 4, seed=3)
    b = D.SyntheticImages(64, 4, seed=3)
    test = D.SyntheticImages(64, 4, seed=3, train=False)
    assert torch.equal(a.data, b.data) and a.targets == b.targets
    assert not torch.equal(a.data, test.data)
    assert torch.equal(a.patterns, test.patterns)
    assert sorted(a.targets) == [c for c in range(4) for _ in range(16)]
    # class means are close to their own pattern and far from the others
    labels = torch.tensor(a.targets)
    means = torch.stack([a.data[labels == c].mean(0) for c in range(4)])
    dist = torch.cdist(means.flatten(1), a.patterns.flatten(1))
    assert torch.equal(dist.argmin(1), torch.arange(4))
    ds = D.build_dataset("synthetic", num_samples=10, num_classes=3, image_size=(1, 8, 8))
    assert len(ds) == 10 and ds[0][0].shape == (1, 8, 8) and ds.classes[2] == "class_2"


def test_build_dataset_errors_and_info():
    with pytest.raises(ConfigError, match="cifar10, cifar100, imagenet, digits, synthetic"):
        D.build_dataset("mnist")
    with pytest.raises(ConfigError, match="root"):
        D.build_dataset("cifar10")
    num_classes, input_size, mean, std = D.dataset_info("CIFAR-100")
    assert (num_classes, input_size) == (100, (3, 32, 32)) and len(mean) == len(std) == 3
    assert D.dataset_info("imagenet").mean == D.IMAGENET_MEAN


def test_build_dataset_cifar_augment_flag(tmp_path):
    make_cifar10(tmp_path)
    plain = D.build_dataset("cifar10", tmp_path, train=True, augment=False, verify_sizes=False)
    assert [type(t).__name__ for t in plain.transform.transforms] == ["ToFloat", "Normalize"]
    img = plain[0][0]
    raw = plain.data[0].float() / 255
    mean = torch.tensor(D.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(D.CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(img, (raw - mean) / std)


# ----------------------------------------------------------------------------- loaders
def _epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_seeded_loader_repeats_order_and_augmentation():
    ds = D.SyntheticImages(40, 4, image_size=(3, 8, 8),
                           transform=D.Compose([D.RandomCrop(8, 2), D.RandomHorizontalFlip(),
                                                D.Cutout(4)]))
    x1, y1 = _epoch(D.build_loader(ds, 8, shuffle=True, seed=5))
    torch.manual_seed(123)  # the caller's global RNG must not matter
    x2, y2 = _epoch(D.build_loader(ds, 8, shuffle=True, seed=5))
    assert torch.equal(y1, y2) and torch.equal(x1, x2)
    x3, y3 = _epoch(D.build_loader(ds, 8, shuffle=True, seed=6))
    assert not torch.equal(x3, x1)
    plain = torch.stack([ds.data[i] for i in range(40)])
    assert not torch.equal(torch.sort(x1.flatten(1), 0)[0], torch.sort(plain.flatten(1), 0)[0])
    # a second epoch reshuffles and re-augments
    loader = D.build_loader(ds, 8, shuffle=True, seed=5)
    e1, e2 = _epoch(loader), _epoch(loader)
    assert not torch.equal(e1[0], e2[0])


def test_loader_does_not_disturb_global_rng():
    ds = D.SyntheticImages(16, 2, image_size=(1, 4, 4), transform=D.RandomHorizontalFlip())
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _epoch(D.build_loader(ds, 4, shuffle=True, seed=1))
    assert torch.equal(torch.rand(3), expected)


def test_seeded_loader_with_a_worker():
    ds = D.SyntheticImages(12, 3, image_size=(1, 4, 4), transform=D.RandomHorizontalFlip())
    a = _epoch(D.build_loader(ds, 4, shuffle=True, seed=2, workers=1))
    b = _epoch(D.build_loader(ds, 4, shuffle=True, seed=2, workers=1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_build_loader_arguments():
    ds = D.SyntheticImages(10, 2, image_size=(1, 4, 4))
    with pytest.raises(ConfigError, match="batch_size"):
        D.build_loader(ds, 0, shuffle=False)
    with pytest.raises(ConfigError, match="process group"):
        D.build_loader(ds, 4, shuffle=False, distributed=True)
    ordered = D.build_loader(ds, 4, shuffle=False, drop_last=True)
    assert len(ordered) == 2
    assert _epoch(ordered)[1].tolist() == ds.targets[:8]


def test_distributed_loader_single_process(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        ds = D.SyntheticImages(10, 2, image_size=(1, 4, 4))
        loader = D.build_loader(ds, 5, shuffle=True, seed=3, distributed=True)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        first = _epoch(loader)[1]
        assert torch.equal(_epoch(loader)[1], first)  # same epoch -> same order
        assert sorted(first.tolist()) == sorted(ds.targets)
        epoch0 = list(loader.sampler)
        loader.sampler.set_epoch(1)
        assert list(loader.sampler) != epoch0
    finally:
        dist.destroy_process_group()


def test_subset_is_reproducible_and_keeps_labels():
    ds = D.SyntheticImages(50, 5, image_size=(1, 4, 4))
    a, b = D.subset(ds, 20, seed=1), D.subset(ds, 20, seed=1)
    assert a.indices == b.indices and len(a) == 20 and len(set(a.indices)) == 20
    assert a.indices != D.subset(ds, 20, seed=2).indices
    assert a.targets == [ds.targets[i] for i in a.indices] and a.classes == ds.classes
    assert a[0][1] == ds.targets[a.indices[0]]
    assert len(D.subset(ds, 500, seed=0)) == 50
    with pytest.raises(ConfigError):
        D.subset(ds, 0)


def test_check_num_classes():
    ds = D.SyntheticImages(20, 5, image_size=(1, 4, 4))
    assert D.check_num_classes(ds, 5) == 5
    assert D.check_num_classes(ds, 10) == 5
    with pytest.raises(DataError, match="5 classes but the model's classifier has only 3"):
        D.check_num_classes(ds, 3)

