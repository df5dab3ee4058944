"""HybridEncoder: reference state-dict layout, positional embedding by hand, parity with HF."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from rtdetr_lit.models import common
from rtdetr_lit.models import encoder as encoder_module
from rtdetr_lit.models.backbone import PResNet
from rtdetr_lit.models.encoder import HybridEncoder, sincos_pos_embed_2d

from ..conftest import reference_shapes

# (reference size, backbone channels, CSP expansion) of S and L (docs/rtdetrv2.md §1).
CONFIGS = [("r18", [128, 256, 512], 0.5), ("r50", [512, 1024, 2048], 1.0)]


def _randomise_norms(module: nn.Module) -> None:
    """Non-trivial BN statistics so that eval-mode tests exercise the normalisation."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1.0, 1.0)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize(("size", "channels", "expansion"), CONFIGS)
def test_state_dict_matches_reference(size: str, channels: list, expansion: float) -> None:
    reference = reference_shapes(size, "encoder.")
    model = HybridEncoder(channels, expansion=expansion, eval_spatial_size=(640, 640))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(ours.keys() - reference.keys()) == []
    assert sorted(reference.keys() - ours.keys()) == []
    assert ours == reference
    assert any(".conv3." in k for k in ours) == (expansion != 1.0)


def test_pos_embed_by_hand_non_square() -> None:
    """H=2, W=3, dim=8: D=2, omega = (1, 1/100); token y*W+x = [sin y, sin y/100, cos y, ...]."""
    got = sincos_pos_embed_2d(2, 3, 8, temperature=10000.0)
    assert got.shape == (1, 6, 8)
    assert got.dtype == torch.float32
    expected = []
    for y in range(2):
        for x in range(3):
            expected.append(
                [
                    math.sin(y * 1.0),
                    math.sin(y / 100.0),
                    math.cos(y * 1.0),
                    math.cos(y / 100.0),
                    math.sin(x * 1.0),
                    math.sin(x / 100.0),
                    math.cos(x * 1.0),
                    math.cos(x / 100.0),
                ]
            )
    torch.testing.assert_close(got[0], torch.tensor(expected), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(2, 2, 6)


def test_pos_embed_cache_for_eval_size() -> None:
    """The cache holds the stride-32 grid of the (non-square) eval size; other sizes recompute."""
    model = HybridEncoder([8, 16, 32], hidden_dim=32, num_heads=4, eval_spatial_size=(64, 96))
    cached = model._pos_cache[2]
    torch.testing.assert_close(cached, sincos_pos_embed_2d(2, 3, 32), rtol=0, atol=0)
    ref = torch.zeros(1)
    assert model._pos_embed(2, 2, 3, ref) is cached
    other = model._pos_embed(2, 3, 2, ref)
    torch.testing.assert_close(other, sincos_pos_embed_2d(3, 2, 32), rtol=0, atol=0)


def test_output_shapes_from_images_96x160() -> None:
    torch.manual_seed(0)
    backbone = PResNet(18)
    encoder = HybridEncoder(backbone.out_channels, expansion=0.5, eval_spatial_size=(96, 160))
    outs = encoder(backbone(torch.randn(2, 3, 96, 160)))
    assert [tuple(o.shape) for o in outs] == [(2, 256, 12, 20), (2, 256, 6, 10), (2, 256, 3, 5)]
    assert encoder.out_channels == [256, 256, 256]
    assert encoder.out_strides == [8, 16, 32]
    outs[0].sum().backward()
    assert encoder.encoder[0].layers[0].self_attn.in_proj_weight.grad is not None


class _GradLayouts(TorchDispatchMode):
    """Records, per backward op of interest, whether each incoming gradient was dense."""

    OPS = ("native_batch_norm_backward", "upsample_nearest2d_backward")

    def __init__(self) -> None:
        super().__init__()
        self.dense: dict[str, list[bool]] = {op: [] for op in self.OPS}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.dense:
            grad = args[0]
            self.dense[name].append(
                grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last)
            )
        return func(*args, **kwargs or {})


def test_backward_kernels_get_dense_gradients_with_unchanged_values(monkeypatch) -> None:
    """The FPN's ``torch.cat`` hands each input a strided channel slice as its gradient;
    ``dense_grad`` (in ``ConvNormLayer`` and on the upsampled map) copies it dense before
    BatchNorm's and nearest upsampling's backward, both slow on strided gradients, without
    changing a value."""
    torch.manual_seed(0)
    encoder = HybridEncoder([16, 32, 64], hidden_dim=32, num_heads=2, dim_feedforward=64)
    # float64: the dense and the strided kernels sum in different orders
    encoder = encoder.double().to(memory_format=torch.channels_last).train()
    feats = [
        torch.randn(2, c, s, s, dtype=torch.float64)
        .contiguous(memory_format=torch.channels_last)
        .requires_grad_()
        for c, s in ((16, 16), (32, 8), (64, 4))
    ]

    def run() -> tuple[dict[str, list[bool]], list[torch.Tensor]]:
        encoder.zero_grad()
        outs = encoder(feats)
        with _GradLayouts() as layouts:
            torch.autograd.backward(
                outs, [torch.cos(torch.arange(o.numel())).view_as(o) for o in outs]
            )
        grads = [f.grad.clone() for f in feats] + [p.grad.clone() for p in encoder.parameters()]
        for f in feats:
            f.grad = None
        return layouts.dense, grads

    dense, grads = run()
    assert len(dense["native_batch_norm_backward"]) == len(
        [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    )
    assert len(dense["upsample_nearest2d_backward"]) == 2
    assert all(dense["native_batch_norm_backward"] + dense["upsample_nearest2d_backward"])

    identity = lambda x: x  # noqa: E731
    monkeypatch.setattr(common, "dense_grad", identity)
    monkeypatch.setattr(encoder_module, "dense_grad", identity)
    plain_dense, plain_grads = run()
    # what the densifying undoes: strided slices reach both kernels
    assert not all(plain_dense["native_batch_norm_backward"])
    assert not all(plain_dense["upsample_nearest2d_backward"])
    for a, b in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b)


def _to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder state dict -> keys of transformers' RTDetrV2Model (input proj + encoder)."""
    out = {}
    for key, value in state.items():
        m = re.match(r"input_proj\.(\d+)\.(conv|norm)\.(.+)", key)
        if m:
            out[f"encoder_input_proj.{m[1]}.{0 if m[2] == 'conv' else 1}.{m[3]}"] = value
            continue
        key = ("encoder." + key).replace("encoder.encoder.", "encoder.aifi.")
        m = re.match(r"(.+\.self_attn)\.in_proj_(weight|bias)", key)
        if m:  # we pack q, k, v like the reference; HF splits them
            for name, part in zip("qkv", value.chunk(3), strict=True):
                out[f"{m[1]}.{name}_proj.{m[2]}"] = part
            continue
        for ours, theirs in [
            ("self_attn.out_proj", "self_attn.o_proj"),
            ("linear1", "mlp.fc1"),
            ("linear2", "mlp.fc2"),
            ("norm1", "self_attn_layer_norm"),
            ("norm2", "final_layer_norm"),
        ]:
            key = key.replace(f".{ours}.", f".{theirs}.")
        out[key] = value
    return out


@pytest.mark.parametrize(
    ("channels", "expansion", "eval_size"),
    [([128, 256, 512], 0.5, (96, 160)), ([512, 1024, 2048], 1.0, None)],  # cached / on the fly
)
def test_matches_hf_hybrid_encoder(
    channels: list, expansion: float, eval_size: tuple[int, int] | None
) -> None:
    """Same weights -> same three maps as HF's RT-DETRv2 encoder, on a non-square input."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import RTDetrResNetConfig, RTDetrV2Config, RTDetrV2Model

    torch.manual_seed(0)
    ours = HybridEncoder(channels, expansion=expansion, eval_spatial_size=eval_size).eval()
    _randomise_norms(ours)
    # HF sizes its input projections from the backbone's channels; the backbone itself is unused.
    tiny_backbone = RTDetrResNetConfig(
        layer_type="basic", depths=[1, 1, 1, 1], hidden_sizes=[8, *channels], out_indices=[2, 3, 4]
    )
    config = RTDetrV2Config(
        backbone_config=tiny_backbone,
        encoder_in_channels=channels,
        hidden_expansion=expansion,
        decoder_layers=1,
        freeze_backbone_batch_norms=False,
    )
    hf = RTDetrV2Model(config).eval()
    result = hf.load_state_dict(_to_hf(ours.state_dict()), strict=False)
    assert result.unexpected_keys == []
    assert not [k for k in result.missing_keys if k.startswith(("encoder.", "encoder_input_proj"))]

    # 96x160: stride-32 map 3x5, so a transposed positional embedding would show up.
    feats = [
        torch.randn(2, c, 96 // s, 160 // s) for c, s in zip(channels, [8, 16, 32], strict=True)
    ]
    with torch.no_grad():
        got = ours(feats)
        proj = [hf.encoder_input_proj[i](f) for i, f in enumerate(feats)]
        expected = hf.encoder(inputs_embeds=proj).last_hidden_state
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_bf16_autocast_forward() -> None:
    torch.manual_seed(0)
    model = HybridEncoder([16, 32, 64], hidden_dim=32, num_heads=4, dim_feedforward=64).eval()
    feats = [
        torch.randn(1, c, 64 // s, 96 // s) for c, s in zip([16, 32, 64], [8, 16, 32], strict=True)
    ]
    with torch.no_grad():
        ref = model(feats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(feats)
    for r, lo in zip(ref, low, strict=True):
        assert torch.isfinite(lo).all()
        torch.testing.assert_close(lo.float(), r, rtol=0.1, atol=0.1 * r.abs().max().item())
