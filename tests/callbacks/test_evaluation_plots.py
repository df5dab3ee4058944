"""The evaluation pictures and tables: the confusion matrix of a hand-made case, precision-recall
curves against the evaluator's AP, the per-class table, the loggers, the validation pictures, and a
short demo run that leaves them all in its run directory."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from rtdetr_lit.callbacks import PredictionPictures
from rtdetr_lit.callbacks.evaluation import (
    Evaluation,
    class_table,
    confusion_matrix,
    format_class_table,
    pr_curves,
    publish,
    write_class_table,
)
from rtdetr_lit.module import _coco_map
from rtdetr_lit.train import train
from rtdetr_lit.visualize import class_colour
from tests.conftest import SMALL_SYNTHETIC, compose_config
from tests.test_evaluation import NUM_CLASSES, generated_evaluation

CATEGORY_IDS = [3, 5, 9]
NAMES = ["cat", "dog", "fox"]
CAT, DOG, FOX = CATEGORY_IDS


def _evaluate(preds, targets, category_ids, names) -> Evaluation:
    """Evaluate as the module does (``_coco_map``, xyxy pixels, category ids)."""
    metric = _coco_map()
    metric.update(preds, targets)
    return _computed(metric, category_ids, names)


def _computed(metric, category_ids=CATEGORY_IDS, names=NAMES) -> Evaluation:
    """``metric`` computed, as the module keeps it for the callbacks."""
    result = metric.compute()
    return Evaluation("val", result, metric.evaluated, category_ids, names,
                      metric.iou_thresholds, metric.rec_thresholds)  # fmt: skip


def _image(truth=(), crowds=(), found=()):
    """One image: ``truth`` and ``crowds`` as (xyxy, category id), ``found`` as (xyxy, category
    id, score)."""
    boxes = [b for b, _ in truth] + [b for b, _ in crowds]
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([c for _, c in truth] + [c for _, c in crowds], dtype=torch.long),
        "iscrowd": torch.tensor([0] * len(truth) + [1] * len(crowds), dtype=torch.long),
    }
    xyxy = target["boxes"]
    target["area"] = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    pred = {
        "boxes": torch.tensor([b for b, _, _ in found], dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([c for _, c, _ in found], dtype=torch.long),
        "scores": torch.tensor([s for _, _, s in found], dtype=torch.float32),
    }
    return pred, target


def _hand_made() -> Evaluation:
    images = [
        _image(
            truth=[([0, 0, 20, 20], CAT),  # found as a cat
                   ([50, 50, 70, 70], DOG),  # found only below the score threshold: missed
                   ([100, 100, 120, 120], DOG)],  # found as a fox
            crowds=[([200, 200, 300, 300], FOX)],  # a crowd region with two detections in it
            found=[([0, 0, 20, 20], CAT, 0.9), ([50, 50, 70, 70], DOG, 0.1),
                   ([100, 100, 120, 120], FOX, 0.8), ([210, 210, 230, 230], FOX, 0.6),
                   ([250, 250, 270, 270], CAT, 0.5),
                   ([400, 400, 420, 420], CAT, 0.7)],  # nothing there
        ),
        _image(
            truth=[([0, 0, 40, 40], FOX), ([100, 100, 140, 140], CAT)],
            # the fox twice (the second a duplicate); the cat at IoU 2/3
            found=[([0, 0, 40, 40], FOX, 0.95), ([1, 1, 41, 41], FOX, 0.85),
                   ([108, 100, 148, 140], CAT, 0.6)],
        ),
        _image(found=[([10, 10, 30, 30], DOG, 0.5)]),  # no objects, a detection
        _image(),  # no objects, no detections
    ]  # fmt: skip
    return _evaluate_images(images)


def _evaluate_images(images) -> Evaluation:
    preds, targets = zip(*images, strict=True)
    return _evaluate(list(preds), list(targets), CATEGORY_IDS, NAMES)


def test_confusion_matrix_counts_a_hand_made_case() -> None:
    evaluation = _hand_made()
    # rows: true cat, dog, fox, background; columns: predicted cat, dog, fox, background
    expected = [
        [2, 0, 0, 0],  # both cats found
        [0, 0, 1, 1],  # a dog taken for a fox, one missed
        [0, 0, 1, 0],  # the fox found
        [1, 1, 1, 0],  # a cat where nothing is, a dog on an empty image, the duplicate fox
    ]  # and the two detections in the crowd region count nowhere
    np.testing.assert_array_equal(confusion_matrix(evaluation, 0.5, 0.25), expected)
    # A lower score threshold lets the weak dog detection find its dog.
    lower = confusion_matrix(evaluation, 0.5, 0.05)
    np.testing.assert_array_equal(lower[1], [0, 1, 1, 0])
    # At IoU 0.75 the second cat (IoU 2/3) is missed and its detection a false positive.
    strict = confusion_matrix(evaluation, 0.75, 0.25)
    np.testing.assert_array_equal(strict[0], [1, 0, 0, 1])
    np.testing.assert_array_equal(strict[3], [2, 1, 1, 0])


def test_confusion_matrix_of_nothing_found_counts_every_object_missed() -> None:
    evaluation = _evaluate_images(
        [_image(truth=[([0, 0, 20, 20], CAT), ([30, 30, 60, 60], FOX)]),
         _image(crowds=[([0, 0, 50, 50], DOG)])]
    )  # fmt: skip
    expected = np.zeros((4, 4), dtype=int)
    expected[0, 3] = expected[2, 3] = 1
    np.testing.assert_array_equal(confusion_matrix(evaluation), expected)


def _generated() -> tuple[Evaluation, list[dict[str, torch.Tensor]]]:
    """The generated evaluation of tests/test_evaluation.py (crowds, every size range, >100
    detections an image, a class never detected, a detected class without objects) with category
    ids 10.. and one more class that appears nowhere."""
    preds, targets = generated_evaluation()
    for item in (*preds, *targets):
        item["labels"] = item["labels"] + 10
    ids = list(range(10, 10 + NUM_CLASSES + 2))
    names = [f"class {i}" for i in ids]
    return _evaluate(preds, targets, ids, names), targets


def test_pr_curve_areas_and_ends_are_the_evaluators() -> None:
    evaluation, _ = _generated()
    result = evaluation.result
    curves = pr_curves(evaluation)
    # the classes with objects; the class detected without objects has no curve
    assert curves.classes == list(range(NUM_CLASSES))
    ap = dict(zip(result["classes"].tolist(), result["map_per_class"].tolist(), strict=True))
    for i, area in zip(curves.classes, curves.averaged.mean(1), strict=True):
        assert area == pytest.approx(ap[evaluation.category_ids[i]], abs=1e-6)
    assert curves.averaged.mean(0).mean() == pytest.approx(float(result["map"]), abs=1e-6)
    assert curves.at_50.mean(0).mean() == pytest.approx(float(result["map_50"]), abs=1e-6)
    assert 0 < float(result["map_50"]) < 1 and ap[10 + NUM_CLASSES - 1] == 0  # never detected
    # Each curve at IoU 0.5 ends (drops to 0) at the recall the evaluator reached.
    reached = result["recall"][0, :, 0, -1]
    for i, precision in zip(curves.classes, curves.at_50, strict=True):
        last = curves.recall[precision > 0].max(initial=-1.0)
        recall = float(reached[i])
        assert last <= recall + 1e-9
        assert not (curves.recall[(curves.recall > last)] <= recall - 1e-9).any()


def test_class_table_rows_are_the_evaluators_numbers(tmp_path: Path) -> None:
    evaluation, targets = _generated()
    result = evaluation.result
    rows = class_table(evaluation)
    assert [r.name for r in rows] == ["all", *evaluation.class_names]
    total, *per_class = rows
    assert (total.ap, total.ap50, total.ap75) == pytest.approx(
        (float(result["map"]), float(result["map_50"]), float(result["map_75"]))
    )
    ap = dict(zip(result["classes"].tolist(), result["map_per_class"].tolist(), strict=True))
    with_objects = [r for r in per_class if r.instances]
    for r in with_objects:
        assert r.ap == pytest.approx(ap[r.category_id], abs=1e-6)
    # detected but without objects (COCO's -1), and in neither: no AP
    assert [r.ap for r in per_class[-2:]] == [None, None]
    assert [r.ap50 for r in per_class[-2:]] == [None, None]
    # the means of the per-class AP@0.5 and AP@0.75 are the evaluator's mAP@0.5 and mAP@0.75
    assert np.mean([r.ap50 for r in with_objects]) == pytest.approx(float(result["map_50"]))
    assert np.mean([r.ap75 for r in with_objects]) == pytest.approx(float(result["map_75"]))
    # counts: boxes that are not crowd regions, and the images holding them
    objects = [t["labels"][t["iscrowd"] == 0].tolist() for t in targets]
    instances = Counter(c for labels in objects for c in labels)
    images = Counter(c for labels in objects for c in set(labels))
    assert [(r.instances, r.images) for r in per_class] == [
        (instances[c], images[c]) for c in evaluation.category_ids
    ]
    assert total.instances == sum(instances.values())
    assert total.images == sum(1 for labels in objects if labels) < len(targets)

    path = write_class_table(rows, tmp_path / "val_per_class_ap.csv")
    with open(path, newline="") as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == ["category_id", "name", "AP", "AP50", "AP75", "instances", "images"]
    assert written[0]["category_id"] == "" and written[0]["name"] == "all"
    assert float(written[1]["AP"]) == pytest.approx(rows[1].ap, abs=5e-5)
    assert written[-1]["AP"] == "" and written[-1]["instances"] == "0"
    text = format_class_table(rows).splitlines()
    assert text[0].split() == ["class", "AP", "AP@0.5", "AP@0.75", "instances", "images"]
    assert text[-1].split() == ["class", "16", "-", "-", "-", "0", "0"]


class _TensorBoard(TensorBoardLogger):
    """A TensorBoardLogger whose writer records add_image calls (no tensorboard needed)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    @property
    def experiment(self):
        return SimpleNamespace(add_image=lambda *args, **kwargs: self.calls.append((args, kwargs)))


class _Wandb(WandbLogger):
    """A WandbLogger that records log_image calls (no wandb needed)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def log_image(self, **kwargs) -> None:
        self.calls.append(kwargs)


def test_publish_writes_the_png_and_shows_it_in_tensorboard_and_wandb(tmp_path: Path) -> None:
    tensorboard, wandb = _TensorBoard(), _Wandb()
    trainer = SimpleNamespace(default_root_dir=tmp_path, global_step=7,
                              loggers=[tensorboard, wandb, object()])  # fmt: skip
    picture = np.zeros((20, 30, 3), dtype=np.uint8)
    picture[5:10, 5:10] = (255, 0, 0)
    path = publish(trainer, "val", "pr_curve", picture)
    assert path == tmp_path / "val_pr_curve.png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), picture)
    [(args, kwargs)] = tensorboard.calls
    assert args[0] == "val/pr_curve" and args[1] is picture and args[2] == 7
    assert kwargs == {"dataformats": "HWC"}
    [call] = wandb.calls
    assert call["key"] == "val/pr_curve" and call["images"] == [picture] and call["step"] == 7


def test_pictures_show_the_first_images_with_truth_beside_the_kept_detections(
    tmp_path: Path,
) -> None:
    """Two batches of two black 100 px images; three pictures wanted. Image 0 has a cat, found as a
    fox (score 0.9) and as a dog (0.1, under the threshold)."""
    metric = _coco_map()
    module = SimpleNamespace(val_map=metric, evaluations={})
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, loggers=[],
                              default_root_dir=tmp_path, global_step=0)  # fmt: skip
    pictures = PredictionPictures(num_images=3, score_threshold=0.25, side=200)
    first = _image(truth=[([10, 10, 60, 60], CAT)],
                   found=[([10, 10, 60, 60], FOX, 0.9), ([20, 20, 50, 50], DOG, 0.1)])  # fmt: skip
    batches = [[first, _image()], [_image(), _image()]]
    pictures.on_validation_epoch_start(trainer, module)
    for i, batch in enumerate(batches):
        preds, targets = zip(*batch, strict=True)
        metric.update(list(preds), list(targets))  # as the module's validation_step does
        for t in targets:
            t["orig_size"] = torch.tensor([100, 100])
        pictures.on_validation_batch_end(trainer, module, None, (torch.zeros(2, 3, 64, 64),
                                                                 list(targets)), i)  # fmt: skip
    module.evaluations["val"] = _computed(metric)
    pictures.on_validation_end(trainer, module)

    assert pictures.path == tmp_path / "val_predictions.png"
    picture = np.asarray(Image.open(pictures.path).convert("RGB"))
    # three images, two panels each, four panels (200 px) a row, 4 px apart
    assert picture.shape[1] == 4 * 200 + 5 * 4
    panel = 200 + 4
    rows = picture.shape[0] // 2

    def colours(column: int, row: int = 0) -> set[tuple[int, ...]]:
        part = picture[row * rows : (row + 1) * rows, 4 + column * panel : (column + 1) * panel]
        return {tuple(c) for c in part.reshape(-1, 3).tolist()}

    cat, dog, fox = (class_colour(i) for i in range(3))
    truth, found = colours(0), colours(1)
    assert cat in truth and fox not in truth
    assert fox in found and cat not in found and dog not in found  # 0.1 < 0.25
    # the other images: black panels without boxes
    for column in (2, 3):
        assert not {cat, dog, fox} & colours(column)
    assert not {cat, dog, fox} & colours(0, row=1)
    # not during the sanity check
    trainer.sanity_checking = True
    pictures.path.unlink()
    pictures.on_validation_end(trainer, module)
    assert not (tmp_path / "val_predictions.png").exists()


def _valid_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()


@pytest.mark.slow  # 2 epochs of the demo model and a test pass: 30-60 s on 2 busy cores
def test_demo_run_leaves_the_evaluation_pictures_in_its_run_directory(
    tmp_path: Path, caplog
) -> None:
    run = tmp_path / "run"
    overrides = [
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.output_dir={run}",
        "data.synthetic.num_train=4",
        "data.synthetic.num_val=3",
        "data.synthetic.empty_fraction=0.0",
        *SMALL_SYNTHETIC,
        "data.num_workers=0",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "extras.print_config=false",
        "callbacks.rich_progress_bar=null",
    ]
    cfg = compose_config("train", overrides)
    try:
        with caplog.at_level(logging.INFO, logger="rtdetr_lit"):
            metrics = train(cfg)
    finally:
        GlobalHydra.instance().clear()
    for stage in ("val", "test"):
        for name in ("pr_curve", "confusion_matrix", "confusion_matrix_normalized", "predictions"):
            _valid_png(run / f"{stage}_{name}.png")
    with open(run / "test_per_class_ap.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["name"] == "all"
    assert float(rows[0]["AP"]) == pytest.approx(float(metrics["test/mAP"]), abs=5e-5)
    assert len(rows) == 1 + cfg.data.num_classes and all(r["name"] for r in rows)
    assert "test: COCO AP per class" in caplog.text
