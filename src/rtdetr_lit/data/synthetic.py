"""The embedded synthetic dataset: rendered shapes on textured backgrounds, in COCO format.

Nothing can be downloaded on the machines this package is developed and tested on, so the default
dataset is generated locally, deterministically from a seed, and cached on disk:

    <root>/train/000000.jpg ...            <root>/annotations/instances_train.json
    <root>/val/000000.jpg ...              <root>/annotations/instances_val.json
    <root>/VERSION.json                    generator version + parameters (the cache key)

Images have random sizes, 0 to ``max_objects`` objects each (some none at all), object sizes that
span the COCO small (< 32^2 px), medium and large (> 96^2 px) ranges, and exact tight boxes in COCO
``[x, y, w, h]`` pixels. The class of an object is its shape; colours are random.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["CLASSES", "GENERATOR_VERSION", "SyntheticConfig", "ensure_synthetic_dataset"]

log = logging.getLogger(__name__)

# Bump whenever the rendering changes, so cached copies are regenerated.
GENERATOR_VERSION = 1

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "ring")
_VERSION_FILE = "VERSION.json"


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generated dataset; with GENERATOR_VERSION they form the cache key."""

    num_train: int = 800
    num_val: int = 100
    min_size: int = 160
    max_size: int = 224
    max_objects: int = 8
    empty_fraction: float = 0.1
    min_object: int = 8
    max_object: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError("synthetic dataset: num_train and num_val must be >= 1")
        if not 32 <= self.min_size <= self.max_size:
            raise ValueError("synthetic dataset: need 32 <= min_size <= max_size")
        if not 4 <= self.min_object <= self.max_object <= self.min_size:
            raise ValueError("synthetic dataset: need 4 <= min_object <= max_object <= min_size")
        if self.max_objects < 0 or not 0.0 <= self.empty_fraction <= 1.0:
            raise ValueError("synthetic dataset: max_objects >= 0 and 0 <= empty_fraction <= 1")


def ensure_synthetic_dataset(root: str | os.PathLike[str], config: SyntheticConfig) -> Path:
    """Generate the dataset under ``root`` unless an identical one (same version stamp) is there.

    The dataset is written to a temporary folder beside ``root`` and moved into place at the end, so
    an interrupted generation never leaves a half-written dataset behind. Returns ``root``.
    """
    root = Path(root)
    stamp = {"generator_version": GENERATOR_VERSION, "config": dataclasses.asdict(config)}
    stamp_path = root / _VERSION_FILE
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return root
    log.info("generating the synthetic dataset in %s (%s)", root, config)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        rng = np.random.default_rng(config.seed)
        for split, count in (("train", config.num_train), ("val", config.num_val)):
            _write_split(tmp, split, count, config, rng)
        (tmp / _VERSION_FILE).write_text(json.dumps(stamp, indent=2))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_split(
    out: Path, split: str, count: int, config: SyntheticConfig, rng: np.random.Generator
) -> None:
    image_dir = out / split
    image_dir.mkdir(parents=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id in range(1, count + 1):
        width, height = (int(v) for v in rng.integers(config.min_size, config.max_size + 1, 2))
        canvas = _background(width, height, rng)
        draw = ImageDraw.Draw(canvas)
        empty = rng.random() < config.empty_fraction
        num_objects = 0 if empty else int(rng.integers(1, config.max_objects + 1))
        objects: list[tuple[int, tuple[float, float, float, float]]] = []
        for _ in range(num_objects):
            obj = _place_object(width, height, [box for _, box in objects], config, rng)
            if obj is not None:
                objects.append(obj)
        # Large shapes first, so that a smaller one is never hidden under a larger one.
        objects.sort(key=lambda o: (o[1][2] - o[1][0]) * (o[1][3] - o[1][1]), reverse=True)
        pixels = np.asarray(canvas, dtype=np.float32)
        for label, box in objects:
            _draw_shape(draw, CLASSES[label], box, _contrasting_colour(pixels, box, rng))
            x0, y0, x1, y1 = box
            bbox = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": bbox,
                    "area": round(bbox[2] * bbox[3], 2),
                    "iscrowd": 0,
                }
            )
        file_name = f"{image_id:06d}.jpg"
        canvas.save(image_dir / file_name, quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)
    ]
    (out / "annotations").mkdir(exist_ok=True)
    coco = {
        "info": {"description": f"rtdetr_lit synthetic shapes v{GENERATOR_VERSION}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def _background(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A textured background: colour gradient + blurred noise + faint random strokes."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 215, size=3)
    slope = rng.uniform(-60, 60, size=(2, 3))
    img = base + (xx / width)[..., None] * slope[0] + (yy / height)[..., None] * slope[1]
    noise = rng.normal(0, rng.uniform(8, 30), size=(height // 4 + 1, width // 4 + 1, 3))
    noise = np.kron(noise, np.ones((4, 4, 1)))[:height, :width]
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.0))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 6))):
        pts = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(2)]
        shade = tuple(int(c) for c in np.clip(base + rng.normal(0, 25, 3), 0, 255))
        draw.line(pts, fill=shade, width=int(rng.integers(1, 4)))
    return canvas


def _place_object(
    width: int,
    height: int,
    placed: list[tuple[float, float, float, float]],
    config: SyntheticConfig,
    rng: np.random.Generator,
) -> tuple[int, tuple[float, float, float, float]] | None:
    """Pick a class and a box (x0, y0, x1, y1) that overlaps earlier boxes by IoU <= 0.3."""
    label = int(rng.integers(0, len(CLASSES)))
    for _ in range(20):
        # Log-uniform side lengths cover the three COCO size ranges in similar shares.
        side = math.exp(rng.uniform(math.log(config.min_object), math.log(config.max_object)))
        aspect = 1.0 if CLASSES[label] in ("circle", "square", "ring") else rng.uniform(0.7, 1.4)
        w = min(side * math.sqrt(aspect), width - 2.0)
        h = min(side / math.sqrt(aspect), height - 2.0)
        x0 = rng.uniform(1.0, width - 1.0 - w)
        y0 = rng.uniform(1.0, height - 1.0 - h)
        box = (float(x0), float(y0), float(x0 + w), float(y0 + h))
        if all(_iou(box, other) <= 0.3 for other in placed):
            return label, box
    return None


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _contrasting_colour(
    pixels: np.ndarray, box: tuple[float, float, float, float], rng: np.random.Generator
) -> tuple[int, int, int]:
    """A random colour far (RGB distance > 100) from the background's mean under ``box``."""
    x0, y0, x1, y1 = (int(v) for v in box)
    mean = pixels[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3).mean(axis=0)
    colour = rng.integers(0, 256, 3)
    for _ in range(50):
        if np.linalg.norm(colour - mean) > 100:
            break
        colour = rng.integers(0, 256, 3)
    return (int(colour[0]), int(colour[1]), int(colour[2]))


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    box: tuple[float, float, float, float],
    fill: tuple[int, int, int],
) -> None:
    """Draw ``shape`` in ``fill`` so that its tight bounding box is ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(min(w, h) * 0.18)))
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        tw, th = w / 3, h / 3
        draw.rectangle((cx - tw / 2, y0, cx + tw / 2, y1), fill=fill)
        draw.rectangle((x0, cy - th / 2, x1, cy + th / 2), fill=fill)
    else:  # pragma: no cover - CLASSES and this function are edited together
        raise ValueError(f"unknown shape {shape!r}")
