"""The criterion registry: one signature for every criterion, one place to add one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cdprune.cli.main import build_parser
from cdprune.errors import ConfigError
from cdprune.importance import criteria
from cdprune.importance.criteria import (
    CRITERIA,
    ScoreContext,
    criterion_names,
    get_criterion,
    l1_scores,
    register_criterion,
)
from cdprune.runs.compare import compare_criteria, write_comparison

from ..helpers import SmallNet, make_loader


def _context(**overrides) -> ScoreContext:
    loader = make_loader(n=32, batch_size=16)
    values = dict(example_inputs=torch.randn(2, 3, 8, 8), batches=loader, stats_loader=loader,
                  num_classes=4, device="cpu")
    values.update(overrides)
    return ScoreContext(**values)


@pytest.mark.parametrize("name", CRITERIA)
def test_every_criterion_scores_every_conv_channel(small_net, name):
    small_net.train()  # the mode the caller left must come back
    before = {k: v.clone() for k, v in small_net.state_dict().items()}
    scores = get_criterion(name).score(small_net, _context())
    convs = {n: m for n, m in small_net.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(scores) == set(convs)
    for conv_name, conv in convs.items():
        assert scores[conv_name].shape == (conv.out_channels,), conv_name
        assert torch.isfinite(scores[conv_name]).all(), conv_name
    after = small_net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN stats kept
    assert small_net.training and all(p.grad is None for p in small_net.parameters())


def test_built_in_names_labels_and_help():
    assert CRITERIA[:2] == ("cdp", "cdp_class")  # CDP first, then the baselines
    assert {"l1", "bn_scale", "taylor", "fpgm", "random"} <= set(CRITERIA)
    assert criterion_names()[:len(CRITERIA)] == CRITERIA
    for name in CRITERIA:
        entry = get_criterion(name)
        assert entry.name == name and entry.label and entry.help
    assert [n for n in CRITERIA if get_criterion(n).seeded] == ["random"]


def test_seed_and_cdp_options_reach_the_criterion(small_net):
    rand = get_criterion("random").score
    assert torch.equal(rand(small_net, _context(seed=3))["conv1"],
                       rand(small_net, _context(seed=3))["conv1"])
    assert not torch.equal(rand(small_net, _context(seed=3))["conv1"],
                           rand(small_net, _context(seed=4))["conv1"])
    cdp = get_criterion("cdp").score
    plain = cdp(small_net, _context())["conv3"]
    act = cdp(small_net, _context(cdp_options={"tap": "act"}))["conv3"]
    assert not torch.allclose(plain, act)


@pytest.mark.parametrize("name, missing", [("cdp", "stats_loader"), ("cdp_class", "stats_loader"),
                                           ("bn_scale", "example_inputs"),
                                           ("taylor", "batches")])
def test_a_missing_input_names_the_criterion_and_the_field(small_net, name, missing):
    with pytest.raises(ConfigError, match=f"criterion .*needs {missing}"):
        get_criterion(name).score(small_net, _context(**{missing: None}))


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean bn_scale?.*choose from cdp, cdp_class"):
        get_criterion("bn_scal")


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("l1", "again", "again")(lambda model, context: {})


def test_one_registration_adds_a_criterion_everywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(criteria, "_REGISTRY", dict(criteria._REGISTRY))  # undone after

    @register_criterion("neg_l1", "negated L1", "the opposite of L1: keeps the weakest")
    def neg_l1(model, context):
        return {n: -s for n, s in l1_scores(model).items()}

    assert criterion_names()[-1] == "neg_l1"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--help"])
    assert "neg_l1" in " ".join(capsys.readouterr().out.split())
    torch.manual_seed(0)
    net = SmallNet(width=32).eval()
    loader = make_loader(n=32, batch_size=16, seed=1)
    rows = compare_criteria(
        net, train_loader=loader, val_loader=loader, stats_loader=loader,
        example_inputs=torch.randn(2, 3, 8, 8), macs_reductions=[0.5],
        criteria=["l1", "neg_l1"], finetune=None, output_dir=tmp_path, progress=False)
    assert [r["criterion"] for r in rows] == ["l1", "neg_l1"]
    assert rows[0]["acc_pruned"] >= 0 and rows[1]["macs_reduction"] > 0.4
    _, md = write_comparison(tmp_path, rows)
    assert "| negated L1 |" in md.read_text()


def test_l2_is_the_euclidean_norm_of_each_filter(small_net):
    scores = get_criterion("l2").score(small_net, ScoreContext())
    w = small_net.conv2.weight.detach()
    expected = torch.tensor([float(w[i].pow(2).sum().sqrt()) for i in range(w.shape[0])])
    assert torch.allclose(scores["conv2"], expected)
    assert "l2" in criterion_names() and get_criterion("l2").label == "L2-norm"
