"""Plain-text progress through Python logging, for logs that are files rather than terminals.

Under Hydra the ``rtdetr_lit`` loggers write to the console and to the run's ``train.log``, so
these lines reach a redirected ``make train > out.txt``, a SLURM output file and the run
directory alike. A progress bar draws only on a terminal; there it keeps showing the steps and
only the line after every validation is added.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

__all__ = [
    "Period",
    "PeriodCallback",
    "ProgressLog",
    "TrainMeter",
    "epoch_line",
    "eta_seconds",
    "follow_console_streams",
    "format_duration",
    "learning_rates",
    "stdout_is_terminal",
    "step_line",
]

log = logging.getLogger(__name__)


def format_duration(seconds: float | None) -> str:
    """``45s``, ``12m05s``, ``3h07m``, ``2d04h``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def eta_seconds(
    remaining_steps: int | None, seconds_per_step: float | None, overhead_per_step: float = 0.0
) -> float | None:
    """Time left for ``remaining_steps`` optimizer steps at ``seconds_per_step``, plus what the run
    spends outside the training batches (validation, checkpoints) spread over the steps; ``None``
    when the number of steps or their speed is unknown."""
    if remaining_steps is None or seconds_per_step is None:
        return None
    return max(0, remaining_steps) * (seconds_per_step + overhead_per_step)


def _epoch_text(epoch: int, max_epochs: int | None) -> str:
    # Counted from 0 like Lightning's progress bar and the checkpoint names (epoch_003.ckpt).
    return f"epoch {epoch}/{max_epochs - 1}" if max_epochs and max_epochs > 0 else f"epoch {epoch}"


def step_line(
    step: int,
    total_steps: int | None,
    epoch: int,
    max_epochs: int | None,
    loss: float | None,
    lr: float | None,
    seconds_per_step: float,
    eta: float | None,
) -> str:
    """``step 150/800  epoch 1/7  loss 9.8123  lr 2.00e-04  1.12 s/step  ETA 12m07s``."""
    parts = [f"step {step}/{total_steps}" if total_steps else f"step {step}"]
    parts.append(_epoch_text(epoch, max_epochs))
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    parts.append(f"{seconds_per_step:.2f} s/step")
    parts.append(f"ETA {format_duration(eta)}")
    return "  ".join(parts)


def epoch_line(
    epoch: int,
    max_epochs: int | None,
    train_loss: float | None,
    val: Mapping[str, float],
    best_map: float | None,
    seconds: float,
    val_seconds: float | None,
    eta: float | None,
) -> str:
    """``epoch 3/7  train loss 8.4210  val mAP 0.1523  mAP@0.5 0.3012  best mAP 0.1523  time
    1m58s (val 9s)  ETA 7m52s``; the val parts only when the period ended with a validation."""
    parts = [_epoch_text(epoch, max_epochs)]
    if train_loss is not None:
        parts.append(f"train loss {train_loss:.4f}")
    for label, key in (("val mAP", "val/mAP"), ("mAP@0.5", "val/mAP_50")):
        if key in val:
            parts.append(f"{label} {val[key]:.4f}")
    if best_map is not None:
        parts.append(f"best mAP {best_map:.4f}")
    time_text = f"time {format_duration(seconds)}"
    if val_seconds is not None:
        time_text += f" (val {format_duration(val_seconds)})"
    parts.append(time_text)
    parts.append(f"ETA {format_duration(eta)}")
    return "  ".join(parts)


def stdout_is_terminal() -> bool:
    """Whether standard output is an interactive terminal (not a file, a pipe or a SLURM log)."""
    try:
        return bool(sys.stdout.isatty())
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


class _CurrentStream:
    """Writes to whatever ``sys.<name>`` is at the time of writing."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        return getattr(sys, self.name).write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()


def follow_console_streams() -> list[tuple[logging.StreamHandler, Any]]:
    """Make the root logger's console handlers write to the current ``sys.stdout``/``stderr``;
    return each changed handler with its former stream.

    A console handler holds the stream it was configured with (Hydra's: ``sys.stdout``). Rich's
    live progress bar swaps in proxies for ``sys.stdout`` and ``sys.stderr`` that print above the
    bar; a line written to the original stream instead lands next to the bar, which then erases
    it when it redraws.
    """
    changed = []
    for handler in logging.getLogger().handlers:
        if type(handler) is not logging.StreamHandler:  # not the file handlers (subclasses)
            continue
        for name in ("stdout", "stderr"):
            if handler.stream is getattr(sys, f"__{name}__"):
                changed.append((handler, handler.setStream(_CurrentStream(name))))
    return changed


def learning_rates(trainer: L.Trainer) -> dict[str, float]:
    """``{"lr/<group name>": lr}`` of every parameter group (``lr/pg<i>`` for unnamed groups; the
    optimizer's index is added when there are several)."""
    optimizers = trainer.optimizers
    rates = {}
    for i, optimizer in enumerate(optimizers):
        prefix = f"lr/opt{i}/" if len(optimizers) > 1 else "lr/"
        for j, group in enumerate(optimizer.param_groups):
            rates[prefix + str(group.get("name", f"pg{j}"))] = float(group["lr"])
    return rates


class TrainMeter:
    """The ``train/`` metrics and the time of the training batches since the last :meth:`reset`.

    Loss terms (keys holding ``loss``) are averaged over the batches; other keys (a running count
    such as ``train/skipped_steps``) keep their last value. The sums stay tensors on the model's
    device, so adding a batch never waits for the device; they are read back when reported.
    """

    def __init__(self, step: int = 0) -> None:
        self.reset(step)

    def reset(self, step: int) -> None:
        """Start counting again at optimizer step ``step``, now."""
        self.start_step = step
        self.started = time.perf_counter()
        self.batches = 0
        self.train_seconds = 0.0
        self._sums: dict[str, Any] = {}
        self._counts: dict[str, int] = {}
        self._last: dict[str, Any] = {}

    def add(self, metrics: Mapping[str, Any], seconds: float) -> None:
        """Count one training batch: its logged ``metrics`` and the ``seconds`` it took."""
        for key, value in metrics.items():
            if not key.startswith("train/"):
                continue
            value = value.detach() if isinstance(value, torch.Tensor) else float(value)
            if "loss" in key:
                self._sums[key] = self._sums.get(key, 0.0) + value
                self._counts[key] = self._counts.get(key, 0) + 1
            else:
                self._last[key] = value
        self.batches += 1
        self.train_seconds += seconds

    def values(self) -> dict[str, float]:
        """Loss means and last values of the other keys, as floats."""
        out = {key: float(total) / self._counts[key] for key, total in self._sums.items()}
        out.update((key, float(value)) for key, value in self._last.items())
        return out

    def steps(self, step: int) -> int:
        """Optimizer steps since the reset, ``step`` being the trainer's current one."""
        return step - self.start_step

    def wall_seconds(self) -> float:
        """Wall-clock seconds since the reset, everything included."""
        return time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {
            "start_step": self.start_step,
            "elapsed": self.wall_seconds(),
            "batches": self.batches,
            "train_seconds": self.train_seconds,
            "sums": {key: float(total) for key, total in self._sums.items()},
            "counts": dict(self._counts),
            "last": {key: float(value) for key, value in self._last.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.start_step = state["start_step"]
        self.started = time.perf_counter() - state["elapsed"]
        self.batches = state["batches"]
        self.train_seconds = state["train_seconds"]
        self._sums = dict(state["sums"])
        self._counts = dict(state["counts"])
        self._last = dict(state["last"])


@dataclass
class Period:
    """The training since the previous report, closed by a validation or an epoch end."""

    epoch: int
    step: int
    # optimizer steps in the period
    steps: int
    # loss means and other train/ values (TrainMeter.values)
    train: dict[str, float]
    # the val/ metrics, empty when no validation closed the period
    val: dict[str, float]
    lr: dict[str, float]
    # wall-clock time of the period, validation included, and of its training batches
    seconds: float
    train_seconds: float
    # None when no validation closed the period
    val_seconds: float | None


class PeriodCallback(L.Callback):
    """Base of the callbacks that report once per period of training, on rank 0.

    A period is closed by every validation during fitting (with the default trainer, once per
    epoch, at its end) or by the end of an epoch that ran no validation; the subclass's
    :meth:`report` then receives it. The open period is saved in checkpoints, so an epoch resumed
    in the middle reports the means over all its batches.
    """

    def __init__(self) -> None:
        self.period = TrainMeter()
        self._restored = False
        self._anchor = time.perf_counter()
        self._val_started: float | None = None

    def report(self, trainer: L.Trainer, period: Period) -> None:
        raise NotImplementedError

    def count_batch(self, trainer: L.Trainer, metrics: Mapping[str, Any], seconds: float) -> None:
        """Count one training batch (``seconds``: since the previous batch ended)."""
        self.period.add(metrics, seconds)

    @staticmethod
    def _fitting(trainer: L.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._restored:
            self.period.reset(trainer.global_step)
        self._restored = False
        self._anchor = time.perf_counter()

    @rank_zero_only
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._anchor = time.perf_counter()

    @rank_zero_only
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        # The time since the previous batch ended: this batch's loading, step and hooks.
        self.count_batch(trainer, trainer.callback_metrics, now - self._anchor)
        self._anchor = now

    @rank_zero_only
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._fitting(trainer):
            self._val_started = time.perf_counter()

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._fitting(trainer) or self._val_started is None:
            return
        self._close(trainer, time.perf_counter() - self._val_started)
        self._val_started = None
        # The next batch's time starts after validation, not where the previous batch ended.
        self._anchor = time.perf_counter()

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.period.batches:  # batches since the last validation: an epoch without one
            self._close(trainer, None)

    def _close(self, trainer: L.Trainer, val_seconds: float | None) -> None:
        metrics = trainer.callback_metrics
        val = {}
        if val_seconds is not None:
            val = {k: float(v) for k, v in metrics.items() if k.startswith("val/")}
        period = Period(
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            steps=self.period.steps(trainer.global_step),
            train=self.period.values(),
            val=val,
            lr=learning_rates(trainer),
            seconds=self.period.wall_seconds(),
            train_seconds=self.period.train_seconds,
            val_seconds=val_seconds,
        )
        self.report(trainer, period)
        self.period.reset(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"period": self.period.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.period.load_state_dict(state_dict["period"])
        self._restored = True


class ProgressLog(PeriodCallback):
    """Progress lines through the ``rtdetr_lit.callbacks.progress`` logger, on rank 0.

    * A line at the start: the optimizer steps and epochs of the run, and where it resumes.
    * A step line (``step 150/800  epoch 1/7  loss ...  lr ...  s/step  ETA``) at every multiple
      of ``every_n_steps`` optimizer steps, and sooner when ``every_seconds`` have passed since the
      previous line (slow steps still show the run is alive); the loss and the seconds per step
      are averaged since the previous step line, the lr is the largest of the parameter groups.
      ``step_lines=None`` prints them only when standard output is not a terminal or no progress
      bar is shown (a progress bar shows the steps); ``True``/``False`` force them on or off.
    * After every validation (and after an epoch without one) an epoch line: the train loss
      averaged over the epoch, val mAP and mAP@0.5, the best val mAP so far, the epoch's time
      and the run's ETA.

    The ETA counts the remaining optimizer steps at the measured speed plus the time spent
    outside the training batches (validation, checkpoints) in the last period, per step; until
    the first validation, step lines leave validation out.

    On a terminal, while fitting, the root logger's console handlers write to the current
    ``sys.stdout`` (:func:`follow_console_streams`): every log line then prints above Rich's live
    progress bar, which would otherwise erase it when it redraws.
    """

    def __init__(
        self, every_n_steps: int = 50, every_seconds: float = 60.0, step_lines: bool | None = None
    ) -> None:
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be >= 1")
        if every_seconds <= 0:
            raise ValueError("every_seconds must be > 0")
        super().__init__()
        self.every_n_steps = every_n_steps
        self.every_seconds = every_seconds
        self.step_lines = step_lines
        self.best_map: float | None = None
        self.prints_steps = False
        self._interval = TrainMeter()
        self._total_steps: int | None = None
        self._overhead_per_step = 0.0
        self._last_line = time.perf_counter()
        self._followed: list[tuple[logging.StreamHandler, Any]] = []

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.step_lines is None:
            self.prints_steps = not stdout_is_terminal() or trainer.progress_bar_callback is None
        else:
            self.prints_steps = self.step_lines
        total = trainer.estimated_stepping_batches
        self._total_steps = int(total) if math.isfinite(total) else None
        self._interval.reset(trainer.global_step)
        self._last_line = time.perf_counter()
        if stdout_is_terminal():  # for the length of the fit: lines print above a live bar
            self._followed = follow_console_streams()
        log.info(self._start_line(trainer))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handler, stream in self._followed:
            handler.setStream(stream)
        self._followed = []

    def _start_line(self, trainer: L.Trainer) -> str:
        steps = f"{self._total_steps} optimizer steps" if self._total_steps else "no step limit"
        text = f"fitting: {steps}"
        if trainer.max_epochs and trainer.max_epochs > 0:
            text += f" in {trainer.max_epochs} epochs"
        if trainer.global_step:
            text += f", resuming at step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self.prints_steps:
            text += (
                f"; a progress line every {self.every_n_steps} steps "
                f"or {format_duration(self.every_seconds)}"
            )
        return text

    def count_batch(self, trainer: L.Trainer, metrics: Mapping[str, Any], seconds: float) -> None:
        super().count_batch(trainer, metrics, seconds)
        if not self.prints_steps:
            return
        self._interval.add(metrics, seconds)
        step, start = trainer.global_step, self._interval.start_step
        if step == start:
            return  # no optimizer step since the last line (or accumulating gradients)
        now = time.perf_counter()
        crossed = step // self.every_n_steps > start // self.every_n_steps
        if not crossed and now - self._last_line < self.every_seconds:
            return
        seconds_per_step = self._interval.train_seconds / (step - start)
        remaining = self._total_steps - step if self._total_steps else None
        rates = learning_rates(trainer)
        line = step_line(
            step,
            self._total_steps,
            trainer.current_epoch,
            trainer.max_epochs,
            self._interval.values().get("train/loss"),
            max(rates.values()) if rates else None,
            seconds_per_step,
            eta_seconds(remaining, seconds_per_step, self._overhead_per_step),
        )
        log.info(line)
        self._interval.reset(step)
        self._last_line = now

    def report(self, trainer: L.Trainer, period: Period) -> None:
        candidates = [self.best_map, period.val.get("val/mAP"), period.val.get("val/mAP_best")]
        known = [v for v in candidates if v is not None and math.isfinite(v)]
        self.best_map = max(known) if known else None
        eta = None
        if period.steps > 0:
            outside = max(0.0, period.seconds - period.train_seconds)
            self._overhead_per_step = outside / period.steps
            remaining = self._total_steps - period.step if self._total_steps else None
            eta = eta_seconds(remaining, period.seconds / period.steps)
        line = epoch_line(
            period.epoch,
            trainer.max_epochs,
            period.train.get("train/loss"),
            period.val,
            self.best_map,
            period.seconds,
            period.val_seconds,
            eta,
        )
        log.info(line)
        self._last_line = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_map": self.best_map}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_map = state_dict["best_map"]
