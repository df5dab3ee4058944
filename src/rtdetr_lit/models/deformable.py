"""Multi-scale deformable attention with a distinct number of sampling points per level
(docs/rtdetrv2.md §5).

Each query samples ``num_points[l]`` locations on level ``l`` per head, around its reference box,
and mixes the sampled values with weights that are softmax-normalised jointly over all points of
all levels. Two samplers are available: bilinear ``grid_sample`` (training) and ``discrete``
nearest-pixel gathering (fine-tuning and deployment: it exports to ONNX without GridSample).

Which pixel is "nearest" is the ``discrete_snap`` rule. ``"reference"`` (default) is the reference
code's (and HF's) ``int(x * W + 0.5)``: under the pixel geometry of ``grid_sample`` with
``align_corners=False`` (pixel ``i`` covers ``[i, i + 1) / W``) it reads the pixel half a pixel to
the right of and below the location; released discrete weights were fine-tuned with it.
``"centre"`` reads the pixel whose centre is nearest, i.e. the one bilinear sampling weighs most,
so a grid-trained model switched without fine-tuning keeps more of its accuracy.

Both samplers mix before they project. A point's value is a weighted sum of memory rows (one
pixel, or the four around it), and ``value_proj`` is affine, so for each head
``sum_k a_k (W m_k + b) = W (sum_k a_k m_k) + b sum_k a_k``: the module mixes the raw memory rows
of each head's points and projects the 300-odd mixtures per head, instead of running
``value_proj`` over all N memory tokens (``sum_k a_k`` is 1 for discrete sampling; for bilinear
sampling it is less where a point's corners fall outside the map). Eager mixing is one
``embedding_bag``. In an ONNX export, where ``embedding_bag`` would become a Loop, discrete mixing
is a Gather and a MatMul. Bilinear sampling mixes first only where its four reads per point are
few next to N (large maps, see ``MSDeformableAttention._mix_bilinear_first``); otherwise, and in
an ONNX export, it projects first and uses ``grid_sample``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DISCRETE_SNAPS",
    "SAMPLING_METHODS",
    "MSDeformableAttention",
    "bilinear_corners",
    "discrete_tokens",
    "mix_then_project",
    "sample_grid",
]

SAMPLING_METHODS = ("grid_sample", "discrete")
# added to ``x * W`` before truncation: the reference code's rule, and the pixel-centre rule
DISCRETE_SNAPS = {"reference": 0.5, "centre": 0.0}


def sample_grid(value: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling with zero padding (``align_corners=False``).

    Args:
        value: (N, D, H, W) feature map.
        loc: (N, Q, K, 2) normalised (x, y) locations, 0 and 1 being the outer pixel edges.

    Returns:
        (N, D, Q, K) sampled features.
    """
    grid = (2.0 * loc - 1.0).to(value.dtype)
    return F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def discrete_tokens(
    loc: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    points_per_level: Sequence[int],
    snap: str = "reference",
) -> torch.Tensor:
    """The memory token each point reads under nearest-pixel sampling.

    A point of level ``l`` reads the pixel ``(int(x * W_l + s), int(y * H_l + s))`` (truncation
    toward zero), clamped into the map, with ``s = DISCRETE_SNAPS[snap]``: 0.5 for the reference
    code's pixel (``"reference"``), 0 for the pixel whose centre is nearest (``"centre"``). The
    graph needs only Cast/Min/Max-style ops (ONNX without GridSample).

    Args:
        loc: (B, Q, heads, P, 2) normalised (x, y) locations, points ordered level by level.
        spatial_shapes: (H_l, W_l) per level; levels are flattened row-major and concatenated.
        points_per_level: the point count of each level (sums to P).
        snap: ``"reference"`` or ``"centre"`` (see the module docstring).

    Returns:
        (B, Q, heads, P) int64 positions in the flattened memory of one image.
    """
    shift = DISCRETE_SNAPS[snap]
    width, height, first, loc = _point_table(loc, spatial_shapes, points_per_level)
    ix = torch.minimum((loc[..., 0] * width + shift).to(torch.int64).clamp(min=0), width - 1)
    iy = torch.minimum((loc[..., 1] * height + shift).to(torch.int64).clamp(min=0), height - 1)
    return first + iy * width + ix


def bilinear_corners(
    loc: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    points_per_level: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The four memory tokens around each location and their bilinear weights, as
    ``grid_sample(..., align_corners=False, padding_mode="zeros")`` weighs them: a corner outside
    the map weighs 0 (its token is clamped into the map so that it can still be read). The
    weights are differentiable in ``loc``.

    Args:
        loc: (B, Q, heads, P, 2) normalised (x, y) locations, points ordered level by level.
        spatial_shapes: (H_l, W_l) per level; levels are flattened row-major and concatenated.
        points_per_level: the point count of each level (sums to P).

    Returns:
        (B, Q, heads, P, 4) int64 positions in the flattened memory of one image, and their
        (B, Q, heads, P, 4) weights (float32, or float64 for float64 locations).
    """
    width, height, first, loc = _point_table(loc, spatial_shapes, points_per_level)
    width, height, first = width[:, None], height[:, None], first[:, None]  # (P, 1): x the corners
    px = loc[..., 0, None] * width - 0.5  # pixel centres at integers
    py = loc[..., 1, None] * height - 0.5
    x0, y0 = px.floor(), py.floor()
    fx, fy = px - x0, py - y0  # (..., P, 1)
    corner = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]], device=loc.device)
    xs = x0.to(torch.int64) + corner[:, 0]  # (..., P, 4)
    ys = y0.to(torch.int64) + corner[:, 1]
    wx = torch.where(corner[:, 0] == 1, fx, 1.0 - fx)
    wy = torch.where(corner[:, 1] == 1, fy, 1.0 - fy)
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    token = first + ys.clamp(min=0).minimum(height - 1) * width + xs.clamp(min=0).minimum(width - 1)
    return token, wx * wy * inside


def mix_then_project(
    memory: torch.Tensor, token: torch.Tensor, weights: torch.Tensor, proj: nn.Linear
) -> torch.Tensor:
    """Attention output before ``output_proj``: per head, ``W_h (sum_k a_k m_k) + b_h sum_k a_k``
    over the memory rows ``m_k`` its points read with weights ``a_k``. Equal to projecting all of
    ``memory`` first and then mixing (see the module docstring), at a fraction of the cost.

    Args:
        memory: (B, N, C) raw memory, before the value projection.
        token: (B, Q, heads, K) positions in one image's memory (:func:`discrete_tokens`, or
            :func:`bilinear_corners` with the corner axis flattened into K).
        weights: (B, Q, heads, K) weight of each row: attention weight times sampling weight.
        proj: the value projection (C -> C, heads * d output channels head by head).

    Returns:
        (B, Q, heads, d) per-head outputs.
    """
    bsz, num_v, dim = memory.shape
    _, num_q, heads, reads = token.shape
    rows = token + torch.arange(bsz, device=token.device).reshape(bsz, 1, 1, 1) * num_v
    table, weights = memory.reshape(bsz * num_v, dim), weights.to(memory.dtype)
    if torch.onnx.is_in_onnx_export():
        picked = table.index_select(0, rows.flatten()).reshape(bsz, num_q, heads, reads, dim)
        mixed = (weights.unsqueeze(-2) @ picked).squeeze(-2)
    else:  # the same sums without materialising the (B, Q, heads, K, C) rows
        mixed = _MixRows.apply(table, rows.reshape(-1, reads), weights.reshape(-1, reads))
        mixed = mixed.reshape(bsz, num_q, heads, dim)
    weight = proj.weight.reshape(heads, dim // heads, dim).to(mixed.dtype)
    bias = proj.bias.reshape(heads, dim // heads).to(mixed.dtype)
    return torch.einsum("bqhc,hdc->bqhd", mixed, weight) + bias * weights.sum(-1, keepdim=True)


class _MixRows(torch.autograd.Function):
    """``embedding_bag(rows, table, mode="sum", per_sample_weights=weights)`` for 2-D ``rows``
    (one bag of K reads per row), with a faster gradient for ``table``.

    The gradient of a table row is the weighted sum of the output gradients of the bags that read
    it: an embedding_bag again, over the reads sorted by the row they read. On the CPU that is
    several times faster than ``embedding_bag``'s own backward, which zero-fills the whole table
    gradient and then accumulates read by read: in an r18 training step at 640 px, the mixing's
    backward went from about 7% of the step to 2% (BENCHMARKS.md "Training step"). The weights'
    gradient is embedding_bag's own.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor):
        ctx.save_for_backward(table, rows, weights)
        return F.embedding_bag(rows, table, mode="sum", per_sample_weights=weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        table, rows, weights = ctx.saved_tensors
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            # stable: the same sum order every time
            read_rows, order = rows.flatten().sort(stable=True)
            first_read = torch.searchsorted(read_rows, torch.arange(len(table), device=rows.device))
            grad_table = F.embedding_bag(
                order // rows.shape[1],  # the bag of each read, reads grouped by table row
                grad,
                first_read,
                mode="sum",
                per_sample_weights=weights.flatten()[order],
            )
        if ctx.needs_input_grad[2]:
            with torch.enable_grad():
                leaf = weights.detach().requires_grad_()
                out = F.embedding_bag(rows, table.detach(), mode="sum", per_sample_weights=leaf)
            (grad_weights,) = torch.autograd.grad(out, leaf, grad)
        return grad_table, None, grad_weights


def _point_levels(
    spatial_shapes: Sequence[tuple[int, int]], points_per_level: Sequence[int]
) -> list[tuple[int, int, int]]:
    """(W_l, H_l, index of the level's first token) for every point, points level by level."""
    rows, first = [], 0
    for (h, w), n in zip(spatial_shapes, points_per_level, strict=True):
        rows += [(w, h, first)] * n
        first = first + h * w  # not +=: while tracing for export the sizes are tensors
    return rows


def _point_table(
    loc: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    points_per_level: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each point's ``W_l``, ``H_l`` and first token of its level as three (P,) int64 tensors,
    and ``loc`` in at least float32, so that fp16 rounding under autocast cannot move a location
    to another pixel."""
    table = torch.tensor(_point_levels(spatial_shapes, points_per_level), device=loc.device)
    return (*table.unbind(-1), loc.to(torch.promote_types(loc.dtype, torch.float32)))


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
        points = [num_points] * num_levels if isinstance(num_points, int) else list(num_points)
        if len(points) != num_levels or min(points) < 1:
            raise ValueError(
                f"num_points {num_points!r} must give >= 1 point for each of {num_levels} levels"
            )
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
        rows by the C x C projection, then grid_sample reads one head's channels. Measured on a
        2-core CPU, one layer forward and backward (with :class:`_MixRows`): mixing is 1.7-2.4x
        faster at 640 px (8400 tokens, C 256, 300-500 queries) and 1.5x slower at 192 px (756
        tokens, C 128, 200 queries); the crossover is where the rows read, times 4, reach N x C."""
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
