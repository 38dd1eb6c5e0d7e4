"""The statistics CDP scores: :class:`ActivationStats`, its views and its file.

:func:`~cdprune.importance.stats.collect_stats` fills one; :func:`~cdprune.importance.scoring.tfidf_scores`
reads it. On disk it is one safetensors file with a JSON header; loading checks the
header field by field and that the statistics fit the model they are used with.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write_bytes

__all__ = ["ActivationStats", "DOCUMENTS", "conv_layer_names", "model_fingerprint"]

DOCUMENTS = ("sample", "class")


def conv_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers whose outputs are scored, in definition order: every
    ``nn.Conv2d``, and in a transformer the hidden layer of every MLP block
    (:func:`mlp_hidden_layers`)."""
    hidden = set(mlp_hidden_layers(model))
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) or name in hidden]


def attention_modules(model: nn.Module) -> list[str]:
    """Type names of the attention layers of ``model`` (a transformer's blocks), sorted."""
    return sorted({type(m).__name__ for m in model.modules()
                   if isinstance(m, nn.MultiheadAttention)
                   or "Attention" in type(m).__name__})  # ShiftedWindowAttentionV2 too


def mlp_hidden_layers(model: nn.Module) -> list[str]:
    """In a transformer (a model with attention layers), the first ``nn.Linear`` of every
    MLP block (timm's ``Mlp``, torchvision's ``MLPBlock``/``MLP``): its outputs are the
    block's hidden units, which only the block's second linear layer reads, so removing
    one is exact. Empty for a model without attention: a CNN's MLP (ConvNeXt's) stays
    as it was scored before (its convolutions only)."""
    if not attention_modules(model):
        return []
    out = []
    for name, block in model.named_modules():
        if not name or "mlp" not in type(block).__name__.lower() or attention_modules(block):
            continue  # the model itself, or a larger block that holds attention
        linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        if len(linears) >= 2:  # hidden = first's outputs = second's inputs
            out.append(f"{name}.{linears[0]}")
    return out


def layer_width(module: nn.Module) -> int:
    """Output channels of a scored layer (a convolution's filters, a linear layer's units)."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's parameter and buffer names and shapes.

    Two models share a fingerprint exactly when their state dicts have the same layout,
    which is what makes statistics collected on one valid for the other.
    """
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)};".encode())
    return h.hexdigest()[:16]



@dataclass
class ActivationStats:
    """Statistics of the scored layers, ready for TF-IDF scoring and saving.

    Attributes:
        documents: ``"sample"`` or ``"class"``.
        layers: scored layer names, in model order.
        channels: channel count of each layer.
        num_samples: images seen (over all ranks).
        features: sample mode collected with ``keep_features=True`` on one process (or a
            file written before the streamed form): ``[num_samples, sum(channels)]``
            pooled values, layer blocks side by side in ``layers`` order. ``None``
            otherwise.
        class_sums: class mode: ``[num_classes, sum(channels)]`` float64 sums.
        class_counts: class mode: ``[num_classes]`` images per class.
        reduced: sample mode otherwise: per layer ``(df, tf_sum)`` already aggregated
            over all documents (and ranks), all the scores need (see :meth:`sufficient`);
            a few kilobytes whatever the number of images.
        fingerprint: :func:`model_fingerprint` of the model the statistics came from.
        meta: free-form facts (model name, sampled images, versions).
    """

    documents: str
    layers: list[str]
    channels: dict[str, int]
    num_samples: int
    features: torch.Tensor | None = None
    class_sums: torch.Tensor | None = None
    class_counts: torch.Tensor | None = None
    reduced: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ views
    def _offsets(self) -> dict[str, tuple[int, int]]:
        out, start = {}, 0
        for name in self.layers:
            out[name] = (start, start + self.channels[name])
            start += self.channels[name]
        return out

    def matrix(self, layer: str) -> torch.Tensor:
        """The ``[channels, documents]`` matrix F of one layer (float32).

        Sample mode: one column per image. Class mode: one column per class that occurs,
        holding the mean pooled vector of its images.

        Raises:
            ConfigError: unknown layer, or statistics already reduced across ranks.
        """
        if layer not in self.channels:
            raise ConfigError(f"no statistics for layer '{layer}'; available: "
                              f"{', '.join(self.layers[:8])}{' ...' if len(self.layers) > 8 else ''}")
        lo, hi = self._offsets()[layer]
        if self.documents == "class":
            present = self.class_counts > 0
            means = self.class_sums[present, lo:hi] / self.class_counts[present, None]
            return means.T.float()
        if self.features is None:
            raise ConfigError(
                "per-sample features were reduced to what the scores need and are not kept; "
                "use sufficient() or tfidf_scores(), which work on the reduced form, or "
                "collect with keep_features=True")
        return self.features[:, lo:hi].T.float()

    def num_documents(self) -> int:
        """Number of documents N in the TF-IDF (images, or classes that occur)."""
        if self.documents == "class":
            return int((self.class_counts > 0).sum())
        return self.num_samples

    def sufficient(self, layer: str) -> tuple[int, torch.Tensor, torch.Tensor]:
        """``(N, df, tf_sum)`` for one layer: all TF-IDF needs, in float64.

        ``df[j]`` counts documents where channel j is at or above its mean over documents;
        ``tf_sum[j]`` sums, over those documents, channel j's share of the document's total
        activation. The score is then ``b * tf_sum / df * ln(N / (df + 1))``. Both are plain
        sums over documents, which is what makes the distributed reduction exact.
        """
        if self.reduced is not None and layer in self.reduced:
            df, tf_sum = self.reduced[layer]
            return self.num_documents(), df, tf_sum
        from .scoring import document_counts  # local: scoring imports this module

        return (self.num_documents(), *document_counts(self.matrix(layer), name=layer))

    # ------------------------------------------------------------------ checks
    def check_compatible(self, model: nn.Module) -> None:
        """Raise if these statistics were not collected on a model of this architecture."""
        fp = model_fingerprint(model)
        if self.fingerprint and fp != self.fingerprint:
            raise CheckpointError(
                f"statistics come from a different architecture (fingerprint {self.fingerprint}"
                f", model {self.meta.get('model', '?')}) than the model given (fingerprint {fp})"
                "; collect statistics again with this model, or pass the model they came from")
        names = dict(model.named_modules())
        for layer in self.layers:
            mod = names.get(layer)
            if not isinstance(mod, (nn.Conv2d, nn.Linear)) \
                    or layer_width(mod) != self.channels[layer]:
                raise CheckpointError(
                    f"statistics layer '{layer}' ({self.channels[layer]} channels) does not "
                    "match the model; collect statistics again with this model")

    # ------------------------------------------------------------------ saving
    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics atomically as safetensors with JSON metadata."""
        from safetensors.torch import save

        from ..version import __version__

        tensors: dict[str, torch.Tensor] = {}
        if self.features is not None:
            tensors["features"] = self.features.contiguous()
        if self.class_sums is not None:
            tensors["class_sums"] = self.class_sums.contiguous()
            tensors["class_counts"] = self.class_counts.contiguous()
        for name, (df, tf_sum) in (self.reduced or {}).items():
            tensors[f"reduced.df.{name}"] = df.contiguous()
            tensors[f"reduced.tf_sum.{name}"] = tf_sum.contiguous()
        header = {
            "format": "cdprune.stats/1",
            "documents": self.documents,
            "layers": self.layers,
            "channels": [self.channels[n] for n in self.layers],
            "num_samples": self.num_samples,
            "fingerprint": self.fingerprint,
            "cdprune_version": __version__,
            "meta": self.meta,
        }
        data = save(tensors, metadata={"cdprune": json.dumps(header)})
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> ActivationStats:
        """Read statistics written by :meth:`save`; with ``model``, check they belong to it.

        Raises:
            FileNotFoundError: no such file.
            CheckpointError: not a cdprune statistics file, corrupt, or from another model.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file '{path}' does not exist; run "
                                    "`cdprune stats` first or check the path")
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = json.loads((fh.metadata() or {}).get("cdprune", "null"))
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read statistics file '{path}': truncated or not a "
                                  f"statistics file ({str(exc)[:160]}); collect the "
                                  "statistics again with `cdprune stats`") from None
        if not isinstance(header, dict) or header.get("format") != "cdprune.stats/1":
            raise CheckpointError(f"'{path}' is not a cdprune statistics file (no "
                                  "'cdprune.stats/1' header); create one with `cdprune stats`")
        _check_header(header, tensors, path)
        layers = list(header["layers"])
        reduced = {}
        for name in layers:
            if f"reduced.df.{name}" in tensors:
                reduced[name] = (tensors[f"reduced.df.{name}"], tensors[f"reduced.tf_sum.{name}"])
        stats = cls(
            documents=header["documents"], layers=layers,
            channels=dict(zip(layers, header["channels"])),
            num_samples=int(header["num_samples"]), features=tensors.get("features"),
            class_sums=tensors.get("class_sums"), class_counts=tensors.get("class_counts"),
            reduced=reduced or None, fingerprint=header.get("fingerprint", ""),
            meta=header.get("meta", {}))
        stats._validate(path)
        if model is not None:
            stats.check_compatible(model)
        return stats

    def _validate(self, path: Path) -> None:
        total = sum(self.channels.values())
        ok = self.documents in DOCUMENTS
        if self.documents == "sample" and self.reduced is None:
            ok = ok and self.features is not None and tuple(self.features.shape) == (
                self.num_samples, total)
        if self.documents == "sample" and self.reduced is not None:
            ok = ok and set(self.reduced) == set(self.layers) and all(
                tuple(df.shape) == tuple(tf.shape) == (self.channels[name],)
                for name, (df, tf) in self.reduced.items())
        if self.documents == "class":
            counts = self.class_counts
            ok = (ok and self.class_sums is not None and counts is not None
                  and self.class_sums.dim() == 2 and counts.dim() == 1
                  and self.class_sums.shape == (counts.shape[0], total)
                  and bool(torch.isfinite(counts).all()) and bool((counts >= 0).all())
                  and bool((counts == counts.round()).all()) and bool((counts > 0).any()))
        if not ok:
            raise CheckpointError(f"statistics file '{path}' is inconsistent (tensor shapes do "
                                  "not match its header); collect the statistics again")
        values = [self.features, self.class_sums,
                  *(t for pair in (self.reduced or {}).values() for t in pair)]
        for tensor in values:
            if tensor is not None and tensor.is_floating_point() \
                    and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"statistics file '{path}' holds NaN or infinite "
                                      "values; collect the statistics again")
        if self.reduced is not None and any(bool((df < 0).any()) or bool((df > self.num_samples
                                            ).any()) for df, _ in self.reduced.values()):
            raise CheckpointError(f"statistics file '{path}' is inconsistent (document counts "
                                  "outside 0..num_samples); collect the statistics again")


def _check_header(header: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every field of a statistics header has its type: refuse the file otherwise."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"statistics file '{path}' is malformed ({what}); collect the "
                               "statistics again with `cdprune stats`")

    layers, channels = header.get("layers"), header.get("channels")
    if not isinstance(layers, list) or not layers or \
            not all(isinstance(n, str) and n for n in layers):
        raise bad("'layers' must be a non-empty list of layer names")
    if len(set(layers)) != len(layers):
        raise bad("'layers' names a layer twice")
    if not isinstance(channels, list) or len(channels) != len(layers) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
        raise bad("'channels' must list one positive channel count per layer")
    n = header.get("num_samples")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise bad(f"'num_samples' must be a positive integer, got {n!r}")
    if header.get("documents") not in DOCUMENTS:
        raise bad(f"'documents' must be one of {', '.join(DOCUMENTS)}")
    if not isinstance(header.get("fingerprint", ""), str) or \
            not isinstance(header.get("meta", {}), dict):
        raise bad("'fingerprint' must be a string and 'meta' a mapping")

