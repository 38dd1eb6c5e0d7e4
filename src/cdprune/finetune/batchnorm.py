"""BatchNorm recalibration: running statistics that fit the pruned network.

Removing channels changes what every later layer sees, so the running means and variances
BatchNorm learned for the unpruned network no longer describe its inputs; accuracy right
after pruning suffers from that alone. Re-estimating them on a few hundred training images
(forward passes only, no gradient step) separates that effect from the loss of filters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError

__all__ = ["recalibrate_bn"]

logger = logging.getLogger(__name__)


def recalibrate_bn(model: nn.Module, loader: Iterable[Any], num_images: int, *,
                   device: torch.device | str | None = None) -> int:
    """Re-estimate every BatchNorm layer's running mean and variance, in place.

    The statistics are reset and averaged over the first ``num_images`` images of
    ``loader``: a plain average in which every image counts the same (a short last batch
    is not over-weighted), not a moving one. Weights and biases are unchanged; the model
    is left in eval mode.

    Args:
        model: the network (pruned or not).
        loader: batches ``(images, labels)``; un-augmented training images are best.
        num_images: how many images to average over.
        device: where to run; by default the model's device.

    Returns:
        The number of images used (fewer than ``num_images`` if the loader ran out).

    Raises:
        ConfigError: ``num_images`` is not positive.
        DataError: the loader yields no images.
    """
    if not isinstance(num_images, int) or num_images <= 0:
        raise ConfigError(f"num_images must be a positive integer, got {num_images!r}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        logger.info("no BatchNorm layers: nothing to recalibrate")
        return 0
    if device is None:
        device = next(model.parameters()).device
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
    seen = 0
    model.train()
    try:
        with torch.no_grad():
            for images, *_ in loader:
                images = images[: num_images - seen].to(device)
                batch = images.shape[0]
                for m in bns:  # weight each batch by its images: a plain average over images
                    m.momentum = batch / (seen + batch)
                model(images)
                seen += batch
                if seen >= num_images:
                    break
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum
        model.eval()
    if seen == 0:
        raise DataError("BatchNorm recalibration got no images from the loader")
    if seen < num_images:
        logger.warning("BatchNorm recalibration asked for %d images but had only %d",
                       num_images, seen)
    logger.info("re-estimated %d BatchNorm layers on %d images", len(bns), seen)
    return seen
