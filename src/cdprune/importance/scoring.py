"""TF-IDF scores of filters: CDP's measure of class-wise discriminative power.

A channel is a *word* and a document an image (or a class). Per layer, with F the
``[C, N]`` matrix of pooled activations (channels x documents)::

    b      = 1                          if coe == 0
           = ln(C / coe) + 1            otherwise        (balance factor)
    mean_j = mean over documents of F[j]
    A      = F >= mean_j                (the word "occurs" in the document)
    df_j   = sum_d A[j, d]
    TF     = b * F / (sum over channels of each document's column)
    tf_j   = sum_d (TF * A)[j, d] / df_j
    idf_j  = ln(N / (df_j + 1))
    score_j = tf_j * idf_j

This is the arithmetic of the published code. A filter that fires strongly in few
documents scores high; one that fires everywhere or nowhere scores low. A document whose
channels sum to zero contributes a TF of 0. Everything is computed in float64.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Fewer sampled images than this give scores too noisy to rank filters by (a warning).
FEW_IMAGES = 32

__all__ = ["CDPImportance", "balance_factor", "document_counts", "term_frequency", "tfidf",
           "tfidf_scores"]

REDUCTIONS = ("mean", "sum", "max", "min", "first")


def balance_factor(channels: int, coe: float = 0.0, *, name: str | None = None) -> float:
    """The paper's balance factor b: 1 when ``coe`` is falsy, else ``ln(channels/coe) + 1``.

    It scales a layer's TF by the layer's width so that scores of wide and narrow layers
    can share one global ranking. It must stay positive: at ``coe >= e * channels`` it is
    zero or negative, every score of the layer flips sign and the least discriminative
    filters would be kept. Such a ``coe`` is refused (rather than clamped, which would
    silently change the method), with the bound.

    Raises:
        ConfigError: ``coe`` negative, not finite, or at least ``e * channels``.
    """
    if coe is None or coe == 0:
        return 1.0
    if not math.isfinite(coe) or coe < 0:
        raise ConfigError(f"coe must be 0 (no balancing) or a positive number, got {coe}")
    b = math.log(channels / coe) + 1.0
    if b <= 0:
        layer = f"layer '{name}'" if name else "a layer"
        raise ConfigError(f"coe={coe:g} gives {layer} of {channels} channels the balance factor "
                          f"ln({channels}/{coe:g}) + 1 = {b:.3g}, which would reverse its "
                          f"ranking; coe must be below e x {channels} = "
                          f"{math.e * channels:.4g} (e times the narrowest layer's width)")
    return b


def term_frequency(features: torch.Tensor, coe: float = 0.0, *,
                   name: str | None = None) -> torch.Tensor:
    """The TF matrix ``b * F / column sum``: each channel's share of its document.

    A document whose channels all read zero gets TF 0 rather than NaN. The result does not
    change when a document's column is scaled, which is why TF compares images of
    different contrast fairly.
    """
    f = _checked(features, name).double()
    column = f.sum(dim=0, keepdim=True)
    share = torch.where(column != 0, f / torch.where(column != 0, column, 1.0), 0.0)
    return balance_factor(features.shape[0], coe, name=name) * share


def document_counts(features: torch.Tensor, *, mean: torch.Tensor | None = None,
                    name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Document frequency and summed term frequency (with b = 1) of each channel.

    Args:
        features: ``[C, N]`` pooled activations, documents as columns.
        mean: per-channel mean over *all* documents; defaults to this matrix's own. Passing
            the global mean lets each process count its shard (distributed statistics).
        name: layer name for error messages.

    Returns:
        ``(df, tf_sum)``, each ``[C]`` float64.
    """
    f = _checked(features, name).double()
    if mean is None:
        mean = f.mean(dim=1)
    occurs = f >= mean.double()[:, None]
    share = term_frequency(f, name=name)
    return occurs.sum(dim=1, dtype=torch.float64), (share * occurs).sum(dim=1)


def _checked(features: torch.Tensor, name: str | None) -> torch.Tensor:
    where = f" of layer '{name}'" if name else ""
    if features.dim() != 2:
        raise ConfigError(f"features{where} must be a [channels, documents] matrix, "
                          f"got shape {tuple(features.shape)}")
    if features.shape[1] == 0:
        raise DataError(f"features{where} have no documents; collect statistics on some images")
    if not bool(torch.isfinite(features).all()):
        raise DataError(f"features{where} contain NaN or inf; check the checkpoint and the "
                        "input normalisation, then collect the statistics again")
    return features


def _from_counts(num_docs: int, df: torch.Tensor, tf_sum: torch.Tensor, b: float) -> torch.Tensor:
    tf = b * tf_sum / df.clamp_min(1)  # df >= 1 always holds (the max is >= the mean)
    idf = torch.log(num_docs / (df + 1))
    return (tf * idf).float()


def tfidf(features: torch.Tensor, coe: float = 0.0, *, name: str | None = None) -> torch.Tensor:
    """CDP scores of one layer from its ``[C, N]`` matrix (module docstring formula).

    Args:
        features: pooled activations, channels as rows, documents as columns.
        coe: balance coefficient; 0 (or None) means b = 1.
        name: layer name for error messages.

    Returns:
        ``[C]`` float32 scores; higher means more discriminative.

    Raises:
        DataError: the matrix contains NaN or inf (the message names the layer).
    """
    df, tf_sum = document_counts(features, name=name)
    b = balance_factor(features.shape[0], coe, name=name)
    return _from_counts(features.shape[1], df, tf_sum, b)


NORMALIZATIONS = (None, "none", "max", "mean")


def tfidf_scores(stats: Any, coe: float = 0.0, *, normalize: str | None = None,
                 variant: str | None = None) -> dict[str, torch.Tensor]:
    """Scores of every layer in an :class:`~cdprune.importance.stats.ActivationStats`.

    Works for both document modes and for statistics reduced across processes, which give
    the same scores as one process on the same data.

    Args:
        stats: collected statistics.
        coe: balance coefficient (0: b = 1).
        normalize: ``None`` or ``"none"`` (published: raw scores), or divide each
            layer's scores by their ``"max"`` or ``"mean"`` so that layers compare on one
            scale in the global ranking whatever their width and activation level.
        variant: ``"published"`` forces ``normalize=None`` (the published arithmetic).
    """
    if variant not in (None, "published"):
        raise ConfigError(f"variant={variant!r} is not valid; use 'published' or None")
    if variant == "published":
        if normalize not in (None, "none"):
            raise ConfigError(f"variant='published' scores raw (normalize=None), but "
                              f"normalize={normalize!r} was given too; leave out one of them")
        normalize = None
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"normalize={normalize!r} is not valid; use None ('none'), 'max' "
                          "or 'mean'")
    normalize = None if normalize == "none" else normalize
    if stats.layers:  # the narrowest layer bounds coe: refused before any layer is scored
        narrowest = min(stats.layers, key=lambda layer: stats.channels[layer])
        balance_factor(stats.channels[narrowest], coe, name=narrowest)
    if stats.num_samples < FEW_IMAGES:
        logger.warning("CDP scores from only %d image%s are noise more than signal: the "
                       "pruned layers are close to arbitrary; sample more images (a larger "
                       "stop_batch / stats_images)", stats.num_samples, "" if stats.num_samples == 1 else "s")
    scores = {}
    for layer in stats.layers:
        num_docs, df, tf_sum = stats.sufficient(layer)
        if num_docs < 1:
            raise DataError(f"statistics of layer '{layer}' cover no documents; collect the "
                            "statistics again")
        score = _from_counts(num_docs, df, tf_sum,
                             balance_factor(stats.channels[layer], coe, name=layer))
        if normalize is not None:
            scale = score.max() if normalize == "max" else score.mean()
            score = score / scale if scale > 0 else score
        if not bool(torch.isfinite(score).all()):
            raise DataError(f"CDP scores of layer '{layer}' contain NaN or inf (statistics of "
                            f"{num_docs} documents); collect the statistics again")
        scores[layer] = score
    return scores


class CDPImportance(tp.importance.Importance):
    """Torch-Pruning importance that ranks channels by their CDP scores.

    Torch-Pruning prunes *groups*: channels coupled by residual additions, concatenation or
    depthwise convolutions must go together. Each group channel gets the reduction
    (``mean`` by default) of the scores of the conv output channels it contains; group
    members without a score are ignored, and a group with no scored member gets ``None``
    (Torch-Pruning then leaves it alone).

    Args:
        scores: per-conv-output-channel scores keyed by module name (as from
            :func:`tfidf_scores`).
        group_reduction: ``mean``, ``sum``, ``max``, ``min`` or ``first``.
        model: the model the names refer to; optional when groups come from a
            Torch-Pruning dependency graph, which knows its module names.
    """

    def __init__(self, scores: Mapping[str, torch.Tensor], group_reduction: str = "mean",
                 model: nn.Module | None = None):
        if group_reduction not in REDUCTIONS:
            raise ConfigError(f"group_reduction={group_reduction!r} is not valid; use one of "
                              f"{', '.join(REDUCTIONS)}")
        self.scores = {k: torch.as_tensor(v, dtype=torch.float32).flatten()
                       for k, v in scores.items()}
        for name, score in self.scores.items():  # a NaN would rank anywhere, silently
            if not bool(torch.isfinite(score).all()):
                raise DataError(f"scores of layer '{name}' contain NaN or inf; compute them "
                                "again from the statistics")
        self.group_reduction = group_reduction
        self._names = ({m: n for n, m in model.named_modules()} if model is not None else None)

    def _name_of(self, group: Any, module: nn.Module) -> str | None:
        names = self._names
        if names is None:
            names = getattr(getattr(group, "_DG", None), "_module2name", {})
        return names.get(module)

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        width = len(group[0].root_idxs)
        parts: list[tuple[torch.Tensor, list[int]]] = []
        for item in group:
            dep, idxs = item.dep, item.idxs
            # Torch-Pruning hands out bound methods, which compare with ==, never `is`.
            fn = dep.pruning_fn
            if not (fn == tp.prune_conv_out_channels
                    or fn == tp.prune_depthwise_conv_out_channels
                    or fn == tp.prune_linear_out_channels):
                continue
            name = self._name_of(group, dep.target.module)
            score = self.scores.get(name) if name is not None else None
            if score is None:
                continue
            module = dep.target.module
            outputs = module.out_features if isinstance(module, nn.Linear) \
                else module.out_channels
            if score.numel() != outputs:
                raise ConfigError(
                    f"scores of layer '{name}' have {score.numel()} entries but the layer has "
                    f"{outputs} outputs; score the model as it is now (pruned models need new "
                    "statistics)")
            parts.append((score[list(idxs)], list(item.root_idxs)))
        if not parts:
            return None
        return self._reduce(parts, width)

    def _reduce(self, parts: list[tuple[torch.Tensor, list[int]]], width: int) -> torch.Tensor:
        if self.group_reduction == "first":
            out = torch.full((width,), float("nan"))
            values, roots = parts[0]
            out[roots] = values
            return torch.nan_to_num(out, nan=0.0)
        stacked = torch.full((len(parts), width), float("nan"))
        for row, (values, roots) in enumerate(parts):
            stacked[row, roots] = values
        present = ~torch.isnan(stacked)
        filled = torch.nan_to_num(stacked, nan=0.0)
        if self.group_reduction in ("sum", "mean"):
            total = filled.sum(dim=0)
            if self.group_reduction == "mean":
                total = total / present.sum(dim=0).clamp_min(1)
            return total
        fill = float("-inf") if self.group_reduction == "max" else float("inf")
        masked = torch.where(present, stacked, fill)
        out = masked.amax(dim=0) if self.group_reduction == "max" else masked.amin(dim=0)
        return torch.where(present.any(dim=0), out, 0.0)
