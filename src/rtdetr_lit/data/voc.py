"""Pascal VOC datasets: ``Annotations/<id>.xml`` per image, listed by ``ImageSets/Main/<set>.txt``.

An image set is named ``<folder>/<set>`` relative to the dataset root, ``<folder>`` being a VOC
year folder with ``JPEGImages/``, ``Annotations/`` and ``ImageSets/Main/``: with the VOCdevkit
folder as root, ``VOC2007/trainval`` reads ``VOCdevkit/VOC2007/ImageSets/Main/trainval.txt``. A
bare ``<set>`` (``trainval``) reads the root's own ``ImageSets/Main``.

The XML files are parsed with ElementTree, which never fetches external entities (and the expat
parser it runs on limits entity expansion).
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import numpy as np

from rtdetr_lit.data.annotations import DetectionAnnotations, build_annotations, report_broken

__all__ = ["VOC_CLASSES", "collect_voc_names", "load_voc"]

# The 20 Pascal VOC classes, in the usual (alphabetical) label order.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

_BOX_KEYS = ("xmin", "ymin", "xmax", "ymax")


def _image_set(root: str, image_set: str) -> tuple[str, list[str]]:
    """The year folder (relative to ``root``) of ``image_set`` and the image ids it lists."""
    folder, _, name = image_set.strip("/").rpartition("/")
    path = os.path.join(root, folder, "ImageSets", "Main", f"{name}.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image set {image_set!r}: no such file {path}")
    with open(path, encoding="utf-8") as f:
        # A line is an id, or in the per-class lists an id and a flag.
        ids = [line.split()[0] for line in f if line.strip()]
    return folder, ids


def _xml_files(root: str, image_sets: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(year folder, image id, XML path)`` of every image of the sets, in order."""
    files = []
    for image_set in image_sets:
        folder, ids = _image_set(root, image_set)
        annotations = os.path.join(root, folder, "Annotations")
        files += [(folder, i, os.path.join(annotations, f"{i}.xml")) for i in ids]
    return files


def _parse(path: str) -> ET.Element | None:
    """The root element of an XML file, or None when the file is missing or not valid XML."""
    try:
        return ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None


def collect_voc_names(root: str, image_sets: Sequence[str]) -> list[str]:
    """The object class names used in the sets' XML files, sorted (missing or invalid files are
    passed over here; reading the annotations reports them)."""
    names = set()
    for _, _, path in _xml_files(root, image_sets):
        element = _parse(path)
        if element is not None:
            names.update((o.findtext("name") or "").strip() for o in element.iter("object"))
    names.discard("")
    return sorted(names)


def _number(element: ET.Element | None, key: str) -> float:
    """The finite number in ``element``'s child ``key``; ``ValueError`` when there is none."""
    text = element.findtext(key) if element is not None else None
    value = float(text or "nan")  # a missing or empty value is not finite either
    if not math.isfinite(value):
        raise ValueError(key)
    return value


def _size(element: ET.Element) -> tuple[int, int]:
    """The image size an XML gives, or (0, 0) (probed from the file) when it gives none."""
    size = element.find("size")
    try:
        width, height = int(_number(size, "width")), int(_number(size, "height"))
    except ValueError:
        return 0, 0
    return (width, height) if width > 0 and height > 0 else (0, 0)


def load_voc(
    root: str | os.PathLike[str],
    image_sets: Sequence[str],
    names: Sequence[str],
    *,
    skip_bad_annotations: bool = False,
) -> DetectionAnnotations:
    """Read the images of ``image_sets`` (see the module docstring) with their objects.

    File names are relative to ``root``: ``<folder>/JPEGImages/<the XML's filename>``, or
    ``<id>.jpg`` when the XML names no file. The image size is the XML's ``size`` when it gives
    one (checked against the file later), else read from the file. VOC boxes are 1-based pixel
    indices, inclusive: ``xmin..xmax`` covers the pixel edges ``xmin - 1`` to ``xmax``, which are
    the box's ``x0, x1``. Boxes outside the image are clipped and degenerate ones dropped later, as
    for every dataset (``DetectionAnnotations.sanitized``). ``truncated`` is ignored; an object
    marked ``difficult`` gets ``iscrowd=1``, so that COCO evaluation ignores it (neither a miss
    nor a false positive, as the VOC metric treats it) and training leaves it out, as it leaves
    out crowd boxes.

    Broken annotations (a missing or invalid XML file: its image; an object whose class is not in
    ``names`` or without four finite ``bndbox`` numbers) are an error naming each file and
    object, or, with ``skip_bad_annotations``, left out and counted in one warning per kind.
    """
    root = os.fspath(root)
    source = f"VOC image sets {list(image_sets)} in {root}"
    label_of = {n: i for i, n in enumerate(names)}
    file_names: list[str] = []
    sizes: list[tuple[int, int]] = []
    rows: list[int] = []
    boxes: list[list[float]] = []
    labels: list[int] = []
    difficult: list[bool] = []
    bad_files: list[str] = []
    bad_objects: list[str] = []
    for folder, image_id, path in _xml_files(root, image_sets):
        element = _parse(path)
        if element is None:
            reason = "no such file" if not os.path.isfile(path) else "not valid XML"
            bad_files.append(f"{path}: {reason}")
            continue
        row = len(file_names)
        file_name = os.path.basename((element.findtext("filename") or "").strip())
        file_names.append(os.path.join(folder, "JPEGImages", file_name or f"{image_id}.jpg"))
        sizes.append(_size(element))
        for k, obj in enumerate(element.iter("object"), 1):
            name = (obj.findtext("name") or "").strip()
            if name not in label_of:
                bad_objects.append(f"{path}: object {k}: class {name!r} is not in data.names")
                continue
            try:
                x0, y0, x1, y1 = (_number(obj.find("bndbox"), key) for key in _BOX_KEYS)
            except ValueError:
                bad_objects.append(f"{path}: object {k} ({name}): no finite {', '.join(_BOX_KEYS)}")
                continue
            boxes.append([x0 - 1, y0 - 1, x1, y1])
            rows.append(row)
            labels.append(label_of[name])
            difficult.append((obj.findtext("difficult") or "0").strip().lower() in ("1", "true"))
    report_broken(
        source, bad_files, "annotation files", "missing or not valid XML", skip_bad_annotations
    )
    report_broken(
        source,
        bad_objects,
        "objects",
        "a class not in data.names, or no finite bndbox",
        skip_bad_annotations,
    )
    xyxy = np.asarray(boxes, np.float32).reshape(-1, 4)
    size = np.asarray(sizes, np.int64).reshape(-1, 2)
    return build_annotations(
        image_ids=np.arange(len(file_names), dtype=np.int64),
        file_names=file_names,
        widths=size[:, 0],
        heights=size[:, 1],
        box_image_index=np.asarray(rows, np.int64),
        boxes_xyxy=xyxy,
        labels=np.asarray(labels, np.int64),
        iscrowd=np.asarray(difficult, np.uint8),
        areas=(xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]),
        annotation_ids=np.arange(len(xyxy), dtype=np.int64),
        category_ids=list(range(len(names))),
        class_names=list(names),
    )
