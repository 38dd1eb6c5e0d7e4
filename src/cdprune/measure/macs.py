"""Multiply-accumulate (MAC) and parameter counts, measured on a real forward pass.

MACs are counted for convolutions and linear layers only (the convention of the pruning
literature): a convolution costs ``output elements x in_channels/groups x kernel area``,
a linear layer ``out_features x in_features`` per output row; biases, BN, activations
and pooling are free. Shapes are taken from forward hooks rather than from the layer
configuration, so physically pruned (narrower) models and any input size count right.
Counts are per sample: the forward runs at batch size 1.

Two-stage detectors (torchvision's Faster/Mask/Keypoint R-CNN) run their region heads once
per proposal, and how many proposals survive non-maximum suppression depends on the image
and the weights: counted as they run, the MACs of a model would change with its input and
go *up* after pruning when more proposals survive. Layers inside such region heads (a
module whose type is named ``RoIHeads``) are therefore counted for one region, a fixed
number (also when no proposal reached them, as Mask R-CNN's mask head on an image
without detections): the count is of the network at a fixed input size, not of one
image's proposals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .evaluate import eval_mode

__all__ = ["count_macs", "count_params", "paper_macs", "profile"]

_COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def count_macs(model: nn.Module, input_size: Sequence[int] | None = None,
               example_inputs: Any = None) -> int:
    """MACs of one forward pass for one sample.

    Args:
        model: any module; its train/eval mode is restored afterwards.
        input_size: one sample's shape ``(C, H, W)``, or ``(N, C, H, W)`` (N is ignored).
        example_inputs: instead of ``input_size``, what the model takes: a tensor, a
            tuple/list of positional arguments or a dict of keyword arguments. Tensors
            are cut to their first sample.

    Raises:
        ConfigError: neither or both of ``input_size`` and ``example_inputs`` given, or a
            malformed ``input_size``.
    """
    return profile(model, input_size, example_inputs)["macs"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def profile(model: nn.Module, input_size: Sequence[int] | None = None,
            example_inputs: Any = None) -> dict[str, Any]:
    """MACs, parameters and the MACs of every conv/linear layer, for one sample.

    Returns:
        ``{"macs": int, "params": int, "layers": {module name: MACs}}``; a layer that runs
        several times in one forward pass is summed; a layer that does not run is absent.
    """
    inputs = _example(model, input_size, example_inputs)
    names = {m: name for name, m in model.named_modules()}
    per_region = region_layers(model)
    per_layer: dict[str, int] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        name = names[module]
        if module in per_region and out.dim() > 1:
            # rows are proposals: one region's cost, also when none ran (no detection)
            out = torch.empty((1, *out.shape[1:]), device="meta")
        macs = _layer_macs(module, args[0], out)
        per_layer[name] = per_layer.get(name, 0) + macs

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _COUNTED)]
    try:
        # A forward in train mode would move BN running statistics.
        with eval_mode(model), torch.no_grad():
            if isinstance(inputs, Mapping):
                model(**inputs)
            elif isinstance(inputs, (list, tuple)):
                model(*inputs)
            else:
                model(inputs)
    finally:
        for h in hooks:
            h.remove()
    return {"macs": sum(per_layer.values()), "params": count_params(model), "layers": per_layer}


def region_layers(model: nn.Module) -> set[nn.Module]:
    """The layers of ``model`` that run once per detection proposal (inside a module whose
    type is named ``RoIHeads``, as torchvision's two-stage detectors have): counted for one
    region, since the number of proposals depends on the data."""
    return {m for head in model.modules() if type(head).__name__ == "RoIHeads"
            for m in head.modules() if isinstance(m, _COUNTED)}


def _layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        rows = out.numel() // out.shape[-1] if out.dim() > 0 else 1
        return rows * module.in_features * module.out_features
    # convolution: every output element sums in_channels/groups x kernel products
    per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
    return out.numel() * per_output


def _example(model: nn.Module, input_size: Sequence[int] | None, example_inputs: Any) -> Any:
    if (input_size is None) == (example_inputs is None):
        raise ConfigError("give exactly one of input_size, e.g. (3, 32, 32), or "
                          "example_inputs (a batch the model accepts)")
    if example_inputs is not None:
        return _first_sample(example_inputs)
    try:
        size = tuple(int(s) for s in input_size)
    except (TypeError, ValueError):
        raise ConfigError(f"input_size must be a sequence of ints like (3, 32, 32), "
                          f"got {input_size!r}") from None
    if len(size) not in (3, 4) or min(size) < 1:
        raise ConfigError(f"input_size must be (C, H, W) or (N, C, H, W) with positive "
                          f"sizes, got {input_size!r}")
    ref = next(model.parameters(), None)
    if ref is None:
        ref = next(model.buffers(), torch.empty(0))
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    return torch.zeros((1, *size[-3:]), dtype=dtype, device=ref.device)


def _first_sample(inputs: Any) -> Any:
    """Cut every tensor in ``inputs`` to batch size 1 (MACs are reported per sample)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:1] if inputs.dim() > 0 else inputs
    if isinstance(inputs, Mapping):
        return {k: _first_sample(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_first_sample(v) for v in inputs)
    return inputs


# ------------------------------------------------------------------ paper convention
def paper_macs(model: nn.Module, kept: Mapping[str, Sequence[int]],
               input_size: Sequence[int] | None = None, example_inputs: Any = None) -> int:
    """MACs of a pruning as the CDP paper's own counter reports them, on masks.

    The published code never removes channels: it masks filters and counts MACs on the
    masked network. Its counter (conv and linear only, no biases) charges a convolution
    ``kept outputs x input channels x kernel area x output positions / groups``, where
    the input channels are reduced by the filters masked in the convolution that fed it,
    except where a convolution reads a residual stream (the first convolution of a
    residual block and shortcut convolutions, where it starts again from the full width).
    Linear layers count in full. Masked outputs of a convolution whose output joins a
    residual sum are credited even though a physical network must keep those channels,
    which is why this count differs from :func:`count_macs` of the physically pruned model.

    "Fed it" is read off the forward pass of the unpruned ``model``: a convolution is fed
    by another when its input comes from that convolution's output through single-input
    per-channel operations (BatchNorm, ReLU, pooling) and no other operation reads any
    tensor on the way (so the stem's output, which a residual shortcut also reads, does
    not reduce the next convolution's inputs, as in the published counter).

    Args:
        model: the *unpruned* network.
        kept: for each pruned convolution (module name), the output channels kept; other
            convolutions keep all of theirs. ``PruneResult.plan["kept"]`` has this form
            (its entries for other layers, e.g. BatchNorm, are not read).
        input_size: one sample's shape ``(C, H, W)``.
        example_inputs: instead of ``input_size``, what the model takes.

    Returns:
        MACs per sample under the paper's convention.
    """
    from torch.overrides import TorchFunctionMode

    inputs = _example(model, input_size, example_inputs)
    by_weight = {id(m.weight): (name, m) for name, m in model.named_modules()
                 if isinstance(m, _COUNTED)}
    source: dict[int, Any] = {}  # id(tensor) -> ("conv", call) | ("via", id) | ("mix",)
    uses: dict[int, int] = {}
    alive: list[torch.Tensor] = []  # keep tensors alive so ids are not reused
    calls: list[dict[str, Any]] = []

    class Flow(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            flat = list(args) + list(kwargs.values())
            flat = [t for a in flat for t in (a if isinstance(a, (list, tuple)) else [a])]
            acts = [t for t in flat if isinstance(t, torch.Tensor) and id(t) in source]
            if not isinstance(out, torch.Tensor):
                return out
            alive.append(out)
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            module = by_weight.get(id(weight)) if isinstance(weight, torch.Tensor) else None
            inplace = any(out is t for t in acts)
            for t in acts:
                if t is not out:
                    uses[id(t)] = uses.get(id(t), 0) + 1
            if module is not None:
                calls.append({"name": module[0], "module": module[1],
                              "input": id(acts[0]) if acts else None, "out": out})
                source[id(out)] = ("conv", len(calls) - 1)
            elif inplace:
                if len(acts) > 1:
                    source[id(out)] = ("mix",)
            elif (len(acts) == 1 and out.dim() == acts[0].dim() and out.dim() > 1
                  and out.shape[1] == acts[0].shape[1]):
                source[id(out)] = ("via", id(acts[0]))
            else:
                source[id(out)] = ("mix",)
            return out

    first = inputs if isinstance(inputs, torch.Tensor) else None
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), Flow():
            if first is not None:
                source[id(first)] = ("mix",)
                model(first)
            elif isinstance(inputs, Mapping):
                model(**inputs)
            else:
                model(*inputs)
    finally:
        for m, training in modes.items():
            m.training = training

    def feeder(tensor_id: int | None) -> int | None:
        """The conv call feeding this tensor through a private chain, else None."""
        while tensor_id is not None:
            kind = source.get(tensor_id, ("mix",))
            if kind[0] == "mix":
                return None
            if kind[0] == "conv":
                return kind[1] if uses.get(tensor_id, 0) <= 1 else None
            if uses.get(tensor_id, 0) > 1:
                return None
            tensor_id = kind[1]
        return None

    total = 0
    for call in calls:
        m, out = call["module"], call["out"]
        if isinstance(m, nn.Linear):
            rows = out.numel() // out.shape[-1]
            total += rows * m.in_features * m.out_features
            continue
        cout = len(kept[call["name"]]) if call["name"] in kept else m.out_channels
        cin = m.in_channels
        fed_by = feeder(call["input"])
        if fed_by is not None:
            prev = calls[fed_by]
            if isinstance(prev["module"], nn.Conv2d | nn.Conv1d | nn.Conv3d):
                removed = prev["module"].out_channels - len(
                    kept.get(prev["name"], range(prev["module"].out_channels)))
                if removed <= cin:
                    cin -= removed
        positions = out[0].numel() // out.shape[1]
        total += cout * cin * math.prod(m.kernel_size) * positions // m.groups
    return total
