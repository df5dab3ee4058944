"""Throughput and peak-memory probe for ``scripts/gpu_check.py``: a Lightning callback.

``gpu_check.py`` adds it to a training run started as ``python -m rtdetr_lit.train`` with::

    +callbacks.gpu_probe._target_=_gpu_probe.ThroughputProbe
    +callbacks.gpu_probe.out_dir=<folder> +callbacks.gpu_probe.warmup_steps=10

(``scripts/`` on ``PYTHONPATH``, so that Hydra imports it in every process, DDP ranks included).
Each rank writes ``<out_dir>/rank<global rank>.json`` when training ends: the images per second of
that rank over the steps after the warm-up, and its peak memory (CUDA: the largest allocation
``torch.cuda.max_memory_allocated`` and what the caching allocator reserved; CPU: the process's
peak resident set size).
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

__all__ = ["ThroughputProbe", "read_records"]

GIB = 1024**3


def read_records(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of all ranks in ``out_dir``, ordered by rank (none if no rank wrote one)."""
    files = sorted(Path(out_dir).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    return [json.loads(p.read_text()) for p in files]


class ThroughputProbe(L.Callback):
    """Time the training steps after ``warmup_steps`` and record peak memory, per rank.

    Args:
        out_dir: folder of the per-rank JSON files (created).
        warmup_steps: steps left out of the timing (CUDA/cuDNN set-up, allocator growth,
            DataLoader start). With fewer steps than that in the run, no rate is recorded.
    """

    def __init__(self, out_dir: str, warmup_steps: int = 10) -> None:
        self.out_dir = Path(out_dir)
        self.warmup_steps = warmup_steps
        self._done = 0  # training batches finished in this process
        self._batch = 0  # images in the current batch on this rank
        self._images = 0  # images of the timed steps
        self._start: float | None = None
        self._last: float | None = None

    def _sync(self, pl_module: L.LightningModule) -> None:
        # CUDA runs asynchronously: wait for the queued kernels, or the clock measures only the
        # time it took to queue them.
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        images = batch[0]  # (images, targets) from the data modules' collate
        self._batch = int(images.shape[0])

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._done += 1
        if self._done < self.warmup_steps:
            return
        self._sync(pl_module)
        now = time.perf_counter()
        if self._start is None:  # the last warm-up step just ended: the clock starts here
            self._start = now
        else:
            self._images += self._batch
            self._last = now

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        timed_steps = self._done - max(self.warmup_steps, 1)
        seconds = (self._last - self._start) if self._last and self._start else None
        record: dict[str, Any] = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "device": str(device),
            "precision": str(trainer.precision),
            "steps": self._done,
            "warmup_steps": self.warmup_steps,
            "timed_steps": max(timed_steps, 0),
            "timed_images": self._images,
            "seconds": seconds,
            "images_per_s": self._images / seconds if seconds else None,
        }
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            record.update(
                device_name=props.name,
                device_memory_gib=props.total_memory / GIB,
                memory_kind="cuda max allocated",
                peak_memory_gib=torch.cuda.max_memory_allocated(device) / GIB,
                peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GIB,
            )
        else:
            # ru_maxrss is in KiB on Linux: the whole process, model, data and Python included.
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            record.update(memory_kind="cpu peak RSS", peak_memory_gib=rss / GIB)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)  # a reader never sees half a file
