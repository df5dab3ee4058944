"""Detection annotations held in flat numpy arrays, and the COCO-format reader.

Why arrays: a list of Python dicts per image is touched (reference-counted) every time a DataLoader
worker reads it, which un-shares the copy-on-write pages the worker inherited, so every worker
slowly duplicates the whole annotation set and RAM grows epoch after epoch. Flat arrays are never
written to after set-up and stay shared.

Category ids of any scheme (starting at 0 or 1, with gaps) map to contiguous labels in increasing
id order; ``category_ids[label]`` maps back.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from rtdetr_lit.data.decode import ImageProbe

__all__ = ["DetectionAnnotations", "load_coco", "load_yolo", "load_yolo_files"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectionAnnotations:
    """All images and boxes of one split.

    Per image (length I): ``image_ids`` int64, ``widths``/``heights`` int64 (displayed size, the
    frame of the boxes), ``apply_exif`` bool (decode with the EXIF orientation applied), file names
    in ``_names`` (utf-8 bytes, one blob) with ``_name_offsets`` int64 (I + 1,).
    Per box (length N, grouped by image: image ``i`` owns rows ``box_offsets[i]:box_offsets[i+1]``):
    ``boxes`` float32 (N, 4) absolute xyxy pixels, ``labels`` int64 contiguous, ``iscrowd`` uint8,
    ``areas`` float32 (the dataset's area, original pixels), ``annotation_ids`` int64.
    """

    image_ids: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    apply_exif: np.ndarray
    _names: np.ndarray
    _name_offsets: np.ndarray
    box_offsets: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    areas: np.ndarray
    annotation_ids: np.ndarray
    category_ids: tuple[int, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def file_name(self, i: int) -> str:
        """The file name of image ``i``, relative to the split's image folder."""
        return bytes(self._names[self._name_offsets[i] : self._name_offsets[i + 1]]).decode()

    def box_slice(self, i: int) -> slice:
        return slice(int(self.box_offsets[i]), int(self.box_offsets[i + 1]))

    def select_images(self, keep: np.ndarray) -> DetectionAnnotations:
        """A copy with only the images where ``keep`` (bool, (I,)) is true, and their boxes."""
        keep = np.asarray(keep, dtype=bool)
        counts = np.diff(self.box_offsets)
        box_keep = np.repeat(keep, counts)
        name_lengths = np.diff(self._name_offsets)
        names = self._names[np.repeat(keep, name_lengths)]
        return replace(
            self,
            image_ids=self.image_ids[keep],
            widths=self.widths[keep],
            heights=self.heights[keep],
            apply_exif=self.apply_exif[keep],
            _names=names,
            _name_offsets=_offsets(name_lengths[keep]),
            box_offsets=_offsets(counts[keep]),
            **{k: getattr(self, k)[box_keep] for k in _BOX_FIELDS},
        )

    def select_boxes(self, keep: np.ndarray) -> DetectionAnnotations:
        """A copy with only the boxes where ``keep`` (bool, (N,)) is true; every image stays."""
        keep = np.asarray(keep, dtype=bool)
        image_of_box = np.repeat(np.arange(len(self)), np.diff(self.box_offsets))
        counts = np.bincount(image_of_box[keep], minlength=len(self))
        return replace(
            self,
            box_offsets=_offsets(counts),
            **{k: getattr(self, k)[keep] for k in _BOX_FIELDS},
        )

    def with_image_sizes(
        self, widths: np.ndarray, heights: np.ndarray, apply_exif: np.ndarray
    ) -> DetectionAnnotations:
        return replace(
            self,
            widths=np.asarray(widths, np.int64),
            heights=np.asarray(heights, np.int64),
            apply_exif=np.asarray(apply_exif, bool),
        )

    def sanitized(self, split: str) -> DetectionAnnotations:
        """Clip boxes to their image and drop those left with zero or negative width or height.

        Dropped boxes are counted and reported in one warning (``split`` names the source).
        """
        image_of_box = np.repeat(np.arange(len(self)), np.diff(self.box_offsets))
        limits = np.stack([self.widths, self.heights, self.widths, self.heights], 1)[image_of_box]
        boxes = np.clip(self.boxes, 0, limits.astype(np.float32))
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not valid.all():
            bad = self.annotation_ids[~valid]
            log.warning(
                "%s: dropped %d boxes with zero or negative width/height (inside the image), "
                "annotation ids %s%s",
                split,
                len(bad),
                bad[:10].tolist(),
                " ..." if len(bad) > 10 else "",
            )
        return replace(self, boxes=boxes).select_boxes(valid)

    def to_coco(self) -> dict[str, Any]:
        """The annotations as a COCO dict (boxes ``[x, y, w, h]`` in the displayed frame)."""
        images = [
            {"id": int(self.image_ids[i]), "file_name": self.file_name(i),
             "width": int(self.widths[i]), "height": int(self.heights[i])}
            for i in range(len(self))
        ]  # fmt: skip
        image_of_box = np.repeat(self.image_ids, np.diff(self.box_offsets))
        xywh = np.concatenate([self.boxes[:, :2], self.boxes[:, 2:] - self.boxes[:, :2]], 1)
        annotations = [
            {"id": int(self.annotation_ids[j]), "image_id": int(image_of_box[j]),
             "category_id": self.category_ids[self.labels[j]], "bbox": xywh[j].tolist(),
             "area": float(self.areas[j]), "iscrowd": int(self.iscrowd[j])}
            for j in range(len(self.boxes))
        ]  # fmt: skip
        categories = [
            {"id": c, "name": n} for c, n in zip(self.category_ids, self.class_names, strict=True)
        ]
        return {"images": images, "annotations": annotations, "categories": categories}


_BOX_FIELDS = ("boxes", "labels", "iscrowd", "areas", "annotation_ids")


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def pack_names(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """File names as one uint8 utf-8 blob plus (len + 1,) offsets."""
    encoded = [n.encode() for n in names]
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return blob, _offsets(np.array([len(e) for e in encoded], np.int64))


def build_annotations(
    *,
    image_ids: np.ndarray,
    file_names: list[str],
    widths: np.ndarray,
    heights: np.ndarray,
    box_image_index: np.ndarray,
    boxes_xyxy: np.ndarray,
    labels: np.ndarray,
    iscrowd: np.ndarray,
    areas: np.ndarray,
    annotation_ids: np.ndarray,
    category_ids: list[int],
    class_names: list[str],
) -> DetectionAnnotations:
    """Group per-box arrays by image (``box_image_index`` is each box's image row)."""
    order = np.argsort(box_image_index, kind="stable")
    names, name_offsets = pack_names(file_names)
    return DetectionAnnotations(
        image_ids=np.asarray(image_ids, np.int64),
        widths=np.asarray(widths, np.int64),
        heights=np.asarray(heights, np.int64),
        apply_exif=np.ones(len(image_ids), bool),
        _names=names,
        _name_offsets=name_offsets,
        box_offsets=_offsets(np.bincount(box_image_index, minlength=len(image_ids))),
        boxes=np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)[order],
        labels=np.asarray(labels, np.int64)[order],
        iscrowd=np.asarray(iscrowd, np.uint8)[order],
        areas=np.asarray(areas, np.float32)[order],
        annotation_ids=np.asarray(annotation_ids, np.int64)[order],
        category_ids=tuple(int(c) for c in category_ids),
        class_names=tuple(class_names),
    )


_SKIP_OPTION = "data.skip_bad_annotations=true"


def _listed(items: list[Any], limit: int = 10) -> str:
    """The first ``limit`` items, then how many more there are."""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{items[:limit]}{more}"


def report_broken(
    source: str, entries: list[str], kind: str, reason: str, skip_bad_annotations: bool
) -> None:
    """Stop on broken annotations, or count them in one warning with ``skip_bad_annotations``.

    ``entries`` says where each one is (``file:line: what is wrong``); the first ten are shown.
    ``kind`` names what they are (``label lines``), ``reason`` what makes them broken.
    """
    if not entries:
        return
    shown = "\n  ".join(entries[:10])
    more = f"\n  ... and {len(entries) - 10} more" if len(entries) > 10 else ""
    if not skip_bad_annotations:
        raise ValueError(
            f"{source}: {len(entries)} {kind} are broken annotations ({reason}); fix them, or set "
            f"{_SKIP_OPTION} to leave them out:\n  {shown}{more}"
        )
    log.warning(
        "%s: skipped %d broken %s (%s; data.skip_bad_annotations):\n  %s%s",
        source,
        len(entries),
        kind,
        reason,
        shown,
        more,
    )


def _coco_xyxy(bbox: list[Any] | tuple[Any, ...]) -> list[float] | None:
    """A COCO ``[x, y, w, h]`` as finite ``[x0, y0, x1, y1]``, or None for a broken one.

    Broken: a value that is not a JSON number (a string, null, a bool, a list...), or one that is
    NaN or infinite (Python's JSON reader accepts ``NaN`` and ``Infinity``) or becomes so.
    Types are checked explicitly: numpy would quietly turn the string ``"10"`` into 10.
    """
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in bbox):
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except OverflowError:  # an integer beyond float range
        return None
    xyxy = [x, y, x + w, y + h]
    return xyxy if all(math.isfinite(v) for v in xyxy) else None


def load_coco(
    path: str | os.PathLike[str], *, skip_bad_annotations: bool = False
) -> DetectionAnnotations:
    """Read a COCO ``instances`` JSON into arrays (boxes not yet clipped: see ``sanitized``).

    Raises ``ValueError`` naming the annotation id for an unknown category or image id or a
    missing ``bbox``. A bbox with a non-finite (NaN, infinite) or non-numeric value is a broken
    annotation: an error naming the file and every such annotation id, or, with
    ``skip_bad_annotations``, left out and counted in one warning. Images without annotations are
    kept (negatives).
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    categories = sorted(data.get("categories") or [], key=lambda c: c["id"])
    if not categories:
        raise ValueError(f"{path}: no categories")
    category_ids = [int(c["id"]) for c in categories]
    label_of = {c: i for i, c in enumerate(category_ids)}
    images = data.get("images") or []
    image_ids = np.array([im["id"] for im in images], np.int64)
    row_of = {int(i): r for r, i in enumerate(image_ids)}
    if len(row_of) != len(image_ids):
        raise ValueError(f"{path}: duplicate image ids")
    anns = data.get("annotations") or []
    del data
    boxes: list[list[float]] = []
    rows: list[int] = []
    labels: list[int] = []
    iscrowd: list[Any] = []
    areas: list[Any] = []
    annotation_ids: list[Any] = []
    broken: list[Any] = []
    for j, a in enumerate(anns):
        if a.get("category_id") not in label_of:
            raise ValueError(
                f"{path}: annotation id {a.get('id')} has category_id {a.get('category_id')!r}, "
                f"which is not among the categories {category_ids}"
            )
        if a.get("image_id") not in row_of:
            raise ValueError(
                f"{path}: annotation id {a.get('id')} refers to image_id {a.get('image_id')!r}, "
                "which is not in 'images'"
            )
        bbox = a.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{path}: annotation id {a.get('id')} has no [x, y, w, h] bbox")
        xyxy = _coco_xyxy(bbox)
        if xyxy is None:
            broken.append(a.get("id", j))
            continue
        boxes.append(xyxy)
        rows.append(row_of[a["image_id"]])
        labels.append(label_of[a["category_id"]])
        iscrowd.append(a.get("iscrowd", 0))
        areas.append(a.get("area", bbox[2] * bbox[3]))
        annotation_ids.append(a.get("id", j))
    del anns
    if broken:
        if not skip_bad_annotations:
            raise ValueError(
                f"{path}: {len(broken)} annotations have non-finite or non-numeric bbox values "
                f"(broken annotations), annotation ids {_listed(broken)}; fix them, or set "
                f"{_SKIP_OPTION} to leave them out"
            )
        log.warning(
            "%s: skipped %d broken annotations with non-finite or non-numeric bbox values "
            "(data.skip_bad_annotations), annotation ids %s",
            path,
            len(broken),
            _listed(broken),
        )
    return build_annotations(
        image_ids=image_ids,
        file_names=[im["file_name"] for im in images],
        widths=np.array([im.get("width", 0) for im in images], np.int64),
        heights=np.array([im.get("height", 0) for im in images], np.int64),
        box_image_index=np.asarray(rows, np.int64),
        boxes_xyxy=np.asarray(boxes, np.float64).reshape(-1, 4),
        labels=np.asarray(labels, np.int64),
        iscrowd=np.asarray(iscrowd, np.uint8),
        areas=np.asarray(areas, np.float32),
        annotation_ids=np.asarray(annotation_ids, np.int64),
        category_ids=category_ids,
        class_names=[str(c.get("name", c["id"])) for c in categories],
    )


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def load_yolo(
    images: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    names: list[str],
    probe: Callable[[list[str]], list[ImageProbe]],
    *,
    skip_bad_annotations: bool = False,
) -> DetectionAnnotations:
    """Read a YOLO-format split: every image in ``images`` and its ``labels/<stem>.txt``.

    The label files are read by :func:`load_yolo_files`, whose rules apply.
    """
    files = sorted(
        f for f in os.listdir(images) if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES
    )
    return load_yolo_files(
        images,
        files,
        [os.path.join(labels, os.path.splitext(f)[0] + ".txt") for f in files],
        names,
        probe,
        source=os.fspath(labels),
        skip_bad_annotations=skip_bad_annotations,
    )


def load_yolo_files(
    image_dir: str | os.PathLike[str],
    file_names: list[str],
    label_files: list[str],
    names: list[str],
    probe: Callable[[list[str]], list[ImageProbe]],
    *,
    source: str,
    skip_bad_annotations: bool = False,
) -> DetectionAnnotations:
    """Read YOLO label files: ``label_files[i]`` holds the objects of image ``file_names[i]``
    (relative to ``image_dir``, or absolute); ``source`` names the split in messages.

    Lines are ``class cx cy w h`` with coordinates normalised to the image; ``probe`` gives the
    image sizes that turn them into pixels. A missing label file means an image without objects.
    A line that is not an integer class and 4 finite numbers (too few or too many fields, text,
    NaN, infinity) is a broken annotation: an error naming every such ``file:line``, or, with
    ``skip_bad_annotations``, left out and counted in one warning. A class outside ``names`` is
    always an error naming the file and line.
    """
    probes = probe([os.path.join(image_dir, f) for f in file_names])
    rows: list[int] = []
    boxes: list[list[float]] = []
    classes: list[int] = []
    broken: list[str] = []
    for row, (label_file, info) in enumerate(zip(label_files, probes, strict=True)):
        if not os.path.isfile(label_file):
            continue
        with open(label_file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    cls = int(parts[0])
                    cx, cy, w, h = (float(v) for v in parts[1:])
                except ValueError:  # a wrong number of fields, or not numbers
                    box = None
                else:
                    sx, sy = info.width, info.height
                    box = [
                        (cx - w / 2) * sx,
                        (cy - h / 2) * sy,
                        (cx + w / 2) * sx,
                        (cy + h / 2) * sy,
                    ]
                if box is None or not all(math.isfinite(v) for v in box):
                    broken.append(
                        f"{label_file}:{line_no}: expected 'class cx cy w h' with finite numbers, "
                        f"got {line.strip()!r}"
                    )
                    continue
                if not 0 <= cls < len(names):
                    raise ValueError(
                        f"{label_file}:{line_no}: class {cls} is not in names (0..{len(names) - 1})"
                    )
                boxes.append(box)
                rows.append(row)
                classes.append(cls)
    report_broken(
        source, broken, "label lines", "not a class and 4 finite numbers", skip_bad_annotations
    )
    xyxy = np.asarray(boxes, np.float32).reshape(-1, 4)
    return build_annotations(
        image_ids=np.arange(len(file_names), dtype=np.int64),
        file_names=file_names,
        widths=np.array([p.width for p in probes], np.int64),
        heights=np.array([p.height for p in probes], np.int64),
        box_image_index=np.asarray(rows, np.int64),
        boxes_xyxy=xyxy,
        labels=np.asarray(classes, np.int64),
        iscrowd=np.zeros(len(xyxy), np.uint8),
        areas=(xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]),
        annotation_ids=np.arange(len(xyxy), dtype=np.int64),
        category_ids=list(range(len(names))),
        class_names=names,
    )
