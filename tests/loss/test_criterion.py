"""RTDETRCriterion: hand-computed terms, normalisers, term names, empty batches, dtypes, HF."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rtdetr_lit import create_model
from rtdetr_lit.loss import HungarianMatcher, RTDETRCriterion

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WEIGHTS = {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _criterion(num_classes: int, weights: dict | None = None) -> RTDETRCriterion:
    return RTDETRCriterion(num_classes, HungarianMatcher(), weights or WEIGHTS)


def _random_boxes(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    centre = torch.rand(*shape, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(*shape, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], -1)


def _targets(counts, num_classes, generator):
    return [
        {
            "labels": torch.randint(0, num_classes, (n,), generator=generator),
            "boxes": _random_boxes(n, generator=generator),
        }
        for n in counts
    ]


def _iou_giou_math(a, b) -> tuple[float, float]:
    def corners(box):
        cx, cy, w, h = box
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    ax0, ay0, ax1, ay1 = corners(a)
    bx0, by0, bx1, by1 = corners(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union, inter / union - (hull - union) / hull


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_final_layer_terms_match_hand_computation():
    # one image, 2 queries, 2 classes, 1 box of class 1; query 1 is clearly the match
    logits = [[0.4, -0.7], [-1.1, 1.3]]
    pred = [[0.2, 0.2, 0.1, 0.1], [0.52, 0.47, 0.3, 0.36]]
    box, label = [0.5, 0.5, 0.32, 0.4], 1
    outputs = {
        "pred_logits": torch.tensor([logits], requires_grad=True),
        "pred_boxes": torch.tensor([pred], requires_grad=True),
    }
    targets = [{"labels": torch.tensor([label]), "boxes": torch.tensor([box])}]
    losses = _criterion(2)(outputs, targets)
    assert sorted(losses) == ["loss_bbox", "loss_giou", "loss_vfl"]

    iou, giou = _iou_giou_math(pred[1], box)
    vfl, grad = 0.0, [[0.0, 0.0], [0.0, 0.0]]
    for q in range(2):
        for c in range(2):
            p = _sigmoid(logits[q][c])
            hit = (q, c) == (1, label)
            t = iou if hit else 0.0
            w = t if hit else 0.75 * p**2
            vfl += -w * (t * math.log(p) + (1 - t) * math.log(1 - p))
            grad[q][c] = w * (p - t)  # the weight is a constant (detached score)
    l1 = sum(abs(a - b) for a, b in zip(pred[1], box, strict=True))
    assert losses["loss_vfl"].item() == pytest.approx(1.0 * vfl, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5.0 * l1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(2.0 * (1 - giou), rel=1e-5)

    losses["loss_vfl"].backward()
    torch.testing.assert_close(outputs["pred_logits"].grad[0], torch.tensor(grad))
    # the IoU target is detached: VFL sends no gradient to the boxes
    assert outputs["pred_boxes"].grad is None or not outputs["pred_boxes"].grad.any()


def test_normalised_by_the_number_of_boxes_in_the_batch():
    g = torch.Generator().manual_seed(1)
    outputs = {"pred_logits": torch.randn(2, 5, 3, generator=g)}
    outputs["pred_boxes"] = _random_boxes(2, 5, generator=g)
    targets = _targets([2, 1], 3, g)
    crit = _criterion(3, {"loss_vfl": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0})
    both = crit(outputs, targets)
    per_image = [
        crit({k: v[i : i + 1] for k, v in outputs.items()}, [targets[i]]) for i in range(2)
    ]
    for name, value in both.items():
        # image i alone is normalised by its own count (2, 1); together by 3
        want = (per_image[0][name] * 2 + per_image[1][name] * 1) / 3
        torch.testing.assert_close(value, want)


def test_weights_multiply_the_terms_and_must_be_complete():
    g = torch.Generator().manual_seed(2)
    outputs = {"pred_logits": torch.randn(1, 4, 3, generator=g)}
    outputs["pred_boxes"] = _random_boxes(1, 4, generator=g)
    targets = _targets([2], 3, g)
    ones = _criterion(3, {"loss_vfl": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0})(outputs, targets)
    weighted = _criterion(3, {"loss_vfl": 0.5, "loss_bbox": 5.0, "loss_giou": 2.0})(
        outputs, targets
    )
    for name, w in [("loss_vfl", 0.5), ("loss_bbox", 5.0), ("loss_giou", 2.0)]:
        torch.testing.assert_close(weighted[name], ones[name] * w)
    with pytest.raises(ValueError, match="weight_dict"):
        _criterion(3, {"loss_vfl": 1.0, "loss_bbox": 5.0})


def _denoising_outputs(dn_boxes, dn_logits, counts, groups):
    """dn outputs whose G groups are copies of one group of ``2 * max(counts)`` queries."""
    slots = max(counts)
    return {
        "pred_logits": torch.zeros(len(counts), 3, dn_logits.shape[-1]),
        "pred_boxes": torch.full((len(counts), 3, 4), 0.5),
        "dn_outputs": [
            {
                "pred_logits": dn_logits.repeat(1, groups, 1),
                "pred_boxes": dn_boxes.repeat(1, groups, 1),
            }
        ],
        "dn_meta": {
            "dn_positive_idx": [
                (torch.arange(groups)[:, None] * 2 * slots + torch.arange(n)).flatten()
                for n in counts
            ],
            "dn_num_group": groups,
            "dn_num_split": [2 * slots * groups, 3],
        },
    }


def test_denoising_uses_fixed_pairs_and_the_group_normaliser():
    g = torch.Generator().manual_seed(3)
    counts = [2, 1]
    targets = _targets(counts, 4, g)
    dn_logits = torch.randn(2, 4, 4, generator=g)
    dn_boxes = _random_boxes(2, 4, generator=g)
    crit = _criterion(4)
    one = crit(_denoising_outputs(dn_boxes, dn_logits, counts, 1), targets)
    three = crit(_denoising_outputs(dn_boxes, dn_logits, counts, 3), targets)
    # 3 identical groups, normalised by num_boxes * 3, equal a single group
    for name in ["loss_vfl_dn_0", "loss_bbox_dn_0", "loss_giou_dn_0"]:
        torch.testing.assert_close(three[name], one[name])
    # fixed pairing: positive query j of image i goes with box j (no matching)
    l1 = sum((dn_boxes[i, :n] - targets[i]["boxes"]).abs().sum() for i, n in enumerate(counts))
    torch.testing.assert_close(one["loss_bbox_dn_0"], 5.0 * l1 / 3)


def test_denoising_meta_must_fit_the_targets():
    g = torch.Generator().manual_seed(4)
    targets = _targets([2, 1], 4, g)
    outputs = _denoising_outputs(_random_boxes(2, 4), torch.randn(2, 4, 4), [2, 1], 2)
    targets[1] = _targets([2], 4, g)[0]
    with pytest.raises(ValueError, match="image 1"):
        _criterion(4)(outputs, targets)


def test_num_boxes_is_averaged_over_ranks_and_clamped(monkeypatch):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(5)
    outputs = {"pred_logits": torch.randn(1, 4, 3, generator=g)}
    outputs["pred_boxes"] = _random_boxes(1, 4, generator=g)
    targets = _targets([1], 3, g)
    local = _criterion(3)(outputs, targets)  # normalised by 1

    other_rank_boxes = 5.0
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.add_(other_rank_boxes))
    ranked = _criterion(3)(outputs, targets)  # normalised by (1 + 5) / 2 = 3
    for name, value in ranked.items():
        torch.testing.assert_close(value * 3, local[name])

    other_rank_boxes = 1.0  # (0 + 1) / 2 = 0.5 is clamped to 1
    empty = _criterion(3)(outputs, _targets([0], 3, g))
    monkeypatch.undo()
    torch.testing.assert_close(
        empty["loss_vfl"], _criterion(3)(outputs, _targets([0], 3, g))["loss_vfl"]
    )


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    # r18's 3-layer decoder; fewer queries so that a 64x64 input (84 tokens) is enough
    return create_model("r18", num_classes=3, num_queries=50).train()


def test_r18_outputs_give_the_21_terms(r18):
    torch.manual_seed(0)
    targets = _targets([2, 1], 3, torch.Generator().manual_seed(6))
    losses = _criterion(3)(r18(torch.rand(2, 3, 64, 64), targets), targets)
    suffixes = ["", "_aux_0", "_aux_1", "_enc_0", "_dn_0", "_dn_1", "_dn_2"]
    want = {f"{n}{s}" for n in ["loss_vfl", "loss_bbox", "loss_giou"] for s in suffixes}
    assert set(losses) == want and len(losses) == 21
    total = sum(losses.values())
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(v.item() > 0 for v in losses.values())


def test_batch_without_boxes_gives_finite_losses_and_the_same_graph(r18):
    crit = _criterion(3)
    images = torch.rand(2, 3, 64, 64)

    def grads(targets):
        r18.zero_grad(set_to_none=True)
        losses = crit(r18(images, targets), targets)
        sum(losses.values()).backward()
        return losses, {n for n, p in r18.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    _, with_boxes = grads(_targets([2, 1], 3, torch.Generator().manual_seed(7)))
    torch.manual_seed(0)
    losses, without = grads(_targets([0, 0], 3, torch.Generator()))
    assert len(losses) == 21
    assert all(torch.isfinite(v) for v in losses.values())
    for name, value in losses.items():
        if "loss_vfl" not in name:
            assert value.item() == 0.0, name
    assert losses["loss_vfl"].item() > 0
    # every parameter DDP would wait for still receives a (zero) gradient
    assert without == with_boxes


def test_low_precision_outputs_give_float32_losses():
    g = torch.Generator().manual_seed(8)
    outputs = {
        "pred_logits": torch.randn(2, 6, 4, generator=g),
        "pred_boxes": _random_boxes(2, 6, generator=g),
        "aux_outputs": [
            {"pred_logits": torch.randn(2, 6, 4, generator=g), "pred_boxes": _random_boxes(2, 6)}
        ],
    }
    targets = _targets([2, 3], 4, g)

    def cast(out, dtype):
        return {
            k: [cast(a, dtype) for a in v] if isinstance(v, list) else v.to(dtype)
            for k, v in out.items()
        }

    crit = _criterion(4)
    rounded = crit(cast(cast(outputs, torch.bfloat16), torch.float32), targets)
    low = crit(cast(outputs, torch.bfloat16), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = crit(cast(outputs, torch.bfloat16), targets)
    for name, value in low.items():
        assert value.dtype == autocast[name].dtype == torch.float32
        torch.testing.assert_close(value, rounded[name])
        torch.testing.assert_close(autocast[name], rounded[name])


def test_builds_from_the_model_config():
    node = OmegaConf.load(CONF_DIR / "model" / "_default.yaml").model.criterion
    node.num_classes = 7
    crit = instantiate(node)
    assert isinstance(crit, RTDETRCriterion) and isinstance(crit.matcher, HungarianMatcher)
    assert crit.weight_dict == WEIGHTS and (crit.alpha, crit.gamma) == (0.75, 2.0)
    assert (crit.matcher.cost_class, crit.matcher.cost_bbox, crit.matcher.cost_giou) == (2, 5, 2)


def test_final_and_auxiliary_terms_match_hf_rt_detr_loss():
    """HF's RTDetrLoss (its defaults equal docs/rtdetrv2.md §7) on the same outputs and targets.

    Compared where the two agree: the last decoder layer and the auxiliary layers. (Encoder and
    denoising terms differ by design: docs/rtdetrv2.md §7.)
    """
    from transformers import RTDetrV2Config
    from transformers.loss.loss_rt_detr import RTDetrLoss

    g = torch.Generator().manual_seed(7)
    num_classes, queries = 5, 30
    targets = _targets([3, 0, 6], num_classes, g)

    def layer():
        return {
            "pred_logits": torch.randn(3, queries, num_classes, generator=g),
            "pred_boxes": _random_boxes(3 * queries, generator=g).view(3, queries, 4),
        }

    ours = {**layer(), "aux_outputs": [layer(), layer()]}
    hf_outputs = {
        "logits": ours["pred_logits"],
        "pred_boxes": ours["pred_boxes"],
        "auxiliary_outputs": [
            {"logits": a["pred_logits"], "pred_boxes": a["pred_boxes"]} for a in ours["aux_outputs"]
        ],
    }
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    want = RTDetrLoss(RTDetrV2Config(num_labels=num_classes))(hf_outputs, hf_targets)
    got = _criterion(num_classes)(ours, targets)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
