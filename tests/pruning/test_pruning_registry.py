"""Module types taught to the pruner: the option-A shortcut registers itself with its model."""

from __future__ import annotations

import pytest
from torch import nn

from cdprune.errors import ConfigError
from cdprune.models import create_model
from cdprune.models.cifar_resnet import PadShortcut, PadShortcutPruner
from cdprune.pruning import ChannelPruner, custom_pruners, register_pruner
from cdprune.pruning import graph as pruning_graph


class _Tag(nn.Module):
    """An identity the pruner is told about, standing in for a user's custom layer."""

    def forward(self, x):
        return x


class _TagPruner(ChannelPruner):
    scope = "internal"

    def prune_out_channels(self, layer, idxs):
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer):
        return None

    get_in_channels = get_out_channels


def test_option_a_shortcut_pruner_comes_from_its_model():
    assert isinstance(custom_pruners()[PadShortcut], PadShortcutPruner)
    assert pruning_graph.auto_scope(create_model("resnet20", num_classes=10)) == "internal"
    assert pruning_graph.auto_scope(create_model("resnet20b", num_classes=10)) == "all"


def test_registered_pruner_decides_the_auto_scope():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Tag())
    assert pruning_graph.auto_scope(model) == "all"
    register_pruner(_Tag, _TagPruner())
    try:
        assert isinstance(custom_pruners()[_Tag], _TagPruner)
        assert pruning_graph.auto_scope(model) == "internal"
    finally:
        pruning_graph._PRUNERS.pop(_Tag)
    assert _Tag not in custom_pruners()


def test_register_pruner_refuses_what_is_not_a_channel_pruner():
    with pytest.raises(ConfigError, match="_Tag.*ChannelPruner"):
        register_pruner(_Tag, object())
    assert _Tag not in custom_pruners()


def test_option_a_shortcut_locks_the_positions_it_feeds():
    shortcut = PadShortcut(4, 8)  # inputs land at positions 2..5, zeros elsewhere
    locked = PadShortcutPruner().locked_outputs(shortcut, list(range(8)))
    assert locked.tolist() == [False, False, True, True, True, True, False, False]
