"""``rtdetr_lit.inference``: the fused detector with post-processing, class names from the
checkpoint or the data config, and one read of the checkpoint per command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rtdetr_lit.config import ConfigError
from rtdetr_lit.export import export
from rtdetr_lit.inference import read_checkpoint, resolve_classes
from rtdetr_lit.models import RTDETRPostProcessor
from rtdetr_lit.predict import predict
from tests.test_export import (
    NUM_CLASSES,
    assert_same_detections,
    demo_net,
    entry_config,
    inference_model,
    random_inputs,
    save_lightning_checkpoint,
)


def test_class_names_from_the_data_config(tmp_path):
    """Without names in the checkpoint, the validation annotations of the data config name the
    classes (only the JSON is read: no image needs to exist); without those, "class N"."""
    ckpt = tmp_path / "w.pth"
    torch.save({"model": demo_net().state_dict()}, ckpt)
    root = tmp_path / "my_set"
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": 11, "name": "apple"}, {"id": 4, "name": "pear"}]
    (root / "annotations" / "val.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": categories})
    )
    cfg = entry_config(
        "export", tmp_path, [f"ckpt_path={ckpt}", "data=custom", f"data.root={root}"]
    )
    classes = resolve_classes(cfg, read_checkpoint(ckpt), NUM_CLASSES)
    # contiguous labels follow increasing category id
    assert classes.names == ("pear", "apple") and classes.category_ids == (4, 11)
    cfg = entry_config(
        "export", tmp_path, [f"ckpt_path={ckpt}", "data=custom", f"data.root={tmp_path}"]
    )
    assert resolve_classes(cfg, read_checkpoint(ckpt), NUM_CLASSES).names == ("class 0", "class 1")
    with pytest.raises(ConfigError, match="gives 2 class names but the model has 3 classes"):
        resolve_classes(
            entry_config(
                "export", tmp_path, [f"ckpt_path={ckpt}", "data=custom", f"data.root={root}"]
            ),
            read_checkpoint(ckpt),
            3,
        )


def test_inference_model_is_the_fused_detector_with_postprocessing():
    net = demo_net()
    images, sizes = random_inputs(2, seed=0)
    with torch.no_grad():
        raw = net.eval()(images)
        want = RTDETRPostProcessor(NUM_CLASSES, 300).deploy()(raw, sizes)
        got = inference_model(net)(images, sizes)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert_same_detections(got, want, sizes)
    assert np.isin(got[0].numpy(), [0, 1]).all()


def test_read_checkpoint_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^ckpt_path: no such file .*nowhere\.ckpt$"):
        read_checkpoint(tmp_path / "nowhere.ckpt")


@pytest.mark.parametrize("command", ["export", "predict"])
def test_a_command_reads_the_checkpoint_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """Weights and class names come from one read of the file (a checkpoint can be gigabytes on a
    network file system)."""
    ckpt = tmp_path / "run.ckpt"
    picture = tmp_path / "pictures" / "a.png"
    picture.parent.mkdir()
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(picture)
    overrides = [f"ckpt_path={ckpt}", f"output={tmp_path / 'out'}"]
    if command == "predict":
        overrides.append(f"source={picture.parent}")
    else:
        overrides[-1] = f"output={tmp_path / 'model.onnx'}"
    cfg = entry_config(command, tmp_path, overrides)
    save_lightning_checkpoint(ckpt, cfg, demo_net())
    reads: list[str] = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    if command == "export":
        export(cfg)
    else:
        predict(cfg)
    assert reads == [str(ckpt)]
