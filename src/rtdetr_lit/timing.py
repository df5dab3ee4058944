"""Timing on a busy machine: interleaved rounds, medians, and a line describing the machine.

Used by ``python -m rtdetr_lit.speed_accuracy`` and the ``scripts/bench/`` benchmarks. Candidates
are timed round by round (A, B, A, B, ...) so that load from elsewhere slows all of them alike;
ratios between candidates measured in one run are the numbers to read.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["compare", "load_average", "machine", "medians"]


def compare(
    candidates: Mapping[str, Callable[[], object]], warmup: int = 2, repeats: int = 5
) -> dict[str, list[float]]:
    """Wall times in seconds of each callable, measured interleaved in the same run.

    Every candidate runs ``warmup`` untimed calls first (one-off allocations, lazy caches), then
    ``repeats`` rounds each time every candidate once, in turn. Returns the samples per name.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def medians(samples: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The median of each candidate's samples."""
    return {name: statistics.median(times) for name, times in samples.items()}


def machine() -> str:
    """One line: CPU model, cores, threads used, Python, torch."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def load_average() -> str:
    """The 1/5/15-minute load averages: above the core count, others compete for the cores."""
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
