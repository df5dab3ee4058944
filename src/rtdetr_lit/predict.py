"""Detect objects: ``python -m rtdetr_lit.predict ckpt_path=PATH source=PATH [threshold=0.5]``.

``source`` is an image file, a folder of images (and videos), a glob pattern or a video file.
Written to ``output`` (by default the run directory):

* every picture with its detections drawn (boxes, class names, scores), under the same relative
  path and format as its source; every video as an annotated H.264 ``.mp4`` of the same frame
  rate, which browsers play (:mod:`rtdetr_lit.video`);
* ``predictions.json``: COCO-style results, one entry per detection with ``image_id``,
  ``category_id``, ``bbox`` ([x, y, width, height] in original pixels) and ``score``, plus
  ``file_name`` (and ``frame`` for videos). When every source is an image named by a number (as in
  COCO, ``000000397133.jpg``) that number is the ``image_id``, so the file evaluates directly
  against the dataset's annotations; otherwise pictures and frames are numbered from 0.

The detector is :class:`rtdetr_lit.api.Detector`, as ``rtdetr_lit.load`` returns it: images are
resized to ``image_size`` by the validation pipeline (no aspect kept); boxes come back in the
original pixels. A checkpoint of this package needs nothing else (its record names the model and
classes); reference and converted files need ``model=``/``data=``. ``device=auto`` runs on CUDA
when available, ``precision=bf16|fp16`` under autocast. ``backend=onnx`` runs the graph of
``python -m rtdetr_lit.export`` with ONNX Runtime (the CUDA provider when installed):
``ckpt_path`` may be such an ``.onnx`` file, any other checkpoint is exported first.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from rtdetr_lit.api import Detections, Detector, onnx_runner, resolve_device
from rtdetr_lit.cli import hydra_main
from rtdetr_lit.config import ConfigError, register_schemas
from rtdetr_lit.export import export_checkpoint
from rtdetr_lit.inference import (
    ClassInfo,
    apply_record,
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


def load_detector(cfg: DictConfig, output: Path) -> Detector:
    """The detector of ``cfg.backend`` on ``cfg.device`` for ``cfg.ckpt_path``."""
    is_onnx = str(cfg.ckpt_path).lower().endswith(".onnx")
    if cfg.backend == "torch":
        if is_onnx:
            raise ConfigError(f"ckpt_path: {cfg.ckpt_path} is an ONNX graph: use backend=onnx")
        checkpoint = read_checkpoint(cfg.ckpt_path)
        apply_record(cfg, checkpoint)
        model = build_inference_model(cfg, checkpoint)
        classes = resolve_classes(cfg, checkpoint, model.postprocessor.num_classes)
        detector = Detector(None, classes, image_size_of(cfg), model=model)
        try:
            detector.precision = cfg.precision
            return detector.to(resolve_device(cfg.device))
        except ValueError as err:  # names the setting: device or precision
            raise ConfigError(str(err)) from None
    if cfg.precision != "fp32":
        raise ConfigError("precision: an ONNX graph runs in the precision it was exported in")
    path = cfg.ckpt_path
    if not is_onnx:
        path = export_checkpoint(cfg, output / "model.onnx")
    elif not Path(path).is_file():
        raise ConfigError(f"ckpt_path: no such file {path}")
    runner, classes, fixed = onnx_runner(path, cfg.device)
    if classes is None:
        names, ids = classes_from_data(cfg.data)
        classes = ClassInfo.complete(names, ids, cfg.data.num_classes, f"data of {path}")
    return Detector(runner, classes, fixed or image_size_of(cfg))


def _numbered_ids(sources: Sources) -> dict[str, int] | None:
    """``{file name: number}`` when every source is an image with a distinct numeric stem."""
    if sources.videos or not all(p.stem.isdigit() for p in sources.images):
        return None
    ids = {str(sources.relative(p)): int(p.stem) for p in sources.images}
    return ids if len(set(ids.values())) == len(ids) else None


def _progress(items: Iterable[Any], total: int | None, description: str) -> Iterable[Any]:
    from rich.progress import track

    return track(items, description=description, total=total)


def _draw(image: np.ndarray, found: Detections, classes: ClassInfo) -> np.ndarray:
    from rtdetr_lit.visualize import draw_boxes

    if len(found) == 0:
        return image
    drawn = draw_boxes(
        torch.from_numpy(image).permute(2, 0, 1),
        torch.from_numpy(found.xyxy),
        torch.from_numpy(found.labels),
        classes.names,
        torch.from_numpy(found.scores),
    )
    return drawn.permute(1, 2, 0).numpy()


def _detect_each(
    detector: Detector, images: Iterable[np.ndarray], cfg: DictConfig
) -> Iterator[tuple[np.ndarray, Detections]]:
    """Each image with its detections; images are read once, lazily, a couple of batches ahead."""
    shown, fed = itertools.tee(images)
    found = detector.predict_stream(fed, cfg.threshold, cfg.batch_size)
    return zip(shown, found, strict=True)


def predict(cfg: DictConfig) -> dict[str, Any]:
    """The ``rtdetr_lit.predict`` command; returns the output paths and counts."""
    from PIL import Image

    from rtdetr_lit.data.decode import read_image

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
    detector = load_detector(cfg, output)
    log.info(
        "detector: %s on %s, input %dx%d",
        "ONNX Runtime" if detector.model is None else f"torch {detector.precision}",
        detector.device,
        *detector.image_size,
    )

    numbered = _numbered_ids(sources)
    results: list[dict[str, Any]] = []
    written: list[Path] = []
    count = 0

    def record(name: str, found: Detections, frame: int | None = None) -> None:
        nonlocal count
        image_id = numbered[name] if numbered is not None else count
        count += 1
        for box, score, category in zip(
            found.xyxy.tolist(), found.scores.tolist(), found.category_ids.tolist(), strict=True
        ):
            entry = {
                "image_id": image_id,
                "category_id": category,
                "bbox": [round(v, 2) for v in (box[0], box[1], box[2] - box[0], box[3] - box[1])],
                "score": round(score, 5),
                "file_name": name,
            }
            if frame is not None:
                entry["frame"] = frame
            results.append(entry)

    start = time.perf_counter()
    if sources.images:
        names = [str(sources.relative(p)) for p in sources.images]
        pictures = (read_image(p) for p in sources.images)
        stream = _detect_each(detector, pictures, cfg)
        for name, (image, found) in zip(
            names, _progress(stream, len(names), "images"), strict=True
        ):
            record(name, found)
            target = output / name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_draw(image, found, detector.classes)).save(target)
            written.append(target)
    for video in sources.videos:
        written.append(_predict_video(video, sources, output, detector, cfg, record))
    seconds = time.perf_counter() - start

    results_path = output / RESULTS_FILE
    results_path.write_text(json.dumps(results))
    log.info(
        "%d images and %d videos (%d pictures in all): %d detections with score >= %.2f; "
        "%.1f pictures/s",
        len(sources.images),
        len(sources.videos),
        count,
        len(results),
        cfg.threshold,
        count / seconds if seconds > 0 else 0.0,
    )
    log.info("annotated copies and %s in %s", RESULTS_FILE, output)
    return {"results": results_path, "outputs": written, "pictures": count}


def _predict_video(
    video: Path,
    sources: Sources,
    output: Path,
    detector: Detector,
    cfg: DictConfig,
    record: Callable[..., None],
) -> Path:
    """Detect in every frame of ``video``; write the annotated frames as a browser-playable
    video (``<name>.mp4``)."""
    from rtdetr_lit.video import VideoReader, VideoWriter

    name = str(sources.relative(video))
    try:
        reader = VideoReader(video)
    except ValueError as err:
        raise ConfigError(f"source: {err}") from None
    target = (output / name).with_suffix(".mp4")
    with reader, VideoWriter(target, reader.fps) as writer:
        stream = _detect_each(detector, reader, cfg)
        for frame, (image, found) in enumerate(_progress(stream, reader.frame_count, video.name)):
            record(name, found, frame)
            writer.write(_draw(image, found, detector.classes))
    if writer.frames == 0:
        raise ConfigError(f"source: no frame could be read from the video {video}")
    return writer.path


@hydra_main("predict")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    predict(cfg)


if __name__ == "__main__":
    main()
