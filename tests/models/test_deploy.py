"""Deploy-time fusion: RepVGG re-parameterisation and norm folding leave eval outputs unchanged."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from rtdetr_lit.models.backbone import PResNet
from rtdetr_lit.models.common import fuse_conv_norm
from rtdetr_lit.models.deploy import fuse_for_deploy
from rtdetr_lit.models.encoder import HybridEncoder, RepVggBlock

_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _randomise_norms(module: nn.Module) -> None:
    """Random statistics and affine terms, so folding them is not the identity."""
    for m in module.modules():
        if isinstance(m, _NORMS):
            m.running_mean.uniform_(-1.0, 1.0)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def _assert_close_rel(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_fuse_conv_norm_with_and_without_conv_bias() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 9)
    for bias in (False, True):
        conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias)
        norm = nn.BatchNorm2d(6)
        _randomise_norms(norm)
        norm.eval()
        fused = fuse_conv_norm(conv, norm)
        assert fused.bias is not None
        assert (fused.stride, fused.padding) == ((2, 2), (1, 1))
        with torch.no_grad():
            _assert_close_rel(fused(x), norm(conv(x)))


def test_repvgg_block_fuse_is_exact() -> None:
    torch.manual_seed(0)
    block = RepVggBlock(8, 12, act="silu")
    _randomise_norms(block)
    block.eval()
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        expected = block(x)
        block.fuse()
        got = block(x)
    assert isinstance(block.conv, nn.Conv2d)
    assert block.conv.kernel_size == (3, 3)
    assert not hasattr(block, "conv1")
    assert not hasattr(block, "conv2")
    assert set(block.state_dict()) == {"conv.weight", "conv.bias"}
    _assert_close_rel(got, expected)


@pytest.mark.parametrize("freeze_norm", [False, True])  # BatchNorm2d and FrozenBatchNorm2d
def test_fused_backbone_and_encoder_match(freeze_norm: bool) -> None:
    torch.manual_seed(0)
    backbone = PResNet(18, freeze_norm=freeze_norm)
    encoder = HybridEncoder(backbone.out_channels, expansion=0.5, eval_spatial_size=(64, 96))
    model = nn.Sequential(backbone, encoder)
    _randomise_norms(model)
    model.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)

    num_rep_blocks = sum(isinstance(m, RepVggBlock) for m in model.modules())
    assert fuse_for_deploy(model) is model
    assert not any(isinstance(m, _NORMS) for m in model.modules())
    assert num_rep_blocks == 12  # 4 CSP layers x 3 blocks
    assert all(m.conv is not None for m in model.modules() if isinstance(m, RepVggBlock))
    with torch.no_grad():
        got = model(x)
    for g, e in zip(got, expected, strict=True):
        _assert_close_rel(g, e)

    # A second call finds nothing left to fuse and changes nothing.
    fuse_for_deploy(model)
    with torch.no_grad():
        for g, e in zip(model(x), expected, strict=True):
            _assert_close_rel(g, e)


def test_folds_sequential_conv_norm_and_switches_to_eval() -> None:
    """A plain ``Sequential(conv, norm)`` (as other modules may use) is folded too."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 5, 1, bias=False),
            norm=nn.BatchNorm2d(5),
            act=nn.ReLU(),
        )
    )
    _randomise_norms(model)
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    fuse_for_deploy(model)
    assert not model.training
    assert isinstance(model.norm, nn.Identity)
    assert model.conv.bias is not None
    with torch.no_grad():
        _assert_close_rel(model(x), expected)
