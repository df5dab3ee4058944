"""Options that add to what a run reports: ``callbacks=early_stopping`` (Lightning's EarlyStopping
on val/mAP on top of the default callbacks, and a short run that it stops) and ``logger=mlflow``
(metrics in an MLflow store inside the run directory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import open_dict

from rtdetr_lit.run import build_callbacks, build_loggers
from rtdetr_lit.train import train
from tests.conftest import QUIET_CPU_RUN, SMALL_SYNTHETIC, compose_config


def _callbacks(option: str, tmp_path: Path):
    overrides = [f"callbacks={option}", f"paths.output_dir={tmp_path}"]
    return compose_config("train", overrides).callbacks


def test_early_stopping_adds_to_the_default_callbacks(tmp_path: Path) -> None:
    default = _callbacks("default", tmp_path)
    group = _callbacks("early_stopping", tmp_path)
    assert set(group) == {*default, "early_stopping"}
    for name in default:
        assert group[name] == default[name], name

    built = build_callbacks(group)
    stoppers = [c for c in built if isinstance(c, EarlyStopping)]
    assert len(stoppers) == 1 and len(built) == len(build_callbacks(default)) + 1
    stopper = stoppers[0]
    assert stopper.monitor == "val/mAP" and stopper.mode == "max"
    assert stopper.patience == 10 and stopper.min_delta == 0


@pytest.mark.slow  # 2 epochs of the demo model: over a minute on the 2-core machine
def test_a_run_without_progress_stops_early(tmp_path: Path) -> None:
    # min_delta 1: no validation after the first can improve val/mAP (at most 1) by that much, so
    # with patience 1 the run stops after its 2nd validation of the 6 epochs it could run.
    overrides = [
        "callbacks=early_stopping",
        "callbacks.early_stopping.patience=1",
        "callbacks.early_stopping.min_delta=1.0",
        *QUIET_CPU_RUN,
        *SMALL_SYNTHETIC,
        "data.synthetic.num_train=2",
        "data.synthetic.num_val=2",
        "data.num_workers=0",
        "trainer.max_epochs=6",
        "logger=csv",
    ]
    cfg = compose_config("train", overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.data_dir = str(tmp_path / "data")
    metrics = train(cfg)
    assert "val/mAP" in metrics

    last = torch.load(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert last["epoch"] == 1  # epochs 0 and 1 of 0..5
    state = next(v for k, v in last["callbacks"].items() if k.startswith("EarlyStopping"))
    assert state["wait_count"] == 1 and state["stopped_epoch"] == 1


def test_mlflow_logger_config_stays_in_the_run_directory(tmp_path: Path) -> None:
    overrides = ["logger=mlflow", f"paths.output_dir={tmp_path}", "task_name=mine"]
    node = compose_config("train", overrides).logger.mlflow
    assert node._target_ == "lightning.pytorch.loggers.MLFlowLogger"
    assert node.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert node.artifact_location == f"{tmp_path}/mlartifacts"
    assert node.experiment_name == "mine"


def test_mlflow_logger_writes_metrics_into_its_store(tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow", reason="the loggers extra is not installed")
    pytest.importorskip("sqlalchemy", reason="the loggers extra is not installed")
    out = tmp_path / "run"
    overrides = ["logger=mlflow", f"paths.output_dir={out}", "task_name=mine"]
    (logger,) = build_loggers(compose_config("train", overrides).logger)
    logger.log_metrics({"val/mAP": 0.25}, step=3)
    logger.log_metrics({"val/mAP": 0.5}, step=7)
    logger.finalize("success")

    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("mine")
    assert experiment is not None and logger.experiment_id == experiment.experiment_id
    history = client.get_metric_history(logger.run_id, "val/mAP")
    assert [(m.step, m.value) for m in history] == [(3, 0.25), (7, 0.5)]
    assert client.get_run(logger.run_id).info.status == "FINISHED"
