"""Contrastive denoising group: layout, mask, noise bounds, padding, empty batches, HF parity."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn
from torchvision.ops import box_convert

from rtdetr_lit.models.denoising import get_contrastive_denoising_training_group

NUM_CLASSES = 5


def _embed() -> nn.Embedding:
    torch.manual_seed(0)
    emb = nn.Embedding(NUM_CLASSES + 1, 8, padding_idx=NUM_CLASSES)
    return emb


def _targets(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        centre = torch.rand(n, 2, generator=g) * 0.2 + 0.4
        size = torch.rand(n, 2, generator=g) * 0.1 + 0.1
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        out.append({"labels": labels, "boxes": torch.cat([centre, size], 1)})
    return out


def test_layout_groups_and_positive_indices():
    dn = get_contrastive_denoising_training_group(
        _targets([3, 1]), NUM_CLASSES, 20, _embed(), num_denoising=100, label_noise_ratio=0.0
    )
    groups = 100 // 3
    assert dn.meta["dn_num_group"] == groups
    assert dn.meta["dn_num_split"] == [2 * 3 * groups, 20]
    assert dn.query_content.shape == (2, 6 * groups, 8)
    assert dn.ref_logits.shape == (2, 6 * groups, 4)
    pos0, pos1 = dn.meta["dn_positive_idx"]
    assert pos0.dtype == torch.int64
    assert pos0.tolist() == [6 * g + j for g in range(groups) for j in range(3)]
    assert pos1.tolist() == [6 * g for g in range(groups)]


def test_groups_floor_at_one_for_crowded_images():
    dn = get_contrastive_denoising_training_group(
        _targets([120]), NUM_CLASSES, 20, _embed(), num_denoising=100
    )
    assert dn.meta["dn_num_group"] == 1
    assert dn.meta["dn_num_split"] == [240, 20]


def test_attention_mask_structure():
    # m = 2 boxes, 100 // 2 would be 50 groups; num_denoising = 5 gives 2 groups of 4 queries
    dn = get_contrastive_denoising_training_group(
        _targets([2]), NUM_CLASSES, 3, _embed(), num_denoising=5
    )
    blocked = dn.attn_mask
    assert blocked.dtype == torch.bool and blocked.shape == (11, 11)
    want = torch.zeros(11, 11, dtype=torch.bool)
    want[0:4, 4:8] = True  # group 0 cannot see group 1
    want[4:8, 0:4] = True  # group 1 cannot see group 0
    want[8:, 0:8] = True  # matching queries cannot see any denoising query
    assert torch.equal(blocked, want)


def _noise_in_units_of_half_size(dn, targets, groups):
    """Per query, (xyxy noise) / (w/2, h/2, w/2, h/2) of the image's box, before any clipping."""
    boxes = targets[0]["boxes"]
    m = len(boxes)
    noised = box_convert(dn.ref_logits[0].sigmoid(), "cxcywh", "xyxy").double()
    clean = box_convert(boxes, "cxcywh", "xyxy").double().repeat(2 * groups, 1)
    half = (boxes[:, 2:].double() / 2).repeat(1, 2).repeat(2 * groups, 1)
    rel = (noised - clean) / half
    is_negative = (torch.arange(2 * m * groups) % (2 * m)) >= m
    # strong noise can push x1 past x2; such a box has negative size, which inverse_sigmoid clamps
    # (reference behaviour), so its corners are not recoverable: leave those out
    recoverable = (noised[:, 2:] - noised[:, :2] > 1e-3).all(-1)
    assert recoverable.float().mean() > 0.7
    return rel[recoverable], is_negative[recoverable]


def test_box_noise_bounds_positive_and_negative():
    torch.manual_seed(3)
    targets = _targets([4])  # centres in [0.4, 0.6], sizes <= 0.2: the noise never clips
    dn = get_contrastive_denoising_training_group(
        targets, NUM_CLASSES, 20, _embed(), num_denoising=100, label_noise_ratio=0.0
    )
    rel, is_negative = _noise_in_units_of_half_size(dn, targets, dn.meta["dn_num_group"])
    tol = 1e-3  # float32 sigmoid / logit round trip
    assert rel[~is_negative].abs().max() < 1 + tol
    mags = rel[is_negative].abs()
    assert mags.min() > 1 - tol and mags.max() < 2 + tol
    # both signs and a spread of magnitudes occur, i.e. the noise is really random
    assert (rel > 0).any() and (rel < 0).any() and rel[~is_negative].abs().min() < 0.2


def test_box_noise_scale_zero_keeps_boxes_and_clipping_applies():
    targets = [
        {
            "labels": torch.tensor([1, 2]),
            "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.05, 0.95, 0.1, 0.1]]),
        }
    ]
    dn = get_contrastive_denoising_training_group(
        targets, NUM_CLASSES, 20, _embed(), num_denoising=4, box_noise_scale=0.0
    )
    torch.testing.assert_close(dn.ref_logits[0].sigmoid(), targets[0]["boxes"].repeat(4, 1))
    torch.manual_seed(0)
    dn = get_contrastive_denoising_training_group(
        targets, NUM_CLASSES, 20, _embed(), num_denoising=100, box_noise_scale=1.0
    )
    corners = box_convert(dn.ref_logits[0].sigmoid(), "cxcywh", "xyxy")
    assert torch.isfinite(dn.ref_logits).all()
    assert corners.min() >= -1e-5 and corners.max() <= 1 + 1e-5
    # the box touching the border is clipped there in some noised copies
    assert (corners[1::2, 0] < 1e-4).any() and (corners[1::2, 3] > 1 - 1e-4).any()


def test_padding_and_label_noise():
    emb = _embed()
    targets = _targets([3, 1])
    torch.manual_seed(0)
    dn = get_contrastive_denoising_training_group(
        targets, NUM_CLASSES, 20, emb, num_denoising=60, label_noise_ratio=1.0
    )
    groups = dn.meta["dn_num_group"]
    slot = torch.arange(6 * groups) % 3  # position within the positive or negative half
    padded = slot >= 1  # image 1 has one box: slots 1 and 2 of every half are padding
    assert torch.equal(dn.query_content[1, padded], torch.zeros(int(padded.sum()), 8))
    assert torch.allclose(dn.ref_logits[1, padded], torch.tensor(math.log(1e-5)))
    # label noise: each real query shows either its own label or a resampled one, ~25% changed
    own = emb(targets[0]["labels"]).repeat(2 * groups, 1)
    changed = (dn.query_content[0] - own).abs().sum(-1) > 0
    assert 0.1 < changed.float().mean() < 0.45
    for row in dn.query_content[0][changed]:
        assert any(torch.equal(row, emb.weight[c]) for c in range(NUM_CLASSES))
    dn = get_contrastive_denoising_training_group(
        targets, NUM_CLASSES, 20, emb, num_denoising=60, label_noise_ratio=0.0
    )
    assert torch.equal(dn.query_content[0], own)


def test_empty_batch_gives_tiny_padded_group():
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    dn = get_contrastive_denoising_training_group(targets, NUM_CLASSES, 20, _embed())
    assert dn.meta["dn_num_group"] == 1 and dn.meta["dn_num_split"] == [2, 20]
    assert [p.numel() for p in dn.meta["dn_positive_idx"]] == [0, 0]
    assert torch.equal(dn.query_content, torch.zeros(2, 2, 8))
    assert dn.ref_logits.shape == (2, 2, 4) and torch.isfinite(dn.ref_logits).all()
    assert dn.attn_mask.shape == (22, 22) and dn.attn_mask[2:, :2].all()


def test_disabled_returns_none():
    assert get_contrastive_denoising_training_group(_targets([2]), 5, 20, _embed(), 0) is None


def test_matches_hf_with_same_seed():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = pytest.importorskip("transformers.models.rt_detr_v2.modeling_rt_detr_v2")
    emb = _embed()
    targets = _targets([3, 1, 0])
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    for num_dn in (100, 7):
        torch.manual_seed(11)
        want = hf.get_contrastive_denoising_training_group(hf_targets, 5, 20, emb, num_dn, 0.5, 1.0)
        torch.manual_seed(11)
        got = get_contrastive_denoising_training_group(targets, 5, 20, emb, num_dn, 0.5, 1.0)
        torch.testing.assert_close(got.query_content, want[0], rtol=0, atol=0)
        torch.testing.assert_close(got.ref_logits, want[1], rtol=1e-6, atol=1e-6)
        assert torch.equal(got.attn_mask, torch.isinf(want[2]))
        assert got.meta["dn_num_group"] == want[3]["dn_num_group"]
        assert got.meta["dn_num_split"] == list(want[3]["dn_num_split"])
        for ours, theirs in zip(
            got.meta["dn_positive_idx"], want[3]["dn_positive_idx"], strict=True
        ):
            assert torch.equal(ours, theirs)
        # the generator must be left in the same state too (same number of draws)
        assert torch.equal(torch.get_rng_state(), _rng_after_hf(hf, hf_targets, emb, num_dn))


def _rng_after_hf(hf, hf_targets, emb, num_dn):
    torch.manual_seed(11)
    hf.get_contrastive_denoising_training_group(hf_targets, 5, 20, emb, num_dn, 0.5, 1.0)
    return torch.get_rng_state()
