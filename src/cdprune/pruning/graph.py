"""Torch-Pruning's dependency graph as cdprune reads it, and the layers taught to it.

Torch-Pruning traces a model once and links every channel to the channels that must go
with it. This module builds that graph, records each layer's shapes for the analytic MACs count, and says which
group members cannot lose channels (what it misreads is corrected in
:mod:`cdprune.pruning.layouts`). Module types Torch-Pruning cannot read by itself
(a layer that places channels, such as the option-A shortcut) are taught to it through
:func:`register_pruner`, next to the model that defines them.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import ConfigError
from ..measure.evaluate import eval_mode
from .layouts import (
    REGROUPING,
    SPLIT,
    Tracer,
    fix_splits,
    mark_regroupings,
    tolerant_index_mapping,
)

__all__ = ["ChannelPruner", "custom_pruners", "register_pruner", "register_traced_forward"]



# ---------------------------------------------------------------------- customised pruners
class ChannelPruner(tp.pruner.function.BasePruningFunc):
    """How to prune a module type that Torch-Pruning cannot read by itself.

    Subclasses implement Torch-Pruning's four methods (``prune_out_channels``,
    ``prune_in_channels``, ``get_out_channels``, ``get_in_channels``) and may say more
    through the two hooks below. Register an instance with :func:`register_pruner`.
    """

    #: What ``scope="auto"`` picks for a model holding this module type (None: no say).
    scope: str | None = None

    def locked_outputs(self, layer: nn.Module, idxs: Sequence[int]) -> torch.Tensor | None:
        """Which of the output positions ``idxs`` must stay (a bool mask), or None: none.

        A position whose removal would change the function (it carries a signal the
        rest of the group does not zero) is never pruned.
        """
        return None

    def bundled_outputs(self, layer: nn.Module, idxs: Sequence[int]) -> list[list[int]]:
        """Positions of ``idxs`` (indices into it) that can only be removed together.

        Each list is one bundle: the ranking treats it as one unit, so either all of it
        goes or none (a GroupNorm group). Positions in no list stand alone.
        """
        return []


_PRUNERS: dict[type, ChannelPruner] = {}


def register_pruner(module_type: type[nn.Module], pruner: ChannelPruner) -> None:
    """Teach the pruner a module type: graphs built from now on prune it with ``pruner``.

    Raises:
        ConfigError: ``pruner`` is not a :class:`ChannelPruner`.
    """
    if not isinstance(pruner, ChannelPruner):
        raise ConfigError(f"the pruner for {module_type.__name__} is a "
                          f"{type(pruner).__name__}; give a ChannelPruner instance")
    _PRUNERS[module_type] = pruner


def custom_pruners() -> dict[type, ChannelPruner]:
    """The registered module types and their pruners (a copy)."""
    return dict(_PRUNERS)


def auto_scope(model: nn.Module) -> str:
    """``scope="auto"`` for ``model``: what a registered pruner asks for, else ``"all"``."""
    for module in model.modules():
        pruner = _PRUNERS.get(type(module))
        if pruner is not None and pruner.scope is not None:
            return pruner.scope
    return "all"


# ---------------------------------------------------------------------- traced forwards
_FORWARDS: list[tuple[Callable[[nn.Module], bool], Callable[..., Any]]] = []


def register_traced_forward(matches: Callable[[nn.Module], bool],
                            forward: Callable[..., Any]) -> None:
    """Trace the models that ``matches`` accepts through ``forward(model, inputs)``.

    For networks whose own forward depends on the data beyond the input's shape (a
    two-stage detector: which proposals survive non-maximum suppression, region heads
    fed from detached proposals). ``forward`` runs every layer at shapes fixed by the
    input size and returns the task outputs as the layers give them; the dependency
    graph, the shapes for the MACs search and the protected output layers (every
    Conv2d/Linear whose output is returned as is) are read from it.
    """
    _FORWARDS.append((matches, forward))


@contextlib.contextmanager
def _traced(model: nn.Module) -> Iterator[None]:
    forward = next((f for matches, f in _FORWARDS if matches(model)), None)
    if forward is None:
        yield
        return
    model.forward = types.MethodType(forward, model)  # this instance only, for now
    try:
        yield
    finally:
        del model.forward


# ---------------------------------------------------------------------- dependency graph
def build_graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, with cdprune's custom pruners."""
    # Tracing runs a forward pass: in eval mode it never updates BN running statistics.
    with eval_mode(model), torch.enable_grad(), Tracer() as tracer, \
            tolerant_index_mapping(), _traced(model):
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs, customized_pruners=custom_pruners(),
            verbose=False)
    fix_splits(graph, tracer.split_owner)
    mark_regroupings(graph, tracer.sizes)
    return graph


# ---------------------------------------------------------------------- analytic MACs
@dataclass
class Geometry:
    """Shape facts of one Conv2d/Linear layer, enough to recount its MACs after pruning."""

    in_ch: int
    out_ch: int
    groups: int
    kernel: int
    positions: int  # output positions per sample (H*W for conv)

    def macs(self, out_rm: int = 0, in_rm: int = 0, depthwise_rm: int = 0) -> int:
        out = self.out_ch - out_rm - depthwise_rm
        if self.groups > 1 and self.groups == self.in_ch:  # depthwise: one input per output
            return self.positions * out * self.kernel
        return self.positions * out * ((self.in_ch - in_rm) // self.groups) * self.kernel


@dataclass
class Trace:
    """What Torch-Pruning's traced forward pass of one sample tells: the dependency
    graph, every Conv2d/Linear's shapes and the layer that produced the output (the
    classifier, never pruned)."""

    graph: tp.DependencyGraph
    geometry: dict[nn.Module, Geometry]
    output_layers: list[nn.Module]


def trace_model(model: nn.Module, example_inputs: Any) -> Trace:
    """Trace ``model`` on one sample: its dependency graph, layer shapes and output layer."""
    last: list[nn.Module] = []

    def hook(m: nn.Module, inputs: Any, out: torch.Tensor) -> None:
        last[:] = [m]

    # Torch-Pruning traces with a forward pass (and runs the first layer once more on
    # its own, hence no MACs counting here); the hooks read the last layer it runs.
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks = [m.register_forward_hook(hook) for m in layers]
    try:
        graph = build_graph(model, first_sample(example_inputs))
    finally:
        for h in hooks:
            h.remove()
    geo, returned = _geometry(model, layers, first_sample(example_inputs))
    return Trace(graph, geo, last + [m for m in returned if m not in last])


def _geometry(model: nn.Module, layers: list[nn.Module], example: Any
              ) -> tuple[dict[nn.Module, Geometry], list[nn.Module]]:
    """Every layer's shapes from one plain forward pass, and the layers whose output the
    model returns as is (task outputs: kept whole). A layer that runs several times
    (a detection head shared by every FPN level) adds up its output positions; a layer in
    a two-stage detector's region heads counts one region (its rows are regions), as
    :func:`cdprune.measure.macs.region_layers` says."""
    geo: dict[nn.Module, Geometry] = {}
    produced: list[tuple[nn.Module, torch.Tensor]] = []  # alive, so ids stay unique

    def hook(m: nn.Module, inputs: Any, out: torch.Tensor) -> None:
        produced.append((m, out))
        if isinstance(m, nn.Conv2d):
            # per sample (the batch is one) or, in region heads, per region
            new = Geometry(m.in_channels, m.out_channels, m.groups,
                           m.kernel_size[0] * m.kernel_size[1], out.shape[-1] * out.shape[-2])
        else:
            # rows per sample (or per region), also when no region ran
            new = Geometry(m.in_features, m.out_features, 1, 1, math.prod(out.shape[1:-1]))
        if m in geo:
            geo[m].positions += new.positions
        else:
            geo[m] = new

    hooks = [m.register_forward_hook(hook) for m in layers]
    try:
        with eval_mode(model), torch.no_grad(), _traced(model):
            if isinstance(example, dict):
                out = model(**example)
            elif isinstance(example, (list, tuple)):
                out = model(*example)
            else:
                out = model(example)
    finally:
        for h in hooks:
            h.remove()
    by_id = {id(t): m for m, t in produced}
    returned = [by_id[id(t)] for t in _tensors(out) if id(t) in by_id]
    return geo, list(dict.fromkeys(returned))


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a nest of tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def first_sample(example_inputs: Any) -> Any:
    """The first sample of a tensor batch (other inputs are passed through unchanged)."""
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs[:1]
    return example_inputs


def member_kind(fn: Any) -> str | None:
    """Which side a Torch-Pruning function prunes: ``"out"``, ``"in"``, ``"dw"`` or None."""
    if fn == tp.prune_depthwise_conv_out_channels:
        return "dw"
    if fn == tp.prune_conv_out_channels or fn == tp.prune_linear_out_channels:
        return "out"
    if fn == tp.prune_conv_in_channels or fn == tp.prune_linear_in_channels:
        return "in"
    return None


def is_grouped(module: nn.Module) -> bool:
    """A grouped convolution (not depthwise): each group must keep as many channels."""
    return (isinstance(module, nn.Conv2d) and module.groups > 1
            and module.groups != module.out_channels)


def dimension(module: nn.Module, kind: str | None) -> int | None:
    """The channel count of ``module`` on the side ``kind`` prunes (None if unknown)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if kind in ("out", "dw"):
        return getattr(module, "out_channels", getattr(module, "out_features", None))
    if kind == "in":
        return getattr(module, "in_channels", getattr(module, "in_features", None))
    return None


def is_misread(item: Any) -> bool:
    """True when Torch-Pruning's indices for one group member cannot be right.

    Its index bookkeeping goes wrong on some graphs (a ``torch.split`` whose pieces are
    added to other tensors, as in Res2Net): a member then gets more indices than the group
    has channels, or indices past the layer's width. Such a group is never pruned.
    """
    module, kind = item.dep.target.module, member_kind(item.dep.pruning_fn)
    if (isinstance(module, nn.Conv2d) and module.groups == module.out_channels > 1
            and module.in_channels != module.out_channels):
        return True  # depthwise with a channel multiplier on its input: read as 1:1
    if isinstance(module, nn.Parameter):  # a layer scale and the like: one entry a channel
        dim = getattr(item.dep.target, "pruning_dim", -1)
        size = int(module.shape[dim]) if module.dim() else None
    else:
        size = dimension(module, kind) if isinstance(module, nn.Module) else None
    if size is None:
        return False
    idxs = list(item.idxs)
    if len(idxs) != len(item.root_idxs) or any(not 0 <= i < size for i in idxs):
        return True
    return kind != "in" and len(set(idxs)) != len(idxs)


def fixed_layout(item: Any) -> str | None:
    """Why channels through this group member cannot be removed, or None if they can.

    The model's own code fixes some channel layouts with plain numbers that pruning
    cannot change: ``torch.split(x, width)`` (Res2Net, CSP), ``x[:, :n]`` (Ghost modules
    whose slice drops channels) and the ``view(b, groups, c // groups, h, w)`` of a
    channel shuffle. Pruning channels that pass through them would change the function.
    """
    node = item.dep.target
    if getattr(node, "cdprune_fixed", None):
        return node.cdprune_fixed
    if getattr(node, "cdprune_adjustable", None):
        return None
    if node.type not in (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.SLICE, tp.ops.OPTYPE.RESHAPE):
        return None
    fn = node.grad_fn
    dim = getattr(fn, "_saved_dim", 1)
    ndim = len(getattr(fn, "_saved_self_sym_sizes", ())) or 4
    if node.type == tp.ops.OPTYPE.RESHAPE:
        return REGROUPING if ndim >= 5 else None
    if not isinstance(dim, int) or dim % ndim not in (1, ndim - 1):
        return None  # not the channel dim of NCHW, nor of NHWC (channels-last blocks)
    if dim % ndim == ndim - 1 != 1 and getattr(fn, "_saved_step", 1) != 1:
        # A strided slice of the last dim is a spatial subsampling of NCHW (the option-A
        # shortcut's x[:, :, ::2, ::2]), never a channels-last block's channel slice.
        return None
    return (SPLIT if node.type == tp.ops.OPTYPE.SPLIT else
            "they pass through a channel slice whose bounds the model's code fixes")
