"""Training-pipeline throughput: our DataModule beside the same operations in torchvision v2.

    python scripts/bench/data.py [--images 160] [--repeats 7] [hydra overrides ...]

Both pipelines decode, augment (docs/rtdetrv2.md §9, strong phase), resize to 640x640 and collate
batches of 8 in one DataLoader worker process, from the same images in the same order
(``TrainSampler``, one epoch per timed round):

* ours: the training loader of ``SyntheticDataModule`` (OpenCV decode, the albumentations pipeline
  of ``rtdetr_lit.data.transforms``, ``MultiScaleCollate``; multi-scale off);
* torchvision: ``torchvision.io.decode_image``, then RandomPhotometricDistort (p 0.5),
  RandomZoomOut (fill 0, side_range (1, 4), p 0.5), RandomIoUCrop (docs/rtdetrv2.md §9 options)
  applied with p 0.8, SanitizeBoundingBoxes (min_size 1), RandomHorizontalFlip, Resize 640x640,
  ToDtype float (scaled), SanitizeBoundingBoxes, boxes to normalised cxcywh; float images stacked.

The images are a synthetic set at COCO's image size (480 to 640 px a side), generated once under
``data/synthetic-coco-size``. DataLoader runs torch single-threaded in a worker, and the data
module's workers run OpenCV on one thread too: one worker is one core for both pipelines.
"""

from __future__ import annotations

import argparse
import itertools
import os

import numpy as np
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from _bench import compare, load_average, medians, print_header, print_table, setup
from rtdetr_lit.config import compose_config
from rtdetr_lit.data.annotations import DetectionAnnotations
from rtdetr_lit.data.dataset import TrainSampler

# A synthetic set with COCO's image sizes (about 640x480) and object sizes up to 320 px; strong
# augmentation in every round (the torchvision pipeline has no stop epoch).
DATA_OVERRIDES = [
    "data=synthetic",
    "data.root=${paths.data_dir}/synthetic-coco-size",
    "data.synthetic.min_size=480",
    "data.synthetic.max_size=640",
    "data.synthetic.min_object=10",
    "data.synthetic.max_object=320",
    "data.synthetic.max_objects=8",
    "data.synthetic.num_val=8",
    "recipe.aug_stop_epoch=1000000",
    "data.image_size=[640,640]",
    "data.batch_size=8",
    "data.num_workers=1",
    "data.pin_memory=false",
    "recipe.multiscale=false",
]


class TorchvisionDataset(Dataset):
    """The docs/rtdetrv2.md §9 strong training pipeline written with
    ``torchvision.transforms.v2``."""

    def __init__(self, annotations: DetectionAnnotations, image_dir: str, size: tuple[int, int]):
        self.annotations = annotations
        self.image_dir = image_dir
        self.transforms = v2.Compose(
            [
                v2.RandomPhotometricDistort(p=0.5),
                v2.RandomZoomOut(fill=0, side_range=(1.0, 4.0), p=0.5),
                v2.RandomApply(
                    [
                        v2.RandomIoUCrop(
                            min_scale=0.3,
                            max_scale=1.0,
                            min_aspect_ratio=0.5,
                            max_aspect_ratio=2.0,
                            sampler_options=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0],
                            trials=40,
                        )
                    ],
                    p=0.8,
                ),
                v2.SanitizeBoundingBoxes(min_size=1),
                v2.RandomHorizontalFlip(),
                v2.Resize(size),
                v2.ToDtype(torch.float32, scale=True),
                v2.SanitizeBoundingBoxes(),
            ]
        )

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        ann = self.annotations
        path = os.path.join(self.image_dir, ann.file_name(i))
        image = decode_image(path, mode=ImageReadMode.RGB)
        rows = np.arange(ann.box_slice(i).start, ann.box_slice(i).stop)
        rows = rows[ann.iscrowd[rows] == 0]
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(ann.boxes[rows]), format="XYXY", canvas_size=image.shape[-2:]
            ),
            "labels": torch.from_numpy(ann.labels[rows]),
        }
        image, target = self.transforms(image, target)
        h, w = image.shape[-2:]
        xyxy = target["boxes"].as_subclass(torch.Tensor) / torch.tensor([w, h, w, h])
        target["boxes"] = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
        target["image_id"] = torch.tensor(int(ann.image_ids[i]))
        target["orig_size"] = torch.tensor([int(ann.widths[i]), int(ann.heights[i])])
        return image, target, epoch


def stack(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config")
    parser.add_argument("--images", type=int, default=160, help="images per timed round")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per pipeline")
    args = parser.parse_args()

    setup()
    print_header("Data: training pipeline throughput")
    cfg = compose_config(
        "train", [*DATA_OVERRIDES, f"data.synthetic.num_train={args.images}", *args.overrides]
    )
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    ours = datamodule.train_dataloader()
    dataset = ours.dataset
    theirs_set = TorchvisionDataset(dataset.annotations, dataset.image_dir, datamodule.image_size)
    theirs = DataLoader(
        theirs_set,
        batch_size=ours.batch_size,
        sampler=TrainSampler(theirs_set, seed=ours.sampler.seed),
        collate_fn=stack,
        num_workers=ours.num_workers,
        persistent_workers=True,
        drop_last=True,
    )
    images_per_round = len(ours.sampler) // ours.batch_size * ours.batch_size
    print(
        f"{len(dataset)} images of {dataset.annotations.widths.mean():.0f}x"
        f"{dataset.annotations.heights.mean():.0f} px on average "
        f"({len(dataset.annotations.boxes)} boxes) -> {datamodule.image_size}, batch "
        f"{ours.batch_size}, {ours.num_workers} worker (OpenCV on one thread there), "
        "strong augmentation"
    )

    def one_epoch(loader: DataLoader):
        epochs = itertools.count()  # round k is epoch k for every pipeline

        def run() -> None:
            loader.sampler.set_epoch(next(epochs))
            for _images, _targets in loader:
                pass

        return run

    samples = compare(
        {"ours": one_epoch(ours), "torchvision": one_epoch(theirs)},
        warmup=1,
        repeats=args.repeats,
    )
    print(f"\nimages per round: {images_per_round}")
    ratios = print_table(samples, baseline="torchvision", unit="s")
    rates = {name: images_per_round / t for name, t in medians(samples).items()}
    print(
        "\nimages/s (median): "
        + ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items())
        + f"; ours / torchvision = {rates['ours'] / rates['torchvision']:.2f} "
        f"(time ratio {ratios['ours']:.2f})"
    )
    print(load_average())


if __name__ == "__main__":
    main()
