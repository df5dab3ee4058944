"""Progress lines: their text, the ETA, the terminal switch, rank 0, and a real (tiny) fit."""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from rtdetr_lit.callbacks import ProgressLog, progress
from rtdetr_lit.callbacks.progress import (
    TrainMeter,
    epoch_line,
    eta_seconds,
    format_duration,
    step_line,
)
from rtdetr_lit.run import prepare_run, rank_zero_filter

from .toy import fit_toy

LOGGER = "rtdetr_lit.callbacks.progress"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "?"), (float("inf"), "?"), (0, "0s"), (59.4, "59s"), (61, "1m01s"),
     (3 * 3600 + 7 * 60 + 59, "3h07m"), (2 * 86400 + 4 * 3600, "2d04h"), (-3, "0s")],
)  # fmt: skip
def test_durations_read_at_a_glance(seconds, text) -> None:
    assert format_duration(seconds) == text


def test_eta_counts_the_steps_left_at_the_speed_and_the_time_between_steps() -> None:
    assert eta_seconds(100, 1.5) == 150
    assert eta_seconds(100, 1.5, overhead_per_step=0.5) == 200
    assert eta_seconds(-2, 1.5) == 0
    assert eta_seconds(None, 1.5) is None and eta_seconds(10, None) is None


def test_step_and_epoch_lines() -> None:
    assert (
        step_line(150, 800, 1, 8, 9.81234, 2e-4, 1.1234, 727)
        == "step 150/800  epoch 1/7  loss 9.8123  lr 2.00e-04  1.12 s/step  ETA 12m07s"
    )
    # unknown total steps and epochs, nothing logged
    assert step_line(5, None, 0, -1, None, None, 2.0, None) == "step 5  epoch 0  2.00 s/step  ETA ?"
    val = {"val/mAP": 0.15234, "val/mAP_50": 0.30123, "val/mAP_75": 0.1}
    assert (
        epoch_line(3, 8, 8.421, val, 0.16, 118, 9.2, 472)
        == "epoch 3/7  train loss 8.4210  val mAP 0.1523  mAP@0.5 0.3012  best mAP 0.1600  "
        "time 1m58s (val 9s)  ETA 7m52s"
    )
    assert epoch_line(3, 8, 8.421, {}, None, 110, None, 0) == "epoch 3/7  train loss 8.4210  " + (
        "time 1m50s  ETA 0s"
    )


def test_meter_averages_losses_and_keeps_the_last_count() -> None:
    meter = TrainMeter(step=10)
    for i in range(4):
        metrics = {
            "train/loss": torch.tensor(float(i)),
            "train/loss_vfl": torch.tensor(2.0 * i),
            "train/skipped_steps": torch.tensor(float(i // 2)),
            "val/mAP": torch.tensor(0.5),  # not a train metric
        }
        meter.add(metrics, seconds=0.5)
    assert meter.values() == {"train/loss": 1.5, "train/loss_vfl": 3.0, "train/skipped_steps": 1.0}
    assert meter.batches == 4 and meter.train_seconds == 2.0 and meter.steps(14) == 4

    again = TrainMeter()
    again.load_state_dict(meter.state_dict())
    again.add({"train/loss": torch.tensor(9.0)}, seconds=1.0)
    assert again.values()["train/loss"] == pytest.approx((0 + 1 + 2 + 3 + 9) / 5)
    assert again.start_step == 10 and again.batches == 5 and again.train_seconds == 3.0


class _Clock:
    """Stands in for the ``time`` module of the progress callbacks: time moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


class _Stdout(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(progress, "time", fake)
    return fake


def _trainer(total: int = 20, max_epochs: int = 2, bar: bool = True) -> SimpleNamespace:
    """What the callbacks read of a Trainer."""
    groups = [{"name": "backbone", "lr": 1e-5}, {"name": "head", "lr": 1e-4}]
    return SimpleNamespace(
        global_step=0,
        current_epoch=0,
        max_epochs=max_epochs,
        estimated_stepping_batches=total,
        callback_metrics={},
        optimizers=[SimpleNamespace(param_groups=groups)],
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        sanity_checking=False,
        progress_bar_callback=object() if bar else None,
    )


def _epoch(callback, trainer, clock: _Clock, steps: int = 10, val_map: float = 0.3) -> None:
    """An epoch of ``steps`` optimizer steps of 2 s, the loss being the step number, then a
    validation of 10 s."""
    callback.on_train_epoch_start(trainer, None)
    for i in range(steps):
        clock.now += 2.0
        trainer.global_step += 1
        trainer.callback_metrics = {"train/loss": torch.tensor(float(trainer.global_step))}
        callback.on_train_batch_end(trainer, None, None, None, i)
    callback.on_validation_start(trainer, None)
    clock.now += 10.0
    trainer.callback_metrics.update({"val/mAP": torch.tensor(val_map), "val/mAP_50": 0.5})
    callback.on_validation_end(trainer, None)
    callback.on_train_epoch_end(trainer, None)
    trainer.current_epoch += 1


def _fit(callback, trainer, clock: _Clock, caplog, maps=(0.3, 0.2)) -> list[str]:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        callback.on_train_start(trainer, None)
        for val_map in maps:
            _epoch(callback, trainer, clock, val_map=val_map)
        callback.teardown(trainer, None, "fit")
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_lines_of_a_run_in_a_log_file(clock, caplog, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdout", _Stdout(terminal=False))
    lines = _fit(ProgressLog(every_n_steps=5, every_seconds=3600), _trainer(), clock, caplog)
    assert lines == [
        "fitting: 20 optimizer steps in 2 epochs; a progress line every 5 steps or 1h00m",
        # the mean loss of steps 1-5, the head's lr; 15 steps of 2 s left
        "step 5/20  epoch 0/1  loss 3.0000  lr 1.00e-04  2.00 s/step  ETA 30s",
        "step 10/20  epoch 0/1  loss 8.0000  lr 1.00e-04  2.00 s/step  ETA 20s",
        # 10 steps of 2 s and a validation of 10 s: 3 s a step, everything included
        "epoch 0/1  train loss 5.5000  val mAP 0.3000  mAP@0.5 0.5000  best mAP 0.3000  "
        "time 30s (val 10s)  ETA 30s",
        # the validation does not slow the steps down, but counts in the ETA (1 s a step)
        "step 15/20  epoch 1/1  loss 13.0000  lr 1.00e-04  2.00 s/step  ETA 15s",
        "step 20/20  epoch 1/1  loss 18.0000  lr 1.00e-04  2.00 s/step  ETA 0s",
        "epoch 1/1  train loss 15.5000  val mAP 0.2000  mAP@0.5 0.5000  best mAP 0.3000  "
        "time 30s (val 10s)  ETA 0s",
    ]


def test_slow_steps_print_a_line_every_so_many_seconds(clock, caplog, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdout", _Stdout(terminal=False))
    lines = _fit(ProgressLog(every_n_steps=100, every_seconds=5), _trainer(), clock, caplog)
    steps = [int(m.group(1)) for m in map(re.compile(r"step (\d+)/").match, lines) if m]
    # 2 s a step: at the 3rd step after the previous line (an epoch line counts too)
    assert steps == [3, 6, 9, 13, 16, 19]
    assert all("2.00 s/step" in line for line in lines if line.startswith("step"))


def test_validation_in_the_middle_of_an_epoch(clock, caplog, monkeypatch) -> None:
    """(val_check_interval < 1.) The validation closes a period and leaves the steps' speed
    alone; the end of the epoch closes the rest, without val metrics."""
    monkeypatch.setattr(sys, "stdout", _Stdout(terminal=False))
    callback, trainer = ProgressLog(every_n_steps=6), _trainer(total=6, max_epochs=1)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        callback.on_train_start(trainer, None)
        callback.on_train_epoch_start(trainer, None)
        for i in range(6):
            if i == 3:
                callback.on_validation_start(trainer, None)
                clock.now += 10.0
                trainer.callback_metrics["val/mAP"] = torch.tensor(0.25)
                callback.on_validation_end(trainer, None)
            clock.now += 2.0
            trainer.global_step += 1
            trainer.callback_metrics["train/loss"] = torch.tensor(1.0)
            callback.on_train_batch_end(trainer, None, None, None, i)
        callback.on_train_epoch_end(trainer, None)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER][1:]
    assert lines == [
        "epoch 0/0  train loss 1.0000  val mAP 0.2500  best mAP 0.2500  time 16s (val 10s)  "
        "ETA 16s",
        "step 6/6  epoch 0/0  loss 1.0000  lr 1.00e-04  2.00 s/step  ETA 0s",
        "epoch 0/0  train loss 1.0000  best mAP 0.2500  time 6s  ETA 0s",
    ]


@pytest.mark.parametrize(
    ("terminal", "bar", "step_lines", "printed"),
    [
        (False, True, None, True),  # a file, a pipe, a SLURM log
        (True, True, None, False),  # a terminal: the progress bar shows the steps
        (True, False, None, True),  # a terminal without a progress bar
        (True, True, True, True),
        (False, True, False, False),
    ],
)
def test_step_lines_only_where_no_progress_bar_shows_the_steps(
    terminal, bar, step_lines, printed, clock, caplog, monkeypatch
) -> None:
    monkeypatch.setattr(sys, "stdout", _Stdout(terminal))
    callback = ProgressLog(every_n_steps=5, step_lines=step_lines)
    lines = _fit(callback, _trainer(bar=bar), clock, caplog)
    assert callback.prints_steps is printed
    assert sum(line.startswith("step ") for line in lines) == (4 if printed else 0)
    # the epoch lines always
    assert [line.split("  ")[0] for line in lines if line.startswith("epoch")] == [
        "epoch 0/1",
        "epoch 1/1",
    ]


def test_on_a_terminal_log_lines_go_through_the_current_stdout(clock, caplog, monkeypatch):
    """Rich's live bar replaces sys.stdout with a proxy printing above the bar: while fitting,
    the console handler (which holds the original stream) writes to whatever sys.stdout is."""
    console = logging.StreamHandler(sys.__stdout__)
    console.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(console)
    try:
        monkeypatch.setattr(sys, "stdout", _Stdout(terminal=True))
        callback = ProgressLog()
        trainer = _trainer()
        callback.on_train_start(trainer, None)
        logging.getLogger("rtdetr_lit.test").warning("above the bar")
        assert "above the bar" in sys.stdout.getvalue()
        callback.teardown(trainer, None, "fit")
        assert console.stream is sys.__stdout__
    finally:
        root.removeHandler(console)


def test_other_ranks_print_nothing(clock, caplog, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdout", _Stdout(terminal=False))
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert _fit(ProgressLog(every_n_steps=5), _trainer(), clock, caplog) == []


def test_best_map_survives_a_resume(clock, caplog, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdout", _Stdout(terminal=False))
    first = ProgressLog()
    _fit(first, _trainer(), clock, caplog, maps=(0.4,))
    resumed = ProgressLog()
    resumed.load_state_dict(first.state_dict())
    caplog.clear()
    lines = _fit(resumed, _trainer(), clock, caplog, maps=(0.1,))
    assert "best mAP 0.4000" in lines[-1]


def test_a_real_fit_prints_its_lines(tmp_path: Path, caplog, monkeypatch) -> None:
    """Lightning's own hook order: a step line every 2 of the 4 steps an epoch, one epoch line
    after each validation, with the val metrics of that validation."""
    monkeypatch.setattr(sys, "stdout", _Stdout(terminal=False))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        fit_toy(tmp_path, [ProgressLog(every_n_steps=2)], enable_checkpointing=False)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines[0].startswith("fitting: 8 optimizer steps in 2 epochs")
    assert [line.split("  ")[0] for line in lines[1:]] == [
        "step 2/8", "step 4/8", "epoch 0/1", "step 6/8", "step 8/8", "epoch 1/1"
    ]  # fmt: skip
    assert "val mAP 0.1000  mAP@0.5 0.2000  best mAP 0.1000" in lines[3]
    assert "val mAP 0.2000  mAP@0.5 0.4000  best mAP 0.2000" in lines[6]
    assert re.search(r"lr 1\.00e-02  \d+\.\d\d s/step  ETA \S+$", lines[1])


def test_information_comes_from_rank_zero_only(cfg_train, monkeypatch) -> None:
    """Every DDP rank runs the entry point: ``prepare_run`` gives the console and run-file
    handlers a filter that passes information from rank 0 only, warnings from every rank."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    prepare_run(cfg_train)
    prepare_run(cfg_train)  # once per handler, however often the entry point sets up
    assert handler.filters == [rank_zero_filter]
    stream.truncate(0)
    stream.seek(0)
    for name in ("rtdetr_lit.train", "rtdetr_lit.module", "rtdetr_lit.data.datamodule"):
        logger = logging.getLogger(name)
        logger.info("%s: from rank 0", name)
        monkeypatch.setattr(rank_zero_only, "rank", 1)
        logger.info("%s: information from rank 1", name)
        logger.warning("%s: a warning from rank 1", name)
        monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert stream.getvalue().splitlines() == [
        line
        for name in ("rtdetr_lit.train", "rtdetr_lit.module", "rtdetr_lit.data.datamodule")
        for line in (f"{name}: from rank 0", f"{name}: a warning from rank 1")
    ]
