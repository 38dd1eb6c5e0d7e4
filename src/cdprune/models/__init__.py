"""The model zoo: architectures by name, with the input size and classes they expect.

Importing this package registers every built-in architecture; :func:`create_model` builds
one by name, :func:`list_models` lists the names, :func:`model_spec` describes one.
"""

from __future__ import annotations

from . import cifar_resnet, detection, imagenet, small, vgg  # noqa: F401  (they register)
from .registry import ModelSpec, create_model, list_models, model_spec, register_model

__all__ = ["ModelSpec", "create_model", "list_models", "model_spec", "register_model"]
