"""Contrastive denoising queries for training (docs/rtdetrv2.md §6).

Noised copies of the ground-truth boxes are fed to the decoder next to the matching queries. Each
group holds ``m`` positive queries (small noise, trained to reconstruct the box) followed by ``m``
negative queries (larger noise, trained as "no object"), ``m`` being the largest number of boxes
of an image in the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torchvision.ops import box_convert

from rtdetr_lit.models.common import inverse_sigmoid

__all__ = ["DenoisingGroup", "get_contrastive_denoising_training_group"]


class DenoisingGroup(NamedTuple):
    """Decoder inputs for the denoising queries (they come first, before the matching queries).

    Attributes:
        query_content: (B, Ndn, C) content embeddings of the (noised) labels.
        ref_logits: (B, Ndn, 4) inverse-sigmoid of the noised normalised cxcywh boxes.
        attn_mask: (Ndn + Q, Ndn + Q) bool self-attention mask, True = may not attend.
        meta: ``dn_positive_idx`` (list of B int64 tensors: indices of each image's positive
            queries among the Ndn, group-major, so entry ``g * n_i + j`` is box ``j`` of group
            ``g``), ``dn_num_group`` (int G), ``dn_num_split`` ([Ndn, Q]).
    """

    query_content: torch.Tensor
    ref_logits: torch.Tensor
    attn_mask: torch.Tensor
    meta: dict


def get_contrastive_denoising_training_group(
    targets: list[dict[str, torch.Tensor]],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> DenoisingGroup | None:
    """Build the denoising queries, their attention mask and the metadata the loss needs.

    Random numbers come from the global generator of the boxes' device in a fixed order (label
    noise mask, new labels, box-noise signs, box-noise magnitudes), so a seeded run reproduces the
    reference and HF ``RTDetrV2`` exactly.

    A batch without any box still gets a valid, tiny denoising part: one group of one positive and
    one negative query per image, all padding (no-object class, zero box), and empty
    ``dn_positive_idx``. That way every DDP rank runs the same modules whatever its data.

    Args:
        targets: per image ``labels`` (n_i,) int64 contiguous class ids and ``boxes`` (n_i, 4)
            normalised cxcywh.
        num_classes: number of classes; ``num_classes`` itself is the padding (no-object) id.
        num_queries: Q, number of matching queries after the denoising ones.
        class_embed: Embedding(num_classes + 1, C) with ``padding_idx = num_classes``.
        num_denoising: target total of denoising queries (each group has 2m of them).
        label_noise_ratio: a real label is resampled with probability ``label_noise_ratio / 2``.
        box_noise_scale: box noise relative to half the box size.

    Returns:
        A :class:`DenoisingGroup`, or None when ``num_denoising <= 0``.
    """
    if num_denoising <= 0:
        return None
    counts = [len(t["labels"]) for t in targets]
    device = targets[0]["boxes"].device
    bsz = len(targets)
    max_gt = max(counts)
    # empty batch: one padded slot per image and a single group (see docstring)
    slots = max(max_gt, 1)
    groups = max(1, num_denoising // max_gt) if max_gt > 0 else 1
    num_dn = 2 * slots * groups

    labels = torch.full((bsz, slots), num_classes, dtype=torch.int64, device=device)
    boxes = torch.zeros(bsz, slots, 4, device=device)
    real = torch.zeros(bsz, slots, dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(targets, counts, strict=True)):
        labels[i, :n] = t["labels"]
        boxes[i, :n] = t["boxes"].to(boxes.dtype)
        real[i, :n] = True
    # layout along the query axis: group g = [m positives, m negatives], groups one after another
    labels = labels.repeat(1, 2 * groups)
    boxes = boxes.repeat(1, 2 * groups, 1)
    real = real.repeat(1, 2 * groups)
    negative = (torch.arange(num_dn, device=device) % (2 * slots) >= slots).to(boxes.dtype)
    negative = negative[None, :, None]  # (1, Ndn, 1)

    if label_noise_ratio > 0:
        resample = torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5
        new_labels = torch.randint(0, num_classes, labels.shape, dtype=labels.dtype, device=device)
        labels = torch.where(resample & real, new_labels, labels)

    if box_noise_scale > 0:
        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        diff = boxes[..., 2:].repeat(1, 1, 2) * 0.5 * box_noise_scale
        sign = torch.randint(0, 2, boxes.shape, device=device).to(boxes.dtype) * 2.0 - 1.0
        magnitude = torch.rand(boxes.shape, device=device) + negative  # [0,1) pos, [1,2) neg
        xyxy = (xyxy + sign * magnitude * diff).clamp(0.0, 1.0)
        boxes = box_convert(xyxy, "xyxy", "cxcywh")

    positive_idx = [
        (torch.arange(groups, device=device)[:, None] * 2 * slots + torch.arange(n, device=device))
        .flatten()
        .to(torch.int64)
        for n in counts
    ]
    meta = {
        "dn_positive_idx": positive_idx,
        "dn_num_group": groups,
        "dn_num_split": [num_dn, num_queries],
    }
    return DenoisingGroup(
        query_content=class_embed(labels),
        ref_logits=inverse_sigmoid(boxes),
        attn_mask=_denoising_attn_mask(num_dn, num_queries, 2 * slots, device),
        meta=meta,
    )


def _denoising_attn_mask(
    num_dn: int, num_queries: int, group_size: int, device: torch.device
) -> torch.Tensor:
    """(Ndn + Q, Ndn + Q) bool, True = blocked.

    Matching queries cannot see any denoising query (they would learn from leaked ground truth);
    a denoising group sees itself and the matching queries, never another group.
    """
    size = num_dn + num_queries
    group = torch.arange(size, device=device) // group_size
    is_dn = torch.arange(size, device=device) < num_dn
    # block key k for query q when k is a denoising query of a different group (for a matching
    # query every denoising key is "another group", since its group id is beyond the dn range)
    return is_dn[None, :] & (group[:, None] != group[None, :])
