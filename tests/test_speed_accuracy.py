"""``python -m rtdetr_lit.speed_accuracy``: mAP and latency as ``eval_idx`` and the sampling
operator change on one checkpoint (docs/rtdetrv2.md §0.3, §0.5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from rtdetr_lit import create_model, speed_accuracy
from rtdetr_lit.eval import evaluate
from tests.conftest import compose_config


def test_speed_accuracy_overrides_may_follow_its_list_options():
    """The README's ``--eval-idx 0 2 --methods discrete ckpt_path=last.ckpt``: the override is not
    a third value of ``--methods``; the ``--`` form gives the same."""
    options = ["--eval-idx", "0", "2", "--methods", "discrete"]
    for argv in ([*options, "ckpt_path=last.ckpt"], [*options, "--", "ckpt_path=last.ckpt"]):
        args, overrides = speed_accuracy.parse_args(argv)
        assert (args.eval_idx, args.methods) == ([0, 2], ["discrete"])
        assert overrides == ["ckpt_path=last.ckpt"]
    # Overrides anywhere (+key, ~key too), in their order; Hydra's own options pass on; negative
    # indices stay indices; after `--` even an option-like word is passed on.
    args, overrides = speed_accuracy.parse_args(
        ["model=r18", "--eval-idx", "-1", "+x=1", "~y", "--runs", "3", "--cfg", "job", "--", "-z"]
    )
    assert (args.eval_idx, args.runs) == ([-1], 3)
    assert overrides == ["--cfg", "job", "model=r18", "+x=1", "~y", "-z"]
    with pytest.raises(SystemExit):  # the choices are still checked
        speed_accuracy.parse_args(["--methods", "nearest", "ckpt_path=last.ckpt"])


def test_plot_draws_a_line_per_sampling_method(tmp_path: Path) -> None:
    rows = [
        {"sampling": method, "decoder_layers": layers, "latency_ms": ms, "mAP": ap}
        for method, base in (("grid_sample", 10.0), ("discrete", 8.0))
        for layers, ms, ap in ((1, base, 0.30), (3, base + 4.0, 0.36))
    ]
    path = speed_accuracy.plot(rows, tmp_path / "speed_accuracy.png", "demo: mAP vs latency")
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == (900, 600)
        colours = {colour for _, colour in picture.convert("RGB").getcolors(900 * 600)}
    # matplotlib's first two line colours: one line per method
    assert {(31, 119, 180), (255, 127, 14)} <= colours


@pytest.mark.slow  # five validation passes and a dozen timed passes: about 20 s of CPU
def test_speed_accuracy_sweeps_eval_idx_and_sampling_on_a_checkpoint(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    net = create_model("demo", num_classes=6, eval_spatial_size=(128, 128))
    torch.save({"model": net.state_dict()}, tmp_path / "demo.pth")
    args, overrides = speed_accuracy.parse_args(
        ["--eval-idx", "0", "-1", "--runs", "2", "--warmup", "1", f"ckpt_path={tmp_path}/demo.pth",
         f"paths.output_dir={tmp_path}/out", f"paths.data_dir={tmp_path}/data",
         "data.synthetic.num_train=1", "data.synthetic.num_val=4", "data.num_workers=0",
         "data.image_size=[128,128]", "trainer.accelerator=cpu", "extras.print_config=false"]
    )  # fmt: skip
    assert args.eval_idx == [0, -1] and args.methods == ["grid_sample", "discrete"]
    cfg = compose_config("eval", overrides)
    rows = speed_accuracy.run(cfg, args)

    assert [(r["sampling"], r["eval_idx"], r["decoder_layers"]) for r in rows] == [
        ("grid_sample", 0, 1), ("grid_sample", -1, 3), ("discrete", 0, 1), ("discrete", -1, 3)
    ]  # fmt: skip
    for r in rows:
        assert 0.0 <= r["mAP"] <= r["mAP_50"] <= 1.0
        assert 0 < r["latency_min_ms"] <= r["latency_ms"]
    table = (tmp_path / "out" / "speed_accuracy.csv").read_text().splitlines()
    assert table[0] == ",".join(speed_accuracy.COLUMNS) and len(table) == 5
    assert table[2].startswith("grid_sample,-1,3,")
    with Image.open(tmp_path / "out" / "speed_accuracy.png") as picture:
        assert picture.size == (900, 600)
    # The numbers are those of the eval entry point with the same eval_idx and sampling.
    cfg = compose_config(
        "eval", [*overrides, "model.net.eval_idx=0", "model.net.sampling_method=discrete"]
    )
    assert evaluate(cfg)["val/mAP"] == pytest.approx(rows[2]["mAP"], abs=1e-6)
