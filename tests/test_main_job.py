"""The main job end to end on a tiny synthetic set: train, evaluate, checkpoints, pictures; and
evaluating a converted reference checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from rtdetr_lit.config import ConfigError
from rtdetr_lit.eval import evaluate
from rtdetr_lit.train import train

from .conftest import compose_config, random_state, reference_layout

TINY = [
    "data.synthetic.num_train=16",
    "data.synthetic.num_val=6",
    "data.synthetic.min_size=128",
    "data.synthetic.max_size=160",
    "data.synthetic.max_object=100",
    "data.image_size=[128,128]",
    "data.batch_size=4",
    "data.val_batch_size=3",
    "data.num_workers=0",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "extras.print_config=false",
]


def _paths(cfg: DictConfig, tmp_path: Path) -> DictConfig:
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.data_dir = str(tmp_path / "data")
    return cfg


def test_main_job_trains_evaluates_and_writes_its_outputs(tmp_path: Path, caplog) -> None:
    cfg = _paths(compose_config("train", TINY), tmp_path)
    with caplog.at_level(logging.INFO, logger="rtdetr_lit"):
        metrics = train(cfg)
    run = tmp_path / "run"
    for key in ("val/mAP", "val/mAP_50", "val/mAP_best", "test/mAP_50", "train/loss"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert "val/mAP_50" in caplog.text and "checkpoints: " + str(run / "checkpoints") in caplog.text
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and len(list((run / "checkpoints").glob("epoch_*.ckpt"))) == 1
    table = (run / "val_per_class_ap.csv").read_text().splitlines()
    assert table[0] == "category_id,name,AP,AP50,AP75,instances,images"
    # what a user looks at: one summary line per epoch, the results table and the pictures
    epochs = [r.getMessage() for r in caplog.records if "val mAP" in r.getMessage()]
    assert len(epochs) == 2 and all("mAP@0.5" in line for line in epochs), epochs
    assert len((run / "results.csv").read_text().splitlines()) == 1 + 2
    for stage in ("val", "test"):
        for picture in ("predictions", "pr_curve", "confusion_matrix"):
            assert (run / f"{stage}_{picture}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "results.png").stat().st_size > 1000
    # the synthetic data was generated, with its version stamp, under paths.data_dir
    stamp = json.loads((tmp_path / "data" / "synthetic" / "VERSION.json").read_text())
    assert stamp["config"]["num_train"] == 16

    # Evaluating last.ckpt gives back the mAP the run reported for its last epoch (EMA weights).
    eval_cfg = _paths(compose_config("eval", [*TINY, f"ckpt_path={last}"]), tmp_path / "eval")
    with open_dict(eval_cfg):
        eval_cfg.paths.data_dir = str(tmp_path / "data")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rtdetr_lit"):
        result = evaluate(eval_cfg)
    assert "val/mAP_50" in caplog.text and "checkpoints: " not in caplog.text  # eval saves none
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1
    logged = ckpt["callbacks"]
    assert any("ModelCheckpoint" in k for k in logged)
    assert result["val/mAP_50"] == pytest.approx(metrics["val/mAP_50"], abs=1e-6)


def _coco80_val(root: Path, synthetic: Path) -> Path:
    """The synthetic val images with COCO's 80 category ids (1..80), as a reference model needs."""
    data = json.loads((synthetic / "annotations" / "instances_val.json").read_text())
    data["categories"] = [{"id": i, "name": f"class{i}"} for i in range(1, 81)]
    path = root / "val80.json"
    path.write_text(json.dumps(data))
    return path


def test_eval_accepts_a_reference_checkpoint(tmp_path: Path, reference_dir: Path) -> None:
    ckpt = tmp_path / "rtdetrv2_r18vd.pth"
    torch.save({"ema": {"module": random_state(reference_layout("r18"), seed=0)}}, ckpt)
    overrides = [*TINY, "model=r18", f"ckpt_path={ckpt}", "model.net.num_queries=50",
                 "model.postprocessor.num_top_queries=50"]  # fmt: skip
    # The reference was trained on COCO's 80 classes: a 6-class dataset does not fit its head.
    cfg = _paths(compose_config("eval", overrides), tmp_path)
    with pytest.raises(ConfigError, match=r"does not fit model=r18 with 6 classes"):
        evaluate(cfg)

    # On an 80-class dataset it loads and evaluates.
    instantiate(cfg.data).prepare_data()  # generate the synthetic images
    synthetic = tmp_path / "data" / "synthetic"
    val80 = _coco80_val(tmp_path, synthetic)
    cfg = _paths(compose_config("eval", [*overrides, "data.num_classes=80",
                                         f"data.val_annotations={val80}"]), tmp_path)  # fmt: skip
    result = evaluate(cfg)
    assert 0.0 <= result["val/mAP"] <= 1.0
