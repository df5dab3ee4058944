"""RTDETRTransformer: reference key layout, anchors, eval_idx, look-forward-twice, edge cases."""

from __future__ import annotations

import pytest
import torch

from rtdetr_lit.models.decoder import RTDETRTransformer, generate_anchors

from ..conftest import reference_layout

NUM_CLASSES = 5


def small_decoder(**kwargs) -> RTDETRTransformer:
    torch.manual_seed(0)
    cfg = dict(
        num_classes=NUM_CLASSES,
        hidden_dim=32,
        num_queries=20,
        feat_channels=(16, 24, 32),
        num_points=(4, 2, 1),
        num_heads=4,
        num_layers=3,
        dim_feedforward=64,
        num_denoising=10,
    )
    cfg.update(kwargs)
    model = RTDETRTransformer(**cfg)
    with torch.no_grad():  # the zero-initialised box heads would hide refinement bugs
        for head in model.dec_bbox_head:
            head.layers[-1].weight.normal_(0, 0.1)
            head.layers[-1].bias.normal_(0, 0.1)
    return model


def feats_for(height: int, width: int, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.randn(batch, c, -(-height // s), -(-width // s), generator=g)
        for c, s in zip((16, 24, 32), (8, 16, 32), strict=True)
    ]


def some_targets() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "labels": torch.tensor([1, 4]),
            "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.1, 0.2]]),
        },
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]


def empty_targets(n: int = 2) -> list[dict[str, torch.Tensor]]:
    return [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * n


@pytest.mark.parametrize(("name", "num_layers"), [("r18", 3), ("r50", 6)])
def test_state_dict_matches_reference_layout(name, num_layers):
    layout = reference_layout(name).items()
    want = [(k.removeprefix("decoder."), v) for k, v in layout if k.startswith("decoder.")]
    model = RTDETRTransformer(num_classes=80, num_layers=num_layers, eval_spatial_size=(640, 640))
    got = [(k, (tuple(v.shape), v.dtype)) for k, v in model.state_dict().items()]
    assert got == want  # names, order, shapes and dtypes


def test_no_anchor_buffers_without_eval_size():
    keys = small_decoder().state_dict().keys()
    assert "anchors" not in keys and "valid_mask" not in keys


def _logit(p: list) -> torch.Tensor:
    p = torch.tensor(p)
    return torch.log(p / (1 - p))


def test_generate_anchors_by_hand_non_square():
    anchors, valid = generate_anchors([(2, 3), (1, 2)])
    want = [[(x + 0.5) / 3, (y + 0.5) / 2, 0.05, 0.05] for y in range(2) for x in range(3)] + [
        [(x + 0.5) / 2, 0.5, 0.1, 0.1] for x in range(2)
    ]
    assert anchors.shape == (1, 8, 4) and valid.shape == (1, 8, 1) and valid.dtype == torch.bool
    assert valid.all()
    torch.testing.assert_close(anchors[0], _logit(want))
    # centres too close to the border and sizes >= 0.99 are invalid and set to +inf
    anchors, valid = generate_anchors([(1, 60), (1, 1)], grid_size=0.5)
    want_valid = [False] + [True] * 58 + [False] + [False]  # level 1 box size 1.0
    assert valid[0, :, 0].tolist() == want_valid
    assert torch.isinf(anchors[0, ~valid[0, :, 0]]).all()
    assert torch.isfinite(anchors[0, valid[0, :, 0]]).all()


def test_eval_size_buffer_used_only_for_matching_inputs():
    model = small_decoder(eval_spatial_size=(64, 96)).eval()
    assert model.anchors.shape == (1, 8 * 12 + 4 * 6 + 2 * 3, 4)
    torch.testing.assert_close(model.anchors, generate_anchors([(8, 12), (4, 6), (2, 3)])[0])
    eval_size, other = feats_for(64, 96), feats_for(96, 64)
    with torch.no_grad():
        before = [model(eval_size)["pred_boxes"], model(other)["pred_boxes"]]
        model.anchors.zero_()  # corrupt the buffer: only eval-size inputs may notice
        after = [model(eval_size)["pred_boxes"], model(other)["pred_boxes"]]
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1], after[1])


def test_eval_output_shapes_and_ranges():
    out = small_decoder().eval()(feats_for(64, 96))
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (2, 20, NUM_CLASSES) and out["pred_boxes"].shape == (
        2,
        20,
        4,
    )
    assert out["pred_boxes"].min() >= 0 and out["pred_boxes"].max() <= 1


def test_eval_idx_runs_only_the_first_layers():
    model = small_decoder()
    calls = []
    model.decoder.layers[1].register_forward_hook(lambda *_: calls.append(1))
    feats = feats_for(64, 64)
    model.train()
    model.input_proj.eval()  # batch-norm statistics as at inference, so both runs see one memory
    with torch.no_grad():
        full = model(feats)  # training runs every layer and reports each
    assert len(calls) == 1
    model.eval()
    model.eval_idx = 0
    with torch.no_grad():
        short = model(feats)
    assert len(calls) == 1  # layer 1 never ran
    torch.testing.assert_close(short["pred_logits"], full["aux_outputs"][0]["pred_logits"])
    torch.testing.assert_close(short["pred_boxes"], full["aux_outputs"][0]["pred_boxes"])
    model.eval_idx = -3
    assert model.eval_idx == -3
    for bad in (3, -4):
        with pytest.raises(ValueError):
            model.eval_idx = bad


def test_look_forward_twice_gradient_reaches_previous_box_head_only():
    model = small_decoder().train()
    out = model(feats_for(64, 64))  # layers 0, 1, 2; pred_boxes comes from layer 2
    out["pred_boxes"].sum().backward()
    grads = [head.layers[-1].bias.grad for head in model.dec_bbox_head]
    assert grads[0] is None or not grads[0].any()  # two steps back: stopped
    assert grads[1] is not None and grads[1].abs().sum() > 0  # one step back: look forward twice
    assert grads[2] is not None and grads[2].abs().sum() > 0


def test_training_outputs_layout():
    model = small_decoder().train()
    out = model(feats_for(64, 96), some_targets())
    assert list(out) == [
        "pred_logits",
        "pred_boxes",
        "aux_outputs",
        "enc_outputs",
        "dn_outputs",
        "dn_meta",
    ]
    groups = 10 // 2
    num_dn = 2 * 2 * groups
    assert out["dn_meta"]["dn_num_split"] == [num_dn, 20]
    assert out["pred_logits"].shape == (2, 20, NUM_CLASSES)
    assert len(out["aux_outputs"]) == 2 and len(out["dn_outputs"]) == 3
    for aux in out["aux_outputs"]:
        assert aux["pred_boxes"].shape == (2, 20, 4)
    for dn in out["dn_outputs"]:
        assert dn["pred_logits"].shape == (2, num_dn, NUM_CLASSES)
        assert dn["pred_boxes"].shape == (2, num_dn, 4)
    (enc,) = out["enc_outputs"]
    assert enc["pred_logits"].shape == (2, 20, NUM_CLASSES) and enc["pred_logits"].requires_grad
    assert enc["pred_boxes"].shape == (2, 20, 4) and enc["pred_boxes"].requires_grad


def _total(out: dict) -> torch.Tensor:
    parts = [out["pred_logits"], out["pred_boxes"]]
    for key in ("aux_outputs", "enc_outputs", "dn_outputs"):
        for o in out.get(key, []):
            parts += [o["pred_logits"], o["pred_boxes"]]
    return sum(p.sum() for p in parts)


@pytest.mark.parametrize("targets", [some_targets()[:1] + empty_targets(1), empty_targets(2)])
def test_training_with_box_free_images_uses_every_parameter(targets):
    model = small_decoder().train()
    out = model(feats_for(64, 64), targets)
    assert "dn_outputs" in out  # same graph whether or not the batch has boxes (DDP)
    _total(out).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_discrete_sampling_leaves_offsets_without_grad():
    model = small_decoder().train()
    model.set_sampling_method("discrete")
    assert all(layer.cross_attn.method == "discrete" for layer in model.decoder.layers)
    _total(model(feats_for(64, 64), some_targets())).backward()
    for layer in model.decoder.layers:
        assert not layer.cross_attn.sampling_offsets.weight.requires_grad
        assert layer.cross_attn.sampling_offsets.weight.grad is None
        assert layer.cross_attn.attention_weights.weight.grad is not None
    model.set_sampling_method("grid_sample")
    assert all(
        layer.cross_attn.sampling_offsets.weight.requires_grad for layer in model.decoder.layers
    )


def test_init_follows_spec():
    model = RTDETRTransformer(num_classes=NUM_CLASSES, hidden_dim=32, num_heads=4, num_layers=2)
    prior = -torch.log(torch.tensor((1 - 0.01) / 0.01))
    for head in [model.enc_score_head, *model.dec_score_head]:
        torch.testing.assert_close(head.bias, prior.expand_as(head.bias))
    for head in [model.enc_bbox_head, *model.dec_bbox_head]:
        assert not head.layers[-1].weight.any() and not head.layers[-1].bias.any()
    assert not model.denoising_class_embed.weight[NUM_CLASSES].any()


def test_extra_levels_and_too_few_tokens():
    model = small_decoder(num_levels=4, num_points=2).eval()
    with torch.no_grad():
        out = model(feats_for(64, 64))
    assert out["pred_boxes"].shape == (2, 20, 4)
    with pytest.raises(ValueError, match="num_queries"):
        small_decoder(num_queries=90).eval()(feats_for(64, 64))  # 64 + 16 + 4 = 84 tokens


def test_discrete_eval_exports_to_onnx_without_grid_sample(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = small_decoder(eval_spatial_size=(64, 96)).eval()
    model.set_sampling_method("discrete")
    with torch.no_grad():
        # a zero box head puts fresh references exactly on pixel centres, where the discrete rule
        # int(x * W + 0.5) is a 1-ulp coin toss between runtimes; trained weights are off-centre
        model.enc_bbox_head.layers[-1].weight.normal_(0, 0.1)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, f0, f1, f2):
            out = self.model([f0, f1, f2])
            return out["pred_logits"], out["pred_boxes"]

    wrap = Wrap().eval()  # export restores the wrapper's mode, which must be eval
    feats = feats_for(64, 96, batch=1)
    path = str(tmp_path / "decoder.onnx")
    torch.onnx.export(wrap, tuple(feats), path, dynamo=False, opset_version=17)
    assert "GridSample" not in {node.op_type for node in onnx.load(path).graph.node}
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {n: f.numpy() for n, f in zip(names, feats, strict=True)})
    with torch.no_grad():
        want = wrap(*feats)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-4, atol=1e-4)
