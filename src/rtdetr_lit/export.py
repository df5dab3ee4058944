"""Export a checkpoint to ONNX: ``python -m rtdetr_lit.export ckpt_path=PATH [model=... data=...]``.

The graph holds the whole detector with its post-processing (docs/rtdetrv2.md §8), RepVGG blocks and
conv+BN pairs fused (``RTDETR.deploy``):

* inputs ``images`` float (N, 3, H, W) in [0, 1] at the fixed ``image_size``, and
  ``orig_target_sizes`` int64 (N, 2) as (width, height) of the original pictures;
* outputs ``labels`` int64 (N, K) contiguous class indices, ``boxes`` float (N, K, 4) xyxy in
  original pixels, ``scores`` float (N, K), sorted by decreasing score;
* N is dynamic; the model's metadata holds ``class_names`` and ``category_ids`` (JSON lists) so
  that a graph can be used without its training config.

``ckpt_path`` is a Lightning checkpoint of a run (its EMA weights), a file written by
``python -m rtdetr_lit.convert`` or a reference RT-DETRv2 checkpoint. With
``model.net.sampling_method=discrete`` the graph contains no GridSample node.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from rtdetr_lit.config import CONFIG_DIR, ConfigError, register_schemas
from rtdetr_lit.utils import load_checkpoint_weights, prepare_run

__all__ = [
    "INPUT_NAMES",
    "MIN_OPSET",
    "OUTPUT_NAMES",
    "ClassInfo",
    "InferenceModel",
    "build_inference_model",
    "classes_from_data",
    "export",
    "export_checkpoint",
    "export_onnx",
    "image_size_of",
    "resolve_classes",
]

log = logging.getLogger(__name__)

register_schemas()

INPUT_NAMES = ("images", "orig_target_sizes")
OUTPUT_NAMES = ("labels", "boxes", "scores")
# LayerNormalization, used by the encoder and decoder, is an ONNX operator from opset 17 on.
MIN_OPSET = 17


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


def _classes_from_checkpoint(path: str) -> tuple[list[str] | None, list[int] | None]:
    """``class_names``/``category_ids`` saved in a Lightning checkpoint's hyper-parameters."""
    from rtdetr_lit.checkpoints import load_checkpoint_file

    obj = load_checkpoint_file(path)
    hparams = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
    if not isinstance(hparams, Mapping):
        return None, None
    return hparams.get("class_names"), hparams.get("category_ids")


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


def resolve_classes(cfg: DictConfig, num_classes: int) -> ClassInfo:
    """Class names and category ids for ``cfg.ckpt_path``, first found wins: the checkpoint's
    hyper-parameters (``RTDETRModule(class_names=..., category_ids=...)``), the data config's
    datamodule (:func:`classes_from_data`), then ``"class N"`` and the contiguous labels."""
    names, ids = _classes_from_checkpoint(cfg.ckpt_path)
    source = f"ckpt_path {cfg.ckpt_path}"
    if names is None and ids is None:
        names, ids = classes_from_data(cfg.data)
        source = f"data={cfg.data._target_}"
    if names is None:
        log.warning("no class names in %s or the data config: using 'class N'", cfg.ckpt_path)
    return ClassInfo.complete(names, ids, num_classes, source)


def build_inference_model(cfg: DictConfig) -> InferenceModel:
    """The model of ``cfg.model`` with the weights of ``cfg.ckpt_path``, fused, in eval mode."""
    from hydra.utils import instantiate

    module = instantiate(cfg.model, init_from=None)
    load_checkpoint_weights(module.net, cfg)
    return InferenceModel(module.net, module.postprocessor)


def image_size_of(cfg: DictConfig) -> tuple[int, int]:
    """``cfg.image_size`` as (height, width), checked: two positive multiples of 32."""
    size = tuple(int(v) for v in cfg.image_size)
    if len(size) != 2 or any(v <= 0 or v % 32 for v in size):
        raise ConfigError(f"image_size must be [height, width], multiples of 32: {cfg.image_size}")
    return size  # type: ignore[return-value]


def export_onnx(
    model: InferenceModel,
    path: str | os.PathLike[str],
    image_size: Sequence[int],
    opset: int = MIN_OPSET,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` as an ONNX graph with a dynamic batch and check it with ``onnx.checker``.

    Args:
        model: the fused detector with post-processing.
        path: the ``.onnx`` file to write (its folder is created).
        image_size: (height, width) of the ``images`` input.
        opset: ONNX opset, at least :data:`MIN_OPSET`.
        metadata: string entries stored in the model's ``metadata_props``.
    """
    import onnx

    if opset < MIN_OPSET:
        raise ConfigError(f"opset: {opset} is too old, the graph needs opset {MIN_OPSET} or newer")
    height, width = image_size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Batch 2 while tracing, so that no size-1 batch dimension is folded into a constant. The
    # example inputs go where the model's weights are, in their floating dtype.
    weight = next(model.parameters())
    images = torch.rand(2, 3, height, width, dtype=weight.dtype, device=weight.device)
    sizes = torch.tensor(
        [[width, height], [2 * width, height]], dtype=torch.int64, device=weight.device
    )
    batch = {0: "batch"}
    with warnings.catch_warnings():
        # The model's input checks (shape, token count) become constants of the trace: expected.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # The TorchScript-based exporter is deliberate (the dynamo one needs onnxscript): silence
        # its deprecation notices.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (images, sizes),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dict.fromkeys((*INPUT_NAMES, *OUTPUT_NAMES), batch),
            do_constant_folding=True,
        )
    graph = onnx.load(str(path))
    for key, value in (metadata or {}).items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))
    return path


def export_checkpoint(cfg: DictConfig, path: str | os.PathLike[str]) -> Path:
    """Build the model of ``cfg``, load ``cfg.ckpt_path`` and write it as ONNX to ``path``, with
    the class names and category ids (:func:`resolve_classes`) in the graph's metadata."""
    image_size = image_size_of(cfg)
    model = build_inference_model(cfg)
    classes = resolve_classes(cfg, model.postprocessor.num_classes)
    metadata = {
        **classes.to_metadata(),
        "model": str(cfg.model.net.name),
        "sampling_method": model.net.sampling_method,
        "discrete_snap": model.net.discrete_snap,
        "image_size": json.dumps(list(image_size)),
    }
    path = export_onnx(model, path, image_size, cfg.opset, metadata)
    log.info("wrote %s (%s sampling, input %dx%d)", path, model.net.sampling_method, *image_size)
    return path


def export(cfg: DictConfig) -> Path:
    """The ``rtdetr_lit.export`` command: :func:`export_checkpoint` to ``cfg.output``."""
    if cfg.format != "onnx":
        raise ConfigError(f"format: {cfg.format!r} is not supported; use format=onnx")
    prepare_run(cfg)
    return export_checkpoint(cfg, cfg.output)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def main(cfg: DictConfig) -> Any:
    """Hydra entry point."""
    return export(cfg)


if __name__ == "__main__":
    main()
