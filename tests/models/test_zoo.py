"""create_model for every size: docs/rtdetrv2.md §1 parameter counts, reference layout, forward,
backward."""

from __future__ import annotations

import pytest
import torch

from rtdetr_lit import create_model
from rtdetr_lit.models import MODEL_SIZES

from ..conftest import reference_layout

# docs/rtdetrv2.md §1: exact parameter totals of the reference modules with 80 classes.
SPEC_PARAMS = {
    "r18": 20_184_464,
    "r34": 31_441_668,
    "r50m": 36_593_772,
    "r50": 42_891_372,
    "r101": 76_556_268,
}
ZOO = sorted(SPEC_PARAMS)


def _targets() -> list[dict[str, torch.Tensor]]:
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.4, 0.2]])
    return [
        {"labels": torch.tensor([1, 3]), "boxes": boxes},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Add noise to every parameter: the zero-initialised heads would hide differences."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("name", ZOO)
def test_parameter_count_matches_spec(name: str) -> None:
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == SPEC_PARAMS[name]


@pytest.mark.parametrize("name", ["r18", "r50"])
def test_state_dict_is_the_reference_layout(name: str) -> None:
    expected = reference_layout(name)
    got = {k: (tuple(v.shape), v.dtype) for k, v in create_model(name).state_dict().items()}
    assert sorted(got) == sorted(expected)
    assert got == expected


@pytest.mark.parametrize("name", ZOO)
def test_forward_and_backward_every_size(name: str) -> None:
    torch.manual_seed(0)
    # Few queries keep this quick; 96x96 gives 144 + 36 + 9 memory tokens.
    q = 64
    model = create_model(name, num_classes=5, eval_spatial_size=(96, 96), num_queries=q).train()
    images = torch.rand(2, 3, 96, 96)
    out = model(images, _targets())
    assert out["pred_logits"].shape == (2, q, 5) and out["pred_boxes"].shape == (2, q, 4)
    assert len(out["aux_outputs"]) == MODEL_SIZES[name].num_decoder_layers - 1
    assert len(out["dn_outputs"]) == MODEL_SIZES[name].num_decoder_layers
    loss = sum(
        o["pred_logits"].sigmoid().mean() + o["pred_boxes"].mean()
        for o in [out, *out["aux_outputs"], *out["enc_outputs"], *out["dn_outputs"]]
    )
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    # Only the denoising padding row can stay without gradient; every layer must learn.
    assert not no_grad, no_grad[:5]
    frozen = MODEL_SIZES[name].freeze_at >= 0
    assert all(not p.requires_grad for p in model.backbone.conv1.parameters()) == frozen

    model.eval()
    with torch.no_grad():
        pred = model(images)
    assert set(pred) == {"pred_logits", "pred_boxes"}
    assert ((pred["pred_boxes"] >= 0) & (pred["pred_boxes"] <= 1)).all()


def test_discrete_mode_gives_offsets_no_gradient() -> None:
    torch.manual_seed(0)
    model = create_model("r18", num_classes=5, sampling_method="discrete", num_queries=50).train()
    out = model(torch.rand(1, 3, 96, 128), _targets()[:1])
    (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
    for layer in model.decoder.decoder.layers:
        assert not layer.cross_attn.sampling_offsets.weight.requires_grad
        assert layer.cross_attn.sampling_offsets.weight.grad is None
        assert layer.cross_attn.attention_weights.weight.grad is not None


def test_training_batch_without_any_object() -> None:
    model = create_model("r18", num_classes=5, num_queries=50).train()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    out = model(torch.rand(2, 3, 64, 64), empty)
    assert out["pred_logits"].shape == (2, 50, 5)
    (out["pred_logits"].sum() + sum(o["pred_boxes"].sum() for o in out["dn_outputs"])).backward()


def test_switches_keep_the_state_dict_keys() -> None:
    torch.manual_seed(0)
    model = _perturb(create_model("r18", num_classes=5, num_queries=50).eval())
    keys = list(model.state_dict())
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        grid = model(images)
        model.set_sampling_method("discrete")
        discrete = model(images)
    assert list(model.state_dict()) == keys and model.sampling_method == "discrete"
    assert not torch.allclose(grid["pred_boxes"], discrete["pred_boxes"])
    model.set_sampling_method("grid_sample")
    assert all(p.requires_grad for p in model.decoder.parameters())
    with torch.no_grad():
        assert torch.equal(model(images)["pred_boxes"], grid["pred_boxes"])


def test_discrete_snap_reaches_every_cross_attention_and_survives_switches() -> None:
    def snaps(model):
        return {layer.cross_attn.discrete_snap for layer in model.decoder.decoder.layers}

    model = create_model("r18", num_classes=5, num_queries=50, discrete_snap="centre")
    assert snaps(model) == {"centre"} and model.discrete_snap == "centre"
    model.set_sampling_method("discrete")  # switching the method keeps the rule
    assert snaps(model) == {"centre"}
    model.set_sampling_method("discrete", discrete_snap="reference")
    assert snaps(model) == {"reference"}
    assert create_model("r18", num_classes=5, num_queries=50).discrete_snap == "reference"
    with pytest.raises(ValueError, match="discrete_snap"):
        create_model("r18", num_classes=5, discrete_snap="up")


def test_eval_idx_can_change_on_a_built_model() -> None:
    torch.manual_seed(0)
    model = _perturb(create_model("r18", num_classes=5, num_queries=50).eval())
    images = torch.rand(1, 3, 64, 64)
    ran: list[int] = []
    for i, layer in enumerate(model.decoder.decoder.layers):
        layer.register_forward_hook(lambda *_, i=i: ran.append(i))
    with torch.no_grad():
        full = model(images)
        model.eval_idx = 0
        first = model(images)
    assert ran == [0, 1, 2, 0]
    assert not torch.allclose(full["pred_boxes"], first["pred_boxes"])
    with pytest.raises(ValueError):
        model.eval_idx = 3


def test_create_model_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown model 'r99'"):
        create_model("r99")
    with pytest.raises(TypeError, match="hiden_dim"):
        create_model("r18", hiden_dim=3)
    with pytest.raises(ValueError, match="one positive count per feature level"):
        create_model("r18", num_points=[4, 4])
    with pytest.raises(ValueError, match="multiples of 32"):
        create_model("r18", eval_spatial_size=(100, 100))


def test_input_size_must_be_a_multiple_of_32() -> None:
    model = create_model("r18", num_classes=5, num_queries=50).eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 100, 96))


def test_deploy_fusion_keeps_the_outputs() -> None:
    torch.manual_seed(0)
    model = _perturb(create_model("r18", num_classes=5, num_queries=50).eval())
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    images = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        before = model(images)
        after = model.deploy()(images)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(after["pred_logits"], before["pred_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after["pred_boxes"], before["pred_boxes"], atol=1e-5, rtol=1e-4)


def test_channels_last_layout_keeps_the_outputs() -> None:
    """The default NHWC layout computes what NCHW does, its feature maps stay NHWC, and deploy()
    keeps the layout for the fused convolutions."""
    torch.manual_seed(0)
    nchw = _perturb(create_model("r18", 5, num_queries=50, channels_last=False).eval())
    nhwc = create_model("r18", 5, num_queries=50).eval()
    nhwc.load_state_dict(nchw.state_dict())
    assert nhwc.channels_last and not nchw.channels_last
    images = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        feats = nhwc.backbone(images)
        assert all(f.is_contiguous(memory_format=torch.channels_last) for f in feats)
        want, got = nchw(images), nhwc(images)
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4)
        fused = nhwc.deploy()(images)
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    torch.testing.assert_close(fused["pred_logits"], want["pred_logits"], atol=1e-4, rtol=1e-4)
