"""Per-filter scores of the usual baseline criteria, comparable with CDP's.

Every criterion here returns what :func:`~cdprune.scoring.tfidf_scores` returns: one score
per output channel of every Conv2d, higher meaning keep. Fed to the same
:func:`~cdprune.pruning.prune`, all criteria then share the group reduction, the global
ranking and the constraints, so a comparison measures the criterion and nothing else.

* ``l1``: L1 norm of each filter's weights (Li et al., 2017).
* ``bn_scale``: absolute scale of the BatchNorm that follows the conv (Liu et al., 2017).
* ``taylor``: first-order Taylor estimate of the loss change, ``|sum(w * dL/dw)|`` per
  filter, accumulated over a few training batches (Molchanov et al., 2019).
* ``fpgm``: distance of each filter to the others of its layer, the geometric-median
  criterion (He et al., 2019): filters close to the median are redundant.
* ``random``: uniform random scores, the floor any criterion must beat.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .evaluate import eval_mode

__all__ = ["CRITERIA", "bn_scale_scores", "fpgm_scores", "l1_scores", "random_scores",
           "taylor_scores"]

CRITERIA = ("cdp", "cdp_class", "l1", "bn_scale", "taylor", "fpgm", "random")


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def l1_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """L1 norm of every filter."""
    return {n: m.weight.detach().abs().flatten(1).sum(1).float().cpu()
            for n, m in _convs(model).items()}


def fpgm_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """Summed Euclidean distance of each filter to the other filters of its layer."""
    out = {}
    for name, conv in _convs(model).items():
        w = conv.weight.detach().flatten(1).float().cpu()
        out[name] = torch.cdist(w, w).sum(1)
    return out


def random_scores(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform random scores, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.out_channels, generator=g) for n, m in _convs(model).items()}


def bn_scale_scores(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """``|gamma|`` of the BatchNorm fed directly by each conv (found by running the model).

    Convs with no BatchNorm right after them get no score, so they are only pruned
    through channels they share with scored convs.
    """
    produced: dict[int, str] = {}
    scores: dict[str, torch.Tensor] = {}
    convs = _convs(model)
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: produced.__setitem__(id(o), n))
             for n, m in convs.items()]

    def bn_hook(module: nn.Module, inputs: Any, output: Any) -> None:
        name = produced.get(id(inputs[0]))
        if name is not None and module.weight is not None \
                and module.num_features == convs[name].out_channels:
            scores[name] = module.weight.detach().abs().float().cpu()

    hooks += [m.register_forward_hook(bn_hook) for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with eval_mode(model), torch.no_grad():
            model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    if not scores:
        raise ConfigError("bn_scale needs BatchNorm layers right after convolutions; this "
                          "model has none")
    return scores


def taylor_scores(model: nn.Module, batches: Iterable[Any], *, max_batches: int = 8,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """First-order Taylor importance ``|sum(w * grad)|`` per filter over a few batches.

    The model runs in eval mode (BatchNorm statistics stay as they are); its gradients are
    cleared afterwards.
    """
    convs = _convs(model)
    device = torch.device(device) if device else next(model.parameters()).device
    acc = {n: torch.zeros(m.out_channels) for n, m in convs.items()}
    seen = 0
    with eval_mode(model):
        try:
            for images, labels in batches:
                if seen >= max_batches:
                    break
                model.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(images.to(device)), labels.to(device))
                loss.backward()
                for name, conv in convs.items():
                    if conv.weight.grad is not None:
                        acc[name] += (conv.weight.detach() * conv.weight.grad).flatten(1).sum(1) \
                            .abs().float().cpu()
                seen += 1
        finally:
            model.zero_grad(set_to_none=True)
    if seen == 0:
        raise ConfigError("taylor needs at least one labelled training batch")
    return {n: v / seen for n, v in acc.items()}
