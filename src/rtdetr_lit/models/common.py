"""Small building blocks shared by the backbone, the encoder and the decoder.

Module attribute names here (``conv``/``norm``, ``layers``) fix the state-dict keys, which follow
the reference checkpoint layout (``tests/reference/*.tsv``) so that reference weights load by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = [
    "MLP",
    "ConvNormLayer",
    "bias_init_with_prob",
    "dense_grad",
    "freeze_batch_norm",
    "fuse_conv_norm",
    "get_activation",
    "inverse_sigmoid",
]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def get_activation(name: str | None) -> nn.Module:
    """Return a fresh activation module for ``name`` (``None`` means identity)."""
    key = "identity" if name is None else name.lower()
    if key not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[key]()


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Logit of ``x`` after clamping it to [0, 1]; ``eps`` bounds both log arguments from below."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def bias_init_with_prob(prior_prob: float = 0.01) -> float:
    """Bias that makes ``sigmoid(bias) == prior_prob`` (focal-loss style classifier init)."""
    return -math.log((1.0 - prior_prob) / prior_prob)


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward hands on the gradient dense, in the memory layout of the tensor
    it came from (channels-last or contiguous). A gradient that arrives as a strided view (a
    channel slice of a ``torch.cat``, or one level's rows of the decoder's flattened memory) would
    otherwise reach BatchNorm's backward, which is several times slower on strided gradients
    than a copy plus its dense kernel (BENCHMARKS.md, Training step)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        ctx.layout = torch.channels_last if channels_last else torch.contiguous_format
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=ctx.layout)


def dense_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``, with its gradient made dense on the way back (:class:`_DenseGrad`). Use it on a
    tensor whose consumer hands back a strided gradient (a ``torch.cat`` input) when the
    producer's backward is slow on one (BatchNorm, nearest upsampling)."""
    return _DenseGrad.apply(x) if x.requires_grad else x


class ConvNormLayer(nn.Module):
    """Conv2d (no bias by default) -> BatchNorm2d -> activation.

    ``padding=None`` means "same" padding for odd kernels: ``(kernel_size - 1) // 2``. In training,
    the gradient reaching the activation and the norm is made dense first (:func:`dense_grad`).
    """

    def __init__(
        self,
        ch_in: int,
        ch_out: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        bias: bool = False,
        act: str | None = None,
    ) -> None:
        super().__init__()
        pad = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=pad, bias=bias)
        self.norm = nn.BatchNorm2d(ch_out)
        self.act = get_activation(act)
        if isinstance(self.act, nn.ReLU):  # nothing needs the normalised values before the ReLU
            self.act.inplace = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_grad(self.act(self.norm(self.conv(x))))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ``act`` between them (none after the last).

    Input (..., in_dim) -> output (..., out_dim). Layers are ``self.layers[i]``.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, act: str = "relu"
    ) -> None:
        super().__init__()
        dims_in = [in_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = self.act(x)
        return x


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` below ``module`` (or ``module`` itself) by a frozen copy.

    The frozen norm keeps affine parameters and running statistics as buffers (eps 1e-5), so it
    holds no trainable parameters and its state dict has no ``num_batches_tracked``.
    """
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        frozen.weight.copy_(module.weight.detach())
        frozen.bias.copy_(module.bias.detach())
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new_child = freeze_batch_norm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


@torch.no_grad()
def fuse_conv_norm(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    """Return a new Conv2d with bias computing ``norm(conv(x))`` for an eval-mode norm.

    ``norm`` is a ``BatchNorm2d`` or ``FrozenBatchNorm2d``; its running statistics and affine
    parameters are folded into the weight and bias. The result has the conv's device and dtype.
    """
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    fused.bias.copy_(norm.bias + (conv_bias - norm.running_mean) * scale)
    return fused
