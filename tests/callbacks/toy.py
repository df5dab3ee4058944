"""A tiny LightningModule logging the metric names of RTDETRModule, for fast callback tests."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader


class Toy(L.LightningModule):
    """A linear model. ``train/loss_index`` is the batch index, so its epoch mean is known; after
    validation ``val/mAP`` is 0.1 x (epoch + 1) and ``val/mAP_50`` twice that."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).square().mean()
        self.log("train/loss", loss)
        self.log("train/loss_index", float(batch_idx))
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.layer(batch)

    def on_validation_epoch_end(self) -> None:
        self.log("val/mAP", 0.1 * (self.current_epoch + 1))
        self.log("val/mAP_50", 0.2 * (self.current_epoch + 1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([{"params": self.parameters(), "name": "head"}], lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), 2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(4, 2), 2)


def fit_toy(
    root: Path,
    callbacks: list[L.Callback],
    epochs: int = 2,
    ckpt_path: str | Path | None = None,
    **trainer_kwargs,
) -> L.Trainer:
    """Fit :class:`Toy` (4 steps an epoch) with ``callbacks`` in ``root``, from ``ckpt_path``."""
    settings = {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
    }
    trainer = L.Trainer(**{**settings, **trainer_kwargs}, callbacks=callbacks)
    trainer.fit(Toy(), ckpt_path=ckpt_path)
    return trainer
