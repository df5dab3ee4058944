"""PResNet: reference state-dict layout, parity with HF's vd ResNet, freezing, weight loading."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import FrozenBatchNorm2d

from rtdetr_lit.models.backbone import PResNet

from ..conftest import reference_shapes


def _randomise_norms(module: nn.Module) -> None:
    """Non-trivial BN statistics so that eval-mode tests exercise the normalisation."""
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.running_mean.uniform_(-1.0, 1.0)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize(
    ("size", "depth", "frozen"),
    [("r18", 18, False), ("r50", 50, True)],  # docs/rtdetrv2.md §2: S trains its BN, L freezes it
)
def test_state_dict_matches_reference(size: str, depth: int, frozen: bool) -> None:
    reference = reference_shapes(size, "backbone.")
    model = PResNet(depth, freeze_at=0 if frozen else -1, freeze_norm=frozen)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(ours.keys() - reference.keys()) == []
    assert sorted(reference.keys() - ours.keys()) == []
    assert ours == reference


def _hf_key(key: str) -> str:
    """Our backbone key -> the key of transformers' RTDetrResNetBackbone."""
    key = re.sub(r"^conv1\.conv1_(\d)\.", lambda m: f"embedder.embedder.{int(m[1]) - 1}.", key)
    key = re.sub(r"^res_layers\.(\d+)\.blocks\.(\d+)\.", r"encoder.stages.\1.layers.\2.", key)
    key = re.sub(r"\.branch2([abc])\.", lambda m: f".layer.{'abc'.index(m[1])}.", key)
    key = re.sub(r"\.short\.conv\.(conv|norm)\.", r".shortcut.1.\1.", key)
    key = key.replace(".short.", ".shortcut.")
    return key.replace(".conv.", ".convolution.").replace(".norm.", ".normalization.")


def _hf_backbone(ours: PResNet, layer_type: str, depths: list, widths: list) -> nn.Module:
    """HF's independent port of the vd ResNet with ``ours``'s weights (and dtype), returning
    the same three stages."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import RTDetrResNetConfig
    from transformers.models.rt_detr.modeling_rt_detr_resnet import RTDetrResNetBackbone

    config = RTDetrResNetConfig(
        layer_type=layer_type, depths=depths, hidden_sizes=widths, out_indices=[2, 3, 4]
    )
    hf = RTDetrResNetBackbone(config).to(next(ours.parameters()).dtype)
    hf.load_state_dict({_hf_key(k): v for k, v in ours.state_dict().items()}, strict=True)
    return hf


@pytest.mark.parametrize(
    ("depth", "layer_type", "depths", "widths"),
    [
        (18, "basic", [2, 2, 2, 2], [64, 128, 256, 512]),
        (50, "bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
    ],
)
def test_matches_hf_resnet_vd(depth: int, layer_type: str, depths: list, widths: list) -> None:
    """Same weights -> same feature maps as HF's independent port of the vd ResNet (non-square)."""
    torch.manual_seed(0)
    ours = PResNet(depth).eval()
    _randomise_norms(ours)
    hf = _hf_backbone(ours, layer_type, depths, widths).eval()

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = hf(x).feature_maps
        got = ours(x)
    assert len(got) == 3
    for g, e, c, s in zip(got, expected, ours.out_channels, ours.out_strides, strict=True):
        assert g.shape == (2, c, 64 // s, 96 // s)
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


class _ReluBackwardShapes(TorchDispatchMode):
    """Records the shape of every gradient ReLU's backward (``threshold_backward``) receives."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "threshold_backward":
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **kwargs or {})


def test_training_gradients_match_hf_with_relu_after_the_pool() -> None:
    """The stem computes ReLU(max-pool(.)) instead of the paper's max-pool(ReLU(.)): in training
    (batch statistics) the feature maps and every gradient equal HF's, which keeps the usual
    order, and no ReLU backward runs on the full-resolution stem map."""
    torch.manual_seed(0)
    ours = PResNet(18).double().train()
    _randomise_norms(ours)
    hf = _hf_backbone(ours, "basic", [2, 2, 2, 2], [64, 128, 256, 512]).train()

    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    weights = [torch.randn(2, c, 64 // s, 96 // s, dtype=torch.float64)
               for c, s in zip(ours.out_channels, ours.out_strides, strict=True)]  # fmt: skip
    grads = []
    for model, run in ((hf, lambda i: hf(i).feature_maps), (ours, ours)):
        inp = x.clone().requires_grad_(True)
        recorder = _ReluBackwardShapes()
        with recorder:
            sum((f * w).sum() for f, w in zip(run(inp), weights, strict=True)).backward()
        grads.append((inp.grad, [p.grad for p in model.parameters()], recorder.shapes))
    (hf_input, hf_params, hf_shapes), (input_grad, param_grads, shapes) = grads
    torch.testing.assert_close(input_grad, hf_input, rtol=1e-9, atol=1e-12)
    for ours_grad, hf_grad in zip(param_grads, hf_params, strict=True):
        torch.testing.assert_close(ours_grad, hf_grad, rtol=1e-9, atol=1e-12)
    assert (2, 64, 32, 48) in hf_shapes  # the usual order: ReLU backward on the stem map
    assert (2, 64, 32, 48) not in shapes and (2, 64, 16, 24) in shapes


@pytest.mark.parametrize(
    ("depth", "channels", "blocks"),
    [
        (18, [128, 256, 512], [2, 2, 2, 2]),
        (34, [128, 256, 512], [3, 4, 6, 3]),
        (50, [512, 1024, 2048], [3, 4, 6, 3]),
        (101, [512, 1024, 2048], [3, 4, 23, 3]),
    ],
)
def test_output_shapes_every_depth(depth: int, channels: list, blocks: list) -> None:
    torch.manual_seed(0)
    model = PResNet(depth).eval()
    assert model.out_channels == channels
    assert model.out_strides == [8, 16, 32]
    assert [len(stage.blocks) for stage in model.res_layers] == blocks
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(channels, [8, 16, 32], strict=True)
    ]


def test_return_idx_selects_stages() -> None:
    model = PResNet(18, return_idx=(0, 3))
    assert model.out_channels == [64, 512]
    assert model.out_strides == [4, 32]
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1:] for o in outs] == [(64, 16, 16), (512, 2, 2)]


def test_freeze_at_and_freeze_norm() -> None:
    model = PResNet(18, freeze_at=-1)
    assert all(p.requires_grad for p in model.parameters())

    model = PResNet(18, freeze_at=0)
    assert not any(p.requires_grad for p in model.conv1.parameters())
    assert all(p.requires_grad for p in model.res_layers.parameters())

    model = PResNet(18, freeze_at=2)
    assert not any(p.requires_grad for p in model.conv1.parameters())
    assert not any(p.requires_grad for p in model.res_layers[:2].parameters())
    assert all(p.requires_grad for p in model.res_layers[2:].parameters())

    model = PResNet(50, freeze_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 55  # 3 stem + 16 blocks x 3 convs + 4 projection shortcuts
    assert all(m.eps == 1e-5 for m in frozen)
    assert not any("num_batches_tracked" in k for k in model.state_dict())
    # Norms hold buffers only; every remaining parameter is a conv weight.
    assert all(p.dim() == 4 for p in model.parameters())


def test_frozen_norm_keeps_eval_output() -> None:
    """Freezing BN must not change what the eval-mode network computes."""
    torch.manual_seed(0)
    model = PResNet(18).eval()
    _randomise_norms(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        frozen = PResNet(18, freeze_norm=True)
        result = frozen.load_state_dict(model.state_dict(), strict=False)
        assert result.missing_keys == []
        after = frozen.eval()(x)
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layout", ["bare", "prefixed", "ema"])
def test_load_weights_from_local_file(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(0)
    source = PResNet(18)
    _randomise_norms(source)
    state = source.state_dict()
    if layout == "prefixed":
        state = {f"backbone.{k}": v for k, v in state.items()}
        state["encoder.input_proj.0.conv.weight"] = torch.zeros(1)  # other parts are ignored
    elif layout == "ema":
        state = {"ema": {"module": {f"backbone.{k}": v for k, v in state.items()}}}
    path = tmp_path / "weights.pth"
    torch.save(state, path)

    loaded = PResNet(18, freeze_norm=True, weights=path)  # frozen BN has no num_batches_tracked
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0)


def test_load_weights_errors(tmp_path: Path) -> None:
    missing_file = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        PResNet(18, weights=missing_file)

    state = PResNet(18).state_dict()
    del state["conv1.conv1_1.conv.weight"]
    state["head.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"bad\.pth.*conv1\.conv1_1\.conv\.weight.*head\.weight"):
        PResNet(18, weights=path)

    state = PResNet(18).state_dict()
    state["conv1.conv1_1.conv.weight"] = torch.zeros(32, 3, 1, 1)
    path = tmp_path / "mis_shaped.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"conv1\.conv1_1\.conv\.weight: file \(32, 3, 1, 1\)"):
        PResNet(18, weights=path)
