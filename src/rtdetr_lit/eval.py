"""Evaluate a checkpoint: ``python -m rtdetr_lit.eval ckpt_path=PATH``.

Computes COCO mAP on the validation split. A checkpoint of this package (or its
``model.safetensors``) records its detector and the run's data config, so ``ckpt_path`` alone
reproduces the run's validation; ``data=...`` evaluates it on another dataset with the same
classes. A file written by ``python -m rtdetr_lit.convert`` or a reference RT-DETRv2 checkpoint
needs ``model=``/``data=`` (or ``experiment=``) as for training. ``model.net.eval_idx=K`` and
``model.net.sampling_method=discrete`` evaluate faster variants.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from rtdetr_lit.cli import hydra_main
from rtdetr_lit.config import register_schemas
from rtdetr_lit.inference import apply_record, load_checkpoint_weights, read_checkpoint
from rtdetr_lit.run import build_callbacks, build_loggers, finish_run, prepare_run

log = logging.getLogger(__name__)

register_schemas()


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Build data and model for ``cfg.ckpt_path`` (:func:`~rtdetr_lit.inference.apply_record`),
    load its weights into the model, validate."""
    from hydra.utils import instantiate

    prepare_run(cfg)
    checkpoint = read_checkpoint(cfg.ckpt_path)
    apply_record(cfg, checkpoint)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model, init_from=None)
    load_checkpoint_weights(module.net, checkpoint, cfg)
    trainer = instantiate(
        cfg.trainer,
        callbacks=build_callbacks(cfg.get("callbacks")),
        logger=build_loggers(cfg.get("logger")),
        enable_checkpointing=False,  # nothing to save; no default ModelCheckpoint, no path logged
    )
    trainer.validate(module, datamodule=datamodule)
    return finish_run(cfg, trainer, dict(trainer.callback_metrics))


@hydra_main("eval")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    evaluate(cfg)


if __name__ == "__main__":
    main()
