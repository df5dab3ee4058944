"""Overhead of the Python inference API: ``Detector.predict`` on a folder of images against the bare
model loop.

r18 (random weights, 80 classes) at 640x640, batch 8, on a folder of ``--images`` JPEG pictures of
640x480 written once. Two candidates, interleaved round by round:

* **bare**: decode every file (``read_image``), then ``InferenceModel(images, sizes)`` on batches
  of tensors resized and scaled beforehand (outside the timing): the floor any API pays;
* **Detector.predict**: ``rtdetr_lit.load``'s detector on the folder's glob: decoding, the
  validation resize, scaling, batching, the model, thresholding and ``Detections``.

Throughput ratio: bare / API time (target >= 0.95, i.e. at most 5% overhead).

    .venv/bin/python scripts/bench/predict.py [--images 64] [--repeats 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _bench import compare, load_average, medians, print_header, print_table, setup
from rtdetr_lit import create_model, load
from rtdetr_lit.checkpoints import save_weights_file
from rtdetr_lit.data.decode import read_image
from rtdetr_lit.inference import InferenceModel
from rtdetr_lit.models import RTDETRPostProcessor
from rtdetr_lit.record import RECORD_KEY, record_of

SIZE = 640
TARGET = 0.95  # bare / API throughput


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    setup()
    print_header("Python inference API: Detector.predict against the bare model loop")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(0)
        for i in range(args.images):
            pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
        files = sorted(folder.glob("*.jpg"))

        net = create_model("r18", num_classes=80, eval_spatial_size=(SIZE, SIZE))
        record = record_of(net, 300, None, None)
        weights = save_weights_file(
            folder / "model.safetensors", net.state_dict(), {RECORD_KEY: record.to_json()}
        )
        detector = load(weights, device="cpu")
        bare = InferenceModel(net, RTDETRPostProcessor(80, 300))
        # the bare loop's inputs, prepared once: resized by the same pipeline, scaled, batched
        prepared = [
            detector._prepare(b) for b in _chunks([read_image(f) for f in files], args.batch)
        ]
        batches = [
            (torch.from_numpy(images), torch.from_numpy(sizes)) for images, sizes in prepared
        ]

        def run_bare() -> None:
            for f in files:
                read_image(f)
            with torch.inference_mode():
                for images, sizes in batches:
                    bare(images, sizes)

        def run_api() -> None:
            found = detector.predict(str(folder / "*.jpg"), threshold=0.5, batch_size=args.batch)
            assert len(found) == len(files)

        samples = compare(
            {"bare": run_bare, "Detector.predict": run_api}, warmup=1, repeats=args.repeats
        )
    print(f"\n{args.images} images of 640x480, r18 at {SIZE}x{SIZE}, batch {args.batch}, CPU\n")
    print_table(samples, baseline="bare", unit="s")
    mid = medians(samples)
    ratio = mid["bare"] / mid["Detector.predict"]
    verdict = "met" if ratio >= TARGET else "MISSED"
    print(
        f"\nthroughput Detector.predict / bare = {ratio:.3f} (target >= {TARGET}: {verdict}); "
        f"API overhead {100 * (1 / ratio - 1):+.1f}%; "
        f"{args.images / mid['Detector.predict']:.2f} img/s"
    )
    print(load_average())


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


if __name__ == "__main__":
    main()
