"""Shared helpers of the ``scripts/bench/*.py`` benchmarks: set-up, timing, machine, models.

The machine is small and shared, so every benchmark compares against a baseline measured in the
same run: :func:`compare` interleaves the candidates round by round (A, B, A, B, ...) so that a
burst of load from elsewhere hits all of them alike, and reports the median of each. Ratios
between candidates are the numbers to read; absolute times move with the load.

Usage in a script (its folder is on ``sys.path`` when a script there runs)::

    from _bench import compare, print_header, print_table, setup

    setup()
    print_header("Model")
    samples = compare({"ours": fn_a, "baseline": fn_b}, warmup=2, repeats=7)
    ratios = print_table(samples, baseline="baseline")  # median, min, paired ratio
    print(load_average())  # how busy the machine was by the end
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from rtdetr_lit.timing import compare, load_average, machine, medians

__all__ = [
    "THREADS",
    "build_module",
    "compare",
    "hf_labels",
    "hf_twin",
    "load_average",
    "machine",
    "medians",
    "optimizer_step",
    "print_header",
    "print_table",
    "profile_table",
    "random_targets",
    "setup",
    "train_step",
]

THREADS = 2


def setup(seed: int = 0) -> None:
    """Fix the thread count (the project machine has 2 cores), the seed and offline HF."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)


def print_header(title: str) -> None:
    print(f"# {title}")
    print(f"machine: {machine()}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {load_average()}")


def print_table(
    samples: Mapping[str, Sequence[float]], baseline: str, unit: str = "ms", paired: bool = True
) -> dict[str, float]:
    """Markdown table of median and minimum per case and the ratio to ``baseline``; returns the
    ratios. With ``paired`` (samples from :func:`compare`) the ratio is the median over rounds of
    the case's time over the baseline's time in the same round, which cancels load that changes
    from one round to the next; otherwise it is the ratio of the medians. Under load from
    elsewhere the minimum is the steadier absolute number."""
    scale = {"ms": 1e3, "s": 1.0, "us": 1e6}[unit]
    mid = medians(samples)
    if paired:
        base = samples[baseline]
        ratios = {
            name: statistics.median(t / b for t, b in zip(times, base, strict=True))
            for name, times in samples.items()
        }
    else:
        ratios = {name: mid[name] / mid[baseline] for name in samples}
    print(f"| case | median ({unit}) | min ({unit}) | ratio to {baseline} |")
    print("| --- | ---: | ---: | ---: |")
    digits = 3 if unit == "s" else 1
    for name, times in samples.items():
        low = min(times) * scale
        row = f"{mid[name] * scale:.{digits}f} | {low:.{digits}f} | {ratios[name]:.2f}"
        print(f"| {name} | {row} |")
    return ratios


def profile_table(fn: Callable[[], object], steps: int = 2, rows: int = 15) -> str:
    """torch.profiler table (CPU ops by self time) of ``steps`` calls of ``fn`` after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def build_module(name: str, num_classes: int, image_size: int):
    """The ``RTDETRModule`` that ``python -m rtdetr_lit.train model=<name>`` builds (criterion,
    matcher and optimizer settings from ``conf/``), without initial weights."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from rtdetr_lit.config import compose_config

    overrides = [
        f"model={name}",
        f"data.num_classes={num_classes}",
        f"data.image_size=[{image_size},{image_size}]",
    ]
    cfg = compose_config("train", overrides)
    GlobalHydra.instance().clear()
    return instantiate(cfg.model, init_from=None)


def random_targets(
    batch: int, num_classes: int, mean_boxes: int = 7, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """COCO-like targets: 1..2*mean_boxes-1 boxes per image (mean ``mean_boxes``), normalised
    cxcywh boxes of 2%..40% of the side, inside the image."""
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 2 * mean_boxes, (1,), generator=gen))
        size = 0.02 + 0.38 * torch.rand(n, 2, generator=gen)
        centre = size / 2 + (1 - size) * torch.rand(n, 2, generator=gen)
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        targets.append({"labels": labels, "boxes": torch.cat([centre, size], dim=1)})
    return targets


def hf_labels(targets: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Our targets in HF's ``labels`` spelling."""
    return [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]


def hf_twin(ours: nn.Module, num_classes: int, method: str = "grid_sample") -> nn.Module:
    """``transformers.RTDetrV2ForObjectDetection`` with the architecture of our ``r18`` and the
    weights of ``ours`` (through :func:`rtdetr_lit.convert.to_hf_state_dict`, strict load).
    Its loss settings are HF's defaults, which equal ours (matcher 2/5/2, VFL/L1/GIoU 1/5/2)."""
    import transformers

    from rtdetr_lit.convert import to_hf_state_dict

    backbone = transformers.RTDetrResNetConfig(
        depths=[2, 2, 2, 2], layer_type="basic", hidden_sizes=[64, 128, 256, 512],
        out_indices=[2, 3, 4],
    )  # fmt: skip
    config = transformers.RTDetrV2Config(
        backbone_config=backbone,
        encoder_in_channels=[128, 256, 512],
        hidden_expansion=0.5,
        decoder_layers=3,
        freeze_backbone_batch_norms=False,
        num_labels=num_classes,
        decoder_method={"grid_sample": "default", "discrete": "discrete"}[method],
    )
    hf = transformers.RTDetrV2ForObjectDetection(config)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)
    return hf


@contextmanager
def _phase(phases: dict[str, float] | None, name: str):
    start = time.perf_counter()
    yield
    if phases is not None:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    clip: float | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    phases: dict[str, float] | None = None,
) -> None:
    """After ``backward``: clip the global gradient norm at ``clip`` (what the Trainer's
    ``gradient_clip_val`` calls), step the optimizer, update ``ema`` from ``model``."""
    if clip is not None:
        with _phase(phases, "clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    with _phase(phases, "optimizer"):
        optimizer.step()
    if ema is not None:
        with _phase(phases, "ema"):
            ema.update_parameters(model)


def train_step(
    net: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: list[dict[str, torch.Tensor]],
    phases: dict[str, float] | None = None,
    autocast: torch.dtype | None = None,
    clip: float | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
) -> None:
    """One plain training step of our detector; adds each phase's seconds to ``phases``.
    With ``autocast`` (e.g. ``torch.bfloat16``) the forward runs under CPU autocast, as with the
    Trainer's ``precision=bf16-mixed``; the criterion computes in float32 either way. ``clip`` and
    ``ema`` as in :func:`optimizer_step`."""
    with _phase(phases, "forward"), torch.autocast("cpu", autocast, enabled=autocast is not None):
        outputs = net(images, targets)
    with _phase(phases, "loss"):
        loss = sum(criterion(outputs, targets).values())
    with _phase(phases, "backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    optimizer_step(net, optimizer, clip, ema, phases)
