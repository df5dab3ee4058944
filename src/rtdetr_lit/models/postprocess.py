"""Turn decoder outputs into scored, labelled, absolute xyxy detections (docs/rtdetrv2.md §8).

No score threshold and no NMS: the top-K (query, class) pairs by sigmoid score are returned, so a
query may appear several times with different labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import box_convert

__all__ = ["RTDETRPostProcessor"]


class RTDETRPostProcessor(nn.Module):
    """Top-K detections per image.

    Args:
        num_classes: number of classes C of ``pred_logits``.
        num_top_queries: K, detections kept per image (capped at Q * C).
        category_ids: optional dataset category id of each contiguous label (length C), e.g. the
            COCO ids; without it labels stay contiguous in [0, C).

    ``forward`` returns one dict per image; after :meth:`deploy` it returns stacked tensors
    ``(labels, boxes, scores)`` instead, which is what an exported graph should output.
    """

    def __init__(
        self,
        num_classes: int = 80,
        num_top_queries: int = 300,
        category_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_top_queries = num_top_queries
        self.deploy_mode = False
        self.category_ids: torch.Tensor | None
        if category_ids is None:
            self.category_ids = None
        else:
            if len(category_ids) != num_classes:
                raise ValueError(f"{len(category_ids)} category ids for {num_classes} classes")
            # not persistent: it comes from the dataset config, not from a checkpoint
            ids = torch.as_tensor(list(category_ids), dtype=torch.int64)
            self.register_buffer("category_ids", ids, persistent=False)

    def deploy(self, enabled: bool = True) -> RTDETRPostProcessor:
        """Switch ``forward`` to the stacked-tensor output (for ONNX/TensorRT export)."""
        self.deploy_mode = enabled
        return self

    def forward(
        self, outputs: dict[str, torch.Tensor], orig_target_sizes: torch.Tensor
    ) -> list[dict[str, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Select detections.

        Args:
            outputs: ``pred_logits`` (B, Q, C) raw logits and ``pred_boxes`` (B, Q, 4) normalised
                cxcywh.
            orig_target_sizes: (B, 2) original image size as (width, height).

        Returns:
            Per image ``{"scores": (K,) float, "labels": (K,) int64, "boxes": (K, 4) absolute
            xyxy}``, sorted by decreasing score; in deploy mode the tuple ``(labels (B, K),
            boxes (B, K, 4), scores (B, K))``.
        """
        labels, boxes, scores = self.topk_detections(
            outputs["pred_logits"], outputs["pred_boxes"], orig_target_sizes
        )
        if self.deploy_mode:
            return labels, boxes, scores
        return [
            {"scores": s, "labels": lb, "boxes": b}
            for s, lb, b in zip(scores, labels, boxes, strict=True)
        ]

    def topk_detections(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, orig_target_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked top-K: labels (B, K) int64, boxes (B, K, 4) absolute xyxy, scores (B, K)."""
        num_classes = self.num_classes
        if pred_logits.shape[-1] != num_classes:
            raise ValueError(f"pred_logits has {pred_logits.shape[-1]} classes, not {num_classes}")
        scores = pred_logits.sigmoid().flatten(1)  # (B, Q*C), index = query * C + class
        k = min(self.num_top_queries, scores.shape[1])
        scores, index = torch.topk(scores, k, dim=-1)
        query = torch.div(index, num_classes, rounding_mode="floor")
        labels = index - query * num_classes
        if self.category_ids is not None:
            labels = self.category_ids[labels]
        scale = orig_target_sizes.to(pred_boxes.dtype).repeat(1, 2).unsqueeze(1)  # (B, 1, 4)
        boxes = box_convert(pred_boxes, "cxcywh", "xyxy") * scale
        boxes = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
        return labels, boxes, scores
