"""Multiply-accumulate (MAC) and parameter counts, measured on a real forward pass.

MACs are counted for convolutions and linear layers only (the convention of the pruning
literature): a convolution costs ``output elements x in_channels/groups x kernel area``,
a linear layer ``out_features x in_features`` per output row; biases, BN, activations
and pooling are free. Shapes are taken from forward hooks rather than from the layer
configuration, so physically pruned (narrower) models and any input size count right.
Counts are per sample: the forward runs at batch size 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .evaluate import eval_mode

__all__ = ["count_macs", "count_params", "profile"]

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
    per_layer: dict[str, int] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        name = names[module]
        per_layer[name] = per_layer.get(name, 0) + _layer_macs(module, args[0], out)

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
