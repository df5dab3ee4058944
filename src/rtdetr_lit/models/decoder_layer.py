"""Decoder layer and the iterative box-refinement loop over layers (docs/rtdetrv2.md §4)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rtdetr_lit.models.common import get_activation, inverse_sigmoid
from rtdetr_lit.models.deformable import MSDeformableAttention

__all__ = ["TransformerDecoder", "TransformerDecoderLayer"]


class TransformerDecoderLayer(nn.Module):
    """Post-norm layer: self-attention, deformable cross-attention, FFN, each "add then LayerNorm".

    State-dict keys: ``self_attn`` (packed ``in_proj_weight``/``out_proj``), ``norm1``,
    ``cross_attn``, ``norm2``, ``linear1``, ``linear2``, ``norm3``.
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        num_heads: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        num_levels: int = 3,
        num_points: int | Sequence[int] = 4,
        sampling_method: str = "grid_sample",
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.cross_attn = MSDeformableAttention(
            hidden_dim, num_heads, num_levels, num_points, method=sampling_method
        )
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.activation = get_activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(hidden_dim)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(
        self,
        target: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        query_pos: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Update the queries.

        Args:
            target: (B, Nq, C) query features.
            reference_points: (B, Nq, 1, 4) normalised cxcywh reference boxes.
            memory: (B, N, C) flattened multi-scale features.
            spatial_shapes: (H_l, W_l) per level.
            query_pos: (B, Nq, C) positional embedding of the references.
            attn_mask: optional (Nq, Nq) bool, True = query may not attend to that key.

        Returns:
            (B, Nq, C) updated queries.
        """
        q = k = target + query_pos
        attended, _ = self.self_attn(q, k, target, attn_mask=attn_mask, need_weights=False)
        target = self.norm1(target + self.dropout1(attended))
        attended = self.cross_attn(target + query_pos, reference_points, memory, spatial_shapes)
        target = self.norm2(target + self.dropout2(attended))
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(target))))
        return self.norm3(target + self.dropout4(ffn))


class TransformerDecoder(nn.Module):
    """A stack of decoder layers with iterative box refinement (state-dict keys ``layers.{i}``).

    The prediction heads belong to the caller (their keys live at the transformer's top level) and
    are passed to :meth:`forward`.
    """

    def __init__(self, num_layers: int, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(**layer_kwargs) for _ in range(num_layers)
        )

    def forward(
        self,
        target: torch.Tensor,
        ref_logits: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        bbox_heads: nn.ModuleList,
        score_heads: nn.ModuleList,
        query_pos_head: nn.Module,
        attn_mask: torch.Tensor | None = None,
        eval_layer: int = -1,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the layers and predict boxes and class logits.

        In training every layer runs and predicts. At inference only layers ``0..eval_layer`` run
        and only ``eval_layer`` predicts (speed tuning without retraining).

        Args:
            target: (B, Nq, C) initial query content.
            ref_logits: (B, Nq, 4) initial reference boxes as logits of normalised cxcywh (no grad).
            memory, spatial_shapes, attn_mask: see :class:`TransformerDecoderLayer`.
            bbox_heads, score_heads: one box MLP (C -> 4) and one Linear (C -> classes) per layer.
            query_pos_head: MLP 4 -> C embedding the current reference box.
            eval_layer: index of the last layer to run at inference (negative counts from the end).

        Returns:
            ``(boxes, logits)``: lists over the predicting layers of (B, Nq, 4) normalised cxcywh
            boxes and (B, Nq, classes) logits.
        """
        num_layers = len(self.layers)
        last = num_layers - 1 if self.training else eval_layer % num_layers
        ref = ref_logits.sigmoid()
        prev_box: torch.Tensor | None = None
        boxes: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers[: last + 1]):
            pos = query_pos_head(ref)
            target = layer(target, ref.unsqueeze(2), memory, spatial_shapes, pos, attn_mask)
            delta = bbox_heads[i](target)
            box = torch.sigmoid(delta + inverse_sigmoid(ref))
            if self.training:
                logits.append(score_heads[i](target))
                # "look forward twice": the loss of layer i also trains layer i-1's box head,
                # because the reported box refines the previous box *with* its gradient
                boxes.append(
                    box if prev_box is None else torch.sigmoid(delta + inverse_sigmoid(prev_box))
                )
            elif i == last:
                logits.append(score_heads[i](target))
                boxes.append(box)
            prev_box = box
            # the next layer refines a constant reference: gradients stop after one step back
            ref = box.detach()
        return boxes, logits
