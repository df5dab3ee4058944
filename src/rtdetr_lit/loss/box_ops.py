"""IoU and generalised IoU for the matcher (batched, pairwise) and the losses (matched pairs).

torchvision's ``box_iou``/``generalized_box_iou`` only take 2-D inputs, so the matcher would have
to compare every prediction of the batch with every box of the batch (B-fold wasted work); here
the leading dimensions are batch dimensions. ``generalized_box_iou_loss`` adds an epsilon of 1e-7
to both denominators, which moves small normalised boxes away from the reference values, so the
pairwise-on-matches version is written out too. Both follow the reference formulas exactly for
any box of positive area; degenerate boxes (zero union or zero enclosing area) give 0 instead of
NaN.
"""

from __future__ import annotations

import torch

__all__ = ["matched_box_iou", "pairwise_box_iou"]


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # the clamp only touches a zero denominator, where the numerator is zero too
    return num / den.clamp(min=torch.finfo(den.dtype).tiny)


def _iou_giou(
    b1: torch.Tensor, b2: torch.Tensor, area1: torch.Tensor, area2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and GIoU of broadcast-compatible xyxy boxes ``b1`` and ``b2`` (last dim 4)."""
    inter_wh = torch.minimum(b1[..., 2:], b2[..., 2:]) - torch.maximum(b1[..., :2], b2[..., :2])
    inter = inter_wh.clamp(min=0).prod(-1)
    union = area1 + area2 - inter
    iou = _safe_div(inter, union)
    hull_wh = torch.maximum(b1[..., 2:], b2[..., 2:]) - torch.minimum(b1[..., :2], b2[..., :2])
    hull = hull_wh.clamp(min=0).prod(-1)
    return iou, iou - _safe_div(hull - union, hull)


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_box_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and GIoU between every box of ``boxes1`` and every box of ``boxes2``.

    Args:
        boxes1: (..., N, 4) xyxy.
        boxes2: (..., M, 4) xyxy, same leading (batch) dimensions as ``boxes1``.

    Returns:
        ``iou`` and ``giou``, each (..., N, M), in the inputs' dtype.
    """
    return _iou_giou(
        boxes1[..., :, None, :],
        boxes2[..., None, :, :],
        _area(boxes1)[..., :, None],
        _area(boxes2)[..., None, :],
    )


def matched_box_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and GIoU of corresponding boxes: ``boxes1[k]`` with ``boxes2[k]``.

    Args:
        boxes1, boxes2: (..., 4) xyxy of the same shape.

    Returns:
        ``iou`` and ``giou``, each (...), in the inputs' dtype.
    """
    return _iou_giou(boxes1, boxes2, _area(boxes1), _area(boxes2))
