"""The main job's progress lines and results table, on the demo model and the synthetic data:
in this process, and as ``python -m rtdetr_lit.train`` with its output in a file."""

from __future__ import annotations

import csv
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from rtdetr_lit.train import train
from tests.conftest import QUIET_CPU_RUN, SMALL_SYNTHETIC, compose_config

REPO = Path(__file__).resolve().parents[2]


def _overrides(root: Path) -> list[str]:
    """2 epochs of 2 steps (4 images, 2 a step), 2 val images; a step line every step."""
    return [
        f"paths.data_dir={root / 'data'}",
        f"paths.log_dir={root / 'logs'}",
        "data.synthetic.num_train=4",
        "data.synthetic.num_val=2",
        *SMALL_SYNTHETIC,
        "data.num_workers=0",
        "trainer.max_epochs=2",
        *QUIET_CPU_RUN,
        "callbacks.progress_log.every_n_steps=1",
    ]


# A step line of the demo run, and an epoch line with validation (the ETA may be anything).
STEP = re.compile(r"step (\d)/4  epoch (\d)/1  loss \d+\.\d{4}  lr \S+  \d+\.\d\d s/step  ETA ")
EPOCH = re.compile(
    r"epoch (\d)/1  train loss \d+\.\d{4}  val mAP \d\.\d{4}  mAP@0\.5 \d\.\d{4}  best mAP "
    r"\d\.\d{4}  time \S+ \(val \S+\)  ETA "
)


def assert_progress_lines(text: str) -> None:
    """A step line for each of the 4 steps, an epoch line after each of the 2 validations."""
    assert [m.groups() for m in STEP.finditer(text)] == [("1", "0"), ("2", "0"), ("3", "1"),
                                                         ("4", "1")]  # fmt: skip
    assert [m.group(1) for m in EPOCH.finditer(text)] == ["0", "1"]


def assert_results(run: Path) -> None:
    with open(run / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["step"]) for r in rows] == [("0", "2"), ("1", "4")]
    columns = list(rows[0])
    assert columns[:2] == ["epoch", "step"] and columns[-2:] == ["time", "val_time"]
    logged = {"train/loss", "train/loss_vfl", "train/loss_bbox", "train/loss_giou",
              "train/skipped_steps", "val/mAP", "val/mAP_50", "val/mAP_75", "val/mAP_best",
              "lr/backbone", "lr/head"}  # fmt: skip
    assert logged <= set(columns), logged - set(columns)
    assert all(row[key] != "" for row in rows for key in logged)
    with Image.open(run / "results.png") as image:
        assert image.format == "PNG"
        image.verify()


def test_demo_run_in_process(tmp_path: Path, caplog) -> None:
    cfg = compose_config("train", [*_overrides(tmp_path), f"paths.output_dir={tmp_path / 'run'}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a busy 2-core machine are slower than one
    try:
        with caplog.at_level(logging.INFO, logger="rtdetr_lit"):
            train(cfg)
    finally:
        torch.set_num_threads(threads)
        GlobalHydra.instance().clear()
    assert_progress_lines(caplog.text)
    assert_results(tmp_path / "run")


@pytest.mark.slow  # a fresh training process: 40-90 s on 2 busy cores
def test_demo_run_with_its_output_in_a_file(tmp_path: Path) -> None:
    """``make train > out.txt``: stdout is not a terminal. The lines are in the file and in the
    run's train.log (Hydra's job logging)."""
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "rtdetr_lit.train", *_overrides(tmp_path),
           f"hydra.run.dir={run}"]  # fmt: skip
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        done = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=900)  # fmt: skip
    text = out.read_text()
    assert done.returncode == 0, text[-4000:]
    assert_progress_lines(text)
    assert_progress_lines((run / "train.log").read_text())
    assert_results(run)
