"""results.csv and results.png: their contents, rank 0, and resuming."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from rtdetr_lit.callbacks import ResultsTable
from rtdetr_lit.callbacks.results import draw_results, write_results

from .toy import fit_toy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What Toy logs: the loss terms, the learning rate of its one group, the val metrics.
COLUMNS = ["epoch", "step", "train/loss", "train/loss_index", "lr/head", "val/mAP", "val/mAP_50",
           "time", "val_time"]  # fmt: skip


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_table_columns_in_order_of_appearance_and_empty_cells(tmp_path: Path) -> None:
    rows = [{"epoch": 0, "train/loss": 1.23456789, "time": None}, {"epoch": 1, "val/mAP": 0.5}]
    write_results(rows, tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines() == [
        "epoch,train/loss,time,val/mAP",
        "0,1.23457,,",
        "1,,,0.5",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]  # no temporary file left


def test_picture_has_a_panel_per_loss_and_one_for_map(tmp_path: Path) -> None:
    rows = [
        {"epoch": e, "train/loss": 9.0 - e, "train/loss_bbox": 1.0, "train/skipped_steps": 0.0,
         "val/mAP": 0.1 * e, "val/mAP_50": 0.2 * e, "val/mAP_75": 0.05 * e}
        for e in range(3)
    ]  # fmt: skip
    draw_results(rows, tmp_path / "four.png")  # loss, loss_bbox, mAP: one row of three panels
    rows[0]["train/loss_giou"] = 1.0
    draw_results(rows, tmp_path / "more.png")  # four panels: two rows
    for name, size in (("four.png", (960, 240)), ("more.png", (960, 480))):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
        with Image.open(tmp_path / name) as image:
            image.verify()
            assert image.size == size
    draw_results([{"epoch": 0, "time": 1.0}], tmp_path / "none.png")  # nothing to draw
    assert not (tmp_path / "none.png").exists()


def test_a_row_per_epoch_after_validation(tmp_path: Path) -> None:
    table = ResultsTable()
    fit_toy(tmp_path, [table], enable_checkpointing=False)
    rows = _rows(tmp_path / "results.csv")
    assert list(rows[0]) == COLUMNS and len(rows) == 2
    assert [(r["epoch"], r["step"], r["val/mAP"], r["val/mAP_50"]) for r in rows] == [
        ("0", "4", "0.1", "0.2"),
        ("1", "8", "0.2", "0.4"),
    ]
    # the mean of the batch indices 0-3; the learning rate as set; times in seconds
    assert {r["train/loss_index"] for r in rows} == {"1.5"} and rows[0]["lr/head"] == "0.01"
    assert all(0 < float(r["val_time"]) < float(r["time"]) for r in rows)
    assert (tmp_path / "results.png").read_bytes().startswith(PNG_SIGNATURE)


def test_no_picture_when_asked_for_none(tmp_path: Path) -> None:
    fit_toy(tmp_path, [ResultsTable(plot_name=None)], epochs=1, enable_checkpointing=False)
    assert len(_rows(tmp_path / "results.csv")) == 1
    assert not (tmp_path / "results.png").exists()


def test_other_ranks_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = ResultsTable()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    table.on_train_start(None, None)  # returns before touching the trainer
    table.on_validation_end(None, None)
    assert table.rows == [] and not list(tmp_path.iterdir())


class _Peek(L.Callback):
    """Reads the table as training starts (after the table's callback)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[list[dict[str, str]]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen.append(_rows(self.path))


def _checkpoints(root: Path) -> list[ModelCheckpoint]:
    """Every 2 steps (the middle and the last batch of each 4-step epoch), and at every epoch
    end, after validation."""
    settings = {"dirpath": root, "save_top_k": -1, "auto_insert_metric_name": False}
    return [
        ModelCheckpoint(filename="step_{step}", every_n_train_steps=2, **settings),
        ModelCheckpoint(filename="end_{epoch}", **settings),
    ]


def test_a_resumed_run_rewrites_the_history_and_continues_it(tmp_path: Path) -> None:
    first = tmp_path / "first"
    fit_toy(first, [ResultsTable(), *_checkpoints(first / "ckpt")])
    rows = _rows(first / "results.csv")

    # In another run directory, from the end of epoch 0, one epoch more: the row of epoch 0
    # comes from the checkpoint, epochs 1 and 2 are trained.
    second = tmp_path / "second"
    fit_toy(second, [ResultsTable()], epochs=3, ckpt_path=first / "ckpt" / "end_0.ckpt",
            enable_checkpointing=False)  # fmt: skip
    resumed = _rows(second / "results.csv")
    assert [r["epoch"] for r in resumed] == ["0", "1", "2"] and resumed[0] == rows[0]

    # In the same directory (a requeued job), from the middle of epoch 1: the row of epoch 1,
    # written after that checkpoint, is dropped as the run starts, then written again over all
    # the epoch's batches.
    peek = _Peek(first / "results.csv")
    fit_toy(first, [ResultsTable(), peek], ckpt_path=first / "ckpt" / "step_6.ckpt",
            enable_checkpointing=False)  # fmt: skip
    assert peek.seen == [rows[:1]]
    again = _rows(first / "results.csv")
    assert [r["epoch"] for r in again] == ["0", "1"] and again[0] == rows[0]
    assert again[1]["train/loss_index"] == "1.5"  # batches 0-1 before the checkpoint, 2-3 after
