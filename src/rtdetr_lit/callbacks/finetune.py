"""The discrete fine-tuning stage (docs/rtdetrv2.md §0.5, §9): grid_sample -> discrete sampling
mid-training."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.strategies import DDPStrategy

from rtdetr_lit.callbacks.ema import EMA
from rtdetr_lit.optim import restart_warmup

__all__ = ["DiscreteFinetune"]

log = logging.getLogger(__name__)


class DiscreteFinetune(L.Callback):
    """Switch every decoder cross-attention of ``pl_module.net`` to discrete sampling.

    From epoch ``switch_epoch`` (0-based) on, the model samples with the discrete operator, the
    sampling offsets stop training (they get no gradient through it) and, as RT-DETRv2 does at
    the start of its fine-tuning stage, the EMA (an :class:`~rtdetr_lit.callbacks.EMA` callback, if
    any) and the linear learning-rate warmup (``warmup_steps`` optimizer steps; the scheduler
    must come from :func:`rtdetr_lit.optim.warmup_schedule`) start afresh.

    ``switch_epoch=0`` is the paper's two-stage flow: load grid_sample-trained weights
    (``model.init_from``) and fine-tune discretely from the first step. The model is switched in
    ``setup``, before the optimizer and any DDP wrapper are built, so the offsets are not even in
    the optimizer; validation and testing under this callback use discrete sampling too.

    Whether the switch happened is saved in checkpoints: a run resumed inside the discrete stage
    continues discretely from its first step, without restarting EMA or warmup again.

    Args:
        switch_epoch: first epoch trained with discrete sampling.
        warmup_steps: length of the restarted warmup (0: none, the full rate at once).
    """

    def __init__(self, switch_epoch: int = 0, warmup_steps: int = 2000) -> None:
        if switch_epoch < 0 or warmup_steps < 0:
            raise ValueError(
                f"DiscreteFinetune needs switch_epoch >= 0 and warmup_steps >= 0, got "
                f"switch_epoch={switch_epoch}, warmup_steps={warmup_steps}"
            )
        self.switch_epoch = switch_epoch
        self.warmup_steps = warmup_steps
        # Whether the discrete stage has begun in this run (saved in checkpoints).
        self.switched = False

    # -- checkpoint state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"switched": self.switched}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.switched = bool(state_dict["switched"])

    # -- hooks ------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.switch_epoch == 0:
            _to_discrete(pl_module)
        elif (
            stage == "fit"
            and isinstance(trainer.strategy, DDPStrategy)
            and not getattr(trainer.strategy, "_ddp_kwargs", {}).get("find_unused_parameters")
        ):
            # Offsets that stop receiving gradients after DDP registered them break its gradient
            # reduction unless DDP looks for unused parameters.
            raise ValueError(
                f"callbacks.discrete_finetune: switching at epoch {self.switch_epoch} under "
                "DDP needs trainer.strategy=ddp_find_unused_parameters_true (or switch_epoch=0)"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resumed inside the discrete stage. The optimizer was built before this hook, with the
        # offsets in it, like in the run that saved the checkpoint, so its state loads unchanged.
        if self.switched:
            _to_discrete(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.switched:
            # Again, for strategies that restore callback state only after on_fit_start.
            _to_discrete(pl_module)
        elif trainer.current_epoch >= self.switch_epoch:
            self._begin_stage(trainer, pl_module)

    def _begin_stage(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _to_discrete(pl_module)
        restarted = []
        for ema in (cb for cb in trainer.callbacks if isinstance(cb, EMA)):
            ema.restart()
            restarted.append("EMA")
        for config in trainer.lr_scheduler_configs:
            restart_warmup(config.scheduler, self.warmup_steps)
            restarted.append(f"warmup ({self.warmup_steps} steps)")
        if not trainer.lr_scheduler_configs:
            log.warning("discrete fine-tuning: no learning-rate scheduler, so no warmup restart")
        self.switched = True
        log.info(
            "discrete fine-tuning from epoch %d (step %d): discrete sampling, offsets frozen; "
            "restarted: %s",
            trainer.current_epoch,
            trainer.global_step,
            ", ".join(restarted) or "nothing",
        )


def _to_discrete(pl_module: L.LightningModule) -> None:
    net = pl_module.net
    if net.sampling_method == "discrete":
        return
    net.set_sampling_method("discrete")
    # A gradient left over from the last grid_sample step must not reach the optimizer: with
    # grad None it skips the now frozen offsets entirely (no momentum step, no weight decay).
    for param in net.parameters():
        if not param.requires_grad:
            param.grad = None
