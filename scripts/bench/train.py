"""One training step, ours vs HF, and the Lightning overhead per step.

Part 1: one step (forward with denoising, loss, backward, gradient clipping at 0.1, AdamW step,
EMA update) of our r18 at 640x640, batch 2 (criterion from ``conf/model/r18.yaml``, optimizer as
training builds it: parameter groups, fused AdamW) against ``RTDetrV2ForObjectDetection`` with the
same architecture and the same initial weights, trained with its own loss (``labels=``) and the HF
Trainer's default optimizer (fused AdamW) at the same learning rate; same clipping and EMA update
(one foreach lerp over parameters and buffers), same images and boxes, interleaved in one
process. Ratio: ours / HF. Ours is built as the configs build it (channels-last convolutions);
for a layout-for-layout view also ours in NCHW, and for scale ours with a bfloat16-autocast
forward (the Trainer's ``precision=bf16-mixed``; fast on CPUs with AVX512-BF16).

Part 2: the demo model at 256x256, batch 2, on an in-memory dataset: time per step of a plain
PyTorch loop (``training_step``, ``backward``, ``step``) against ``Trainer.fit`` on the same
``RTDETRModule`` set-up (no logger, progress bar, checkpointing, validation or callbacks). Both
time from one step's start to the next one's, data fetching included; the first steps of each
run are dropped. Plain and Lightning runs alternate. Overhead: Lightning / plain - 1.

Part 3: the same demo step through ``Trainer.fit`` with clipping at 0.1, ``precision=bf16-mixed``
against ``32-true``, alternating. Ratio: bf16-mixed / 32-true.

    .venv/bin/python scripts/bench/train.py [--repeats 3] [--rounds 3] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset

from _bench import (
    build_module,
    compare,
    hf_labels,
    hf_twin,
    load_average,
    optimizer_step,
    print_header,
    print_table,
    profile_table,
    random_targets,
    setup,
    train_step,
)

NUM_CLASSES = 80
TARGET_STEP = 0.8  # ours / HF
CLIP = 0.1  # docs/rtdetrv2.md §9, conf/trainer/default.yaml
TARGET_OVERHEAD = 0.05  # Lightning / plain - 1
DEMO_SIZE, BATCH = 256, 2
BASELINE_STEP, OURS_STEP = "HF RTDetrV2 + its loss", "ours + RTDETRCriterion"


def _ema(model: torch.nn.Module) -> AveragedModel:
    """An EMA of every parameter and buffer, updated by one foreach lerp, as the EMA callback's
    (without its warm-up ramp of the decay, a scalar)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9999), use_buffers=True)


def bench_step(warmup: int, repeats: int, profile: bool) -> None:
    size = 640
    module = build_module("r18", NUM_CLASSES, size)
    module.scheduler_factory = None  # needs a Trainer to size itself
    module_nchw = copy.deepcopy(module)
    module_nchw.net.channels_last = False
    net, net_nchw, criterion = module.net.train(), module_nchw.net.train(), module.criterion
    hf = hf_twin(net, NUM_CLASSES).train()
    # ours: the optimizer training builds (parameter groups, fused AdamW); HF: the Trainer's
    # default optimizer (fused AdamW) at the same learning rate and weight decay
    optimizers = {m.net: m.configure_optimizers()["optimizer"] for m in (module, module_nchw)}
    optimizers[hf] = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=1e-4, fused=True)
    emas = {model: _ema(model) for model in optimizers}
    images = torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    targets = random_targets(BATCH, NUM_CLASSES, mean_boxes=7, seed=2)
    labels = hf_labels(targets)

    def hf_step() -> None:
        loss = hf(pixel_values=images, labels=labels).loss
        optimizers[hf].zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(hf, optimizers[hf], CLIP, emas[hf])

    def ours(model: torch.nn.Module, autocast: torch.dtype | None = None):
        return lambda: train_step(
            model, criterion, optimizers[model], images, targets, autocast=autocast,
            clip=CLIP, ema=emas[model],
        )  # fmt: skip

    candidates = {
        BASELINE_STEP: hf_step,
        OURS_STEP: ours(net),
        "ours in NCHW (channels_last=False)": ours(net_nchw),
        "ours + bf16 autocast forward": ours(net, torch.bfloat16),
    }
    print(
        f"\n## training step: r18, {size}x{size}, batch {BATCH}, "
        f"{sum(len(t['boxes']) for t in targets)} boxes, clip {CLIP}, fused AdamW, EMA; "
        f"warm-up {warmup}, {repeats} interleaved rounds"
    )
    samples = compare(candidates, warmup, repeats)
    ratio = print_table(samples, baseline=BASELINE_STEP, unit="s")[OURS_STEP]
    verdict = "met" if ratio <= TARGET_STEP else "NOT met"
    print(f"ours / HF = {ratio:.3f} (float32; target <= {TARGET_STEP}: {verdict})")
    if profile:
        for name in (BASELINE_STEP, OURS_STEP):
            print(f"\n### profile: {name}")
            print(profile_table(candidates[name], steps=1))


class _InMemory(Dataset):
    """Random images with COCO-like boxes, generated once and held in memory."""

    def __init__(self, n: int, size: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=gen)
        self.targets = random_targets(n, NUM_CLASSES, mean_boxes=7, seed=3)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.images[i], self.targets[i]


def _collate(batch):
    images, targets = zip(*batch, strict=True)
    return torch.stack(images), list(targets)


class _StepClock(L.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())


def _demo_module():
    torch.manual_seed(0)
    module = build_module("demo", NUM_CLASSES, DEMO_SIZE)
    module.scheduler_factory = None  # needs a Trainer to size itself; both loops go without
    return module


def _plain_run(module, loader: DataLoader) -> list[float]:
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    starts = []
    for batch_idx, batch in enumerate(loader):
        starts.append(time.perf_counter())
        loss = module.training_step(batch, batch_idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    starts.append(time.perf_counter())
    return starts


def _lightning_run(
    module, loader: DataLoader, root: str, precision: str = "32-true", clip: float | None = None
) -> list[float]:
    clock = _StepClock()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[clock], default_root_dir=root, precision=precision,
        gradient_clip_val=clip,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    return clock.starts


def bench_lightning(steps: int, skip: int, rounds: int) -> None:
    loader = DataLoader(_InMemory(steps * BATCH, DEMO_SIZE), batch_size=BATCH, collate_fn=_collate)
    plain_module, lightning_module = _demo_module(), _demo_module()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("rtdetr_lit").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    samples: dict[str, list[float]] = {"plain PyTorch loop": [], "Lightning Trainer.fit": []}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(rounds):
            for name, run in (
                ("plain PyTorch loop", lambda: _plain_run(plain_module, loader)),
                ("Lightning Trainer.fit", lambda: _lightning_run(lightning_module, loader, root)),
            ):
                starts = run()[skip:]
                samples[name] += [b - a for a, b in itertools.pairwise(starts)]
    print(
        f"\n## Lightning overhead: demo model, {DEMO_SIZE}x{DEMO_SIZE}, batch {BATCH}, "
        f"{rounds} alternating runs of {steps} steps, first {skip} of each dropped"
    )
    ratio = print_table(samples, "plain PyTorch loop", paired=False)["Lightning Trainer.fit"]
    overhead = ratio - 1.0
    verdict = "met" if overhead <= TARGET_OVERHEAD else "NOT met"
    mid = {name: statistics.median(times) for name, times in samples.items()}
    diff = (mid["Lightning Trainer.fit"] - mid["plain PyTorch loop"]) * 1e3
    print(
        f"Lightning overhead = {overhead:+.1%} ({diff:+.1f} ms per step; "
        f"target <= {TARGET_OVERHEAD:.0%}: {verdict})"
    )


def bench_precision(steps: int, skip: int, rounds: int) -> None:
    """The demo step through ``Trainer.fit`` in bf16-mixed against 32-true, clipping at 0.1 with
    the fused AdamW the config builds (the path mixed precision takes in training)."""
    loader = DataLoader(_InMemory(steps * BATCH, DEMO_SIZE), batch_size=BATCH, collate_fn=_collate)
    modules = {"32-true": _demo_module(), "bf16-mixed": _demo_module()}
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("rtdetr_lit").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    samples: dict[str, list[float]] = {name: [] for name in modules}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(rounds):
            for name, module in modules.items():
                starts = _lightning_run(module, loader, root, precision=name, clip=0.1)[skip:]
                samples[name] += [b - a for a, b in itertools.pairwise(starts)]
    print(
        f"\n## Precision: demo model, {DEMO_SIZE}x{DEMO_SIZE}, batch {BATCH}, Trainer.fit with "
        f"clipping at 0.1, {rounds} alternating runs of {steps} steps, first {skip} dropped"
    )
    print_table(samples, "32-true", paired=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="r18 steps timed per model")
    parser.add_argument("--steps", type=int, default=12, help="steps per Lightning/plain run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain/Lightning runs")
    parser.add_argument("--profile", action="store_true", help="op tables of both r18 steps")
    args = parser.parse_args(argv)

    setup()
    print_header("Training step")
    bench_step(args.warmup, args.repeats, args.profile)
    bench_lightning(args.steps, skip=2, rounds=args.rounds)
    bench_precision(args.steps, skip=2, rounds=args.rounds)
    print(load_average())


if __name__ == "__main__":
    main()
