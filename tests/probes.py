"""Callbacks that record what training did, for the scale-out tests (DDP, resume, sweeps).

They are added to a composed config as ``+callbacks.<name>._target_=tests.probes.<Class>`` and
write below the run directory, one file per rank, so that runs in subprocesses (``python -m
rtdetr_lit.train``, DDP ranks launched by Lightning) can be inspected by the test afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.nn.modules.batchnorm import _BatchNorm


def _out(trainer: L.Trainer, name: str) -> Path:
    path = Path(trainer.default_root_dir) / "probes" / f"{name}_rank{trainer.global_rank}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class BatchProbe(L.Callback):
    """One JSON line per training batch: step, epoch, input size, image ids and box counts."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        images, targets = batch
        row = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "size": list(images.shape[-2:]),
            "image_ids": [int(t["image_id"]) for t in targets],
            "boxes": [len(t["boxes"]) for t in targets],
        }
        with open(_out(trainer, "batches").with_suffix(".jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


class FirstStepProbe(L.Callback):
    """The first step's loss, gradients (as the optimizer sees them, before clipping), the
    criterion's ``num_boxes``, the batch norm layer types and the world size, in a ``.pt`` file."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {"num_boxes": []}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        norms = [type(m).__name__ for m in pl_module.modules() if isinstance(m, _BatchNorm)]
        self.record.update(batch_norms=norms, world_size=trainer.world_size)
        criterion = pl_module.criterion
        count = criterion._num_boxes

        def spy(targets: list[dict], device: torch.device) -> torch.Tensor:
            value = count(targets, device)
            self.record["num_boxes"].append(float(value))
            return value

        criterion._num_boxes = spy

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.global_step == 0:
            self.record["grads"] = {
                name: p.grad.detach().clone()
                for name, p in pl_module.named_parameters()
                if p.grad is not None
            }

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if trainer.global_step == 1:
            self.record["loss"] = float(outputs["loss"])
            self.record["local_boxes"] = sum(len(t["boxes"]) for t in batch[1])
            torch.save(self.record, _out(trainer, "first_step").with_suffix(".pt"))
