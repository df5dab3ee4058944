"""Train a detector: ``python -m rtdetr_lit.train [group=option ...] [key=value ...]``.

With no arguments this trains the CPU demo model on the embedded synthetic dataset. Examples::

    python -m rtdetr_lit.train model=r50 data=coco trainer=ddp
    python -m rtdetr_lit.train experiment=rtdetrv2_r18_coco
    python -m rtdetr_lit.train -m sampling=uniform1,uniform4      # a Hydra multirun sweep
    python -m rtdetr_lit.train --cfg job model=r50 data=coco       # print the composed config
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig

from rtdetr_lit.config import CONFIG_DIR, register_schemas
from rtdetr_lit.utils import (
    build_callbacks,
    build_loggers,
    check_launch,
    finish_run,
    prepare_run,
    resolve_ckpt_path,
)

log = logging.getLogger(__name__)

register_schemas()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build data, model, callbacks, loggers and trainer from ``cfg``; fit, then test.

    Returns the metrics logged by the trainer (floats), including ``cfg.optimized_metric``.
    """
    import lightning as L
    from hydra.utils import instantiate

    prepare_run(cfg)
    log.info("data: %s", cfg.data._target_)
    datamodule = instantiate(cfg.data)
    log.info("model: %s (%s)", cfg.model._target_, cfg.model.net.name)
    model = instantiate(cfg.model)
    callbacks = build_callbacks(cfg.get("callbacks"))
    loggers = build_loggers(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    check_launch(trainer)

    metrics: dict[str, Any] = {}
    if cfg.get("train"):
        trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
        metrics.update(trainer.callback_metrics)
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=False)
        metrics.update(trainer.callback_metrics)
        if best:
            log.info("best checkpoint: %s", best)
    return finish_run(cfg, trainer, metrics)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the optimised metric for sweepers."""
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    return float(metrics[name]) if name and name in metrics else None


if __name__ == "__main__":
    main()
