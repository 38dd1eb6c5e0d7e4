"""Export pruned models to ONNX or TorchScript, verified against PyTorch.

After writing, the exported file is loaded again (onnxruntime on the CPU for ONNX,
``torch.jit.load`` for TorchScript) and its outputs are compared with the PyTorch model's
on random inputs; an export that differs by more than the tolerance is an error, not a
warning. Latency of the exported model can be measured in the same run as the unpruned
model's, which is the speed-up a user will actually see.
"""

from __future__ import annotations

import io
import logging
import os
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_write_bytes
from .errors import CdpruneError, ConfigError

__all__ = ["ExportResult", "export", "export_latency"]

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


class ExportError(CdpruneError, RuntimeError):
    """The exported model does not reproduce the PyTorch model."""


@dataclass
class ExportResult:
    """Where the export went and how closely it matches PyTorch."""

    path: Path
    format: str
    max_abs_diff: float
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format,
                "max_abs_diff": self.max_abs_diff, "size_bytes": self.size_bytes}


def _need_onnx() -> Any:
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs onnx and onnxruntime ({exc.name} is missing); "
                          "install them with `pip install \"cdprune[dev]\"` or "
                          "`pip install onnx onnxruntime onnxscript`") from None
    return onnxruntime


def _onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool
                ) -> bytes:
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["output"],
                              "opset_version": opset}
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    # The TorchScript-based exporter: no extra dependencies, stable for CNNs.
    torch.onnx.export(model, (example,), buf, dynamo=False, **kwargs)
    return buf.getvalue()


def _torchscript_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    traced = torch.jit.trace(model, example, check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    return buf.getvalue()


def _session(path: Path) -> Any:
    ort = _need_onnx()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run_exported(path: Path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    if fmt == "onnx":
        sess = _session(path)
        return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(x)


def export(model: nn.Module, path: str | os.PathLike, *, format: str = "onnx",
           input_size: Sequence[int], opset: int = 17, dynamic_batch: bool = False,
           atol: float = 1e-4, checks: int = 2) -> ExportResult:
    """Write ``model`` as ONNX or TorchScript and check it reproduces PyTorch.

    Args:
        model: any CNN, pruned or not; it is exported in eval mode on the CPU.
        path: output file; written atomically.
        format: ``"onnx"`` or ``"torchscript"``.
        input_size: ``(C, H, W)`` of one input.
        opset: ONNX opset.
        dynamic_batch: let the exported model take any batch size.
        atol: largest allowed absolute difference from PyTorch (float32).
        checks: random batches compared after export.

    Raises:
        ConfigError: unknown format, onnx/onnxruntime missing, or an unwritable path.
        ExportError: the exported model differs from PyTorch by more than ``atol``.
    """
    if format not in FORMATS:
        raise ConfigError(f"export format {format!r} is not supported; use one of "
                          f"{', '.join(FORMATS)}")
    if format == "onnx":
        _need_onnx()
    path = Path(path)
    parent = path.parent
    if parent.exists() and not os.access(parent, os.W_OK) or path.is_dir():
        raise ConfigError(f"cannot write export to '{path}': not a writable file path; "
                          "choose another path")
    model = model.eval().cpu()
    example = torch.randn(1, *input_size)
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.x flags both exporters as deprecated and chatters about constant folding
        # of strided slices; the parity check below is what tells a good export.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        data = (_onnx_bytes(model, example, opset, dynamic_batch) if format == "onnx"
                else _torchscript_bytes(model, example))
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise ConfigError(f"cannot write export to '{path}': {exc.strerror}; choose a "
                          "writable path") from None

    worst = 0.0
    g = torch.Generator().manual_seed(0)
    batch = 2 if dynamic_batch or format == "torchscript" else 1
    for _ in range(checks):
        x = torch.randn(batch, *input_size, generator=g)
        with torch.no_grad():
            expected = model(x)
        got = _run_exported(path, format, x)
        worst = max(worst, float((got - expected).abs().max()))
    if worst > atol:
        raise ExportError(f"exported {format} model '{path}' differs from PyTorch by {worst:.2e}"
                          f" (allowed {atol:.0e}); the export is not faithful")
    logger.info("exported %s to %s (%d bytes, max diff %.2e)", format, path, len(data), worst)
    return ExportResult(path, format, worst, len(data))


def export_latency(path: str | os.PathLike, format: str, input_size: Sequence[int], *,
                   batch_size: int = 1, warmup: int = 5, iters: int = 30,
                   threads: int | None = None) -> float:
    """Median seconds per batch of an exported model on the CPU."""
    path = Path(path)
    x = torch.randn(batch_size, *input_size)
    if format == "onnx":
        ort = _need_onnx()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {"input": x.numpy()}

        def call() -> None:
            sess.run(None, feed)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            loaded = torch.jit.load(str(path), map_location="cpu").eval()

        def call() -> None:
            with torch.no_grad():
                loaded(x)
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
