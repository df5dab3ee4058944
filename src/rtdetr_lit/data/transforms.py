"""The training and validation pipelines of docs/rtdetrv2.md §9, built from albumentations.

Albumentations has no zoom-out (place the image on a larger empty canvas) and no SSD-style IoU
crop (pick a crop whose IoU with some box clears a randomly chosen threshold, keep the boxes whose
centres fall inside), so both are written here as albumentations transforms.

Boxes travel as ``pascal_voc`` (absolute xyxy pixels) with a ``box_index`` label field that points
back into the caller's arrays (labels, areas). Inside a pipeline a box that must go is collapsed to
zero width; the pipeline's final filter (``min_width``/``min_height``) then removes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import numpy as np

__all__ = ["AugmentConfig", "DropSmallBoxes", "IoUCrop", "ZoomOut", "build_transforms"]


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and limits of the training augmentation (the ``data.augment`` config)."""

    photometric_p: float = 0.5
    zoom_out_p: float = 0.5
    zoom_out_max_scale: float = 4.0
    iou_crop_p: float = 0.8
    hflip_p: float = 0.5
    min_box_size: float = 1.0
    stop_epoch: int = 0

    def __post_init__(self) -> None:
        for name in ("photometric_p", "zoom_out_p", "iou_crop_p", "hflip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.augment.{name} must be in [0, 1]")
        if self.zoom_out_max_scale < 1.0:
            raise ValueError("data.augment.zoom_out_max_scale must be >= 1")
        if self.min_box_size < 0:
            raise ValueError("data.augment.min_box_size must be >= 0")


def _collapse(bboxes: np.ndarray, drop: np.ndarray) -> np.ndarray:
    """Give the boxes where ``drop`` is true zero width and height (removed by the final filter)."""
    bboxes = bboxes.copy()
    bboxes[drop, 2] = bboxes[drop, 0]
    bboxes[drop, 3] = bboxes[drop, 1]
    return bboxes


class ZoomOut(A.DualTransform):
    """Place the image at a random position on a canvas ``1..max_scale`` times its size.

    The canvas is filled with ``fill``; boxes keep their pixels, so they get smaller relative to the
    image (more small objects for the network to see).
    """

    def __init__(self, max_scale: float = 4.0, fill: int = 0, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.max_scale = max_scale
        self.fill = fill

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        h, w = params["shape"][:2]
        ratio = self.py_random.uniform(1.0, self.max_scale)
        canvas_w, canvas_h = int(w * ratio), int(h * ratio)
        left = int(self.py_random.uniform(0, 1) * (canvas_w - w))
        top = int(self.py_random.uniform(0, 1) * (canvas_h - h))
        return {"canvas": (canvas_h, canvas_w), "offset": (top, left), "size": (h, w)}

    def apply(self, img: np.ndarray, canvas, offset, size, **params: Any) -> np.ndarray:
        out = np.full((*canvas, *img.shape[2:]), self.fill, dtype=img.dtype)
        out[offset[0] : offset[0] + size[0], offset[1] : offset[1] + size[1]] = img
        return out

    def apply_to_bboxes(self, bboxes: np.ndarray, canvas, offset, size, **params: Any):
        # albumentations hands boxes over normalised to the current image.
        out = bboxes.copy()
        scale = np.array([size[1], size[0], size[1], size[0]]) / np.array(
            [canvas[1], canvas[0], canvas[1], canvas[0]]
        )
        shift = np.array([offset[1], offset[0], offset[1], offset[0]]) / np.array(
            [canvas[1], canvas[0], canvas[1], canvas[0]]
        )
        out[:, :4] = bboxes[:, :4] * scale + shift
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_scale", "fill")


class IoUCrop(A.DualTransform):
    """SSD-style random crop constrained by the IoU with the boxes (docs/rtdetrv2.md §9).

    Repeatedly draw a minimum IoU from ``iou_thresholds``; a draw of 1 or more keeps the image as it
    is. Otherwise try ``trials`` crops of ``min_scale..1`` times the width and height with an aspect
    ratio (w/h) in ``aspect``; accept the first crop that contains the centre of at least one box
    and overlaps some box by at least the drawn IoU. Boxes whose centres fall outside the crop are
    dropped. An image without boxes is never cropped.
    """

    def __init__(
        self,
        min_scale: float = 0.3,
        aspect: tuple[float, float] = (0.5, 2.0),
        iou_thresholds: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
        trials: int = 40,
        max_draws: int = 100,
        p: float = 0.8,
    ) -> None:
        super().__init__(p=p)
        self.min_scale = min_scale
        self.aspect = tuple(aspect)
        self.iou_thresholds = tuple(iou_thresholds)
        self.trials = trials
        self.max_draws = max_draws

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        h, w = params["shape"][:2]
        bboxes = np.asarray(data.get("bboxes", np.zeros((0, 4))))[:, :4]
        whole = {"crop": (0, 0, w, h), "keep": np.ones(len(bboxes), bool)}
        if len(bboxes) == 0:
            return whole
        boxes = bboxes * np.array([w, h, w, h])
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        rand = self.py_random
        # The reference loops until a draw succeeds; a cap keeps a pathological image finite.
        for _ in range(self.max_draws):
            min_iou = rand.choice(self.iou_thresholds)
            if min_iou >= 1.0:
                return whole
            for _ in range(self.trials):
                sw = rand.uniform(self.min_scale, 1.0)
                sh = rand.uniform(self.min_scale, 1.0)
                crop_w, crop_h = int(w * sw), int(h * sh)
                if crop_h == 0 or not self.aspect[0] <= crop_w / crop_h <= self.aspect[1]:
                    continue
                left = int((w - crop_w) * rand.uniform(0, 1))
                top = int((h - crop_h) * rand.uniform(0, 1))
                right, bottom = left + crop_w, top + crop_h
                if right == left or bottom == top:
                    continue
                keep = (
                    (centres[:, 0] > left)
                    & (centres[:, 0] < right)
                    & (centres[:, 1] > top)
                    & (centres[:, 1] < bottom)
                )
                if not keep.any():
                    continue
                iw = np.clip(
                    np.minimum(boxes[:, 2], right) - np.maximum(boxes[:, 0], left), 0, None
                )
                ih = np.clip(
                    np.minimum(boxes[:, 3], bottom) - np.maximum(boxes[:, 1], top), 0, None
                )
                inter = iw * ih
                iou = inter / (areas + crop_w * crop_h - inter)
                if iou.max() < min_iou:
                    continue
                return {"crop": (left, top, right, bottom), "keep": keep}
        return whole

    def apply(self, img: np.ndarray, crop, **params: Any) -> np.ndarray:
        left, top, right, bottom = crop
        return np.ascontiguousarray(img[top:bottom, left:right])

    def apply_to_bboxes(self, bboxes: np.ndarray, crop, keep, shape, **params: Any) -> np.ndarray:
        h, w = shape[:2]
        left, top, right, bottom = crop
        cw, ch = right - left, bottom - top
        out = bboxes.copy()
        px = bboxes[:, :4] * np.array([w, h, w, h])
        px = (px - np.array([left, top, left, top])).clip(0, None)
        px = np.minimum(px, np.array([cw, ch, cw, ch]))
        out[:, :4] = px / np.array([cw, ch, cw, ch])
        return _collapse(out, ~keep)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_scale", "aspect", "iou_thresholds", "trials", "max_draws")


class DropSmallBoxes(A.DualTransform):
    """Drop boxes narrower or lower than ``min_size`` pixels of the current image."""

    def __init__(self, min_size: float = 1.0) -> None:
        super().__init__(p=1.0)
        self.min_size = min_size

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return img

    def apply_to_bboxes(self, bboxes: np.ndarray, shape, **params: Any) -> np.ndarray:
        h, w = shape[:2]
        size = (bboxes[:, 2:4] - bboxes[:, 0:2]) * np.array([w, h])
        return _collapse(bboxes, (size < self.min_size).any(axis=1))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_size",)


def _photometric(p: float) -> list[A.BasicTransform]:
    """docs/rtdetrv2.md §9's photometric distortion: each part applied on its own with probability
    ``p``."""
    return [
        A.ColorJitter(brightness=(0.875, 1.125), contrast=0, saturation=0, hue=0, p=p),
        A.ColorJitter(brightness=0, contrast=(0.5, 1.5), saturation=0, hue=0, p=p),
        A.ColorJitter(brightness=0, contrast=0, saturation=(0.5, 1.5), hue=0, p=p),
        A.ColorJitter(brightness=0, contrast=0, saturation=0, hue=(-0.05, 0.05), p=p),
        A.ChannelShuffle(p=p),
    ]


def build_transforms(
    image_size: Sequence[int], augment: AugmentConfig | None, strong: bool = True
) -> A.Compose:
    """The pipeline from a decoded uint8 RGB image to the network's input size.

    ``augment=None`` gives the validation pipeline (resize only). Otherwise the training pipeline,
    with the strong operations (photometric, zoom-out, IoU crop) when ``strong`` is true: the
    dataset switches between the two at ``augment.stop_epoch``.
    """
    height, width = (int(v) for v in image_size)
    ops: list[A.BasicTransform] = []
    min_size = 0.0
    if augment is not None:
        min_size = augment.min_box_size
        if strong:
            ops += _photometric(augment.photometric_p)
            ops.append(ZoomOut(max_scale=augment.zoom_out_max_scale, p=augment.zoom_out_p))
            ops.append(IoUCrop(p=augment.iou_crop_p))
        ops.append(DropSmallBoxes(min_size))
        ops.append(A.HorizontalFlip(p=augment.hflip_p))
    # Bilinear; area averaging when shrinking, which antialiases as the reference's resize does
    # (a zoomed-out canvas can be 4x the image: plain bilinear would alias it).
    ops.append(A.Resize(height, width, interpolation=1, area_for_downscale="image"))
    return A.Compose(
        ops,
        bbox_params=A.BboxParams(
            format="pascal_voc",
            label_fields=["box_index"],
            min_width=min_size,
            min_height=min_size,
            clip=True,
        ),
        strict=True,
    )
