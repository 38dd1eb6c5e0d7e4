"""Safe reading and atomic writing of weights.

Everything cdprune reads from disk may come from a stranger, so weights are only ever
read with ``torch.load(..., weights_only=True)`` or safetensors: a checkpoint that carries
a pickled code payload is refused without running it. Weights are written atomically
through :mod:`cdprune.fileio` (whose writers this module still exports under their old
names).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError
from .fileio import atomic_torch_save, atomic_write_bytes

__all__ = [
    "WEIGHT_SUFFIXES",
    "apply_weights",
    "check_state_dict",
    "load_weights",
    "read_state_dict",
    "safe_torch_load",
    "save_weights",
]

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".pth.tar", ".th", ".pt", ".safetensors")
_NEST_KEYS = ("state_dict", "model", "net", "model_state_dict")


# --------------------------------------------------------------------------- writing
def save_weights(model_or_state: nn.Module | Mapping[str, torch.Tensor],
                 path: str | os.PathLike) -> Path:
    """Save a state dict as ``.safetensors`` or, for any other suffix, with ``torch.save``."""
    state = (model_or_state.state_dict() if isinstance(model_or_state, nn.Module)
             else dict(model_or_state))
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        return atomic_write_bytes(path, save(tensors))
    return atomic_torch_save({k: v.detach().cpu() for k, v in state.items()}, path)


# --------------------------------------------------------------------------- reading
def _check_suffix(path: Path) -> None:
    name = path.name.lower()
    if not name.endswith(WEIGHT_SUFFIXES):
        raise CheckpointError(
            f"unsupported weights file '{path}': expected one of {', '.join(WEIGHT_SUFFIXES)}; "
            "rename the file or convert it to .safetensors")


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True``, turning every failure into one clear error.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is empty, truncated, not a checkpoint, or carries code
            (a pickled object other than plain data and tensors), which is refused unrun.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; check the path")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes); re-download or re-save it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses globals it does not know: this is where a code payload stops.
        detail = _unpickling_detail(exc)
        if "global" in detail.lower():
            raise CheckpointError(
                f"refused to load '{path}': it contains pickled objects other than tensors "
                f"and plain data, which could run code ({detail}); nothing in it was run. "
                "Only load files you trust; re-save the weights as a plain state_dict or "
                ".safetensors") from None
        raise CheckpointError(
            f"cannot read checkpoint '{path}': it is corrupt or not a plain PyTorch "
            f"checkpoint ({detail}); nothing in it was run. Re-download or re-save it as a "
            "plain state_dict or .safetensors") from None
    except Exception as exc:  # any parse failure of a foreign file is the file's fault
        raise CheckpointError(
            f"cannot read checkpoint '{path}': the file is truncated or not a PyTorch "
            f"checkpoint ({type(exc).__name__}: {_first_line(exc)}); re-download or re-save "
            "it") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else "no details")[:160]


def _unpickling_detail(exc: BaseException) -> str:
    """The informative part of torch's weights-only refusal, without its advice.

    torch suggests reloading with ``weights_only`` turned off, which would run whatever
    code the file carries: that advice is never passed on.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. Please|\.\s*$|\n|$)", text)
    if found and found.group(1).strip():
        detail = found.group(1).strip()
    else:
        boilerplate = ("Weights only load failed", "Please file an issue",
                       "Check the documentation", "(1)", "(2)")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        useful = [line for line in lines if not line.startswith(boilerplate)]
        detail = (useful or [type(exc).__name__])[0]
    if "weights_only" in detail:
        detail = type(exc).__name__
    return detail[:200]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; check the path")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read safetensors file '{path}': the file is truncated or corrupt "
            f"({str(exc).splitlines()[0][:160]})") from None


def _unnest(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside common checkpoint layouts."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor)
                                                    for v in obj.values()):
            return dict(obj)
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _NEST_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(
        f"'{path}' holds no state dict: expected tensors at the top level or under one of "
        f"{', '.join(repr(k) for k in _NEST_KEYS)}")


def check_state_dict(state: Any, source: str | os.PathLike) -> None:
    """Refuse anything but a mapping of parameter names to tensors, naming ``source``.

    Raises:
        CheckpointError: not a mapping, a key that is no name, or a value that is no tensor.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"'{source}' holds no state dict (a {type(state).__name__}); "
                              "re-save the weights with model.state_dict()")
    odd = next((k for k in state if not isinstance(k, str)), None)
    if odd is not None:
        raise CheckpointError(f"'{source}' is not a state dict: key {odd!r} "
                              f"({type(odd).__name__}) is not a parameter name; re-save the "
                              "weights with model.state_dict()")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"'{source}' is not a state dict: '{bad}' holds a "
                              f"{type(state[bad]).__name__}, not a tensor; re-save the "
                              "weights with model.state_dict()")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from any supported weights file, safely.

    Accepts ``.pth``, ``.pth.tar``, ``.th``, ``.pt`` and ``.safetensors``; unnests state
    dicts stored under ``state_dict``/``model``/``net``; strips the ``module.`` prefix that
    DataParallel and DistributedDataParallel add.
    """
    path = Path(path)
    _check_suffix(path)
    if path.name.lower().endswith(".safetensors"):
        state = _read_safetensors(path)
    else:
        state = _unnest(safe_torch_load(path), path)
    check_state_dict(state, path)
    prefix = "module."
    if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _mismatch_message(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path,
                      strict: bool) -> str | None:
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _fillable(k)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    parts = []
    if strict and missing:
        parts.append(f"missing keys ({len(missing)}): {_short_list(missing)}")
    if strict and unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}): {_short_list(shapes)}")
    if not parts:
        return None
    return (f"weights in '{path}' do not fit the model ({type(model).__name__}): "
            + "; ".join(parts)
            + ". Build the model the checkpoint was saved from: check the model name and that "
            "the dataset has the checkpoint's number of classes")


def _exact_dtypes(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                  path: Path) -> dict[str, torch.Tensor]:
    """``state`` with every tensor in its model tensor's dtype, converted only when exact.

    ``load_state_dict`` casts silently: int8 or bool "weights" would become a wrong model.
    A tensor of another kind than the model's (integers or booleans for floating-point
    weights) is refused; one that converts without changing a value (float16 to float32,
    float64 holding float32 values, integral floats into an integer counter) is converted,
    with a warning.
    """
    out = dict(state)
    converted = []
    for key, value in state.items():
        mine = own.get(key)
        if mine is None or value.dtype == mine.dtype:
            continue
        want = mine.dtype
        same_kind = value.is_floating_point() == want.is_floating_point and \
            value.dtype != torch.bool and want != torch.bool and not value.is_complex()
        cast = value.to(want) if (same_kind or (not want.is_floating_point and
                                                value.is_floating_point())) else None
        exact = cast is not None and torch.equal(cast.to(value.dtype), value)
        if not exact:
            why = ("the model's tensor holds another kind of number: quantised, packed or "
                   "damaged weights would load as a wrong model" if cast is None or
                   not same_kind else f"{want} cannot hold its values exactly")
            raise CheckpointError(f"'{path}' stores '{key}' as {value.dtype} but the model's "
                                  f"tensor is {want}; {why}. Re-save the weights in {want} "
                                  "(e.g. model.float().state_dict())")
        out[key] = cast
        converted.append(key)
    if converted:
        logger.warning("'%s': %d tensors converted exactly to the model's dtype (%s)", path,
                       len(converted), _short_list(converted, 4))
    return out


def _fillable(key: str) -> bool:
    # BN batch counters appeared in PyTorch 0.4.1; older checkpoints (such as the public
    # option-A CIFAR ResNets) lack them and the model keeps its own value.
    return key.endswith("num_batches_tracked")


def _short_list(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a weights file into ``model`` in place and return it.

    Args:
        model: the module to fill; its architecture must match the file.
        path: a ``.pth``/``.pth.tar``/``.th``/``.pt``/``.safetensors`` file.
        strict: require the keys to match exactly. Shapes must always match.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: unreadable or unsafe file, or keys/shapes that do not fit the model
            (all mismatches are listed by name in one message).
    """
    return apply_weights(model, read_state_dict(path), source=path, strict=strict)


def apply_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *,
                  source: str | os.PathLike = "state dict", strict: bool = True) -> nn.Module:
    """Load a state dict already read (e.g. by :func:`read_state_dict`) into ``model``.

    Checks as :func:`load_weights` does; ``source`` names the file in error messages.
    """
    path = Path(source)
    check_state_dict(state, path)
    message = _mismatch_message(model, state, path, strict)
    if message:
        raise CheckpointError(message)
    own = model.state_dict()
    state = _exact_dtypes(own, state, path)
    fitting = {k: v for k, v in state.items() if k in own}
    fitting.update({k: v for k, v in own.items() if k not in state and _fillable(k)})
    # Modules read their format version from the state dict's metadata, which safetensors
    # and plain dicts do not keep (torchvision's MNASNet refuses to load without it): a
    # state dict without it gets the model's own, that of the architecture it fits.
    metadata = getattr(state, "_metadata", None) or getattr(own, "_metadata", None)
    if metadata is not None:
        fitting = type(own)(fitting)
        fitting._metadata = metadata  # type: ignore[attr-defined]
    model.load_state_dict(fitting, strict=strict)
    logger.info("loaded %d tensors from %s", len(state), path)
    return model
