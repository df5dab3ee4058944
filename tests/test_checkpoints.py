"""Checkpoint loading and conversion: reference containers, HF key rules, safe loading, the CLI.

Reference layouts come from the reference state-dict listings (name, shape, dtype per line); HF
models are built from configs with random weights, never downloaded.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from rtdetr_lit.checkpoints import extract_state_dict, load_checkpoint_file
from rtdetr_lit.convert import (
    convert_hf_state_dict,
    convert_reference_state_dict,
    main,
    to_hf_state_dict,
)

from .conftest import random_state, reference_layout

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_CLASS_KEYS = {
    "decoder.enc_score_head.weight",
    "decoder.enc_score_head.bias",
    "decoder.denoising_class_embed.weight",
    *(f"decoder.dec_score_head.{i}.{p}" for i in range(3) for p in ("weight", "bias")),
}


def _assert_same(result: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(result) == set(expected)
    bad = [k for k in expected if not torch.equal(result[k], expected[k])]
    assert not bad, f"values differ at {bad[:5]}"


@pytest.fixture(scope="module")
def r18_layout():
    return reference_layout("r18")


@pytest.fixture(scope="module")
def r18_source(r18_layout):
    return random_state(r18_layout, seed=1)


@pytest.fixture(scope="module")
def r18_target(r18_layout):
    return random_state(r18_layout, seed=2)


# (a) reference checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("container", ["full", "ema_only", "bare", "ours", "ddp", "model_only"])
def test_reference_containers(container, r18_source, r18_target):
    decoy = {k: v + 1 if v.is_floating_point() else v for k, v in r18_source.items()}
    wrapped = {
        # training checkpoint: the EMA weights, not the raw model, must be taken
        "full": {
            "model": decoy,
            "ema": {"module": r18_source, "updates": 123},
            "optimizer": {"state": {}, "param_groups": []},
            "last_epoch": 7,
            "date": "2024-07-01T00:00:00",
        },
        "ema_only": {"ema": {"module": r18_source}},
        "bare": r18_source,
        "ours": {"model": r18_source, "meta": {"source": "reference", "name": "r18"}},
        "ddp": {"model": {f"module.{k}": v for k, v in r18_source.items()}},
        "model_only": {"model": r18_source, "ema": None, "last_epoch": 3},
    }[container]
    result = convert_reference_state_dict(wrapped, "r18", target=r18_target)
    _assert_same(result.state_dict, r18_source)
    assert result.skipped == result.filled == result.dropped == []


def test_reference_r50_layout():
    layout = reference_layout("r50")
    source, target = random_state(layout, 3), random_state(layout, 4)
    result = convert_reference_state_dict({"ema": {"module": source}}, "r50", target=target)
    _assert_same(result.state_dict, source)
    assert not any(k.endswith("num_batches_tracked") for k in result.state_dict if "backbone" in k)


def test_reference_missing_key_is_named(r18_source, r18_target):
    broken = {k: v for k, v in r18_source.items() if k != "decoder.dec_bbox_head.1.layers.2.bias"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): decoder\.dec_bbox_head\.1\.layers"):
        convert_reference_state_dict(broken, "r18", target=r18_target)


def test_reference_unexpected_key_is_named(r18_source, r18_target):
    broken = {**r18_source, "decoder.extra_head.weight": torch.ones(3)}
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): decoder\.extra_head\.weight"):
        convert_reference_state_dict(broken, "r18", target=r18_target)


def test_reference_shape_mismatch_is_named(r18_source, r18_target):
    key = "encoder.input_proj.0.conv.weight"
    broken = {**r18_source, key: torch.ones(256, 64, 1, 1)}
    with pytest.raises(ValueError, match=r"encoder\.input_proj\.0\.conv\.weight \(256, 64, 1, 1\)"):
        convert_reference_state_dict(broken, "r18", target=r18_target)


def test_unknown_name_and_non_tensor_entries(r18_source, r18_target):
    with pytest.raises(ValueError, match="unknown model name 'r99'"):
        convert_reference_state_dict(r18_source, "r99", target=r18_target)
    with pytest.raises(ValueError, match="not tensors: epoch"):
        extract_state_dict({**r18_source, "epoch": 3})


def test_num_classes_change_keeps_the_rest(r18_layout, r18_source, caplog):
    resize = {k: (20, *r18_layout[k][0][1:]) for k in _CLASS_KEYS}
    resize["decoder.denoising_class_embed.weight"] = (21, 256)
    target = random_state(r18_layout, seed=5, resize=resize)
    with caplog.at_level(logging.WARNING, logger="rtdetr_lit.checkpoints"):
        result = convert_reference_state_dict({"ema": {"module": r18_source}}, "r18", target=target)
    assert set(result.skipped) == _CLASS_KEYS
    assert "decoder.enc_score_head.weight" in caplog.text
    for key, value in result.state_dict.items():
        expected = target[key] if key in _CLASS_KEYS else r18_source[key]
        assert torch.equal(value, expected), key


def test_eval_size_buffers_follow_the_target(r18_layout, r18_source):
    tokens = 40 * 40 + 20 * 20 + 10 * 10  # a model built for 320x320
    resize = {"decoder.anchors": (1, tokens, 4), "decoder.valid_mask": (1, tokens, 1)}
    target = random_state(r18_layout, seed=6, resize=resize)
    result = convert_reference_state_dict(r18_source, "r18", target=target)
    assert set(result.filled) == {"decoder.anchors", "decoder.valid_mask"} and not result.skipped
    assert torch.equal(result.state_dict["decoder.anchors"], target["decoder.anchors"])
    # a model without precomputed buffers simply does not receive them
    no_buffers = {k: v for k, v in target.items() if k not in resize}
    result = convert_reference_state_dict(r18_source, "r18", target=no_buffers)
    assert set(result.dropped) == {"decoder.anchors", "decoder.valid_mask"}
    assert "decoder.anchors" not in result.state_dict


# (b) Hugging Face checkpoints ----------------------------------------------------------------


def _hf_model(name: str):
    transformers = pytest.importorskip("transformers")
    if name == "r18":
        backbone = transformers.RTDetrResNetConfig(
            depths=[2, 2, 2, 2],
            layer_type="basic",
            hidden_sizes=[64, 128, 256, 512],
            out_features=["stage2", "stage3", "stage4"],
        )
        config = transformers.RTDetrV2Config(
            backbone_config=backbone,
            encoder_in_channels=[128, 256, 512],
            hidden_expansion=0.5,
            decoder_layers=3,
            num_labels=80,
            freeze_backbone_batch_norms=False,
        )
    else:  # the default config is RT-DETRv2-L (r50)
        config = transformers.RTDetrV2Config(num_labels=80)
    torch.manual_seed(0)
    model = transformers.RTDetrV2ForObjectDetection(config).eval()
    with torch.no_grad():  # no tensor may be zero or equal to another by construction
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))
            else:
                tensor.copy_(torch.randint_like(tensor, 1, 10_000))
    return model


@pytest.fixture(scope="module")
def hf_r18():
    return _hf_model("r18")


def test_hf_r18_keys_and_values(hf_r18, r18_layout, r18_target):
    hf = hf_r18.state_dict()
    result = convert_hf_state_dict(hf, "r18", target=r18_target)
    ours = result.state_dict
    assert {k: (tuple(v.shape), v.dtype) for k, v in ours.items()} == r18_layout
    assert sorted(result.filled) == ["decoder.anchors", "decoder.valid_mask"]
    assert torch.equal(ours["decoder.anchors"], r18_target["decoder.anchors"])
    assert result.skipped == []
    assert len(result.dropped) == 3 * 2 + 3 * 6  # top-level class_embed / bbox_embed aliases

    aifi = "model.encoder.aifi.0.layers.0.self_attn."
    for kind in ("weight", "bias"):
        qkv = torch.cat([hf[f"{aifi}{p}_proj.{kind}"] for p in "qkv"])
        assert torch.equal(ours[f"encoder.encoder.0.layers.0.self_attn.in_proj_{kind}"], qkv)
    dec = "model.decoder.layers.1.self_attn."
    w = ours["decoder.decoder.layers.1.self_attn.in_proj_weight"]
    assert torch.equal(w[:256], hf[dec + "q_proj.weight"])
    assert torch.equal(w[256:512], hf[dec + "k_proj.weight"])
    assert torch.equal(w[512:], hf[dec + "v_proj.weight"])
    pairs = {
        "backbone.conv1.conv1_2.norm.running_var": (
            "model.backbone.model.embedder.embedder.1.normalization.running_var"
        ),
        "backbone.res_layers.2.blocks.0.short.conv.conv.weight": (
            "model.backbone.model.encoder.stages.2.layers.0.shortcut.1.convolution.weight"
        ),
        "backbone.res_layers.0.blocks.0.short.norm.bias": (
            "model.backbone.model.encoder.stages.0.layers.0.shortcut.normalization.bias"
        ),
        "backbone.res_layers.3.blocks.1.branch2b.conv.weight": (
            "model.backbone.model.encoder.stages.3.layers.1.layer.1.convolution.weight"
        ),
        "decoder.dec_bbox_head.2.layers.2.weight": "model.decoder.bbox_embed.2.layers.2.weight",
        "decoder.dec_score_head.1.bias": "model.decoder.class_embed.1.bias",
        "decoder.decoder.layers.2.cross_attn.sampling_offsets.weight": (
            "model.decoder.layers.2.encoder_attn.sampling_offsets.weight"
        ),
        "decoder.decoder.layers.0.cross_attn.num_points_scale": (
            "model.decoder.layers.0.encoder_attn.n_points_scale"
        ),
        "decoder.decoder.layers.0.norm3.weight": "model.decoder.layers.0.final_layer_norm.weight",
        "encoder.encoder.0.layers.0.norm2.bias": (
            "model.encoder.aifi.0.layers.0.final_layer_norm.bias"
        ),
        "encoder.pan_blocks.1.bottlenecks.2.conv1.conv.weight": (
            "model.encoder.pan_blocks.1.bottlenecks.2.conv1.conv.weight"
        ),
        "decoder.enc_output.norm.weight": "model.enc_output.1.weight",
        "decoder.input_proj.2.norm.running_mean": "model.decoder_input_proj.2.1.running_mean",
    }
    for ours_key, hf_key in pairs.items():
        assert torch.equal(ours[ours_key], hf[hf_key]), ours_key


def test_hf_r50_default_config_keys():
    layout = reference_layout("r50")
    target = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in layout.items()}
    result = convert_hf_state_dict(_hf_model("r50").state_dict(), "r50", target=target)
    assert {k: (tuple(v.shape), v.dtype) for k, v in result.state_dict.items()} == layout
    assert sorted(result.filled) == ["decoder.anchors", "decoder.valid_mask"]


def test_hf_round_trip_is_exact(hf_r18, r18_target):
    hf = hf_r18.state_dict()
    back = to_hf_state_dict(convert_hf_state_dict(hf, "r18", target=r18_target).state_dict)
    assert set(back) == set(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    fresh = _hf_model("r18")
    fresh.load_state_dict(back, strict=True)
    assert torch.equal(fresh.model.enc_score_head.weight, hf_r18.model.enc_score_head.weight)


def test_hf_saved_file_uses_old_spellings(hf_r18, r18_target, tmp_path):
    hf_r18.save_pretrained(tmp_path)  # writes the on-disk (legacy) key names, no tied aliases
    on_disk = load_checkpoint_file(tmp_path / "model.safetensors")
    assert any(".fc1." in k and ".mlp." not in k for k in on_disk)  # the spelling under test
    from_file = convert_hf_state_dict(on_disk, "r18", target=r18_target).state_dict
    from_memory = convert_hf_state_dict(hf_r18.state_dict(), "r18", target=r18_target).state_dict
    _assert_same(from_file, from_memory)


def test_hf_untied_alias_warns_and_decoder_head_wins(hf_r18, r18_target, caplog):
    hf = dict(hf_r18.state_dict())
    hf["class_embed.1.bias"] = hf["class_embed.1.bias"] + 1
    with caplog.at_level(logging.WARNING, logger="rtdetr_lit.convert"):
        ours = convert_hf_state_dict(hf, "r18", target=r18_target).state_dict
    assert "class_embed.1.bias differs" in caplog.text
    assert torch.equal(
        ours["decoder.dec_score_head.1.bias"], hf["model.decoder.class_embed.1.bias"]
    )


def test_hf_errors_name_the_keys(hf_r18, r18_target):
    hf = dict(hf_r18.state_dict())
    del hf["model.decoder.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match=r"decoder\.decoder\.layers\.0\.self_attn\.in_proj_bias"):
        convert_hf_state_dict(hf, "r18", target=r18_target)
    hf = {**hf_r18.state_dict(), "model.decoder.weight_embedding.weight": torch.ones(300, 256)}
    with pytest.raises(ValueError, match=r"no rtdetr_lit counterpart.*weight_embedding"):
        convert_hf_state_dict(hf, "r18", target=r18_target)
    with pytest.raises(ValueError, match="entry 'ema' is a dict"):
        convert_hf_state_dict({"ema": {"module": {}}}, "r18", target=r18_target)


# (c) safe loading ----------------------------------------------------------------------------


def test_load_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth"):
        load_checkpoint_file(tmp_path / "nothing.pth")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"garbage\.safetensors"):
        load_checkpoint_file(garbage)
    state = {"a": torch.arange(3.0), "b": torch.ones(2, dtype=torch.bool)}
    torch.save({"ema": {"module": state, "updates": 5}}, tmp_path / "ok.pth")
    loaded = load_checkpoint_file(tmp_path / "ok.pth")
    assert torch.equal(loaded["ema"]["module"]["a"], state["a"])


# (d) command line ----------------------------------------------------------------------------


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--num-classes" in capsys.readouterr().out


def _create_model():
    try:
        from rtdetr_lit import create_model
    except ImportError:
        pytest.skip("create_model not available yet")
    return create_model


def test_default_target_uses_the_checkpoint_class_count(r18_layout):
    _create_model()
    resize = {k: (20, *r18_layout[k][0][1:]) for k in _CLASS_KEYS}
    resize["decoder.denoising_class_embed.weight"] = (21, 256)
    source = random_state(r18_layout, seed=7, resize=resize)
    result = convert_reference_state_dict({"ema": {"module": source}}, "r18")
    assert result.skipped == []
    _assert_same(result.state_dict, source)


def test_cli_reference_end_to_end(tmp_path):
    create_model = _create_model()
    torch.manual_seed(0)
    source = {k: v.clone() for k, v in create_model("r18").state_dict().items()}
    for value in source.values():
        value.copy_(torch.randn_like(value) if value.is_floating_point() else value + 7)
    path_in, path_out = tmp_path / "ref.pth", tmp_path / "out" / "r18.pth"
    torch.save({"ema": {"module": source, "updates": 1}, "last_epoch": 0}, path_in)

    assert main(["--from", "reference", "--model", "r18", str(path_in), str(path_out)]) == 0
    written = torch.load(path_out, map_location="cpu", weights_only=True)
    assert written["meta"]["source"] == "reference" and written["meta"]["name"] == "r18"
    _assert_same(written["model"], source)

    path_20 = tmp_path / "r18_20.pth"  # converting our own file again, to 20 classes
    main(
        [
            "--from",
            "reference",
            "--model",
            "r18",
            "--num-classes",
            "20",
            str(path_out),
            str(path_20),
        ]
    )
    written = torch.load(path_20, map_location="cpu", weights_only=True)
    assert written["meta"]["num_classes"] == 20
    assert set(written["meta"]["skipped"]) == _CLASS_KEYS
    assert torch.equal(
        written["model"]["decoder.enc_bbox_head.layers.0.weight"],
        source["decoder.enc_bbox_head.layers.0.weight"],
    )


def test_weights_trained_at_one_size_evaluate_at_another(tmp_path):
    from rtdetr_lit import create_model
    from rtdetr_lit.checkpoints import load_model_weights

    trained = create_model("demo", num_classes=3, eval_spatial_size=(128, 128))
    torch.save(trained.state_dict(), tmp_path / "w.pth")
    other = create_model("demo", num_classes=3, eval_spatial_size=(160, 192))
    anchors = other.decoder.anchors.clone()
    assert load_model_weights(other, tmp_path / "w.pth") == []
    assert torch.equal(other.decoder.anchors, anchors)  # follow the model's eval size
    assert torch.equal(other.decoder.enc_score_head.weight, trained.decoder.enc_score_head.weight)


def test_anchors_outside_the_image_are_inf_by_design_and_load(tmp_path):
    """A model built for 640 px, like every reference checkpoint, holds +inf anchors where an
    anchor leaves the image: its files convert, evaluate and resume; NaN there is refused."""
    from rtdetr_lit import create_model
    from rtdetr_lit.checkpoints import check_finite, load_model_weights
    from rtdetr_lit.plugins import SafeCheckpointIO

    state = create_model("r18").state_dict()
    assert torch.isposinf(state["decoder.anchors"]).any()
    torch.save({"ema": {"module": state, "updates": 1}}, tmp_path / "reference.pth")
    args = ["--from", "reference", "--model", "r18", str(tmp_path / "reference.pth")]
    assert main([*args, str(tmp_path / "r18.pth")]) == 0
    assert load_model_weights(create_model("r18"), tmp_path / "r18.pth") == []
    # a Lightning checkpoint of a 640 px run: resume and the test step read it like this
    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}}, tmp_path / "run.ckpt")
    SafeCheckpointIO().load_checkpoint(tmp_path / "run.ckpt")
    for value in ("nan", "-inf"):
        broken = {**state, "decoder.anchors": state["decoder.anchors"].clone()}
        broken["decoder.anchors"].view(-1)[0] = float(value)
        with pytest.raises(ValueError, match=r"NaN or inf values in 1 of its tensors: decoder\."):
            check_finite(broken, "file")
