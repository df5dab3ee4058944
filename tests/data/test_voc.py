"""``data=voc``: Pascal VOC image sets and XML files, and each kind of mess in them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from rtdetr_lit.config import ConfigError, check_required, validate_config
from rtdetr_lit.data import VOC_CLASSES, VocDataModule, load_voc
from rtdetr_lit.run import derive_num_classes
from tests.conftest import compose_config

from .conftest import write_image

CAT, DOG, PERSON = (VOC_CLASSES.index(n) for n in ("cat", "dog", "person"))


def _xml(
    image_id: str, objects: list[dict], size: tuple[int, int] | None = (80, 60), filename=True
) -> str:
    """A VOC annotation file; an object is ``{"name", "box": (xmin, ymin, xmax, ymax)}`` plus
    optional ``difficult``/``truncated`` (a ``box`` of None leaves the bndbox out)."""
    parts = ["<annotation>", "<folder>VOC</folder>"]
    if filename:
        parts.append(f"<filename>{image_id}.jpg</filename>")
    if size is not None:
        parts.append(
            f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        )
    for obj in objects:
        parts += ["<object>", f"<name>{obj['name']}</name>", "<pose>Unspecified</pose>"]
        parts.append(f"<truncated>{obj.get('truncated', 0)}</truncated>")
        parts.append(f"<difficult>{obj.get('difficult', 0)}</difficult>")
        if obj.get("box") is not None:
            values = "".join(
                f"<{k}>{v}</{k}>"
                for k, v in zip(("xmin", "ymin", "xmax", "ymax"), obj["box"], strict=True)
            )
            parts.append(f"<bndbox>{values}</bndbox>")
        parts.append("</object>")
    return "\n".join([*parts, "</annotation>"])


def _year(root: Path, folder: str, images: dict[str, list[dict]], sets: dict[str, list[str]],
          size: tuple[int, int] = (80, 60)) -> Path:  # fmt: skip
    """A VOC year folder: every image ``size`` with its XML, and ``ImageSets/Main/<set>.txt``."""
    year = root / folder
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (year / sub).mkdir(parents=True, exist_ok=True)
    for k, (image_id, objects) in enumerate(images.items()):
        write_image(year / "JPEGImages" / f"{image_id}.jpg", *size, seed=k)
        (year / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, objects, size))
    for name, ids in sets.items():
        (year / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return year


def _devkit(root: Path) -> Path:
    """VOCdevkit with VOC2007 (trainval 2 images, test 1) and VOC2012 (trainval 1)."""
    _year(root, "VOC2007", {
        "000001": [{"name": "cat", "box": (1, 1, 40, 30)},
                   {"name": "dog", "box": (41, 11, 80, 60), "difficult": 1, "truncated": 1}],
        "000002": [],
        "000003": [{"name": "person", "box": (11, 21, 30, 40)}],
    }, {"trainval": ["000001", "000002"], "test": ["000003"]})  # fmt: skip
    _year(root, "VOC2012", {"2012_000001": [{"name": "dog", "box": (5, 5, 20, 20)}]},
          {"trainval": ["2012_000001"]})  # fmt: skip
    return root


def _module(root: Path, **overrides) -> VocDataModule:
    kwargs = {"batch_size": 2, "val_batch_size": 2, "num_workers": 0, "pin_memory": False,
              "image_size": (64, 64)}  # fmt: skip
    kwargs.update(overrides)
    return VocDataModule(str(root), **kwargs)


def test_voc_boxes_labels_sizes_and_difficult(tmp_path: Path) -> None:
    _devkit(tmp_path)
    ann = load_voc(tmp_path, ["VOC2007/trainval"], VOC_CLASSES)
    assert [ann.file_name(i) for i in range(2)] == [
        "VOC2007/JPEGImages/000001.jpg",
        "VOC2007/JPEGImages/000002.jpg",
    ]
    assert ann.widths.tolist() == [80, 80] and ann.heights.tolist() == [60, 60]
    # 1-based inclusive pixel indices: xmin..xmax covers the edges xmin - 1 .. xmax
    np.testing.assert_allclose(ann.boxes, [[0, 0, 40, 30], [40, 10, 80, 60]])
    np.testing.assert_allclose(ann.areas, [1200, 2000])
    assert ann.labels.tolist() == [CAT, DOG] and ann.iscrowd.tolist() == [0, 1]
    assert np.diff(ann.box_offsets).tolist() == [2, 0]
    assert ann.class_names == VOC_CLASSES and ann.category_ids == tuple(range(20))


def test_07_plus_12_trains_on_both_years_and_validates_on_07_test(tmp_path: Path) -> None:
    dm = _module(_devkit(tmp_path), augment={"photometric_p": 0, "zoom_out_p": 0, "iou_crop_p": 0})
    assert dm.count_classes() == 20 and dm.class_names == list(VOC_CLASSES)
    dm.setup("fit")
    train = dm.annotations["train"]
    assert [train.file_name(i) for i in range(3)] == [
        "VOC2007/JPEGImages/000001.jpg",
        "VOC2007/JPEGImages/000002.jpg",
        "VOC2012/JPEGImages/2012_000001.jpg",
    ]
    # difficult objects are left out of training, kept (as crowd) for evaluation
    assert dm.datasets["train"][0][1]["labels"].tolist() == [CAT]
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (1, 3, 64, 64) and targets[0]["labels"].tolist() == [PERSON]
    np.testing.assert_allclose(
        targets[0]["boxes"][0].tolist(), [20 / 80, 30 / 60, 20 / 80, 20 / 60], atol=1e-5
    )
    # no test sets: the test split is the validation split
    dm.setup("test")
    assert dm.annotations["test"].file_name(0) == "VOC2007/JPEGImages/000003.jpg"


def test_a_root_with_its_own_image_sets(tmp_path: Path) -> None:
    _year(tmp_path, "", {"a": [{"name": "cat", "box": (1, 1, 10, 10)}], "b": []},
          {"train": ["a"], "val": ["b"]})  # fmt: skip
    dm = _module(tmp_path, train_sets="train", val_sets=["val"])
    dm.setup("fit")
    assert dm.annotations["train"].file_name(0) == "JPEGImages/a.jpg"
    assert len(dm.datasets["val"]) == 1


def test_names_null_are_collected_from_every_set_sorted(tmp_path: Path) -> None:
    dm = _module(_devkit(tmp_path), names=None)
    assert dm.class_names is None  # not read before it is needed
    assert dm.count_classes() == 3 and dm.class_names == ["cat", "dog", "person"]
    dm.setup("fit")
    assert dm.annotations["train"].labels.tolist() == [0, 1, 1]
    assert dm.annotations["val"].labels.tolist() == [2]  # the same names for every split


def test_an_unknown_class_names_the_xml_file_or_is_skipped(tmp_path: Path, caplog) -> None:
    _year(tmp_path, "VOC2007", {"x": [{"name": "cat", "box": (1, 1, 10, 10)},
                                      {"name": "unicorn", "box": (1, 1, 5, 5)}]},
          {"trainval": ["x"]})  # fmt: skip
    xml = tmp_path / "VOC2007" / "Annotations" / "x.xml"
    with pytest.raises(ValueError) as err:
        load_voc(tmp_path, ["VOC2007/trainval"], VOC_CLASSES)
    assert "1 objects are broken annotations" in str(err.value)
    assert f"{xml}: object 2: class 'unicorn' is not in data.names" in str(err.value)
    assert "data.skip_bad_annotations=true" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="rtdetr_lit"):
        ann = load_voc(tmp_path, ["VOC2007/trainval"], VOC_CLASSES, skip_bad_annotations=True)
    assert ann.labels.tolist() == [CAT]
    assert "skipped 1 broken objects" in caplog.text and "'unicorn'" in caplog.text


@pytest.mark.parametrize(
    "box", [None, ("1", "2", "abc", "9"), (1, 2, "nan", 9), (1, 2, "", 9)], ids=str
)
def test_a_bndbox_without_four_finite_numbers_is_broken(tmp_path: Path, box) -> None:
    _year(tmp_path, "VOC2007", {"x": [{"name": "cat", "box": box},
                                      {"name": "dog", "box": (3, 3, 9, 9)}]},
          {"trainval": ["x"]})  # fmt: skip
    with pytest.raises(ValueError, match=r"x\.xml: object 1 \(cat\): no finite xmin, ymin, xmax"):
        load_voc(tmp_path, ["VOC2007/trainval"], VOC_CLASSES)
    ann = load_voc(tmp_path, ["VOC2007/trainval"], VOC_CLASSES, skip_bad_annotations=True)
    np.testing.assert_allclose(ann.boxes, [[2, 2, 9, 9]])


@pytest.mark.parametrize("mess", ["missing", "invalid"])
def test_a_missing_or_invalid_xml_names_the_file_or_leaves_the_image_out(
    tmp_path: Path, caplog, mess: str
) -> None:
    _devkit(tmp_path)
    xml = tmp_path / "VOC2007" / "Annotations" / "000002.xml"
    if mess == "missing":
        xml.unlink()
    else:
        xml.write_text("<annotation><object></annotation>")
    reason = "no such file" if mess == "missing" else "not valid XML"
    with pytest.raises(
        ValueError, match=rf"1 annotation files are broken[\s\S]*000002\.xml: {reason}"
    ):
        _module(tmp_path).setup("fit")
    dm = _module(tmp_path, skip_bad_annotations=True)
    with caplog.at_level(logging.WARNING, logger="rtdetr_lit"):
        dm.setup("fit")
    train = dm.annotations["train"]
    assert [train.file_name(i) for i in range(len(train))] == [
        "VOC2007/JPEGImages/000001.jpg",
        "VOC2012/JPEGImages/2012_000001.jpg",
    ]
    assert "skipped 1 broken annotation files" in caplog.text


def test_a_missing_image_is_a_bad_image(tmp_path: Path, caplog) -> None:
    _devkit(tmp_path)
    (tmp_path / "VOC2007" / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(
        ValueError, match=r"1 of 3 images cannot be used[\s\S]*000002\.jpg: file not"
    ):
        _module(tmp_path).setup("fit")
    dm = _module(tmp_path, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="rtdetr_lit"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 2 and "skipping 1 bad images" in caplog.text


def test_a_missing_image_set_names_the_setting(tmp_path: Path) -> None:
    _devkit(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        _module(tmp_path, val_sets=["VOC2012/val"]).setup("validate")
    missing = tmp_path / "VOC2012" / "ImageSets" / "Main" / "val.txt"
    assert str(err.value) == f"data.val_sets: image set 'VOC2012/val': no such file {missing}"
    with pytest.raises(FileNotFoundError, match=r"^data\.root: no such folder"):
        _module(tmp_path / "nowhere").setup("fit")


def test_boxes_outside_the_image_are_clipped_and_degenerate_ones_dropped(
    tmp_path: Path, caplog
) -> None:
    _year(tmp_path, "VOC2007", {"x": [
        {"name": "cat", "box": (61, 41, 100, 90)},  # partly outside the 80x60 image
        {"name": "dog", "box": (30, 30, 20, 40)},  # xmax < xmin
        {"name": "dog", "box": (90, 10, 95, 20)},  # wholly outside
    ]}, {"trainval": ["x"]})  # fmt: skip
    dm = _module(tmp_path, train_sets=["VOC2007/trainval"], val_sets=None)
    with caplog.at_level(logging.WARNING, logger="rtdetr_lit"):
        dm.setup("fit")
    np.testing.assert_allclose(dm.annotations["train"].boxes, [[60, 40, 80, 60]])
    assert "dropped 2 boxes with zero or negative width/height" in caplog.text


def test_the_size_is_probed_when_the_xml_has_none_and_checked_when_it_has(tmp_path: Path) -> None:
    year = _year(tmp_path, "VOC2007", {"x": [{"name": "cat", "box": (1, 1, 10, 10)}]},
                 {"trainval": ["x"]}, size=(72, 48))  # fmt: skip
    xml = year / "Annotations" / "x.xml"
    xml.write_text(_xml("x", [{"name": "cat", "box": (1, 1, 100, 10)}], size=None, filename=False))
    dm = _module(tmp_path, train_sets=["VOC2007/trainval"], val_sets=None)
    dm.setup("fit")
    train = dm.annotations["train"]
    assert (train.widths.tolist(), train.heights.tolist()) == ([72], [48])
    np.testing.assert_allclose(train.boxes, [[0, 0, 72, 10]])  # clipped to the probed size
    xml.write_text(_xml("x", [], size=(80, 60)))
    with pytest.raises(
        ValueError, match=r"x\.jpg: the image is 72x48 but the annotations say 80x60"
    ):
        _module(tmp_path, train_sets=["VOC2007/trainval"], val_sets=None).setup("fit")


def test_per_split_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.train_images: data=voc reads the images of"):
        _module(tmp_path, train_images="x")
    with pytest.raises(ConfigError, match=r"^data\.names: the class names list is empty"):
        _module(tmp_path, names=[])


def test_config_data_voc_composes_and_builds(tmp_path: Path) -> None:
    _devkit(tmp_path)
    cfg = compose_config("train", ["data=voc", f"data.root={tmp_path}", "data.num_workers=0",
                                   f"paths.output_dir={tmp_path}"])  # fmt: skip
    check_required(cfg)
    validate_config(cfg, ("data",))
    assert list(cfg.data.train_sets) == ["VOC2007/trainval", "VOC2012/trainval"]
    assert list(cfg.data.val_sets) == ["VOC2007/test"] and tuple(cfg.data.names) == VOC_CLASSES
    derive_num_classes(cfg)
    assert cfg.data.num_classes == 20 and cfg.model.net.num_classes == 20
    dm = instantiate(cfg.data)
    assert isinstance(dm, VocDataModule)
    dm.setup("validate")
    assert dm.annotations["val"].labels.tolist() == [PERSON]
    # names: null counts the classes in the XML files
    cfg = compose_config("train", ["data=voc", f"data.root={tmp_path}", "data.names=null"])
    derive_num_classes(cfg)
    assert cfg.data.num_classes == 3
    # the default root is the VOCdevkit folder under paths.data_dir
    cfg = compose_config("train", ["data=voc", f"paths.data_dir={tmp_path}"])
    assert cfg.data.root == f"{tmp_path}/VOCdevkit"
