"""Exponential moving average of the weights with RT-DETR's warm-up ramp (docs/rtdetrv2.md §9)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["EMA", "ema_decay"]


def ema_decay(updates: int, decay: float = 0.9999, warmup_steps: int = 2000) -> float:
    """Decay used at the ``updates``-th update (1-based): ``decay * (1 - exp(-updates / warmup))``.

    Small at first, so the average follows the fast-changing early weights, then close to ``decay``.
    """
    return decay * (1.0 - math.exp(-updates / warmup_steps))


@dataclass(frozen=True)
class _EMAUpdate:
    """The ``multi_avg_fn`` of :class:`EMA`; a class, not a closure, so that the callback pickles
    (``ddp_spawn`` and notebooks send callbacks to new processes)."""

    decay: float
    warmup_steps: int

    def __call__(
        self, averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor
    ) -> None:
        # Called once per (device, dtype) group. Integer and bool state (BN step counters, masks)
        # is copied, not averaged.
        if not averaged[0].is_floating_point():
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)
            return
        # n counts earlier updates; the first one copied the weights outright.
        d = ema_decay(int(n) + 1, self.decay, self.warmup_steps)
        torch._foreach_lerp_(averaged, current, 1.0 - d)


class EMA(WeightAveraging):
    """EMA of every parameter and buffer of the LightningModule, updated after each optimizer step.

    Built on Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging`: validation runs
    on the averaged weights, checkpoints store them as ``state_dict`` (the raw weights go to
    ``current_model_state``), and when training ends the model keeps the averaged weights, so
    testing and exporting use them too. The first update copies the weights; update ``k`` > 1 uses
    :func:`ema_decay` ``(k)``. :meth:`restart` begins a fresh average (discrete fine-tuning).
    """

    def __init__(
        self, decay: float = 0.9999, warmup_steps: int = 2000, device: str | None = None
    ) -> None:
        if not 0.0 < decay < 1.0 or warmup_steps <= 0:
            raise ValueError("EMA needs 0 < decay < 1 and warmup_steps > 0")
        super().__init__(
            device=device, use_buffers=True, multi_avg_fn=_EMAUpdate(decay, warmup_steps)
        )
        self.decay = decay
        self.warmup_steps = warmup_steps

    @property
    def num_updates(self) -> int:
        """How many updates the current average has seen (0 before training)."""
        model = self._average_model
        return 0 if model is None else int(model.n_averaged)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Give the average the dtypes (and, without an explicit ``device``, the device) of the
        module as the strategy set it up.

        Lightning copies the module into the average in ``setup``, before the strategy moves it to
        its device and the precision plugin converts it (``64-true``, ``bf16-true``): without this
        the average would stay float32 (and the update fail) or stay on the CPU (and every update
        copy the weights off the GPU).
        """
        if self._average_model is None:
            return
        module = self._average_model.module
        averaged = itertools.chain(module.parameters(), module.buffers())
        current = itertools.chain(pl_module.parameters(), pl_module.buffers())
        for avg, cur in zip(averaged, current, strict=True):
            device = avg.device if self._device is not None else cur.device
            if (avg.dtype, avg.device) != (cur.dtype, device):
                avg.data = avg.data.to(device=device, dtype=cur.dtype)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict
    ) -> None:
        """Resume the average when fitting; otherwise keep the averaged weights just loaded.

        Lightning's callback puts the raw weights back whenever it holds an average, which includes
        ``trainer.test(ckpt_path="best")`` after ``fit`` in the same process: that would test the
        raw weights of the best checkpoint, not the EMA weights it was chosen by.
        """
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def restart(self) -> None:
        """Forget the average: the next update copies the current weights and the ramp restarts."""
        if self._average_model is not None:
            self._average_model.n_averaged.zero_()
