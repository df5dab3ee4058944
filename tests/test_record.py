"""Self-describing checkpoints: training records the detector in every checkpoint and in
``model.safetensors``; eval, export and predict then need only ``ckpt_path=``; contradictions,
unknown record versions and files without a record are clear errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from rtdetr_lit import create_model
from rtdetr_lit.checkpoints import atomic_write, save_weights_file
from rtdetr_lit.config import ConfigError
from rtdetr_lit.convert import main as convert_main
from rtdetr_lit.eval import evaluate
from rtdetr_lit.export import export
from rtdetr_lit.inference import read_checkpoint
from rtdetr_lit.predict import predict
from rtdetr_lit.record import RECORD_KEY, RECORD_VERSION, ModelRecord, record_of
from rtdetr_lit.train import train
from tests.conftest import compose_config
from tests.test_main_job import TINY

# The main job's 2-epoch test run (objects of the default sizes, of which two epochs find a few),
# on another sampling layout and with fewer queries than the demo's defaults, so that the record
# has settings to carry.
RUN = [
    *(o for o in TINY if not o.startswith("data.synthetic.max_object=")),
    "test=false",
    "sampling=levels421",
    "model.net.num_queries=60",
    "callbacks.rich_progress_bar=null",
    "callbacks.prediction_pictures=null",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The trained run: its directory, metrics and the data folder eval must find again."""
    tmp = tmp_path_factory.mktemp("recorded")
    previous = os.umask(0o027)  # a stricter umask than the usual 022: files must follow it
    try:
        cfg = compose_config(
            "train", [*RUN, f"paths.output_dir={tmp}/run", f"paths.data_dir={tmp}/data"]
        )
        metrics = train(cfg)
    finally:
        os.umask(previous)
    return {"dir": tmp / "run", "metrics": metrics, "tmp": tmp}


def _entry(name: str, tmp: Path, *overrides: str):
    return compose_config(
        name,
        [
            *overrides,
            f"paths.output_dir={tmp}",
            "extras.print_config=false",
            "trainer.accelerator=cpu",
        ]
        if name == "eval"
        else [*overrides, f"paths.output_dir={tmp}", "extras.print_config=false"],
    )


def test_every_checkpoint_and_the_weights_file_carry_the_record(run: dict) -> None:
    last = run["dir"] / "checkpoints" / "last.ckpt"
    weights = run["dir"] / "model.safetensors"
    for path in (last, weights):
        record = read_checkpoint(path).record
        assert record is not None, path
        assert record.model == "demo" and record.num_classes == 6
        assert record.net["num_points"] == [4, 2, 1] and record.net["num_queries"] == 60
        assert record.image_size == (128, 128) and record.class_names[0] == "circle"
        assert record.config["data"]["image_size"] == [128, 128]
    # the shareable file: EMA weights only, a fraction of the training checkpoint
    assert weights.stat().st_size < 0.4 * last.stat().st_size
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    net_keys = {k.removeprefix("net.") for k in ckpt["state_dict"] if k.startswith("net.")}
    assert set(read_checkpoint(weights).contents) == net_keys
    # written with the umask of the run (027): group-readable, nothing for others
    for path in (last, weights):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


def test_eval_with_only_the_checkpoint_reproduces_the_runs_map(run: dict, tmp_path: Path) -> None:
    last = run["dir"] / "checkpoints" / "last.ckpt"
    assert run["metrics"]["val/mAP"] > 0  # a few lucky boxes: a number other weights would change
    for path in (last, run["dir"] / "model.safetensors"):
        result = evaluate(_entry("eval", tmp_path / path.stem, f"ckpt_path={path}"))
        assert result["val/mAP_50"] == pytest.approx(run["metrics"]["val/mAP_50"], abs=1e-6)
        assert result["val/mAP"] == pytest.approx(run["metrics"]["val/mAP"], abs=1e-6)


def test_export_and_predict_need_only_the_checkpoint(run: dict, tmp_path: Path) -> None:
    weights = run["dir"] / "model.safetensors"
    graph = export(_entry("export", tmp_path / "export", f"ckpt_path={weights}"))
    assert graph.name == "demo_grid_sample.onnx"
    meta = {p.key: p.value for p in onnx.load(str(graph)).metadata_props}
    assert json.loads(meta["image_size"]) == [128, 128]
    assert json.loads(meta["class_names"])[:2] == ["circle", "square"]
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    Image.fromarray(np.full((90, 140, 3), 200, np.uint8)).save(pictures / "a.png")
    summary = predict(
        _entry(
            "predict",
            tmp_path / "predict",
            f"ckpt_path={weights}",
            f"source={pictures}",
            "threshold=0",
        )
    )
    entries = json.loads(Path(summary["results"]).read_text())
    # threshold 0: the post-processor's 300 best of 60 queries x 6 classes
    assert len(entries) == 300 and {e["category_id"] for e in entries} <= set(range(1, 7))


def test_settings_that_contradict_the_record_are_errors_naming_both(
    run: dict, tmp_path: Path
) -> None:
    last = run["dir"] / "checkpoints" / "last.ckpt"
    cases = {
        "model=r18": r"^model: .*last\.ckpt holds a detector trained with model=demo, but the "
        r"command says model=r18\.",
        "model.net.num_queries=300": r"model\.net\.num_queries=60, but the command says "
        r"model\.net\.num_queries=300",
        "sampling=uniform4": r"sampling\.num_points=\[4,2,1\], but the command says "
        r"sampling\.num_points=\[4,4,4\]",
        "data.num_classes=80": r"data\.num_classes=6, but the command says data\.num_classes=80",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            export(_entry("export", tmp_path, f"ckpt_path={last}", override))
    # settings meant for inference may differ; so may a size the record agrees with
    graph = export(
        _entry(
            "export",
            tmp_path,
            f"ckpt_path={last}",
            "model=demo",
            "model.net.eval_idx=0",
            "model.net.sampling_method=discrete",
            "image_size=[160,192]",
        )
    )
    shape = onnx.load(str(graph)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in shape[2:]] == [160, 192]
    assert graph.name == "demo_discrete.onnx"


def test_a_file_without_a_record_needs_model(tmp_path: Path) -> None:
    ckpt = tmp_path / "reference.pth"
    torch.save({"ema": {"module": create_model("demo", num_classes=6).state_dict()}}, ckpt)
    message = (
        rf"^model: {ckpt} holds no record of the detector it was trained as \(a reference, "
        r"Hugging Face or converted file\): name its size and data as for training, e\.g\. "
        r"model=r50 data=coco$"
    )
    with pytest.raises(ConfigError, match=message):
        export(_entry("export", tmp_path, f"ckpt_path={ckpt}"))


def test_a_newer_record_version_is_refused_and_older_fields_are_read(tmp_path: Path) -> None:
    net = create_model("demo", num_classes=2, eval_spatial_size=(64, 64))
    record = record_of(net, 300, ["a", "b"], [5, 9])
    assert ModelRecord.from_json(record.to_json(), "x") == record
    newer = {**record.to_dict(), "version": RECORD_VERSION + 1, "package": "9.0.0"}
    path = save_weights_file(
        tmp_path / "newer.safetensors", net.state_dict(), {RECORD_KEY: json.dumps(newer)}
    )
    message = (
        rf"^ckpt_path: {path} was written by rtdetr_lit 9\.0\.0 \(record version "
        rf"{RECORD_VERSION + 1}\); this rtdetr_lit .* reads versions up to {RECORD_VERSION}: "
        r"upgrade rtdetr_lit to load it$"
    )
    with pytest.raises(ConfigError, match=message):
        read_checkpoint(path)
    # a record of this version without the optional fields still reads
    minimal = {k: v for k, v in record.to_dict().items() if k not in ("net", "config", "input")}
    assert ModelRecord.from_dict(minimal, "x").spec()["num_queries"] == 100


def test_convert_from_lightning_writes_the_weights_file(run: dict, tmp_path: Path) -> None:
    last = run["dir"] / "checkpoints" / "last.ckpt"
    out = tmp_path / "shared" / "model.safetensors"
    assert convert_main(["--from", "lightning", str(last), str(out)]) == 0
    assert read_checkpoint(out).record == read_checkpoint(last).record
    with pytest.raises(SystemExit, match=r"must end in \.safetensors"):
        convert_main(["--from", "lightning", str(last), str(tmp_path / "model.pth")])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "f.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary file left
