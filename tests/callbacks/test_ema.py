"""The EMA callback: docs/rtdetrv2.md §9 decay ramp, integer state, checkpoints, restart."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rtdetr_lit.callbacks import EMA, ema_decay


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.norm(self.layer(x)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class _Recorder(L.Callback):
    """Keeps the raw weights after every optimizer step (before EMA sees them is irrelevant)."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.snapshots.append({k: v.clone() for k, v in pl_module.state_dict().items()})


def _fit(tmp_path: Path, steps: int, ema: EMA, recorder: _Recorder) -> tuple[L.Trainer, _Tiny]:
    torch.manual_seed(0)
    model = _Tiny()
    data = DataLoader(TensorDataset(torch.randn(steps * 4, 3)), batch_size=4)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder, ema], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, data)
    return trainer, model


def test_decay_formula() -> None:
    assert ema_decay(1) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))
    assert ema_decay(2000) == pytest.approx(0.9999 * (1 - 1 / math.e))
    assert ema_decay(10**7) == pytest.approx(0.9999)


def test_average_follows_the_ramp(tmp_path: Path) -> None:
    recorder, ema = _Recorder(), EMA(decay=0.9, warmup_steps=3)
    _, model = _fit(tmp_path, 6, ema, recorder)
    assert ema.num_updates == 6
    expected = {k: v.clone() for k, v in recorder.snapshots[0].items()}
    for k, raw in enumerate(recorder.snapshots[1:], start=2):
        d = ema_decay(k, 0.9, 3)
        for name, value in raw.items():
            if value.is_floating_point():
                expected[name] = d * expected[name] + (1 - d) * value
            else:  # integer state (BN step counter) is copied
                expected[name] = value
    # When training ends the model holds the averaged weights.
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7)
    assert model.norm.num_batches_tracked.item() == 6
    raw_last = recorder.snapshots[-1]["layer.weight"]
    assert not torch.allclose(model.layer.weight, raw_last)


def test_checkpoint_holds_average_and_raw_weights(tmp_path: Path) -> None:
    recorder, ema = _Recorder(), EMA(decay=0.9, warmup_steps=3)
    _fit(tmp_path, 4, ema, recorder)
    (ckpt,) = Path(tmp_path).rglob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    raw = recorder.snapshots[-1]
    torch.testing.assert_close(state["current_model_state"]["layer.weight"], raw["layer.weight"])
    assert not torch.allclose(state["state_dict"]["layer.weight"], raw["layer.weight"])


def test_testing_a_checkpoint_after_fit_uses_its_average(tmp_path: Path) -> None:
    recorder, ema = _Recorder(), EMA(decay=0.9, warmup_steps=3)
    trainer, model = _fit(tmp_path, 4, ema, recorder)
    (ckpt,) = Path(tmp_path).rglob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    averaged = state["state_dict"]["layer.weight"]
    raw = state["current_model_state"]["layer.weight"]
    assert not torch.equal(averaged, raw)
    with torch.no_grad():
        model.layer.weight.zero_()  # whatever the model holds now must be replaced by the file
    model.test_step = lambda batch, batch_idx: None
    trainer.test(model, DataLoader(TensorDataset(torch.randn(4, 3)), batch_size=4), ckpt_path=ckpt)
    assert torch.equal(model.layer.weight, averaged)


def test_restart_copies_the_current_weights(tmp_path: Path) -> None:
    class _RestartAt3(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 3:
                ema.restart()

    recorder, ema = _Recorder(), EMA(decay=0.9, warmup_steps=3)
    torch.manual_seed(0)
    model = _Tiny()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
        callbacks=[_RestartAt3(), recorder, ema], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(torch.randn(16, 3)), batch_size=4))
    assert ema.num_updates == 1
    torch.testing.assert_close(model.layer.weight, recorder.snapshots[-1]["layer.weight"])


def test_average_follows_a_double_precision_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, ema = _Tiny(), EMA(decay=0.9, warmup_steps=3)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, precision="64-true",
        callbacks=[ema], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(torch.randn(16, 3)), batch_size=4))
    assert ema.num_updates == 4 and model.layer.weight.dtype == torch.float64


def test_callback_pickles_for_spawned_processes() -> None:
    ema = pickle.loads(pickle.dumps(EMA(decay=0.99, warmup_steps=7)))
    assert (ema.decay, ema.warmup_steps) == (0.99, 7)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        EMA(decay=1.0)
    with pytest.raises(ValueError):
        EMA(warmup_steps=0)
