"""Multi-scale deformable attention with a distinct number of sampling points per level
(docs/rtdetrv2.md §5).

Each query samples ``num_points[l]`` locations on level ``l`` per head, around its reference box,
and mixes the sampled values with weights that are softmax-normalised jointly over all points of
all levels. The samplers (bilinear ``grid_sample`` and ``discrete`` nearest-pixel gathering), the
``discrete_snap`` pixel rule and the mixing of raw memory rows before ``value_proj`` are the
kernels of :mod:`rtdetr_lit.models.sampling`, whose docstring explains them; this module picks
the path: discrete sampling always mixes first, bilinear sampling only on large maps
(``MSDeformableAttention._mix_bilinear_first``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from rtdetr_lit.models.sampling import (
    DISCRETE_SNAPS,
    SAMPLING_METHODS,
    _point_levels,
    bilinear_corners,
    discrete_tokens,
    mix_then_project,
    sample_grid,
)

__all__ = ["DISCRETE_SNAPS", "SAMPLING_METHODS", "MSDeformableAttention", "check_num_points"]


class MSDeformableAttention(nn.Module):
    """Multi-scale deformable cross-attention (RT-DETRv2 variant).

    State-dict keys: ``num_points_scale`` (buffer, length P = sum(num_points), ``1/n_l`` for every
    point of level ``l``), ``sampling_offsets`` (Linear C -> heads*P*2), ``attention_weights``
    (Linear C -> heads*P), ``value_proj`` and ``output_proj`` (Linear C -> C). Points are ordered
    level 0's first; offsets are laid out as (heads, P, 2).

    Args:
        embed_dim: channel width C (divisible by ``num_heads``).
        num_heads: attention heads.
        num_levels: number of feature levels.
        num_points: sampling points per level, one int for all levels or one per level.
        method: ``"grid_sample"`` or ``"discrete"`` (see :meth:`set_method`).
        discrete_snap: the pixel rule of discrete sampling, ``"reference"`` or ``"centre"``.
        offset_scale: factor on the box-relative offsets (0.5: an offset of 1 reaches the box edge
            for a single-point level).
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 3,
        num_points: int | Sequence[int] = 4,
        method: str = "grid_sample",
        offset_scale: float = 0.5,
        discrete_snap: str = "reference",
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        points = list(check_num_points(num_points, num_levels))
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points_list = points
        self.total_points = sum(points)
        self.offset_scale = offset_scale

        scale = [1.0 / n for n in points for _ in range(n)]
        self.register_buffer("num_points_scale", torch.tensor(scale, dtype=torch.float32))
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * self.total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * self.total_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()
        self.set_method(method, discrete_snap)

    def reset_parameters(self) -> None:
        """docs/rtdetrv2.md §5 init: one direction per head, the k-th point of a level at distance
        k+1."""
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(self._offset_bias_init())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def _offset_bias_init(self) -> torch.Tensor:
        # Computed in float64 on the CPU (MPS has no float64), then copied into the bias wherever
        # it lives.
        f64 = {"dtype": torch.float64, "device": "cpu"}
        theta = torch.arange(self.num_heads, **f64) * (2.0 * math.pi / self.num_heads)
        direction = torch.stack([theta.cos(), theta.sin()], dim=-1)
        direction = direction / direction.abs().max(dim=-1, keepdim=True).values  # (heads, 2)
        rank_in_level = torch.tensor(
            [k + 1 for n in self.num_points_list for k in range(n)], **f64
        )  # (P,)
        bias = direction[:, None, :] * rank_in_level[None, :, None]  # (heads, P, 2)
        return bias.flatten().to(torch.float32)

    def set_method(self, method: str, discrete_snap: str | None = None) -> None:
        """Switch the sampler; ``"discrete"`` freezes ``sampling_offsets`` (it gets no gradient).
        ``discrete_snap`` (``"reference"`` or ``"centre"``) replaces the pixel rule when given."""
        if method not in SAMPLING_METHODS:
            raise ValueError(
                f"unknown sampling method {method!r}; choose one of {SAMPLING_METHODS}"
            )
        if discrete_snap is not None:
            if discrete_snap not in DISCRETE_SNAPS:
                raise ValueError(
                    f"unknown discrete_snap {discrete_snap!r}; choose one of {list(DISCRETE_SNAPS)}"
                )
            self.discrete_snap = discrete_snap
        self.method = method
        self.sampling_offsets.requires_grad_(method != "discrete")

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """Attend from each query to points sampled around its reference.

        Args:
            query: (B, Q, C) query features (positional embedding already added).
            reference_points: (B, Q, 1, 4) normalised cxcywh boxes, or (B, Q, 1, 2) normalised
                (x, y) points; the level axis may be omitted. With points, an offset of 1 moves one
                pixel of that level.
            value: (B, N, C) flattened multi-scale memory, levels concatenated row-major,
                N = sum(H_l * W_l).
            spatial_shapes: (H_l, W_l) per level, as python ints.

        Returns:
            (B, Q, C) attended features.
        """
        if len(spatial_shapes) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels, got {len(spatial_shapes)}")
        bsz, num_q, _ = query.shape
        num_v = value.shape[1]
        heads, head_dim, total = self.num_heads, self.embed_dim // self.num_heads, self.total_points

        offsets = self.sampling_offsets(query).reshape(bsz, num_q, heads, total, 2)
        weights = self.attention_weights(query).reshape(bsz, num_q, heads, total).softmax(-1)

        if reference_points.dim() == 3:
            reference_points = reference_points.unsqueeze(2)
        ref = reference_points[:, :, :, None, :]  # (B, Q, 1, 1, 2 or 4)
        if ref.shape[-1] == 4:
            scale = self.num_points_scale.to(offsets.dtype)[:, None]  # (P, 1)
            loc = ref[..., :2] + offsets * scale * ref[..., 2:] * self.offset_scale
        elif ref.shape[-1] == 2:
            loc = ref + offsets / self._per_point_size(spatial_shapes, offsets)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 values, got {ref.shape[-1]}")

        if self.method == "discrete":
            token = discrete_tokens(loc, spatial_shapes, self.num_points_list, self.discrete_snap)
            mix = weights
        elif self._mix_bilinear_first(num_q, num_v):
            token, corner_weights = bilinear_corners(loc, spatial_shapes, self.num_points_list)
            token = token.flatten(-2)
            mix = (weights[..., None] * corner_weights).flatten(-2)  # (B, Q, heads, P * 4)
        else:  # project all memory first, then bilinear grid_sample
            value = self.value_proj(value).reshape(bsz, num_v, heads, head_dim)
            sampled = self._sample_grid(value, loc, spatial_shapes)  # (B*heads, head_dim, Q, P)
            weights = weights.permute(0, 2, 1, 3).reshape(bsz * heads, 1, num_q, total)
            out = (sampled * weights).sum(-1)  # (B*heads, head_dim, Q)
            return self.output_proj(out.reshape(bsz, heads * head_dim, num_q).transpose(1, 2))
        out = mix_then_project(value, token, mix, self.value_proj)  # (B, Q, heads, head_dim)
        return self.output_proj(out.reshape(bsz, num_q, heads * head_dim))

    def _mix_bilinear_first(self, num_q: int, num_v: int) -> bool:
        """Whether bilinear sampling mixes memory rows before the projection (eager only).

        Mixing reads 4 rows per point and query; projecting first multiplies all ``num_v`` memory
        rows by the C x C projection, then grid_sample reads one head's channels. For one layer's
        forward and backward, mixing wins on large maps (640 px, 8400 tokens of 256 channels) and
        loses on small ones (192 px, 756 tokens of 128 channels): the crossover is where the rows
        read, times 4, reach N x C (see BENCHMARKS.md, Training step)."""
        reads = num_q * self.num_heads * 4 * self.total_points
        return not torch.onnx.is_in_onnx_export() and 4 * reads <= num_v * self.embed_dim

    def _per_point_size(
        self, spatial_shapes: Sequence[tuple[int, int]], like: torch.Tensor
    ) -> torch.Tensor:
        """(P, 2) level width/height of every point, to turn pixel offsets into normalised ones."""
        sizes = [
            (float(w), float(h)) for w, h, _ in _point_levels(spatial_shapes, self.num_points_list)
        ]
        return torch.tensor(sizes, dtype=like.dtype, device=like.device)

    def _sample_grid(
        self, value: torch.Tensor, loc: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """value (B, N, heads, d) and loc (B, Q, heads, P, 2) -> (B*heads, d, Q, P), all levels."""
        bsz, _, heads, head_dim = value.shape
        value_levels = value.split([h * w for h, w in spatial_shapes], dim=1)
        loc_levels = loc.permute(0, 2, 1, 3, 4).flatten(0, 1).split(self.num_points_list, dim=2)
        sampled = []
        for (h, w), v, lc in zip(spatial_shapes, value_levels, loc_levels, strict=True):
            # (B, HW, heads, d) -> (B*heads, d, H, W)
            v = v.permute(0, 2, 3, 1).reshape(bsz * heads, head_dim, h, w)
            sampled.append(sample_grid(v, lc))
        return torch.cat(sampled, dim=-1)


def check_num_points(num_points: int | Sequence[int], num_levels: int = 3) -> tuple[int, ...]:
    """The sampling point count of every feature level, as a tuple.

    Args:
        num_points: one count for all levels, or one count per level.
        num_levels: the number of feature levels.

    Raises:
        ValueError: another number of counts than levels, or a count below 1.
    """
    if isinstance(num_points, int):
        points = (num_points,) * num_levels
    else:
        points = tuple(int(n) for n in num_points)
    if len(points) != num_levels or any(n < 1 for n in points):
        raise ValueError(
            f"num_points needs one positive count per feature level ({num_levels}), got {points}"
        )
    return points
