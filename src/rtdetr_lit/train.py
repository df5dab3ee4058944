"""Train a detector: ``python -m rtdetr_lit.train [group=option ...] [key=value ...]``.

With no arguments this trains the CPU demo model on the embedded synthetic dataset. Examples::

    python -m rtdetr_lit.train model=r50 data=coco trainer=ddp
    python -m rtdetr_lit.train experiment=rtdetrv2_r18_coco
    python -m rtdetr_lit.train -m sampling=uniform1,uniform4      # a Hydra multirun sweep
    python -m rtdetr_lit.train --cfg job model=r50 data=coco       # print the composed config
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rtdetr_lit.cli import hydra_main
from rtdetr_lit.config import register_schemas
from rtdetr_lit.run import (
    build_callbacks,
    build_loggers,
    check_launch,
    check_sync_batchnorm,
    derive_num_classes,
    finish_run,
    prepare_run,
    resolve_ckpt_path,
)

log = logging.getLogger(__name__)

# The EMA weights and the detector's record, written to the run directory after fitting.
WEIGHTS_FILE = "model.safetensors"

register_schemas()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build data, model, callbacks, loggers and trainer from ``cfg``; fit, then test.

    Returns the metrics logged by the trainer (floats), including ``cfg.optimized_metric``.
    """
    import lightning as L
    from hydra.utils import instantiate

    from rtdetr_lit.plugins import ensure_safe_checkpoint_io

    prepare_run(cfg)
    derive_num_classes(cfg)
    log.info("data: %s", cfg.data._target_)
    datamodule = instantiate(cfg.data)
    log.info("model: %s (%s)", cfg.model._target_, cfg.model.net.name)
    model = instantiate(cfg.model)
    # The run's own keys, resolved (a config composed outside an app also holds Hydra's).
    run_keys = [key for key in cfg if key != "hydra"]
    model.run_config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, run_keys), resolve=True)
    callbacks = build_callbacks(cfg.get("callbacks"))
    loggers = build_loggers(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    check_launch(trainer)
    check_sync_batchnorm(trainer)
    ensure_safe_checkpoint_io(trainer)

    metrics: dict[str, Any] = {}
    best = None
    if cfg.get("train"):
        trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
        metrics.update(trainer.callback_metrics)
        best = _best_checkpoint_of_this_run(trainer)
        _write_weights_file(trainer, best, Path(cfg.paths.output_dir) / WEIGHTS_FILE)
    if cfg.get("test"):
        # Without a best checkpoint: the weights the run ended with (EMA when it ran).
        trainer.test(model, datamodule=datamodule, ckpt_path=best)
        metrics.update(trainer.callback_metrics)
        if best:
            log.info("best checkpoint: %s", best)
    return finish_run(cfg, trainer, metrics)


def _write_weights_file(trainer: Any, best: str | None, path: Path) -> None:
    """The shareable ``model.safetensors`` of the run (rank 0): the best checkpoint's weights,
    else the last checkpoint's; nothing when the run saved no checkpoint."""
    from rtdetr_lit.convert import write_weights_file

    callback = trainer.checkpoint_callback
    source = best or (callback.last_model_path if callback is not None else "")
    if not source or not trainer.is_global_zero:
        return
    write_weights_file(source, path)
    log.info("weights to share: %s (from %s)", path, Path(source).name)


def _best_checkpoint_of_this_run(trainer: Any) -> str | None:
    """The best checkpoint if this run wrote it, else ``None``.

    A resumed run restores ``best_model_path`` from its checkpoint file, which can name any file
    (another run's, or one planted in a shared checkpoint): only a file in this run's checkpoint
    folder is tested. Whatever is tested is read by the safe checkpoint IO anyway.
    """
    callback = trainer.checkpoint_callback
    best = callback.best_model_path if callback is not None else ""
    if not best:
        return None
    if callback.dirpath is None or Path(best).resolve().parent != Path(callback.dirpath).resolve():
        log.warning(
            "the best checkpoint %s comes from the checkpoint this run resumed from, not from "
            "this run: testing the weights the run ended with instead",
            best,
        )
        return None
    return best


@hydra_main("train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the optimised metric for sweepers."""
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    return float(metrics[name]) if name and name in metrics else None


if __name__ == "__main__":
    main()
