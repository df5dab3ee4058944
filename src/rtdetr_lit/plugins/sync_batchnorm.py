"""Batch norm synchronised over CPU processes (gloo), where ``torch.nn.SyncBatchNorm`` cannot run.

PyTorch's ``SyncBatchNorm`` and its DDP wrapper accept CUDA (and a few accelerator) tensors only,
so ``Trainer(sync_batchnorm=True)`` fails for DDP on CPUs. ``trainer=ddp_sim`` therefore adds the
:class:`SyncBatchNormCPU` Lightning plugin, which converts the batch norm layers to
:class:`AllReduceBatchNorm` instead. On GPUs (``trainer=ddp``) Lightning's own conversion is used.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["AllReduceBatchNorm", "SyncBatchNormCPU"]


class _AllReduce(torch.autograd.Function):
    """Sum over the processes; the gradient of each input is the sum of the output gradients."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable all-reduce (sum) over the default process group."""
    return _AllReduce.apply(tensor)


class AllReduceBatchNorm(_BatchNorm):
    """Batch norm whose training statistics are those of the global batch of all processes.

    Per-channel sums are all-reduced in two passes (sum and count give the mean, then the sum of
    squared deviations gives the variance), as precise as single-process batch norm over the
    whole batch. The all-reduce is differentiable, so every rank's inputs receive the gradient
    of the statistics from all ranks, as with ``torch.nn.SyncBatchNorm``. Running statistics use
    the unbiased global variance. In evaluation, or without a process group of two or more, it is
    plain batch norm. Works for any input rank >= 2 (N, C, ...).
    """

    # The class it replaced, restored by SyncBatchNormCPU.revert.
    plain_class: type[_BatchNorm] = nn.BatchNorm2d

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        synced = self.training and dist.is_available() and dist.is_initialized()
        if not synced or dist.get_world_size() < 2:
            return super().forward(input)
        # Statistics in float32 at least (half-precision inputs under autocast).
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        totals = _all_reduce(torch.cat([x.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centered = x - mean.view(shape)
        var = _all_reduce(centered.square().sum(dims)) / n
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum
                if factor is None:  # cumulative moving average, as in _BatchNorm
                    factor = 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean), factor)
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_var.lerp_(unbiased.to(self.running_var), factor)
        return out.to(input.dtype)


_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _replace(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` holding ``old``'s parameters and buffers (the same tensors) and its mode."""
    # Same names in the same registration order: the optimizer, DDP and the EMA copy keep pairing.
    for name, param in old.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buf in old.named_buffers(recurse=False):
        setattr(new, name, buf)
    return new.train(old.training)


def _convert(module: nn.Module, to_sync: bool) -> nn.Module:
    """``module`` with its plain batch norm layers synchronised, or back (``to_sync=False``)."""
    out = module
    if to_sync and type(module) in _PLAIN:
        out = _replace(module, AllReduceBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        ))  # fmt: skip
        out.plain_class = type(module)
    elif not to_sync and isinstance(module, AllReduceBatchNorm):
        out = _replace(module, module.plain_class(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        ))  # fmt: skip
    for name, child in module.named_children():
        out.add_module(name, _convert(child, to_sync))
    return out


class SyncBatchNormCPU(TorchSyncBatchNorm):
    """Lightning ``sync_batchnorm`` for CPU processes: :class:`AllReduceBatchNorm` layers.

    A subclass of Lightning's plugin, so ``sync_batchnorm: true`` may stay set beside it.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        return _convert(model, to_sync=True)

    def revert(self, model: nn.Module) -> nn.Module:
        return _convert(model, to_sync=False)
