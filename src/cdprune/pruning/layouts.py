"""Channel layouts Torch-Pruning misreads, read again from the traced forward pass.

Torch-Pruning infers how indices cross splits, reshapes and concatenations from the
layers around them. Where that inference goes wrong, the autograd graph and a record of
the forward pass say what really happens: a split's true piece sizes and order (CSP,
Res2Net), whether its sizes live in a module attribute that can be rewritten (MixNet),
which reshapes regroup channels (a shuffle: fixed) or only pair per-group copies of them
(selective-kernel attention: prunable), and which are mere parameter reshapes (a layer
scale, weight standardisation).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

__all__: list[str] = []

# Why channels are left unpruned (see fixed_layout).
SPLIT = "they pass through a torch.split/chunk whose piece sizes the model's code fixes"
REGROUPING = "they pass through a channel regrouping (a view to groups, e.g. a shuffle)"


class Tracer(TorchFunctionMode):
    """Records, while Torch-Pruning traces, what autograd does not keep: the output shape
    of every view/reshape (with the input shape it tells a flatten from a regrouping of
    channels) and the module whose forward ran each channel split."""

    VIEWS = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")
    SPLITS = ("SplitWithSizesBackward0", "SplitBackward0")

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[Any, tuple[int, ...]] = {}
        self.split_owner: dict[Any, nn.Module] = {}
        self.running: list[nn.Module] = []

    def __enter__(self) -> Tracer:
        def push(module: nn.Module, *_: Any) -> None:
            self.running.append(module)

        def pop(module: nn.Module, *_: Any) -> None:
            if self.running and self.running[-1] is module:
                self.running.pop()

        self.hooks = [nn.modules.module.register_module_forward_pre_hook(push),
                      nn.modules.module.register_module_forward_hook(pop)]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for hook in self.hooks:
            hook.remove()
        super().__exit__(*exc)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        fn = getattr(first, "grad_fn", None) if isinstance(first, torch.Tensor) else None
        if fn is not None and fn.name() in self.VIEWS:
            self.sizes[fn] = tuple(first.shape)
        elif fn is not None and fn.name() in self.SPLITS and self.running:
            self.split_owner[fn] = self.running[-1]
        return out


@contextmanager
def tolerant_index_mapping() -> Iterator[None]:
    """Let Torch-Pruning's index mapping skip the reshapes and concatenations it cannot size.

    Its shape inference can find no size where the model is fine: zero channels beyond the
    ``view(b, c, h, w)`` that closes a channel shuffle feeding a chunk (ShuffleNetV2; it
    then divides by zero), or an unknown size for a concatenated slice of a layer's output
    (DPN's dense path; it then adds None). Torch-Pruning leaves a node it cannot size
    without a mapping anyway; here these two do the same instead of raising, and
    :func:`mark_regroupings`, :func:`fix_splits` and the group checks read them from the
    traced shapes (a regrouping or a fixed slice: left unpruned).
    """
    module = tp.dependency.index_mapping
    reshape, concat = module.update_reshape_index_mapping, module.update_concat_index_mapping

    def tolerant_reshape(graph: tp.DependencyGraph, node: Any) -> None:
        try:
            reshape(graph, node)
        except ZeroDivisionError:
            pass  # raised before any mapping is written: the node is left as it was

    def tolerant_concat(graph: tp.DependencyGraph, node: Any) -> None:
        try:
            concat(graph, node)
        except TypeError:
            # sum() over the inferred sizes, one of them None: raised before any mapping
            # is written, as Torch-Pruning itself returns on a None size a line later
            if None not in (getattr(node.module, "concat_sizes", None) or ()):
                raise

    module.update_reshape_index_mapping = tolerant_reshape
    module.update_concat_index_mapping = tolerant_concat
    try:
        yield
    finally:
        module.update_reshape_index_mapping = reshape
        module.update_concat_index_mapping = concat


class _GroupMajorMapping:
    """Index mapping of ``view(n, G, C, h, w)`` of an ``(n, G*C, h, w)`` feature map.

    Channel ``c`` of the regrouped tensor is input channel ``g*C + c`` of every group
    ``g``: going back to the input it becomes G indices, going forward each input
    channel lands on its position within its group.
    """

    def __init__(self, groups: int, width: int, to_input: bool):
        self.groups, self.width, self.to_input = groups, width, to_input

    def __call__(self, idxs: list[Any]) -> list[Any]:
        index = tp._helpers._HybridIndex
        # Unique pairs: tracing goes round the view and back, which must not multiply them.
        if self.to_input:
            pairs = {(g * self.width + i.idx, i.root_idx): None
                     for g in range(self.groups) for i in idxs}
        else:
            pairs = {(i.idx % self.width, i.root_idx): None for i in idxs}
        return [index(idx=a, root_idx=b) for a, b in pairs]


def _reduced_over_groups(node: Any) -> bool:
    """True when a group-major regrouping only weighs per-group copies of the same
    channels and sums them (selective-kernel attention): every op after it, up to a sum
    over the group dim, is a softmax over groups, a sigmoid or a product with a stack of
    per-group feature maps on dim 1. Anything else (a transpose of a channel shuffle,
    another reshape) reorders channels and is left to :func:`fixed_layout`."""
    stack, seen, summed = list(node.outputs), {node}, False
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        fn = n.grad_fn
        name = fn.name() if fn is not None else ""
        if name == "SumBackward1" and tuple(getattr(fn, "_saved_dim", ())) in ((1,), (-4,)) \
                and not getattr(fn, "_saved_keepdim", True):
            summed = True
            continue  # back to (n, C, h, w): ordinary channels from here on
        if name == "SoftmaxBackward0" and getattr(fn, "_saved_dim", None) in (1, -4) \
                or name == "SigmoidBackward0":
            stack += n.outputs
            continue
        if name != "MulBackward0":
            return False
        for other in n.inputs:
            if other not in seen and not (
                    other.grad_fn is not None and other.grad_fn.name() == "StackBackward0"
                    and getattr(other.grad_fn, "_saved_dim", None) == 1):
                return False
        stack += n.outputs
    return summed


def mark_regroupings(graph: tp.DependencyGraph,
                     view_sizes: dict[Any, tuple[int, ...]] | None = None) -> None:
    """Mark the reshapes that regroup channels, and switch off their index mapping.

    Apart from flattening features into a Linear classifier, a reshape in a CNN regroups
    channels: ``view(b, groups, c // groups, h, w)`` of a channel shuffle or of split
    attention (ResNeSt), or the radix softmax behind it. Torch-Pruning reads them as
    flattens and maps each index to a run of indices, which on ResNeSt builds groups of
    millions of indices (tens of seconds). The channels through them are left unpruned
    (``fixed_layout`` in :mod:`cdprune.pruning.graph`), so these reshapes just pass
    indices through. Two kinds are no regrouping: a group-major view that is only weighed
    and summed over its groups (selective-kernel attention, mapped by
    :class:`_GroupMajorMapping`), and a per-channel parameter shaped to ``(1, C, 1, 1)``.
    """
    ops_module = tp.ops.__name__

    def feeds_only_linear(node: Any) -> bool:
        stack, seen, linear = list(node.outputs), set(), False
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if isinstance(n.module, nn.Linear):
                linear = True
            elif type(n.module).__module__ != ops_module or n.type == tp.ops.OPTYPE.RESHAPE:
                return False
            else:
                stack += n.outputs
        return linear

    def from_layers(node: Any) -> bool:
        # A feature map descends from some layer; a tensor computed from parameters
        # alone (NF-Net's gain.view(-1) of weight standardisation) does not.
        stack, seen = list(node.inputs), set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.type == tp.ops.OPTYPE.PARAMETER:
                continue
            if type(n.module).__module__ != ops_module:
                return True
            stack += n.inputs
        return False

    for node in list(graph.module2node.values()):
        if node.grad_fn is not None and node.grad_fn.name() == "CopySlices":
            # x[:, :c] += y (ReXNet's partial residual): read as a plain addition, which
            # sends Torch-Pruning's group tracing round in circles for minutes.
            node.cdprune_fixed = "they pass through an in-place write into a channel slice"
            continue
        if (node.type == tp.ops.OPTYPE.ELEMENTWISE and node.grad_fn is not None
                and "Convolution" in node.grad_fn.name()):
            # F.conv2d with a fixed filter inside a module (TResNet's anti-aliasing blur):
            # its channel count is baked into the filter.
            node.cdprune_fixed = ("they pass through a functional convolution with a fixed "
                                  "filter (F.conv2d)")
            continue
        ndim = len(getattr(node.grad_fn, "_saved_self_sym_sizes", ()) or ())
        if node.type == tp.ops.OPTYPE.RESHAPE and ndim == 1 and not from_layers(node):
            # A per-channel parameter shaped to (1, C, 1, 1) (a layer scale): channel i
            # is entry i. Torch-Pruning may read it as a flatten from the channel count
            # it infers beyond it (4x: the MLP's hidden layer in Inception-NeXt).
            _pass_through(node)
            continue
        # Feature maps only: reshaping a per-channel parameter to (1, C, 1, 1) is harmless.
        if (node.type != tp.ops.OPTYPE.RESHAPE or ndim < 4 or feeds_only_linear(node)
                or not from_layers(node)):
            continue  # a weight reshaped (weight standardisation) is no regrouping
        _pass_through(node)
        before = tuple(getattr(node.grad_fn, "_saved_self_sym_sizes", ()))
        after = (view_sizes or {}).get(node.grad_fn)
        if (after is not None and len(before) == 4 and len(after) == 5
                and after[0] == before[0] and after[3:] == before[2:]
                and after[1] * after[2] == before[1] and len(node.inputs) == 1
                and _reduced_over_groups(node)):
            # view(n, G, C, h, w) -> per-group weights -> sum over G: prunable, channel c
            # of all G groups together.
            groups, width = int(after[1]), int(after[2])
            node.cdprune_group_major = groups
            for dep in node.dependencies:
                if dep.target is node.inputs[0]:
                    dep.index_mapping[0] = _GroupMajorMapping(groups, width, to_input=True)
            for dep in node.inputs[0].dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = _GroupMajorMapping(groups, width, to_input=False)
            continue
        node.cdprune_fixed = REGROUPING


def _pass_through(node: Any) -> None:
    """Make a reshape node map every channel index to itself."""
    node.type = tp.ops.OPTYPE.ELEMENTWISE
    deps = list(node.dependencies) + [d for n in node.inputs + node.outputs
                                      for d in n.dependencies if d.target is node]
    for dep in deps:
        dep.index_mapping = [None] * len(dep.index_mapping)


def fix_splits(graph: tp.DependencyGraph,
               owners: dict[Any, nn.Module] | None = None) -> None:
    """Give Torch-Pruning the real sizes and order of the pieces of every channel split.

    It guesses a ``chunk``'s piece sizes from the layers around it, and takes the split's
    consumers in the order it met them while tracing as the order of the pieces; both go
    wrong on cross-stage (CSP) and Res2Net blocks. The autograd graph knows both: the
    split's saved sizes, and which output each consumer reads.

    A split whose sizes its module keeps in one list attribute (MixNet's mixed
    convolution: ``torch.split(x, self.splits)``) is *adjustable*: pruning may shrink its
    pieces, and :func:`resize_splits` writes the new sizes back.
    """
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.SPLIT:
            continue
        fn = node.grad_fn
        shape, dim = getattr(fn, "_saved_self_sym_sizes", None), getattr(fn, "_saved_dim", None)
        if shape is None or dim is None or dim - len(shape) * (dim >= len(shape)) not in (1, -3):
            continue
        total = int(shape[1])
        if hasattr(fn, "_saved_split_sizes"):
            pieces = [int(p) for p in fn._saved_split_sizes]
        elif hasattr(fn, "_saved_split_size"):
            step = int(fn._saved_split_size)
            pieces = [step] * (total // step) + ([total % step] if total % step else [])
        else:
            continue
        order = {}
        for out in node.outputs:
            nrs = {nr for f, nr in getattr(out.grad_fn, "next_functions", ()) if f is fn}
            if len(nrs) == 1:
                order[out] = nrs.pop()
        if len(order) != len(node.outputs) or sorted(order.values()) != list(range(len(pieces))):
            continue  # a consumer reads several pieces, or a piece is unused: leave it
        node.outputs.sort(key=order.__getitem__)
        node.module.split_sizes = pieces
        node.module.offsets = [sum(pieces[:i]) for i in range(len(pieces) + 1)]
        owner = (owners or {}).get(fn)
        if owner is not None and hasattr(fn, "_saved_split_sizes"):
            attrs = [k for k, v in vars(owner).items() if isinstance(v, (list, tuple))
                     and len(v) == len(pieces) and all(type(p) is int for p in v)
                     and list(v) == pieces]
            if len(attrs) == 1:
                node.cdprune_adjustable = (owner, attrs[0])
    for node in graph.module2node.values():
        if node.type == tp.ops.OPTYPE.CONCAT:
            node.module.concat_sizes = None  # inferred again, from the corrected splits


def resize_splits(splits: dict[Any, set[int]]) -> None:
    """Write the new piece sizes of adjustable splits back into their modules.

    Args:
        splits: per adjustable split node, the positions of its input that were removed.
    """
    for node, removed in splits.items():
        owner, attr = node.cdprune_adjustable
        offsets = node.module.offsets
        sizes = [offsets[i + 1] - offsets[i] - sum(offsets[i] <= r < offsets[i + 1]
                                                   for r in removed)
                 for i in range(len(offsets) - 1)]
        old = getattr(owner, attr)
        setattr(owner, attr, type(old)(sizes))
