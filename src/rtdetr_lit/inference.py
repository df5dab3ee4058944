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
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from torch import nn

from rtdetr_lit.checkpoints import (
    load_checkpoint_file,
    load_weights_into,
    read_safetensors_metadata,
)
from rtdetr_lit.config import ConfigError
from rtdetr_lit.record import RECORD_KEY, ModelRecord, plain
from rtdetr_lit.run import derive_num_classes
from rtdetr_lit.sizes import check_sizes
from rtdetr_lit.weights import WeightsError, entry, is_name, read_weights, record_for

__all__ = [
    "INFERENCE_SETTINGS",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "Checkpoint",
    "ClassInfo",
    "InferenceModel",
    "apply_record",
    "build_inference_model",
    "classes_from_data",
    "given_overrides",
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
    """A weights file read once: its path, what :func:`load_checkpoint_file` returned, and the
    record of the detector it holds (``None`` for reference, HF and converted files)."""

    path: str
    contents: Any
    record: ModelRecord | None = None

    @property
    def hyper_parameters(self) -> Mapping[str, Any]:
        """A Lightning checkpoint's saved ``RTDETRModule`` arguments; empty for other files."""
        hparams = (
            self.contents.get("hyper_parameters") if isinstance(self.contents, Mapping) else None
        )
        return hparams if isinstance(hparams, Mapping) else {}

    def classes(self) -> tuple[list[str] | None, list[int] | None]:
        """Class names and category ids the file holds: its record's, else a Lightning
        checkpoint's hyper-parameters; ``None`` where it holds none."""
        if self.record is not None:
            return list(self.record.class_names), list(self.record.category_ids)
        hparams = self.hyper_parameters
        return hparams.get("class_names"), hparams.get("category_ids")


def read_checkpoint(path: str | os.PathLike[str] | None) -> Checkpoint:
    """Read ``ckpt_path`` once (no code in it runs): a file, or the name of released weights
    (:mod:`rtdetr_lit.weights`, fetched into the cache when needed), whose record the registry
    supplies. A missing file or a broken record is a :class:`ConfigError` naming the file."""
    if is_name(path):
        item = entry(str(path))
        contents, source = read_weights(item.name)
        return Checkpoint(source, contents, record_for(item))
    if path is None or not os.path.isfile(path):
        if isinstance(path, str) and "/" not in path and not os.path.splitext(path)[1]:
            try:  # not a file, maybe a mistyped name: the registry suggests the nearest
                entry(path)
            except WeightsError as err:
                raise ConfigError(f"ckpt_path: {path} is not a file, and {err}") from None
        raise ConfigError(f"ckpt_path: no such file {path}")
    contents = load_checkpoint_file(path)
    try:
        if str(path).lower().endswith(".safetensors"):
            text = read_safetensors_metadata(path).get(RECORD_KEY)
            record = ModelRecord.from_json(text, str(path)) if text is not None else None
        elif isinstance(contents, Mapping) and isinstance(contents.get(RECORD_KEY), Mapping):
            record = ModelRecord.from_dict(contents[RECORD_KEY], str(path))
        else:
            record = None
    except ValueError as err:
        raise ConfigError(f"ckpt_path: {err}") from None
    return Checkpoint(str(path), contents, record)


# Settings meant to change at inference, which a checkpoint's record does not fix.
INFERENCE_SETTINGS = ("eval_idx", "sampling_method", "discrete_snap")


def given_overrides() -> dict[str, str]:
    """The command line's overrides as ``{key: value}`` (``model=r18`` gives ``model``): what the
    user set, as opposed to a default of the entry config."""
    if not HydraConfig.initialized():
        return {}
    given = {}
    for text in HydraConfig.get().overrides.task:
        key, _, value = text.lstrip("+~").partition("=")
        given[key] = value
    return given


def apply_record(cfg: DictConfig, checkpoint: Checkpoint) -> None:
    """Make ``cfg`` build the detector that ``checkpoint`` records, in place.

    The model, its number of classes and input size come from the record (the run's data config
    too, when the command names none), so ``ckpt_path=`` alone is enough. A ``model=``/``data=``
    setting the command gives that contradicts the record is a :class:`ConfigError` naming both
    values; settings meant for inference (:data:`INFERENCE_SETTINGS`, the input size) may differ.
    A file without a record (reference, Hugging Face, converted) needs ``model=`` on the command
    line, as for training.
    """
    record, given = checkpoint.record, given_overrides()
    with open_dict(cfg):  # the checkpoint holds the whole detector, its backbone too
        cfg.model.net.backbone_weights = None
    if record is None:
        if not {"model", "experiment"} & given.keys():
            raise ConfigError(
                f"model: {checkpoint.path} holds no record of the detector it was trained as (a "
                "reference, Hugging Face or converted file): name its size and data as for "
                "training, e.g. model=r50 data=coco"
            )
        derive_num_classes(cfg)
        return
    _check_agrees(cfg, record, given, checkpoint.path)
    recorded = record.config or {}
    # What the command sets inside model and data applies on top of the record (inference
    # settings, the input size, the data's paths); _check_agrees refused any contradiction.
    settings = {
        key: OmegaConf.select(cfg, key)
        for key in given
        if key.startswith(("model.", "data.")) and OmegaConf.select(cfg, key) is not None
    }
    with open_dict(cfg):
        if "model" in recorded:  # the run's model config: its criterion and post-processor
            cfg.model = OmegaConf.create(recorded["model"])
            cfg.model.init_from = None
        if not {"data", "experiment"} & given.keys() and "data" in recorded:
            cfg.data = OmegaConf.create(recorded["data"])
        net = cfg.model.net
        net.update(record.spec())
        net.name, net.num_classes = record.model, record.num_classes
        cfg.model.postprocessor.num_classes = record.num_classes
        cfg.model.postprocessor.num_top_queries = record.num_top_queries
        if "criterion" in cfg.model:
            cfg.model.criterion.num_classes = record.num_classes
        cfg.data.num_classes = record.num_classes
        if "image_size" in cfg and "image_size" not in given:
            cfg.image_size = list(record.image_size)
        for key, value in settings.items():
            OmegaConf.update(cfg, key, value, force_add=True)


def _check_agrees(
    cfg: DictConfig, record: ModelRecord, given: Mapping[str, str], path: str
) -> None:
    spec = record.spec()
    checks: list[tuple[str, Any, Any]] = []  # (key, what the command says, what the record says)
    if {"model", "experiment"} & given.keys():
        checks.append(("model", cfg.model.net.name, record.model))
    for key in given:
        field = key.removeprefix("model.net.")
        if field != key and field in spec and field not in INFERENCE_SETTINGS:
            checks.append((key, OmegaConf.select(cfg, key), spec[field]))
    if {"sampling", "sampling.num_points", "experiment"} & given.keys():
        checks.append(("sampling.num_points", cfg.model.net.num_points, spec["num_points"]))
    if {"data", "data.num_classes", "experiment"} & given.keys() and cfg.data.num_classes:
        checks.append(("data.num_classes", cfg.data.num_classes, record.num_classes))
    for key, said, recorded in checks:
        said = OmegaConf.to_container(said) if isinstance(said, ListConfig) else said
        if plain(said) != plain(recorded):
            raise ConfigError(
                f"{key}: {path} holds a detector trained with {key}={_text(recorded)}, but the "
                f"command says {key}={_text(said)}. Leave it out (the checkpoint describes "
                f"itself); only {', '.join(INFERENCE_SETTINGS)} and the input size may differ"
            )


def _text(value: Any) -> str:
    return (
        json.dumps(plain(value)).replace(" ", "")
        if isinstance(value, (list, tuple))
        else str(value)
    )


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
    """Class names and category ids for ``checkpoint``, first found wins: the file's own
    (:meth:`Checkpoint.classes`), the data config's datamodule (:func:`classes_from_data`), then
    ``"class N"`` and the contiguous labels."""
    names, ids = checkpoint.classes()
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
