"""Efficient hybrid encoder of RT-DETRv2 (docs/rtdetrv2.md §3).

Attention runs only inside the coarsest map (AIFI); cross-scale fusion is convolutional (CCFF: a
top-down then a bottom-up path of CSPRepLayers). Attribute names fix the state-dict keys to the
reference layout (``input_proj``, ``encoder.0.layers.0``, ``lateral_convs``, ``fpn_blocks``,
``downsample_convs``, ``pan_blocks``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rtdetr_lit.models.common import ConvNormLayer, dense_grad, fuse_conv_norm, get_activation

__all__ = [
    "AIFILayer",
    "CSPRepLayer",
    "HybridEncoder",
    "RepVggBlock",
    "TransformerEncoder",
    "sincos_pos_embed_2d",
]


def sincos_pos_embed_2d(
    height: int,
    width: int,
    dim: int,
    temperature: float = 10000.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """2-D sin-cos positional embedding for a row-major flattened (height, width) grid.

    With ``D = dim // 4`` and ``omega_d = 1 / temperature ** (d / D)``, the token at row ``y`` and
    column ``x`` (index ``y * width + x``) gets
    ``[sin(y * omega), cos(y * omega), sin(x * omega), cos(x * omega)]``.

    Returns float32 (1, height * width, dim).
    """
    if dim % 4 != 0:
        raise ValueError(f"embedding dim must be divisible by 4 for a 2-D sin-cos embedding: {dim}")
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float32, device=device) / quarter
    omega = 1.0 / temperature**omega
    rows = torch.arange(height, dtype=torch.float32, device=device)
    cols = torch.arange(width, dtype=torch.float32, device=device)
    grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")  # (H, W) each
    angle_y = grid_y.reshape(-1, 1) * omega  # (H*W, D)
    angle_x = grid_x.reshape(-1, 1) * omega
    embed = torch.cat([angle_y.sin(), angle_y.cos(), angle_x.sin(), angle_x.cos()], dim=1)
    return embed.unsqueeze(0)


class AIFILayer(nn.Module):
    """Post-norm transformer encoder layer: q = k = x + pos, v = x; then an FFN.

    ``forward(x, pos)``: x (B, N, C) tokens, pos (1 or B, N, C) -> (B, N, C).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        dropout: float = 0.0,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(
            d_model, num_heads, dropout=dropout, batch_first=True
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = get_activation(activation)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = k = x + pos
        attn = self.self_attn(q, k, value=x, need_weights=False)[0]
        x = self.norm1(x + self.dropout1(attn))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.norm2(x + self.dropout2(ffn))


class TransformerEncoder(nn.Module):
    """A stack of :class:`AIFILayer` sharing one positional embedding. (B, N, C) -> (B, N, C)."""

    def __init__(self, layers: Sequence[AIFILayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pos)
        return x


class RepVggBlock(nn.Module):
    """3x3 conv-BN plus 1x1 conv-BN, summed, then the activation.

    (B, ch_in, H, W) -> (B, ch_out, H, W).

    :meth:`fuse` re-parameterises both branches into one 3x3 conv with bias (exact in eval mode).
    """

    def __init__(self, ch_in: int, ch_out: int, act: str = "silu") -> None:
        super().__init__()
        self.conv1 = ConvNormLayer(ch_in, ch_out, 3, 1, padding=1)
        self.conv2 = ConvNormLayer(ch_in, ch_out, 1, 1, padding=0)
        self.act = get_activation(act)
        self.conv: nn.Conv2d | None = None  # set by fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    @torch.no_grad()
    def fuse(self) -> None:
        """Replace both branches by one 3x3 conv (uses the norms' running statistics)."""
        if self.conv is not None:
            return
        conv3 = fuse_conv_norm(self.conv1.conv, self.conv1.norm)
        conv1 = fuse_conv_norm(self.conv2.conv, self.conv2.norm)
        # A 1x1 kernel equals a 3x3 kernel that is zero except at its centre.
        conv3.weight.add_(F.pad(conv1.weight, [1, 1, 1, 1]))
        conv3.bias.add_(conv1.bias)
        self.conv = conv3
        del self.conv1, self.conv2


class CSPRepLayer(nn.Module):
    """CSP block: two 1x1 branches of width ``int(ch_out * expansion)``, one through RepVGG blocks,
    added, then a 1x1 conv to ``ch_out`` (identity when the width already equals ``ch_out``).

    (B, ch_in, H, W) -> (B, ch_out, H, W).
    """

    def __init__(
        self,
        ch_in: int,
        ch_out: int,
        num_blocks: int = 3,
        expansion: float = 1.0,
        act: str = "silu",
    ) -> None:
        super().__init__()
        hidden = int(ch_out * expansion)
        self.conv1 = ConvNormLayer(ch_in, hidden, 1, act=act)
        self.conv2 = ConvNormLayer(ch_in, hidden, 1, act=act)
        self.bottlenecks = nn.Sequential(
            *(RepVggBlock(hidden, hidden, act) for _ in range(num_blocks))
        )
        # No conv3 parameters when widths match: expansion-1.0 reference checkpoints have none.
        self.conv3 = (
            ConvNormLayer(hidden, ch_out, 1, act=act) if hidden != ch_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class HybridEncoder(nn.Module):
    """AIFI on the levels in ``use_encoder_idx`` (the stride-32 map), then CCFF.

    ``forward(feats)``: backbone maps, finest first, each (B, in_channels[l], H / s_l, W / s_l)
    with ``s_l = feat_strides[l]``; returns a list of the same number of maps
    (B, hidden_dim, H / s_l, W / s_l). Consecutive levels must differ by exactly 2x in size (true
    whenever the image sides are multiples of the coarsest stride).

    The positional embedding for ``eval_spatial_size`` (H, W of the image) is computed once and
    cached; other sizes (multi-scale training, arbitrary inference sizes) compute it on the fly.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        feat_strides: Sequence[int] = (8, 16, 32),
        hidden_dim: int = 256,
        num_heads: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        enc_act: str = "gelu",
        use_encoder_idx: Sequence[int] = (2,),
        num_encoder_layers: int = 1,
        pe_temperature: float = 10000.0,
        expansion: float = 1.0,
        depth_mult: float = 1.0,
        act: str = "silu",
        eval_spatial_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(feat_strides):
            raise ValueError(f"in_channels {in_channels} and feat_strides {feat_strides} differ")
        self.in_channels = list(in_channels)
        self.feat_strides = list(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = list(use_encoder_idx)
        self.pe_temperature = pe_temperature
        self.eval_spatial_size = eval_spatial_size
        self.out_channels = [hidden_dim] * len(in_channels)
        self.out_strides = list(feat_strides)

        self.input_proj = nn.ModuleList(ConvNormLayer(c, hidden_dim, 1) for c in in_channels)
        self.encoder = nn.ModuleList(
            TransformerEncoder(
                [
                    AIFILayer(hidden_dim, num_heads, dim_feedforward, dropout, enc_act)
                    for _ in range(num_encoder_layers)
                ]
            )
            for _ in self.use_encoder_idx
        )

        num_blocks = round(3 * depth_mult)
        levels = len(in_channels)
        self.lateral_convs = nn.ModuleList(
            ConvNormLayer(hidden_dim, hidden_dim, 1, act=act) for _ in range(levels - 1)
        )
        self.fpn_blocks = nn.ModuleList(
            CSPRepLayer(2 * hidden_dim, hidden_dim, num_blocks, expansion, act)
            for _ in range(levels - 1)
        )
        self.downsample_convs = nn.ModuleList(
            ConvNormLayer(hidden_dim, hidden_dim, 3, 2, act=act) for _ in range(levels - 1)
        )
        self.pan_blocks = nn.ModuleList(
            CSPRepLayer(2 * hidden_dim, hidden_dim, num_blocks, expansion, act)
            for _ in range(levels - 1)
        )

        # Plain attributes, not buffers: they stay out of the state dict (the reference has none).
        self._pos_cache: dict[int, torch.Tensor] = {}
        if eval_spatial_size is not None:
            for idx in self.use_encoder_idx:
                stride = self.feat_strides[idx]
                grid = (eval_spatial_size[0] // stride, eval_spatial_size[1] // stride)
                self._pos_cache[idx] = sincos_pos_embed_2d(*grid, hidden_dim, pe_temperature)

    def _pos_embed(self, level: int, height: int, width: int, ref: torch.Tensor) -> torch.Tensor:
        """Positional embedding (1, height * width, hidden_dim) on ``ref``'s device and dtype."""
        cached = self._pos_cache.get(level)
        if cached is None or not self._is_eval_grid(level, height, width):
            return sincos_pos_embed_2d(
                height, width, self.hidden_dim, self.pe_temperature, ref.device
            ).to(ref.dtype)
        if cached.device != ref.device:
            # Moved lazily: plain attributes do not follow module.to().
            cached = cached.to(ref.device)
            self._pos_cache[level] = cached
        return cached.to(ref.dtype)

    def _is_eval_grid(self, level: int, height: int, width: int) -> bool:
        if self.eval_spatial_size is None:
            return False
        stride = self.feat_strides[level]
        return (height, width) == (
            self.eval_spatial_size[0] // stride,
            self.eval_spatial_size[1] // stride,
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(feats)}")
        proj = [layer(f) for layer, f in zip(self.input_proj, feats, strict=True)]

        for encoder, level in zip(self.encoder, self.use_encoder_idx, strict=True):
            b, c, h, w = proj[level].shape
            tokens = proj[level].flatten(2).transpose(1, 2)  # (B, H*W, C), row-major
            tokens = encoder(tokens, self._pos_embed(level, h, w, tokens))
            proj[level] = tokens.transpose(1, 2).reshape(b, c, h, w)

        # Top-down: inner[0] is always the coarsest map processed so far.
        levels = len(proj)
        inner = [proj[-1]]
        for k, level in enumerate(range(levels - 2, -1, -1)):
            coarse = self.lateral_convs[k](inner[0])
            inner[0] = coarse  # the lateral output is what the bottom-up path sees
            up = dense_grad(F.interpolate(coarse, scale_factor=2.0, mode="nearest"))
            inner.insert(0, self.fpn_blocks[k](torch.cat([up, proj[level]], dim=1)))

        # Bottom-up.
        outs = [inner[0]]
        for k in range(levels - 1):
            down = self.downsample_convs[k](outs[-1])
            outs.append(self.pan_blocks[k](torch.cat([down, inner[k + 1]], dim=1)))
        return outs
