"""Export a checkpoint to ONNX: ``python -m rtdetr_lit.export ckpt_path=PATH``.

The graph holds the whole detector with its post-processing (docs/rtdetrv2.md §8), RepVGG blocks and
conv+BN pairs fused (``RTDETR.deploy``):

* inputs ``images`` float (N, 3, H, W) in [0, 1] at the fixed ``image_size``, and
  ``orig_target_sizes`` int64 (N, 2) as (width, height) of the original pictures;
* outputs ``labels`` int64 (N, K) contiguous class indices, ``boxes`` float (N, K, 4) xyxy in
  original pixels, ``scores`` float (N, K), sorted by decreasing score;
* N is dynamic; the model's metadata holds ``class_names`` and ``category_ids`` (JSON lists) so
  that a graph can be used without its training config.

``ckpt_path`` is a Lightning checkpoint of a run (its EMA weights) or its ``model.safetensors``,
which record the detector, its classes and input size; or a file written by
``python -m rtdetr_lit.convert`` or a reference RT-DETRv2 checkpoint, which need
``model=``/``data=`` as for training. ``image_size=[H,W]`` exports for another input size; with
``model.net.sampling_method=discrete`` the graph contains no GridSample node.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from rtdetr_lit.cli import hydra_main
from rtdetr_lit.config import ConfigError, register_schemas
from rtdetr_lit.inference import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    Checkpoint,
    InferenceModel,
    apply_record,
    build_inference_model,
    image_size_of,
    read_checkpoint,
    resolve_classes,
)
from rtdetr_lit.run import prepare_run

__all__ = ["MIN_OPSET", "export", "export_checkpoint", "export_onnx"]

log = logging.getLogger(__name__)

register_schemas()

# LayerNormalization, used by the encoder and decoder, is an ONNX operator from opset 17 on.
MIN_OPSET = 17


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


def export_checkpoint(
    cfg: DictConfig, path: str | os.PathLike[str], checkpoint: Checkpoint | None = None
) -> Path:
    """Build the model of ``checkpoint`` (read from ``cfg.ckpt_path`` and applied to ``cfg`` when
    not given) and write it as ONNX to ``path``, with the class names and category ids
    (:func:`~rtdetr_lit.inference.resolve_classes`) in the graph's metadata."""
    if checkpoint is None:
        checkpoint = read_checkpoint(cfg.ckpt_path)
        apply_record(cfg, checkpoint)
    image_size = image_size_of(cfg)
    model = build_inference_model(cfg, checkpoint)
    classes = resolve_classes(cfg, checkpoint, model.postprocessor.num_classes)
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


@hydra_main("export")
def main(cfg: DictConfig) -> Any:
    """Hydra entry point."""
    return export(cfg)


if __name__ == "__main__":
    main()
