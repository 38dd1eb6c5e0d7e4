import math

import pytest
import torch
import torch_pruning as tp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from cdprune.errors import ConfigError, DataError
from cdprune.importance.scoring import (
    CDPImportance,
    balance_factor,
    term_frequency,
    tfidf,
    tfidf_scores,
)


def reference_tfidf(f, coe=0.0):
    """The published formula written out element by element."""
    c, n = len(f), len(f[0])
    b = 1.0 if not coe else math.log(c / coe) + 1
    col = [sum(f[j][d] for j in range(c)) for d in range(n)]
    out = []
    for j in range(c):
        mean = sum(f[j]) / n
        occ = [f[j][d] >= mean for d in range(n)]
        df = sum(occ)
        tf = sum(b * f[j][d] / col[d] for d in range(n) if occ[d] and col[d] != 0) / df
        out.append(tf * math.log(n / (df + 1)))
    return out


def test_hand_computed_3x4():
    f = torch.tensor([[1.0, 0, 2, 1], [0, 0, 0, 0], [3, 1, 0, 0]])
    # channel 2: mean 1, occurs in documents 0 and 1, TF 3/4 and 1/1 -> tf 0.875;
    # idf ln(4/3). Channel 0 occurs in 3 of 4 documents: idf ln(4/4) = 0.
    expected = torch.tensor([0.0, 0.0, 0.875 * math.log(4 / 3)])
    assert torch.allclose(tfidf(f), expected, atol=1e-7)
    b = math.log(3 / 1.0) + 1
    assert torch.allclose(tfidf(f, coe=1.0), expected * b, atol=1e-7)


@pytest.mark.parametrize("coe", [0.0, 0.5, 2.0])
def test_matches_reference(coe):
    g = torch.Generator().manual_seed(1)
    f = torch.rand(6, 9, generator=g) * (torch.rand(6, 9, generator=g) > 0.3)
    ref = torch.tensor(reference_tfidf(f.double().tolist(), coe), dtype=torch.float32)
    assert torch.allclose(tfidf(f, coe), ref, atol=1e-6)


def test_zero_document_gives_zero_tf_not_nan():
    f = torch.tensor([[0.0, 1.0, 2.0], [0.0, 3.0, 1.0]])
    tf = term_frequency(f)
    assert torch.equal(tf[:, 0], torch.zeros(2, dtype=torch.float64))
    assert torch.isfinite(tfidf(f)).all()


def test_nan_input_names_layer():
    f = torch.ones(3, 4)
    f[1, 2] = float("nan")
    with pytest.raises(DataError, match="layer 'layer3.0.conv1'"):
        tfidf(f, name="layer3.0.conv1")
    f[1, 2] = float("inf")
    with pytest.raises(DataError, match="NaN or inf"):
        tfidf(f)


def test_balance_factor():
    assert balance_factor(64, 0) == 1.0
    assert balance_factor(64, None) == 1.0
    assert balance_factor(64, 2.0) == pytest.approx(math.log(32) + 1)
    with pytest.raises(ConfigError, match="coe"):
        balance_factor(64, -1.0)


def test_coe_that_would_flip_a_layers_ranking_is_refused_with_the_bound():
    """b = ln(C/coe) + 1 <= 0 at coe >= e*C would keep the least discriminative filters."""
    assert balance_factor(16, 43.0) > 0  # just below e x 16 = 43.49
    with pytest.raises(ConfigError, match=r"coe=100 .*'conv1' of 16 channels.*below e x 16 "
                                          r"= 43.49"):
        balance_factor(16, 100.0, name="conv1")
    with pytest.raises(ConfigError, match="below e x 16"):
        balance_factor(16, math.e * 16)  # b = 0: every score of the layer would be 0

    class Stats:  # the narrowest layer sets the bound, before any layer is scored
        layers, channels, num_samples = ["wide", "narrow"], {"wide": 64, "narrow": 4}, 100

    with pytest.raises(ConfigError, match="'narrow' of 4 channels"):
        tfidf_scores(Stats(), coe=20.0)


def test_published_variant_refuses_an_explicit_other_option():
    with pytest.raises(ConfigError, match="normalize='max' was given too"):
        tfidf_scores(object(), normalize="max", variant="published")


matrices = arrays("float64", st.tuples(st.integers(2, 6), st.integers(2, 8)),
                  elements=st.floats(0, 10, allow_nan=False, width=32))


@settings(max_examples=40, deadline=None)
@given(matrices, st.randoms(use_true_random=False))
def test_permuting_channels_permutes_scores(f, rnd):
    f = torch.from_numpy(f)
    perm = list(range(f.shape[0]))
    rnd.shuffle(perm)
    assert torch.allclose(tfidf(f[perm]), tfidf(f)[perm], atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(matrices, st.randoms(use_true_random=False))
def test_permuting_documents_changes_nothing(f, rnd):
    f = torch.from_numpy(f)
    perm = list(range(f.shape[1]))
    rnd.shuffle(perm)
    assert torch.allclose(tfidf(f[:, perm]), tfidf(f), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(matrices, st.integers(0, 100))
def test_dead_channel_scores_zero_and_ranks_last(f, row):
    f = torch.from_numpy(f)
    dead = row % f.shape[0]
    f[dead] = 0
    scores = tfidf(f)
    assert scores[dead] == 0
    # every channel that is not constant occurs in at most N-1 documents, so idf >= 0
    varying = [j for j in range(f.shape[0]) if f[j].max() > f[j].min()]
    assert all(scores[j] >= scores[dead] for j in varying)


@settings(max_examples=40, deadline=None)
@given(matrices, st.integers(0, 100), st.floats(0.01, 100))
def test_scaling_a_document_leaves_tf_unchanged(f, col, scale):
    f = torch.from_numpy(f)
    d = col % f.shape[1]
    g = f.clone()
    g[:, d] *= scale
    assert torch.allclose(term_frequency(g), term_frequency(f), atol=1e-9)


def _groups(model, example):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    return list(dg.get_all_groups(ignored_layers=[model.fc],
                                  root_module_types=(nn.Conv2d, nn.Linear)))


@pytest.mark.parametrize("reduction,expected", [
    ("mean", lambda a, b: (a + b) / 2), ("sum", lambda a, b: a + b),
    ("max", torch.maximum), ("min", torch.minimum),
])
def test_importance_reduces_coupled_channels(small_net, reduction, expected):
    s1, s2, s3 = torch.rand(8), torch.rand(8), torch.rand(16)
    imp = CDPImportance({"conv1": s1, "conv2": s2, "conv3": s3}, group_reduction=reduction)
    groups = _groups(small_net, torch.randn(1, 3, 8, 8))
    by_root = {g[0].dep.target.module: g for g in groups}
    coupled = imp(by_root.get(small_net.conv1) or by_root[small_net.conv2])
    assert torch.allclose(coupled, expected(s1, s2))
    assert torch.allclose(imp(by_root[small_net.conv3]), s3)


def test_importance_ignores_unscored_members_and_returns_none(small_net):
    s1 = torch.rand(8)
    groups = _groups(small_net, torch.randn(1, 3, 8, 8))
    imp = CDPImportance({"conv1": s1})
    results = {g[0].dep.target.module: imp(g) for g in groups}
    assert results[small_net.conv3] is None
    residual = results.get(small_net.conv1)
    if residual is None:
        residual = results[small_net.conv2]
    assert torch.allclose(residual, s1)  # conv2 has no score: ignored, not counted as 0


def test_importance_with_explicit_model_and_bad_sizes(small_net):
    groups = _groups(small_net, torch.randn(1, 3, 8, 8))
    g3 = next(g for g in groups if g[0].dep.target.module is small_net.conv3)
    assert torch.allclose(CDPImportance({"conv3": torch.arange(16.0)}, model=small_net)(g3),
                          torch.arange(16.0))
    with pytest.raises(ConfigError, match="conv3"):
        CDPImportance({"conv3": torch.ones(5)})(g3)
    with pytest.raises(ConfigError, match="group_reduction"):
        CDPImportance({}, group_reduction="median")


def test_layer_normalisation_and_published_variant(small_net):
    from cdprune.importance.scoring import tfidf_scores
    from cdprune.importance.stats import collect_stats

    from ..helpers import make_loader

    stats = collect_stats(small_net, make_loader(), progress=False)
    raw = tfidf_scores(stats)
    by_max = tfidf_scores(stats, normalize="max")
    by_mean = tfidf_scores(stats, normalize="mean")
    for name in raw:
        assert torch.isclose(by_max[name].max(), torch.tensor(1.0))
        assert torch.allclose(by_max[name] * raw[name].max(), raw[name], atol=1e-6)
        assert torch.isclose(by_mean[name].mean(), torch.tensor(1.0), atol=1e-5)
        # ranking inside a layer is unchanged
        assert torch.equal(torch.argsort(by_max[name]), torch.argsort(raw[name]))
    published = tfidf_scores(stats, variant="published")
    assert all(torch.equal(published[n], raw[n]) for n in raw)
    spelled = tfidf_scores(stats, normalize="none")  # the CLI's and YAML's spelling
    assert all(torch.equal(spelled[n], raw[n]) for n in raw)
    with pytest.raises(ConfigError, match="normalize"):
        tfidf_scores(stats, normalize="l2")
