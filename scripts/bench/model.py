"""Eval-mode forward latency of r18 at 640x640, batch 1: ours vs HF RTDetrV2ForObjectDetection.

HF's model has the same architecture and the same weights (ours converted with
``rtdetr_lit.convert.to_hf_state_dict``, strict load); that the two compute the same function is
proven by tests/models/test_hf_parity.py. Ours runs as ``create_model`` builds it (channels-last
convolutions); timed are its grid_sample and discrete samplers and ``deploy()`` (RepVGG and
conv+BN fused). For a layout-for-layout view also: ours in NCHW (``channels_last=False``) and HF
converted to channels-last (``model.to(memory_format=torch.channels_last)``, a user-side switch),
and, for scale, our deploy path under bfloat16 autocast (fast on CPUs with AVX512-BF16; outputs
change slightly). All cases run interleaved in one process; ratios are to HF as built.

    .venv/bin/python scripts/bench/model.py [--repeats 7] [--profile]
"""

from __future__ import annotations

import argparse
import copy

import torch

from _bench import compare, hf_twin, load_average, print_header, print_table, profile_table, setup
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
    nchw = copy.deepcopy(ours)
    nchw.channels_last = False
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
        "ours grid_sample, NCHW": lambda: nchw(images),
        "HF channels_last": lambda: hf_cl(pixel_values=images),
        "ours deploy() + bf16 autocast": lambda: bf16(deployed),
    }
    with torch.inference_mode():
        samples = compare(candidates, args.warmup, args.repeats)
        print(f"warm-up {args.warmup}, {args.repeats} interleaved rounds")
        ratios = print_table(samples, baseline="HF RTDetrV2 (grid_sample)")
        for case in ("ours grid_sample", "ours discrete", "ours deploy() grid_sample"):
            verdict = "met" if ratios[case] <= TARGET else "NOT met"
            print(f"{case} / HF = {ratios[case]:.2f} (target <= {TARGET}: {verdict})")
        print(load_average())
        if args.profile:
            for name in ("HF RTDetrV2 (grid_sample)", "ours grid_sample"):
                print(f"\n## profile: {name}")
                print(profile_table(candidates[name]))


if __name__ == "__main__":
    main()
