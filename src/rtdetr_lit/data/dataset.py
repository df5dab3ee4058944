"""The detection dataset, the epoch-carrying samplers and the multi-scale collate function.

The augmentation policy depends on the epoch (docs/rtdetrv2.md §9), and the transforms run in
DataLoader worker processes that may live across epochs (``persistent_workers``). Rather than
sharing mutable state with the workers, the training sampler hands out ``(epoch, index)`` keys: the
epoch travels with every sample into whichever process loads it, and on into the collate function.
Lightning calls ``set_epoch`` on the sampler before each epoch (it is a ``DistributedSampler``, so
Lightning uses it as it is under DDP too).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler, get_worker_info

from rtdetr_lit.data.annotations import DetectionAnnotations
from rtdetr_lit.data.decode import read_image
from rtdetr_lit.data.transforms import AugmentConfig, build_transforms
from rtdetr_lit.sizes import check_sizes

__all__ = ["DetectionDataset", "EvalSampler", "MultiScaleCollate", "TrainSampler"]

Sample = tuple[torch.Tensor, dict[str, torch.Tensor], int | None]

# Samples and batches are built on the host, in DataLoader workers; Lightning moves each batch to
# the model's device. Said explicitly, so that a default device set with torch.set_default_device
# (or a `with torch.device(...)` block) does not send them elsewhere.
_HOST = torch.device("cpu")


class DetectionDataset(Dataset):
    """Images of one split with their boxes, decoded and transformed on access.

    ``augment=None`` gives validation samples (resize only, crowd boxes kept for evaluation);
    otherwise training samples (crowd boxes left out), with the strong operations while the key's
    epoch is below ``augment.stop_epoch``. A sample is ``(image, target, epoch)``: ``image`` uint8
    (3, H, W) at ``image_size`` (H, W); ``target`` as in the batch contract of ``rtdetr_lit.data``.
    """

    def __init__(
        self,
        annotations: DetectionAnnotations,
        image_dir: str | os.PathLike[str],
        image_size: Sequence[int],
        augment: AugmentConfig | None = None,
    ) -> None:
        self.annotations = annotations
        self.image_dir = os.fspath(image_dir)
        self.augment = augment
        # Validation: resize only. Training: the full pipeline, and the one after stop_epoch.
        self._transforms = build_transforms(image_size, augment, strong=True)
        self._after_stop = build_transforms(image_size, augment, strong=False) if augment else None
        self._seeded_in: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.annotations)

    def image_path(self, i: int) -> str:
        return os.path.join(self.image_dir, self.annotations.file_name(i))

    def _seed_transforms(self) -> None:
        """Give each process (main or worker) its own augmentation stream, seeded from torch."""
        info = get_worker_info()
        where = (os.getpid(), info.id if info else -1)
        if self._seeded_in != where:
            seed = (info.seed if info else torch.initial_seed()) % 2**32
            for pipeline in (self._transforms, self._after_stop):
                if pipeline is not None:
                    pipeline.set_random_seed(seed)
            self._seeded_in = where

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        epoch, i = key if isinstance(key, tuple) else (None, key)
        i = int(i)
        self._seed_transforms()
        ann = self.annotations
        path = self.image_path(i)
        image = read_image(path, bool(ann.apply_exif[i]))
        height, width = image.shape[:2]
        if (width, height) != (ann.widths[i], ann.heights[i]):
            raise ValueError(
                f"{path}: decoded as {width}x{height}, but the annotations were made on "
                f"{ann.widths[i]}x{ann.heights[i]}"
            )
        span = ann.box_slice(i)
        rows = np.arange(span.start, span.stop)
        if self.augment is not None:
            rows = rows[ann.iscrowd[rows] == 0]
        pipeline = self._transforms
        if self._after_stop is not None and epoch is not None and epoch >= self.augment.stop_epoch:
            pipeline = self._after_stop
        out = pipeline(image=image, bboxes=ann.boxes[rows], box_index=np.arange(len(rows)))
        rows = rows[np.asarray(out["box_index"], np.int64)]
        out_h, out_w = out["image"].shape[:2]
        xyxy = torch.as_tensor(np.asarray(out["bboxes"], np.float32).reshape(-1, 4), device=_HOST)
        xyxy = xyxy / xyxy.new_tensor([out_w, out_h, out_w, out_h])
        cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
        target = {
            "boxes": cxcywh,
            "labels": torch.as_tensor(ann.labels[rows], device=_HOST),
            "image_id": torch.tensor(int(ann.image_ids[i]), device=_HOST),
            "orig_size": torch.tensor([width, height], device=_HOST),
            "iscrowd": torch.as_tensor(ann.iscrowd[rows].astype(np.int64), device=_HOST),
            "area": torch.as_tensor(ann.areas[rows], device=_HOST),
        }
        chw = torch.from_numpy(np.ascontiguousarray(out["image"])).permute(2, 0, 1)
        return chw, target, epoch


class MultiScaleCollate:
    """Stack samples into ``(images, targets)``; images float in [0, 1].

    While the samples' epoch is below ``stop_epoch``, the whole batch is resized (nearest) to one
    square size drawn from ``sizes`` (docs/rtdetrv2.md §9). Boxes are normalised, so they need no
    change.
    """

    def __init__(self, sizes: Sequence[int] = (), stop_epoch: int = 0) -> None:
        self.sizes = list(check_sizes(sizes, "data.multiscale.sizes"))
        self.stop_epoch = stop_epoch

    def __call__(self, batch: list[Sample]) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        images = torch.stack([b[0] for b in batch])
        targets = [b[1] for b in batch]
        epoch = batch[0][2]
        if self.sizes and epoch is not None and epoch < self.stop_epoch:
            # the host's generator: RandomState saves and restores it (rtdetr_lit.callbacks.resume)
            size = self.sizes[int(torch.randint(len(self.sizes), (), device=_HOST))]
            images = F.interpolate(images, size=(size, size), mode="nearest")
        return images.float().div_(255.0), targets


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class TrainSampler(DistributedSampler):
    """This rank's share of a shuffled epoch, as ``(epoch, index)`` keys.

    The permutation depends on ``seed`` and the epoch only, so every rank (and a resumed run) sees
    the same one. A run resumed in the middle of an epoch passes that ``epoch`` and ``start``, the
    number of this rank's samples of it already trained on: iterating that epoch leaves them out.
    The sampler starts at ``epoch`` because Lightning creates the first iterator before it calls
    ``set_epoch``.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, epoch: int = 0, start: int = 0) -> None:
        replicas, rank = _world()
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=seed)
        self.set_epoch(epoch)
        self.resume_epoch, self.resume_start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        indices = super().__iter__()
        if epoch == self.resume_epoch:
            indices = itertools.islice(indices, self.resume_start, None)
        return ((epoch, i) for i in indices)


class EvalSampler(DistributedSampler):
    """This rank's images in order, every image exactly once over all ranks (no padding).

    ``DistributedSampler`` pads with repeats so that ranks get equal counts, which would count
    those images twice in the mAP.
    """

    def __init__(self, dataset: Dataset) -> None:
        replicas, rank = _world()
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return max(0, math.ceil((len(self.dataset) - self.rank) / self.num_replicas))
