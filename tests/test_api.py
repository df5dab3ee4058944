"""``rtdetr_lit.load(...).predict(...)``: every input type, the same results as the CLI and ONNX,
files without a record, device and precision, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rtdetr_lit
from rtdetr_lit.data.decode import read_image
from rtdetr_lit.export import export
from rtdetr_lit.predict import predict
from tests.test_export import demo_net, entry_config, save_lightning_checkpoint

SEED = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning checkpoint of the perturbed demo model (128 px, classes cat/dog, ids 3 and 7)."""
    tmp = tmp_path_factory.mktemp("api")
    cfg = entry_config("predict", tmp, ["ckpt_path=x", "source=x"])
    return save_lightning_checkpoint(tmp / "run.ckpt", cfg, demo_net(seed=SEED))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("api_pictures")
    rng = np.random.default_rng(1)
    for name, (h, w) in {"1.png": (100, 150), "2.png": (160, 96), "3.png": (128, 128)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _same(a: rtdetr_lit.Detections, b: rtdetr_lit.Detections, atol: float = 0.0) -> None:
    assert a.image_size == b.image_size and a.class_names == b.class_names
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.scores, b.scores, atol=atol, rtol=0)
    np.testing.assert_allclose(a.xyxy, b.xyxy, atol=atol * 1000, rtol=0)


def test_every_input_type_gives_the_same_detections(checkpoint: Path, pictures: Path) -> None:
    detector = rtdetr_lit.load(checkpoint, device="cpu")
    path = pictures / "1.png"
    (want,) = detector.predict(str(path), threshold=0.0)  # an untrained model: low scores
    assert len(want) == 200 and want.image_size == (100, 150)  # 100 queries x 2 classes
    array = read_image(path)
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    for given in (path, [path], array, Image.open(path), tensor, tensor.float() / 255):
        (got,) = detector.predict(given, threshold=0.0)
        _same(got, want)
    # a glob, a folder's files in order, a mixed list
    every = detector.predict(str(pictures / "*.png"), threshold=0.0, batch_size=2)
    assert [d.image_size for d in every] == [(100, 150), (160, 96), (128, 128)]
    _same(every[0], want, atol=1e-6)  # batched with another image: float noise only
    mixed = detector.predict([array, str(pictures / "2.png")], threshold=0.0)
    _same(mixed[0], want, atol=1e-6)
    _same(mixed[1], every[1], atol=1e-6)
    # results are plain data
    found = json.loads(json.dumps(want.to_dict()))
    assert found["class_names"] == list(want.class_names)
    assert set(found["class_names"]) <= {"cat", "dog"} and set(found["category_ids"]) <= {3, 7}
    assert found["boxes"][0] == pytest.approx(want.xyxy[0].tolist())


def test_the_api_the_cli_and_onnx_agree(checkpoint: Path, pictures: Path, tmp_path: Path) -> None:
    detector = rtdetr_lit.load(checkpoint)
    files = sorted(pictures.glob("*.png"))
    every = np.concatenate([d.scores for d in detector.predict(files, threshold=0.0)])
    threshold = float(f"{np.quantile(every, 0.9):.5f}")  # keeps a tenth of an untrained model's
    # one image per batch, as the command runs by default: the same arithmetic, the same numbers
    found = detector.predict(files, threshold=threshold, batch_size=1)
    overrides = [f"ckpt_path={checkpoint}", f"source={pictures}", f"threshold={threshold}"]
    cfg = entry_config("predict", tmp_path / "cli", overrides)
    entries = json.loads(Path(predict(cfg)["results"]).read_text())
    api = [
        (i, int(c), [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)], round(float(s), 5))
        for i, d in enumerate(found)
        for (x1, y1, x2, y2), s, c in zip(d.xyxy.tolist(), d.scores, d.category_ids, strict=True)
    ]
    cli = [(e["image_id"] - 1, e["category_id"], e["bbox"], e["score"]) for e in entries]
    assert cli == api and len(cli) > 0  # pictures 1..3 are numbered: image_id is the number
    # the exported graph, loaded the same way, within 1e-4
    graph = export(entry_config("export", tmp_path / "export", [f"ckpt_path={checkpoint}"]))
    onnx_found = rtdetr_lit.load(graph).predict(files, threshold=threshold)
    for a, b in zip(onnx_found, found, strict=True):
        _same(a, b, atol=1e-4)


def test_files_without_a_record_name_their_model(checkpoint: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference.pth"
    torch.save({"ema": {"module": demo_net(seed=SEED).state_dict()}}, reference)
    with pytest.raises(
        ValueError, match=r"give its size, e\.g\. rtdetr_lit\.load\(path, model='r50'\)"
    ):
        rtdetr_lit.load(reference)
    with pytest.raises(ValueError, match="holds a demo detector, not model=r18"):
        rtdetr_lit.load(checkpoint, model="r18")
    detector = rtdetr_lit.load(reference, model="demo", image_size=(128, 128))
    assert detector.classes.names == ("class 0", "class 1")
    image = np.random.default_rng(2).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    (want,) = rtdetr_lit.load(checkpoint).predict(image, threshold=0.0)
    (got,) = detector.predict(image, threshold=0.0)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)


def test_device_precision_and_bad_inputs(checkpoint: Path) -> None:
    detector = rtdetr_lit.load(checkpoint, device="cpu")
    assert detector.device == torch.device("cpu") and detector.to("cpu") is detector
    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    (full,) = detector.predict(image, threshold=0.0)
    detector.precision = "bf16"
    (low,) = detector.predict(image, threshold=0.0)
    assert len(low) == len(full) and np.abs(low.scores - full.scores).max() < 0.05
    with pytest.raises(
        ValueError, match=r"precision: 'fp8' is not one of \['fp32', 'bf16', 'fp16'\]"
    ):
        detector.precision = "fp8"
    with pytest.raises(ValueError, match=r"HWC uint8 RGB, got shape \(64, 64, 3\) float32"):
        detector.predict(image.astype(np.float32))
    with pytest.raises(TypeError, match="cannot read an image from int"):
        detector.predict(3)
    with pytest.raises(FileNotFoundError, match=r"no such image file nowhere\.png"):
        detector.predict("nowhere.png")
    with pytest.raises(ValueError, match=r"threshold: 1\.5 is not in \[0, 1\]"):
        detector.predict(image, threshold=1.5)
