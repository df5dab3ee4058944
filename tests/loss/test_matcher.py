"""Hungarian matcher: hand-computed costs, optimality, empty images, one host copy, NaN, bf16."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from rtdetr_lit.loss import HungarianMatcher
from rtdetr_lit.loss.box_ops import matched_box_iou, pairwise_box_iou


def _random_boxes(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    centre = torch.rand(*shape, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(*shape, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], -1)


def _random_case(counts, num_queries=6, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    bsz = len(counts)
    outputs = {
        "pred_logits": torch.randn(bsz, num_queries, num_classes, generator=g),
        "pred_boxes": _random_boxes(bsz, num_queries, generator=g),
    }
    targets = [
        {
            "labels": torch.randint(0, num_classes, (n,), generator=g),
            "boxes": _random_boxes(n, generator=g),
        }
        for n in counts
    ]
    return outputs, targets


def _corners(b):
    cx, cy, w, h = b
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _giou_math(a, b) -> float:
    ax0, ay0, ax1, ay1 = _corners(a)
    bx0, by0, bx1, by1 = _corners(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def test_cost_matrix_matches_hand_computation():
    # 2 queries, 2 classes; the saturated logits make the 1e-8 inside the logs matter
    logits = [[0.3, -30.0], [40.0, 0.5]]
    pred = [[0.5, 0.5, 0.4, 0.4], [0.3, 0.6, 0.2, 0.3]]
    labels = [1, 0]
    boxes = [[0.45, 0.5, 0.3, 0.5], [0.3, 0.65, 0.25, 0.2]]
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0)
    outputs = {"pred_logits": torch.tensor([logits]), "pred_boxes": torch.tensor([pred])}
    targets = [{"labels": torch.tensor(labels), "boxes": torch.tensor(boxes)}]
    cost = matcher.cost_matrix(outputs, targets)
    assert cost.dtype == torch.float32 and cost.shape == (1, 2, 2)
    for q in range(2):
        for j in range(2):
            p = 1.0 / (1.0 + math.exp(-logits[q][labels[j]]))
            focal = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(
                1 - p + 1e-8
            )
            l1 = sum(abs(a - b) for a, b in zip(pred[q], boxes[j], strict=True))
            want = 5.0 * l1 + 2.0 * focal - 2.0 * _giou_math(pred[q], boxes[j])
            assert cost[0, q, j].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_finds_the_optimum_where_greedy_fails():
    # L1 cost only; queries differ in cx: costs [[0.05, 0.2], [0.15, 0.4]]. Greedy takes the
    # cheapest pair (q0, t0) and is left with (q1, t1): 0.45; the optimum is q0-t1, q1-t0: 0.35.
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    outputs = {
        "pred_logits": torch.zeros(1, 2, 2),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.5, 0.2, 0.2]]]),
    }
    targets = [
        {
            "labels": torch.tensor([0, 1]),
            "boxes": torch.tensor([[0.45, 0.5, 0.2, 0.2], [0.7, 0.5, 0.2, 0.2]]),
        }
    ]
    cost = matcher.cost_matrix(outputs, targets)[0]
    flat = cost.flatten().argmin().item()
    greedy = {flat // 2: flat % 2, 1 - flat // 2: 1 - flat % 2}
    assert greedy == {0: 0, 1: 1}  # the case is really one where greedy is wrong

    ((rows, cols),) = matcher(outputs, targets)
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {0: 1, 1: 0}
    assert rows.dtype == cols.dtype == torch.int64


def _independent_cost(outputs, targets, i):
    """Per-image cost with torchvision's 2-D box ops and the SPEC formula."""
    p = outputs["pred_logits"][i].sigmoid()[:, targets[i]["labels"]]
    focal = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p**2 * -(1 - p + 1e-8).log()
    pred, tgt = outputs["pred_boxes"][i], targets[i]["boxes"]
    l1 = (pred[:, None, :] - tgt[None, :, :]).abs().sum(-1)
    giou = generalized_box_iou(
        box_convert(pred, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")
    )
    return 5 * l1 + 2 * focal - 2 * giou


def test_matches_brute_force_per_image_with_an_empty_image():
    torch.manual_seed(0)
    counts = [3, 0, 2, 1]
    outputs, targets = _random_case(counts, num_queries=5, seed=3)
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices) == len(counts)
    for i, n in enumerate(counts):
        rows, cols = indices[i]
        assert len(rows) == len(cols) == n
        if n == 0:
            assert rows.dtype == cols.dtype == torch.int64
            continue
        cost = _independent_cost(outputs, targets, i)
        best = min(
            itertools.permutations(range(5), n),
            key=lambda qs: sum(cost[q, j].item() for j, q in enumerate(qs)),
        )
        assert sorted(zip(cols.tolist(), rows.tolist(), strict=True)) == list(enumerate(best))


def test_batch_without_any_box_gives_empty_indices():
    outputs, targets = _random_case([0, 0])
    for rows, cols in HungarianMatcher()(outputs, targets):
        assert rows.shape == cols.shape == (0,)
        assert rows.dtype == cols.dtype == torch.int64


def test_copies_costs_to_the_host_once_per_call(monkeypatch):
    outputs, targets = _random_case([2, 3, 0, 1])
    calls = []
    original = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    HungarianMatcher()(outputs, targets)
    assert calls == [(4, 6, 3)]


def test_nonfinite_costs_are_sanitised_and_logged(caplog):
    outputs, targets = _random_case([2, 1], num_queries=4)
    outputs["pred_boxes"][0, 1] = float("nan")
    outputs["pred_logits"][1, :, :] = float("nan")  # a whole image is bad: still no crash
    with caplog.at_level(logging.WARNING, logger="rtdetr_lit.loss.matcher"):
        indices = HungarianMatcher()(outputs, targets)
    assert "non-finite" in caplog.text and "[0, 1]" in caplog.text
    rows0, _ = indices[0]
    assert len(rows0) == 2 and 1 not in rows0.tolist()  # the NaN query is avoided
    assert len(indices[1][0]) == 1


def test_nonfinite_costs_can_raise():
    outputs, targets = _random_case([2])
    outputs["pred_boxes"][0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"image\(s\) \[0\]"):
        HungarianMatcher(raise_on_nonfinite=True)(outputs, targets)


def test_low_precision_inputs_are_matched_in_float32():
    outputs, targets = _random_case([3, 2], num_queries=8, seed=1)
    low = {k: v.bfloat16() for k, v in outputs.items()}
    rounded = {k: v.float() for k, v in low.items()}
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(low, targets)
    assert cost.dtype == torch.float32
    assert torch.equal(cost, matcher.cost_matrix(rounded, targets))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(matcher.cost_matrix(rounded, targets), cost)
    for (r1, c1), (r2, c2) in zip(matcher(low, targets), matcher(rounded, targets), strict=True):
        assert torch.equal(r1, r2) and torch.equal(c1, c2)


def test_all_zero_cost_weights_are_rejected():
    with pytest.raises(ValueError, match="non-zero"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)


def test_box_ops_agree_with_torchvision_and_survive_degenerate_boxes():
    g = torch.Generator().manual_seed(0)
    a = box_convert(_random_boxes(2, 5, generator=g), "cxcywh", "xyxy")
    b = box_convert(_random_boxes(2, 3, generator=g), "cxcywh", "xyxy")
    iou, giou = pairwise_box_iou(a, b)
    assert iou.shape == giou.shape == (2, 5, 3)
    for i in range(2):
        torch.testing.assert_close(iou[i], box_iou(a[i], b[i]))
        torch.testing.assert_close(giou[i], generalized_box_iou(a[i], b[i]))
    m_iou, m_giou = matched_box_iou(a[0, :3], b[0])
    torch.testing.assert_close(m_iou, iou[0].diagonal())
    torch.testing.assert_close(m_giou, giou[0].diagonal())
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    iou, giou = matched_box_iou(point, point)
    assert iou.item() == 0.0 and giou.item() == 0.0
