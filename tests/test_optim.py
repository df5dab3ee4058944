"""Optimizer groups and learning-rate schedules (docs/rtdetrv2.md §9)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rtdetr_lit import create_model
from rtdetr_lit.optim import build_param_groups, clip_gradients, warmup_schedule


def test_param_groups_split_backbone_norms_and_biases() -> None:
    net = create_model("r18", num_classes=3)
    groups = {g["name"]: g for g in build_param_groups(net, 1e-4, 1e-4, backbone_lr=5e-5)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    everything = {id(p) for p in net.parameters() if p.requires_grad}
    assert set().union(*ids.values()) == everything
    assert sum(len(v) for v in ids.values()) == len(everything), "a parameter is in two groups"

    bn = net.backbone.conv1.conv1_1.norm
    ln = net.decoder.decoder.layers[0].norm1
    assert id(bn.weight) in ids["backbone_no_decay"]
    assert id(net.backbone.conv1.conv1_1.conv.weight) in ids["backbone"]
    assert id(ln.weight) in ids["head_no_decay"] and id(ln.bias) in ids["head_no_decay"]
    assert id(net.decoder.dec_score_head[0].bias) in ids["head"]
    assert (groups["backbone"]["lr"], groups["backbone"]["weight_decay"]) == (5e-5, 1e-4)
    assert (groups["backbone_no_decay"]["lr"], groups["backbone_no_decay"]["weight_decay"]) == (
        5e-5,
        0.0,
    )
    assert (groups["head"]["lr"], groups["head_no_decay"]["weight_decay"]) == (1e-4, 0.0)


def test_bias_rule_of_the_m_star_size() -> None:
    net = create_model("r18", num_classes=3)
    groups = {
        g["name"]: g for g in build_param_groups(net, 1e-4, 1e-4, no_weight_decay_on_bias=True)
    }
    no_decay = {id(p) for p in groups["head_no_decay"]["params"]}
    assert id(net.decoder.dec_score_head[0].bias) in no_decay
    assert id(net.decoder.dec_score_head[0].weight) not in no_decay
    # The rule is for encoder/decoder biases: backbone convs have none, backbone BN is a norm.
    assert all(id(p) not in no_decay for p in net.backbone.parameters())


def test_frozen_parameters_are_left_out() -> None:
    net = create_model("r50", num_classes=3)
    grouped = {id(p) for g in build_param_groups(net, 1e-4, 1e-4, 1e-5) for p in g["params"]}
    assert id(net.backbone.conv1.conv1_1.conv.weight) not in grouped
    assert grouped == {id(p) for p in net.parameters() if p.requires_grad}


def _factors(policy: str, steps: list[int], **kwargs: object) -> list[float]:
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
    sched = warmup_schedule(opt, policy=policy, **kwargs)
    return [sched.lr_lambdas[0](s) for s in steps]


def test_linear_warmup_then_constant() -> None:
    got = _factors("constant", [0, 999, 1998, 1999, 2000, 10**6], warmup_steps=2000)
    assert got == pytest.approx([1 / 2000, 0.5, 1999 / 2000, 1.0, 1.0, 1.0])


def test_cosine_and_multistep_options() -> None:
    cos = _factors("cosine", [0, 10, 55, 100], warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    assert cos[0] == pytest.approx(0.1 * (0.1 + 0.9))
    assert cos[2] == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(0.55 * torch.pi)).item())
    )
    assert cos[3] == pytest.approx(0.1)
    steps = _factors("multistep", [5, 50, 150], warmup_steps=0, milestones=[50, 100], gamma=0.1)
    assert steps == pytest.approx([1.0, 0.1, 0.01])
    with pytest.raises(ValueError, match="total_steps"):
        _factors("cosine", [0])
    with pytest.raises(ValueError, match="policy"):
        _factors("linear", [0])


def test_scheduler_steps_the_real_optimizer() -> None:
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=1e-3)
    sched = warmup_schedule(opt, warmup_steps=4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def _params_with_grads(scale: float) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [
        nn.Parameter(torch.randn(5, 3, generator=gen)),
        nn.Parameter(torch.randn(4, generator=gen)),
    ]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 3.0 * scale
    return params


@pytest.mark.parametrize("grad_value", [1.0, float("inf")])
def test_clipping_under_a_gradient_scaler_with_the_fused_optimizer(grad_value: float) -> None:
    """16-mixed, fused AdamW, clip 0.1: the step equals plain AdamW on the unscaled, clipped
    gradients; an overflow skips the step (and lowers the scale) as the scaler does."""
    from lightning.pytorch.plugins import MixedPrecision, Precision

    precision = MixedPrecision("16-mixed", device="cpu")
    precision.scaler.scale(torch.ones(()))  # the scaled loss the backward pass started from
    scale = precision.scaler.get_scale()
    fused = _params_with_grads(scale)
    fused[0].grad[0, 0] *= grad_value
    optimizer = torch.optim.AdamW(fused, lr=0.1, fused=True)
    clip_gradients(precision, optimizer, 0.1)
    precision.scaler.step(optimizer)
    precision.scaler.update()

    plain = _params_with_grads(1.0)
    expected = torch.optim.AdamW(plain, lr=0.1)
    clip_gradients(Precision(), expected, 0.1)
    if grad_value == 1.0:
        assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in plain])) == (
            pytest.approx(0.1)
        )
        expected.step()
        assert precision.scaler.get_scale() == scale
    else:
        assert precision.scaler.get_scale() == scale / 2
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got.detach(), want.detach())
