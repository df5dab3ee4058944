"""Whole-model parity with HF ``RTDetrV2ForObjectDetection`` through our HF converter.

HF models are built from configs (never downloaded) and randomised: every weight is perturbed so
that no head or sampling offset stays at its zero init, and every BatchNorm gets eval statistics
near the real statistics of its input (calibrated on other images, then jittered), so that the
activations neither explode nor collapse into tied top-K scores. The weights reach our model only
through :func:`rtdetr_lit.convert.convert_hf_state_dict`; a strict load then proves the layouts
agree, and the outputs prove the two forwards compute the same function.

Component-level parity (decoder alone, encoder alone, backbone alone, one deformable attention)
lives in test_decoder_hf.py, test_encoder.py, test_backbone.py and test_deformable.py.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from rtdetr_lit import create_model
from rtdetr_lit.convert import convert_hf_state_dict
from rtdetr_lit.models.detector import RTDETR

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

NUM_CLASSES = 80
ATOL = 1e-4  # float32 noise on logits of magnitude ~10 and on boxes in [0, 1]
_HF_METHOD = {"grid_sample": "default", "discrete": "discrete"}


def _hf_config(name: str, method: str) -> transformers.RTDetrV2Config:
    """HF's spelling of our ``r18`` (S) or ``r50`` (L, HF's default config)."""
    extra = {"num_labels": NUM_CLASSES, "decoder_method": _HF_METHOD[method]}
    if name == "r50":
        return transformers.RTDetrV2Config(**extra)
    backbone = transformers.RTDetrResNetConfig(
        depths=[2, 2, 2, 2],
        layer_type="basic",
        hidden_sizes=[64, 128, 256, 512],
        out_indices=[2, 3, 4],
    )
    return transformers.RTDetrV2Config(
        backbone_config=backbone,
        encoder_in_channels=[128, 256, 512],
        hidden_expansion=0.5,
        decoder_layers=3,
        freeze_backbone_batch_norms=False,  # S trains its backbone BN (docs/rtdetrv2.md §2)
        **extra,
    )


def _is_norm(module: nn.Module) -> bool:
    """BatchNorm2d or HF's frozen BN (both hold 1-D ``running_var``; LayerNorm holds none)."""
    return getattr(module, "running_var", None) is not None


@torch.no_grad()
def _randomise(hf: nn.Module, seed: int) -> None:
    """Perturb every float tensor of ``hf`` and give each BN non-trivial eval statistics."""
    gen = torch.Generator().manual_seed(seed)
    for key, tensor in hf.state_dict().items():
        if not tensor.is_floating_point() or "running_" in key or key.endswith("n_points_scale"):
            continue
        if tensor.dim() > 1:  # about unit gain per layer, so heads and offsets matter
            fan_in = math.prod(tensor.shape[1:])
            tensor.add_(torch.randn(tensor.shape, generator=gen) / (2 * math.sqrt(fan_in)))
        else:
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=gen))

    def calibrate(norm: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        # Runs before the norm in the same pass, so later norms see calibrated inputs.
        x = args[0]
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
        noise = torch.randn(mean.shape, generator=gen)
        norm.running_mean.copy_(mean + 0.2 * var.sqrt() * noise)
        norm.running_var.copy_(var * torch.empty_like(var).uniform_(0.5, 2.0, generator=gen))

    hooks = [m.register_forward_pre_hook(calibrate) for m in hf.modules() if _is_norm(m)]
    hf.eval()
    hf(pixel_values=torch.rand(2, 3, 128, 128, generator=gen))
    for hook in hooks:
        hook.remove()


_HF_STATES: dict[str, dict[str, torch.Tensor]] = {}


def _hf_state(name: str) -> dict[str, torch.Tensor]:
    """The randomised HF state dict of ``name`` (built once per session)."""
    if name not in _HF_STATES:
        torch.manual_seed(0)
        hf = transformers.RTDetrV2ForObjectDetection(_hf_config(name, "grid_sample"))
        _randomise(hf, seed=1)
        _HF_STATES[name] = hf.state_dict()
    return _HF_STATES[name]


def _pair(
    name: str, method: str, eval_size: tuple[int, int] = (640, 640)
) -> tuple[nn.Module, RTDETR]:
    """HF model and ours with the same weights; ours got them through the converter only."""
    hf_state = _hf_state(name)
    hf = transformers.RTDetrV2ForObjectDetection(_hf_config(name, method))
    hf.load_state_dict(hf_state, strict=True)
    # HF runs NCHW; in the same layout ours does the same arithmetic, so the outputs agree query by
    # query. (NHWC changes the last bits of the features, which can swap queries whose encoder
    # scores tie exactly in these random weights; test_zoo checks NHWC against NCHW.)
    ours = create_model(name, NUM_CLASSES, eval_spatial_size=eval_size, channels_last=False)
    ours.set_sampling_method(method)  # HF's discrete pixel rule is the reference's, our default
    result = convert_hf_state_dict(hf_state, name, target=ours.state_dict())
    ours.load_state_dict(result.state_dict, strict=True)
    assert sorted(result.filled) == ["decoder.anchors", "decoder.valid_mask"]
    assert result.skipped == []
    return hf, ours


def _images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(3))


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str, ties: int = 0) -> None:
    """Equal within ``ATOL``, except for at most ``ties`` queries (rows of the last-but-one dim)."""
    assert got.shape == want.shape, what
    diff = (got - want).abs()
    if ties:
        per_query = diff.amax(-1).flatten()
        assert int((per_query > ATOL).sum()) <= ties, f"{what}: {per_query.topk(ties + 1)}"
        return
    assert diff.max().item() <= ATOL, f"{what}: max abs diff {diff.max().item():.3g} > {ATOL}"


# (name, method, input H x W, our eval size). A matching eval size exercises the cached anchors and
# positional embedding; 640 makes ours compute both for the input size, as HF always does. HF is
# row-major correct for non-square inputs (unlike the reference, docs/rtdetrv2.md §3): 128x192 must
# agree too.
EVAL_CASES = [
    ("r18", "grid_sample", (128, 128), (128, 128)),
    ("r18", "discrete", (128, 128), (128, 128)),
    ("r18", "grid_sample", (128, 192), (640, 640)),
    ("r18", "discrete", (128, 192), (640, 640)),
    ("r50", "grid_sample", (128, 128), (640, 640)),
    ("r50", "discrete", (128, 128), (128, 128)),
]


@pytest.mark.parametrize(("name", "method", "size", "eval_size"), EVAL_CASES)
def test_eval_outputs_match_hf(name, method, size, eval_size):
    hf, ours = _pair(name, method, eval_size)
    hf.eval()
    ours.eval()
    images = _images(2 if name == "r18" else 1, *size)
    with torch.no_grad():
        want = hf(pixel_values=images)
        got = ours(images)
    _assert_close(got["pred_logits"], want.logits, "logits")
    _assert_close(got["pred_boxes"], want.pred_boxes, "boxes")
    # the queries were picked by near-tied scores would show up here, not as a mystery above
    assert want.logits.abs().max() > 1.0 and want.pred_boxes.std() > 0.05


def test_deployed_model_matches_hf():
    """RepVGG re-parameterisation and conv+BN folding keep HF's outputs (r18, grid_sample)."""
    hf, ours = _pair("r18", "grid_sample")
    hf.eval()
    ours.deploy()
    images = _images(1, 128, 128)
    with torch.no_grad():
        want = hf(pixel_values=images)
        got = ours(images)
    _assert_close(got["pred_logits"], want.logits, "logits")
    _assert_close(got["pred_boxes"], want.pred_boxes, "boxes")


def _targets() -> list[dict[str, torch.Tensor]]:
    """Three boxes and one box: padding, label noise and several groups all take part."""
    return [
        {
            "labels": torch.tensor([3, 17, 79]),
            "boxes": torch.tensor(
                [[0.30, 0.40, 0.20, 0.30], [0.70, 0.60, 0.10, 0.20], [0.5, 0.5, 0.8, 0.9]]
            ),
        },
        {"labels": torch.tensor([42]), "boxes": torch.tensor([[0.45, 0.55, 0.40, 0.35]])},
    ]


@pytest.mark.parametrize(("name", "method"), [("r18", "grid_sample"), ("r50", "discrete")])
def test_training_outputs_with_denoising_match_hf(name, method):
    """Same seed before each forward (docs/rtdetrv2.md §6 draw order): final, aux, encoder and dn
    outputs."""
    hf, ours = _pair(name, method)
    hf.train()
    ours.train()
    images = _images(2, 128, 128)
    targets = _targets()
    hf_labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    torch.manual_seed(123)
    want = hf(pixel_values=images, labels=hf_labels)
    torch.manual_seed(123)
    got = ours(images, targets)

    meta, hf_meta = got["dn_meta"], want.denoising_meta_values
    num_dn = meta["dn_num_split"][0]
    assert list(meta["dn_num_split"]) == list(hf_meta["dn_num_split"]) == [num_dn, 300]
    assert meta["dn_num_group"] == hf_meta["dn_num_group"] == 100 // 3
    for idx, hf_idx in zip(meta["dn_positive_idx"], hf_meta["dn_positive_idx"], strict=True):
        assert torch.equal(idx, hf_idx)

    layers = [*got["aux_outputs"], {k: got[k] for k in ("pred_logits", "pred_boxes")}]
    assert len(layers) == len(got["dn_outputs"]) == want.intermediate_logits.shape[1]
    # Discrete sampling rounds each point to a pixel. Both models agree to float noise (~5e-6)
    # before the rounding, so the rare point within that noise of a pixel boundary can round the
    # other way and change its query: on an AVX2-only EPYC one of these 2 x (300 + dn) queries
    # does, at the last layer. One such query per output is allowed; a real difference changes
    # most of them.
    ties = 1 if method == "discrete" else 0
    for i, (match, dn) in enumerate(zip(layers, got["dn_outputs"], strict=True)):
        hf_logits = want.intermediate_logits[:, i]
        hf_boxes = want.intermediate_reference_points[:, i]
        _assert_close(match["pred_logits"], hf_logits[:, num_dn:], f"layer {i} logits", ties)
        _assert_close(match["pred_boxes"], hf_boxes[:, num_dn:], f"layer {i} boxes", ties)
        _assert_close(dn["pred_logits"], hf_logits[:, :num_dn], f"layer {i} dn logits", ties)
        _assert_close(dn["pred_boxes"], hf_boxes[:, :num_dn], f"layer {i} dn boxes", ties)
    (enc,) = got["enc_outputs"]
    _assert_close(enc["pred_logits"], want.enc_topk_logits, "encoder logits")
    _assert_close(enc["pred_boxes"], want.enc_topk_bboxes, "encoder boxes")
    assert torch.isfinite(want.loss)  # HF's own loss ran on these outputs


def test_look_forward_twice_is_where_hf_differs():
    """docs/rtdetrv2.md §4: layer 1's box loss trains layer 0's box head in ours (reference), not in
    HF.

    The forward values are identical (previous box and detached reference hold the same numbers,
    see the training test); only the gradient path differs.
    """
    hf, ours = _pair("r18", "grid_sample")
    hf.train()
    ours.train()
    images = _images(1, 128, 128)
    torch.manual_seed(0)
    ours(images)["aux_outputs"][1]["pred_boxes"].sum().backward()
    hf_out = hf.model(pixel_values=images)  # no labels: no denoising, no loss
    hf_out.intermediate_reference_points[:, 1].sum().backward()

    ours_grad = ours.decoder.dec_bbox_head[0].layers[-1].weight.grad
    hf_grad = hf.model.decoder.bbox_embed[0].layers[-1].weight.grad
    assert ours_grad is not None and ours_grad.abs().sum() > 0
    assert hf_grad is None or not hf_grad.any()
    # both still train layer 1's own head
    assert ours.decoder.dec_bbox_head[1].layers[-1].weight.grad.abs().sum() > 0
    assert hf.model.decoder.bbox_embed[1].layers[-1].weight.grad.abs().sum() > 0
