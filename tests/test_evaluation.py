"""COCO evaluation: faster-coco-eval, the backend the module uses, reports pycocotools' numbers.

Both backends of torchmetrics' ``MeanAveragePrecision`` get the same generated evaluation (set up
as ``RTDETRModule`` sets up its metric): several images and classes, crowd regions, objects of
every COCO size range, images without objects, images without detections, an image with more
detections than COCO's 100 per image, a class that is never detected and one that is detected but
absent. Every number each backend reports must agree.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision

from rtdetr_lit.module import _coco_map

IMAGE_SIDE = 640
NUM_CLASSES = 5
# Absent from the ground truth but detected (false positives only); class 4 is never detected.
PHANTOM_CLASS = NUM_CLASSES
UNDETECTED_CLASS = NUM_CLASSES - 1
# Box sides per COCO area range: small (area < 32^2), medium (< 96^2) and large.
SIDES = {"small": (6.0, 28.0), "medium": (36.0, 90.0), "large": (100.0, 300.0)}


def _boxes(gen: torch.Generator, n: int) -> torch.Tensor:
    """``n`` xyxy pixel boxes inside the image, each range of ``SIDES`` about equally often."""
    ranges = torch.tensor(list(SIDES.values()))[torch.randint(0, len(SIDES), (n,), generator=gen)]
    low, high = ranges[:, :1], ranges[:, 1:]
    wh = low + (high - low) * torch.rand(n, 2, generator=gen)
    xy = (IMAGE_SIDE - wh) * torch.rand(n, 2, generator=gen)
    return torch.cat([xy, xy + wh], dim=1)


def _jitter(gen: torch.Generator, boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """``boxes`` with each corner moved by up to ``scale`` of the box's side, still ordered."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    moved = boxes + scale * wh * (2 * torch.rand(boxes.shape, generator=gen) - 1)
    xy1 = torch.minimum(moved[:, :2], moved[:, 2:] - 1)
    return torch.cat([xy1, moved[:, 2:]], dim=1).clamp(0, IMAGE_SIDE)


def generated_evaluation(
    num_images: int = 40, seed: int = 0
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Detections and ground truth of ``num_images`` images, in the module's layout (float32
    xyxy pixel boxes, ``iscrowd``, ``area``): every 7th image has no objects, every 5th no
    detections, image 3 has 150 detections; 1 object in 6 is a crowd region."""
    gen = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for i in range(num_images):
        n = 0 if i % 7 == 0 else int(torch.randint(1, 12, (1,), generator=gen))
        boxes = _boxes(gen, n)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        iscrowd = (torch.rand(n, generator=gen) < 1 / 6).long()
        # COCO's area is the mask's, smaller than its box's; it decides the size range.
        box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        area = box_area * (0.6 + 0.4 * torch.rand(n, generator=gen))
        targets.append({"boxes": boxes, "labels": labels, "iscrowd": iscrowd, "area": area})

        # Found objects (some poorly placed), missed ones, duplicates and false positives.
        found = torch.rand(n, generator=gen) < 0.8
        hits = _jitter(gen, boxes[found], 0.15)
        hit_labels = labels[found]
        duplicates = _jitter(gen, hits, 0.3)
        extra = 150 if i == 3 else int(torch.randint(0, 6, (1,), generator=gen))
        false_boxes = _boxes(gen, extra)
        false_labels = torch.randint(0, NUM_CLASSES + 1, (extra,), generator=gen)
        det_boxes = torch.cat([hits, duplicates, false_boxes])
        det_labels = torch.cat([hit_labels, hit_labels, false_labels])
        det_labels[det_labels == UNDETECTED_CLASS] = PHANTOM_CLASS
        if i % 5 == 0:
            det_boxes, det_labels = det_boxes[:0], det_labels[:0]
        # Continuous scores (no ties, whose order either backend may break its own way); true
        # detections score higher on average.
        scores = torch.rand(len(det_boxes), generator=gen)
        scores[: len(hits)] = 0.5 + 0.5 * scores[: len(hits)]
        preds.append({"boxes": det_boxes, "scores": scores, "labels": det_labels})
    return preds, targets


def _evaluate(backend: str) -> dict[str, torch.Tensor]:
    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", class_metrics=True, backend=backend
    )
    metric.warn_on_many_detections = False
    metric.update(*generated_evaluation())
    return metric.compute()


def test_module_evaluates_with_faster_coco_eval() -> None:
    # torchmetrics keeps the choice in its backend object (no public attribute).
    assert _coco_map()._coco_backend.backend == "faster_coco_eval"


def test_generated_evaluation_covers_the_corner_cases() -> None:
    preds, targets = generated_evaluation()
    crowd = torch.cat([t["iscrowd"] for t in targets])
    areas = torch.cat([t["area"] for t in targets])
    assert 0 < int(crowd.sum()) < len(crowd)
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas < 96**2)).any()
    assert (areas >= 96**2).any()
    assert any(len(t["boxes"]) == 0 for t in targets)
    pairs = zip(preds, targets, strict=True)
    assert any(len(p["boxes"]) == 0 and len(t["boxes"]) > 0 for p, t in pairs)
    assert max(len(p["boxes"]) for p in preds) > 100


def test_backends_report_the_same_numbers() -> None:
    ours, reference = _evaluate("faster_coco_eval"), _evaluate("pycocotools")
    assert ours.keys() == reference.keys()
    # A meaningful comparison: every size range and recall limit has a score strictly between
    # 0 and 1; the phantom class is reported (without ground truth: -1), the undetected one is 0.
    for key in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1",
                "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"):  # fmt: skip
        assert 0 < float(reference[key]) < 1, key
    assert reference["classes"].tolist() == list(range(NUM_CLASSES + 1))
    assert float(reference["map_per_class"][UNDETECTED_CLASS]) == 0
    assert float(reference["map_per_class"][PHANTOM_CLASS]) == -1
    for key, value in reference.items():
        assert ours[key].shape == value.shape, key
        torch.testing.assert_close(ours[key].double(), value.double(), rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_empty_images_change_no_score(backend: str) -> None:
    """The module tops ranks up with empty images under DDP; no backend may count them."""
    base = _evaluate(backend)
    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", class_metrics=True, backend=backend
    )
    metric.warn_on_many_detections = False
    preds, targets = generated_evaluation()
    no_boxes, no_labels = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    empty_pred = {"boxes": no_boxes, "scores": torch.zeros(0), "labels": no_labels}
    empty_target = {"boxes": no_boxes, "labels": no_labels, "iscrowd": no_labels,
                    "area": torch.zeros(0)}  # fmt: skip
    metric.update(preds + [empty_pred] * 3, targets + [empty_target] * 3)
    padded = metric.compute()
    for key, value in base.items():
        torch.testing.assert_close(padded[key], value, msg=key)


def test_evaluation_logs_nothing_below_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """faster-coco-eval's summary tables stay out of the run's console and log."""
    metric = _coco_map()
    metric.update(*generated_evaluation(num_images=4))
    with caplog.at_level(logging.DEBUG):
        metric.compute()
    assert not [r for r in caplog.records if r.name.startswith("faster_coco_eval")]
