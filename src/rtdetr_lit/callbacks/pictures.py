"""Ground truth beside the predictions on the first images of the validation set, after every
validation and after the test."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.nn.functional import interpolate
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_convert

from rtdetr_lit.callbacks.evaluation import publish
from rtdetr_lit.visualize import draw_boxes, tile, titled

__all__ = ["PredictionPictures"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Shown:
    """An image as shown (uint8, ``side`` pixels on its long side) and its boxes in its pixels:
    the ground truth (labels: category ids) and the detections kept."""

    image: torch.Tensor
    truth_boxes: torch.Tensor
    truth_labels: torch.Tensor
    crowds: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor


class PredictionPictures(L.Callback):
    """After every validation (not the sanity check) and after the test, on rank 0: the first
    ``num_images`` images of the set (the same ones every time), each as two panels, its ground
    truth (crowd regions marked) and the detections scoring at least ``score_threshold`` with
    class name and score, in ``<run dir>/<stage>_<name>.png`` and as an image in TensorBoard /
    W&B.

    The detections are those the module's COCO evaluation scored (read off its metric as each
    batch is added), so the pictures show the weights that were evaluated (the EMA weights during
    training). The images are drawn in their original proportions, ``side`` pixels on the long
    side.
    """

    def __init__(
        self,
        num_images: int = 8,
        score_threshold: float = 0.25,
        name: str = "predictions",
        side: int = 400,
    ) -> None:
        self.num_images = num_images
        self.score_threshold = score_threshold
        self.name = name
        self.side = side
        # The last picture written.
        self.path: Path | None = None
        self._shown: list[_Shown] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._shown = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._shown = []

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._collect(trainer, pl_module.val_map, batch)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._collect(trainer, pl_module.test_map, batch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._draw(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer, pl_module, "test")

    @torch.no_grad()
    def _collect(self, trainer: L.Trainer, metric: MeanAveragePrecision, batch: Any) -> None:
        """Keep the batch's first images, while fewer than ``num_images`` are kept, with their
        entries in ``metric`` (the batch's are the last ones: boxes COCO xywh in original pixels,
        labels category ids)."""
        wanted = self.num_images - len(self._shown)
        if wanted <= 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        images, targets = batch
        first = len(metric.groundtruth_labels) - len(images)
        for i in range(min(wanted, len(images))):
            w, h = targets[i]["orig_size"].tolist()
            scale = self.side / max(w, h)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            image = interpolate(images[i][None].float(), size, mode="bilinear", antialias=True)
            n = first + i
            keep = metric.detection_scores[n] >= self.score_threshold
            self._shown.append(
                _Shown(
                    image=(image[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu(),
                    truth_boxes=_xyxy(metric.groundtruth_box[n], scale),
                    truth_labels=metric.groundtruth_labels[n].cpu(),
                    crowds=metric.groundtruth_crowds[n].cpu(),
                    boxes=_xyxy(metric.detection_box[n][keep], scale),
                    labels=metric.detection_labels[n][keep].cpu(),
                    scores=metric.detection_scores[n][keep].cpu(),
                )
            )

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        evaluation = getattr(pl_module, "evaluations", {}).get(stage)
        if not trainer.is_global_zero or not self._shown or evaluation is None:
            return
        index = {cid: i for i, cid in enumerate(evaluation.category_ids)}

        def classes(labels: torch.Tensor) -> torch.Tensor:
            """Category ids as contiguous class indices (drawing happens on the CPU)."""
            return torch.tensor([index[c] for c in labels.tolist()], dtype=torch.long, device="cpu")

        names = evaluation.class_names
        panels = []
        for shown in self._shown:
            truth = classes(shown.truth_labels)
            captions = [
                f"{names[i]} (crowd)" if crowd else names[i]
                for i, crowd in zip(truth.tolist(), shown.crowds.tolist(), strict=True)
            ]
            found = classes(shown.labels)
            panels += [
                titled(draw_boxes(shown.image, shown.truth_boxes, truth, captions=captions),
                       "ground truth"),
                titled(draw_boxes(shown.image, shown.boxes, found, names, shown.scores),
                       f"predictions (score >= {self.score_threshold:g})"),
            ]  # fmt: skip
        # Two images (four panels) a row.
        picture = tile(panels, columns=4).permute(1, 2, 0).numpy()
        self.path = publish(trainer, stage, self.name, picture)


def _xyxy(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """COCO xywh boxes as xyxy, times ``scale``, on the CPU."""
    return box_convert(boxes.cpu().float().reshape(-1, 4), "xywh", "xyxy") * scale
