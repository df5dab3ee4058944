"""Inference in one room: a checkpoint read once, the fused detector with its post-processing, the
class names and the network input size that ``eval``, ``export`` and ``predict`` share.

The interface of :class:`InferenceModel` is the exported ONNX graph's:

* inputs ``images`` float (N, 3, H, W) in [0, 1] and ``orig_target_sizes`` int64 (N, 2) as
  (width, height) of the original pictures;
* outputs ``labels`` int64 (N, K) contiguous class indices, ``boxes`` float (N, K, 4) xyxy in
  original pixels, ``scores`` float (N, K), sorted by decreasing score (docs/rtdetrv2.md §8).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from rtdetr_lit.checkpoints import load_checkpoint_file, load_weights_into
from rtdetr_lit.config import ConfigError
from rtdetr_lit.sizes import check_sizes

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "Checkpoint",
    "ClassInfo",
    "InferenceModel",
    "build_inference_model",
    "classes_from_data",
    "image_size_of",
    "load_checkpoint_weights",
    "read_checkpoint",
    "resolve_classes",
]

log = logging.getLogger(__name__)

INPUT_NAMES = ("images", "orig_target_sizes")
OUTPUT_NAMES = ("labels", "boxes", "scores")


class InferenceModel(nn.Module):
    """Detector and post-processor as one module: ``(images, orig_target_sizes) -> (labels, boxes,
    scores)``, exactly what the ONNX graph computes. Fuses ``net`` for deployment (in place)."""

    def __init__(self, net: nn.Module, postprocessor: nn.Module) -> None:
        super().__init__()
        self.net = net.deploy()
        self.postprocessor = postprocessor.deploy()
        self.eval()

    def forward(
        self, images: torch.Tensor, orig_target_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.postprocessor(self.net(images), orig_target_sizes)


@dataclass(frozen=True)
class Checkpoint:
    """A weights file read once: its path and what :func:`load_checkpoint_file` returned."""

    path: str
    contents: Any

    @property
    def hyper_parameters(self) -> Mapping[str, Any]:
        """A Lightning checkpoint's saved ``RTDETRModule`` arguments; empty for other files."""
        hparams = (
            self.contents.get("hyper_parameters") if isinstance(self.contents, Mapping) else None
        )
        return hparams if isinstance(hparams, Mapping) else {}


def read_checkpoint(path: str | os.PathLike[str] | None) -> Checkpoint:
    """Read ``ckpt_path`` from disk (no code in it runs); a missing file is a
    :class:`ConfigError`."""
    if path is None or not os.path.isfile(path):
        raise ConfigError(f"ckpt_path: no such file {path}")
    return Checkpoint(str(path), load_checkpoint_file(path))


def load_checkpoint_weights(net: nn.Module, checkpoint: Checkpoint, cfg: DictConfig) -> None:
    """Load ``checkpoint`` into the detector ``net``; a file that does not fit is an error.

    Any file :func:`rtdetr_lit.checkpoints.load_weights_into` takes works (a Lightning checkpoint's
    EMA weights, a converted or a reference checkpoint); unlike training's ``init_from``, class
    tensors of another shape are refused, since they would leave the model untrained there.
    """
    skipped = load_weights_into(net, checkpoint.contents, checkpoint.path)
    if skipped:
        raise ConfigError(
            f"ckpt_path: {checkpoint.path} does not fit model={cfg.model.net.name} with "
            f"{cfg.data.num_classes} classes (differs in: {', '.join(skipped)})"
        )
    log.info("loaded %s", checkpoint.path)


def build_inference_model(cfg: DictConfig, checkpoint: Checkpoint) -> InferenceModel:
    """The model of ``cfg.model`` with the weights of ``checkpoint``, fused, in eval mode."""
    from hydra.utils import instantiate

    module = instantiate(cfg.model, init_from=None)
    load_checkpoint_weights(module.net, checkpoint, cfg)
    return InferenceModel(module.net, module.postprocessor)


@dataclass(frozen=True)
class ClassInfo:
    """Name and dataset category id of every contiguous label."""

    names: tuple[str, ...]
    category_ids: tuple[int, ...]

    def to_metadata(self) -> dict[str, str]:
        return {
            "class_names": json.dumps(list(self.names)),
            "category_ids": json.dumps(list(self.category_ids)),
        }

    @classmethod
    def complete(
        cls,
        names: Sequence[str] | None,
        category_ids: Sequence[int] | None,
        num_classes: int,
        source: str,
    ) -> ClassInfo:
        """Fill what is missing: names ``"class N"``, category ids = the contiguous labels."""
        names = [f"class {i}" for i in range(num_classes)] if names is None else list(names)
        ids = list(range(num_classes)) if category_ids is None else list(category_ids)
        for what, values in (("class names", names), ("category ids", ids)):
            if len(values) != num_classes:
                raise ConfigError(
                    f"{source} gives {len(values)} {what} but the model has {num_classes} classes"
                )
        return cls(tuple(str(n) for n in names), tuple(int(i) for i in ids))


def classes_from_data(data_cfg: DictConfig) -> tuple[list[str] | None, list[int] | None]:
    """The datamodule's ``class_names``/``category_ids``: its own attributes when it has them
    without set-up, else read from the validation annotations if that file exists (a COCO JSON
    is parsed, no image is opened). ``(None, None)`` when neither is available."""
    from hydra.utils import instantiate

    dm = instantiate(data_cfg)
    if getattr(dm, "class_names", None) is not None:
        return dm.class_names, dm.category_ids
    images, annotations = getattr(dm, "paths", {}).get("val", (None, None))
    if annotations is None or not os.path.exists(annotations):
        return None, None
    try:
        ann = dm.read_annotations(images, annotations)
    except (OSError, ValueError) as err:  # names are only labels: say why, carry on without
        log.warning("could not read the class names from %s: %s", annotations, err)
        return None, None
    return list(ann.class_names), list(ann.category_ids)


def resolve_classes(cfg: DictConfig, checkpoint: Checkpoint, num_classes: int) -> ClassInfo:
    """Class names and category ids for ``checkpoint``, first found wins: its hyper-parameters
    (``RTDETRModule(class_names=..., category_ids=...)``), the data config's datamodule
    (:func:`classes_from_data`), then ``"class N"`` and the contiguous labels."""
    hparams = checkpoint.hyper_parameters
    names, ids = hparams.get("class_names"), hparams.get("category_ids")
    source = f"ckpt_path {checkpoint.path}"
    if names is None and ids is None:
        names, ids = classes_from_data(cfg.data)
        source = f"data={cfg.data._target_}"
    if names is None:
        log.warning("no class names in %s or the data config: using 'class N'", checkpoint.path)
    return ClassInfo.complete(names, ids, num_classes, source)


def image_size_of(cfg: DictConfig) -> tuple[int, int]:
    """``cfg.image_size`` as (height, width), checked: two positive multiples of 32."""
    try:
        height, width = check_sizes(cfg.image_size, "image_size", 2)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return height, width
