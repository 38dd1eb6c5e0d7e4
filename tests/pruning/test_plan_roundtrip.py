"""Every plan the writer emits loads back: random graphs pruned, saved, loaded, compared.

Hypothesis draws small networks of plain, grouped and depthwise convolutions,
concatenations of two or three branches and residual sums; each is pruned at a random
sparsity with random scores, saved with :func:`save_pruned`, rebuilt on a freshly
initialised base with :func:`load_pruned`, and must give the pruned model's outputs.
The fast tier draws a few dozen graphs; the slow one a thousand.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from cdprune.errors import ConfigError
from cdprune.pruning import load_pruned, prune, read_plan, save_pruned

# One block of the network: (kind, width, groups). Widths (and a concatenation's branch
# widths) are multiples of 4, so that every grouping drawn divides them.
KINDS = ("conv", "grouped", "depthwise", "concat2", "concat3", "residual")


class RandomNet(nn.Module):
    """A stem conv, the drawn blocks, global pooling and a classifier, on 3x8x8 inputs.

    The stem keeps depthwise convs and residual sums off the image itself, whose three
    channels no pruning can change (as in real networks).
    """

    def __init__(self, blocks: list[tuple[str, int, int]], classes: int = 5):
        super().__init__()
        blocks = [("conv", 8, 1), *blocks]
        self.kinds = [kind for kind, _, _ in blocks]
        self.blocks = nn.ModuleList()
        width = 3
        for kind, out, groups in blocks:
            layers = nn.ModuleDict()
            if kind == "conv":
                layers["conv"] = nn.Conv2d(width, out, 3, padding=1)
            elif kind == "grouped":  # needs a width the groups divide: a 1x1 conv first
                layers["pre"] = nn.Conv2d(width, out, 1)
                layers["conv"] = nn.Conv2d(out, out, 3, padding=1, groups=groups)
            elif kind == "depthwise":
                layers["conv"] = nn.Conv2d(width, width, 3, padding=1, groups=width)
                out = width
            elif kind.startswith("concat"):
                n = int(kind[-1])
                for i in range(n):
                    layers[f"b{i}"] = nn.Conv2d(width, out // 2 + 4 * i, 3, padding=1)
                joined = sum(out // 2 + 4 * i for i in range(n))
                # a grouped conv reads the concatenation: one removal spans the branches
                layers["conv"] = nn.Conv2d(joined, joined, 3, padding=1, groups=groups)
                out = joined
            elif kind == "residual":
                layers["conv"] = nn.Conv2d(width, width, 3, padding=1)
                out = width
            layers["bn"] = nn.BatchNorm2d(out)
            self.blocks.append(layers)
            width = out
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, layers in zip(self.kinds, self.blocks):
            if kind.startswith("concat"):
                branches = [layers[f"b{i}"](x) for i in range(int(kind[-1]))]
                y = layers["conv"](torch.relu(torch.cat(branches, dim=1)))
            elif kind == "grouped":
                y = layers["conv"](torch.relu(layers["pre"](x)))
            else:
                y = layers["conv"](x)
            y = layers["bn"](y)
            x = torch.relu(y + x if kind == "residual" else y)
        return self.head(x.mean(dim=(2, 3)))


def _randomised(model: RandomNet, seed: int) -> RandomNet:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


block = st.tuples(st.sampled_from(KINDS), st.sampled_from((8, 16, 24)),
                  st.sampled_from((2, 4)))
graphs = st.fixed_dictionaries({
    "blocks": st.lists(block, min_size=1, max_size=4),
    "sparsity": st.floats(0.05, 0.7),
    "seed": st.integers(0, 2**16),
})


def _round_trip(spec: dict) -> None:
    torch.manual_seed(spec["seed"])
    base = _randomised(RandomNet(spec["blocks"]), spec["seed"])
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(spec["seed"]))
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    scores = {n: torch.rand(m.out_channels, generator=g) for n, m in base.named_modules()
              if isinstance(m, nn.Conv2d)}
    try:
        result = prune(base, scores, example_inputs=x, sparsity=spec["sparsity"], scope="all")
    except ConfigError:  # nothing prunable at this sparsity (refused in words): no plan
        return
    with tempfile.TemporaryDirectory() as folder:
        save_pruned(folder, result, input_size=(3, 8, 8))
        steps = read_plan(folder)["steps"]
        fresh = _randomised(RandomNet(spec["blocks"]), spec["seed"] + 7)
        loaded = load_pruned(folder, fresh).eval()
    with torch.no_grad():
        want, got = result.model.eval()(x), loaded(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{steps}\n{m}")
    widths = [m.weight.shape for m in loaded.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [m.weight.shape for m in result.model.modules()
                      if isinstance(m, nn.Conv2d)]


def test_a_step_of_several_parts_loads_back():
    """Two convs concatenated into a grouped conv: the writer emits a {"parts": ...} step."""
    spec = {"blocks": [("concat2", 16, 4)], "sparsity": 0.4, "seed": 0}
    base = _randomised(RandomNet(spec["blocks"]), 0)
    scores = {n: torch.rand(m.out_channels) for n, m in base.named_modules()
              if isinstance(m, nn.Conv2d)}
    result = prune(base, scores, example_inputs=torch.randn(2, 3, 8, 8), sparsity=0.4,
                   scope="all")
    assert any("parts" in step for step in result.plan["steps"])
    _round_trip(spec)


_FAST = settings(max_examples=20, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(graphs)
def test_random_graphs_round_trip(spec):
    _round_trip(spec)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(graphs)
def test_a_thousand_random_graphs_round_trip(spec):
    _round_trip(spec)
