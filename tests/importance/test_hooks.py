"""The statistics hooks: the in-place ReLU is taken only where nothing else reads the
conv output, and the pooled values are bit-identical either way."""

import pytest
import torch
from torch import nn

from cdprune.importance import hooks
from cdprune.importance.activations import conv_layer_names
from cdprune.importance.hooks import Collector
from cdprune.importance.stats import collect_stats
from cdprune.models import create_model

from ..helpers import SmallNet


class Chain(nn.Module):
    """conv -> BN -> ReLU twice: both conv outputs are read by their BatchNorm only."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.conv1(x)  # torchvision's style: the name still holds the conv output
        x = torch.relu(self.bn1(x))
        return torch.relu(self.bn2(self.conv2(x)))


class ReadAgain(Chain):
    """conv1's output is read by its BatchNorm and then by an addition."""

    def forward(self, x):
        y = self.conv1(x)
        x = torch.relu(self.bn1(y)) + y
        return torch.relu(self.bn2(self.conv2(x)))


class TwoNorms(Chain):
    """conv1's output goes through two BatchNorms."""

    def __init__(self):
        super().__init__()
        self.bn1b = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv1(x)
        x = torch.relu(self.bn1(y)) - torch.relu(self.bn1b(y))
        return torch.relu(self.bn2(self.conv2(x)))


class Concat(Chain):
    """conv1's output is concatenated with its normalised self (a DenseNet-like read)."""

    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv1(x)
        x = torch.cat([torch.relu(self.bn1(y)), y], 1)
        return torch.relu(self.bn2(self.conv2(x)))


class Kept(Chain):
    """conv1's output is kept on the module and read at the end of the forward pass."""

    def forward(self, x):
        self.saved = self.conv1(x)
        x = torch.relu(self.bn1(self.saved))
        x = torch.relu(self.bn2(self.conv2(x)))
        return x + self.saved.mean()


class PassThroughNorm(nn.BatchNorm2d):
    """A 'BatchNorm' that hands back its input (a frozen identity placeholder)."""

    def forward(self, x):
        return x


class Aliased(Chain):
    def __init__(self):
        super().__init__()
        self.bn1 = PassThroughNorm(8)


class SharedNorm(Chain):
    """One BatchNorm module normalises both conv outputs: each is read by one call, but
    the module's input is not always the same layer's output."""

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn1(self.conv2(x)))


class ChannelsLast(Chain):
    def forward(self, x):
        return super().forward(x.contiguous(memory_format=torch.channels_last))


CASES = {  # model: layers whose ReLU may be taken in place
    "chain": (Chain, {0, 1}),
    "shared-norm": (SharedNorm, {0, 1}),
    "read-again": (ReadAgain, {1}),
    "two-norms": (TwoNorms, {1}),
    "concat": (Concat, {1}),
    "kept": (Kept, {1}),
    "aliased": (Aliased, {1}),
    "small-net": (SmallNet, None),  # the fixtures' net, whatever it qualifies for
    "resnet20": (lambda: create_model("resnet20"), None),
    "resnet20-b": (lambda: create_model("resnet20b"), None),
}


def _randomise(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def _reference(model: nn.Module, batches) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pooled rows and model outputs the obvious way, nothing modified in place."""
    names = conv_layer_names(model)
    outs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(
        n, o.relu().mean((2, 3)))) for n, m in model.named_modules() if n in names]
    rows, results = [], []
    with torch.inference_mode():
        for x in batches:
            results.append(model(x))
            rows.append(torch.cat([outs[n] for n in names], 1))
    for h in hooks:
        h.remove()
    return rows, results


def _collect(model: nn.Module, batches) -> tuple[list[torch.Tensor], list[torch.Tensor], set]:
    modules = dict(model.named_modules())
    collector = Collector([modules[n] for n in conv_layer_names(model)], model)
    rows, results = [], []
    outputs = []
    handle = model.register_forward_hook(lambda m, i, o: outputs.append(o))
    try:
        with torch.inference_mode():
            for x in batches:
                collector.forward(model, x)
                rows.append(collector.take().clone())
                results.append(outputs.pop())
        assert collector.late <= collector.in_place
        return rows, results, collector.in_place
    finally:
        handle.remove()
        collector.remove()


@pytest.mark.parametrize("case", list(CASES))
def test_pooled_values_and_outputs_are_exactly_those_of_a_plain_pass(case):
    build, expected = CASES[case]
    model = _randomise(build())
    torch.manual_seed(1)
    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    ref_rows, ref_out = _reference(model, batches)
    rows, out, late = _collect(model, batches)
    for a, b in zip(rows, ref_rows):
        assert torch.equal(a, b)  # bit-identical, in place or not
    for a, b in zip(out, ref_out):
        assert torch.equal(a, b)  # the in-place ReLU never reached what the model read
    if expected is not None:
        assert late == expected
    else:  # real CNNs: every conv output is read by its BatchNorm alone
        assert late == set(range(len(conv_layer_names(model))))


class OneChannel(nn.Module):
    """A one-channel conv before a wider one: its chunks would each hold one plane."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 1, 3, padding=1), nn.BatchNorm2d(1)
        self.conv2, self.bn2 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


@pytest.mark.parametrize("images_per_chunk", [1, 3])
@pytest.mark.parametrize("case", ["chain", "resnet20", "one-channel"])
def test_large_outputs_pooled_in_chunks_are_bit_identical(monkeypatch, case, images_per_chunk):
    build = OneChannel if case == "one-channel" else CASES[case][0]
    model = _randomise(build())
    torch.manual_seed(1)
    batches = [torch.randn(7, 3, 16, 16) for _ in range(2)]  # 7: a last, shorter chunk
    ref_rows, ref_out = _reference(model, batches)
    # Chunks of 1 or 3 images of the smallest output (bytes a float32 image takes there):
    # larger outputs get one image a chunk.
    smallest = {"chain": 8 * 16 * 16, "resnet20": 64 * 4 * 4, "one-channel": 1 * 16 * 16}[case] * 4
    monkeypatch.setattr(hooks, "CHUNK_BYTES", images_per_chunk * smallest)
    chunked: list[tuple[int, bool]] = []
    original = Collector._pool_in_chunks

    def spy(output, target):
        done = original(output, target)
        chunked.append((output.shape[1], done))
        return done

    monkeypatch.setattr(Collector, "_pool_in_chunks", staticmethod(spy))
    rows, out, _ = _collect(model, batches)
    assert all(torch.equal(a, b) for a, b in zip(rows, ref_rows))
    assert all(torch.equal(a, b) for a, b in zip(out, ref_out))
    assert any(done for _, done in chunked)  # the chunked path ran
    assert not any(done for width, done in chunked if width == 1)


def test_channels_last_outputs_keep_the_scratch_path():
    model = _randomise(ChannelsLast())
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    ref_rows, _ = _reference(model, batches)
    rows, _, late = _collect(model, batches)
    assert late == {0, 1}  # qualifies, but a channels-last output is pooled as before
    for a, b in zip(rows, ref_rows):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)


def test_the_probe_watches_the_first_batch_only():
    model = _randomise(Chain())
    modules = dict(model.named_modules())
    collector = Collector([modules["conv1"], modules["conv2"]], model)
    hooks_before = len(modules["bn1"]._forward_pre_hooks)
    assert hooks_before == 1  # the probe's
    with torch.inference_mode():
        collector.forward(model, torch.randn(2, 3, 8, 8))
    assert len(modules["bn1"]._forward_pre_hooks) == 0 and collector.in_place == {0, 1}
    assert len(modules["bn1"]._forward_hooks) == len(modules["bn2"]._forward_hooks) == 1
    # Each conv ran once, as did its BatchNorm: the BatchNorm's hook alone pools it.
    assert collector.late == set()
    assert not modules["conv1"]._forward_hooks and not modules["conv2"]._forward_hooks
    collector.remove()
    assert not modules["bn1"]._forward_hooks and not modules["bn2"]._forward_hooks


def _probed(build) -> tuple[dict[str, nn.Module], Collector]:
    """A two-conv model's collector after its first (watched) batch."""
    model = _randomise(build())
    modules = dict(model.named_modules())
    collector = Collector([modules["conv1"], modules["conv2"]], model)
    with torch.inference_mode():
        collector.forward(model, torch.randn(2, 3, 8, 8))
    return modules, collector


def test_a_batchnorm_that_runs_twice_gets_its_input_by_identity():
    modules, collector = _probed(SharedNorm)
    assert collector.in_place == collector.late == {0, 1}
    assert len(modules["conv1"]._forward_hooks) == len(modules["conv2"]._forward_hooks) == 1
    assert len(modules["bn1"]._forward_hooks) == 1
    collector.remove()


def test_only_the_batchnorms_that_pool_keep_a_hook():
    modules, collector = _probed(ReadAgain)
    assert collector.in_place == {1} and collector.late == set()
    assert not modules["bn1"]._forward_hooks and len(modules["bn2"]._forward_hooks) == 1
    assert len(modules["conv1"]._forward_hooks) == 1 and not modules["conv2"]._forward_hooks
    collector.remove()
    assert not modules["bn2"]._forward_hooks
    collector.remove()
    assert not modules["bn1"]._forward_hooks and not modules["conv1"]._forward_hooks
    assert not modules["bn1"]._forward_pre_hooks


def test_collect_stats_scores_do_not_depend_on_the_in_place_path():
    model = _randomise(create_model("resnet20"))
    torch.manual_seed(2)
    batches = [(torch.randn(8, 3, 32, 32), torch.arange(8) % 4) for _ in range(3)]
    stats = collect_stats(model, batches, progress=False, keep_features=True)
    ref_rows, _ = _reference(model, [x for x, _ in batches])
    assert torch.equal(stats.features, torch.cat(ref_rows))


def test_a_compiled_model_is_not_probed():
    model = _randomise(Chain())
    model._orig_mod = nn.Identity()  # what torch.compile's wrapper carries
    batches = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    ref_rows, _ = _reference(model, batches)
    rows, _, late = _collect(model, batches)
    assert late == set()
    assert all(torch.equal(a, b) for a, b in zip(rows, ref_rows))
