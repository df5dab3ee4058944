"""The Python inference API: ``rtdetr_lit.load(path).predict(images)``.

::

    import rtdetr_lit

    detector = rtdetr_lit.load("logs/train/runs/<date>/model.safetensors")  # or .ckpt, .onnx
    for found in detector.predict("photos/*.jpg", threshold=0.5):
        print(found.to_dict())  # boxes (xyxy, original pixels), scores, labels, class names

Images go through exactly the validation preprocessing (resize to the recorded input size, RGB
scaled to [0, 1]) and the detector's post-processing, so the results are those of
``python -m rtdetr_lit.predict`` and of ``eval``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rtdetr_lit.inference import INPUT_NAMES, ClassInfo, InferenceModel, read_checkpoint

__all__ = ["PRECISIONS", "Detections", "Detector", "load"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_NO_BOXES = np.zeros((0, 4), np.float32)

# (images float32 (B, 3, H, W) in [0, 1], sizes int64 (B, 2) as (w, h)) -> labels, boxes, scores
Runner = Callable[[np.ndarray, np.ndarray], Sequence[np.ndarray]]


@dataclass(frozen=True)
class Detections:
    """The objects found in one image, best score first.

    Attributes:
        xyxy: (K, 4) float32 boxes as (x1, y1, x2, y2) in the original image's pixels.
        scores: (K,) float32 in [0, 1].
        labels: (K,) int64 contiguous class indices.
        class_names: the name of each detection's class (K names).
        category_ids: (K,) int64 dataset category ids (COCO ids for COCO-trained models).
        image_size: (height, width) of the original image.
    """

    xyxy: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    category_ids: np.ndarray
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.scores)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, ready for ``json.dumps``."""
        return {
            "boxes": self.xyxy.tolist(),
            "scores": self.scores.tolist(),
            "labels": self.labels.tolist(),
            "class_names": list(self.class_names),
            "category_ids": self.category_ids.tolist(),
            "image_size": list(self.image_size),
        }


class Detector:
    """A loaded detector with its pre- and post-processing; see :func:`load`.

    Args:
        runner: computes ``(labels, boxes, scores)`` for a preprocessed batch (numpy).
        classes: name and category id of every label.
        image_size: (height, width) the images are resized to.
        model: the torch module behind ``runner`` (``None`` for ONNX Runtime).
    """

    def __init__(
        self,
        runner: Runner | None,
        classes: ClassInfo,
        image_size: Sequence[int],
        model: InferenceModel | None = None,
        precision: str = "fp32",
    ) -> None:
        from rtdetr_lit.data.transforms import build_transforms
        from rtdetr_lit.sizes import check_sizes

        if (runner is None) == (model is None):
            raise ValueError("Detector: give either a runner or a torch model")
        self.model = model
        self._runner = runner
        self.classes = classes
        height, width = check_sizes(image_size, "image_size", 2)
        self.image_size = (height, width)
        self._transform = build_transforms(self.image_size, None)
        self.precision = precision

    # -- device and precision ------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        if self.model is None:
            return torch.device("cpu")
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Detector:
        """Move the torch model to ``device`` (``"cuda"``, ``"cuda:1"``, ``"cpu"``); return self."""
        if self.model is None:
            raise ValueError(
                "an ONNX Runtime detector picks its device when loaded: load(..., device=)"
            )
        self.model.to(resolve_device(device))
        return self

    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        if value not in PRECISIONS:
            raise ValueError(f"precision: {value!r} is not one of {list(PRECISIONS)}")
        if value != "fp32" and self.model is None:
            raise ValueError("precision: an ONNX graph runs in the precision it was exported in")
        self._precision = value

    # -- prediction --------------------------------------------------------------------------
    def predict(self, inputs: Any, threshold: float = 0.5, batch_size: int = 8) -> list[Detections]:
        """Detect objects in ``inputs``: a path, a glob pattern, a list of paths, a numpy HWC
        uint8 RGB array, a PIL image, a CHW tensor (uint8, or float in [0, 1]), or a list of
        those. Returns one :class:`Detections` per image, in order; detections scoring below
        ``threshold`` are dropped."""
        return list(self.predict_stream(to_images(inputs), threshold, batch_size))

    def predict_stream(
        self, images: Iterable[np.ndarray], threshold: float = 0.5, batch_size: int = 8
    ) -> Iterator[Detections]:
        """:meth:`predict` for an iterable of HWC uint8 RGB arrays (video frames, a large folder),
        one :class:`Detections` at a time. On a GPU the next batch is read and resized in a
        background thread while the network runs on the current one."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold: {threshold} is not in [0, 1]")
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} must be at least 1")
        batches = _batched(iter(images), batch_size)

        def read_next() -> tuple[np.ndarray, np.ndarray] | None:
            return self._prepare(next(batches, None))

        if self.device.type == "cpu":
            # The CPU's cores are the network's: a reading thread beside its threads slows it.
            while (prepared := read_next()) is not None:
                yield from self._detect(*prepared, threshold)
            return
        # One task at a time: the generator is only ever advanced by the pool's thread.
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(read_next)
            while (prepared := pending.result()) is not None:
                pending = pool.submit(read_next)
                yield from self._detect(*prepared, threshold)

    def _prepare(self, batch: list[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The validation preprocessing of ``batch``: resized, [0, 1] floats, CHW; and the
        original sizes as (w, h)."""
        if batch is None:
            return None
        images = np.empty((len(batch), 3, *self.image_size), np.float32)
        for i, image in enumerate(batch):
            resized = self._transform(
                image=image, bboxes=_NO_BOXES, box_index=np.zeros(0, np.int64)
            )["image"]
            np.divide(resized.transpose(2, 0, 1), np.float32(255.0), out=images[i])
        sizes = np.array([(image.shape[1], image.shape[0]) for image in batch], np.int64)
        return images, sizes

    def _detect(
        self, images: np.ndarray, sizes: np.ndarray, threshold: float
    ) -> Iterator[Detections]:
        labels, boxes, scores = self._run(images, sizes)
        names = np.array(self.classes.names, dtype=object)
        ids = np.asarray(self.classes.category_ids, np.int64)
        for i in range(len(images)):
            keep = scores[i] >= threshold
            kept = labels[i][keep].astype(np.int64)
            yield Detections(
                xyxy=boxes[i][keep].astype(np.float32),
                scores=scores[i][keep].astype(np.float32),
                labels=kept,
                class_names=tuple(names[kept]),
                category_ids=ids[kept],
                image_size=(int(sizes[i][1]), int(sizes[i][0])),
            )

    def _run(self, images: np.ndarray, sizes: np.ndarray) -> Sequence[np.ndarray]:
        if self.model is None:
            return self._runner(images, sizes)
        device = self.device
        dtype = PRECISIONS[self.precision]
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
        with torch.inference_mode(), autocast:
            outputs = self.model(
                torch.from_numpy(images).to(device, non_blocking=True),
                torch.from_numpy(sizes).to(device),
            )
        return [
            t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy() for t in outputs
        ]


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def to_images(inputs: Any) -> Iterator[np.ndarray]:
    """Every image of ``inputs`` (see :meth:`Detector.predict`) as HWC uint8 RGB, lazily."""
    from PIL import Image

    if isinstance(inputs, (str, os.PathLike)):
        yield from (_read(p) for p in _expand(str(inputs)))
    elif isinstance(inputs, np.ndarray):
        yield _from_array(inputs)
    elif isinstance(inputs, torch.Tensor):
        yield _from_tensor(inputs)
    elif isinstance(inputs, Image.Image):
        yield np.asarray(inputs.convert("RGB"))
    elif isinstance(inputs, Iterable):
        for item in inputs:
            if isinstance(item, (list, tuple)):
                raise TypeError("predict: nested lists of images are not supported")
            yield from to_images(item)
    else:
        raise TypeError(
            f"predict: cannot read an image from {type(inputs).__name__}; give a path, a glob, a "
            "numpy HWC uint8 RGB array, a PIL image, a CHW tensor or a list of those"
        )


def _expand(text: str) -> list[str]:
    if os.path.isfile(text):
        return [text]
    if glob.has_magic(text):
        found = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p))
        if found:
            return found
        raise FileNotFoundError(f"predict: no file matches {text}")
    raise FileNotFoundError(f"predict: no such image file {text}")


def _read(path: str) -> np.ndarray:
    from rtdetr_lit.data.decode import read_image

    return read_image(path)


def _from_array(array: np.ndarray) -> np.ndarray:
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"predict: a numpy image must be HWC uint8 RGB, got shape {array.shape} {array.dtype}"
        )
    return np.ascontiguousarray(array)


def _from_tensor(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"predict: a tensor image must be CHW RGB, got {tuple(tensor.shape)}")
    if tensor.dtype != torch.uint8:
        if not tensor.is_floating_point():
            raise ValueError(f"predict: a tensor image must be uint8 or float, got {tensor.dtype}")
        # The validation pipeline starts from 8-bit pixels, as decoded files are.
        tensor = (tensor.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(tensor.permute(1, 2, 0).cpu().numpy())


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else the CPU; else as torch reads it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device: {device} is not available here (torch.cuda.is_available() is False); "
            "use device=cpu, or device=auto to take CUDA when there is one"
        )
    return resolved


def onnx_runner(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> tuple[Runner, ClassInfo | None, tuple[int, int] | None]:
    """An ONNX Runtime session on ``path`` (the CUDA provider when installed and the device is not
    the CPU): the runner, the classes the graph's metadata names (``None`` when it names none)
    and the (height, width) its image input fixes (``None`` when it is dynamic)."""
    import json

    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if resolve_device(device).type == "cuda" and "CUDAExecutionProvider" in available:
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), providers=providers)
    names = [i.name for i in session.get_inputs()]
    if tuple(names) != INPUT_NAMES:
        raise ValueError(f"{path} has inputs {names}, expected {list(INPUT_NAMES)}")

    def run(images: np.ndarray, sizes: np.ndarray) -> Sequence[np.ndarray]:
        return session.run(None, {names[0]: images, names[1]: sizes})

    metadata = session.get_modelmeta().custom_metadata_map
    classes = None
    if "class_names" in metadata:
        labels = json.loads(metadata["class_names"])
        ids = json.loads(metadata["category_ids"]) if "category_ids" in metadata else None
        classes = ClassInfo.complete(labels, ids, len(labels), f"the metadata of {path}")
    shape = session.get_inputs()[0].shape[-2:]
    fixed = (int(shape[0]), int(shape[1])) if all(isinstance(d, int) for d in shape) else None
    return run, classes, fixed


def load(
    path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    precision: str = "fp32",
    model: str | None = None,
    image_size: Sequence[int] | None = None,
) -> Detector:
    """Load a detector from a file.

    Args:
        path: a checkpoint of this package (``.ckpt``), its shareable ``model.safetensors``, a
            file written by ``python -m rtdetr_lit.convert``, a reference RT-DETRv2 checkpoint
            (give ``model``), or an ONNX graph from ``python -m rtdetr_lit.export``.
        device: ``"cuda"``, ``"cpu"``, ...; ``None`` = CUDA when available, else the CPU.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; for GPUs).
        model: the zoo size (``"r50"``, ...) of a file that does not record it.
        image_size: (height, width) input size; default: the recorded one (640x640 for files
            without a record).
    """

    if str(path).lower().endswith(".onnx"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file {path}")
        runner, classes, fixed = onnx_runner(path, device)
        if classes is None:
            raise ValueError(f"{path}: the graph holds no class names (not written by export?)")
        size = fixed or image_size
        if size is None:
            raise ValueError(f"{path}: give image_size, the graph does not fix it")
        return Detector(runner, classes, size)
    net, classes, size = _build_from_file(path, model)
    detector = Detector(None, classes, image_size or size, model=net, precision=precision)
    return detector.to(resolve_device(device))


def _build_from_file(
    path: str | os.PathLike[str], model: str | None
) -> tuple[InferenceModel, ClassInfo, tuple[int, int]]:
    from rtdetr_lit.checkpoints import infer_num_classes, load_weights_into, model_state_dict
    from rtdetr_lit.models import RTDETRPostProcessor, create_model

    checkpoint = read_checkpoint(path)
    record = checkpoint.record
    if record is not None:
        if model is not None and model != record.model:
            raise ValueError(f"{path} holds a {record.model} detector, not model={model}")
        net = record.build_net()
        postprocessor = RTDETRPostProcessor(record.num_classes, record.num_top_queries)
        size = record.image_size
    else:
        meta = checkpoint.contents.get("meta") if isinstance(checkpoint.contents, dict) else None
        name = model or (meta or {}).get("name")
        if name is None:
            raise ValueError(
                f"{path} does not record which detector it holds (a reference checkpoint?): "
                "give its size, e.g. rtdetr_lit.load(path, model='r50')"
            )
        num_classes = infer_num_classes(model_state_dict(checkpoint.contents))
        if num_classes is None:
            raise ValueError(f"{path}: no score head found, not an RT-DETRv2 checkpoint")
        net = create_model(name, num_classes=num_classes)
        postprocessor = RTDETRPostProcessor(num_classes, 300)
        size = (640, 640)
    skipped = load_weights_into(net, checkpoint.contents, checkpoint.path)
    if skipped:
        raise ValueError(f"{path} does not fit its model (differs in: {', '.join(skipped)})")
    names, ids = checkpoint.classes()
    classes = ClassInfo.complete(names, ids, postprocessor.num_classes, str(path))
    return InferenceModel(net, postprocessor), classes, (int(size[0]), int(size[1]))
