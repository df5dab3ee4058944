"""The non-finite step guard and atomic checkpoint writes."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from rtdetr_lit.callbacks import NonFiniteGuard
from rtdetr_lit.plugins import SafeCheckpointIO


class _Poisoned(L.LightningModule):
    """A linear model whose loss is NaN at the steps in ``bad_steps``; records the weights."""

    def __init__(self, bad_steps: set[int]) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.bad_steps = bad_steps
        self.weights: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.weights.append(self.layer.weight.detach().clone())
        loss = self.layer(batch).square().mean()
        if self.global_step in self.bad_steps:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def _fit(module: L.LightningModule, guard: NonFiniteGuard, steps: int, plugins=None) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[guard],
        gradient_clip_val=0.1, plugins=plugins,
    )  # fmt: skip
    trainer.fit(module, DataLoader(torch.randn(64, 2), batch_size=4))
    return trainer


def test_non_finite_steps_are_skipped_and_counted() -> None:
    module, guard = _Poisoned({2, 3}), NonFiniteGuard(max_consecutive=3)
    trainer = _fit(module, guard, steps=6)
    w = module.weights
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])  # normal steps update
    assert torch.equal(w[2], w[3]) and torch.equal(w[3], w[4])  # NaN steps 2 and 3 do not
    assert not torch.equal(w[4], w[5]) and torch.isfinite(w[5]).all()
    assert guard.skipped == 2 and guard.consecutive == 0
    assert trainer.callback_metrics["train/skipped_steps"] == 2


def _fp16() -> MixedPrecision:
    # Given outright: Lightning's precision="16-mixed" flag becomes bf16-mixed on CPUs.
    return MixedPrecision("16-mixed", device="cpu")


def test_an_overflow_under_the_gradient_scaler_is_the_scalers_to_skip(caplog) -> None:
    module, guard = _Poisoned({2}), NonFiniteGuard(max_consecutive=1)
    with caplog.at_level(logging.INFO, logger="rtdetr_lit.callbacks.guard"):
        trainer = _fit(module, guard, steps=5, plugins=[_fp16()])
    w = module.weights
    assert torch.equal(w[2], w[3]) and not torch.equal(w[3], w[4])  # the scaler skipped step 2
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**16  # and lowered its scale
    assert guard.skipped == 0  # not a broken run: max_consecutive=1 did not stop it
    assert any("overflowed at loss scale" in r.getMessage() for r in caplog.records)


def test_an_overflow_at_every_scale_still_stops_the_run() -> None:
    """A NaN loss overflows at any scale: once the scaler has halved its scale below 1 (17
    steps from 65536), the guard counts the steps and stops the run."""
    module, guard = _Poisoned(set(range(40))), NonFiniteGuard(max_consecutive=2)
    with pytest.raises(FloatingPointError, match="2 training steps in a row"):
        _fit(module, guard, steps=40, plugins=[_fp16()])
    assert guard.skipped == 2 and len(module.weights) == 17 + 2


def test_too_many_non_finite_steps_in_a_row_stop_the_run() -> None:
    guard = NonFiniteGuard(max_consecutive=2)
    with pytest.raises(FloatingPointError, match="2 training steps in a row"):
        _fit(_Poisoned({1, 2, 3}), guard, steps=6)


def test_checkpoint_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    io = SafeCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}

    def dies_half_way(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # the process is stopped in the middle of writing

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left
