"""Two-stage detectors traced at fixed shapes, so that they prune like any network.

A two-stage detector (torchvision's Faster, Mask and Keypoint R-CNN) runs its region
heads on the proposals that survive non-maximum suppression: how many depends on the
image and the weights, and the proposals reach the heads detached from the region
proposal network. Traced through its own forward, the dependency graph misses the RPN
head and ties the FPN's channels to box coordinates. It is traced instead through
:func:`rcnn_fixed_forward`: the transform, the backbone and FPN, the RPN head on every
level, and the box, mask and keypoint heads on a fixed set of regions, returning the
heads' raw outputs (which stay whole). What is left out is what the data decides:
proposal selection, NMS and the post-processing of detections.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..pruning.graph import register_traced_forward

__all__ = ["fixed_regions", "is_two_stage_detector", "rcnn_fixed_forward"]


def is_two_stage_detector(model: nn.Module) -> bool:
    """True for a torchvision-style R-CNN: a transform, a backbone, an RPN and RoI heads."""
    return all(hasattr(model, a) for a in ("transform", "backbone", "rpn", "roi_heads")) \
        and type(model.roi_heads).__name__ == "RoIHeads"


def fixed_regions(height: int, width: int, device: torch.device | None = None
                  ) -> torch.Tensor:
    """Four regions of one image, from the whole image down to a sixteenth of its area,
    so that a multi-scale RoI pooling reads more than one FPN level."""
    h, w = float(height), float(width)
    return torch.tensor([[0, 0, w, h], [0, 0, w / 2, h / 2], [w / 2, h / 2, w, h],
                         [w / 4, h / 4, w / 2, h / 2]], device=device)


def rcnn_fixed_forward(model: nn.Module, images: Any) -> tuple[torch.Tensor, ...]:
    """The layers of a two-stage detector at shapes fixed by the input size.

    Returns the RPN head's objectness and box deltas per level, then the box head's class
    logits and box regression, the mask logits (Mask R-CNN) and the keypoint logits
    (Keypoint R-CNN), all on the regions of :func:`fixed_regions` of every image.
    """
    image_list, _ = model.transform(list(images))
    features = model.backbone(image_list.tensors)
    if isinstance(features, torch.Tensor):
        features = {"0": features}
    objectness, deltas = model.rpn.head(list(features.values()))
    sizes = image_list.image_sizes
    regions = [fixed_regions(h, w, image_list.tensors.device) for h, w in sizes]
    heads = model.roi_heads
    boxes = heads.box_head(heads.box_roi_pool(features, regions, sizes))
    outputs = [*objectness, *deltas, *heads.box_predictor(boxes)]
    if getattr(heads, "mask_roi_pool", None) is not None:
        masks = heads.mask_head(heads.mask_roi_pool(features, regions, sizes))
        outputs.append(heads.mask_predictor(masks))
    if getattr(heads, "keypoint_roi_pool", None) is not None:
        points = heads.keypoint_head(heads.keypoint_roi_pool(features, regions, sizes))
        # the predictor's own output layer (its upsampling after it has no weights)
        outputs.append(heads.keypoint_predictor.kps_score_lowres(points))
    return tuple(outputs)


register_traced_forward(is_two_stage_detector, rcnn_fixed_forward)
