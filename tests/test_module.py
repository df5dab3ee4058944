"""RTDETRModule end to end on a tiny in-memory dataset: steps, param groups, mAP, checkpoints."""

from __future__ import annotations

import csv
from collections import Counter
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from rtdetr_lit import create_model
from rtdetr_lit.callbacks import EMA
from rtdetr_lit.checkpoints import load_model_weights
from rtdetr_lit.loss import HungarianMatcher, RTDETRCriterion
from rtdetr_lit.models import RTDETRPostProcessor
from rtdetr_lit.module import RTDETRModule
from rtdetr_lit.optim import warmup_schedule

NUM_CLASSES = 3
CATEGORY_IDS = [2, 7, 9]


class _Squares(Dataset):
    """Bright squares on black: label = square size bucket. Follows the batch contract."""

    def __init__(self, n: int, size: int = 128) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(i)
        image = torch.zeros(3, self.size, self.size)
        k = int(torch.randint(0, 3, (1,), generator=g))
        side = (20, 40, 60)[k]
        x, y = (int(v) for v in torch.randint(0, self.size - side, (2,), generator=g))
        image[:, y : y + side, x : x + side] = 1.0
        s = float(self.size)
        box = torch.tensor([[(x + side / 2) / s, (y + side / 2) / s, side / s, side / s]])
        return image, {
            "boxes": box,
            "labels": torch.tensor([k]),
            "image_id": torch.tensor(i),
            "orig_size": torch.tensor([self.size * 2, self.size * 2]),
            "iscrowd": torch.zeros(1, dtype=torch.int64),
            "area": torch.tensor([float(side * side * 4)]),
        }


def _collate(batch):
    images, targets = zip(*batch, strict=True)
    return torch.stack(images), list(targets)


class _DataModule(L.LightningDataModule):
    num_classes = NUM_CLASSES
    category_ids = CATEGORY_IDS
    class_names = ("small", "medium", "large")

    def train_dataloader(self):
        return DataLoader(_Squares(8), batch_size=4, collate_fn=_collate)

    def val_dataloader(self):
        return DataLoader(_Squares(4), batch_size=4, collate_fn=_collate)


def _module(**kwargs) -> RTDETRModule:
    torch.manual_seed(0)
    net = create_model("demo", num_classes=NUM_CLASSES, eval_spatial_size=(128, 128))
    criterion = RTDETRCriterion(
        NUM_CLASSES, HungarianMatcher(2.0, 5.0, 2.0, 0.25, 2.0),
        {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    )  # fmt: skip
    return RTDETRModule(
        net, criterion, RTDETRPostProcessor(NUM_CLASSES, 100),
        optimizer=partial(torch.optim.AdamW, lr=2e-4, weight_decay=1e-4),
        scheduler=partial(warmup_schedule, warmup_steps=2), backbone_lr=1e-4, **kwargs,
    )  # fmt: skip


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kwargs,
    )  # fmt: skip


def test_fit_validates_with_map_and_saves_loadable_checkpoints(tmp_path: Path) -> None:
    module = _module()
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/mAP", mode="max", save_last=True
    )
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[EMA(warmup_steps=2), ckpt_cb],
                       gradient_clip_val=0.1)  # fmt: skip
    trainer.fit(module, datamodule=_DataModule())
    metrics = trainer.callback_metrics
    for key in ("val/mAP", "val/mAP_50", "val/mAP_75", "val/mAP_small", "val/mAP_medium",
                "val/mAP_large", "val/mAP_best", "train/loss"):  # fmt: skip
        assert key in metrics, key
        assert torch.isfinite(metrics[key])
    assert trainer.global_step == 4
    # the scheduler stepped per iteration: warmup of 2 steps then constant
    head = next(g for g in trainer.optimizers[0].param_groups if g["name"] == "head")
    assert head["lr"] == pytest.approx(2e-4)
    backbone = next(g for g in trainer.optimizers[0].param_groups if g["name"] == "backbone")
    assert backbone["lr"] == pytest.approx(1e-4)

    # The per-class table of the last validation: "all", then every class by category id, with
    # the metric's AP per class, and the objects and images of the 4 val squares.
    with open(tmp_path / "val_per_class_ap.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["category_id", "name", "AP", "AP50", "AP75", "instances", "images"]
    assert [(r["category_id"], r["name"]) for r in table] == [
        ("", "all"),
        *zip(map(str, CATEGORY_IDS), ("small", "medium", "large"), strict=True),
    ]
    result = module.evaluations["val"].result
    ap = dict(zip(result["classes"].tolist(), result["map_per_class"].tolist(), strict=True))
    squares = Counter(int(_Squares(4)[i][1]["labels"]) for i in range(4))
    for k, row in enumerate(table[1:]):
        assert (int(row["instances"]), int(row["images"])) == (squares[k], squares[k])
        expected = ap.get(CATEGORY_IDS[k], -1.0)
        assert row["AP"] == ("" if expected == -1 else f"{expected:.4f}")
    assert (table[0]["instances"], table[0]["images"]) == ("4", "4")
    assert float(table[0]["AP"]) == pytest.approx(float(metrics["val/mAP"]), abs=5e-5)

    # last.ckpt loads with weights_only and holds the EMA weights as the model's state_dict
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert "current_model_state" in last
    # the datamodule's classes travel with the checkpoint (export/predict name them from it)
    assert last["hyper_parameters"]["category_ids"] == CATEGORY_IDS
    assert last["hyper_parameters"]["class_names"] == ["small", "medium", "large"]
    fresh = create_model("demo", num_classes=NUM_CLASSES, eval_spatial_size=(128, 128))
    assert load_model_weights(fresh, tmp_path / "ckpt" / "last.ckpt") == []
    ema_weight = last["state_dict"]["net.decoder.enc_score_head.weight"]
    torch.testing.assert_close(fresh.decoder.enc_score_head.weight, ema_weight)


def test_map_uses_original_sizes_and_category_ids() -> None:
    module = _module()
    module.category_ids = CATEGORY_IDS
    images, targets = _collate([_Squares(2)[i] for i in range(2)])

    # A perfect "detector": logits and boxes read off the targets.
    def oracle(_images):
        logits = torch.full((2, 100, NUM_CLASSES), -10.0)
        boxes = torch.full((2, 100, 4), 0.1)
        for b, t in enumerate(targets):
            logits[b, 0, t["labels"][0]] = 10.0
            boxes[b, 0] = t["boxes"][0]
        return {"pred_logits": logits, "pred_boxes": boxes}

    module.net.forward = oracle
    module._update_map(module.val_map, (images, targets))
    preds = module.val_map.detection_box
    groundtruth = module.val_map.groundtruth_box
    torch.testing.assert_close(preds[0][0], groundtruth[0][0])
    # original images are 256 px; torchmetrics stores boxes as COCO xywh for its backend
    cx, cy, w, h = (targets[0]["boxes"][0] * 256).tolist()
    expected = torch.tensor([cx - w / 2, cy - h / 2, w, h])
    torch.testing.assert_close(groundtruth[0][0], expected)
    assert set(module.val_map.groundtruth_labels[0].tolist()) <= set(CATEGORY_IDS)
    assert module.val_map.compute()["map"] == pytest.approx(1.0)


def test_class_count_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    class _Wrong(_DataModule):
        num_classes = 5

    with pytest.raises(ValueError, match="5 classes but the model was built for 3"):
        _trainer(tmp_path, max_steps=1).fit(_module(), datamodule=_Wrong())


def test_losses_run_in_float32_under_bf16_autocast() -> None:
    module = _module()
    seen = {}
    criterion_forward = module.criterion.forward

    def spy(outputs, targets):
        seen["dtype"] = outputs["pred_logits"].dtype
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return criterion_forward(outputs, targets)

    module.criterion.forward = spy
    batch = _collate([_Squares(2)[i] for i in range(2)])
    module.trainer = None  # not attached: log() is a no-op without a trainer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step(batch, 0)
    assert seen == {"dtype": torch.float32, "autocast": False}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_init_from_loads_weights_and_reports_skipped(tmp_path: Path) -> None:
    source = create_model("demo", num_classes=NUM_CLASSES, eval_spatial_size=(128, 128))
    with torch.no_grad():
        source.decoder.enc_score_head.bias.fill_(0.5)
        source.backbone.conv1.conv1_1.conv.weight.fill_(0.25)
    torch.save({"model": source.state_dict()}, tmp_path / "w.pth")
    module = _module(init_from=str(tmp_path / "w.pth"))
    assert torch.all(module.net.decoder.enc_score_head.bias == 0.5)
    # another class count: everything but the class-dependent tensors is taken
    other = create_model("demo", num_classes=5, eval_spatial_size=(128, 128))
    skipped = load_model_weights(other, tmp_path / "w.pth")
    assert "decoder.enc_score_head.weight" in skipped
    assert torch.all(other.backbone.conv1.conv1_1.conv.weight == 0.25)
