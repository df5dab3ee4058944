"""``rtdetr_lit.predict``: folders, globs and videos; COCO results against a direct forward pass;
the score threshold on pictures and JSON; the ONNX backend against the torch one; errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from rtdetr_lit.config import ConfigError
from rtdetr_lit.predict import predict
from rtdetr_lit.visualize import _PALETTE
from tests.test_export import (
    CATEGORY_IDS,
    IMAGE,
    demo_net,
    entry_config,
    inference_model,
    save_lightning_checkpoint,
)

pytest.importorskip("onnxruntime")

SEED = 4
# (height, width) of the test pictures, named like COCO's (the number is the image id)
PICTURES = {
    "000000000042.png": (100, 150),
    "000000000007.png": (130, 200),
    "000000000913.png": (160, 96),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A Lightning checkpoint of the perturbed demo model with class names cat/dog (ids 3, 7)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = entry_config("predict", tmp, ["ckpt_path=x", "source=x"])
    return save_lightning_checkpoint(tmp / "run.ckpt", cfg, demo_net(seed=SEED))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    for name, (h, w) in PICTURES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


def expected_detections(paths: list[Path]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """labels, boxes, scores of the checkpoint's model on each picture, computed directly."""
    model = inference_model(demo_net(seed=SEED))
    out = []
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        # the validation pipeline's resize: area averaging when either side shrinks, else bilinear
        interpolation = cv2.INTER_AREA if max(image.shape[:2]) > IMAGE else cv2.INTER_LINEAR
        resized = cv2.resize(image, (IMAGE, IMAGE), interpolation=interpolation)
        x = torch.from_numpy(resized).permute(2, 0, 1)[None].float() / 255
        size = torch.tensor([[image.shape[1], image.shape[0]]])
        with torch.no_grad():
            labels, boxes, scores = model(x, size)
        out.append((labels[0].numpy(), boxes[0].numpy(), scores[0].numpy()))
    return out


def run(tmp_path: Path, checkpoint: Path, source: str | Path, *overrides: str) -> dict:
    cfg = entry_config(
        "predict", tmp_path, [f"ckpt_path={checkpoint}", f"source={source}", *overrides]
    )
    return predict(cfg)


def results(summary: dict) -> list[dict]:
    return json.loads(Path(summary["results"]).read_text())


def test_folder_threshold_results_and_pictures(tmp_path, checkpoint, pictures):
    """With the threshold at the best score of all pictures exactly one detection survives: the
    JSON holds it (COCO fields, id from the file name, category id from the checkpoint), its
    picture shows its box in its class colour and nothing else, the other pictures are unchanged."""
    paths = sorted(pictures.iterdir())
    expected = expected_detections(paths)
    best = int(np.argmax([e[2][0] for e in expected]))
    labels, boxes, scores = expected[best]
    assert scores[0] > scores[1]
    summary = run(tmp_path, checkpoint, pictures, f"threshold={float(scores[0]) - 1e-6}")
    out = Path(summary["results"]).parent
    assert summary["pictures"] == 3
    [entry] = results(summary)
    x1, y1, x2, y2 = boxes[0].tolist()
    assert entry["image_id"] == int(paths[best].stem)
    assert entry["file_name"] == paths[best].name
    assert entry["category_id"] == CATEGORY_IDS[labels[0]]
    assert entry["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)
    assert entry["score"] == pytest.approx(float(scores[0]), abs=1e-5)
    for i, path in enumerate(paths):
        original = np.asarray(Image.open(path))
        drawn = np.asarray(Image.open(out / path.name))
        assert drawn.shape == original.shape
        changed = (drawn != original).any(-1)
        if i != best:
            assert not changed.any()
            continue
        # the drawing starts at the box's top-left corner and its outline reaches the right and
        # bottom edges (the part inside the picture); the caption may stick out of a small box
        ys, xs = np.nonzero(changed)
        h, w = original.shape[:2]
        assert abs(xs.min() - max(x1, 0)) <= 1 and abs(ys.min() - max(y1, 0)) <= 1
        assert xs.max() >= min(x2, w - 1) - 1 and ys.max() >= min(y2, h - 1) - 1
        colours = {tuple(c) for c in drawn[changed].tolist()}
        assert _PALETTE[int(labels[0])] in colours


def test_glob_with_subfolders_and_names(tmp_path, checkpoint, pictures):
    src = tmp_path / "src"
    for sub, name in (("a", "dog.png"), ("b/c", "cat.png")):
        (src / sub).mkdir(parents=True)
        (src / sub / name).write_bytes((pictures / "000000000007.png").read_bytes())
    (src / "a" / "notes.txt").write_text("not a picture")
    summary = run(tmp_path, checkpoint, f"{src}/**/*.*", "threshold=0")
    out = Path(summary["results"]).parent
    assert summary["pictures"] == 2
    assert (out / "a" / "dog.png").is_file() and (out / "b" / "c" / "cat.png").is_file()
    entries = results(summary)
    # names are not numbers: pictures are numbered in sorted order; threshold 0 keeps all 200
    assert {(e["file_name"], e["image_id"]) for e in entries} == {
        ("a/dog.png", 0),
        ("b/c/cat.png", 1),
    }
    assert len(entries) == 2 * 200


def test_video_to_video(tmp_path, checkpoint):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"mp4v"), 12.0, (96, 64))
    rng = np.random.default_rng(1)
    for _ in range(6):
        writer.write(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    writer.release()
    # 6 frames in batches of 4: a full batch and a partial one
    summary = run(tmp_path, checkpoint, video, "threshold=0.02", "batch_size=4")
    [annotated] = summary["outputs"]
    capture = cv2.VideoCapture(str(annotated))
    assert annotated.suffix == ".mp4"
    assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == 6 and capture.get(cv2.CAP_PROP_FPS) == 12
    assert (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (
        96,
        64,
    )
    capture.release()
    entries = results(summary)
    assert summary["pictures"] == 6 and entries
    assert {e["frame"] for e in entries} <= set(range(6))
    assert all(e["image_id"] == e["frame"] and e["file_name"] == "clip.mp4" for e in entries)
    assert all(e["score"] >= 0.02 for e in entries)


def test_onnx_backend_matches_torch(tmp_path, checkpoint, pictures):
    """backend=onnx exports the checkpoint and finds what the torch model finds; the exported
    graph then runs on its own (category ids from its metadata)."""
    paths = sorted(pictures.iterdir())
    expected = expected_detections(paths)
    scores = np.sort(np.concatenate([e[2] for e in expected]))[::-1]
    gaps = scores[:-1] - scores[1:]
    k = 20 + int(np.argmax(gaps[20:60]))  # a threshold far from any score: no backend can differ
    threshold = float(scores[k] + scores[k + 1]) / 2
    want = []
    for path, (labels, boxes, scores) in zip(paths, expected, strict=True):
        keep = scores >= threshold
        for label, (x1, y1, x2, y2), score in zip(
            labels[keep], boxes[keep], scores[keep], strict=True
        ):
            want.append((int(path.stem), CATEGORY_IDS[label], [x1, y1, x2 - x1, y2 - y1], score))
    assert len(want) == k + 1
    summary = run(tmp_path / "onnx", checkpoint, pictures, f"threshold={threshold}", "backend=onnx")
    graph = Path(summary["results"]).parent / "model.onnx"
    standalone = run(tmp_path / "graph", graph, pictures, f"threshold={threshold}", "backend=onnx")
    for entries in (results(summary), results(standalone)):
        assert len(entries) == len(want)
        # pair each entry with an expected detection (near-tied scores may come in either order)
        unpaired = list(want)
        for e in entries:
            match = next(
                w
                for w in unpaired
                if w[:2] == (e["image_id"], e["category_id"])
                and abs(w[3] - e["score"]) <= 2e-5
                and np.abs(np.subtract(w[2], e["bbox"])).max() <= 0.02
            )
            unpaired.remove(match)


def test_errors_name_the_setting(tmp_path, checkpoint, pictures):
    with pytest.raises(ConfigError, match="source: no such file"):
        run(tmp_path, checkpoint, tmp_path / "missing")
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(ConfigError, match="neither an image"):
        run(tmp_path, checkpoint, text)
    with pytest.raises(ConfigError, match="no images or videos"):
        run(tmp_path, checkpoint, f"{tmp_path}/*.txt")
    with pytest.raises(ConfigError, match="backend"):
        run(tmp_path, checkpoint, pictures, "backend=tensorrt")
    with pytest.raises(ConfigError, match="threshold"):
        run(tmp_path, checkpoint, pictures, "threshold=1.5")
    with pytest.raises(ConfigError, match="would overwrite"):
        run(tmp_path, checkpoint, pictures, f"output={pictures}")
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"")
    with pytest.raises(ConfigError, match="use backend=onnx"):
        run(tmp_path, graph, pictures)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^device: cuda is not available here"):
            run(tmp_path, checkpoint, pictures, "device=cuda")
    with pytest.raises(ConfigError, match=r"^precision: 'half' is not one of"):
        run(tmp_path, checkpoint, pictures, "precision=half")
    with pytest.raises(ConfigError, match=r"^precision: an ONNX graph runs in the precision"):
        run(tmp_path, checkpoint, pictures, "backend=onnx", "precision=bf16")
