"""Detect objects: ``python -m rtdetr_lit.predict ckpt_path=PATH source=PATH [threshold=0.5]``.

``source`` is an image file, a folder of images (and videos), a glob pattern or a video file.
Written to ``output`` (by default the run directory):

* every picture with its detections drawn (boxes, class names, scores), under the same relative
  path and format as its source; every video as an annotated ``.mp4`` of the same frame rate;
* ``predictions.json``: COCO-style results, one entry per detection with ``image_id``,
  ``category_id``, ``bbox`` ([x, y, width, height] in original pixels) and ``score``, plus
  ``file_name`` (and ``frame`` for videos). When every source is an image named by a number (as in
  COCO, ``000000397133.jpg``) that number is the ``image_id``, so the file evaluates directly
  against the dataset's annotations; otherwise pictures and frames are numbered from 0.

Images are resized to ``image_size`` by the validation pipeline (no aspect kept); boxes come back
in the original pixels. ``backend=onnx`` runs the graph of ``python -m rtdetr_lit.export`` with ONNX
Runtime: ``ckpt_path`` may be such an ``.onnx`` file, any other checkpoint is exported first.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import DictConfig

from rtdetr_lit.cli import hydra_main
from rtdetr_lit.config import ConfigError, register_schemas
from rtdetr_lit.data.transforms import build_transforms
from rtdetr_lit.export import export_checkpoint
from rtdetr_lit.inference import (
    INPUT_NAMES,
    ClassInfo,
    InferenceModel,
    build_inference_model,
    classes_from_data,
    image_size_of,
    read_checkpoint,
    resolve_classes,
)
from rtdetr_lit.run import prepare_run

__all__ = ["IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "Sources", "collect_sources", "predict"]

log = logging.getLogger(__name__)

register_schemas()

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})
BACKENDS = ("torch", "onnx")
RESULTS_FILE = "predictions.json"

# (images float32 (B, 3, H, W), sizes int64 (B, 2) as (w, h)) -> labels, boxes, scores as numpy.
Detector = Callable[[np.ndarray, np.ndarray], Sequence[np.ndarray]]


@dataclass(frozen=True)
class Sources:
    """The files a ``source`` names, and the folder their output paths are relative to."""

    images: list[Path]
    videos: list[Path]
    base: Path

    def relative(self, path: Path) -> Path:
        return path.relative_to(self.base)


def collect_sources(source: str) -> Sources:
    """Resolve ``source`` (image, video, folder or glob pattern) into sorted image/video lists."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        base = path
    elif path.is_file():
        files, base = [path], path.parent
    elif glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p))
        base = Path(os.path.commonpath([p.parent for p in files])) if files else path.parent
    else:
        raise ConfigError(f"source: no such file, folder or glob match: {source}")
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    videos = [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
    if path.is_file() and not (images or videos):
        raise ConfigError(
            f"source: {source} is neither an image ({', '.join(sorted(IMAGE_SUFFIXES))}) nor a "
            f"video ({', '.join(sorted(VIDEO_SUFFIXES))})"
        )
    if not (images or videos):
        raise ConfigError(f"source: no images or videos in {source}")
    return Sources(images, videos, base)


@dataclass
class _Picture:
    name: str  # path relative to the source base, as written to the JSON
    image: np.ndarray  # (H, W, 3) uint8 RGB
    frame: int | None = None


def _read_images(paths: Iterable[Path], sources: Sources) -> Iterator[_Picture]:
    from rtdetr_lit.data.decode import read_image

    for path in paths:
        yield _Picture(str(sources.relative(path)), read_image(path))


def _read_frames(capture: cv2.VideoCapture, name: str) -> Iterator[_Picture]:
    frame = 0
    while True:
        ok, bgr = capture.read()
        if not ok:
            return
        yield _Picture(name, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), frame)
        frame += 1


_NO_BOXES = np.zeros((0, 4), np.float32)


def _preprocess(image: np.ndarray, transform: Any) -> np.ndarray:
    """The validation pipeline (resize to the input size), then [0, 1] floats, CHW."""
    resized = transform(image=image, bboxes=_NO_BOXES, box_index=np.zeros(0, np.int64))["image"]
    return resized.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)


def _batches(items: Iterable[_Picture], size: int) -> Iterator[list[_Picture]]:
    batch: list[_Picture] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _detect(
    pictures: Iterable[_Picture],
    detector: Detector,
    transform: Any,
    batch_size: int,
    threshold: float,
) -> Iterator[tuple[_Picture, np.ndarray, np.ndarray, np.ndarray]]:
    """Run ``detector`` on batches of ``pictures``; yield each with its kept labels/boxes/scores."""
    for batch in _batches(pictures, batch_size):
        images = np.stack([_preprocess(p.image, transform) for p in batch])
        sizes = np.array([(p.image.shape[1], p.image.shape[0]) for p in batch], np.int64)
        labels, boxes, scores = detector(images, sizes)
        for i, p in enumerate(batch):
            keep = scores[i] >= threshold
            yield p, labels[i][keep], boxes[i][keep], scores[i][keep]


def _torch_detector(model: InferenceModel) -> Detector:
    def run(images: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
        # The batch goes to the model's device (and dtype, for the images); the results come back.
        weight = next(model.parameters())
        with torch.inference_mode():
            outputs = model(
                torch.from_numpy(images).to(device=weight.device, dtype=weight.dtype),
                torch.from_numpy(sizes).to(weight.device),
            )
        return [t.cpu().numpy() for t in outputs]

    return run


def _onnx_detector(path: str | os.PathLike[str]) -> tuple[Detector, dict[str, str], list[Any]]:
    """ONNX Runtime session on ``path``: the detector, the graph's metadata, its image shape."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
    names = [i.name for i in session.get_inputs()]
    if tuple(names) != INPUT_NAMES:
        raise ConfigError(f"ckpt_path: {path} has inputs {names}, expected {list(INPUT_NAMES)}")

    def run(images: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {names[0]: images, names[1]: sizes})

    metadata = session.get_modelmeta().custom_metadata_map
    return run, metadata, list(session.get_inputs()[0].shape)


def _load_detector(cfg: DictConfig, output: Path) -> tuple[Detector, ClassInfo, tuple[int, int]]:
    """The detector of ``cfg.backend``, the class names/ids and the network input size."""
    is_onnx = str(cfg.ckpt_path).lower().endswith(".onnx")
    if cfg.backend == "torch":
        if is_onnx:
            raise ConfigError(f"ckpt_path: {cfg.ckpt_path} is an ONNX graph: use backend=onnx")
        checkpoint = read_checkpoint(cfg.ckpt_path)
        model = build_inference_model(cfg, checkpoint)
        classes = resolve_classes(cfg, checkpoint, model.postprocessor.num_classes)
        return _torch_detector(model), classes, image_size_of(cfg)
    path = cfg.ckpt_path
    if not is_onnx:
        path = export_checkpoint(cfg, output / "model.onnx")
    elif not Path(path).is_file():
        raise ConfigError(f"ckpt_path: no such file {path}")
    detector, metadata, shape = _onnx_detector(path)
    if "class_names" in metadata:
        names = json.loads(metadata["class_names"])
        ids = json.loads(metadata["category_ids"]) if "category_ids" in metadata else None
        classes = ClassInfo.complete(names, ids, len(names), f"the metadata of {path}")
    else:
        names, ids = classes_from_data(cfg.data)
        classes = ClassInfo.complete(names, ids, cfg.data.num_classes, f"data of {path}")
    fixed = all(isinstance(d, int) for d in shape[-2:])
    size = (int(shape[-2]), int(shape[-1])) if fixed else image_size_of(cfg)
    return detector, classes, size


def _numbered_ids(sources: Sources) -> dict[str, int] | None:
    """``{file name: number}`` when every source is an image with a distinct numeric stem."""
    if sources.videos or not all(p.stem.isdigit() for p in sources.images):
        return None
    ids = {str(sources.relative(p)): int(p.stem) for p in sources.images}
    return ids if len(set(ids.values())) == len(ids) else None


def _progress(items: Iterable[Any], total: int, description: str, show: bool) -> Iterable[Any]:
    from rich.progress import track

    return track(items, description=description, total=total, disable=not show)


def _draw(picture: _Picture, labels, boxes, scores, classes: ClassInfo) -> np.ndarray:
    from rtdetr_lit.visualize import draw_boxes

    if len(boxes) == 0:
        return picture.image
    image = torch.from_numpy(picture.image).permute(2, 0, 1)
    drawn = draw_boxes(
        image,
        torch.from_numpy(boxes),
        torch.from_numpy(labels),
        classes.names,
        torch.from_numpy(scores),
    )
    return drawn.permute(1, 2, 0).numpy()


def predict(cfg: DictConfig) -> dict[str, Any]:
    """The ``rtdetr_lit.predict`` command; returns the output paths and counts."""
    from PIL import Image

    prepare_run(cfg)
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"backend: {cfg.backend!r} is not one of {list(BACKENDS)}")
    if not 0.0 <= cfg.threshold <= 1.0:
        raise ConfigError(f"threshold: {cfg.threshold} is not in [0, 1]")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size: {cfg.batch_size} must be at least 1")
    sources = collect_sources(str(cfg.source))
    output = Path(cfg.output)
    for path in [*sources.images, *sources.videos]:
        if (output / sources.relative(path)).resolve() == path.resolve():
            raise ConfigError(f"output: {output} would overwrite the source {path}")
    output.mkdir(parents=True, exist_ok=True)
    detector, classes, size = _load_detector(cfg, output)
    run = {
        "detector": detector,
        "transform": build_transforms(size, None),
        "batch_size": cfg.batch_size,
        "threshold": cfg.threshold,
    }

    numbered = _numbered_ids(sources)
    results: list[dict[str, Any]] = []
    written: list[Path] = []
    count = 0

    def record(picture: _Picture, labels, boxes, scores) -> None:
        nonlocal count
        image_id = numbered[picture.name] if numbered is not None else count
        count += 1
        for label, box, score in zip(labels.tolist(), boxes.tolist(), scores.tolist(), strict=True):
            entry = {
                "image_id": image_id,
                "category_id": classes.category_ids[label],
                "bbox": [round(v, 2) for v in (box[0], box[1], box[2] - box[0], box[3] - box[1])],
                "score": round(score, 5),
                "file_name": picture.name,
            }
            if picture.frame is not None:
                entry["frame"] = picture.frame
            results.append(entry)

    if sources.images:
        stream = _detect(_read_images(sources.images, sources), **run)
        many = len(sources.images) > 1
        for picture, labels, boxes, scores in _progress(
            stream, len(sources.images), "images", many
        ):
            record(picture, labels, boxes, scores)
            target = output / picture.name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_draw(picture, labels, boxes, scores, classes)).save(target)
            written.append(target)
    for video in sources.videos:
        written.append(_predict_video(video, sources, output, run, classes, record))

    results_path = output / RESULTS_FILE
    results_path.write_text(json.dumps(results))
    log.info(
        "%d detections (score >= %.2f) in %d pictures; annotated copies and %s in %s",
        len(results),
        cfg.threshold,
        count,
        RESULTS_FILE,
        output,
    )
    return {"results": results_path, "outputs": written, "pictures": count}


def _predict_video(
    video: Path,
    sources: Sources,
    output: Path,
    run: dict[str, Any],
    classes: ClassInfo,
    record: Callable[..., None],
) -> Path:
    """Detect in every frame of ``video``; write the annotated frames as ``<name>.mp4``."""
    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise ConfigError(f"source: cannot open the video {video}")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    name = str(sources.relative(video))
    target = (output / name).with_suffix(".mp4")
    target.parent.mkdir(parents=True, exist_ok=True)
    writer: cv2.VideoWriter | None = None
    try:
        stream = _detect(_read_frames(capture, name), **run)
        for picture, labels, boxes, scores in _progress(stream, total, video.name, True):
            record(picture, labels, boxes, scores)
            frame = cv2.cvtColor(_draw(picture, labels, boxes, scores, classes), cv2.COLOR_RGB2BGR)
            if writer is None:
                fourcc = cv2.VideoWriter.fourcc(*"mp4v")
                writer = cv2.VideoWriter(str(target), fourcc, fps, frame.shape[1::-1])
            writer.write(frame)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if writer is None:
        raise ConfigError(f"source: no frame could be read from the video {video}")
    return target


@hydra_main("predict")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    predict(cfg)


if __name__ == "__main__":
    main()
