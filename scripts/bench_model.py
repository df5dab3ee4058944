"""Eval-mode forward latency of r18 at 640x640, batch 1: ours vs HF RTDetrV2ForObjectDetection.

HF's model has the same architecture and the same weights (ours converted with
``rtdetr_lit.convert.to_hf_state_dict``, strict load); that the two compute the same function is
proven by tests/models/test_hf_parity.py. Also timed: our discrete sampler, our ``deploy()``
(RepVGG and conv+BN fused), both models in channels_last memory format (a user-side switch,
``model.to(memory_format=torch.channels_last)``, open to both) and, for scale, our fastest
float32 set-up under bfloat16 autocast (fast on CPUs with AVX512-BF16; outputs change slightly).
All cases run interleaved in one process; ratios are to HF.

    .venv/bin/python scripts/bench_model.py [--repeats 7] [--profile]
"""

from __future__ import annotations

import argparse
import copy

import torch

from _bench import compare, hf_twin, load, print_header, print_table, profile_table, setup
from rtdetr_lit import create_model

NUM_CLASSES = 80
SIZE = 640
TARGET = 0.8  # ours / HF


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="print op tables of both models")
    args = parser.parse_args(argv)

    setup()
    print_header(f"Model: eval forward, r18, {SIZE}x{SIZE}, batch 1, float32")
    ours = create_model("r18", NUM_CLASSES, eval_spatial_size=(SIZE, SIZE)).eval()
    hf = hf_twin(ours, NUM_CLASSES).eval()
    discrete = copy.deepcopy(ours).set_sampling_method("discrete")
    deployed = copy.deepcopy(ours).deploy()
    deployed_cl = copy.deepcopy(deployed).to(memory_format=torch.channels_last)
    hf_cl = copy.deepcopy(hf).to(memory_format=torch.channels_last)
    images = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))

    def bf16(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        with torch.autocast("cpu", torch.bfloat16):
            return model(images)

    candidates = {
        "HF RTDetrV2 (grid_sample)": lambda: hf(pixel_values=images),
        "ours grid_sample": lambda: ours(images),
        "ours discrete": lambda: discrete(images),
        "ours deploy() grid_sample": lambda: deployed(images),
        "HF channels_last": lambda: hf_cl(pixel_values=images),
        "ours deploy() + channels_last": lambda: deployed_cl(images),
        "ours deploy() + channels_last + bf16": lambda: bf16(deployed_cl),
    }
    with torch.inference_mode():
        samples = compare(candidates, args.warmup, args.repeats)
        print(f"warm-up {args.warmup}, {args.repeats} interleaved rounds")
        ratio = print_table(samples, baseline="HF RTDetrV2 (grid_sample)")["ours grid_sample"]
        verdict = "met" if ratio <= TARGET else "NOT met"
        print(f"ours / HF = {ratio:.2f} (target <= {TARGET}: {verdict})")
        print(load())
        if args.profile:
            for name in ("HF RTDetrV2 (grid_sample)", "ours grid_sample"):
                print(f"\n## profile: {name}")
                print(profile_table(candidates[name]))


if __name__ == "__main__":
    main()
