"""HungarianMatcher time per call against a naive per-image matcher; its share of a train step.

Part 1: batch 16 x 300 queries x 80 classes, 1..13 boxes per image (mean 7, COCO-like). Ours
builds the cost of the whole batch in one go and copies it to the host once; the naive baseline
builds each image's cost separately (the same cost formula: ``HungarianMatcher.cost_matrix`` on a
one-image slice) and copies it to the host per image. Both solve with scipy; the assignments
are checked to be identical. On this CPU-only machine the host copies are free, so the ratio
measures the batched cost against per-image kernel launches; on a GPU each naive copy also
synchronises the device.

Part 2: the matcher's share of one training step (forward, loss, backward, AdamW step) of r18 at
640x640, batch 2, built from ``conf/model/r18.yaml``. The criterion calls the matcher four
times per step (final layer, two earlier layers, encoder selection).

    .venv/bin/python scripts/bench/matcher.py [--repeats 20] [--train-repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from _bench import (
    build_module,
    compare,
    load_average,
    print_header,
    print_table,
    random_targets,
    setup,
    train_step,
)
from rtdetr_lit.loss import HungarianMatcher

BATCH, QUERIES, NUM_CLASSES = 16, 300, 80
TRAIN_BATCH, TRAIN_SIZE = 2, 640


def naive_match(
    matcher: HungarianMatcher, outputs: dict[str, torch.Tensor], targets: list[dict]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image: its own cost matrix, its own host copy, scipy."""
    indices = []
    for i, target in enumerate(targets):
        one = {k: v[i : i + 1] for k, v in outputs.items()}
        cost = matcher.cost_matrix(one, [target])[0].cpu()
        rows, cols = linear_sum_assignment(cost.numpy())
        indices.append((torch.as_tensor(rows), torch.as_tensor(cols)))
    return indices


def solve_only(cost: torch.Tensor, sizes: list[int]) -> None:
    """scipy alone on a precomputed batch cost (the part both matchers share)."""
    cost_np = cost.numpy()
    for i, n in enumerate(sizes):
        linear_sum_assignment(cost_np[i, :, :n])


class TimedMatcher(nn.Module):
    """Wraps a matcher and accumulates the wall time of its calls."""

    def __init__(self, matcher: nn.Module) -> None:
        super().__init__()
        self.matcher = matcher
        self.seconds = 0.0
        self.calls = 0

    def forward(self, outputs, targets):
        start = time.perf_counter()
        indices = self.matcher(outputs, targets)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return indices


def bench_calls(matcher: HungarianMatcher, warmup: int, repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    outputs = {
        "pred_logits": torch.randn(BATCH, QUERIES, NUM_CLASSES, generator=gen),
        "pred_boxes": torch.rand(BATCH, QUERIES, 4, generator=gen) * 0.5 + 0.25,
    }
    targets = random_targets(BATCH, NUM_CLASSES, mean_boxes=7, seed=1)
    sizes = [len(t["boxes"]) for t in targets]
    for (r1, c1), (r2, c2) in zip(
        matcher(outputs, targets), naive_match(matcher, outputs, targets), strict=True
    ):
        if not (torch.equal(r1, r2) and torch.equal(c1, c2)):
            raise AssertionError("batched and naive matchers disagree")
    cost = matcher.cost_matrix(outputs, targets)
    print(
        f"\n## per call: batch {BATCH} x {QUERIES} queries x {NUM_CLASSES} classes, "
        f"{sum(sizes)} boxes ({min(sizes)}..{max(sizes)} per image)"
    )
    samples = compare(
        {
            "naive per image": lambda: naive_match(matcher, outputs, targets),
            "ours (batched)": lambda: matcher(outputs, targets),
            "ours: cost matrix only": lambda: matcher.cost_matrix(outputs, targets),
            "scipy only (both)": lambda: solve_only(cost, sizes),
        },
        warmup,
        repeats,
    )
    print(f"warm-up {warmup}, {repeats} interleaved rounds")
    ratio = print_table(samples, baseline="naive per image")["ours (batched)"]
    print(f"ours / naive = {ratio:.2f}")


def bench_share(module, warmup: int, repeats: int) -> None:
    net, criterion = module.net.train(), module.criterion
    timed = TimedMatcher(criterion.matcher)
    criterion.matcher = timed
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4)
    images = torch.rand(TRAIN_BATCH, 3, TRAIN_SIZE, TRAIN_SIZE)
    targets = random_targets(TRAIN_BATCH, NUM_CLASSES, mean_boxes=7, seed=2)
    for _ in range(warmup):
        train_step(net, criterion, optimizer, images, targets)
    steps, matcher_times = [], []
    phases: dict[str, list[float]] = {}
    for _ in range(repeats):
        timed.seconds, timed.calls, step_phases = 0.0, 0, {}
        start = time.perf_counter()
        train_step(net, criterion, optimizer, images, targets, step_phases)
        steps.append(time.perf_counter() - start)
        matcher_times.append(timed.seconds)
        for name, seconds in step_phases.items():
            phases.setdefault(name, []).append(seconds)
    step, match = statistics.median(steps), statistics.median(matcher_times)
    print(
        f"\n## share of a training step: r18, {TRAIN_SIZE}x{TRAIN_SIZE}, batch {TRAIN_BATCH}, "
        f"{sum(len(t['boxes']) for t in targets)} boxes; warm-up {warmup}, median of {repeats}"
    )
    print("| part | median (ms) | share of step |")
    print("| --- | ---: | ---: |")
    print(f"| whole step | {step * 1e3:.1f} | 1.000 |")
    for name, times in phases.items():
        seconds = statistics.median(times)
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / step:.3f} |")
    print(f"| matcher ({timed.calls} calls, in loss) | {match * 1e3:.1f} | {match / step:.3f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--train-repeats", type=int, default=3)
    args = parser.parse_args(argv)

    setup()
    print_header("Matcher")
    module = build_module("r18", NUM_CLASSES, TRAIN_SIZE)  # the configured r18 training set-up
    print(f"matcher: {module.criterion.matcher}")
    bench_calls(module.criterion.matcher, args.warmup, args.repeats)
    bench_share(module, 1, args.train_repeats)
    print(load_average())


if __name__ == "__main__":
    main()
