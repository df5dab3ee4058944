"""RTDETRTransformer against HF ``RTDetrV2`` (random weights, no download) on the same encoder maps.

HF's decoder part is driven through ``RTDetrV2Model(inputs_embeds=..., encoder_outputs=(maps,))``,
which skips its backbone and encoder. Weights are randomised on the HF side and renamed to ours.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from rtdetr_lit.models.decoder import RTDETRTransformer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

HIDDEN, QUERIES, CLASSES, LAYERS, POINTS, NUM_DN = 32, 20, 5, 3, 2, 10


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The parity bound of the detector issue: 1e-4 absolute (float32 noise; the two models sum
    the sampled values in different orders)."""
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


_RENAMES = [  # HF name pattern -> ours, applied in order
    (r"^model\.decoder_input_proj\.(\d+)\.0\.", r"input_proj.\1.conv."),
    (r"^model\.decoder_input_proj\.(\d+)\.1\.", r"input_proj.\1.norm."),
    (
        r"^model\.decoder\.layers\.(\d+)\.self_attn\.o_proj\.",
        r"decoder.layers.\1.self_attn.out_proj.",
    ),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"decoder.layers.\1.norm1."),
    (
        r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.n_points_scale",
        r"decoder.layers.\1.cross_attn.num_points_scale",
    ),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.", r"decoder.layers.\1.cross_attn."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"decoder.layers.\1.norm2."),
    (r"^model\.decoder\.layers\.(\d+)\.mlp\.fc1\.", r"decoder.layers.\1.linear1."),
    (r"^model\.decoder\.layers\.(\d+)\.mlp\.fc2\.", r"decoder.layers.\1.linear2."),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"decoder.layers.\1.norm3."),
    (r"^model\.decoder\.query_pos_head\.", "query_pos_head."),
    (r"^model\.decoder\.class_embed\.", "dec_score_head."),
    (r"^model\.decoder\.bbox_embed\.", "dec_bbox_head."),
    (r"^model\.enc_output\.0\.", "enc_output.proj."),
    (r"^model\.enc_output\.1\.", "enc_output.norm."),
    (r"^model\.(enc_score_head|enc_bbox_head|denoising_class_embed)\.", r"\1."),
]


def _to_ours(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in hf_state.items():
        if re.match(r"^model\.decoder\.layers\.\d+\.self_attn\.[qkv]_proj\.", key):
            continue  # packed below
        for pattern, repl in _RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
    for i in range(LAYERS):
        prefix = f"model.decoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            qkv = [hf_state[f"{prefix}{p}_proj.{kind}"] for p in "qkv"]
            out[f"decoder.layers.{i}.self_attn.in_proj_{kind}"] = torch.cat(qkv)
    return out


def _build_pair() -> tuple[torch.nn.Module, RTDETRTransformer]:
    from transformers import RTDetrV2Config, RTDetrV2ForObjectDetection

    backbone = {"model_type": "rt_detr_resnet", "embedding_size": 8, "hidden_sizes": [8] * 4,
                "depths": [1] * 4, "layer_type": "basic", "out_indices": [2, 3, 4]}  # fmt: skip
    cfg = RTDetrV2Config(
        backbone_config=backbone, encoder_in_channels=[8, 8, 8], encoder_hidden_dim=HIDDEN,
        encoder_ffn_dim=64, encoder_attention_heads=4, d_model=HIDDEN,
        decoder_in_channels=[HIDDEN] * 3, decoder_ffn_dim=64, decoder_attention_heads=4,
        decoder_layers=LAYERS, decoder_n_points=POINTS, num_queries=QUERIES, num_labels=CLASSES,
        num_denoising=NUM_DN, anchor_image_size=None,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = RTDetrV2ForObjectDetection(cfg)
    with torch.no_grad():  # randomise so that no zero-initialised head hides a difference
        for name, param in hf.model.named_parameters():
            if "backbone" not in name and "encoder." not in name:
                param.normal_(0, 0.3 if param.dim() > 1 else 0.5)
        hf.model.denoising_class_embed.weight[CLASSES] = 0
    ours = RTDETRTransformer(
        num_classes=CLASSES, hidden_dim=HIDDEN, num_queries=QUERIES, feat_channels=[HIDDEN] * 3,
        num_points=POINTS, num_heads=4, num_layers=LAYERS, dim_feedforward=64, num_denoising=NUM_DN,
    )  # fmt: skip
    state = {k: v for k, v in hf.state_dict().items() if k.startswith("model.")}
    ours.load_state_dict(_to_ours(state), strict=True)
    return hf, ours


def _maps(height: int, width: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(2, HIDDEN, height // s, width // s, generator=g) for s in (8, 16, 32)]


def _run_hf(hf, maps, labels=None):
    return hf.model(
        pixel_values=None, inputs_embeds=maps[0], encoder_outputs=(maps,), labels=labels
    )  # fmt: skip


@pytest.mark.parametrize("size", [(64, 64), (64, 128)])
def test_eval_matches_hf(size):
    hf, ours = _build_pair()
    hf.eval()
    ours.eval()
    maps = _maps(*size)
    with torch.no_grad():
        want = _run_hf(hf, maps)
        got = ours(maps)
    _close(got["pred_logits"], want.intermediate_logits[:, -1])
    _close(got["pred_boxes"], want.intermediate_reference_points[:, -1])


def test_training_with_denoising_matches_hf_under_same_seed():
    hf, ours = _build_pair()
    hf.train()
    ours.train()
    maps = _maps(64, 96)
    boxes = [
        torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.1, 0.2]]),
        torch.tensor([[0.5, 0.5, 0.4, 0.4]]),
    ]
    labels = [torch.tensor([1, 4]), torch.tensor([2])]
    torch.manual_seed(123)
    want = _run_hf(
        hf, maps, [{"class_labels": c, "boxes": b} for c, b in zip(labels, boxes, strict=True)]
    )
    torch.manual_seed(123)
    got = ours(maps, [{"labels": c, "boxes": b} for c, b in zip(labels, boxes, strict=True)])

    num_dn = got["dn_meta"]["dn_num_split"][0]
    assert want.denoising_meta_values["dn_num_split"][0] == num_dn
    layers = [
        *got["aux_outputs"],
        {"pred_logits": got["pred_logits"], "pred_boxes": got["pred_boxes"]},
    ]
    for i, (layer, dn) in enumerate(zip(layers, got["dn_outputs"], strict=True)):
        _close(layer["pred_logits"], want.intermediate_logits[:, i, num_dn:])
        _close(layer["pred_boxes"], want.intermediate_reference_points[:, i, num_dn:])
        _close(dn["pred_logits"], want.intermediate_logits[:, i, :num_dn])
        _close(dn["pred_boxes"], want.intermediate_reference_points[:, i, :num_dn])
    (enc,) = got["enc_outputs"]
    _close(enc["pred_logits"], want.enc_topk_logits)
    _close(enc["pred_boxes"], want.enc_topk_bboxes)
