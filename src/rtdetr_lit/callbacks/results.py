"""``results.csv`` (a row per epoch) and ``results.png`` (its curves) in the run directory."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from rtdetr_lit.callbacks.progress import Period, PeriodCallback
from rtdetr_lit.checkpoints import atomic_write

__all__ = ["ResultsTable", "draw_results", "write_results"]

log = logging.getLogger(__name__)

# The mAP panel: column and legend label.
_MAP_CURVES = (("val/mAP", "mAP"), ("val/mAP_50", "mAP@0.5"))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_results(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """The rows as CSV, columns in the order they first appear; a cell a row lacks is empty."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    writer.writerows([_cell(row.get(key)) for key in columns] for row in rows)
    # a reader (or a kill) never sees half a file
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def draw_results(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Small panels against the epoch: one per loss term (``train/*loss*``), and val mAP with
    mAP@0.5. Drawn on a bare matplotlib Figure with the Agg canvas: no pyplot, no global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = list(dict.fromkeys(key for row in rows for key in row))
    panels = [(key.removeprefix("train/"), [(key, None)]) for key in keys if _is_loss(key)]
    if any(key in keys for key, _ in _MAP_CURVES):
        panels.append(("val mAP", [curve for curve in _MAP_CURVES if curve[0] in keys]))
    if not panels:
        return
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    width, height = 3.2 * ncols, 2.4 * nrows
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    # Fixed margins (inches) rather than tight_layout, which lays the figure out by drawing it
    # once more: about 40% of the redraw time.
    fig.subplots_adjust(
        left=0.6 / width,
        right=1 - 0.15 / width,
        bottom=0.45 / height,
        top=1 - 0.3 / height,
        wspace=0.35,
        hspace=0.55,
    )
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    epochs = [row["epoch"] for row in rows]
    for ax, (title, curves) in zip(axes, panels, strict=False):
        for key, label in curves:
            points = [(row["epoch"], row[key]) for row in rows if _is_number(row.get(key))]
            if points:
                x, y = zip(*points, strict=True)
                ax.plot(x, y, marker="o", markersize=3, linewidth=1.2, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        # Whole epochs, with room around the points (also when there is a single one).
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _is_loss(key: str) -> bool:
    return key.startswith("train/") and "loss" in key


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


class ResultsTable(PeriodCallback):
    """After every validation, a row in ``<run dir>/<csv_name>`` and ``<plot_name>`` redrawn.

    A row: ``epoch``, ``step``, the ``train/`` metrics (loss terms averaged over the epoch, other
    keys as last logged), the learning rate of each parameter group (``lr/<group>``), every
    ``val/`` metric, the epoch's wall-clock ``time`` and its ``val_time`` (seconds). With the
    default trainer that is one row per epoch; an epoch without validation gets a row without
    val columns. Rank 0 only.

    The rows are kept in the callback's state, saved in every checkpoint: a resumed run rewrites
    both files from them (in its own run directory, or in the same one for ``ckpt_path=auto``,
    where rows of epochs after the checkpoint are dropped and written again when redone).
    ``plot_name=None`` writes no picture.
    """

    def __init__(self, csv_name: str = "results.csv", plot_name: str | None = "results.png"):
        super().__init__()
        self.csv_name = csv_name
        self.plot_name = plot_name
        self.rows: list[dict[str, Any]] = []

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        out = Path(trainer.default_root_dir)
        pictures = f" and {out / self.plot_name}" if self.plot_name else ""
        log.info("after every validation: a row in %s%s", out / self.csv_name, pictures)
        if self.rows:  # resumed: the history up to the checkpoint
            self._write(trainer)

    def report(self, trainer: L.Trainer, period: Period) -> None:
        self.rows.append(
            {
                "epoch": period.epoch,
                "step": period.step,
                **period.train,
                **period.lr,
                **period.val,
                "time": period.seconds,
                "val_time": period.val_seconds,
            }
        )
        self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        out = Path(trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_results(self.rows, out / self.csv_name)
        if self.plot_name:
            draw_results(self.rows, out / self.plot_name)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rows": [dict(row) for row in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.rows = [dict(row) for row in state_dict["rows"]]
