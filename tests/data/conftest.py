"""A tiny COCO-format dataset written to disk, for the data module tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from rtdetr_lit.data import CocoDataModule

# Category ids with a gap and not starting at 0 or 1.
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 8, "name": "owl"}]


def write_image(path: Path, width: int, height: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


class CocoWriter:
    """Builds one split: ``add_image`` then ``add_box``; ``write`` saves the JSON."""

    def __init__(self, root: Path, split: str = "train") -> None:
        self.root, self.split = root, split
        self.image_dir = root / split
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"images": [], "annotations": [], "categories": CATEGORIES}

    def add_image(self, width: int = 64, height: int = 48, name: str | None = None, **extra) -> int:
        image_id = len(self.data["images"]) + 1
        name = name or f"{image_id:04d}.png"
        if not (self.image_dir / name).exists():
            write_image(self.image_dir / name, width, height, seed=image_id)
        self.data["images"].append(
            {"id": image_id, "file_name": name, "width": width, "height": height, **extra}
        )
        return image_id

    def add_box(self, image_id: int, bbox: list[float], category_id: int = 3, **extra) -> int:
        ann_id = 100 + len(self.data["annotations"])
        area = bbox[2] * bbox[3]
        self.data["annotations"].append(
            {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
             "area": area, "iscrowd": 0, **extra}
        )  # fmt: skip
        return ann_id

    def write(self) -> Path:
        path = self.root / "annotations" / f"{self.split}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(self.data))
        return path


@pytest.fixture
def coco_writer(tmp_path: Path) -> Callable[[str], CocoWriter]:
    return lambda split="train": CocoWriter(tmp_path, split)


def make_datamodule(root: Path, **overrides: Any) -> CocoDataModule:
    """A module on ``root/{train,val}`` and ``root/annotations/{train,val}.json`` (val optional)."""
    val_json = root / "annotations" / "val.json"
    kwargs: dict[str, Any] = {
        "train_images": str(root / "train"),
        "train_annotations": str(root / "annotations" / "train.json"),
        "val_images": str(root / "val") if val_json.exists() else None,
        "val_annotations": str(val_json) if val_json.exists() else None,
        "batch_size": 2,
        "val_batch_size": 2,
        "num_workers": 0,
        "pin_memory": False,
        "image_size": (64, 64),
    }
    kwargs.update(overrides)
    return CocoDataModule(**kwargs)
