"""Per-filter scores of the usual baseline criteria, comparable with CDP's.

Every criterion here returns what :func:`~cdprune.importance.scoring.tfidf_scores` returns: one score
per output channel of every Conv2d, higher meaning keep. Fed to the same
:func:`~cdprune.pruning.prune`, all criteria then share the group reduction, the global
ranking and the constraints, so a comparison measures the criterion and nothing else.
The published baselines among them (``criterion_names()`` lists all, each with its help):

* ``l1``: L1 norm of each filter's weights (Li et al., 2017).
* ``bn_scale``: absolute scale of the BatchNorm that follows the conv (Liu et al., 2017).
* ``taylor``: first-order Taylor estimate of the loss change, ``|sum(w * dL/dw)|`` per
  filter, accumulated over a few training batches (Molchanov et al., 2019).
* ``fpgm``: distance of each filter to the others of its layer, the geometric-median
  criterion (He et al., 2019): filters close to the median are redundant.
* ``random``: uniform random scores, the floor any criterion must beat.

Every criterion, CDP's two included, is registered once (:func:`register_criterion`) with
its name, the label tables show and its help text, behind one signature,
``score(model, context) -> {conv name: scores}``, where a :class:`ScoreContext` carries
whatever data a criterion may read. ``cdprune compare`` and its ``--criteria`` flag list
the registered names, so a new criterion is one registration.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..measure.evaluate import eval_mode
from ..suggest import did_you_mean
from .activations import conv_layer_names, layer_width

__all__ = ["CRITERIA", "Criterion", "ScoreContext", "bn_scale_scores", "criterion_names",
           "fpgm_scores", "get_criterion", "l1_scores", "random_scores", "register_criterion",
           "taylor_scores"]


def _convs(model: nn.Module) -> dict[str, nn.Module]:
    """The scored layers: every Conv2d, and a transformer's MLP hidden layers."""
    named = dict(model.named_modules())
    return {n: named[n] for n in conv_layer_names(model)}


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
    return {n: torch.rand(layer_width(m), generator=g) for n, m in _convs(model).items()}


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
                and module.num_features == layer_width(convs[name]):
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
    acc = {n: torch.zeros(layer_width(m)) for n, m in convs.items()}
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


# --------------------------------------------------------------------------- registry
@dataclass
class ScoreContext:
    """What a criterion may read besides the model; each criterion uses only its part.

    Attributes:
        example_inputs: a batch of inputs to run the model on (``bn_scale``).
        batches: labelled training batches ``(images, labels)`` (``taylor``).
        stats_loader: images for the activation statistics (``cdp``, ``cdp_class``).
        stats_max_batches: at most this many batches of ``stats_loader``.
        num_classes: number of classes (class documents).
        cdp_options: ``tap``, ``normalize`` and ``variant`` of the CDP criteria.
        coe: CDP's word-count coefficient.
        seed: seed of randomised criteria (``random``).
        device: where to run the model; by default where its parameters are.
        progress: show progress bars.
    """

    example_inputs: torch.Tensor | None = None
    batches: Iterable[Any] | None = None
    stats_loader: Iterable[Any] | None = None
    stats_max_batches: int | None = None
    num_classes: int | None = None
    cdp_options: Mapping[str, Any] = field(default_factory=dict)
    coe: float = 0.0
    seed: int = 0
    device: torch.device | str | None = None
    progress: bool = False

    def need(self, attribute: str, criterion: str) -> Any:
        """The value of ``attribute``, or a clear error naming the criterion needing it."""
        value = getattr(self, attribute)
        if value is None:
            raise ConfigError(f"criterion {criterion!r} needs {attribute} in its ScoreContext")
        return value


ScoreFn = Callable[[nn.Module, ScoreContext], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: its name, table label, help text and scoring function.

    ``seeded`` criteria are random; a comparison runs them once per seed. ``statistics``
    criteria read activation statistics (a run collects them only for these); ``batches``
    criteria read labelled training batches.
    """

    name: str
    label: str
    help: str
    score: ScoreFn
    seeded: bool = False
    statistics: bool = False
    batches: bool = False


_REGISTRY: dict[str, Criterion] = {}


def register_criterion(name: str, label: str, help: str, *, seeded: bool = False,
                       statistics: bool = False, batches: bool = False
                       ) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator registering ``score(model, context) -> {conv name: scores}`` as ``name``.

    Scores are one value per output channel of a Conv2d, higher meaning keep; a conv left
    out is pruned only through channels it shares with scored convs. ``statistics`` and
    ``batches`` say what of the :class:`ScoreContext` the criterion reads (see
    :class:`Criterion`).

    Raises:
        ValueError: ``name`` is already registered.
    """
    def add(fn: ScoreFn) -> ScoreFn:
        if name in _REGISTRY:
            raise ValueError(f"criterion {name!r} is already registered")
        _REGISTRY[name] = Criterion(name, label, help, fn, seeded, statistics, batches)
        return fn

    return add


def criterion_names() -> tuple[str, ...]:
    """The registered criteria, in registration order."""
    return tuple(_REGISTRY)


def get_criterion(name: str) -> Criterion:
    """The registered criterion ``name``.

    Raises:
        ConfigError: no criterion has this name (with the closest names).
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown criterion {name!r};{did_you_mean(name, _REGISTRY, before=' ')}"
                          f" choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _device(model: nn.Module, context: ScoreContext) -> torch.device:
    if context.device is not None:
        return torch.device(context.device)
    return next(model.parameters()).device


def _cdp(model: nn.Module, context: ScoreContext, documents: str) -> dict[str, torch.Tensor]:
    from .scoring import tfidf_scores
    from .stats import collect_stats

    opts = context.cdp_options
    stats = collect_stats(model, context.need("stats_loader", f"cdp ({documents})"),
                          max_batches=context.stats_max_batches, documents=documents,
                          num_classes=context.num_classes, device=_device(model, context),
                          progress=context.progress,
                          **{k: opts[k] for k in ("tap", "variant") if opts.get(k) is not None})
    return tfidf_scores(stats, coe=context.coe,
                        **{k: opts[k] for k in ("normalize", "variant")
                           if opts.get(k) is not None})


@register_criterion("cdp", "CDP (sample documents)",
                    "CDP's TF-IDF scores, every image a document (the published code)",
                    statistics=True)
def _score_cdp(model: nn.Module, context: ScoreContext) -> dict[str, torch.Tensor]:
    return _cdp(model, context, "sample")


@register_criterion("cdp_class", "CDP (class documents)",
                    "CDP's TF-IDF scores, one document per class (as the paper describes)",
                    statistics=True)
def _score_cdp_class(model: nn.Module, context: ScoreContext) -> dict[str, torch.Tensor]:
    return _cdp(model, context, "class")


@register_criterion("l1", "L1-norm", "L1 norm of each filter's weights")
def _score_l1(model: nn.Module, context: ScoreContext) -> dict[str, torch.Tensor]:
    return l1_scores(model)


@register_criterion("l2", "L2-norm", "L2 norm of each filter's weights")
def _score_l2(model: nn.Module, context: ScoreContext) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().flatten(1).norm(dim=1).float().cpu()
            for n, m in _convs(model).items()}


@register_criterion("bn_scale", "BN scale", "|gamma| of the BatchNorm right after each conv")
def _score_bn_scale(model: nn.Module, context: ScoreContext) -> dict[str, torch.Tensor]:
    inputs = context.need("example_inputs", "bn_scale")
    return bn_scale_scores(model, inputs.to(_device(model, context)))


@register_criterion("taylor", "Taylor (first order)",
                    "|sum(w * dL/dw)| per filter over a few labelled training batches",
                    batches=True)
def _score_taylor(model: nn.Module, context: ScoreContext) -> dict[str, torch.Tensor]:
    # A copy: the backward passes must leave the caller's model and its gradients alone.
    return taylor_scores(copy.deepcopy(model), context.need("batches", "taylor"),
                         device=_device(model, context))


@register_criterion("fpgm", "FPGM",
                    "distance of each filter to the others of its layer (geometric median)")
def _score_fpgm(model: nn.Module, context: ScoreContext) -> dict[str, torch.Tensor]:
    return fpgm_scores(model)


@register_criterion("random", "random", "uniform random scores, the floor to beat",
                    seeded=True)
def _score_random(model: nn.Module, context: ScoreContext) -> dict[str, torch.Tensor]:
    return random_scores(model, context.seed)


# The criteria cdprune ships, in the order tables show them.
CRITERIA = criterion_names()
