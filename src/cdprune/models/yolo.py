"""Ultralytics YOLO detectors, built from the model configurations ultralytics ships.

``yolo:yolov8n.yaml`` (or ``yolo11n.yaml``, or the path of a configuration of one's own)
builds ultralytics' ``DetectionModel`` with random weights: the whole network, backbone,
neck and Detect head, which prunes like any other (the head's box and class outputs meet
in a concatenation split at fixed sizes, so they stay whole). Nothing is downloaded.

Ultralytics' ``.pt`` checkpoints are pickled Python objects (the whole model class and
its training state), and unpickling runs code from the file: cdprune never does. Convert
one once, where the file is trusted, into a plain state dict, then build the model from
its configuration and load the weights with ``--checkpoint`` (or
:func:`cdprune.checkpoint.read_state_dict`), which reads tensors only.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from ..errors import ConfigError

__all__ = ["CONVERT_HINT", "create_yolo"]

CONVERT_HINT = (
    "python -c \"import torch; from ultralytics import YOLO; "
    "torch.save(YOLO('best.pt').model.float().state_dict(), 'best_state.pt')\"")


def create_yolo(name: str, num_classes: int | None = None) -> nn.Module:
    """An ultralytics detection model from a ``.yaml`` configuration, random weights.

    Args:
        name: a configuration shipped with ultralytics (``yolov8n.yaml``, ``yolo11n.yaml``)
            or the path of one.
        num_classes: classes of the Detect head; the configuration's (80) when None.

    Raises:
        ConfigError: ultralytics is not installed, the name is a pickled ``.pt`` file
            (refused, with the conversion command), not a ``.yaml``, not found, or not a
            detection configuration.
    """
    suffix = Path(name).suffix.lower()
    if suffix in (".pt", ".pth"):
        raise ConfigError(
            f"model 'yolo:{name}': ultralytics .pt files are pickled objects, and loading "
            "one would run code from the file, which cdprune never does. Convert it once, "
            f"where you trust it: {CONVERT_HINT}; then use {{model}} yolo:<its config, e.g. "
            "yolov8n.yaml> with {checkpoint} best_state.pt")
    if suffix not in (".yaml", ".yml"):
        raise ConfigError(f"model 'yolo:{name}' is not a model configuration; give a .yaml "
                          "such as yolo:yolov8n.yaml or yolo:yolo11n.yaml")
    try:
        tasks = importlib.import_module("ultralytics.nn.tasks")
    except ImportError:
        raise ConfigError(f"model 'yolo:{name}' needs the ultralytics package, which is not "
                          "installed; run `pip install cdprune[yolo]` (or "
                          "`pip install ultralytics`)") from None
    try:
        config = tasks.yaml_model_load(name)
    except FileNotFoundError:
        raise ConfigError(f"no YOLO configuration {name!r}, neither a file nor one that "
                          "ultralytics ships (e.g. yolov8n.yaml, yolo11n.yaml)") from None
    task = tasks.guess_model_task(config)
    if task != "detect":
        raise ConfigError(f"'yolo:{name}' is a {task} configuration; cdprune builds YOLO "
                          "detection models (e.g. yolov8n.yaml, yolo11n.yaml)")
    return tasks.DetectionModel(config, nc=num_classes, verbose=False)
