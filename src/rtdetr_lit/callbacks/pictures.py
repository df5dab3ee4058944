"""A picture of the model's predictions on a few validation images at the end of training."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from rtdetr_lit.visualize import draw_boxes, save_grid

__all__ = ["PredictionPictures"]

log = logging.getLogger(__name__)


class PredictionPictures(L.Callback):
    """After ``fit`` (on the EMA weights), draw detections scoring at least ``score_threshold`` on
    the first ``num_images`` validation images and save them as ``<run dir>/<filename>``."""

    def __init__(
        self,
        num_images: int = 8,
        score_threshold: float = 0.4,
        filename: str = "val_predictions.png",
    ) -> None:
        self.num_images = num_images
        self.score_threshold = score_threshold
        self.filename = filename
        self.path: Path | None = None

    @torch.no_grad()
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if not trainer.is_global_zero or dm is None or self.num_images <= 0:
            return
        images, _ = next(iter(dm.val_dataloader()))
        images = images[: self.num_images].to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        outputs = pl_module.net(images)
        pl_module.train(was_training)
        h, w = images.shape[-2:]
        sizes = torch.tensor([[w, h]], device=images.device).expand(len(images), 2)
        drawn = []
        for image, det in zip(images, pl_module.postprocessor(outputs, sizes), strict=True):
            keep = det["scores"] >= self.score_threshold
            names = getattr(dm, "class_names", None)
            drawn.append(
                draw_boxes(
                    image, det["boxes"][keep], det["labels"][keep], names, det["scores"][keep]
                )
            )
        self.path = save_grid(drawn, Path(trainer.default_root_dir) / self.filename)
        log.info("predictions on %d val images: %s", len(drawn), self.path)
