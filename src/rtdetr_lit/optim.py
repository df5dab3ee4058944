"""Optimizer parameter groups and learning-rate schedules (docs/rtdetrv2.md §9)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["build_param_groups", "clip_gradients", "restart_warmup", "warmup_schedule"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def build_param_groups(
    net: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr: float | None = None,
    no_weight_decay_on_bias: bool = False,
) -> list[dict[str, Any]]:
    """Split ``net``'s trainable parameters into AdamW groups (docs/rtdetrv2.md §9).

    * parameters under ``net.backbone`` train at ``backbone_lr`` (the scale-adaptive part);
    * parameters of normalisation layers get no weight decay;
    * with ``no_weight_decay_on_bias`` (RT-DETRv2-M*), neither do encoder/decoder biases.

    Each group carries a ``name`` (``backbone``, ``backbone_no_decay``, ``head``, ``head_no_decay``)
    so learning-rate monitors can tell them apart. Empty groups are left out.
    """
    norm_params = {
        id(p) for m in net.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)
    }
    backbone = getattr(net, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    groups: dict[str, list[nn.Parameter]] = {
        "backbone": [], "backbone_no_decay": [], "head": [], "head_no_decay": []
    }  # fmt: skip
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        in_backbone = id(p) in backbone_ids
        no_decay = id(p) in norm_params or (
            no_weight_decay_on_bias and not in_backbone and name.endswith(".bias")
        )
        key = ("backbone" if in_backbone else "head") + ("_no_decay" if no_decay else "")
        groups[key].append(p)
    blr = lr if backbone_lr is None else backbone_lr
    settings = {
        "backbone": (blr, weight_decay),
        "backbone_no_decay": (blr, 0.0),
        "head": (lr, weight_decay),
        "head_no_decay": (lr, 0.0),
    }
    return [
        {"name": key, "params": params, "lr": settings[key][0], "weight_decay": settings[key][1]}
        for key, params in groups.items()
        if params
    ]


class _WarmupFactor:
    """The learning-rate factor of :func:`warmup_schedule` at an optimizer step.

    An object rather than a closure: ``LambdaLR`` saves the attributes of callable objects in its
    ``state_dict``, so a warmup restarted by :func:`restart_warmup` survives a resumed run.
    """

    def __init__(
        self,
        warmup_steps: int,
        policy: str,
        total_steps: int | None,
        milestones: Sequence[int],
        gamma: float,
        min_lr_ratio: float,
    ) -> None:
        self.warmup_steps = warmup_steps
        # The step at which the current linear warmup began (moved by restart_warmup).
        self.warmup_start = 0
        self.policy = policy
        self.total_steps = total_steps
        self.milestones = sorted(milestones)
        self.gamma = gamma
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        since = step - self.warmup_start
        warm = min(1.0, (since + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        if self.policy == "cosine":
            progress = min(1.0, step / self.total_steps)
            low = self.min_lr_ratio
            return warm * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress)))
        if self.policy == "multistep":
            return warm * self.gamma ** sum(step >= m for m in self.milestones)
        return warm


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int = 2000,
    policy: str = "constant",
    total_steps: int | None = None,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup by optimizer step, then ``constant`` (the reference recipe), ``cosine`` or
    ``multistep``. Meant to step every iteration.

    The warmup factor is ``min(1, (step + 1) / warmup_steps)`` (docs/rtdetrv2.md §9). ``cosine``
    decays to ``min_lr_ratio`` at ``total_steps``; ``multistep`` multiplies by ``gamma`` at each of
    the ``milestones`` (steps). :func:`restart_warmup` begins a new warmup later on.
    """
    if policy not in ("constant", "cosine", "multistep"):
        raise ValueError(f"scheduler policy must be constant, cosine or multistep, not {policy!r}")
    if policy == "cosine" and not total_steps:
        raise ValueError("the cosine policy needs total_steps")
    factor = _WarmupFactor(warmup_steps, policy, total_steps, milestones, gamma, min_lr_ratio)
    return LambdaLR(optimizer, factor)


def restart_warmup(scheduler: LambdaLR, warmup_steps: int) -> None:
    """Begin a new linear warmup of ``warmup_steps`` at the scheduler's current step, and apply
    its first factor ``1 / warmup_steps`` to the optimizer right away (discrete fine-tuning,
    docs/rtdetrv2.md §9). The ``cosine``/``multistep`` part keeps counting steps from the start of
    training.

    Raises:
        TypeError: ``scheduler`` was not made by :func:`warmup_schedule`.
    """
    factors = getattr(scheduler, "lr_lambdas", None)
    if not factors or not all(isinstance(f, _WarmupFactor) for f in factors):
        raise TypeError(
            f"restart_warmup needs a scheduler made by warmup_schedule, got "
            f"{type(scheduler).__name__}"
        )
    step = scheduler.last_epoch
    for factor in factors:
        factor.warmup_start = step
        factor.warmup_steps = warmup_steps
    lrs = [base * f(step) for base, f in zip(scheduler.base_lrs, factors, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    # What get_last_lr() (and so LearningRateMonitor) reports until the next step().
    scheduler._last_lr = lrs


def clip_gradients(
    precision: Any, optimizer: torch.optim.Optimizer, clip_val: float, algorithm: str = "norm"
) -> None:
    """Clip ``optimizer``'s gradients through the Lightning ``precision`` plugin, also for an
    optimizer that unscales its own gradients (fused AdamW) under mixed precision.

    Lightning refuses that case outright. Without a gradient scaler (bf16-mixed) nothing needs
    unscaling. With one (16-mixed) Lightning leaves such an optimizer's gradients scaled, so they
    are unscaled here first; the scaler's step then hands the fused kernel no scale to divide by,
    only the overflow flag, and a step whose gradients overflowed is still skipped.
    """
    if clip_val <= 0:
        return
    scaler = getattr(precision, "scaler", None)
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)
    # The plugin's clipping functions, without the refusal in its clip_gradients.
    if algorithm == "value":
        precision.clip_grad_by_value(optimizer, clip_val)
    else:
        precision.clip_grad_by_norm(optimizer, clip_val)
