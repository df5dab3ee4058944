"""COCO evaluation time with torchmetrics' faster_coco_eval backend against pycocotools.

The timed step is what the module does at the end of a validation: ``MeanAveragePrecision``
built as ``rtdetr_lit.module._coco_map`` builds it (xyxy boxes, per-class AP), ``update`` with
every image's detections and ground truth (crowd flags and areas included), then ``compute``.
The inputs are generated once, outside the timing; both backends get the same ones and must
report the same numbers (checked). Two sizes:

* **synthetic val**: the demo's validation set (``conf/data/synthetic.yaml``): 100 images, 6
  classes, 0 to 8 objects per image (1 in 10 images empty);
* **COCO-size**: 5000 images (val2017), 80 classes, 1 to 13 objects per image (mean 7).

Each image has ``--detections`` detections (default 300: the post-processor's ``num_top_queries``,
all of which the module passes on; COCO's protocol then keeps the 100 best): jittered copies of
the objects and random boxes, with random scores. Ratio: faster_coco_eval time over
pycocotools time in the same round (target at most 0.4). About 30 minutes on the 2-core machine,
nearly all of it pycocotools on the COCO-size case.

    .venv/bin/python scripts/bench/evaluation.py [--detections 300] [--repeats 5] [--coco-repeats 1]
"""

from __future__ import annotations

import argparse

import torch
from torchmetrics.detection import MeanAveragePrecision

from _bench import compare, load_average, print_header, print_table, setup

TARGET = 0.4  # faster_coco_eval / pycocotools time
Images = list[dict[str, torch.Tensor]]


def fake_evaluation(
    num_images: int,
    num_classes: int,
    max_objects: int,
    empty_fraction: float,
    detections: int,
    side: float = 640.0,
    seed: int = 0,
) -> tuple[Images, Images]:
    """Detections and ground truth in the module's layout (float32 xyxy pixel boxes, labels,
    ``iscrowd`` 1 in 20, ``area`` below the box's). Objects are 8 to 300 px a side; half the
    detections are jittered copies of objects (7 in 10 of the object's class), the other half
    random boxes of random classes."""
    gen = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(num_images):
        empty = float(torch.rand(1, generator=gen)) < empty_fraction
        n = 0 if empty else int(torch.randint(1, max_objects + 1, (1,), generator=gen))
        boxes = _random_boxes(gen, n, side)
        box_area = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
        area = box_area * (0.5 + 0.5 * torch.rand(n, generator=gen))
        targets.append({
            "boxes": boxes,
            "labels": torch.randint(0, num_classes, (n,), generator=gen),
            "iscrowd": (torch.rand(n, generator=gen) < 0.05).long(),
            "area": area,
        })  # fmt: skip
        copies = detections // 2 if n else 0
        source = torch.randint(0, max(n, 1), (copies,), generator=gen)
        wh = (boxes[source, 2:] - boxes[source, :2]).repeat(1, 2)
        jittered = boxes[source] + 0.2 * wh * (torch.rand(copies, 4, generator=gen) - 0.5)
        jittered = torch.cat([jittered[:, :2], jittered[:, 2:].maximum(jittered[:, :2] + 1)], 1)
        labels = torch.randint(0, num_classes, (detections,), generator=gen)
        # Most copies carry their object's class.
        right = torch.rand(copies, generator=gen) < 0.7
        labels[:copies][right] = targets[-1]["labels"][source][right]
        det_boxes = torch.cat([jittered, _random_boxes(gen, detections - copies, side)])
        preds.append({
            "boxes": det_boxes.clamp(0, side),
            "scores": torch.rand(detections, generator=gen),
            "labels": labels,
        })  # fmt: skip
    return preds, targets


def _random_boxes(gen: torch.Generator, n: int, side: float) -> torch.Tensor:
    wh = 8 + 292 * torch.rand(n, 2, generator=gen) ** 2  # more small boxes than large ones
    xy = (side - wh) * torch.rand(n, 2, generator=gen)
    return torch.cat([xy, xy + wh], dim=1)


def evaluate(
    backend: str, preds: Images, targets: Images, class_metrics: bool = True
) -> dict[str, torch.Tensor]:
    """The module's evaluation step (``_coco_map`` with ``backend``): update, then compute."""
    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", class_metrics=class_metrics, backend=backend
    )
    metric.warn_on_many_detections = False
    metric.update(preds, targets)
    return metric.compute()


def bench_case(title: str, preds: Images, targets: Images, warmup: int, repeats: int) -> float:
    objects = sum(len(t["boxes"]) for t in targets)
    print(
        f"\n## {title}: {len(targets)} images, {objects} objects, "
        f"{sum(len(p['boxes']) for p in preds)} detections"
    )
    results: dict[str, dict[str, torch.Tensor]] = {}

    def run(backend: str, class_metrics: bool = True) -> None:
        if class_metrics:
            results[backend] = evaluate(backend, preds, targets)
        else:
            evaluate(backend, preds, targets, class_metrics=False)

    samples = compare(
        {
            "pycocotools": lambda: run("pycocotools"),
            "faster_coco_eval": lambda: run("faster_coco_eval"),
            # Not the module's set-up: shows how much of the time the per-class AP loop takes.
            "faster_coco_eval, no per-class AP": lambda: run("faster_coco_eval", False),
        },
        warmup,
        repeats,
    )
    reference, ours = results["pycocotools"], results["faster_coco_eval"]
    for key, value in reference.items():
        if not torch.allclose(ours[key].double(), value.double(), rtol=0, atol=1e-6):
            raise AssertionError(f"the backends disagree on {key}: {ours[key]} != {value}")
    print(f"every number of both backends agrees (mAP {float(reference['map']):.4f})")
    print(f"warm-up {warmup}, {repeats} interleaved rounds")
    ratio = print_table(samples, baseline="pycocotools", unit="s")["faster_coco_eval"]
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"faster_coco_eval / pycocotools = {ratio:.2f} (target <= {TARGET}: {verdict})")
    return ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detections", type=int, default=300, help="per image")
    parser.add_argument("--repeats", type=int, default=5, help="rounds, synthetic val")
    parser.add_argument("--coco-repeats", type=int, default=1, help="rounds, COCO-size")
    args = parser.parse_args(argv)

    setup()
    print_header("COCO evaluation backend")
    print(f"{args.detections} detections per image")
    demo = fake_evaluation(100, 6, 8, 0.1, args.detections)
    bench_case("synthetic val", *demo, warmup=1, repeats=args.repeats)
    # No warm-up at this size: the first case has loaded everything; one call takes minutes.
    coco = fake_evaluation(5000, 80, 13, 0.0, args.detections, seed=1)
    bench_case("COCO-size", *coco, warmup=0, repeats=args.coco_repeats)
    print(load_average())


if __name__ == "__main__":
    main()
