"""A plain registry of model builders, looked up by name.

Every architecture in the zoo registers a builder function under a short name together
with a :class:`ModelSpec` (input size, default number of classes, family), so the CLI and
the pipeline can build a model and an example input from a config string alone. Names of
the form ``torchvision:NAME``, ``timm:NAME`` and ``yolo:CONFIG.yaml`` (ultralytics) are
resolved through those packages when they are installed; they are never imported unless
asked for.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from ..errors import ConfigError
from ..suggest import did_you_mean

__all__ = ["ModelSpec", "create_model", "list_models", "model_spec", "register_model"]

logger = logging.getLogger(__name__)

Builder = Callable[..., nn.Module]
B = TypeVar("B", bound=Builder)

EXTERNAL_PREFIXES = ("torchvision", "timm", "yolo")


@dataclass(frozen=True)
class ModelSpec:
    """Static facts about a registered architecture.

    Attributes:
        name: the registry name.
        input_size: one sample's shape ``(C, H, W)`` the model was designed for.
        num_classes: the default number of outputs.
        family: a short tag grouping related architectures, e.g. ``"cifar_resnet_a"``.
    """

    name: str
    input_size: tuple[int, int, int]
    num_classes: int
    family: str


_REGISTRY: dict[str, tuple[ModelSpec, Builder]] = {}


def register_model(name: str, *, input_size: tuple[int, int, int], num_classes: int,
                   family: str) -> Callable[[B], B]:
    """Decorator that registers ``builder(num_classes, **kwargs) -> nn.Module`` as ``name``.

    Raises:
        ValueError: ``name`` is already registered or uses a reserved ``prefix:`` form.
    """
    if name in _REGISTRY:
        raise ValueError(f"model name {name!r} is already registered; pick another name")
    if ":" in name:
        raise ValueError(f"model name {name!r} may not contain ':' (reserved for "
                         f"{', '.join(p + ':NAME' for p in EXTERNAL_PREFIXES)})")
    spec = ModelSpec(name, tuple(input_size), int(num_classes), family)

    def decorate(builder: B) -> B:
        _REGISTRY[name] = (spec, builder)
        return builder

    return decorate


def list_models() -> list[str]:
    """Names of all registered architectures, sorted (external ``prefix:NAME`` not included)."""
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a model name.

    For ``torchvision:NAME`` and ``timm:NAME`` the ImageNet defaults are returned
    (``(3, 224, 224)``, 1000 classes), for ``yolo:CONFIG`` ultralytics' (``(3, 640, 640)``,
    80 classes), without importing the package.

    Raises:
        ConfigError: the name is unknown (the message suggests close matches).
    """
    prefix, external = _split_external(name)
    if prefix == "yolo":  # ultralytics' design size and COCO's classes
        return ModelSpec(name, (3, 640, 640), 80, prefix)
    if prefix is not None:
        return ModelSpec(name, (3, 224, 224), 1000, prefix)
    return _lookup(external)[0]


def create_model(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised model by registry name.

    Args:
        name: a name from :func:`list_models`, ``torchvision:NAME`` / ``timm:NAME``, or
            ``yolo:CONFIG.yaml`` (an ultralytics detection model, see :mod:`.yolo`).
        num_classes: number of outputs; the architecture's default when ``None``.
        **kwargs: extra options of the builder (e.g. ``in_channels`` for the small CNNs).

    Raises:
        ConfigError: unknown name, invalid ``num_classes``, an option the builder does not
            take, or an external package that is not installed.
    """
    if num_classes is not None and (isinstance(num_classes, bool)
                                    or not isinstance(num_classes, int) or num_classes < 1):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    prefix, external = _split_external(name)
    if prefix is not None:
        return _create_external(prefix, external, num_classes, kwargs)
    spec, builder = _lookup(external)
    _check_kwargs(spec.name, builder, kwargs)
    model = builder(num_classes=spec.num_classes if num_classes is None else num_classes,
                    **kwargs)
    logger.debug("created %s (%s)", spec.name, type(model).__name__)
    return model


# --------------------------------------------------------------------------- helpers
def _split_external(name: str) -> tuple[str | None, str]:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"model name must be a non-empty string, got {name!r}; "
                          "see cdprune.models.list_models() or `cdprune models`")
    name = name.strip()
    prefix, sep, rest = name.partition(":")
    if not sep:
        return None, name
    if prefix.lower() not in EXTERNAL_PREFIXES or not rest:
        raise ConfigError(f"unknown model {name!r}: the 'prefix:NAME' form accepts only "
                          f"{', '.join(p + ':NAME' for p in EXTERNAL_PREFIXES)}, "
                          "e.g. torchvision:resnet18 or yolo:yolov8n.yaml")
    return prefix.lower(), rest


def _lookup(name: str) -> tuple[ModelSpec, Builder]:
    # The architecture modules fill the registry when the cdprune.models package is
    # imported, which Python always does before this submodule.
    for candidate in (name, name.lower()):
        if candidate in _REGISTRY:
            return _REGISTRY[candidate]
    hint = did_you_mean(name.lower(), _REGISTRY, n=4, cutoff=0.5, after=" ")
    raise ConfigError(f"unknown model {name!r}; {hint}`cdprune models` (or "
                      "cdprune.models.list_models()) lists the available names, or use "
                      "torchvision:NAME / timm:NAME")


def _check_kwargs(name: str, builder: Builder, kwargs: dict[str, Any]) -> None:
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p in params if p != "num_classes"]
    bad = [k for k in kwargs if k not in valid]
    if bad:
        raise ConfigError(f"model {name!r} does not take option(s) {', '.join(bad)}; "
                          f"valid options: {', '.join(valid) or 'none'}")


def _create_external(package: str, name: str, num_classes: int | None,
                     kwargs: dict[str, Any]) -> nn.Module:
    if package == "yolo":
        if kwargs:
            raise ConfigError(f"model 'yolo:{name}' takes no options besides num_classes, "
                              f"got {', '.join(kwargs)}")
        from .yolo import create_yolo

        return create_yolo(name, num_classes)
    options = dict(kwargs)
    if num_classes is not None:
        options["num_classes"] = num_classes
    try:
        module = importlib.import_module("torchvision.models" if package == "torchvision"
                                         else "timm")
    except ImportError:
        raise ConfigError(f"model '{package}:{name}' needs the {package} package, which is "
                          f"not installed; run `pip install {package}` or pick a built-in "
                          "model from cdprune.models.list_models()") from None
    if package == "torchvision":
        return _create_torchvision(module, name, options)
    try:
        return module.create_model(name, pretrained=False, **options)
    except RuntimeError as exc:  # timm's "Unknown model (NAME)"
        raise ConfigError(f"timm has no model {name!r} ({exc}); list them with "
                          "timm.list_models()") from None


def _create_torchvision(models: Any, name: str, options: dict[str, Any]) -> nn.Module:
    available = list(models.list_models()) if hasattr(models, "list_models") else [
        n for n, f in vars(models).items() if callable(f) and n.islower()
        and not n.startswith("_")]
    if name not in available:
        hint = did_you_mean(name, available, n=4, cutoff=0.5, before=" ")
        raise ConfigError(f"torchvision has no model {name!r};{hint} list them with "
                          "torchvision.models.list_models()")
    if hasattr(models, "get_model_builder"):
        builder = models.get_model_builder(name)
        if "weights_backbone" in inspect.signature(builder).parameters:
            # Detectors and segmenters default to an ImageNet backbone, downloaded on first
            # use: random weights throughout unless asked (load weights with cdprune).
            options.setdefault("weights_backbone", None)
    if hasattr(models, "get_model"):
        return models.get_model(name, weights=None, **options)
    return getattr(models, name)(**options)


def init_weights(model: nn.Module) -> None:
    """The usual initialisation of the zoo: He-normal convs (fan-out), BN weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
