"""Compaction: from a masked network to a smaller one that computes the same thing.

A *masked* network is the base architecture in which some convolution filters are zero
(weights and conv bias) while their BatchNorm is left as it is: that is how the published
CDP code prunes. In eval mode each masked filter's BatchNorm then emits a per-channel
constant, ``c = beta - gamma * mean / sqrt(var + eps)``, which the network still uses.
:func:`compact` removes every masked filter physically and puts its constant where it
goes, by where the filter's output flows:

* **stream** (the stem, a block's residual-output convolution, a downsample convolution):
  the output joins the residual stream, whose width must stay. The filter and its
  BatchNorm entry go; the BatchNorm becomes a :class:`ScatterBatchNorm2d`, which places
  its kept channels back into the stream's width and fills the removed ones with their
  constant (a learnable per-channel bias). The residual addition then adds kept channels
  and constants where it added them before. Exact.
* **fold** (a block's first convolution, a bottleneck's middle one, every VGG
  convolution): the output goes through BatchNorm and ReLU (and pooling, which keeps a
  constant constant) into the next layer only, so the channel carries ``ReLU(c)``
  everywhere. The filter goes, the next layer loses that input channel, and the
  constant's contribution (the next layer's weights for that channel, summed over the
  kernel, times ``ReLU(c)``) goes into the next layer's bias. Exact when the next layer is
  a linear layer or an unpadded convolution; with a padded convolution it is exact in the
  interior only: at the borders the masked network's kernel overlaps zero padding, where
  the constant is absent, and the folded bias adds it anyway. The difference is measured
  (``CompactInfo.max_abs_error``); BatchNorm recalibration and a short fine-tune absorb it.

A layer whose filters are all masked keeps one zero filter (it still emits its constant
through BatchNorm), so no layer becomes empty.

Which convolution is which is read off the architecture, which is why only cdprune's own
CIFAR ResNets (option A and B), ImageNet ResNets and CIFAR VGG are supported; other
models are refused rather than compacted inexactly. The structure of the compact network
depends only on the masks, never on weight values, so a saved compact network is rebuilt
by compacting a fresh base model with the same masks and loading its weights
(:func:`cdprune.pruning.save_compact`, :func:`cdprune.pruning.load_pruned`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from .masking import mask_filters

__all__ = ["CompactInfo", "ScatterBatchNorm2d", "compact", "compact_structure"]

logger = logging.getLogger(__name__)

SUPPORTED = ("cdprune's CIFAR ResNets (resnet20 ... resnet110, option A and B), ImageNet "
             "ResNets (resnet18, resnet34, resnet50) and vgg16_cifar")


class ScatterBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the kept channels of a layer, placed back into the full width.

    The output has ``width`` channels: kept channel ``i`` at position ``kept[i]``, and at
    each removed position a constant (``fill``, one learnable value per removed channel)
    broadcast over the image. It stands in for the BatchNorm of a convolution whose output
    joins a residual stream, after that convolution lost filters. The layout (which
    positions are kept) is a non-persistent buffer: it follows ``.to(device)`` and is
    rebuilt from the masks, never read from a state dict.

    Args:
        kept: positions in the full width of the kept channels, ascending.
        width: channels of the full width.
        eps, momentum: as :class:`torch.nn.BatchNorm2d`.
    """

    gather: torch.Tensor

    def __init__(self, kept: Sequence[int], width: int, eps: float = 1e-5,
                 momentum: float | None = 0.1):
        super().__init__(len(kept), eps=eps, momentum=momentum)
        kept = [int(i) for i in kept]
        removed = _complement(width, kept)
        if not kept or not removed or max(kept) >= width:
            raise ValueError(f"ScatterBatchNorm2d needs some but not all of {width} channels "
                             f"kept, got {len(kept)} kept")
        self.width = width
        # Position p of the output reads channel gather[p] of cat([kept outputs, fills]).
        gather = torch.empty(width, dtype=torch.long)
        gather[torch.tensor(kept)] = torch.arange(len(kept))
        gather[torch.tensor(removed)] = torch.arange(len(kept), width)
        self.register_buffer("gather", gather, persistent=False)
        self.fill = nn.Parameter(torch.zeros(len(removed)))

    @property
    def kept(self) -> list[int]:
        """Positions of the kept channels in the full width."""
        return [p for p, src in enumerate(self.gather.tolist()) if src < self.num_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        n, _, h, w = y.shape
        fills = self.fill.to(y.dtype).view(1, -1, 1, 1).expand(n, -1, h, w)
        return torch.index_select(torch.cat([y, fills], dim=1), 1, self.gather)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, width={self.width}"


# ------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class _Role:
    """How one convolution's output flows: into the stream, or through BN-ReLU to ``into``."""

    conv: str
    bn: str
    kind: str  # "stream" or "fold"
    into: str | None = None  # the next layer (conv or linear) of a "fold"


def _complement(width: int, idxs: Sequence[int]) -> list[int]:
    """The indices in ``range(width)`` not in ``idxs`` (a set once, not once per index)."""
    gone = set(idxs)
    return [i for i in range(width) if i not in gone]


def _layout(model: nn.Module) -> list[_Role]:
    """Every convolution of a supported model with its BatchNorm and role."""
    from ..models.cifar_resnet import BasicBlock as CifarBlock
    from ..models.cifar_resnet import CifarResNet
    from ..models.imagenet import BasicBlock, Bottleneck, ImageNetResNet
    from ..models.vgg import VGGCifar

    kind = type(model)
    if kind in (CifarResNet, ImageNetResNet):
        blocks = (CifarBlock, BasicBlock, Bottleneck)
        roles = [_Role("conv1", "bn1", "stream")]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            seq = getattr(model, stage, None)
            if seq is None:
                continue
            for i, block in enumerate(seq):
                p = f"{stage}.{i}."
                if type(block) not in blocks:
                    raise UnsupportedModelError(
                        f"compact() does not know block {p[:-1]} ({type(block).__name__}) of "
                        f"{kind.__name__}; it supports {SUPPORTED}")
                last = 3 if isinstance(block, Bottleneck) else 2
                for j in range(1, last):
                    roles.append(_Role(f"{p}conv{j}", f"{p}bn{j}", "fold", f"{p}conv{j + 1}"))
                roles.append(_Role(f"{p}conv{last}", f"{p}bn{last}", "stream"))
                if block.downsample is not None:
                    roles.append(_Role(f"{p}downsample.0", f"{p}downsample.1", "stream"))
        return roles
    if kind is VGGCifar:
        convs = [(i, m) for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
        roles = []
        for n, (i, _) in enumerate(convs):
            into = f"features.{convs[n + 1][0]}" if n + 1 < len(convs) else "classifier.0"
            roles.append(_Role(f"features.{i}", f"features.{i + 1}", "fold", into))
        return roles
    raise UnsupportedModelError(
        f"compact() cannot compact a {kind.__name__}: it must know where every "
        f"convolution's output flows to place the masked filters' constants exactly, and "
        f"knows that for {SUPPORTED}. Evaluate or export the masked network as it is, or "
        "prune it physically with cdprune.prune")


def _check_masks(model: nn.Module, removed: Mapping[str, Sequence[int]],
                 roles: list[_Role]) -> dict[str, list[int]]:
    """``removed_filters`` checked against the model; empty entries dropped, sorted."""
    if not isinstance(removed, Mapping):
        raise ConfigError(f"removed_filters must map conv module names to filter indices, "
                          f"got a {type(removed).__name__}")
    modules = dict(model.named_modules())
    convs = {r.conv for r in roles}
    out = {}
    for name, idxs in removed.items():
        if name not in convs:
            what = type(modules[name]).__name__ if name in modules else "no module"
            raise ConfigError(
                f"removed_filters names '{name}' ({what}); only the convolutions of the "
                f"model can be masked, e.g. {', '.join(sorted(convs)[:3])}")
        width = modules[name].out_channels
        if isinstance(idxs, (str, bytes)) or not isinstance(idxs, Sequence) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < width
                for i in idxs) or len(set(idxs)) != len(idxs):
            raise ConfigError(f"removed_filters['{name}'] must list distinct filter indices "
                              f"in [0, {width}), got {list(idxs)[:8]!r}")
        if idxs:
            out[name] = sorted(int(i) for i in idxs)
    return out


@torch.no_grad()
def _constants(bn: nn.BatchNorm2d) -> torch.Tensor:
    """What an eval-mode BatchNorm emits per channel for an all-zero input."""
    shift = bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    weight = bn.weight if bn.weight is not None else torch.ones_like(shift)
    bias = bn.bias if bn.bias is not None else torch.zeros_like(shift)
    return bias - weight * shift


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _narrow_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    for key in ("weight", "bias"):
        p = getattr(bn, key)
        if p is not None:
            setattr(bn, key, nn.Parameter(p.data[keep].clone(), requires_grad=p.requires_grad))
    for key in ("running_mean", "running_var"):
        if getattr(bn, key) is not None:
            bn._buffers[key] = getattr(bn, key)[keep].clone()
    bn.num_features = len(keep)


def _narrow_outputs(conv: nn.Conv2d, keep: torch.Tensor) -> None:
    conv.weight = nn.Parameter(conv.weight.data[keep].clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.data[keep].clone())
    conv.out_channels = len(keep)


@torch.no_grad()
def _fold_inputs(layer: nn.Module, keep: torch.Tensor, gone: torch.Tensor,
                 values: torch.Tensor) -> None:
    """Drop inputs ``gone`` of ``layer``, adding their constant ``values`` to its bias."""
    weight = layer.weight.data
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise UnsupportedModelError(f"cannot fold constants into grouped conv {layer}")
        shift = torch.einsum("oikl,i->o", weight[:, gone], values.to(weight.dtype))
    else:
        shift = weight[:, gone] @ values.to(weight.dtype)
    width = weight.shape[0]
    bias = layer.bias.data if layer.bias is not None else weight.new_zeros(width)
    layer.bias = nn.Parameter(bias + shift)
    layer.weight = nn.Parameter(weight[:, keep].clone())
    if isinstance(layer, nn.Conv2d):
        layer.in_channels = len(keep)
    else:
        layer.in_features = len(keep)


def _exact_fold(layer: nn.Module) -> bool:
    """A constant input folds exactly into a linear layer or an unpadded convolution."""
    if isinstance(layer, nn.Linear):
        return True
    padding = layer.padding
    return padding != "same" and all(p == 0 for p in (padding if isinstance(padding, tuple)
                                                      else (padding,)))


@torch.no_grad()
def compact_structure(model: nn.Module, removed_filters: Mapping[str, Sequence[int]]
                      ) -> tuple[nn.Module, dict[str, str]]:
    """Compact ``model`` in place, taking the masked filters' constants from its BatchNorm.

    The masked filters' weights are never read (they are treated as zero). The modules
    that change depend on ``removed_filters`` alone, which is what lets a saved compact
    network be rebuilt on a fresh base model.

    Returns:
        The model, and for each compacted convolution how its filters went: ``"stream"``
        (exact), ``"fold"`` (exact) or ``"fold-border"`` (exact away from the borders).

    Raises:
        UnsupportedModelError: not one of the architectures compaction knows.
        ConfigError: ``removed_filters`` names a layer that is not a convolution of the
            model, or indices outside it.
    """
    roles = _layout(model)
    masks = _check_masks(model, removed_filters, roles)
    modules = dict(model.named_modules())
    kinds: dict[str, str] = {}
    for role in roles:
        idxs = masks.get(role.conv)
        if not idxs:
            continue
        conv, bn = modules[role.conv], modules[role.bn]
        width = conv.out_channels
        if len(idxs) == width:  # an empty layer would break the network: one zero filter stays
            idxs = idxs[1:]
            if not idxs:
                continue
        gone = torch.tensor(idxs, dtype=torch.long)
        keep = torch.tensor(_complement(width, idxs), dtype=torch.long)
        values = _constants(bn)[gone].detach().clone()
        _narrow_outputs(conv, keep)
        if role.kind == "stream":
            scatter = ScatterBatchNorm2d(keep.tolist(), width, eps=bn.eps, momentum=bn.momentum)
            scatter.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
            _narrow_bn(bn, keep)
            scatter.load_state_dict({**bn.state_dict(), "fill": values}, strict=True)
            scatter.train(bn.training)
            _set(model, role.bn, scatter)
            modules[role.bn] = scatter
            kinds[role.conv] = "stream"
        else:
            _narrow_bn(bn, keep)
            into = modules[role.into]
            _fold_inputs(into, keep, gone, torch.relu(values))
            kinds[role.conv] = "fold" if _exact_fold(into) else "fold-border"
    return model, kinds


# --------------------------------------------------------------------------- compact
@dataclass
class CompactInfo:
    """What :func:`compact` did and what the compact network costs.

    Attributes:
        macs, params: physical MACs (per sample) and parameters of the compact network.
        macs_masked, params_masked: the same of the masked network (the full base
            architecture: masking removes nothing physically).
        macs_paper: MACs of the masks in the CDP paper's convention
            (:func:`cdprune.paper_macs`).
        removed_exact: masked filters removed with an exact compensation (stream
            constants, and folds into linear layers or unpadded convolutions).
        removed_border: masked filters removed by a fold into a padded convolution: exact
            in the interior, not at the borders.
        kept_masked: masked filters kept as zero filters because their layer would
            otherwise have none left.
        max_abs_error: largest absolute difference between the compact and the masked
            network's outputs (eval mode) on the example batch.
        layers: for each compacted convolution, ``"stream"``, ``"fold"`` or
            ``"fold-border"``.
    """

    macs: int
    params: int
    macs_masked: int
    params_masked: int
    macs_paper: int
    removed_exact: int
    removed_border: int
    kept_masked: int
    max_abs_error: float
    layers: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe)."""
        return asdict(self)


def compact(model: nn.Module, removed_filters: Mapping[str, Sequence[int]], *,
            example_inputs: torch.Tensor | None = None,
            input_size: Sequence[int] | None = None) -> tuple[nn.Module, CompactInfo]:
    """Turn a masked network into a physically smaller one (see the module docstring).

    ``model`` is left as it is; the compact network is a new module, in eval mode. The
    masked filters' weights are treated as zero whatever they hold (a warning says when
    they are not), so the reference the error is measured against is always the masked
    network. Recalibrate BatchNorm afterwards (:func:`cdprune.recalibrate_bn`) to absorb
    the border differences of the folds; optionally fine-tune briefly.

    Args:
        model: the masked network: one of the architectures listed in the module
            docstring, with the masked filters' conv weights zero and BatchNorm untouched.
        removed_filters: ``{conv module name: [filter indices]}`` of the masked filters.
        example_inputs: a batch to measure MACs and the output error on.
        input_size: instead, one sample's ``(C, H, W)``; the error is then measured on a
            seeded random batch of 8.

    Returns:
        ``(compact_model, info)``.

    Raises:
        UnsupportedModelError: ``model`` is an architecture compaction does not know.
        ConfigError: bad ``removed_filters``, or neither ``example_inputs`` nor
            ``input_size`` given.
    """
    from ..measure.evaluate import eval_mode
    from ..measure.macs import count_macs, count_params, paper_macs

    if example_inputs is None:
        if input_size is None:
            raise ConfigError("compact() needs example_inputs (a batch) or input_size "
                              "(C, H, W) to count MACs and measure the output error")
        gen = torch.Generator().manual_seed(0)
        device = next(model.parameters()).device
        example_inputs = torch.randn(8, *input_size, generator=gen).to(device)
    _check_masks(model, removed_filters, _layout(model))
    masked = copy.deepcopy(model).eval()
    modules = dict(masked.named_modules())
    live = [n for n, idxs in removed_filters.items()
            if modules[n].weight[list(idxs)].abs().sum() > 0]
    if live:
        logger.warning("filters listed as removed are not zero in %s; compacting as if they "
                       "were (the masked network is the reference)", ", ".join(live[:5]))
    mask_filters(masked, removed_filters)
    compacted, kinds = compact_structure(copy.deepcopy(masked), removed_filters)
    compacted.eval()
    with eval_mode(masked), torch.no_grad():
        reference = masked(example_inputs)
        error = (compacted(example_inputs) - reference).abs().max().item()
    counts = {"stream": 0, "fold": 0, "fold-border": 0}
    kept_masked = 0
    for name, idxs in removed_filters.items():
        if not idxs:
            continue
        full = len(idxs) == modules[name].out_channels
        kept_masked += int(full)
        if name in kinds:
            counts[kinds[name]] += len(idxs) - int(full)
    kept = {n: _complement(modules[n].out_channels, idxs) for n, idxs in removed_filters.items()}
    info = CompactInfo(
        macs=count_macs(compacted, example_inputs=example_inputs),
        params=count_params(compacted),
        macs_masked=count_macs(masked, example_inputs=example_inputs),
        params_masked=count_params(masked),
        macs_paper=paper_macs(masked, kept, example_inputs=example_inputs),
        removed_exact=counts["stream"] + counts["fold"], removed_border=counts["fold-border"],
        kept_masked=kept_masked, max_abs_error=error, layers=kinds)
    logger.info("compacted %d masked filters (%d exact, %d folded with border effects, %d "
                "kept): %.2fM -> %.2fM MACs, max output difference %.3g",
                sum(len(v) for v in removed_filters.values()), info.removed_exact,
                info.removed_border, kept_masked, info.macs_masked / 1e6, info.macs / 1e6,
                error)
    return compacted, info
