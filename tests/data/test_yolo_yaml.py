"""``data=yolo data.data_yaml=...``: an Ultralytics dataset file gives the root, the image folders
(labels beside them) and the class names; each kind of mess has a defined outcome."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra.utils import instantiate

from rtdetr_lit.config import ConfigError, check_required, validate_config
from rtdetr_lit.data import YoloDataModule
from rtdetr_lit.data.yolo_yaml import label_path
from rtdetr_lit.run import derive_num_classes
from tests.conftest import compose_config

from .conftest import write_image

# Image name -> (width, height, label text or None for no label file); 80x40 unless said.
TRAIN = {"a": (80, 40, "1 0.5 0.5 0.25 0.5\n0 0.1 0.1 0.1 0.1\n"), "b": (80, 40, "2 0.5 0.5 1 1\n")}
VAL = {"c": (64, 32, "0 0.25 0.5 0.5 0.5\n"), "d": (64, 32, None)}


def _write_split(root: Path, split: str, images: dict) -> None:
    for stem, (width, height, text) in images.items():
        image = root / "images" / split / f"{stem}.jpg"
        image.parent.mkdir(parents=True, exist_ok=True)
        write_image(image, width, height, seed=len(stem) + ord(stem[0]))
        if text is not None:
            label = root / "labels" / split / f"{stem}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(text)


def _dataset(tmp_path: Path, text: str | None = None, **keys) -> Path:
    """An Ultralytics dataset in ``tmp_path/ds`` and its data.yaml (``keys`` replace its
    entries; None removes one; ``text`` replaces the whole file)."""
    root = tmp_path / "ds"
    _write_split(root, "train", TRAIN)
    _write_split(root, "val", VAL)
    data = {"train": "images/train", "val": "images/val", "nc": 3,
            "names": {0: "cat", 1: "dog", 2: "owl"}}  # fmt: skip
    data.update(keys)
    data = {k: v for k, v in data.items() if v is not None}
    path = root / "data.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data, sort_keys=False))
    return path


def _module(data_yaml: Path, **overrides) -> YoloDataModule:
    kwargs = {"batch_size": 2, "val_batch_size": 2, "num_workers": 0, "pin_memory": False,
              "image_size": (64, 64)}  # fmt: skip
    kwargs.update(overrides)
    return YoloDataModule(data_yaml=str(data_yaml), **kwargs)


def test_the_data_yaml_gives_root_folders_names_and_batches(tmp_path: Path) -> None:
    dm = _module(_dataset(tmp_path))
    assert dm.count_classes() == 3 and dm.class_names == ["cat", "dog", "owl"]
    assert dm.root == str(tmp_path / "ds")
    dm.setup("fit")
    train = dm.annotations["train"]
    assert [train.file_name(i) for i in range(2)] == ["images/train/a.jpg", "images/train/b.jpg"]
    np.testing.assert_allclose(train.boxes, [[30, 10, 50, 30], [4, 2, 12, 6], [0, 0, 80, 40]])
    assert train.labels.tolist() == [1, 0, 2]
    val = dm.annotations["val"]
    assert np.diff(val.box_offsets).tolist() == [1, 0]  # d.jpg has no label file: a negative
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, 64, 64)
    assert [t["labels"].tolist() for t in targets] == [[0], []]
    np.testing.assert_allclose(targets[0]["boxes"][0].tolist(), [0.25, 0.5, 0.5, 0.5], atol=1e-5)
    _, targets = next(iter(dm.train_dataloader()))
    assert sorted(label for t in targets for label in t["labels"].tolist()) == [0, 1, 2]


def test_names_may_be_a_list_and_nc_is_optional(tmp_path: Path) -> None:
    dm = _module(_dataset(tmp_path, names=["cat", "dog", "owl"], nc=None))
    assert dm.class_names == ["cat", "dog", "owl"] and dm.category_ids == [0, 1, 2]


@pytest.mark.parametrize("where", ["absent", "relative", "absolute"])
def test_path_is_relative_to_the_yaml_folder_or_absent(tmp_path: Path, where: str) -> None:
    data_yaml = _dataset(tmp_path)
    text = data_yaml.read_text()
    if where != "absent":  # the file elsewhere, pointing at the dataset
        path = "../ds" if where == "relative" else str(tmp_path / "ds")
        data_yaml = tmp_path / "configs" / "data.yaml"
        data_yaml.parent.mkdir()
        data_yaml.write_text(f"path: {path}\n{text}")
    dm = _module(data_yaml)
    dm.setup("validate")
    assert dm.root == str(tmp_path / "ds") and len(dm.datasets["val"]) == 2


def test_lists_of_folders_and_image_list_files(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _write_split(root, "extra", {"e": (80, 40, "1 0.5 0.5 0.5 0.5\n")})
    _write_split(root, "nested/deep", {"n": (80, 40, "0 0.5 0.5 0.5 0.5\n")})
    (root / "val.txt").write_text(f"./images/val/c.jpg\n\n{root / 'images' / 'extra' / 'e.jpg'}\n")
    data_yaml = _dataset(tmp_path, train=["images/train", "images/extra", "images/nested"],
                         val="val.txt")  # fmt: skip
    dm = _module(data_yaml)
    dm.setup("fit")
    train, val = dm.annotations["train"], dm.annotations["val"]
    names = [train.file_name(i) for i in range(len(train))]
    assert names == ["images/train/a.jpg", "images/train/b.jpg", "images/extra/e.jpg",
                     "images/nested/deep/n.jpg"]  # fmt: skip
    assert train.labels.tolist() == [1, 0, 2, 1, 0]
    assert [val.file_name(i) for i in range(2)] == ["images/val/c.jpg", "images/extra/e.jpg"]
    assert val.labels.tolist() == [0, 1]


def test_images_outside_the_root_keep_their_absolute_path(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    _write_split(elsewhere, "val", {"x": (80, 40, "0 0.5 0.5 0.5 0.5\n")})
    dm = _module(_dataset(tmp_path, val=str(elsewhere / "images" / "val")))
    dm.setup("validate")
    assert dm.annotations["val"].file_name(0) == str(elsewhere / "images" / "val" / "x.jpg")
    assert dm.datasets["val"][0][1]["labels"].tolist() == [0]


def test_label_files_are_where_ultralytics_puts_them() -> None:
    def path(*parts: str) -> str:
        return os.path.join(os.sep, *parts)

    assert label_path(path("d", "images", "train", "a.jpg")) == path(
        "d", "labels", "train", "a.txt"
    )
    # the last images folder of the path is the one replaced
    assert label_path(path("images", "x", "images", "b.png")) == path(
        "images", "x", "labels", "b.txt"
    )
    # no images folder: the label file is beside the image
    assert label_path(path("d", "pics", "c.jpeg")) == path("d", "pics", "c.txt")


def test_an_unknown_class_index_names_the_label_file_and_line(tmp_path: Path) -> None:
    data_yaml = _dataset(tmp_path)
    (tmp_path / "ds" / "labels" / "train" / "b.txt").write_text(
        "0 0.5 0.5 0.1 0.1\n3 0.5 0.5 1 1\n"
    )
    with pytest.raises(
        ValueError, match=r"labels/train/b\.txt:2: class 3 is not in names \(0\.\.2\)"
    ):
        _module(data_yaml).setup("fit")


def test_broken_label_lines_follow_skip_bad_annotations(tmp_path: Path, caplog) -> None:
    data_yaml = _dataset(tmp_path)
    (tmp_path / "ds" / "labels" / "train" / "b.txt").write_text(
        "2 0.5 nan 1 1\n0 0.5 0.5 0.2 0.2\n"
    )
    with pytest.raises(ValueError, match=r"data\.yaml:\d+: train: 1 label lines are broken"):
        _module(data_yaml).setup("fit")
    dm = _module(data_yaml, skip_bad_annotations=True)
    with caplog.at_level(logging.WARNING, logger="rtdetr_lit"):
        dm.setup("fit")
    assert dm.annotations["train"].labels.tolist() == [1, 0, 0]
    assert "skipped 1 broken label lines" in caplog.text and "b.txt:1:" in caplog.text


def _line_of(data_yaml: Path, key: str) -> int:
    lines = data_yaml.read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.startswith(f"{key}:"))


def test_a_missing_image_folder_names_the_yaml_line_and_key(tmp_path: Path) -> None:
    data_yaml = _dataset(tmp_path, val=["images/val", "images/gone"])
    line = _line_of(data_yaml, "val")
    dm = _module(data_yaml)  # the folders are looked at when a split is set up
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("validate")
    assert (
        str(err.value) == f"{data_yaml}:{line}: val: no such folder {tmp_path / 'ds/images/gone'}"
    )


def test_a_missing_image_list_file_names_the_yaml_line_and_key(tmp_path: Path) -> None:
    data_yaml = _dataset(tmp_path, train="train.txt")
    with pytest.raises(FileNotFoundError, match=rf"data\.yaml:{_line_of(data_yaml, 'train')}: "
                       r"train: no such image list .*train\.txt"):  # fmt: skip
        _module(data_yaml).setup("fit")


def test_a_missing_label_folder_is_an_error_naming_where_labels_belong(tmp_path: Path) -> None:
    data_yaml = _dataset(tmp_path)
    for label in (tmp_path / "ds" / "labels" / "val").iterdir():
        label.unlink()
    (tmp_path / "ds" / "labels" / "val").rmdir()
    with pytest.raises(FileNotFoundError) as err:
        _module(data_yaml).setup("validate")
    message = str(err.value)
    assert message.startswith(f"{data_yaml}:{_line_of(data_yaml, 'val')}: val: none of the 2 ")
    assert str(tmp_path / "ds" / "labels" / "val" / "c.txt") in message


def test_an_empty_image_folder_is_an_error(tmp_path: Path) -> None:
    data_yaml = _dataset(tmp_path, val="images/empty")
    (tmp_path / "ds" / "images" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"val: no images in .*images/empty"):
        _module(data_yaml).setup("validate")


def test_a_listed_image_that_is_missing_is_a_bad_image(tmp_path: Path, caplog) -> None:
    root = tmp_path / "ds"
    data_yaml = _dataset(tmp_path, val="val.txt")
    (root / "val.txt").write_text("images/val/c.jpg\nimages/val/gone.jpg\n")
    with pytest.raises(ValueError, match=r"1 of 2 images cannot be used[\s\S]*gone\.jpg: file not"):
        _module(data_yaml).setup("validate")
    dm = _module(data_yaml, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="rtdetr_lit"):
        dm.setup("validate")
    assert len(dm.datasets["val"]) == 1 and "skipping 1 bad images" in caplog.text


def test_boxes_outside_the_image_are_clipped_or_dropped(tmp_path: Path, caplog) -> None:
    data_yaml = _dataset(tmp_path)
    (tmp_path / "ds" / "labels" / "train" / "b.txt").write_text(
        "0 0.9 0.9 0.4 0.4\n1 1.5 0.5 0.2 0.2\n"  # partly outside; wholly outside
    )
    dm = _module(data_yaml)
    with caplog.at_level(logging.WARNING, logger="rtdetr_lit"):
        dm.setup("fit")
    train = dm.annotations["train"]
    np.testing.assert_allclose(train.boxes[2:], [[56, 28, 80, 40]], atol=1e-4)
    assert "dropped 1 boxes with zero or negative width/height" in caplog.text


def test_nc_that_disagrees_with_names_names_the_line(tmp_path: Path) -> None:
    data_yaml = _dataset(tmp_path, nc=4)
    with pytest.raises(ConfigError) as err:
        _module(data_yaml)
    line = _line_of(data_yaml, "nc")
    assert str(err.value) == f"{data_yaml}:{line}: nc: nc is 4 but names has 3 entries"


@pytest.mark.parametrize(
    ("names", "message"),
    [({0: "cat", 2: "owl"}, r"names: the class indices must run from 0 without gaps; got \[0, 2\], "
                            r"missing \[1\]"),
     ({1: "dog", 2: "owl"}, r"names: .* got \[1, 2\], missing \[0\]"),
     ({"0": "cat"}, r"names: the class indices must be integers"),
     ([], r"names: expected a non-empty list"),
     ("cat", r"names: expected a non-empty list")],
)  # fmt: skip
def test_bad_names_name_the_line(tmp_path: Path, names, message: str) -> None:
    data_yaml = _dataset(tmp_path, names=names, nc=None)
    with pytest.raises(ConfigError, match=rf"data\.yaml:{_line_of(data_yaml, 'names')}: {message}"):
        _module(data_yaml)


@pytest.mark.parametrize(
    ("keys", "text", "message"),
    [({"val": None}, None, r"data\.yaml: val is missing"),
     ({"names": None, "nc": None}, None, r"data\.yaml: names is missing"),
     ({"train": 3}, None, r"data\.yaml:\d+: train: expected a folder of images"),
     ({"path": ["a"]}, None, r"data\.yaml:\d+: path: expected a folder, got \[.a.\]"),
     ({}, "- just\n- a list\n", r"data\.yaml: expected a mapping"),
     ({}, "train: [unclosed\n", r"data\.yaml: not valid YAML")],
)  # fmt: skip
def test_bad_data_yaml_files_are_config_errors(tmp_path: Path, keys, text, message) -> None:
    data_yaml = _dataset(tmp_path, text, **keys)
    with pytest.raises(ConfigError, match=message):
        _module(data_yaml)


def test_a_missing_data_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.data_yaml: cannot read .*nowhere\.yaml"):
        _module(tmp_path / "nowhere.yaml")


def test_the_yaml_is_read_safely(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    text = f"names: !!python/object/apply:os.system ['touch {marker}']\ntrain: a\nval: b\n"
    with pytest.raises(ConfigError, match="not valid YAML"):
        _module(_dataset(tmp_path, text))
    assert not marker.exists()


def test_settings_the_data_yaml_replaces_are_refused(tmp_path: Path) -> None:
    data_yaml = _dataset(tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.names, data\.val_images: data\.data_yaml="):
        _module(data_yaml, names=["a"], val_images="x")


def test_neither_data_yaml_nor_names_is_a_config_error() -> None:
    with pytest.raises(
        ConfigError, match=r"^data\.names: .* or .*data\.data_yaml=path/to/data\.yaml"
    ):
        YoloDataModule(root="/d")
    with pytest.raises(ConfigError, match=r"^data\.root: .*data\.data_yaml="):
        YoloDataModule(names=["a"])


def test_config_data_yaml_alone_composes_builds_and_counts_classes(tmp_path: Path) -> None:
    data_yaml = _dataset(tmp_path)
    cfg = compose_config("train", ["data=yolo", f"data.data_yaml={data_yaml}",
                                   f"paths.output_dir={tmp_path}"])  # fmt: skip
    check_required(cfg)  # nothing else must be given
    validate_config(cfg, ("data",))
    assert cfg.data.num_classes is None
    derive_num_classes(cfg)
    assert cfg.data.num_classes == 3 and cfg.model.net.num_classes == 3
    dm = instantiate(cfg.data)
    assert isinstance(dm, YoloDataModule) and dm.class_names == ["cat", "dog", "owl"]


def test_config_root_and_names_still_use_the_folder_layout(tmp_path: Path) -> None:
    _dataset(tmp_path)
    cfg = compose_config("train", ["data=yolo", f"data.root={tmp_path / 'ds'}",
                                   "data.names=[cat,dog,owl]", "data.num_workers=0"])  # fmt: skip
    check_required(cfg)
    derive_num_classes(cfg)
    assert cfg.data.num_classes == 3
    dm = instantiate(cfg.data)
    assert dm.paths["train"] == (
        str(tmp_path / "ds/images/train"),
        str(tmp_path / "ds/labels/train"),
    )
    dm.setup("validate")
    assert dm.annotations["val"].labels.tolist() == [0]
