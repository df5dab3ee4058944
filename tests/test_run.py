"""``rtdetr_lit.run``: what the entry points do before building anything (here: the number of
classes counted in the dataset when the config leaves it out)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rtdetr_lit.config import ConfigError
from rtdetr_lit.run import derive_num_classes
from tests.conftest import compose_config


def test_num_classes_is_counted_in_the_dataset_when_not_given(tmp_path: Path) -> None:
    annotations = tmp_path / "my_set" / "annotations"
    annotations.mkdir(parents=True)
    categories = [{"id": 4, "name": "cat"}, {"id": 9, "name": "dog"}, {"id": 11, "name": "owl"}]
    (annotations / "val.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": categories})
    )
    cfg = compose_config("train", ["data=custom", f"data.root={tmp_path / 'my_set'}"])
    assert cfg.data.num_classes is None
    derive_num_classes(cfg)
    # the model, its loss and its post-processor read it
    assert cfg.data.num_classes == 3 and cfg.model.net.num_classes == 3
    assert cfg.model.postprocessor.num_classes == 3
    # a given value is kept (the data module compares it with the dataset at set-up)
    cfg = compose_config(
        "train", ["data=custom", f"data.root={tmp_path / 'my_set'}", "data.num_classes=5"]
    )
    derive_num_classes(cfg)
    assert cfg.data.num_classes == 5
    # YOLO: one class per name
    cfg = compose_config("train", ["data=yolo", f"data.root={tmp_path}", "data.names=[a,b]"])
    derive_num_classes(cfg)
    assert cfg.model.net.num_classes == 2


def test_no_annotations_to_count_in_is_a_config_error(tmp_path: Path) -> None:
    cfg = compose_config("train", ["data=custom", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^data\.num_classes: not given, and no annotations"):
        derive_num_classes(cfg)
