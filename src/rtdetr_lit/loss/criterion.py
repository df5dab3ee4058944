"""RT-DETRv2 training losses: VFL + L1 + GIoU on every decoder layer, the encoder selection and
the denoising queries (docs/rtdetrv2.md §7)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from rtdetr_lit.loss.box_ops import matched_box_iou
from rtdetr_lit.loss.matcher import HungarianMatcher

__all__ = ["LOSS_NAMES", "RTDETRCriterion"]

LOSS_NAMES = ("loss_vfl", "loss_bbox", "loss_giou")

Indices = list[tuple[torch.Tensor, torch.Tensor]]


class RTDETRCriterion(nn.Module):
    """Weighted loss terms of one training step.

    For each set of predictions (final layer, each earlier layer, the encoder's top-Q selection and
    every layer's denoising queries) the queries are paired with target boxes (Hungarian matching,
    or for denoising the fixed pairing of each group's positive queries with the image's boxes),
    then three losses are computed, each normalised by ``num_boxes`` (total target boxes of the
    global batch, averaged over ranks, at least 1; times the number of denoising groups for the
    denoising terms):

    - ``loss_vfl``: varifocal BCE over all queries and classes. The target is the (detached) IoU of
      a matched query's box with its target box at the target class and 0 elsewhere; the weight is
      ``alpha * sigmoid(logit)^gamma`` (detached) for non-target entries and the IoU target at
      the target entry, so the classification score learns to predict localisation quality.
    - ``loss_bbox``: L1 on normalised cxcywh of the matched pairs.
    - ``loss_giou``: ``1 - GIoU`` on xyxy of the matched pairs.

    Everything runs in float32 with autocast off, whatever the outputs' dtype.

    Args:
        num_classes: C, number of classes (no background logit).
        matcher: the Hungarian matcher.
        weight_dict: weight of each of ``loss_vfl``, ``loss_bbox``, ``loss_giou``.
        alpha, gamma: varifocal weighting of the non-target entries.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Mapping[str, float],
        alpha: float = 0.75,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        weights = {str(k): float(v) for k, v in weight_dict.items()}
        if set(weights) != set(LOSS_NAMES):
            raise ValueError(
                f"weight_dict needs exactly the keys {LOSS_NAMES}, got {sorted(weights)}"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weights
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, weight_dict={self.weight_dict}, "
            f"alpha={self.alpha}, gamma={self.gamma}"
        )

    def forward(
        self, outputs: Mapping, targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Compute every weighted loss term.

        Args:
            outputs: the detector's training output (see ``rtdetr_lit.models.decoder``):
                ``pred_logits`` (B, Q, C), ``pred_boxes`` (B, Q, 4) normalised cxcywh, and
                optionally ``aux_outputs`` (list of such dicts, earlier decoder layers),
                ``enc_outputs`` (list of such dicts), ``dn_outputs`` (list per decoder layer, on
                the denoising queries) with ``dn_meta`` (``dn_positive_idx``: per image int64
                indices ``g * N_i + j`` -> box ``j`` of group ``g``; ``dn_num_group``: G).
            targets: B dicts with ``labels`` (N_i,) int64 in [0, C) and ``boxes`` (N_i, 4)
                normalised cxcywh.

        Returns:
            float32 scalars, each already multiplied by its weight; the training loss is their
            plain sum. Keys: ``loss_vfl``, ``loss_bbox``, ``loss_giou`` for the final layer, the
            same with suffix ``_aux_{i}`` for earlier layer ``i``, ``_enc_{i}`` for the encoder
            selection and ``_dn_{i}`` for layer ``i``'s denoising queries (21 terms for a
            3-layer decoder).
        """
        device = outputs["pred_logits"].device
        with torch.autocast(device_type=device.type, enabled=False):
            targets = [{"labels": t["labels"].long(), "boxes": t["boxes"].float()} for t in targets]
            num_boxes = self._num_boxes(targets, device)
            losses = self._matched_losses(outputs, targets, num_boxes, "")
            for kind in ("aux", "enc"):
                for i, out in enumerate(outputs.get(f"{kind}_outputs", ())):
                    losses.update(self._matched_losses(out, targets, num_boxes, f"_{kind}_{i}"))
            if "dn_outputs" in outputs:
                meta = outputs["dn_meta"]
                indices = _denoising_indices(meta, targets)
                dn_num_boxes = num_boxes * meta["dn_num_group"]
                for i, out in enumerate(outputs["dn_outputs"]):
                    losses.update(self._losses(out, targets, indices, dn_num_boxes, f"_dn_{i}"))
        return losses

    def _matched_losses(
        self, out: Mapping, targets: list[dict], num_boxes: torch.Tensor, suffix: str
    ) -> dict[str, torch.Tensor]:
        return self._losses(out, targets, self.matcher(out, targets), num_boxes, suffix)

    def _losses(
        self,
        out: Mapping,
        targets: list[dict],
        indices: Indices,
        num_boxes: torch.Tensor,
        suffix: str,
    ) -> dict[str, torch.Tensor]:
        """The three weighted terms for one set of predictions and its pairing."""
        logits = out["pred_logits"].float()  # (B, Q, C)
        boxes = out["pred_boxes"].float()
        device = logits.device
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(
            device
        )
        src_idx = torch.cat([src for src, _ in indices]).to(device)
        pairs = list(zip(targets, indices, strict=True))
        tgt_boxes = torch.cat([t["boxes"][j.to(device)] for t, (_, j) in pairs])
        tgt_labels = torch.cat([t["labels"][j.to(device)] for t, (_, j) in pairs])

        src_boxes = boxes[batch_idx, src_idx]  # (M, 4); empty but still in the graph if M = 0
        iou, giou = matched_box_iou(
            box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        losses = {
            "loss_vfl": self._varifocal(logits, batch_idx, src_idx, tgt_labels, iou.detach()),
            "loss_bbox": F.l1_loss(src_boxes, tgt_boxes, reduction="sum"),
            "loss_giou": (1.0 - giou).sum(),
        }
        return {
            name + suffix: value * (self.weight_dict[name] / num_boxes)
            for name, value in losses.items()
        }

    def _varifocal(
        self,
        logits: torch.Tensor,
        batch_idx: torch.Tensor,
        src_idx: torch.Tensor,
        labels: torch.Tensor,
        iou: torch.Tensor,
    ) -> torch.Tensor:
        """Sum over all (B, Q, C) entries of the IoU-targeted, weighted BCE (not normalised)."""
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, src_idx, labels] = 1.0
        score = torch.zeros_like(logits)
        score[batch_idx, src_idx, labels] = iou
        weight = self.alpha * logits.detach().sigmoid() ** self.gamma * (1.0 - onehot) + score
        return F.binary_cross_entropy_with_logits(logits, score, weight=weight, reduction="sum")

    @staticmethod
    def _num_boxes(targets: list[dict], device: torch.device) -> torch.Tensor:
        """Target boxes per rank, averaged over the process group, at least 1 (float32 scalar)."""
        num = torch.tensor(float(sum(len(t["boxes"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num)
            num = num / dist.get_world_size()
        return num.clamp(min=1.0)


def _denoising_indices(meta: Mapping, targets: list[dict]) -> Indices:
    """Fixed pairing of the denoising queries: positive query ``g * N_i + j`` with box ``j``."""
    groups = int(meta["dn_num_group"])
    indices = []
    for i, (pos, t) in enumerate(zip(meta["dn_positive_idx"], targets, strict=True)):
        n = len(t["boxes"])
        if len(pos) != n * groups:
            raise ValueError(
                f"image {i}: dn_meta has {len(pos)} positive denoising queries, expected "
                f"{n} boxes x {groups} groups; were the targets changed after the forward pass?"
            )
        indices.append((pos, torch.arange(n, device=pos.device).repeat(groups)))
    return indices
