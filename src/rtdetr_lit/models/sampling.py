"""The sampling kernels of deformable attention: where its points read, and how reads are mixed.

Two samplers are available: bilinear ``grid_sample`` (training) and ``discrete`` nearest-pixel
gathering (fine-tuning and deployment: it exports to ONNX without GridSample).

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
few next to N (large maps, see ``MSDeformableAttention._mix_bilinear_first`` in
:mod:`rtdetr_lit.models.deformable`); otherwise, and in an ONNX export, it projects first and uses
``grid_sample``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DISCRETE_SNAPS",
    "SAMPLING_METHODS",
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
    it: an embedding_bag again, over the reads sorted by the row they read. On the CPU that beats
    ``embedding_bag``'s own backward, which zero-fills the whole table gradient and then
    accumulates read by read (see BENCHMARKS.md, Training step). The weights' gradient is
    embedding_bag's own.
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


def _point_levels(
    spatial_shapes: Sequence[tuple[int, int]], points_per_level: Sequence[int]
) -> list[tuple[int, int, int]]:
    """(W_l, H_l, index of the level's first token) for every point, points level by level."""
    rows, first = [], 0
    for (h, w), n in zip(spatial_shapes, points_per_level, strict=True):
        rows += [(w, h, first)] * n
        first = first + h * w  # not +=: while tracing for export the sizes are tensors
    return rows
