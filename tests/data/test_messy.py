"""Real datasets are messy: each kind of mess has a defined, tested outcome."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from rtdetr_lit.config import validate_config
from rtdetr_lit.data import CocoDataModule, YoloDataModule
from tests.conftest import compose_config

from .conftest import make_datamodule, write_image


def _val_target(dm, index: int = 0) -> dict[str, torch.Tensor]:
    return dm.datasets["val"][index][1]


def _train_and_val(coco_writer, build) -> None:
    """Write the same images and boxes as a train and a val split."""
    for split in ("train", "val"):
        writer = coco_writer(split)
        build(writer)
        writer.write()


def test_category_ids_with_gaps_map_to_contiguous_labels_and_back(coco_writer, tmp_path) -> None:
    def build(w):
        i = w.add_image()
        w.add_box(i, [1, 1, 10, 10], category_id=8)
        w.add_box(i, [20, 5, 10, 10], category_id=3)

    _train_and_val(coco_writer, build)
    dm = make_datamodule(tmp_path)
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.category_ids == [3, 7, 8]
    assert dm.class_names == ["cat", "dog", "owl"]
    labels = _val_target(dm)["labels"].tolist()
    assert [dm.category_ids[label] for label in labels] == [8, 3]


def test_images_without_annotations_are_kept_as_negatives(coco_writer, tmp_path) -> None:
    def build(w):
        w.add_box(w.add_image(), [1, 1, 10, 10])
        w.add_image()

    _train_and_val(coco_writer, build)
    dm = make_datamodule(tmp_path)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 2
    image, target, _ = dm.datasets["train"][1]
    assert image.shape == (3, 64, 64) and target["boxes"].shape == (0, 4)
    assert target["labels"].dtype == torch.int64


def test_crowd_boxes_are_left_out_of_training_but_kept_for_evaluation(coco_writer, tmp_path):
    def build(w):
        i = w.add_image()
        w.add_box(i, [1, 1, 10, 10])
        w.add_box(i, [20, 10, 30, 30], iscrowd=1)

    _train_and_val(coco_writer, build)
    dm = make_datamodule(tmp_path, augment={"photometric_p": 0, "zoom_out_p": 0, "iou_crop_p": 0})
    dm.setup("fit")
    assert dm.datasets["train"][0][1]["iscrowd"].tolist() == [0]
    assert _val_target(dm)["iscrowd"].tolist() == [0, 1]


def test_boxes_partly_outside_the_image_are_clipped(coco_writer, tmp_path) -> None:
    def build(w):
        w.add_box(w.add_image(64, 48), [50, 40, 30, 30])

    _train_and_val(coco_writer, build)
    dm = make_datamodule(tmp_path)
    dm.setup("fit")
    cx, cy, bw, bh = _val_target(dm)["boxes"][0].tolist()
    assert (cx - bw / 2) * 64 == pytest.approx(50) and (cx + bw / 2) * 64 == pytest.approx(64)
    assert (cy - bh / 2) * 48 == pytest.approx(40) and (cy + bh / 2) * 48 == pytest.approx(48)


def test_degenerate_boxes_are_dropped_counted_and_warned_once(coco_writer, tmp_path, caplog):
    writer = coco_writer("train")
    i = writer.add_image(64, 48)
    writer.add_box(i, [5, 5, 10, 10])
    bad = [
        writer.add_box(i, [10, 10, 0, 5]),  # zero width
        writer.add_box(i, [10, 10, 5, -3]),  # negative height
        writer.add_box(i, [70, 10, 5, 5]),  # entirely outside: nothing left after clipping
    ]
    writer.write()
    dm = make_datamodule(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rtdetr_lit"):
        dm.setup("fit")
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1
    assert "dropped 3 boxes" in warnings[0] and str(bad) in warnings[0]
    assert len(dm.annotations["train"].boxes) == 1


def test_an_unknown_category_id_names_the_annotation(coco_writer, tmp_path) -> None:
    writer = coco_writer("train")
    i = writer.add_image()
    writer.add_box(i, [1, 1, 5, 5])
    bad = writer.add_box(i, [1, 1, 5, 5], category_id=99)
    writer.write()
    with pytest.raises(ValueError, match=f"annotation id {bad} has category_id 99"):
        make_datamodule(tmp_path).setup("fit")


# A value that is not a finite JSON number, in each position of [x, y, w, h].
BROKEN_BBOXES = {
    "nan": [float("nan"), 5, 10, 10],
    "inf": [5, 5, float("inf"), 10],
    "-inf": [5, float("-inf"), 10, 10],
    "string": [5, "10", 10, 10],
    "null": [5, 5, 10, None],
    "bool": [True, 5, 10, 10],
    "list": [5, 5, [10], 10],
}


def _coco_with_broken_boxes(coco_writer, kinds: list[str]) -> tuple[Path, list[int], list[int]]:
    """A train split with two good boxes and one broken box per kind; (json, good, broken ids)."""
    writer = coco_writer("train")
    i = writer.add_image(64, 48)
    good = [writer.add_box(i, [1, 1, 10, 10])]
    broken = []
    for kind in kinds:
        broken.append(writer.add_box(i, [1, 1, 1, 1]))
        writer.data["annotations"][-1]["bbox"] = BROKEN_BBOXES[kind]  # area stays numeric
    good.append(writer.add_box(writer.add_image(64, 48), [20, 10, 30, 30]))
    return writer.write(), good, broken


@pytest.mark.parametrize("kind", list(BROKEN_BBOXES))
def test_a_broken_coco_coordinate_is_an_error_at_setup_naming_file_and_id(
    coco_writer, tmp_path, kind
) -> None:
    path, _, broken = _coco_with_broken_boxes(coco_writer, [kind])
    with pytest.raises(ValueError) as err:
        make_datamodule(tmp_path).setup("fit")
    message = str(err.value)
    assert message.startswith(f"{path}: 1 annotations have non-finite or non-numeric bbox")
    assert f"annotation ids {broken}" in message
    assert "data.skip_bad_annotations=true" in message


def test_broken_coco_coordinates_are_all_named_first_ten_then_a_count(coco_writer, tmp_path):
    _, _, broken = _coco_with_broken_boxes(coco_writer, ["nan"] * 12)
    with pytest.raises(ValueError, match=r"12 annotations have non-finite") as err:
        make_datamodule(tmp_path).setup("fit")
    assert f"annotation ids {broken[:10]} ... and 2 more;" in str(err.value)


def test_broken_coco_coordinates_are_skipped_and_counted_once_when_asked(
    coco_writer, tmp_path, caplog
) -> None:
    path, good, broken = _coco_with_broken_boxes(coco_writer, ["nan", "inf", "string"])
    dm = make_datamodule(tmp_path, skip_bad_annotations=True)
    with caplog.at_level(logging.WARNING, logger="rtdetr_lit"):
        dm.setup("fit")
    ann = dm.annotations["train"]
    assert ann.annotation_ids.tolist() == good and np.isfinite(ann.boxes).all()
    assert np.diff(ann.box_offsets).tolist() == [1, 1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings  # and no "dropped ... zero or negative" one
    assert warnings[0].startswith(f"{path}: skipped 3 broken annotations")
    assert f"annotation ids {broken}" in warnings[0]


def test_skip_bad_annotations_composes_into_every_data_config() -> None:
    for option, extra in [
        ("coco", []),
        ("custom", ["data.root=/datasets/mine", "data.num_classes=3"]),
        ("synthetic", []),
        ("yolo", ["data.root=/datasets/mine", "data.names=[a,b]", "data.num_classes=2"]),
    ]:
        cfg = compose_config("train", [f"data={option}", *extra])
        assert cfg.data.skip_bad_annotations is False, option
        cfg = compose_config("train", [f"data={option}", "data.skip_bad_annotations=true", *extra])
        validate_config(cfg, ("data",))
        dm = instantiate(cfg.data)
        assert isinstance(dm, CocoDataModule) and dm.skip_bad_annotations is True, option


def test_class_count_must_match_the_config(coco_writer, tmp_path) -> None:
    writer = coco_writer("train")
    writer.add_image()
    writer.write()
    with pytest.raises(ValueError, match=r"has 3 categories but data.num_classes is 80"):
        make_datamodule(tmp_path, num_classes=80).setup("fit")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize("mess", ["missing", "truncated", "garbage"])
def test_bad_image_files_are_named_at_setup_or_skipped(coco_writer, tmp_path, caplog, mess):
    writer = coco_writer("train")
    for _ in range(3):
        writer.add_box(writer.add_image(), [1, 1, 10, 10])
    writer.write()
    victim = tmp_path / "train" / "0002.png"
    if mess == "missing":
        victim.unlink()
    elif mess == "truncated":
        _truncate(victim)
    else:
        victim.write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match=r"1 of 3 images cannot be used[\s\S]*0002\.png"):
        make_datamodule(tmp_path).setup("fit")

    dm = make_datamodule(tmp_path, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="rtdetr_lit"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 2
    assert "skipping 1 bad images" in caplog.text and "0002.png" in caplog.text
    files = {dm.annotations["train"].file_name(k) for k in range(2)}
    assert files == {"0001.png", "0003.png"}


def test_an_image_of_another_size_than_annotated_is_an_error(coco_writer, tmp_path) -> None:
    writer = coco_writer("train")
    write_image(writer.image_dir / "0001.png", 50, 50)
    writer.add_image(64, 48)
    writer.write()
    with pytest.raises(
        ValueError, match=r"0001\.png: the image is 50x50 but the annotations say 64x48"
    ):
        make_datamodule(tmp_path).setup("fit")


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    image.save(path, **kwargs)


RED_SQUARE = (8, 8, 24, 24)  # x0, y0, x1, y1 of a red patch on a grey 64x48 picture


def _red_square_picture() -> Image.Image:
    image = Image.new("RGB", (64, 48), (128, 128, 128))
    image.paste((255, 0, 0), RED_SQUARE)
    return image


@pytest.mark.parametrize("kind", ["grayscale", "rgba", "palette", "16bit", "cmyk"])
def test_any_image_kind_becomes_rgb(coco_writer, tmp_path, kind) -> None:
    writer = coco_writer("val")
    picture = _red_square_picture()
    name = "im.jpg" if kind == "cmyk" else "im.png"
    path = writer.image_dir / name
    if kind == "grayscale":
        _save(picture.convert("L"), path)
    elif kind == "rgba":
        _save(picture.convert("RGBA"), path)
    elif kind == "palette":
        _save(picture.convert("P"), path)
    elif kind == "16bit":
        gray = (np.asarray(picture.convert("L"), np.uint16) * 257).astype(np.uint16)
        _save(Image.fromarray(gray), path)  # mode I;16
    else:
        _save(picture.convert("CMYK"), path, quality=95)
    writer.add_box(writer.add_image(64, 48, name=name), [8, 8, 16, 16])
    writer.write()
    coco_writer("train").write()  # an empty training split
    dm = make_datamodule(tmp_path, image_size=(64, 64))
    dm.setup("validate")
    image = dm.datasets["val"][0][0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    inside = image[:, 16:28, 10:22].float().mean((1, 2))  # the square, resized 48 -> 64 rows
    outside = image[:, 50:60, 40:60].float().mean((1, 2))
    if kind in ("grayscale", "16bit"):
        assert torch.allclose(inside, inside[0].expand(3)) and inside[0] < outside[0]
        assert outside[0] == pytest.approx(128, abs=2)
    else:
        assert inside[0] > 200 and inside[1] < 60 and inside[2] < 60
        assert outside.sub(128).abs().max() < 10


@pytest.mark.parametrize("annotated_on", ["displayed", "stored"])
def test_exif_rotated_images_keep_their_boxes_right(coco_writer, tmp_path, annotated_on) -> None:
    displayed = _red_square_picture()  # 64 wide, 48 high, square at RED_SQUARE
    stored = displayed.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    writer = coco_writer("val")
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif)
    (writer.image_dir / "rot.jpg").write_bytes(buffer.getvalue())
    if annotated_on == "displayed":
        i = writer.add_image(64, 48, name="rot.jpg")
        writer.add_box(i, [8, 8, 16, 16])
    else:  # the annotator saw the stored (unrotated) pixels: 48 wide, 64 high
        i = writer.add_image(48, 64, name="rot.jpg")
        writer.add_box(i, [8, 40, 16, 16])
    writer.write()
    coco_writer("train").write()
    dm = make_datamodule(tmp_path, image_size=(96, 96))
    dm.setup("validate")
    image, target, _ = dm.datasets["val"][0]
    cx, cy, w, h = (target["boxes"][0] * 96).round().int().tolist()
    patch = image[:, cy - h // 4 : cy + h // 4, cx - w // 4 : cx + w // 4].float().mean((1, 2))
    assert patch[0] > 200 and patch[1] < 60 and patch[2] < 60, patch
    assert target["orig_size"].tolist() == ([64, 48] if annotated_on == "displayed" else [48, 64])


def test_global_batch_is_split_over_processes(coco_writer, tmp_path) -> None:
    writer = coco_writer("train")
    for _ in range(5):
        writer.add_box(writer.add_image(), [1, 1, 10, 10])
    writer.write()
    dm = make_datamodule(tmp_path, batch_size=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.batch_size == 2 and loader.drop_last and len(loader) == 2  # 5 images: 2 batches

    class _Trainer:  # what the data module reads of a Trainer
        world_size = 2

    dm = make_datamodule(tmp_path, batch_size=4)
    dm.trainer = _Trainer()
    dm.setup("fit")
    assert dm.train_dataloader().batch_size == 2
    dm = make_datamodule(tmp_path, batch_size=3)
    dm.trainer = _Trainer()
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"data.batch_size=3 is the global batch .* \(2\)"):
        dm.train_dataloader()


def _write_yolo(root: Path, lines: dict[str, str]) -> None:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for stem, text in lines.items():
        write_image(root / "images" / f"{stem}.jpg", 80, 40)
        if text is not None:
            (root / "labels" / f"{stem}.txt").write_text(text)


def _yolo_module(root: Path, **overrides) -> YoloDataModule:
    return YoloDataModule(
        names=["a", "b"],
        train_images=str(root / "images"),
        train_annotations=str(root / "labels"),
        num_classes=2,
        batch_size=1,
        num_workers=0,
        image_size=(64, 64),
        **overrides,
    )


def test_yolo_labels_become_pixel_boxes(tmp_path) -> None:
    _write_yolo(tmp_path, {"x": "1 0.5 0.5 0.25 0.5\n0 0.1 0.1 0.1 0.1\n", "empty": None})
    dm = _yolo_module(tmp_path)
    dm.setup("fit")
    ann = dm.annotations["train"]
    assert [ann.file_name(k) for k in range(2)] == ["empty.jpg", "x.jpg"]
    np.testing.assert_allclose(ann.boxes, [[30, 10, 50, 30], [4, 2, 12, 6]], atol=1e-4)
    assert (
        ann.labels.tolist() == [1, 0] and dm.category_ids == [0, 1] and dm.class_names == ["a", "b"]
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [("2 0.5 0.5 0.1 0.1", r"x\.txt:1: class 2 is not in names"),
     ("0 0.5 0.5\n", r"x\.txt:1: expected 'class cx cy w h'")],
)  # fmt: skip
def test_bad_yolo_lines_name_file_and_line(tmp_path, text, message) -> None:
    _write_yolo(tmp_path, {"x": text})
    with pytest.raises(ValueError, match=message):
        _yolo_module(tmp_path).setup("fit")


@pytest.mark.parametrize(
    "line",
    ["0 nan 0.5 0.1 0.1", "1 0.5 0.5 inf 0.1", "0 0.5 -inf 0.1 0.1", "0 0.5 0.5", "0 a 0.5 0.1 0.1",
     "0 0.5 0.5 0.1 0.1 0.1", "a 0.5 0.5 0.1 0.1"],
)  # fmt: skip
def test_a_broken_yolo_line_is_an_error_naming_file_and_line_or_skipped(
    tmp_path, caplog, line
) -> None:
    _write_yolo(tmp_path, {"x": f"1 0.5 0.5 0.25 0.5\n{line}\n0 0.1 0.1 0.1 0.1\n"})
    label_file = tmp_path / "labels" / "x.txt"
    with pytest.raises(ValueError) as err:
        _yolo_module(tmp_path).setup("fit")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'labels'}: 1 label lines are broken annotations")
    assert (
        f"{label_file}:2: expected 'class cx cy w h' with finite numbers, got {line!r}" in message
    )
    assert "data.skip_bad_annotations=true" in message

    dm = _yolo_module(tmp_path, skip_bad_annotations=True)
    with caplog.at_level(logging.WARNING, logger="rtdetr_lit"):
        dm.setup("fit")
    np.testing.assert_allclose(dm.annotations["train"].boxes, [[30, 10, 50, 30], [4, 2, 12, 6]])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "skipped 1 broken label lines" in warnings[0] and f"{label_file}:2:" in warnings[0]
