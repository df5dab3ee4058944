"""Generate the embedded synthetic COCO-format dataset standalone.

    python scripts/make_synthetic.py --out data/synthetic --num-train 800 --num-val 100 --seed 0

Training with ``data=synthetic`` does the same on first use; this script is for looking at the data
or for building a bigger or smaller copy. An existing copy with the same parameters is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from rtdetr_lit.data.synthetic import SyntheticConfig, ensure_synthetic_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="data/synthetic", help="dataset folder (default: %(default)s)"
    )
    for field in dataclasses.fields(SyntheticConfig):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(
            flag,
            type=type(field.default),
            default=field.default,
            help=f"(default: {field.default})",
        )
    args = vars(parser.parse_args())
    out = args.pop("out")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = ensure_synthetic_dataset(out, SyntheticConfig(**args))
    print(f"synthetic dataset ready in {root}")


if __name__ == "__main__":
    main()
