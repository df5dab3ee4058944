"""Skip optimizer steps whose gradients are not finite; stop after too many in a row."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

__all__ = ["NonFiniteGuard"]

log = logging.getLogger(__name__)


class NonFiniteGuard(L.Callback):
    """Drop the update of a step whose loss or gradients hold NaN or infinity.

    A non-finite loss gives non-finite gradients, so the check is on the gradients, after the
    backward pass and before clipping. Under DDP the gradients are already averaged over the
    ranks, so every rank takes the same decision without extra communication. The step is skipped
    by clearing the gradients (AdamW leaves parameters without a gradient untouched); the skip is
    logged as ``train/skipped_steps``. Under a gradient scaler (16-mixed) an overflow while the
    loss scale is at least 1 is the scaler's business: it skips that update itself, and the guard
    only logs it. After ``max_consecutive`` skipped steps in a row the run
    stops with an error, since the model will not recover by itself (lower the learning rate,
    check the data, or resume from an earlier checkpoint).
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 1:
            raise ValueError("max_consecutive must be >= 1")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and not finite else None
        if finite:
            self.consecutive = 0
        elif scale is not None and scale >= 1.0:
            # 16-mixed: the loss scale made the gradients overflow. The scaler skips this update
            # itself and halves the scale; not a sign of a broken run unless the scale keeps
            # falling below 1, where an overflow means the true gradients are not finite.
            log.info(
                "step %d: gradients overflowed at loss scale %g; the gradient scaler skips this "
                "update and lowers the scale",
                trainer.global_step,
                scale,
            )
        else:
            optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.consecutive += 1
            log.warning(
                "step %d: non-finite loss or gradients, update skipped (%d in a row, %d in all)",
                trainer.global_step,
                self.consecutive,
                self.skipped,
            )
        pl_module.log("train/skipped_steps", float(self.skipped), sync_dist=False)
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.consecutive} training steps in a row had non-finite loss or gradients "
                f"(at step {trainer.global_step}); stopping. Lower the learning rate, check the "
                "data, or resume from an earlier checkpoint."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict["skipped"]
        self.consecutive = state_dict["consecutive"]
