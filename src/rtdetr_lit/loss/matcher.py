"""Hungarian matching of predictions to ground-truth boxes (docs/rtdetrv2.md §7)."""

from __future__ import annotations

import logging

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_convert

from rtdetr_lit.loss.box_ops import pairwise_box_iou

__all__ = ["HungarianMatcher"]

log = logging.getLogger(__name__)

# Stands in for NaN/inf costs: far above any finite cost (those stay below ~100 for boxes in
# [0, 1]), so such a pair is chosen only when nothing else is left, and small enough that
# scipy's float64 sums of a few hundred of them stay exact enough.
NONFINITE_COST = 1e9


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to target boxes, per image, minimising

    ``cost_bbox * L1(cxcywh) + cost_class * focal + cost_giou * (-GIoU(xyxy))``

    where, with ``p`` the sigmoid of the query's logit for the target's class,
    ``focal = alpha * (1-p)^gamma * -log(p + 1e-8) - (1-alpha) * p^gamma * -log(1-p + 1e-8)``.

    The costs of the whole batch are computed in one go in float32 (inputs in bf16/fp16 are cast;
    autocast is switched off), on the predictions' device, and copied to the CPU once per call;
    scipy's ``linear_sum_assignment`` then solves each image.

    Non-finite costs (NaN predictions after an overflow, NaN boxes in the data) would make scipy
    raise. By default they are replaced by a large finite cost and a warning is logged: under fp16
    mixed precision a step with an overflow is expected to produce NaN/inf and be skipped by the
    gradient scaler, and crashing the matcher would defeat that. With ``raise_on_nonfinite=True``
    a ``FloatingPointError`` naming the images is raised instead (useful while debugging).

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs (not all zero).
        alpha, gamma: focal-cost parameters.
        raise_on_nonfinite: raise instead of sanitising non-finite costs.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        raise_on_nonfinite: bool = False,
    ) -> None:
        super().__init__()
        if cost_class == cost_bbox == cost_giou == 0:
            raise ValueError("at least one of cost_class, cost_bbox, cost_giou must be non-zero")
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.raise_on_nonfinite = raise_on_nonfinite

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, alpha={self.alpha}, gamma={self.gamma}"
        )

    @torch.no_grad()
    def cost_matrix(
        self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        """Matching costs of every query against every target box of the same image.

        Args:
            outputs: ``pred_logits`` (B, Q, C) raw logits, ``pred_boxes`` (B, Q, 4) normalised
                cxcywh, any float dtype.
            targets: B dicts with ``labels`` (N_i,) int64 in [0, C) and ``boxes`` (N_i, 4)
                normalised cxcywh.

        Returns:
            float32 (B, Q, max_i N_i) on the predictions' device; column ``j >= N_i`` of image
            ``i`` is padding and meaningless. Needs at least one box in the batch.
        """
        logits = outputs["pred_logits"]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            boxes = outputs["pred_boxes"].float()
            bsz, num_queries = logits.shape[:2]
            # padding boxes (centre 0.5, size 0.5) keep the padding columns finite
            tgt_boxes = pad_sequence(
                [t["boxes"] for t in targets], batch_first=True, padding_value=0.5
            ).to(boxes)
            tgt_labels = pad_sequence([t["labels"] for t in targets], batch_first=True)
            tgt_labels = tgt_labels.to(device=logits.device, dtype=torch.int64)

            index = tgt_labels[:, None, :].expand(bsz, num_queries, -1)
            prob = logits.gather(2, index).sigmoid()  # (B, Q, N)
            pos = self.alpha * (1.0 - prob) ** self.gamma * -(prob + 1e-8).log()
            neg = (1.0 - self.alpha) * prob**self.gamma * -(1.0 - prob + 1e-8).log()
            cost_l1 = torch.cdist(boxes, tgt_boxes, p=1)
            _, giou = pairwise_box_iou(
                box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
            )
            return self.cost_bbox * cost_l1 + self.cost_class * (pos - neg) - self.cost_giou * giou

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's queries to its target boxes.

        Args:
            outputs, targets: as for :meth:`cost_matrix`. ``max N_i = 0`` is allowed.

        Returns:
            One ``(pred_idx, tgt_idx)`` pair per image: int64 CPU tensors of length
            ``min(Q, N_i)``; query ``pred_idx[k]`` is assigned box ``tgt_idx[k]``. Images without
            targets give two empty tensors.
        """
        sizes = [len(t["boxes"]) for t in targets]
        # The indices live on the CPU, where scipy computes them, whatever the predictions' device.
        empty = torch.zeros(0, dtype=torch.int64, device="cpu")
        if max(sizes, default=0) == 0:
            return [(empty, empty) for _ in sizes]
        # the only device-to-host copy (and synchronisation) of the call
        cost = self.cost_matrix(outputs, targets).cpu()
        cost = self._check_finite(cost, sizes)
        cost_np = cost.numpy()
        indices = []
        for i, n in enumerate(sizes):
            if n == 0:
                indices.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(cost_np[i, :, :n])
            indices.append(
                tuple(torch.as_tensor(a, dtype=torch.int64, device="cpu") for a in (rows, cols))
            )
        return indices

    def _check_finite(self, cost: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Replace (or raise on) non-finite entries of the real, unpadded columns of ``cost``."""
        columns = torch.arange(cost.shape[2], device=cost.device)
        real = columns[None, :] < torch.tensor(sizes, device=cost.device)[:, None]  # (B, N)
        bad = ~torch.isfinite(cost) & real[:, None, :]
        if not bad.any():
            return cost
        images = bad.flatten(1).any(1).nonzero().flatten().tolist()
        message = (
            f"{int(bad.sum())} non-finite matching cost(s) in image(s) {images} of the batch: "
            "the predictions or the target boxes contain NaN/inf"
        )
        if self.raise_on_nonfinite:
            raise FloatingPointError(message)
        log.warning("%s; replaced by %g", message, NONFINITE_COST)
        return cost.masked_fill(bad, NONFINITE_COST)
