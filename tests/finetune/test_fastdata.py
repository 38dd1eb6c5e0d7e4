"""The on-device batched data path: same images and loss as the per-sample path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdprune import TrainConfig, fine_tune
from cdprune.data import Compose, Normalize, RandomCrop, build_dataset, build_loader, subset
from cdprune.errors import ConfigError
from cdprune.finetune.fastdata import DeviceBatches, augment_batch, device_batches_from, draw_params
from cdprune.finetune.resume import seed_epoch
from cdprune.runs.report import plot_training

from ..data.test_data import make_cifar10

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _per_sample(img: torch.Tensor, top: int, left: int, flip: bool, cy: int, cx: int, *,
                padding: int, cutout: int) -> torch.Tensor:
    """One image the way the per-image transforms of cdprune.data treat it."""
    x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    h, w = x.shape[-2:]
    x = F.pad(x, (padding,) * 4)[:, top:top + h, left:left + w]
    if flip:
        x = x.flip(-1)
    x = Normalize(MEAN[:x.shape[0]], STD[:x.shape[0]])(x)
    if cutout:
        half = cutout // 2
        x = x.clone()
        x[:, max(cy - half, 0):min(cy - half + cutout, h),
          max(cx - half, 0):min(cx - half + cutout, w)] = 0
    return x


@pytest.mark.parametrize("padding,cutout", [(4, 16), (4, 0), (0, 8), (2, 5)])
def test_batched_augmentation_equals_the_per_image_one(padding, cutout):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (32, 3, 12, 12), dtype=torch.uint8, generator=g)
    p = draw_params(32, 12, 12, padding=padding, flip=0.5, cutout=cutout, generator=g)
    batch = augment_batch(images, p, mean=torch.tensor(MEAN), std=torch.tensor(STD),
                          padding=padding, cutout=cutout)
    ref = torch.stack([_per_sample(images[i], int(p.top[i]), int(p.left[i]), bool(p.flip[i]),
                                   int(p.cy[i]), int(p.cx[i]), padding=padding, cutout=cutout)
                       for i in range(32)])
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch, ref, rtol=0, atol=1e-6)
    # The same batch gives the same float32 loss through the same network.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    labels = torch.arange(32) % 10
    loss_fast = F.cross_entropy(net(batch), labels)
    loss_ref = F.cross_entropy(net(ref), labels)
    assert abs(loss_fast.item() - loss_ref.item()) < 1e-6


def test_crop_offsets_are_uniform_and_flips_half():
    n = 36000
    p = draw_params(n, 32, 32, padding=4, flip=0.5, cutout=16,
                    generator=torch.Generator().manual_seed(0))
    for offsets in (p.top, p.left):
        assert int(offsets.min()) == 0 and int(offsets.max()) == 8
        freq = torch.bincount(offsets, minlength=9).float() / n
        assert torch.all((freq - 1 / 9).abs() < 0.01), freq
    assert abs(p.flip.float().mean().item() - 0.5) < 0.01
    assert int(p.cy.min()) == 0 and int(p.cy.max()) == 31


def _expected_cutout_area(size: int, side: int) -> float:
    half = side // 2
    lengths = [min(c - half + side, size) - max(c - half, 0) for c in range(size)]
    mean_len = sum(lengths) / size
    return mean_len * mean_len  # rows and columns are drawn independently


def test_cutout_zeroes_the_expected_area_through_the_loader():
    # Constant images that normalise to 1 everywhere: zeros come from Cutout only.
    images = torch.full((4096, 1, 16, 16), 0.75)
    batches = DeviceBatches(images, [0] * 4096, 512, mean=[0.5], std=[0.25], cutout=8)
    zeros = torch.cat([(x == 0).float().sum(dim=(1, 2, 3)) for x, _ in batches])
    assert torch.all(zeros > 0)
    assert zeros.max() == 64
    expected = _expected_cutout_area(16, 8)
    assert abs(zeros.mean().item() - expected) < 0.03 * expected


def test_flip_rate_and_crop_shift_seen_in_the_images():
    # Each column holds its own index, so a flip reverses the first row and a crop shifts it.
    cols = torch.arange(1, 17, dtype=torch.float32)
    images = cols.expand(2000, 1, 16, 16).contiguous()
    batches = DeviceBatches(images, [0] * 2000, 250, mean=[0.0], std=[1.0], padding=2,
                            flip=0.5)
    flipped, shifts = 0, []
    for x, _ in batches:
        row = x[:, 0, 8]  # a middle row: never in the vertical padding
        inner = row[:, 4:12]
        step = inner[:, 1] - inner[:, 0]
        assert torch.all(step.abs() == 1)
        flipped += int((step < 0).sum())
        first = torch.where(step > 0, inner[:, 0] - 5, 12 - inner[:, 0])  # left shift - 2
        shifts.append(first)
    shifts = torch.cat(shifts)
    assert abs(flipped / 2000 - 0.5) < 0.05
    assert set(shifts.long().tolist()) == {-2, -1, 0, 1, 2}


def test_cifar_in_memory_path_matches_the_data_loader_without_augmentation(tmp_path):
    make_cifar10(tmp_path, n=20)
    test = build_dataset("cifar10", tmp_path, train=False, verify_sizes=False, mean=MEAN,
                         std=STD)
    fast = device_batches_from(test, 8, shuffle=False)
    assert fast is not None and not fast.augments
    slow = build_loader(test, 8, shuffle=False)
    assert len(fast) == len(slow) == 3
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 900, 10))
    for (xf, yf), (xs, ys) in zip(fast, slow):
        torch.testing.assert_close(xf, xs, rtol=0, atol=1e-6)
        assert torch.equal(yf, ys)
        assert abs(F.cross_entropy(net(xf), yf).item()
                   - F.cross_entropy(net(xs), ys).item()) < 1e-6


def test_recipe_is_read_off_the_dataset_and_subsets_keep_their_images(tmp_path):
    make_cifar10(tmp_path, n=20)
    train = build_dataset("cifar10", tmp_path, train=True, verify_sizes=False, cutout=True)
    fast = device_batches_from(train, 16, shuffle=True)
    assert (fast.padding, fast.flip, fast.cutout) == (4, 0.5, 16)
    part = subset(build_dataset("cifar10", tmp_path, train=True, verify_sizes=False,
                                augment=False), 30, seed=1)
    fast = device_batches_from(part, 30, shuffle=False)
    x, y = next(iter(fast))
    assert torch.equal(y, torch.tensor(part.targets))
    torch.testing.assert_close(x[3], part[3][0], rtol=0, atol=1e-6)
    digits_like = build_dataset("synthetic", train=True, augment=True)
    assert device_batches_from(digits_like, 8, shuffle=True).padding == 2
    # Transforms it does not know keep the DataLoader.
    train.transform = Compose([RandomCrop(30)])
    assert device_batches_from(train, 16, shuffle=True) is None


def test_order_and_augmentation_depend_on_seed_and_epoch_only():
    images = torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8)

    def epoch(seed, e):
        b = DeviceBatches(images, list(range(100)), 32, mean=MEAN, std=STD, padding=1,
                          flip=0.5, cutout=3, seed=123)
        seed_epoch(b, seed, e)
        return [(x.clone(), y.clone()) for x, y in b]

    a, b, c = epoch(0, 1), epoch(0, 1), epoch(0, 2)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    assert sorted(torch.cat([y for _, y in a]).tolist()) == list(range(100))


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="mean/std"):
        DeviceBatches(torch.zeros(4, 3, 8, 8), [0] * 4, 2, mean=[0.0], std=[1.0])
    with pytest.raises(ConfigError, match="batch_size"):
        DeviceBatches(torch.zeros(4, 1, 8, 8), [0] * 4, 0, mean=[0.0], std=[1.0])


@pytest.mark.parametrize("fast_data", [True, False])
def test_fine_tune_uses_the_fast_path_when_it_can_and_learns(tmp_path, monkeypatch,
                                                             fast_data):
    import cdprune.finetune.fastdata as fastdata

    made = []
    real = fastdata.device_batches_from

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(fastdata, "device_batches_from", spy)
    train = build_dataset("synthetic", train=True, augment=True, num_samples=256,
                          image_size=(3, 8, 8))
    val = build_dataset("synthetic", train=False, num_samples=64, image_size=(3, 8, 8))
    loader = build_loader(train, 32, shuffle=True)
    cfg = TrainConfig(epochs=3, lr=0.05, fast_data=fast_data, eval_every=2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    res = fine_tune(net, loader, build_loader(val, 64, shuffle=False), cfg,
                    output_dir=tmp_path, progress=False)
    # Training and validation loaders both replaced, or neither.
    assert len(made) == (2 if fast_data else 0)
    assert all(isinstance(m, DeviceBatches) for m in made)
    # eval_every=2: epoch 1 is not evaluated, epochs 2 and 3 (the last) are.
    assert [h["val_top1"] is None for h in res.history] == [True, False, False]
    assert res.final_acc == res.history[-1]["val_top1"] > 30
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert plot_training(tmp_path / "training.png", res.history).is_file()
