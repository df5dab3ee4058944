"""Speed tuning without retraining (docs/rtdetrv2.md §0.3, §0.5): mAP and latency of one checkpoint
as the number of decoder layers run at inference (``eval_idx``) and the sampling operator change.

    python -m rtdetr_lit.speed_accuracy ckpt_path=PATH [model=... data=... experiment=...]
        [--eval-idx 0 1 2] [--methods grid_sample discrete] [--runs 20] [--device cpu]

The arguments other than the script's ``--`` options are Hydra overrides of ``conf/eval.yaml``, as
for ``python -m rtdetr_lit.eval``: give the ``model=``/``data=`` (or ``experiment=``) of the run
that wrote the checkpoint. A ``key=value`` (or ``~key``) word is an override wherever it stands,
also right after the lists of ``--eval-idx`` and ``--methods``; after ``--`` every word is one.
Each point validates the whole val split (COCO mAP), then every point is timed on one image of
``data.image_size`` with the detector alone (RepVGG and conv+BN fused, as exported): ``--runs``
rounds that each run every point once, so that load from elsewhere slows all points alike; the
table has the median and the minimum. Writes ``speed_accuracy.csv`` and
``speed_accuracy.png`` (mAP against median latency) to the run directory
(``logs/speed_accuracy/runs/<date_time>/``).
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from rtdetr_lit.cli import hydra_main
from rtdetr_lit.config import register_schemas
from rtdetr_lit.inference import load_checkpoint_weights, read_checkpoint
from rtdetr_lit.models.deformable import SAMPLING_METHODS
from rtdetr_lit.run import prepare_run
from rtdetr_lit.timing import compare, load_average, machine

log = logging.getLogger("speed_accuracy")

register_schemas()

COLUMNS = (
    "sampling",
    "eval_idx",
    "decoder_layers",
    "mAP",
    "mAP_50",
    "latency_ms",
    "latency_min_ms",
)


def _is_override(word: str) -> bool:
    """A Hydra override (``key=value``, ``+key=value``, ``~key``), not an option or its value."""
    return not word.startswith("-") and ("=" in word or word.startswith("~"))


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The script's options, and the rest of ``argv`` (Hydra overrides and options).

    The overrides are taken out before argparse sees the words: ``--eval-idx`` and ``--methods``
    take any number of values, and would otherwise take the overrides that follow them as more
    values (``--methods discrete ckpt_path=last.ckpt``). Words after ``--`` are all passed on.
    """
    words = list(argv)
    passed: list[str] = []
    if "--" in words:
        cut = words.index("--")
        words, passed = words[:cut], words[cut + 1 :]
    overrides = [w for w in words if _is_override(w)]
    options = [w for w in words if not _is_override(w)]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other arguments are Hydra overrides of conf/eval.yaml (ckpt_path=... is required): "
        "key=value words wherever they stand, and every word after --.",
    )
    parser.add_argument(
        "--eval-idx", type=int, nargs="+", help="decoder layers to stop at (default: every one)"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=SAMPLING_METHODS, default=list(SAMPLING_METHODS)
    )
    parser.add_argument("--runs", type=int, default=20, help="timed passes per point")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes per point first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args, unknown = parser.parse_known_args(options)  # Hydra's own options (--cfg job) pass on
    return args, [*unknown, *overrides, *passed]


@torch.inference_mode()
def _detect(net: torch.nn.Module, image: torch.Tensor, method: str, eval_idx: int) -> None:
    net.set_sampling_method(method)
    net.eval_idx = eval_idx
    net(image)
    if image.device.type == "cuda":
        torch.cuda.synchronize()


def sweep(cfg: DictConfig, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Validate and time the checkpoint for every sampling method and ``eval_idx``."""
    from hydra.utils import instantiate

    prepare_run(cfg)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model, init_from=None)
    load_checkpoint_weights(module.net, read_checkpoint(cfg.ckpt_path), cfg)
    net = module.net.deploy()  # fusing is exact: the same mAP, the deployed speed
    num_layers = net.decoder.num_layers
    indices = args.eval_idx if args.eval_idx is not None else list(range(num_layers))
    for k in indices:  # fail before the first (long) validation
        net.eval_idx = k
    # No callbacks (a finetune callback would set the sampling method) and no logger: the
    # results go to the table.
    trainer = instantiate(cfg.trainer, callbacks=[], logger=False)
    rows = []
    for method in args.methods:
        net.set_sampling_method(method)
        for k in indices:
            net.eval_idx = k
            (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
            rows.append(
                {
                    "sampling": method,
                    "eval_idx": k,
                    "decoder_layers": k % num_layers + 1,
                    "mAP": float(metrics["val/mAP"]),
                    "mAP_50": float(metrics["val/mAP_50"]),
                }
            )
            log.info("%-11s eval_idx %2d  mAP %.4f", method, k, rows[-1]["mAP"])
    # Timed interleaved, a pass of every point per round, so that load from elsewhere on the
    # machine slows all points alike.
    net.to(args.device).eval()
    image = torch.rand(1, 3, *cfg.data.image_size, device=args.device)
    log.info("timing on %s; %s", machine(), load_average())
    samples = compare(
        {
            f"{r['sampling']} {r['eval_idx']}": partial(
                _detect, net, image, r["sampling"], r["eval_idx"]
            )
            for r in rows
        },
        warmup=args.warmup,
        repeats=args.runs,
    )
    for r, times in zip(rows, samples.values(), strict=True):
        r["latency_ms"] = statistics.median(times) * 1e3
        r["latency_min_ms"] = min(times) * 1e3
    return rows


def write_table(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """``rows`` as CSV (one line per sampling method and eval_idx)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            digits = {"mAP": 4, "mAP_50": 4, "latency_ms": 2, "latency_min_ms": 2}
            writer.writerow({k: f"{r[k]:.{digits[k]}f}" if k in digits else r[k] for k in COLUMNS})
    return path


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(
            f"| {r['sampling']} | {r['eval_idx']} | {r['decoder_layers']} | {r['mAP']:.4f} | "
            f"{r['mAP_50']:.4f} | {r['latency_ms']:.2f} | {r['latency_min_ms']:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """mAP against latency, one line per sampling method, points labelled by decoder layers; a
    900 x 600 PNG drawn on a bare matplotlib Figure with the Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method in dict.fromkeys(r["sampling"] for r in rows):
        points = sorted(
            (r for r in rows if r["sampling"] == method), key=lambda r: r["decoder_layers"]
        )
        x = [r["latency_ms"] for r in points]
        y = [r["mAP"] for r in points]
        (line,) = ax.plot(x, y, marker="o", linewidth=2, label=method)
        for r in points:
            ax.annotate(
                f"{r['decoder_layers']}L",
                (r["latency_ms"], r["mAP"]),
                xytext=(6, 6),
                textcoords="offset points",
                color=line.get_color(),
                fontsize=9,
            )
    ax.margins(0.1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.set_xlabel("latency per image (ms)")
    ax.set_ylabel("mAP (COCO 0.50:0.95)")
    ax.legend(title="sampling")
    fig.savefig(path, format="png")
    return path


def run(cfg: DictConfig, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Sweep, then write the table and the plot to the run directory."""
    rows = sweep(cfg, args)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = "x".join(str(s) for s in cfg.data.image_size)
    title = f"{cfg.model.net.name}: mAP vs latency (batch 1, {size}, {args.device})"
    table = write_table(rows, out / "speed_accuracy.csv")
    picture = plot(rows, out / "speed_accuracy.png", title)
    log.info("\n%s\ntable: %s\nplot: %s", markdown(rows), table, picture)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # Hydra reads sys.argv; its run directory is logs/speed_accuracy/runs/<date_time>.
    sys.argv = [sys.argv[0], "task_name=speed_accuracy", *overrides]

    @hydra_main("eval")
    def task(cfg: DictConfig) -> None:
        run(cfg, args)

    task()


if __name__ == "__main__":
    main()
