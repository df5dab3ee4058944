"""The albumentations pipeline of docs/rtdetrv2.md §9 and the transforms written for it."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest

from rtdetr_lit.data.transforms import (
    AugmentConfig,
    DropSmallBoxes,
    IoUCrop,
    ZoomOut,
    build_transforms,
)


def _compose(*ops: A.BasicTransform, min_size: float = 0.0, seed: int = 0) -> A.Compose:
    params = A.BboxParams(
        format="pascal_voc", label_fields=["box_index"], min_width=min_size, min_height=min_size
    )
    return A.Compose(list(ops), bbox_params=params, seed=seed, strict=True)


def _marked_image(h: int, w: int, boxes: np.ndarray) -> np.ndarray:
    """Black image with each box filled by a distinct colour, so geometry can be read back."""
    image = np.zeros((h, w, 3), np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        image[y0:y1, x0:x1] = (50 + 40 * k, 255 - 30 * k, 100)
    return image


BOXES = np.array([[10, 20, 50, 60], [70, 5, 110, 45]], np.float32)


@pytest.mark.parametrize("seed", range(5))
def test_zoom_out_moves_boxes_with_their_pixels(seed: int) -> None:
    image = _marked_image(80, 120, BOXES)
    out = _compose(ZoomOut(max_scale=3.0, p=1.0), seed=seed)(
        image=image, bboxes=BOXES, box_index=[0, 1]
    )
    h, w = out["image"].shape[:2]
    assert 80 <= h <= 240 and 120 <= w <= 360
    assert out["image"].sum() == image.sum()  # the canvas adds only black
    for k, box in enumerate(np.asarray(out["bboxes"])):
        x0, y0, x1, y1 = np.round(box).astype(int)
        assert x1 - x0 == 40 and y1 - y0 == 40  # sizes in pixels unchanged
        colour = image[int(BOXES[k, 1]), int(BOXES[k, 0])]
        assert (out["image"][y0:y1, x0:x1] == colour).all()


@pytest.mark.parametrize("seed", range(10))
def test_iou_crop_keeps_boxes_whose_centres_are_inside(seed: int) -> None:
    image = _marked_image(120, 160, BOXES)
    crop = IoUCrop(p=1.0)
    out = _compose(crop, seed=seed)(image=image, bboxes=BOXES, box_index=[0, 1])
    left, top, right, bottom = crop.params["crop"]
    h, w = out["image"].shape[:2]
    assert (h, w) == (bottom - top, right - left)
    assert w / h == pytest.approx(np.clip(w / h, 0.5, 2.0))
    kept = np.asarray(out["box_index"], int)
    centres = (BOXES[:, :2] + BOXES[:, 2:]) / 2
    inside = (
        (centres[:, 0] > left) & (centres[:, 0] < right)
        & (centres[:, 1] > top) & (centres[:, 1] < bottom)
    )  # fmt: skip
    assert set(kept) == set(np.flatnonzero(inside))
    for k, box in zip(kept, np.asarray(out["bboxes"]), strict=True):
        expected = np.clip(BOXES[k] - [left, top, left, top], 0, [w, h, w, h])
        np.testing.assert_allclose(box, expected, atol=1e-3)


def test_iou_crop_leaves_an_image_without_boxes_alone() -> None:
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    out = _compose(IoUCrop(p=1.0))(image=image, bboxes=np.zeros((0, 4)), box_index=[])
    np.testing.assert_array_equal(out["image"], image)


def test_iou_crop_honours_the_drawn_iou_threshold() -> None:
    # With only the 0.9 threshold, every accepted crop overlaps some box by IoU >= 0.9.
    big = np.array([[5, 5, 95, 95]], np.float32)
    crop = IoUCrop(iou_thresholds=(0.9,), p=1.0)
    for seed in range(5):
        _compose(crop, seed=seed)(
            image=np.zeros((100, 100, 3), np.uint8), bboxes=big, box_index=[0]
        )
        left, top, right, bottom = crop.params["crop"]
        inter = (min(right, 95) - max(left, 5)) * (min(bottom, 95) - max(top, 5))
        union = 90 * 90 + (right - left) * (bottom - top) - inter
        assert inter / union >= 0.9


def test_drop_small_boxes_removes_boxes_under_the_limit() -> None:
    boxes = np.array([[0, 0, 0.5, 10], [0, 0, 10, 10], [5, 5, 20, 5.8]], np.float32)
    out = _compose(DropSmallBoxes(1.0))(
        image=np.zeros((30, 30, 3), np.uint8), bboxes=boxes, box_index=[0, 1, 2]
    )
    assert list(out["box_index"]) == [1]


def test_validation_pipeline_only_resizes() -> None:
    image = np.random.default_rng(1).integers(0, 255, (100, 200, 3), dtype=np.uint8)
    out = build_transforms((64, 96), None)(image=image, bboxes=BOXES, box_index=[0, 1])
    assert out["image"].shape == (64, 96, 3)
    np.testing.assert_allclose(
        np.asarray(out["bboxes"]), BOXES * np.array([96 / 200, 64 / 100] * 2), atol=1e-4
    )


def test_training_pipeline_has_the_spec_operations_in_order() -> None:
    strong = build_transforms((64, 64), AugmentConfig())
    names = [type(t).__name__ for t in strong.transforms]
    assert names == [
        "ColorJitter", "ColorJitter", "ColorJitter", "ColorJitter", "ChannelShuffle",
        "ZoomOut", "IoUCrop", "DropSmallBoxes", "HorizontalFlip", "Resize",
    ]  # fmt: skip
    weak = build_transforms((64, 64), AugmentConfig(), strong=False)
    assert [type(t).__name__ for t in weak.transforms] == [
        "DropSmallBoxes",
        "HorizontalFlip",
        "Resize",
    ]


def test_horizontal_flip_mirrors_the_boxes() -> None:
    image = _marked_image(80, 100, BOXES[:1])
    config = AugmentConfig(hflip_p=1.0)
    out = build_transforms((80, 100), config, strong=False)(
        image=image, bboxes=BOXES[:1], box_index=[0]
    )
    np.testing.assert_allclose(np.asarray(out["bboxes"])[0], [50, 20, 90, 60], atol=1e-4)
    assert out["image"][30, 70].any() and not out["image"][30, 30].any()


def test_bad_augment_values_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"data\.augment\.iou_crop_p"):
        AugmentConfig(iou_crop_p=1.5)
