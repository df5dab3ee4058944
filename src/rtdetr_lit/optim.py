"""Optimizer parameter groups and learning-rate schedules (SPEC §9)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["build_param_groups", "warmup_schedule"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def build_param_groups(
    net: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr: float | None = None,
    no_weight_decay_on_bias: bool = False,
) -> list[dict[str, Any]]:
    """Split ``net``'s trainable parameters into AdamW groups (SPEC §9).

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

    The warmup factor is ``min(1, (step + 1) / warmup_steps)`` (SPEC §9). ``cosine`` decays to
    ``min_lr_ratio`` at ``total_steps``; ``multistep`` multiplies by ``gamma`` at each of the
    ``milestones`` (steps).
    """
    if policy not in ("constant", "cosine", "multistep"):
        raise ValueError(f"scheduler policy must be constant, cosine or multistep, not {policy!r}")
    if policy == "cosine" and not total_steps:
        raise ValueError("the cosine policy needs total_steps")
    marks = sorted(milestones)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if policy == "cosine":
            progress = min(1.0, step / total_steps)
            return warm * (
                min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
            )
        if policy == "multistep":
            return warm * gamma ** sum(step >= m for m in marks)
        return warm

    return LambdaLR(optimizer, factor)
