"""Export pruned models to ONNX or TorchScript, verified against PyTorch.

After writing, the exported file is loaded again (onnxruntime on the CPU for ONNX,
``torch.jit.load`` for TorchScript) and its outputs are compared with the PyTorch model's
on random inputs; an export that differs by more than the tolerance is an error, not a
warning. The check runs on the exported bytes before they are written, so a failed export
leaves no file. Latency of several exported models is measured side by side, with the same
threads, interleaved, as medians (:func:`compare_latency`).
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CdpruneError, ConfigError
from .fileio import atomic_write_bytes, atomic_write_text
from .measure.latency import time_calls
from .options import OptionError, OptionsError, option
from .runs.files import COMPACT, PLAN
from .runs.rundir import adopt_writes

__all__ = ["ExportConfig", "ExportError", "ExportResult", "check_output", "compare_latency",
           "export", "export_latency", "export_model_dir"]

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


@dataclass
class ExportConfig:
    """Options of the export stage (:func:`export_model_dir`)."""

    format: str = option("onnx", "file format", choices=FORMATS)
    opset: int = option(17, "ONNX opset")
    dynamic_batch: bool = option(False, "exported model accepts any batch size (the default)")
    static_batch: bool = option(False, "exported ONNX model accepts batch size 1 only")
    output: str | None = option(None, "output file (default: model.onnx or model.pt next to "
                                "the weights exported)")
    no_latency: bool = option(False, "skip the latency comparison with the unpruned "
                              "architecture")

    def validate(self) -> None:
        """Check the format and the opset (the output path is checked where it is used)."""
        if self.format not in FORMATS:
            raise ConfigError(f"format={self.format!r} is not valid; use one of "
                              f"{', '.join(FORMATS)}")
        low, high = onnx_opsets()
        if self.format == "onnx" and not (isinstance(self.opset, int)
                                          and low <= self.opset <= high):
            raise OptionError("opset", self.opset, f"an ONNX opset from {low} to {high} (the "
                              "range this PyTorch exports), e.g. 17")


def onnx_opsets() -> tuple[int, int]:
    """The lowest and highest ONNX opset this PyTorch's TorchScript-based exporter writes."""
    try:  # not public API: fall back to the range every supported PyTorch exports
        from torch.onnx import _constants

        return int(_constants.ONNX_MIN_OPSET), int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError, TypeError, ValueError):
        return 9, 20


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
    """onnxruntime, after checking that the exporter's onnx package imports too."""
    try:
        importlib.import_module("onnx")  # the exporter needs it; nothing here uses it
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


def _session(model: bytes | str, threads: int | None = None) -> Any:
    ort = _need_onnx()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _load_torchscript(data: bytes | str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        return torch.jit.load(source, map_location="cpu").eval()


def _runner(data: bytes | str, fmt: str, threads: int | None = None
            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the exported model (file path or bytes) on a CPU batch."""
    if fmt == "onnx":
        sess = _session(data, threads)
        return lambda x: torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    loaded = _load_torchscript(data)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return loaded(x)
    return run


# Weights files an export must never replace (``--output best.pth`` is a slip, not a wish).
_CHECKPOINT_SUFFIXES = (".pth", ".th", ".tar", ".safetensors", ".ckpt", ".bin", ".npz")


def check_output(path: str | os.PathLike, format: str) -> Path:
    """Refuse an export path that is a directory, a weights file, or not of ``format``.

    Raises:
        ConfigError: naming the path and a valid choice.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in _CHECKPOINT_SUFFIXES:
        raise OptionsError("{output} " + (f"'{path}' is a weights file name ({suffix}); "
                           "an export never replaces checkpoints: choose a name ending in "
                           f"{SUFFIX[format]}"))
    if format == "onnx" and suffix != ".onnx":
        raise OptionsError("{output} " + (f"'{path}'") + " does not end in .onnx; "
                           "choose a name ending in .onnx for {format} onnx")
    if path.is_dir():
        raise ConfigError(f"cannot write export to '{path}': it is a directory; choose a file "
                          "path")
    if format == "torchscript" and path.is_file() and not _is_torchscript(path):
        raise OptionsError("{output} " + (f"'{path}'") + " exists and is not a "
                           "TorchScript model (a checkpoint?); it is not replaced: choose "
                           "another {output}")
    return path


def _is_torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return any("/code/" in name for name in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def export(model: nn.Module, path: str | os.PathLike, *, format: str = "onnx",
           input_size: Sequence[int], opset: int = 17, dynamic_batch: bool = True,
           atol: float = 1e-4, checks: int = 2) -> ExportResult:
    """Write ``model`` as ONNX or TorchScript and check it reproduces PyTorch.

    The exported bytes are loaded and compared with ``model``'s own outputs on random
    batches *before* anything is written, so a failed check leaves no file behind.

    Args:
        model: any CNN, pruned or not; it is exported in eval mode on the CPU.
        path: output file; written atomically. Weights files (``.pth``,
            ``.safetensors``...) are never replaced.
        format: ``"onnx"`` or ``"torchscript"``.
        input_size: ``(C, H, W)`` of one input.
        opset: ONNX opset.
        dynamic_batch: let the exported ONNX model take any batch size (default); a
            TorchScript trace always does for these models.
        atol: largest allowed difference from PyTorch (float32): absolute for outputs up
            to 1 in magnitude, relative to the largest output beyond that.
        checks: random batches compared before writing (0: no check).

    Raises:
        ConfigError: unknown format, onnx/onnxruntime missing, or an unwritable path.
        ExportError: the exported model differs from PyTorch by more than ``atol``.
    """
    if format not in FORMATS:
        raise ConfigError(f"export format {format!r} is not supported; use one of "
                          f"{', '.join(FORMATS)}")
    if format == "onnx":
        _need_onnx()
    path = check_output(path, format)
    parent = next((p for p in (path.parent, *path.parents) if p.exists()), path.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK):
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

    worst, scale = 0.0, 1.0
    g = torch.Generator().manual_seed(0)
    batch = 2 if dynamic_batch or format == "torchscript" else 1
    run = _runner(data, format) if checks else None
    for _ in range(checks):
        x = torch.randn(batch, *input_size, generator=g)
        with torch.no_grad():
            expected = model(x)
        worst = max(worst, float((run(x) - expected).abs().max()))
        scale = max(scale, float(expected.abs().max()))
    # float32 rounding grows with the outputs: logits in the thousands (random weights,
    # no final norm) differ by 1e-4 in any correct export, so beyond 1 the bound is relative.
    if worst > atol * scale:
        raise ExportError(f"the {format} export of the model differs from its PyTorch outputs "
                          f"by {worst:.2e} (allowed {atol:.0e}"
                          + (f" x {scale:.3g}, its largest output" if scale > 1 else "")
                          + f"); nothing was written to '{path}'. Try another opset or "
                          "the torchscript format")
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise ConfigError(f"cannot write export to '{path}': {exc.strerror}; choose a "
                          "writable path") from None
    logger.info("exported %s to %s (%d bytes, max diff %.2e)", format, path, len(data), worst)
    return ExportResult(path, format, worst, len(data))


def export_latency(path: str | os.PathLike, format: str, input_size: Sequence[int], *,
                   batch_size: int = 1, warmup: int = 5, iters: int = 30,
                   threads: int | None = None) -> float:
    """Median seconds per batch of one exported model on the CPU."""
    return compare_latency({"model": path}, format, input_size, batch_size=batch_size,
                           warmup=warmup, repeats=iters, threads=threads)["model"]


def compare_latency(paths: Mapping[str, str | os.PathLike], format: str,
                    input_size: Sequence[int], *, batch_size: int = 1, warmup: int = 10,
                    repeats: int = 50, threads: int | None = None) -> dict[str, float]:
    """Median seconds per batch of several exported models, measured side by side.

    Every model runs with the same number of threads (``threads``, default
    ``torch.get_num_threads()``) on the same input; after ``warmup`` calls each, the
    ``repeats`` timed calls are interleaved (A, B, A, B, ...) so that a slower or busier
    moment of the machine affects all models alike. Returns the median per model.
    """
    threads = threads or torch.get_num_threads()
    x = torch.randn(batch_size, *input_size)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)  # TorchScript runs on torch's intra-op pool
    try:
        runners = {name: _runner(str(p), format, threads) for name, p in paths.items()}
        times = time_calls([lambda run=run: run(x) for run in runners.values()],
                           warmup=warmup, repeats=repeats)
    finally:
        torch.set_num_threads(saved)
    return {name: statistics.median(t) for name, t in zip(runners, times)}


def export_model_dir(model_dir: str | os.PathLike, config: ExportConfig | None = None, *,
                     weights: str = "final", checkpoint: str | os.PathLike | None = None,
                     warmup: int = 10, repeats: int = 50) -> dict[str, Any]:
    """Export the model of a run or pruned-model directory, verified, and time it.

    The exported file goes to ``config.output``, else next to the weights exported; a
    record ``export_<format>.json`` beside it is written once the export is verified and
    completed with the latency comparison (the unpruned architecture exported the same
    way, both timed side by side on the CPU) unless ``config.no_latency``.

    Args:
        model_dir: a run directory, a fine-tune directory or a pruned-model directory.
        config: the export options (default: ONNX, opset 17, any batch size).
        weights: which weights of ``model_dir`` (see :func:`cdprune.find_run_model`).
        checkpoint: weights of the pruned model to export instead of the directory's own.
        warmup: untimed runs of each model before timing.
        repeats: timed, interleaved runs of each model.

    Returns:
        The record: :class:`ExportResult`'s fields, the weights used and, unless skipped,
        ``latency_base_ms``, ``latency_pruned_ms``, ``speedup`` and how they were measured;
        also ``base_model``, the zoo name of the unpruned architecture.

    Raises:
        ConfigError: a user model (no zoo name) or a bad output path.
        ExportError: the exported model does not reproduce the PyTorch outputs.
    """
    from .runs.modeldir import load_model_dir

    config = config or ExportConfig()
    config.validate()
    model, plan, found = load_model_dir(model_dir, {"checkpoint": checkpoint, "model": None},
                                        None, weights)
    name = plan.get("zoo_model")
    if not name or not plan.get("input_size"):
        raise ConfigError(f"'{found.pruned_dir}' holds a user model; export it from Python "
                          "with cdprune.export.export(model, path, input_size=...)")
    if plan.get("masked"):  # the published network: deploy its compact form, never the masks
        model, plan, found = _compact_of_masked(model, plan, found, checkpoint)
    folder = found.weights.parent if found.kind in ("best", "last") else found.pruned_dir
    out = check_output(config.output or folder / f"model{SUFFIX[config.format]}", config.format)
    with adopt_writes(out.parent):  # inside a run directory: listed in its run.json
        return _export_and_time(model, plan, found, config, out, warmup, repeats)


def _compact_of_masked(model: nn.Module, plan: Mapping[str, Any], found: Any,
                       checkpoint: str | os.PathLike | None) -> tuple[nn.Module, Any, Any]:
    """A masked network's deployable form: the run's ``compact/`` network when it was made
    from these very weights (a masked run's final model), else compacted here."""
    from .pruning import compact
    from .runs.modeldir import load_model_dir

    saved = found.pruned_dir.parent / COMPACT
    if found.kind == "last" and checkpoint is None and (saved / PLAN).is_file():
        logger.info("exporting the run's compact network (%s) instead of its masks", saved)
        return load_model_dir(saved, {"checkpoint": None, "model": None}, None, "pruned")
    small, info = compact(model.eval(), plan["masked"], input_size=plan["input_size"])
    logger.warning("exporting the compact network of the masked model, compacted now "
                   "without BatchNorm recalibration (largest output difference %.2e); "
                   "`cdprune compact` makes a recalibrated one", info.max_abs_error)
    return small, plan, found


def _export_and_time(model: nn.Module, plan: Mapping[str, Any], found: Any,
                     config: ExportConfig, out: Path, warmup: int, repeats: int
                     ) -> dict[str, Any]:
    import json
    import tempfile

    from .models import create_model

    name = plan["zoo_model"]
    num_classes = (plan.get("extra") or {}).get("num_classes")
    fmt, suffix = config.format, SUFFIX[config.format]
    size = tuple(plan["input_size"])
    dynamic = not config.static_batch
    result = export(model, out, format=fmt, input_size=size, opset=config.opset,
                    dynamic_batch=dynamic)
    summary = {**result.to_dict(), "weights": found.kind, "weights_file": str(found.weights),
               "dynamic_batch": dynamic or fmt == "torchscript"}
    record = out.parent / f"export_{fmt}.json"  # written now, completed after the timing
    atomic_write_text(record, json.dumps(summary, indent=1) + "\n")
    logger.info("exported %s, verified against its PyTorch outputs", out)
    if config.no_latency:
        return {**summary, "base_model": name}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        # The unpruned architecture, exported the same way; latency does not depend on the
        # weight values, so its initial weights serve (no verification needed).
        base = export(create_model(name, num_classes=num_classes).eval(),
                      Path(tmp) / f"base{suffix}", format=fmt, input_size=size,
                      opset=config.opset, dynamic_batch=dynamic, checks=0)
        lat = compare_latency({"base": base.path, "pruned": result.path}, fmt, size,
                              warmup=warmup, repeats=repeats, threads=threads)
    summary.update(base_size_bytes=base.size_bytes,
                   latency_base_ms=round(1e3 * lat["base"], 3),
                   latency_pruned_ms=round(1e3 * lat["pruned"], 3),
                   speedup=round(lat["base"] / lat["pruned"], 3),
                   latency_method=f"batch 1, CPU, {threads} threads for both, median of "
                   f"{repeats} interleaved runs after {warmup} warm-up runs")
    atomic_write_text(record, json.dumps(summary, indent=1) + "\n")
    return {**summary, "base_model": name}

