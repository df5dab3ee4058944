"""What a COCO evaluation shows beyond its headline numbers: the per-class table, precision-recall
curves and confusion matrices, written to the run directory after every validation and the test.

Everything is read off the evaluation ``RTDETRModule`` already computed (an :class:`Evaluation`,
which rank 0 keeps for the callbacks): the precision-recall curves are the extended summary of
torchmetrics' ``MeanAveragePrecision`` (faster-coco-eval's accumulated precision), and the
confusion matrix comes from faster-coco-eval's own detection-to-ground-truth matching.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from rtdetr_lit.visualize import class_colour

__all__ = [
    "EVALUATED_STATES",
    "ClassRow",
    "Evaluation",
    "EvaluationPlots",
    "PRCurves",
    "class_table",
    "confusion_matrix",
    "draw_confusion_matrix",
    "draw_pr_curves",
    "format_class_table",
    "pr_curves",
    "publish",
    "rendered",
    "write_class_table",
]

# The states of torchmetrics' MeanAveragePrecision an Evaluation keeps: per-image lists, boxes as
# COCO xywh in original pixels, labels as category ids (RTDETRModule._update_map).
EVALUATED_STATES = (
    "detection_box",
    "detection_scores",
    "detection_labels",
    "groundtruth_box",
    "groundtruth_labels",
    "groundtruth_crowds",
)


@dataclass(frozen=True)
class Evaluation:
    """One COCO evaluation of ``stage`` ("val" or "test") as ``RTDETRModule`` computed it.

    ``result`` is ``MeanAveragePrecision.compute()`` with ``extended_summary=True``: besides the
    scores, ``precision`` (T IoU thresholds, R recall points, K classes, A area ranges, M max
    detections; -1 where a class has no ground truth) with its K classes in the order of
    ``classes``. ``states`` are the metric states it was computed from (:data:`EVALUATED_STATES`;
    under DDP those of every rank). ``category_ids[i]`` and ``class_names[i]`` are the category id
    and name of contiguous class ``i``.
    """

    stage: str
    result: dict[str, Any]
    states: dict[str, list[torch.Tensor]]
    category_ids: list[int]
    class_names: list[str]
    iou_thresholds: list[float]
    rec_thresholds: list[float]

    def precision(self) -> torch.Tensor | None:
        """Precision (T, R, K) for the area range "all" and the most detections (100)."""
        precision = self.result.get("precision")
        return None if precision is None else precision[:, :, :, 0, -1].double()

    def iou_index(self, iou: float) -> int | None:
        """The index of IoU threshold ``iou`` in ``precision`` (None if it was not evaluated)."""
        return next((t for t, v in enumerate(self.iou_thresholds) if math.isclose(v, iou)), None)

    def class_columns(self) -> list[tuple[int, int]]:
        """(contiguous class, column of ``precision``) of every class the metric reports."""
        index = {cid: i for i, cid in enumerate(self.category_ids)}
        return [(index[c], k) for k, c in enumerate(self.result["classes"].tolist()) if c in index]


def _mean(values: torch.Tensor | None) -> float | None:
    """The mean of ``values`` without COCO's -1 ("no ground truth") entries; None if none is
    left."""
    if values is None:
        return None
    kept = values[values > -1]
    return float(kept.mean()) if kept.numel() else None


# -- the per-class table --------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassRow:
    """A row of the per-class table: AP over IoU 0.5:0.95, at 0.5 and at 0.75 (area "all", 100
    detections an image; None without ground truth); ``instances``: ground-truth boxes that are not
    crowd regions; ``images``: images with at least one of them. ``category_id`` None: all
    classes."""

    category_id: int | None
    name: str
    ap: float | None
    ap50: float | None
    ap75: float | None
    instances: int
    images: int


def class_table(evaluation: Evaluation) -> list[ClassRow]:
    """The row "all" (the metric's mAP, mAP@0.5, mAP@0.75), then one row per class of the dataset.

    A class's AP columns are means of the evaluator's accumulated precision over its recall points
    (and IoU thresholds): COCO's own definition, the numbers of ``map_per_class``.
    """
    states = evaluation.states
    objects = [
        labels[crowds == 0].tolist()
        for labels, crowds in zip(
            states["groundtruth_labels"], states["groundtruth_crowds"], strict=True
        )
    ]
    instances = Counter(c for labels in objects for c in labels)
    images = Counter(c for labels in objects for c in set(labels))
    result = evaluation.result
    rows = [
        ClassRow(
            None,
            "all",
            *(_mean(result[key]) for key in ("map", "map_50", "map_75")),
            sum(instances.values()),
            sum(1 for labels in objects if labels),
        )
    ]
    precision = evaluation.precision()
    t50, t75 = evaluation.iou_index(0.5), evaluation.iou_index(0.75)
    column = dict(evaluation.class_columns())
    for i, (cid, name) in enumerate(
        zip(evaluation.category_ids, evaluation.class_names, strict=True)
    ):
        p = precision[:, :, column[i]] if precision is not None and i in column else None
        aps = (_mean(p), _mean(_at(p, t50)), _mean(_at(p, t75)))
        rows.append(ClassRow(cid, name, *aps, instances[cid], images[cid]))
    return rows


def _at(precision: torch.Tensor | None, t: int | None) -> torch.Tensor | None:
    """``precision`` at IoU threshold index ``t`` (None when either is missing)."""
    return None if precision is None or t is None else precision[t]


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def write_class_table(rows: list[ClassRow], path: Path) -> Path:
    """``rows`` as CSV: category_id (empty for "all"), name, AP, AP50, AP75, instances, images;
    an AP cell is empty for a class without ground truth."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category_id", "name", "AP", "AP50", "AP75", "instances", "images"])
        for r in rows:
            cid = "" if r.category_id is None else r.category_id
            aps = [_cell(v) for v in (r.ap, r.ap50, r.ap75)]
            writer.writerow([cid, r.name, *aps, r.instances, r.images])
    return path


def format_class_table(rows: list[ClassRow]) -> str:
    """``rows`` as aligned text columns for the log ("-" for an AP without ground truth)."""
    width = max(5, *(len(r.name) for r in rows))
    header = f"{'class':<{width}}  {'AP':>7}  {'AP@0.5':>7}  {'AP@0.75':>7}  instances  images"
    lines = [header]
    for r in rows:
        aps = "  ".join(f"{'-' if v is None else f'{v:.4f}':>7}" for v in (r.ap, r.ap50, r.ap75))
        lines.append(f"{r.name:<{width}}  {aps}  {r.instances:>9}  {r.images:>6}")
    return "\n".join(lines)


# -- precision-recall curves ----------------------------------------------------------------------
@dataclass(frozen=True)
class PRCurves:
    """Precision at the evaluator's recall points (area "all", 100 detections an image) of every
    class with ground truth: ``at_50`` at IoU 0.5, ``averaged`` over the IoU thresholds
    (0.5:0.95), one row per class of ``classes`` (contiguous indices).

    The mean of a row over the recall points is the class's AP (COCO's definition); that of the
    mean of the rows, the mAP.
    """

    recall: np.ndarray
    at_50: np.ndarray
    averaged: np.ndarray
    classes: list[int]


def pr_curves(evaluation: Evaluation) -> PRCurves | None:
    """The curves of ``evaluation``; None when no class has ground truth (or IoU 0.5 was not
    evaluated)."""
    precision, t50 = evaluation.precision(), evaluation.iou_index(0.5)
    if precision is None or t50 is None:
        return None
    kept = [(i, k) for i, k in evaluation.class_columns() if bool((precision[:, :, k] > -1).all())]
    if not kept:
        return None
    columns = [k for _, k in kept]
    return PRCurves(
        recall=np.asarray(evaluation.rec_thresholds),
        at_50=precision[t50][:, columns].T.numpy(),
        averaged=precision[:, :, columns].mean(0).T.numpy(),
        classes=[i for i, _ in kept],
    )


# -- the confusion matrix -------------------------------------------------------------------------
def _annotations(
    boxes: list[torch.Tensor], labels: list[torch.Tensor], **columns: list[torch.Tensor]
) -> list[dict[str, Any]]:
    """COCO annotations (ids from 1, image ids the list positions) of per-image xywh ``boxes``
    and ``labels``; each per-image tensor list of ``columns`` adds a key."""
    counts = torch.tensor([len(x) for x in labels], dtype=torch.long, device="cpu")
    if not int(counts.sum()):
        return []
    image_ids = torch.repeat_interleave(torch.arange(len(counts), device="cpu"), counts).tolist()
    flat = torch.cat([b.cpu().double().reshape(-1, 4) for b in boxes])
    keys = {
        "bbox": flat.tolist(),
        "area": (flat[:, 2] * flat[:, 3]).tolist(),
        "category_id": torch.cat([x.cpu() for x in labels]).tolist(),
        **{name: torch.cat([x.cpu() for x in values]).tolist() for name, values in columns.items()},
    }
    return [
        {"id": n + 1, "image_id": image, **{name: values[n] for name, values in keys.items()}}
        for n, image in enumerate(image_ids)
    ]


def _coco(num_images: int, annotations: list[dict[str, Any]], category_ids: list[int]) -> Any:
    from faster_coco_eval import COCO

    coco = COCO()
    coco.dataset = {
        "images": [{"id": i} for i in range(num_images)],
        "annotations": annotations,
        "categories": [{"id": c} for c in category_ids],
    }
    coco.createIndex()
    return coco


def confusion_matrix(
    evaluation: Evaluation, iou_threshold: float = 0.5, score_threshold: float = 0.25
) -> np.ndarray:
    """Counts (K + 1, K + 1) of detections scoring at least ``score_threshold`` against the ground
    truth; rows: true class, columns: predicted class, the last of each: background.

    Detections and ground-truth boxes are matched by faster-coco-eval's COCO matching at
    ``iou_threshold`` without regard to class (its ``ExtraEval``: each image's detections in
    decreasing score take the unmatched box they overlap most, at IoU >= the threshold). Then:

    - cell (i, j): a ground-truth box of class i matched by a detection of class j (the diagonal
      holds the correct detections);
    - cell (i, background): a ground-truth box of class i that no detection matched (missed);
    - cell (background, j): a detection of class j that matched no ground-truth box (a false
      positive: nothing there, or a duplicate of a box already matched);
    - crowd regions count nowhere: they are not rows, and a detection matched to one (COCO matches
      a crowd region to any number of detections, by the share of the detection inside it) is
      neither a match nor a false positive.
    """
    from faster_coco_eval.extra.extra import ExtraEval

    k = len(evaluation.category_ids)
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    states = evaluation.states
    num_images = len(states["groundtruth_labels"])
    if num_images == 0:
        return matrix
    keep = [scores >= score_threshold for scores in states["detection_scores"]]
    truth = _annotations(
        states["groundtruth_box"],
        states["groundtruth_labels"],
        iscrowd=states["groundtruth_crowds"],
    )
    found = _annotations(
        [b[m] for b, m in zip(states["detection_box"], keep, strict=True)],
        [x[m] for x, m in zip(states["detection_labels"], keep, strict=True)],
        score=[s[m] for s, m in zip(states["detection_scores"], keep, strict=True)],
    )
    ids = evaluation.category_ids
    matched = ExtraEval(_coco(num_images, truth, ids), iou_tresh=iou_threshold, useCats=False)
    # The detections are handed over after construction, which deep-copies what it is given (most
    # of the time, with many detections); they are built here for it alone.
    matched.cocoDt = _coco(num_images, found, ids)
    matched.evaluate()
    if not matched.cocoEval.matched:
        raise RuntimeError("faster-coco-eval could not match detections to ground truth")
    index = {cid: i for i, cid in enumerate(ids)}
    truths = matched.cocoGt.anns
    for det in matched.cocoDt.anns.values():
        gt_id = det.get("gt_id")
        if gt_id is None:
            matrix[k, index[det["category_id"]]] += 1
        elif not truths[gt_id]["iscrowd"]:
            matrix[index[truths[gt_id]["category_id"]], index[det["category_id"]]] += 1
    for gt in truths.values():
        if not gt["iscrowd"] and gt.get("dt_id") is None:
            matrix[index[gt["category_id"]], k] += 1
    return matrix


# -- drawing and publishing -----------------------------------------------------------------------
# Per-class legend entries up to this many classes (beyond, the lines are left unnamed).
_MAX_LEGEND = 12
# Numbers in the cells of a confusion matrix up to this many rows.
_MAX_ANNOTATED = 30


def _figure(width: float, height: float, layout: str | None = None) -> Any:
    """A bare matplotlib Figure on the Agg canvas: no pyplot, no global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def rendered(fig: Any) -> np.ndarray:
    """``fig`` drawn: (H, W, 3) uint8."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _rgb(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(c / 255 for c in colour)


def draw_pr_curves(curves: PRCurves, class_names: list[str]) -> Any:
    """Two panels, IoU 0.5 and 0.5:0.95: a thin line per class (in its colour), the mean of the
    classes thick; legend entries with the area under each curve (AP)."""
    fig = _figure(11, 4.8)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.11, top=0.92, wspace=0.08)
    named = len(curves.classes) <= _MAX_LEGEND
    panels = (("IoU 0.5", "mAP@0.5", curves.at_50), ("IoU 0.5:0.95", "mAP", curves.averaged))
    for ax, (iou, score, precision) in zip(fig.subplots(1, 2, sharey=True), panels, strict=True):
        for i, row in zip(curves.classes, precision, strict=True):
            label = f"{class_names[i]} {row.mean():.3f}" if named else None
            ax.plot(curves.recall, row, linewidth=1, color=_rgb(class_colour(i)), label=label)
        mean = precision.mean(0)
        ax.plot(curves.recall, mean, linewidth=3, color="#1f2d5c", label=f"all {mean.mean():.3f}")
        ax.set_title(f"{iou}: {score} {mean.mean():.3f}", fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=7)
    fig.axes[0].set_ylabel("precision")
    return fig


def draw_confusion_matrix(
    matrix: np.ndarray,
    class_names: list[str],
    normalized: bool,
    iou_threshold: float,
    score_threshold: float,
) -> Any:
    """``matrix`` (from :func:`confusion_matrix`) as a heat map with its counts, or ``normalized``:
    each row divided by its sum (a true class: where its boxes went; background: the classes of
    the false positives)."""
    values = matrix.astype(np.float64)
    if normalized:
        totals = values.sum(1, keepdims=True)
        values = np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)
    n = len(matrix)
    side = min(4.5 + 0.4 * n, 30.0)
    fig = _figure(side, side, layout="constrained")
    ax = fig.add_subplot()
    top = 1.0 if normalized else max(float(values.max()), 1.0)
    ax.imshow(values, cmap="Blues", vmin=0.0, vmax=top)
    names = [*class_names, "background"]
    size = 9 if n <= 12 else 7
    ax.set_xticks(range(n), names, rotation=45 if n <= 12 else 90, ha="right", fontsize=size)
    ax.set_yticks(range(n), names, fontsize=size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    kind = "normalised by row" if normalized else "counts"
    ax.set_title(f"{kind}; IoU {iou_threshold:g}, score ≥ {score_threshold:g}", fontsize=10)
    if n <= _MAX_ANNOTATED:
        for (i, j), value in np.ndenumerate(values):
            if value > 0:
                text = f"{value:.2f}" if normalized else str(matrix[i, j])
                ink = "white" if value > 0.6 * top else "black"
                ax.text(j, i, text, ha="center", va="center", color=ink, fontsize=size)
    return fig


def publish(trainer: L.Trainer, stage: str, name: str, picture: np.ndarray) -> Path:
    """Save ``picture`` ((H, W, 3) uint8) as ``<run dir>/<stage>_<name>.png``, and show it as the
    image ``<stage>/<name>`` at the current step in the trainer's TensorBoard and W&B loggers."""
    path = Path(trainer.default_root_dir) / f"{stage}_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    # zlib's fastest level: a third of the default's time on photographs, a quarter more bytes.
    Image.fromarray(picture).save(path, compress_level=1)
    tag = f"{stage}/{name}"
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, picture, trainer.global_step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[picture], step=trainer.global_step)
    return path


class EvaluationPlots(L.Callback):
    """After every validation (not the sanity check) and after the test, on rank 0, from the
    evaluation the module computed: ``<stage>_pr_curve.png`` (:func:`draw_pr_curves`),
    ``<stage>_confusion_matrix.png`` and ``<stage>_confusion_matrix_normalized.png``
    (:func:`confusion_matrix` at ``iou_threshold`` of the detections scoring at least
    ``score_threshold``) in the run directory, each also an image in TensorBoard / W&B."""

    def __init__(self, iou_threshold: float = 0.5, score_threshold: float = 0.25) -> None:
        self.iou_threshold = iou_threshold
        self.score_threshold = score_threshold

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._plot(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._plot(trainer, pl_module, "test")

    def _plot(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        evaluation = getattr(pl_module, "evaluations", {}).get(stage)
        if not trainer.is_global_zero or evaluation is None:
            return
        names = evaluation.class_names
        curves = pr_curves(evaluation)
        if curves is not None:
            publish(trainer, stage, "pr_curve", rendered(draw_pr_curves(curves, names)))
        matrix = confusion_matrix(evaluation, self.iou_threshold, self.score_threshold)
        for normalized, name in (
            (False, "confusion_matrix"),
            (True, "confusion_matrix_normalized"),
        ):
            fig = draw_confusion_matrix(
                matrix, names, normalized, self.iou_threshold, self.score_threshold
            )
            publish(trainer, stage, name, rendered(fig))
