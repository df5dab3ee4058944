"""The embedded synthetic dataset: COCO-loadable, deterministic, cached with a version stamp."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from rtdetr_lit.data import synthetic
from rtdetr_lit.data.synthetic import CLASSES, SyntheticConfig, ensure_synthetic_dataset

SMALL = SyntheticConfig(num_train=40, num_val=10, seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("syn") / "synthetic", SMALL)


@pytest.mark.parametrize(("split", "count"), [("train", 40), ("val", 10)])
def test_loads_in_pycocotools(dataset: Path, split: str, count: int) -> None:
    coco = COCO(str(dataset / "annotations" / f"instances_{split}.json"))
    assert len(coco.getImgIds()) == count
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    for img in coco.loadImgs(coco.getImgIds()):
        with Image.open(dataset / split / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"]) and im.mode == "RGB"
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img["width"] and y + h <= img["height"]
            assert ann["area"] == pytest.approx(w * h, abs=0.02)
            assert ann["iscrowd"] == 0


def test_has_negatives_and_every_coco_size_range(dataset: Path) -> None:
    coco = COCO(str(dataset / "annotations" / "instances_train.json"))
    counts = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert 0 in counts, "no image without objects"
    assert max(counts) <= SMALL.max_objects
    areas = np.array([a["area"] for a in coco.loadAnns(coco.getAnnIds())])
    assert (areas < 32**2).any(), "no small objects"
    assert ((areas >= 32**2) & (areas < 96**2)).any(), "no medium objects"
    assert (areas >= 96**2).any(), "no large objects"
    labels = {a["category_id"] for a in coco.loadAnns(coco.getAnnIds())}
    assert labels == set(range(1, len(CLASSES) + 1))


def test_boxes_are_tight_around_the_shapes(dataset: Path) -> None:
    """A filled square is one flat colour: inside its box the pixels barely vary, just outside
    they are the background."""
    data = json.loads((dataset / "annotations" / "instances_train.json").read_text())
    files = {img["id"]: img["file_name"] for img in data["images"]}
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    checked = 0
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        touching = [
            a for a in by_image[ann["image_id"]] if a is not ann and _near(a["bbox"], ann["bbox"])
        ]
        if ann["category_id"] != CLASSES.index("square") + 1 or min(w, h) < 24 or touching:
            continue
        pixels = np.asarray(Image.open(dataset / "train" / files[ann["image_id"]]), np.float32)
        inner = pixels[int(y + 0.2 * h) : int(y + 0.8 * h), int(x + 0.2 * w) : int(x + 0.8 * w)]
        assert inner.reshape(-1, 3).std(axis=0).max() < 6.0
        ring = np.concatenate([pixels[int(y) + 2 : int(y + h) - 2, max(int(x) - 3, 0)],
                               pixels[int(y) + 2 : int(y + h) - 2, int(x) + 2]])  # fmt: skip
        fill = inner.reshape(-1, 3).mean(axis=0)
        inside, outside = ring[len(ring) // 2 :], ring[: len(ring) // 2]
        assert np.abs(inside.mean(axis=0) - fill).max() < 12
        assert np.linalg.norm(outside.mean(axis=0) - fill) > 30
        checked += 1
    assert checked > 0, "no isolated square large enough to check"


def _near(a: list[float], b: list[float], margin: float = 4.0) -> bool:
    """Whether COCO boxes ``a`` and ``b`` come within ``margin`` pixels of each other."""
    return not (a[0] > b[0] + b[2] + margin or b[0] > a[0] + a[2] + margin
                or a[1] > b[1] + b[3] + margin or b[1] > a[1] + a[3] + margin)  # fmt: skip


def test_deterministic_from_the_seed(tmp_path: Path, dataset: Path) -> None:
    again = ensure_synthetic_dataset(tmp_path / "again", SMALL)
    for rel in ("annotations/instances_train.json", "annotations/instances_val.json",
                "train/000001.jpg", "val/000010.jpg"):  # fmt: skip
        assert (again / rel).read_bytes() == (dataset / rel).read_bytes(), rel
    other = ensure_synthetic_dataset(
        tmp_path / "other", dataclasses.replace(SMALL, seed=4, num_train=5, num_val=2)
    )
    assert (other / "train/000001.jpg").read_bytes() != (dataset / "train/000001.jpg").read_bytes()


def test_cache_is_reused_and_regenerated_on_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = SyntheticConfig(num_train=3, num_val=2, seed=1)
    root = ensure_synthetic_dataset(tmp_path / "syn", cfg)
    marker = root / "train" / "000001.jpg"
    stamp = marker.stat().st_mtime_ns
    ensure_synthetic_dataset(root, cfg)
    assert marker.stat().st_mtime_ns == stamp, "an identical dataset was regenerated"

    ensure_synthetic_dataset(root, dataclasses.replace(cfg, num_train=4))
    assert len(list((root / "train").glob("*.jpg"))) == 4
    assert json.loads((root / "VERSION.json").read_text())["config"]["num_train"] == 4

    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    stamp = marker.stat().st_mtime_ns
    ensure_synthetic_dataset(root, dataclasses.replace(cfg, num_train=4))
    assert marker.stat().st_mtime_ns != stamp, "a new generator version must regenerate"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".syn-")], "temp dir left over"


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_train"):
        SyntheticConfig(num_train=0)
    with pytest.raises(ValueError, match="max_object"):
        SyntheticConfig(max_object=1000)
