"""Lightning's checkpoint reading and writing, made safe: atomic writes, reads that run no code."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from rtdetr_lit.checkpoints import atomic_write, check_finite, load_checkpoint_file

__all__ = ["SafeCheckpointIO", "ensure_safe_checkpoint_io"]


class SafeCheckpointIO(TorchCheckpointIO):
    """Every checkpoint Lightning reads or writes goes through here.

    - Writing: :func:`rtdetr_lit.checkpoints.atomic_write`, to a temporary file beside the target
      then renamed into place, so a run killed at any moment (SIGKILL, pre-emption) leaves either
      the previous ``last.ckpt`` or the new one, never a truncated file; with the permissions the
      user's umask gives a new file.
    - Reading (resume, ``trainer.test(ckpt_path=...)``, any path restored from a checkpoint):
      :func:`rtdetr_lit.checkpoints.load_checkpoint_file`, which never runs code stored in the
      file whatever ``weights_only`` Lightning asks for, and refuses detector weights holding NaN
      or inf before anything is restored.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO takes no storage_options")
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any = None, weights_only: Any = None
    ) -> dict[str, Any]:
        # map_location and weights_only are ignored on purpose: tensors load onto the CPU (the
        # strategy moves them), and loading is always weights-only.
        checkpoint = load_checkpoint_file(path)
        if not isinstance(checkpoint, Mapping) or not isinstance(
            checkpoint.get("state_dict"), Mapping
        ):
            raise ValueError(
                f"{path}: not a checkpoint written by training (it has no 'state_dict'), so a "
                "run cannot resume from it; to start from its weights, use model.init_from=PATH"
            )
        # The detector's weights only: metric states legitimately hold inf (a best-so-far maximum
        # starts at -inf until the first validation).
        weights = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
        check_finite(weights, str(path))
        return checkpoint


def ensure_safe_checkpoint_io(trainer: Any) -> None:
    """Give ``trainer`` a :class:`SafeCheckpointIO` if its config left Lightning's default.

    Raises ``ValueError`` for any other checkpoint IO plugin: it could read files unsafely.
    """
    strategy = trainer.strategy
    io = strategy.checkpoint_io
    if isinstance(io, SafeCheckpointIO):
        return
    if type(io) is not TorchCheckpointIO:
        raise ValueError(
            f"trainer.plugins: the checkpoint IO plugin {type(io).__name__} is not "
            "rtdetr_lit.plugins.SafeCheckpointIO, the one that reads checkpoints without "
            "running code in them; remove it from trainer.plugins"
        )
    strategy.checkpoint_io = SafeCheckpointIO()
