"""``RTDETRModule``: the LightningModule that trains and evaluates a detector.

Thin glue: the detector, the criterion and the post-processor are plain modules injected by the
Hydra config (``conf/model/_default.yaml``); this class wires them to the Trainer, builds the
optimizer groups of docs/rtdetrv2.md §9 and computes COCO mAP with torchmetrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_convert

from rtdetr_lit.callbacks.evaluation import (
    EVALUATED_STATES,
    Evaluation,
    class_table,
    format_class_table,
    write_class_table,
)
from rtdetr_lit.checkpoints import load_weights_into
from rtdetr_lit.models.postprocess import RTDETRPostProcessor
from rtdetr_lit.optim import build_param_groups, clip_gradients
from rtdetr_lit.record import RECORD_KEY, record_of
from rtdetr_lit.weights import read_weights

__all__ = ["RTDETRModule"]

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, list[dict[str, torch.Tensor]]]
_MAP_KEYS = {
    "mAP": "map",
    "mAP_50": "map_50",
    "mAP_75": "map_75",
    "mAP_small": "map_small",
    "mAP_medium": "map_medium",
    "mAP_large": "map_large",
}


class _EvaluatedMAP(MeanAveragePrecision):
    """COCO mAP that keeps the states of its last ``compute`` in ``evaluated``: under DDP those of
    every rank (compute runs on the gathered states; this rank's own are put back after it)."""

    evaluated: dict[str, list[torch.Tensor]] | None = None

    def compute(self) -> dict[str, Any]:
        self.evaluated = {name: list(getattr(self, name)) for name in EVALUATED_STATES}
        result = super().compute()
        # The extended summary's IoU matrices (one per image and class): nothing reads them.
        result.pop("ious", None)
        return result


def _coco_map() -> _EvaluatedMAP:
    # faster-coco-eval (a dependency): pycocotools' numbers (tests/test_evaluation.py) in a
    # fraction of the time (BENCHMARKS.md, "COCO evaluation backend"). It logs its progress and
    # summary table at INFO on every evaluation (and once per class), which would fill the run's
    # console and log; the module logs the numbers itself.
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
    # The extended summary's precision array (IoU x recall x class x area x max detections) gives
    # the per-class table and the precision-recall curves (callbacks/evaluation.py).
    metric = _EvaluatedMAP(
        box_format="xyxy",
        iou_type="bbox",
        class_metrics=True,
        extended_summary=True,
        backend="faster_coco_eval",
    )
    # COCO keeps each image's 100 best-scoring detections: more (300 here, docs/rtdetrv2.md §8) is
    # expected.
    metric.warn_on_many_detections = False
    return metric


def _to_float32(outputs: Any) -> Any:
    """Cast every floating tensor in a (nested) model output to float32 for the loss."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: _to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_to_float32(v) for v in outputs]
    return outputs


class RTDETRModule(L.LightningModule):
    """Train/evaluate ``net`` with ``criterion``; report COCO mAP through ``postprocessor``.

    Args:
        net: the detector (``rtdetr_lit.create_model``).
        criterion: ``RTDETRCriterion``; returns a dict of already weighted loss terms.
        postprocessor: ``RTDETRPostProcessor`` (docs/rtdetrv2.md §8).
        optimizer: a partial taking ``params`` (e.g. ``torch.optim.AdamW``).
        scheduler: a partial taking ``optimizer`` and ``total_steps``; stepped every iteration.
        backbone_lr: learning rate of the backbone (docs/rtdetrv2.md §9); ``None`` = the optimizer's
        lr. no_weight_decay_on_bias: also no weight decay on encoder/decoder biases (M*).
        init_from: a checkpoint whose weights initialise ``net`` (EMA weights when present);
            a Lightning checkpoint of this module, a converted file, a reference checkpoint, or
            the name of released weights (``rtdetrv2_r18_coco``, :mod:`rtdetr_lit.weights`).
        category_ids: dataset category id of each contiguous label, for results and metrics;
            by default taken from the datamodule (``datamodule.category_ids``) at setup.
        class_names: names for the per-class AP table; by default from the datamodule.

    Batches are ``(images, targets)`` as described in ``rtdetr_lit.data``: images float
    (B, 3, H, W) in [0, 1]; targets with ``boxes`` (normalised cxcywh), ``labels``, ``image_id``,
    ``orig_size`` (w, h), ``iscrowd`` and ``area``.
    """

    def __init__(
        self,
        net: nn.Module,
        criterion: nn.Module,
        postprocessor: RTDETRPostProcessor,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        backbone_lr: float | None = None,
        no_weight_decay_on_bias: bool = False,
        init_from: str | None = None,
        category_ids: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        # Modules and partials stay out of the checkpoint: it must load with weights_only=True.
        self.save_hyperparameters(
            ignore=["net", "criterion", "postprocessor", "optimizer", "scheduler"], logger=False
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.net = net
        self.criterion = criterion
        if postprocessor.category_ids is not None:
            raise ValueError("give category_ids to RTDETRModule, not to its postprocessor")
        self.postprocessor = postprocessor
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self.val_map = _coco_map()
        self.test_map = _coco_map()
        self.val_map_best = MaxMetric()
        # Saved in checkpoints: a resumed run keeps the best mAP of the epochs before.
        self.val_map_best.persistent(True)
        # The last evaluation of each stage, kept on rank 0 for the evaluation callbacks.
        self.evaluations: dict[str, Evaluation] = {}
        if init_from:
            contents, source = read_weights(init_from, getattr(self.net, "size_name", None))
            missing = load_weights_into(self.net, contents, source)
            log.info("initialised the model from %s", source)
            if missing:
                log.warning("kept the fresh initialisation of: %s", ", ".join(missing))

    # The composed config of the run that trains this module (set by ``rtdetr_lit.train``):
    # stored in every checkpoint's record, for the record.
    run_config: dict[str, Any] | None = None

    # -- set-up -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.category_ids is None and getattr(dm, "category_ids", None) is not None:
            self.category_ids = list(dm.category_ids)
        if self.class_names is None and getattr(dm, "class_names", None) is not None:
            self.class_names = list(dm.class_names)
        # Saved in checkpoints (as plain lists: they load with weights_only=True), so that export
        # and predict can name the classes without the dataset.
        if self.category_ids is not None:
            self.hparams["category_ids"] = [int(c) for c in self.category_ids]
        if self.class_names is not None:
            self.hparams["class_names"] = [str(n) for n in self.class_names]
        num_classes = getattr(dm, "num_classes", None)
        model_classes = self.postprocessor.num_classes
        if num_classes is not None and num_classes != model_classes:
            raise ValueError(
                f"the dataset has {num_classes} classes but the model was built for "
                f"{model_classes}: set data.num_classes (the model reads it)"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the record that lets eval, export, predict and ``rtdetr_lit.load`` rebuild the
        detector from the checkpoint alone (:mod:`rtdetr_lit.record`)."""
        dm = getattr(self._trainer, "datamodule", None)
        record = record_of(
            self.net,
            self.postprocessor.num_top_queries,
            self.class_names,
            self.category_ids,
            getattr(dm, "image_size", None),
            self.run_config,
        )
        if record is not None:
            checkpoint[RECORD_KEY] = record.to_dict()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eval-mode detector outputs: ``pred_logits`` (B, Q, C), ``pred_boxes`` (B, Q, 4)."""
        return self.net(images)

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        outputs = self.net(images, targets)
        # Autocast (bf16/fp16) covers the forward only: matching and losses run in float32.
        with torch.autocast(device_type=images.device.type, enabled=False):
            losses = self.criterion(_to_float32(outputs), targets)
        loss = sum(losses.values())
        batch_size = images.shape[0]
        log = partial(self.log, batch_size=batch_size, sync_dist=False)
        log("train/loss", loss, prog_bar=True)
        for name in ("loss_vfl", "loss_bbox", "loss_giou"):
            if name in losses:
                log(f"train/{name}", losses[name])
        return loss

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as the trainer says (the recipe: global norm 0.1), also with the fused optimizer
        under mixed precision (:func:`rtdetr_lit.optim.clip_gradients`)."""
        precision = self.trainer.precision_plugin
        clip_gradients(
            precision, optimizer, gradient_clip_val or 0.0, gradient_clip_algorithm or "norm"
        )

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # Probe the partial's defaults (lr, weight decay) with one dummy parameter.
        probe = torch.zeros(1, device=self.device, requires_grad=True)
        defaults = self.optimizer_factory(params=[probe]).defaults
        groups = build_param_groups(
            self.net,
            lr=defaults["lr"],
            weight_decay=defaults.get("weight_decay", 0.0),
            backbone_lr=hp.backbone_lr,
            no_weight_decay_on_bias=hp.no_weight_decay_on_bias,
        )
        optimizer = self.optimizer_factory(params=groups)
        for g in groups:
            log.info("param group %-18s %4d tensors  lr %.2e  weight decay %.1e",
                     g["name"], len(g["params"]), g["lr"], g["weight_decay"])  # fmt: skip
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # -- evaluation -------------------------------------------------------------------------
    def _update_map(self, metric: MeanAveragePrecision, batch: Batch) -> None:
        """Detect on ``batch`` and add it to ``metric`` in original pixels and category ids."""
        images, targets = batch
        sizes = torch.stack([t["orig_size"] for t in targets]).to(images.device)
        preds = self.postprocessor(_to_float32(self.net(images)), sizes)
        ids = None
        if self.category_ids is not None:
            ids = torch.as_tensor(self.category_ids, device=images.device)
        gts = []
        # Float32 states whatever the precision: ranks exchange them element by element.
        for pred, t in zip(preds, targets, strict=True):
            scale = t["orig_size"].float().repeat(2)
            boxes = box_convert(t["boxes"].float(), "cxcywh", "xyxy") * scale
            labels = t["labels"]
            if ids is not None:
                labels, pred["labels"] = ids[labels], ids[pred["labels"]]
            gts.append(
                {"boxes": boxes, "labels": labels, "iscrowd": t["iscrowd"],
                 "area": t["area"].float()}
            )  # fmt: skip
        metric.update(preds, gts)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._update_map(self.val_map, batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._update_map(self.test_map, batch)

    def on_validation_epoch_end(self) -> None:
        result = self._log_map(self.val_map, "val")
        self.val_map_best(result["map"])
        self.log("val/mAP_best", self.val_map_best.compute(), sync_dist=False)

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test")

    def _log_map(self, metric: _EvaluatedMAP, stage: str) -> dict[str, Any]:
        self._equalise_image_counts(metric)
        result = metric.compute()
        # Taken off the metric: only rank 0 keeps the states (in its Evaluation), until the next.
        states, metric.evaluated = metric.evaluated, None
        metric.reset()
        for name, key in _MAP_KEYS.items():
            self.log(f"{stage}/{name}", result[key], prog_bar=name in ("mAP", "mAP_50"))
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            ids = self.category_ids or list(range(self.postprocessor.num_classes))
            names = self.class_names or [str(i) for i in ids]
            evaluation = Evaluation(
                stage, result, states, ids, names, metric.iou_thresholds,
                metric.rec_thresholds,
            )  # fmt: skip
            self.evaluations[stage] = evaluation
            self._write_class_table(evaluation)
        return result

    def _equalise_image_counts(self, metric: MeanAveragePrecision) -> None:
        """Top every rank up to the same number of images with empty ones (no boxes, nothing
        detected), which change no COCO score.

        torchmetrics gathers the per-image lists of the metric element by element, so under DDP
        ranks holding different numbers of images (the evaluation sampler does not pad) would
        issue mismatched collectives and hang or exchange garbage. (Likewise every entry is
        float32, see ``_update_map``.)
        """
        held = torch.tensor(len(metric.groundtruth_labels), device=self.device)
        missing = int(self.all_gather(held).max() - held)
        if missing <= 0:
            return
        empty_boxes = torch.zeros(0, 4, device=self.device)
        empty_ints = torch.zeros(0, dtype=torch.long, device=self.device)
        pred = {"boxes": empty_boxes, "scores": torch.zeros(0, device=self.device),
                "labels": empty_ints}  # fmt: skip
        target = {"boxes": empty_boxes, "labels": empty_ints, "iscrowd": empty_ints,
                  "area": torch.zeros(0, device=self.device)}  # fmt: skip
        metric.update([pred] * missing, [target] * missing)

    def _write_class_table(self, evaluation: Evaluation) -> None:
        """``<stage>_per_class_ap.csv`` in the run directory; after a test, the table in the log."""
        rows = class_table(evaluation)
        stage = evaluation.stage
        write_class_table(rows, Path(self.trainer.default_root_dir) / f"{stage}_per_class_ap.csv")
        if stage == "test":
            log.info("test: COCO AP per class\n%s", format_class_table(rows))
