"""Physical, dependency-aware removal of the lowest-scoring filters.

Scores rank filters globally, as in the paper; channels are then removed for real through
Torch-Pruning's dependency graph, so layers whose channels are coupled (residual
additions, concatenation, depthwise convolutions) shrink together and the pruned network
is genuinely smaller and faster.

A *group* is a set of coupled channels; its importance per channel is the reduction of
its members' CDP scores (:class:`~cdprune.importance.scoring.CDPImportance`). Groups are ranked in
one global list; the lowest are removed until a fraction of filters (``sparsity``) or of
MACs (``macs_reduction``) is gone. MACs of a candidate pruning are computed analytically
from the layer shapes, which makes the threshold search cheap; the final model is then
measured for real.

Pruned models are saved as ``model.safetensors`` plus ``plan.json``. Loading replays the
plan on a fresh base model: no pickle anywhere.

The package reads in the order of a pruning: :mod:`.graph` (the dependency graph and the
module types taught to it), :mod:`.layouts` (the splits and reshapes it misreads, read
again from the traced forward pass), :mod:`.groups` (candidates of coupled channels),
:mod:`.search` (the ranking and the target search), :mod:`.surgery` (cutting channels
out), :mod:`.plan` (the plan and pruned models on disk), :mod:`.core` (:func:`prune`).
:mod:`.compact` turns a masked network (filters zeroed, as the published code prunes)
into a physically smaller one.
:mod:`.masking` builds the published code's network instead: its selection over every
convolution, masked rather than removed, and what a plain channel cut of the masks saves.
"""

from __future__ import annotations

from .compact import CompactInfo, ScatterBatchNorm2d, compact
from .core import ALLOCATIONS, SCOPES, prune
from .graph import ChannelPruner, custom_pruners, register_pruner
from .masking import mask_filters
from .norms import GroupNormPruner
from .plan import load_pruned, read_plan, save_compact, save_pruned
from .result import PLAN_FORMAT, PruneResult, conv_widths

__all__ = ["ALLOCATIONS", "PLAN_FORMAT", "SCOPES", "ChannelPruner", "CompactInfo",
           "GroupNormPruner", "PruneResult", "ScatterBatchNorm2d", "compact", "conv_widths", "custom_pruners",
           "load_pruned", "mask_filters", "prune", "read_plan", "register_pruner",
           "save_compact", "save_pruned"]
