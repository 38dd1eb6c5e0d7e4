"""Tests for cdprune.measure.evaluate: accuracy by hand, mode restoring, errors, latency."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cdprune.errors import ConfigError, DataError
from cdprune.measure.evaluate import EvalResult, evaluate, measure_latency

torch.set_num_threads(1)

# (target, rank of the target among the logits, 0 = highest) for 6 classes; class 5 absent.
CASES = [(0, 0), (0, 2), (1, 0), (1, 5), (2, 0), (3, 1), (4, 0), (4, 4)]
NUM_CLASSES = 6


def _logits_with_ranks(cases: list[tuple[int, int]], num_classes: int) -> torch.Tensor:
    """Rows of distinct logits in which each target sits at the given rank."""
    rows = []
    for target, rank in cases:
        others = [c for c in range(num_classes) if c != target]
        order = others[:rank] + [target] + others[rank:]  # classes from highest to lowest
        row = torch.empty(num_classes)
        for position, cls in enumerate(order):
            row[cls] = float(num_classes - position)
        rows.append(row)
    return torch.stack(rows)


def _identity_model(num_classes: int) -> nn.Module:
    """A linear layer that returns its input, so the 'images' are the logits."""
    model = nn.Linear(num_classes, num_classes)
    with torch.no_grad():
        model.weight.copy_(torch.eye(num_classes))
        model.bias.zero_()
    return model


def _known_loader(batch_size: int = 3) -> tuple[DataLoader, torch.Tensor, torch.Tensor]:
    logits = _logits_with_ranks(CASES, NUM_CLASSES)
    targets = torch.tensor([t for t, _ in CASES])
    return DataLoader(TensorDataset(logits, targets), batch_size=batch_size), logits, targets


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_accuracy_loss_and_per_class_by_hand(batch_size):
    loader, logits, targets = _known_loader(batch_size)
    result = evaluate(_identity_model(NUM_CLASSES), loader, progress=False)
    assert isinstance(result, EvalResult)
    assert result.num_samples == 8
    assert result.top1 == pytest.approx(100 * 4 / 8)          # ranks 0 in rows 0, 2, 4, 6
    assert result.top5 == pytest.approx(100 * 7 / 8)          # only row 3 (rank 5) misses
    assert result.loss == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert result.per_class_accuracy == pytest.approx([50.0, 50.0, 100.0, 0.0, 50.0, None])
    assert result.images_per_second > 0


def test_top5_is_clipped_to_the_number_of_classes():
    cases = [(0, 3), (1, 2), (2, 1), (3, 3)]
    loader = DataLoader(TensorDataset(_logits_with_ranks(cases, 4),
                                      torch.tensor([t for t, _ in cases])), batch_size=2)
    result = evaluate(_identity_model(4), loader, progress=False)
    assert result.top5 == 100.0
    assert result.top1 == 0.0


def test_num_classes_and_max_batches():
    loader, _, _ = _known_loader(batch_size=2)
    model = _identity_model(NUM_CLASSES)
    result = evaluate(model, loader, progress=False, max_batches=2)  # rows 0-3
    assert result.num_samples == 4
    assert result.top1 == pytest.approx(50.0)
    assert result.per_class_accuracy == pytest.approx([50.0, 50.0, None, None, None, None])
    trimmed = evaluate(model, loader, progress=False, num_classes=5)
    assert len(trimmed.per_class_accuracy) == 5
    with pytest.raises(ConfigError, match="num_classes=7"):
        evaluate(model, loader, progress=False, num_classes=7)
    with pytest.raises(ConfigError, match="max_batches"):
        evaluate(model, loader, progress=False, max_batches=0)


def test_custom_criterion_is_averaged_per_sample():
    loader, logits, targets = _known_loader(batch_size=3)
    result = evaluate(_identity_model(NUM_CLASSES), loader, progress=False,
                      criterion=nn.MultiMarginLoss())
    assert result.loss == pytest.approx(nn.MultiMarginLoss()(logits, targets).item(), rel=1e-6)


def test_to_dict_is_strict_json():
    loader, _, _ = _known_loader()
    data = evaluate(_identity_model(NUM_CLASSES), loader, progress=False).to_dict()
    text = json.dumps(data, allow_nan=False)  # no NaN anywhere, absent classes are null
    assert json.loads(text)["per_class_accuracy"][-1] is None
    assert set(data) == {"top1", "top5", "loss", "per_class_accuracy", "num_samples",
                         "images_per_second"}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))))


def _image_loader(n: int = 12) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3),
                      batch_size=4)


def test_eval_mode_inside_and_modes_restored_after():
    torch.manual_seed(0)
    model = _Net().train()
    model.bn.eval()  # a deliberately frozen BatchNorm must stay frozen
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, m.drop.training)))
    running = model.bn.running_mean.clone()
    first = evaluate(model, _image_loader(), progress=False)
    second = evaluate(model, _image_loader(), progress=False)
    assert seen and all(mode == (False, False) for mode in seen)
    assert first.to_dict()["top1"] == second.top1 and first.loss == second.loss  # no dropout
    assert model.training and model.drop.training and not model.bn.training
    assert torch.equal(model.bn.running_mean, running)


def test_modes_restored_when_the_model_fails():
    model = _Net().train()
    bad = DataLoader(TensorDataset(torch.randn(4, 5, 8, 8), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(RuntimeError):
        evaluate(model, bad, progress=False)
    assert all(m.training for m in model.modules())


def test_bad_labels_and_empty_loader_are_data_errors():
    model = _Net()
    out_of_range = DataLoader(TensorDataset(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])))
    with pytest.raises(DataError, match=r"\[0, 2\]"):
        evaluate(model, out_of_range, progress=False)
    empty = DataLoader(TensorDataset(torch.randn(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(DataError, match="no batches"):
        evaluate(model, empty, progress=False)


def test_measure_latency_is_positive_and_restores_threads_and_mode():
    model = _Net().train()
    threads = torch.get_num_threads()
    seconds = measure_latency(model, (3, 8, 8), batch_size=2, warmup=1, iters=3, threads=1)
    assert isinstance(seconds, float) and 0 < seconds < 5 and math.isfinite(seconds)
    assert torch.get_num_threads() == threads
    assert model.training


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"iters": 0}, {"warmup": -1},
                                    {"threads": 0}, {"input_size": (3, 0, 8)},
                                    {"device": "meta"}])
def test_measure_latency_rejects_bad_arguments(kwargs):
    args = {"input_size": (3, 8, 8), **kwargs}
    with pytest.raises(ConfigError):
        measure_latency(_Net(), **args)
