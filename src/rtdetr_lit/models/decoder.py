"""RT-DETRv2 decoder: input projection, query selection, denoising, refining layers
(docs/rtdetrv2.md §4).

Output dict contract of :class:`RTDETRTransformer` (boxes are normalised cxcywh, logits are raw):

- always: ``pred_logits`` (B, Q, classes), ``pred_boxes`` (B, Q, 4) from the final layer in
  training and from layer ``eval_idx`` at inference;
- training only: ``aux_outputs`` (one ``{pred_logits, pred_boxes}`` per layer before the last) and
  ``enc_outputs`` (a one-element list: the selected top-Q encoder logits and sigmoid boxes, with
  gradient, for the IoU-aware selection loss);
- training with targets and denoising enabled: ``dn_outputs`` (one ``{pred_logits, pred_boxes}``
  per layer on the Ndn denoising queries) and ``dn_meta`` (see :class:`DenoisingGroup`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from rtdetr_lit.models.common import MLP, ConvNormLayer, bias_init_with_prob
from rtdetr_lit.models.decoder_layer import TransformerDecoder
from rtdetr_lit.models.denoising import get_contrastive_denoising_training_group

__all__ = ["RTDETRTransformer", "generate_anchors"]


def generate_anchors(
    spatial_shapes: Sequence[tuple[int, int]],
    grid_size: float = 0.05,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor boxes of every memory token, as logits.

    Level ``l`` of size (H, W) has, at pixel (x, y), the box with centre ((x+0.5)/W, (y+0.5)/H)
    and size ``grid_size * 2**l``. A box is valid when all four values are strictly inside
    (0.01, 0.99); invalid anchors are +inf (their tokens are zeroed by the caller).

    Returns:
        ``anchors`` (1, N, 4) float32 logits of normalised cxcywh, ``valid_mask`` (1, N, 1) bool,
        with N = sum(H*W), levels concatenated row-major.
    """
    per_level = []
    for level, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device),
            torch.arange(w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        centre = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], dim=-1)
        size = torch.full_like(centre, grid_size * 2.0**level)
        per_level.append(torch.cat([centre, size], dim=-1).reshape(h * w, 4))
    anchors = torch.cat(per_level)[None]
    valid_mask = ((anchors > 0.01) & (anchors < 0.99)).all(-1, keepdim=True)
    anchors = torch.log(anchors / (1.0 - anchors))
    anchors = anchors.masked_fill(~valid_mask, float("inf"))
    return anchors, valid_mask


class RTDETRTransformer(nn.Module):
    """The detector's decoder head on top of the hybrid encoder's multi-scale maps.

    State-dict keys follow the reference (``tests/reference/*.tsv`` under ``decoder.``):
    ``anchors``/``valid_mask`` (only with ``eval_spatial_size``), ``input_proj.{l}.conv/norm``,
    ``decoder.layers.{i}``, ``denoising_class_embed`` (only with denoising), ``query_pos_head``,
    ``enc_output.proj/norm``, ``enc_score_head``, ``enc_bbox_head``, ``dec_score_head.{i}``,
    ``dec_bbox_head.{i}``.

    Args:
        num_classes: number of object classes (no background logit).
        hidden_dim: decoder width C.
        num_queries: Q, queries selected from the encoder tokens.
        feat_channels: channels of the input maps.
        feat_strides: strides of the input maps (used for the eval-size anchors).
        num_levels: memory levels; extra levels beyond the inputs come from 3x3 stride-2 convs.
        num_points: deformable sampling points per level (int or one per level).
        num_heads, num_layers, dim_feedforward, dropout, activation: decoder layer settings.
        num_denoising, label_noise_ratio, box_noise_scale: contrastive denoising (docs/rtdetrv2.md
        §6);     ``num_denoising=0`` disables it.
        eval_spatial_size: (H, W) input size whose anchors are precomputed as buffers (an int means
            square); other sizes get anchors computed on the fly.
        eval_idx: last decoder layer run at inference (-1 = last); settable later.
        sampling_method: ``"grid_sample"`` or ``"discrete"`` for every cross-attention.
    """

    def __init__(
        self,
        num_classes: int = 80,
        hidden_dim: int = 256,
        num_queries: int = 300,
        feat_channels: Sequence[int] = (256, 256, 256),
        feat_strides: Sequence[int] = (8, 16, 32),
        num_levels: int = 3,
        num_points: int | Sequence[int] = (4, 4, 4),
        num_heads: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        eval_spatial_size: int | Sequence[int] | None = None,
        eval_idx: int = -1,
        sampling_method: str = "grid_sample",
    ) -> None:
        super().__init__()
        if len(feat_channels) != len(feat_strides) or num_levels < len(feat_channels):
            raise ValueError(
                f"need one stride per input map and num_levels >= inputs, got channels "
                f"{feat_channels}, strides {feat_strides}, num_levels {num_levels}"
            )
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_levels = num_levels
        self.num_inputs = len(feat_channels)
        self.num_layers = num_layers
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.sampling_method = sampling_method
        strides = list(feat_strides)
        while len(strides) < num_levels:
            strides.append(strides[-1] * 2)
        self.feat_strides = strides

        self._eval_shapes: list[tuple[int, int]] | None = None
        if eval_spatial_size is not None:
            if isinstance(eval_spatial_size, int):
                eval_spatial_size = (eval_spatial_size, eval_spatial_size)
            eh, ew = (int(v) for v in eval_spatial_size)
            eval_spatial_size = (eh, ew)
            self._eval_shapes = [(int(eh / s), int(ew / s)) for s in strides]
            anchors, valid_mask = generate_anchors(self._eval_shapes)
            self.register_buffer("anchors", anchors)
            self.register_buffer("valid_mask", valid_mask)
        self.eval_spatial_size = eval_spatial_size

        self.input_proj = nn.ModuleList(ConvNormLayer(c, hidden_dim, 1) for c in feat_channels)
        in_ch = feat_channels[-1]
        for _ in range(num_levels - len(feat_channels)):
            self.input_proj.append(ConvNormLayer(in_ch, hidden_dim, 3, stride=2))
            in_ch = hidden_dim

        self.decoder = TransformerDecoder(
            num_layers,
            hidden_dim=hidden_dim,
            num_heads=num_heads,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            activation=activation,
            num_levels=num_levels,
            num_points=num_points,
            sampling_method=sampling_method,
        )
        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(
                num_classes + 1, hidden_dim, padding_idx=num_classes
            )
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2)
        self.enc_output = nn.Sequential(
            OrderedDict(proj=nn.Linear(hidden_dim, hidden_dim), norm=nn.LayerNorm(hidden_dim))
        )
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.dec_score_head = nn.ModuleList(
            nn.Linear(hidden_dim, num_classes) for _ in range(num_layers)
        )
        self.dec_bbox_head = nn.ModuleList(
            MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(num_layers)
        )
        self.eval_idx = eval_idx
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Score biases at prior 0.01, box MLPs start at "no change", Xavier for projections."""
        prior_bias = bias_init_with_prob(0.01)
        for score_head in [self.enc_score_head, *self.dec_score_head]:
            nn.init.constant_(score_head.bias, prior_bias)
        for bbox_head in [self.enc_bbox_head, *self.dec_bbox_head]:
            nn.init.zeros_(bbox_head.layers[-1].weight)
            nn.init.zeros_(bbox_head.layers[-1].bias)
        nn.init.xavier_uniform_(self.enc_output.proj.weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj.conv.weight)

    @property
    def eval_idx(self) -> int:
        """Index of the decoder layer whose prediction is returned at inference (-1 = last)."""
        return self._eval_idx

    @eval_idx.setter
    def eval_idx(self, value: int) -> None:
        if not -self.num_layers <= value < self.num_layers:
            raise ValueError(f"eval_idx {value} out of range for {self.num_layers} decoder layers")
        self._eval_idx = int(value)

    def set_sampling_method(self, method: str, discrete_snap: str | None = None) -> None:
        """Switch every cross-attention to ``"grid_sample"`` or ``"discrete"`` (freezes offsets);
        ``discrete_snap`` (``"reference"``/``"centre"``), when given, sets the pixel rule."""
        for layer in self.decoder.layers:
            layer.cross_attn.set_method(method, discrete_snap)
        self.sampling_method = method

    @property
    def discrete_snap(self) -> str:
        """The pixel rule of discrete sampling (:data:`~.deformable.DISCRETE_SNAPS`)."""
        return self.decoder.layers[0].cross_attn.discrete_snap

    def forward(
        self, feats: Sequence[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
    ) -> dict:
        """Detect from multi-scale maps.

        Args:
            feats: ``len(feat_channels)`` maps (B, C_l, H_l, W_l), finest first.
            targets: training targets, per image ``labels`` (n,) int64 and ``boxes`` (n, 4)
                normalised cxcywh; used only in training, for the denoising queries.

        Returns:
            The output dict described in the module docstring.
        """
        memory, spatial_shapes = self._flatten_levels(feats)
        dn = None
        if self.training and targets is not None and self.num_denoising > 0:
            dn = get_contrastive_denoising_training_group(
                targets,
                self.num_classes,
                self.num_queries,
                self.denoising_class_embed,
                self.num_denoising,
                self.label_noise_ratio,
                self.box_noise_scale,
            )
        content, ref_logits, enc_logits, enc_boxes = self._select_queries(memory, spatial_shapes)
        if dn is not None:
            content = torch.cat([dn.query_content.to(content.dtype), content], dim=1)
            ref_logits = torch.cat([dn.ref_logits.to(ref_logits.dtype), ref_logits], dim=1)
        boxes, logits = self.decoder(
            content,
            ref_logits,
            memory,
            spatial_shapes,
            self.dec_bbox_head,
            self.dec_score_head,
            self.query_pos_head,
            attn_mask=None if dn is None else dn.attn_mask,
            eval_layer=self.eval_idx,
        )
        if not self.training:
            return {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}

        num_dn = 0 if dn is None else dn.meta["dn_num_split"][0]
        out: dict = {
            "pred_logits": logits[-1][:, num_dn:],
            "pred_boxes": boxes[-1][:, num_dn:],
            "aux_outputs": [
                {"pred_logits": lg[:, num_dn:], "pred_boxes": bx[:, num_dn:]}
                for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)
            ],
            "enc_outputs": [{"pred_logits": enc_logits, "pred_boxes": enc_boxes}],
        }
        if dn is not None:
            out["dn_outputs"] = [
                {"pred_logits": lg[:, :num_dn], "pred_boxes": bx[:, :num_dn]}
                for lg, bx in zip(logits, boxes, strict=True)
            ]
            out["dn_meta"] = dn.meta
        return out

    def _flatten_levels(
        self, feats: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Project each map to C and flatten: memory (B, N, C), shapes [(H_l, W_l)] per level."""
        if len(feats) != self.num_inputs:
            raise ValueError(f"expected {self.num_inputs} input maps, got {len(feats)}")
        maps = [proj(f) for proj, f in zip(self.input_proj[: self.num_inputs], feats, strict=True)]
        source = feats[-1]
        for proj in self.input_proj[self.num_inputs :]:
            source = proj(source)
            maps.append(source)
        shapes = [(m.shape[2], m.shape[3]) for m in maps]
        memory = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
        return memory, shapes

    def _anchors_for(
        self, spatial_shapes: list[tuple[int, int]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._eval_shapes is not None and spatial_shapes == self._eval_shapes:
            return self.anchors, self.valid_mask
        return generate_anchors(spatial_shapes, device=device)

    def _select_queries(
        self, memory: torch.Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-Q encoder tokens by best class logit (docs/rtdetrv2.md §4).

        Returns:
            content (B, Q, C) detached, reference logits (B, Q, 4) detached, and the selected
            encoder logits (B, Q, classes) and sigmoid boxes (B, Q, 4) with gradient.
        """
        if memory.shape[1] < self.num_queries:
            raise ValueError(
                f"{memory.shape[1]} memory tokens is fewer than num_queries={self.num_queries}; "
                "use a larger input"
            )
        anchors, valid_mask = self._anchors_for(spatial_shapes, memory.device)
        output_memory = self.enc_output(valid_mask.to(memory.dtype) * memory)
        enc_logits = self.enc_score_head(output_memory)
        topk = torch.topk(enc_logits.max(-1).values, self.num_queries, dim=1).indices  # (B, Q)

        def take(x: torch.Tensor) -> torch.Tensor:
            index = topk.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            return x.expand(topk.shape[0], -1, -1).gather(1, index)  # not len(): ONNX dynamic batch

        # The box head is row-wise: running it on the Q selected tokens only (not all N) gives the
        # same boxes and gradients for a fraction of the cost.
        topk_memory = take(output_memory)
        topk_box_logits = self.enc_bbox_head(topk_memory) + take(anchors)
        return (
            topk_memory.detach(),
            topk_box_logits.detach(),
            take(enc_logits),
            topk_box_logits.sigmoid(),
        )
