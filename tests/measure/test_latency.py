"""The latency model and allocation, and the timing loop, with fake timers and clocks:
no test here times anything."""

import json

import pytest
import torch
from torch import nn

from cdprune.errors import ConfigError
from cdprune.measure import latency
from cdprune.measure.latency import (
    LatencySettings,
    LatencyTable,
    UnitChange,
    fastest_multiple,
    greedy_order,
    layer_shape,
    layer_shapes,
    measure_network,
    time_calls,
)

from ..helpers import SmallNet


class FakeTimer:
    """Seconds from MACs (1 ns each) plus a penalty for output widths not a multiple of 4;
    counts its calls. Works on single layers and whole networks alike."""

    __qualname__ = "FakeTimer"

    def __init__(self, penalty: float = 0.0, multiple: int = 4):
        self.calls = 0
        self.penalty, self.multiple = penalty, multiple

    def __call__(self, module: nn.Module, x: torch.Tensor) -> float:
        self.calls += 1
        total = []

        def hook(m, inputs, out):
            if isinstance(m, nn.Conv2d):
                macs = out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                width = m.out_channels
            else:
                macs = out.numel() * m.in_features
                width = m.out_features
            total.append(1e-9 * macs * (1 + (self.penalty if width % self.multiple else 0.0)))

        hooks = [m.register_forward_hook(hook) for m in module.modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            module(x)
        for h in hooks:
            h.remove()
        return sum(total)


def settings(tmp_path, timer, **kw):
    # A fake timer says the same every time: one pair tells what many would.
    kw.setdefault("confirm_rounds", 1)
    kw.setdefault("search_rounds", 1)
    return LatencySettings(batch_size=2, threads=1, timer=timer, cache_dir=tmp_path, **kw)


def test_table_is_cached_per_key(tmp_path):
    model, x = SmallNet().eval(), torch.randn(1, 3, 8, 8)
    shapes = layer_shapes(model, x)
    timer = FakeTimer()
    table = LatencyTable.measure(shapes.values(), settings(tmp_path, timer))
    assert table.measured == timer.calls > 0
    files = list(tmp_path.glob("latency-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"] == table.key
    again = LatencyTable.measure(shapes.values(), settings(tmp_path, timer))
    assert again.measured == 0 and timer.calls == table.measured  # a hit: nothing timed
    assert again.tables == table.tables
    # Another batch size, another file: the miss times again.
    other = LatencyTable.measure(shapes.values(), LatencySettings(
        batch_size=4, threads=1, timer=timer, cache_dir=tmp_path))
    assert other.measured == table.measured and len(list(tmp_path.glob("*.json"))) == 2
    assert other.key["batch_size"] == 4 and other.key["layers"] == table.key["layers"]


def test_corrupt_cache_is_measured_again(tmp_path):
    shapes = layer_shapes(SmallNet().eval(), torch.randn(1, 3, 8, 8))
    timer = FakeTimer()
    LatencyTable.measure(shapes.values(), settings(tmp_path, timer))
    path = next(tmp_path.glob("latency-*.json"))
    path.write_text("{not json")
    table = LatencyTable.measure(shapes.values(), settings(tmp_path, timer))
    assert table.measured > 0 and json.loads(path.read_text())["key"] == table.key


def test_predict_matches_grid_and_interpolates(tmp_path):
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    shape = layer_shape(conv, (1, 16, 8, 8))
    timer = FakeTimer()
    table = LatencyTable.measure([shape], settings(tmp_path, timer))
    ins, outs = shape.grid()
    assert ins == [4, 8, 16] and outs == [8, 16, 32]
    assert table.measured == timer.calls == 9
    exact = FakeTimer()(shape.build(8, 32)[0], torch.randn(2, 8, 8, 8))
    assert table.predict(shape, 8, 32) == pytest.approx(exact)
    off_grid = FakeTimer()(shape.build(12, 24)[0], torch.randn(2, 12, 8, 8))
    assert table.predict(shape, 12, 24) == pytest.approx(off_grid)
    # MACs are bilinear in the widths, so interpolation between grid points is exact here.
    between = FakeTimer()(shape.build(10, 20)[0], torch.randn(2, 10, 8, 8))
    assert table.predict(shape, 10, 20) == pytest.approx(between)
    assert table.predict(shape, 16, 32) > table.predict(shape, 16, 31) > table.predict(shape, 8, 31)


@pytest.mark.parametrize("layer,input_shape", [
    (nn.Conv2d(8, 16, 3, padding=1), (1, 8, 6, 6)),
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), (1, 8, 6, 6)),
    (nn.Conv2d(8, 16, 1, groups=2), (1, 8, 6, 6)),
    (nn.Linear(8, 16), (1, 5, 8)),
])
def test_built_layers_are_real_constant_and_in_eval_mode(layer, input_shape):
    """Table cells are timed on layers filled with 0.01 (no random initialisation, no
    meta tensors left) that run in eval mode on the widths asked for."""
    shape = layer_shape(layer, input_shape)
    c_in, c_out = (4, 8) if shape.kind != "dw" else (4, 4)
    module, size = shape.build(c_in, c_out)
    assert not module.training
    tensors = [*module.parameters(), *module.buffers()]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert all(torch.all(t == 0.01) for t in tensors if t.is_floating_point())
    out = module(torch.full((2, *size), 0.5))
    assert torch.isfinite(out).all()
    assert out.shape[1 if shape.kind != "linear" else -1] == c_out


def test_time_layer_times_the_widths_interleaved(monkeypatch):
    """Without an injected timer the cells of one shape go through one interleaved
    time_calls (table_warmup, then table_repeats rounds), share inputs of one width and
    keep their medians."""
    shape = layer_shape(nn.Conv2d(8, 16, 3, padding=1), (1, 8, 6, 6))
    seen = {}

    def fake_time_calls(calls, *, warmup, repeats, clock, sync):
        seen.update(calls=calls, warmup=warmup, repeats=repeats, clock=clock)
        # Call k of round r takes k + 1 s, except a spike in round 0.
        return [[100.0 if r == 0 else k + 1.0 for r in range(repeats)]
                for k in range(len(calls))]

    monkeypatch.setattr(latency, "time_calls", fake_time_calls)
    settings = LatencySettings(batch_size=3, table_warmup=2, table_repeats=5, cache_dir=None)
    out = latency.time_layer(shape, [(4, 16), (8, 8), (8, 16)], settings)
    assert out == [1.0, 2.0, 3.0]  # medians: the spike is out
    assert (seen["warmup"], seen["repeats"], seen["clock"]) == (2, 5, "cpu")
    first, second, third = (c.args[0] for c in seen["calls"])
    assert first.shape == (3, 4, 6, 6) and second is third and second.shape == (3, 8, 6, 6)
    assert [c.func[0].out_channels for c in seen["calls"]] == [16, 8, 16]


def test_compare_networks_times_one_pass_of_each_per_pair(monkeypatch):
    """With the real clock, base and pruned go through one interleaved time_calls
    (settings.warmup, then ``rounds`` pairs) on the settings' batch, in eval mode, and the
    ratio is the median of the per-pair ratios; the models' modes are restored."""
    base, pruned = SmallNet().train(), SmallNet().eval()
    seen = {}

    def fake_time_calls(calls, *, warmup, repeats, clock, sync):
        seen.update(warmup=warmup, repeats=repeats, clock=clock, training=[
            base.training, pruned.training], grad=torch.is_grad_enabled())
        outputs = [call() for call in calls]
        seen["batch"] = outputs[0].shape[0]
        # pair 2 is a load spike on the base: its ratio is an outlier the median drops
        return [[1.0, 1.0, 9.0, 1.0, 1.0], [0.5, 0.6, 0.6, 0.7, 0.6]]

    monkeypatch.setattr(latency, "time_calls", fake_time_calls)
    s = LatencySettings(batch_size=3, threads=1, warmup=4, cache_dir=None)
    t_base, t_pruned, ratio = latency.compare_networks(base, pruned, torch.randn(1, 3, 8, 8),
                                                       s, rounds=5)
    assert (t_base, t_pruned) == (1.0, 0.6) and ratio == pytest.approx(0.6)
    assert seen == {"warmup": 4, "repeats": 5, "clock": "cpu", "training": [False, False],
                    "grad": False, "batch": 3}
    assert base.training and not pruned.training


def test_fastest_multiple_follows_the_timings(tmp_path):
    shape = layer_shape(nn.Conv2d(64, 64, 3, padding=1), (1, 64, 8, 8))
    assert fastest_multiple(shape, settings(tmp_path, FakeTimer(penalty=0.5))) == 4
    assert fastest_multiple(shape, settings(tmp_path, FakeTimer(penalty=0.0))) == 1


def test_measure_network_uses_batch_and_restores_mode(tmp_path):
    model = SmallNet().train()
    seen = []
    t = measure_network(model, torch.randn(1, 3, 8, 8),
                        settings(tmp_path, lambda m, x: seen.append(x.shape) or 0.5))
    assert t == 0.5 and seen == [torch.Size([2, 3, 8, 8])] and model.training


def _uniform_table(shapes, seconds_per_channel):
    """A table where each layer costs ``seconds_per_channel[key] * out`` seconds."""
    tables = {}
    for k, s in shapes.items():
        ins, outs = s.grid()
        tables[s.key()] = {"in": ins, "out": outs,
                           "s": [[seconds_per_channel[k] * o for o in outs] for _ in ins]}
    return LatencyTable(tables, {})


def test_greedy_removes_lowest_score_per_second_first():
    conv = nn.Conv2d(8, 8, 1)
    shapes = {"a": layer_shape(conv, (1, 8, 4, 4)),
              "b": layer_shape(nn.Conv2d(8, 8, 1, stride=2), (1, 8, 4, 4))}
    # a's channels save 1 s each, b's 4 s: at equal scores, b goes first; a unit of a with
    # ratios a: 1, 2, 3 and b: 0.25, 1.25, 2.25 interleave.
    table = _uniform_table(shapes, {"a": 1.0, "b": 4.0})
    groups = [[UnitChange(0, s, [("a", 0, 1)]) for s in (1.0, 2.0, 3.0)],
              [UnitChange(1, s, [("b", 0, 1)]) for s in (1.0, 5.0, 9.0)]]
    order = greedy_order(groups, shapes, table)
    assert [(g, i) for g, i, _ in order] == [(1, 0), (0, 0), (1, 1), (0, 1), (1, 2), (0, 2)]
    totals = [t for _, _, t in order]
    assert totals[0] == pytest.approx(8 + 32 - 4) and totals[-1] == pytest.approx(40 - 15)
    assert all(a > b for a, b in zip(totals, totals[1:]))


def test_greedy_puts_units_that_save_nothing_last():
    shapes = {"a": layer_shape(nn.Conv2d(8, 8, 1), (1, 8, 4, 4))}
    table = _uniform_table(shapes, {"a": 1.0})
    groups = [[UnitChange(0, 0.0, [("elsewhere", 0, 1)])],
              [UnitChange(1, 100.0, [("a", 0, 1)])]]
    assert [g for g, _, _ in greedy_order(groups, shapes, table)] == [1, 0]


# ----------------------------------------------------------- through prune()
def _net_and_scores(name="resnet20b"):
    from cdprune.models import create_model

    from ..helpers import random_scores
    model = create_model(name).eval()
    return model, random_scores(model), torch.randn(2, 3, 32, 32)


class Sublinear(FakeTimer):
    """Seconds grow less than MACs: a sum of layer timings no longer adds up to the
    network's, so the first prediction misses and the goal needs correcting."""

    __qualname__ = "Sublinear"

    def __call__(self, module, x):
        return super().__call__(module, x) ** 0.6


@pytest.mark.parametrize("timer_cls", [FakeTimer, Sublinear])
@pytest.mark.parametrize("target", [0.3, 0.5])
def test_latency_target_is_hit_through_prune(tmp_path, timer_cls, target):
    from cdprune import prune

    model, scores, x = _net_and_scores()
    timer = timer_cls()
    result = prune(model, scores, example_inputs=x, latency_reduction=target,
                   latency=settings(tmp_path, timer, round_to=None))
    info = result.extra["latency"]
    assert abs(info["measured"] - target) <= 0.05 * target and info["hit"]
    # The measured reduction is what the fake timer says of the two networks.
    fake = FakeTimer() if timer_cls is FakeTimer else Sublinear()
    xb = x[:1].expand(2, 3, 32, 32)
    assert 1 - fake(result.model, xb) / fake(model, xb) == pytest.approx(info["measured"], abs=1e-5)
    assert result.plan["allocation"] == "latency" and result.plan["scope"] == "all"
    assert result.plan["target"]["latency_reduction"] == target
    if timer_cls is Sublinear:
        assert len(info["rounds"]) > 1  # the first prediction ignored the overhead


def test_latency_allocation_prefers_cheap_score_per_second(tmp_path):
    """With equal scores everywhere, the latency allocation takes channels where one saves
    most time: a block-internal channel of the first stage (32x32, 16 inputs) costs four
    times the MACs of one of the third (8x8, 64 inputs)."""
    from cdprune import prune

    model, scores, x = _net_and_scores()
    flat = {k: torch.ones_like(v) for k, v in scores.items()}
    result = prune(model, flat, example_inputs=x, macs_reduction=0.3, allocation="latency", scope="internal",
                   latency=settings(tmp_path, FakeTimer(), round_to=None))
    before, after = result.widths_before, result.widths_after
    kept = {n: after[n] / before[n] for n in before if n.endswith("conv1") and "layer" in n}
    first = [v for n, v in kept.items() if n.startswith("layer1")]
    last = [v for n, v in kept.items() if n.startswith("layer3")]
    assert abs(result.macs_reduction - 0.3) <= 0.003
    assert max(first) < min(last)


def test_latency_round_to_auto_uses_fastest_multiple(tmp_path):
    from cdprune import prune

    model, scores, x = _net_and_scores()
    result = prune(model, scores, example_inputs=x, latency_reduction=0.3,
                   latency=settings(tmp_path, FakeTimer(penalty=0.5)))
    assert result.plan["round_to"] == 4
    assert all(w % 4 == 0 for n, w in result.widths_after.items() if n != "conv1")


@pytest.mark.parametrize("kwargs, match", [
    ({"latency_reduction": 1.2}, "outside"),
    ({"latency_reduction": 0.4, "macs_reduction": 0.5}, "exactly one"),
    ({"latency_reduction": 0.4, "inplace": True}, "inplace"),
])
def test_latency_bad_arguments(tmp_path, kwargs, match):
    from cdprune import prune
    from cdprune.errors import ConfigError

    model, scores, x = _net_and_scores()
    with pytest.raises(ConfigError, match=match):
        prune(model, scores, example_inputs=x, latency=settings(tmp_path, FakeTimer()),
              **kwargs)


def test_round_to_is_timed_once_per_table(tmp_path):
    from cdprune import prune

    model, scores, x = _net_and_scores()
    timer = FakeTimer(penalty=0.5)
    prune(model, scores, example_inputs=x, macs_reduction=0.3, allocation="latency",
          latency=settings(tmp_path, timer))
    calls = timer.calls
    result = prune(model, scores, example_inputs=x, macs_reduction=0.3, allocation="latency",
                   latency=settings(tmp_path, timer))
    assert timer.calls == calls and result.plan["round_to"] == 4  # table and multiple cached
    notes = json.loads(next(tmp_path.glob("latency-*.json")).read_text())["notes"]
    assert list(notes.values()) == [4]


def test_timing_outliers_are_smoothed_out(tmp_path):
    """A load spike during one timing must not read as a huge saving."""
    shape = layer_shape(nn.Conv2d(16, 16, 3, padding=1), (1, 16, 8, 8))
    ins, outs = shape.grid()
    grid = [[1.0 * i * o for o in outs] for i in ins]
    grid[-1][-1] *= 300  # a spike on the full width
    grid[0][0] *= 300  # and one on the narrowest
    table = LatencyTable({shape.key(): {"in": ins, "out": outs, "s": grid}}, {})
    full, near = table.predict(shape, 16, 16), table.predict(shape, 12, 12)
    assert near <= full <= 2 * 16 * 16 * 16 / 12  # the spike is capped
    assert table.predict(shape, ins[0], outs[0]) <= ins[0] * outs[1]  # and lowered


class LyingTimer(FakeTimer):
    """Honest about single layers; about a pruned whole network it doubles the time saved
    until told to be honest."""

    __qualname__ = "LyingTimer"

    def __init__(self):
        super().__init__()
        self.honest, self.base = False, None

    def __call__(self, module, x):
        seconds = super().__call__(module, x)
        if sum(1 for m in module.modules() if isinstance(m, nn.Conv2d)) < 2:
            return seconds  # a single layer of the table
        if self.base is None:
            self.base = seconds  # the unpruned network is timed first
        if not self.honest and seconds < self.base:
            return self.base - 2 * (self.base - seconds)
        return seconds


def test_latency_hit_only_when_the_re_measurement_confirms_it(tmp_path, monkeypatch):
    import cdprune.pruning.by_latency as pruning_latency
    from cdprune import prune

    model, scores, x = _net_and_scores()
    lying = LyingTimer()
    real = pruning_latency.compare_networks

    def compare(base, pruned, example, settings, rounds=5):
        lying.honest = rounds == settings.confirm_rounds  # the re-measurement
        return real(base, pruned, example, settings, rounds=rounds)

    monkeypatch.setattr(pruning_latency, "compare_networks", compare)
    result = prune(model, scores, example_inputs=x, latency_reduction=0.4,
                   latency=settings(tmp_path / "a", lying, round_to=None, confirm_rounds=3))
    info = result.extra["latency"]
    xb = x[:1].expand(2, 3, 32, 32)
    truth = 1 - FakeTimer()(result.model, xb) / FakeTimer()(model, xb)
    # The search believed it hit -40%; re-measured, the network saves about half that.
    assert abs(info["search_measured"] - 0.4) <= 0.05 * 0.4
    assert info["measured"] == pytest.approx(truth, abs=1e-6)
    assert info["measured"] == pytest.approx(info["search_measured"] / 2, abs=1e-6)
    assert not info["hit"]
    assert result.extra["latency_target_missed"]["reached"] == pytest.approx(truth, abs=1e-6)
    # An honest timer: hit, and the report carries the re-measured figure.
    honest = prune(model, scores, example_inputs=x, latency_reduction=0.4,
                   latency=settings(tmp_path / "b", FakeTimer(), round_to=None))
    assert honest.extra["latency"]["hit"]
    assert honest.extra["latency"]["measured"] == pytest.approx(
        1 - FakeTimer()(honest.model, xb) / FakeTimer()(model, xb), abs=1e-6)


def test_a_timed_width_multiple_never_makes_a_target_unreachable(tmp_path):
    from cdprune import prune

    model, scores, x = _net_and_scores()
    # Layers timed alone run slowly at widths off a multiple of 8: the timed multiple is
    # 8, and a small latency target is closer to no block of 8 channels at all than to
    # one. (The whole network is timed by its MACs alone, so that the fallback's widths
    # off the multiple do not read as slower than the original.)
    class AloneOffMultipleSlow(FakeTimer):
        __qualname__ = "AloneOffMultipleSlow"

        def __call__(self, module, x):
            self.penalty = 5.0 if type(module) is nn.Sequential else 0.0
            return super().__call__(module, x)

    timer = AloneOffMultipleSlow(multiple=8)
    result = prune(model, scores, example_inputs=x, latency_reduction=0.006,
                   latency=settings(tmp_path, timer))
    assert result.removed_filters > 0 and result.plan["round_to"] is None


def test_default_clock_is_cpu_time_on_the_cpu():
    from cdprune.measure.latency import LatencySettings

    assert LatencySettings().clock_name() == "cpu"
    assert LatencySettings(device="cuda").clock_name() == "wall"
    with pytest.raises(Exception, match="clock"):
        LatencySettings(clock="sundial")


# ------------------------------------------------------------------ the timing loop
def _ticking(monkeypatch, clock: str, step: float) -> None:
    """Make ``clock`` a fake that advances by ``step`` at every reading."""
    ticks = iter(range(10_000))
    monkeypatch.setitem(latency.CLOCK_READERS, clock, lambda: step * next(ticks))


def test_time_calls_warms_each_up_then_interleaves_the_timed_calls(monkeypatch):
    _ticking(monkeypatch, "wall", 1.0)
    log: list[str] = []
    times = time_calls([lambda: log.append("a"), lambda: log.append("b")], warmup=2,
                       repeats=3, sync=lambda: log.append("|"))
    assert log == ["a", "a", "b", "b"] + ["|", "a", "|", "|", "b", "|"] * 3
    assert times == [[1.0] * 3, [1.0] * 3]  # one reading before and one after each call


def test_time_calls_reads_the_clock_it_is_given(monkeypatch):
    _ticking(monkeypatch, "wall", 1.0)
    _ticking(monkeypatch, "cpu", 0.25)
    assert time_calls([lambda: None], warmup=0, repeats=2, clock="cpu") == [[0.25, 0.25]]
    assert time_calls([lambda: None], warmup=1, repeats=1) == [[1.0]]


@pytest.mark.parametrize("kwargs, needle", [
    ({"clock": "gpu"}, "clock 'gpu' is not known; use one of wall, cpu"),
    ({"warmup": -1}, "warmup=-1"),
    ({"repeats": -2}, "repeats=-2"),
])
def test_time_calls_refuses_an_unknown_clock_or_a_negative_count(kwargs, needle):
    args = {"warmup": 0, "repeats": 1, **kwargs}
    with pytest.raises(ConfigError, match=needle):
        time_calls([lambda: None], **args)
