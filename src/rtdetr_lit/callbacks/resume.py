"""What a run resumed from a checkpoint needs to continue like an unbroken one: the random
generator states, and step checkpoints Lightning can resume from."""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["RandomState", "StepCheckpoint"]

log = logging.getLogger(__name__)


def _collect() -> dict[str, Any]:
    """This process's generator states, as types that load with ``weights_only=True``."""
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch.cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "torch.cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch.cuda"])


class RandomState(L.Callback):
    """Save every rank's random generators (Python, NumPy, torch CPU and CUDA) in checkpoints and
    set them again when training resumes from one.

    The states are taken when the checkpoint is written and set back when the resumed training
    starts, before its first batch is loaded, so the denoising queries and the multi-scale sizes
    (drawn in the main process) continue as in a run that never stopped. Each rank gets its own
    state back: they differ, since denoising draws as many numbers as the rank has boxes.
    Not covered: DataLoader worker processes, which seed themselves anew when they start (so
    augmentation done in workers differs after a resume), and a checkpoint written by another
    number of processes (the generators then stay as seeded, with a warning).
    """

    def __init__(self) -> None:
        self._loaded: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Lightning builds the checkpoint on every rank, so every rank takes part in the gather.
        state = _collect()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        else:
            states = [state]
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = list(state_dict["ranks"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loaded is None:
            return
        states, self._loaded = self._loaded, None
        if len(states) != trainer.world_size:
            log.warning(
                "the checkpoint holds random states of %d processes, this run has %d: the random "
                "streams continue from the seed, not from the checkpoint",
                len(states),
                trainer.world_size,
            )
            return
        _restore(states[trainer.global_rank])


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for ``every_n_train_steps`` that leaves out the last batch of an epoch.

    Resumed from a checkpoint written there, Lightning goes on with the next epoch without the
    finished epoch's validation and epoch-end hooks, and without ``on_train_epoch_start`` of the
    next one (where, for instance, the discrete fine-tuning stage begins). The checkpoint written
    at the end of the epoch, after validation, follows moments later anyway.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.is_last_batch or progress.current.ready >= trainer.num_training_batches:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, i)
