"""Ultralytics ``data.yaml`` files: where a YOLO dataset's images are and what its classes are.

The keys read (any other key, such as ``download``, is ignored):

* ``path``: the dataset root; relative to the yaml file's folder, which it defaults to.
* ``train``, ``val`` (required) and ``test`` (optional): a folder of images (searched recursively),
  a ``.txt`` file listing images one per line (relative lines are relative to the list's folder),
  or a list of those; relative to ``path``.
* ``names``: the class names in label-index order, a list or a ``{index: name}`` mapping whose
  indices run from 0 without gaps.
* ``nc`` (optional): the number of classes, which must equal the number of names.

Labels sit where Ultralytics puts them: for ``.../images/.../x.jpg`` the label file is
``.../labels/.../x.txt`` (the last ``images`` folder of the path becomes ``labels``); an image path
without an ``images`` folder has its label file beside it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from rtdetr_lit.data.annotations import IMAGE_SUFFIXES, DetectionAnnotations, load_yolo_files
from rtdetr_lit.data.decode import ImageProbe

__all__ = ["UltralyticsDataset", "label_path", "load_data_yaml_split", "read_data_yaml"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class UltralyticsDataset:
    """What a ``data.yaml`` says: the dataset ``root``, the class ``names`` and, per split, the
    image sources (absolute folders and ``.txt`` lists). ``key_lines`` holds the line of each
    top-level key, for messages."""

    yaml_file: str
    root: str
    names: tuple[str, ...]
    splits: dict[str, tuple[str, ...]]
    key_lines: dict[str, int]

    def where(self, key: str) -> str:
        """``file:line: key`` for a message about ``key`` of the file."""
        line = self.key_lines.get(key)
        return f"{self.yaml_file}:{line}: {key}" if line else f"{self.yaml_file}: {key}"


def _top_level_lines(text: str) -> dict[str, int]:
    """The 1-based line of every top-level key of a YAML mapping."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value}


def _read_names(names: Any, where: str) -> list[str]:
    """The class names of a list, or of an ``{index: name}`` mapping with indices 0..N-1."""
    if isinstance(names, dict):
        if any(isinstance(k, bool) or not isinstance(k, int) for k in names):
            raise ValueError(f"{where}: the class indices must be integers, got {list(names)}")
        missing = sorted(set(range(max(names, default=-1) + 1)) - set(names))
        if missing or min(names, default=0) < 0:
            raise ValueError(
                f"{where}: the class indices must run from 0 without gaps; got {sorted(names)}"
                + (f", missing {missing}" if missing else "")
            )
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise ValueError(f"{where}: expected a non-empty list of class names or {{index: name}}")
    return [str(n) for n in names]


def _read_sources(value: Any, root: str, where: str) -> tuple[str, ...]:
    """A split's image sources as absolute paths (relative ones are relative to ``root``)."""
    entries = value if isinstance(value, list) else [value]
    if not entries or not all(isinstance(e, str) and e.strip() for e in entries):
        raise ValueError(
            f"{where}: expected a folder of images, a .txt list of images or a list of them, "
            f"got {value!r}"
        )
    return tuple(os.path.normpath(os.path.join(root, e.strip())) for e in entries)


def read_data_yaml(path: str | os.PathLike[str]) -> UltralyticsDataset:
    """Read an Ultralytics ``data.yaml`` (safely: plain data only). Raises ``ValueError`` naming
    the file, the line and the key of a value that cannot work; nothing else is read from disk."""
    path = os.path.abspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise FileNotFoundError(f"data.data_yaml: cannot read {path} ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
        lines = _top_level_lines(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with path, train, val and names")
    partial = UltralyticsDataset(path, "", (), {}, lines)
    root = data.get("path")
    if root is not None and not isinstance(root, str):
        raise ValueError(f"{partial.where('path')}: expected a folder, got {root!r}")
    root = os.path.normpath(os.path.join(os.path.dirname(path), root or "."))
    if "names" not in data:
        raise ValueError(f"{path}: names is missing (the class names, in label-index order)")
    names = _read_names(data["names"], partial.where("names"))
    nc = data.get("nc")
    if nc is not None and nc != len(names):
        raise ValueError(f"{partial.where('nc')}: nc is {nc!r} but names has {len(names)} entries")
    splits = {}
    for split in SPLITS:
        if data.get(split) is None:
            if split != "test":
                raise ValueError(f"{path}: {split} is missing (the {split} images)")
            continue
        splits[split] = _read_sources(data[split], root, partial.where(split))
    return UltralyticsDataset(path, root, tuple(names), splits, lines)


def label_path(image: str) -> str:
    """Where Ultralytics keeps the labels of ``image``: the last ``images`` folder of the path
    becomes ``labels``, the suffix ``.txt``."""
    head, sep, tail = image.rpartition(f"{os.sep}images{os.sep}")
    moved = f"{head}{os.sep}labels{os.sep}{tail}" if sep else image
    return os.path.splitext(moved)[0] + ".txt"


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _source_images(source: str, where: str) -> list[str]:
    """The images of one source: a folder's (recursively, sorted) or a list file's (in order)."""
    if source.lower().endswith(".txt"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{where}: no such image list {source}")
        folder = os.path.dirname(source)
        with open(source, encoding="utf-8") as f:
            listed = [line.strip() for line in f]
        return [os.path.normpath(os.path.join(folder, p)) for p in listed if p]
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{where}: no such folder {source}")
    return sorted(
        os.path.join(parent, name)
        for parent, _, names in os.walk(source)
        for name in names
        if _is_image(name)
    )


def load_data_yaml_split(
    dataset: UltralyticsDataset,
    split: str,
    probe: Callable[[list[str]], list[ImageProbe]],
    *,
    skip_bad_annotations: bool = False,
) -> DetectionAnnotations:
    """Read one split of ``dataset`` (the label files by :func:`load_yolo_files`, whose rules
    apply). File names are relative to the dataset root where the images are below it.

    A source that is missing, holds no images, or none of whose images has a label file (a
    missing ``labels`` folder) is an error naming the ``data.yaml`` line and key; a listed image
    that is missing is a bad image (``data.skip_bad_images``).
    """
    where = dataset.where(split)
    images: list[str] = []
    for source in dataset.splits[split]:
        found = _source_images(source, where)
        if not found:
            raise ValueError(f"{where}: no images in {source}")
        if not any(os.path.isfile(label_path(p)) for p in found):
            raise FileNotFoundError(
                f"{where}: none of the {len(found)} images of {source} has a label file (for "
                f"{found[0]} it would be {label_path(found[0])}: labels/ beside images/)"
            )
        images += found
    root = dataset.root
    return load_yolo_files(
        root,
        [os.path.relpath(p, root) if os.path.commonpath([p, root]) == root else p for p in images],
        [label_path(p) for p in images],
        list(dataset.names),
        probe,
        source=where,
        skip_bad_annotations=skip_bad_annotations,
    )
