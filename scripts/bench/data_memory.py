"""Memory of the training DataLoader over epochs: numpy-array annotations vs lists of dicts.

    python scripts/bench/data_memory.py [--epochs 3] [--workers 2] [hydra overrides ...]

Runs the synthetic training loader of the ``train`` config (``data=synthetic``; persistent
workers) for ``--epochs`` epochs, then a baseline loader over the same images with the same
annotations held the way the reference's loader holds them: one Python dict per image with a list
of per-box dicts. Both use the same decode (``read_image``), the same albumentations pipeline and
the same collate function; only the annotation storage differs. The two loaders run one after the
other from the same parent process, which holds both datasets before either forks its workers.

Memory is read from ``/proc/<pid>/smaps_rollup`` of the main process and the loader's workers,
summed, after the first batch of epoch 0 (workers up and warm) and at the end of every epoch
(workers idle, so the reading is stable; the start of the next epoch is the same state):

* RSS, resident pages: a shared page counts in every process that maps it. A page that a worker
  copies on write was resident before and after, so RSS barely shows the effect in question;
* anon PSS, anonymous memory with each shared page split between its sharers: the sum is the
  physical memory the loader's processes use beyond their shared libraries (whose PSS moves with
  other programs on the machine), and it grows by exactly the pages the workers un-share by
  touching the reference counts of annotation objects.

glibc keeps freed image buffers for reuse, and how much it keeps moves by tens of MiB from epoch to
epoch; the script fixes its mmap threshold at 128 KiB (``mallopt``, inherited by the forked workers)
so that large buffers go back to the system and what remains is the annotations' share
(``--keep-malloc`` leaves glibc as it is).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import itertools
import multiprocessing
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

from _bench import print_header, setup
from rtdetr_lit.config import compose_config
from rtdetr_lit.data.annotations import DetectionAnnotations
from rtdetr_lit.data.dataset import DetectionDataset, TrainSampler
from rtdetr_lit.data.decode import read_image
from rtdetr_lit.data.transforms import build_transforms

_METRICS = ("rss", "anon_pss")
_M_MMAP_THRESHOLD = -3  # glibc malloc.h


def per_image_dicts(ann: DetectionAnnotations) -> list[dict]:
    """COCO image dicts, each with the list of its annotation dicts under ``annotations``."""
    coco = ann.to_coco()
    records = {im["id"]: {**im, "annotations": []} for im in coco["images"]}
    for a in coco["annotations"]:
        records[a["image_id"]]["annotations"].append(a)
    return list(records.values())


def _traced_size(ann: DetectionAnnotations, out) -> None:
    tracemalloc.start()
    records = per_image_dicts(ann)
    out.put(tracemalloc.get_traced_memory()[0] / 2**20)
    del records


def dicts_size_mib(ann: DetectionAnnotations) -> float:
    """The heap size of ``per_image_dicts(ann)``, measured with tracemalloc in a forked child
    (tracing leaves freed blocks in the heap, which workers forked later would reuse)."""
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_traced_size, args=(ann, out))
    child.start()
    size = out.get()
    child.join()
    return size


class DictListDataset(Dataset):
    """The baseline: ``dataset``'s images and boxes as per-image dicts with lists of box dicts.

    Samples are made as ``DetectionDataset`` makes them (same decode, transforms and target).
    """

    def __init__(self, dataset: DetectionDataset, image_size, augment) -> None:
        ann = dataset.annotations
        self.records = per_image_dicts(ann)
        self.label_of = {c: i for i, c in enumerate(ann.category_ids)}
        self.image_dir = dataset.image_dir
        # The dynamic policy as in DetectionDataset: strong operations until the stop epoch.
        self.stop_epoch = augment.stop_epoch
        self.strong = build_transforms(image_size, augment, strong=True)
        self.after_stop = build_transforms(image_size, augment, strong=False)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        record = self.records[i]
        image = read_image(os.path.join(self.image_dir, record["file_name"]))
        anns = [a for a in record["annotations"] if not a["iscrowd"]]
        xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        pipeline = self.strong if epoch < self.stop_epoch else self.after_stop
        out = pipeline(image=image, bboxes=xyxy.reshape(-1, 4), box_index=np.arange(len(anns)))
        kept = [anns[k] for k in out["box_index"]]
        out_h, out_w = out["image"].shape[:2]
        boxes = torch.tensor(np.asarray(out["bboxes"], np.float32).reshape(-1, 4))
        boxes = boxes / torch.tensor([out_w, out_h, out_w, out_h])
        target = {
            "boxes": torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in kept]),
            "image_id": torch.tensor(record["id"]),
            "orig_size": torch.tensor([record["width"], record["height"]]),
            "iscrowd": torch.tensor([a["iscrowd"] for a in kept]),
            "area": torch.tensor([a["area"] for a in kept]),
        }
        return torch.from_numpy(out["image"]).permute(2, 0, 1), target, epoch


def _children(pid: int) -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def _memory_mib(pid: int) -> dict[str, float]:
    """RSS and anonymous PSS of ``pid`` in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss_Anon"):
            values[key] = int(rest.split()[0]) / 1024
    return {"rss": values["Rss"], "anon_pss": values["Pss_Anon"]}


def measure(workers: int) -> dict[str, float]:
    """Memory of this process and its ``workers`` children, summed."""
    pids = [os.getpid(), *_children(os.getpid())]
    if len(pids) != workers + 1:
        raise RuntimeError(f"expected {workers} worker processes, found {len(pids) - 1}")
    per = [_memory_mib(p) for p in pids]
    return {k: sum(m[k] for m in per) for k in _METRICS}


def run_epochs(name: str, loader: DataLoader, epochs: int, workers: int) -> list[dict]:
    """Iterate ``epochs`` epochs; memory after the first batch, then at the end of each epoch."""
    readings = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        batches = iter(loader)
        next(batches)
        if epoch == 0:
            readings.append(measure(workers))
        count = 1 + sum(1 for _ in batches)
        readings.append(measure(workers))
        seconds = time.perf_counter() - start
        before, after = readings[-2], readings[-1]
        print(
            f"{name:>6} epoch {epoch}: {count} batches in {seconds:4.1f} s; "
            + "; ".join(
                f"{k} {before[k]:.1f} -> {after[k]:.1f} MiB ({after[k] - before[k]:+.1f})"
                for k in _METRICS
            ),
            flush=True,
        )
    return readings


def _fix_mmap_threshold() -> None:
    """Serve allocations >= 128 KiB with mmap and unmap them when freed (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        print("note: not glibc; allocator left as it is")
        return
    if libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024) != 1:
        print("note: mallopt(M_MMAP_THRESHOLD) failed; allocator left as it is")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config")
    parser.add_argument("--epochs", type=int, default=3, help="(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--keep-malloc", action="store_true", help="leave glibc's malloc alone")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error("--workers must be >= 1 (the point is the worker processes)")

    setup()
    print_header("Data: loader memory over epochs")
    if not args.keep_malloc:
        _fix_mmap_threshold()
    cfg = compose_config(
        "train", ["data=synthetic", f"data.num_workers={args.workers}", *args.overrides]
    )
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    dataset = datamodule.train_dataloader().dataset
    augment = datamodule.augment
    if augment.stop_epoch < args.epochs:
        print(f"note: the strong augmentation stops at epoch {augment.stop_epoch} (both loaders)")
    # Both datasets exist before either loader forks its workers.
    baseline_set = DictListDataset(dataset, datamodule.image_size, augment)
    dicts_mib = dicts_size_mib(dataset.annotations)
    ann = dataset.annotations
    arrays = [getattr(ann, f.name) for f in dataclasses.fields(ann)]
    arrays_mib = sum(a.nbytes for a in arrays if isinstance(a, np.ndarray)) / 2**20

    def baseline_loader() -> DataLoader:
        return DataLoader(
            baseline_set,
            batch_size=datamodule.batch_size,
            sampler=TrainSampler(baseline_set, seed=0),
            collate_fn=datamodule.collate_train,
            num_workers=args.workers,
            persistent_workers=True,
            drop_last=True,
        )

    print(
        f"{len(dataset)} images, {len(ann.boxes)} boxes (in RAM: arrays {arrays_mib:.1f} MiB, "
        f"dicts {dicts_mib:.1f} MiB), batch {datamodule.batch_size}, "
        f"{args.workers} persistent workers, {args.epochs} epochs"
    )
    results = {}
    for name, make_loader in (("arrays", datamodule.train_dataloader), ("dicts", baseline_loader)):
        # The loader (and with it its workers) is gone when run_epochs returns.
        results[name] = run_epochs(name, make_loader(), args.epochs, args.workers)
        gc.collect()

    print("\n| annotations | metric | growth in epoch 0, 1, ... (MiB) | total (MiB) |")
    print("| --- | --- | --- | ---: |")
    for name, readings in results.items():
        for key in _METRICS:
            steps = [after[key] - before[key] for before, after in itertools.pairwise(readings)]
            growth = ", ".join(f"{g:+.1f}" for g in steps)
            print(f"| {name} | {key} | {growth} | {sum(steps):+.1f} |")


if __name__ == "__main__":
    main()
