"""ONNX export: graph layout, onnx.checker, parity with PyTorch under ONNX Runtime, checkpoint kinds
(Lightning with class names in its hyper-parameters, reference with EMA), class-name fallbacks."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from scipy.optimize import linear_sum_assignment

from rtdetr_lit import create_model
from rtdetr_lit.config import ConfigError
from rtdetr_lit.export import export, export_onnx
from rtdetr_lit.inference import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    InferenceModel,
)
from rtdetr_lit.models import RTDETRPostProcessor
from rtdetr_lit.models.deformable import MSDeformableAttention
from tests.conftest import compose_config

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

IMAGE = 128
NUM_CLASSES = 2
CLASS_NAMES = ["cat", "dog"]
CATEGORY_IDS = [3, 7]
# demo model, 128 px inputs, 2 classes: 100 queries x 2 classes = 200 detections per image, all of
# them returned (fewer than the 300 top-K), so no detection can fall off the end between runtimes
SMALL = [f"data.image_size=[{IMAGE},{IMAGE}]", f"data.num_classes={NUM_CLASSES}"]
ATOL = 1e-4


def entry_config(name: str, tmp_path: Path, overrides: list[str]) -> DictConfig:
    """``conf/<name>.yaml`` composed for the demo model at 128 px, writing below ``tmp_path``."""
    cfg = compose_config(name, [*SMALL, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.extras.print_config = False
    GlobalHydra.instance().clear()
    return cfg


def perturb(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Randomise what a fresh model initialises to zero: the last layer of every box head and the
    sampling-offset weights. Fresh sampling points can sit exactly on the pixel boundaries of the
    discrete rule, where its choice is a 1-ulp coin toss between runtimes; trained ones do not."""
    g = torch.Generator().manual_seed(seed)
    decoder = net.decoder
    with torch.no_grad():
        for head in [decoder.enc_bbox_head, *decoder.dec_bbox_head]:
            w = head.layers[-1].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)
        for attn in decoder.modules():
            if isinstance(attn, MSDeformableAttention):
                w = attn.sampling_offsets.weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    return net


def demo_net(method: str = "grid_sample", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = create_model(
        "demo", num_classes=NUM_CLASSES, eval_spatial_size=(IMAGE, IMAGE), sampling_method=method
    )
    return perturb(net, seed)


def inference_model(net: torch.nn.Module) -> InferenceModel:
    return InferenceModel(net, RTDETRPostProcessor(NUM_CLASSES, 300))


def save_lightning_checkpoint(path: Path, cfg: DictConfig, net: torch.nn.Module) -> Path:
    """A real Lightning checkpoint of ``RTDETRModule`` holding ``net``'s weights and the class
    names/category ids as hyper-parameters (as a run given them writes)."""
    module = instantiate(
        cfg.model,
        init_from=None,
        category_ids=CATEGORY_IDS,
        class_names=CLASS_NAMES,
        _convert_="all",
    )
    module.net.load_state_dict(net.state_dict())
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def run_onnx(path: str | Path, images: torch.Tensor, sizes: torch.Tensor) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})
    return [torch.from_numpy(o) for o in out]


def assert_same_detections(got, want, sizes: torch.Tensor, atol: float = ATOL) -> None:
    """``(labels, boxes, scores)`` agree within ``atol``: scores as they are, boxes relative to
    the image size ``sizes`` (w, h): in pixels, 1e-4 is below float32 resolution for pictures
    over 1024 px (1 ulp = 1.2e-4). Scores are sorted, so they compare position by position; two
    detections with (nearly) tied scores may swap places between runtimes, so each image's
    detections are paired one-to-one (same label, box and score within ``atol``) by an optimal
    assignment instead of by position."""
    (lg, bg, sg), (lw, bw, sw) = got, want
    assert lg.shape == lw.shape and bg.shape == bw.shape and sg.shape == sw.shape
    assert lg.dtype == torch.int64 and bg.dtype == sg.dtype == torch.float32
    torch.testing.assert_close(sg, sw, atol=atol, rtol=0)
    scale = sizes.repeat(1, 2)[:, None].float()
    bg, bw = bg / scale, bw / scale
    for i in range(lg.shape[0]):
        diff = torch.maximum(
            (bg[i, :, None] - bw[i, None]).abs().amax(-1), (sg[i, :, None] - sw[i, None]).abs()
        )
        diff[lg[i, :, None] != lw[i, None]] = float("inf")
        cost = diff.double().clamp(max=1e9).numpy()
        rows, cols = linear_sum_assignment(cost)
        worst = cost[rows, cols].max()
        assert worst <= atol, f"image {i}: no one-to-one pairing within {atol} (worst {worst})"


def graph_ops(path: str | Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def random_inputs(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, IMAGE, IMAGE, generator=g)
    sizes = torch.stack(
        [
            torch.randint(200, 1300, (batch,), generator=g),
            torch.randint(150, 900, (batch,), generator=g),
        ],
        dim=1,
    )  # (w, h) of realistic photos, so boxes come back in hundreds of pixels
    return images, sizes


@pytest.mark.parametrize("method", ["grid_sample", "discrete"])
def test_onnx_matches_torch_at_batch_1_and_3(tmp_path, method):
    model = inference_model(demo_net(method))
    path = export_onnx(model, tmp_path / "m.onnx", (IMAGE, IMAGE))
    assert ("GridSample" in graph_ops(path)) == (method == "grid_sample")
    for batch in (1, 3):
        images, sizes = random_inputs(batch, seed=batch)
        with torch.no_grad():
            want = model(images, sizes)
        got = run_onnx(path, images, sizes)
        assert got[0].shape == (batch, 200)
        assert_same_detections(got, want, sizes)
    # post-processing is inside the graph: boxes scale with each image's original size
    doubled = run_onnx(path, images, sizes * 2)
    torch.testing.assert_close(doubled[1], got[1] * 2)
    torch.testing.assert_close(doubled[2], got[2])


def test_export_command_graph_layout_and_checkpoint_weights(tmp_path):
    """`rtdetr_lit.export` from a Lightning checkpoint: dynamic batch, fixed image size, names,
    class metadata from the checkpoint, fused (no BatchNormalization), the checkpoint's weights."""
    ckpt = tmp_path / "run.ckpt"
    output = tmp_path / "model.onnx"
    cfg = entry_config(
        "export",
        tmp_path,
        [f"ckpt_path={ckpt}", f"output={output}", "model.net.sampling_method=discrete"],
    )
    net = demo_net("discrete", seed=1)
    save_lightning_checkpoint(ckpt, cfg, net)
    assert export(cfg) == output
    graph = onnx.load(str(output))
    onnx.checker.check_model(graph, full_check=True)
    assert graph.opset_import[0].version >= 17
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in graph.graph.input
    }
    assert inputs == {"images": ["batch", 3, IMAGE, IMAGE], "orig_target_sizes": ["batch", 2]}
    assert [o.name for o in graph.graph.output] == list(OUTPUT_NAMES)
    assert tuple(inputs) == INPUT_NAMES
    ops = graph_ops(output)
    assert "GridSample" not in ops and "BatchNormalization" not in ops
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["class_names"]) == CLASS_NAMES
    assert json.loads(meta["category_ids"]) == CATEGORY_IDS
    assert meta["sampling_method"] == "discrete" and json.loads(meta["image_size"]) == [
        IMAGE,
        IMAGE,
    ]
    # the graph computes the checkpoint's model (not a fresh one), RepVGG-fused
    fused = inference_model(net)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in fused.modules())
    assert sum(n.op_type == "Conv" for n in graph.graph.node) == n_convs
    images, sizes = random_inputs(2, seed=5)
    with torch.no_grad():
        assert_same_detections(run_onnx(output, images, sizes), fused(images, sizes), sizes)


def test_export_takes_the_ema_weights_of_a_reference_checkpoint(tmp_path):
    ema, raw = demo_net(seed=2), demo_net(seed=3)
    ckpt = tmp_path / "rtdetrv2_ref.pth"
    torch.save(
        {
            "model": raw.state_dict(),
            "ema": {"module": ema.state_dict(), "updates": 7},
            "last_epoch": 3,
        },
        ckpt,
    )
    cfg = entry_config("export", tmp_path, [f"ckpt_path={ckpt}", "model=demo"])
    path = export(cfg)
    assert path == Path(cfg.paths.output_dir) / "demo_grid_sample.onnx"
    images, sizes = random_inputs(1, seed=9)
    got = run_onnx(path, images, sizes)
    with torch.no_grad():  # the "model" weights (another seed) would fail this
        assert_same_detections(got, inference_model(ema)(images, sizes), sizes)
    # no class names anywhere: "class N" and the contiguous labels
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["class_names"]) == ["class 0", "class 1"]
    assert json.loads(meta["category_ids"]) == [0, 1]


def test_export_rejects_bad_settings(tmp_path):
    ckpt = tmp_path / "w.pth"
    torch.save({"model": demo_net().state_dict()}, ckpt)
    with pytest.raises(ConfigError, match="opset"):
        export(entry_config("export", tmp_path, [f"ckpt_path={ckpt}", "opset=16", "model=demo"]))
    with pytest.raises(ConfigError, match="format"):
        export(entry_config("export", tmp_path, [f"ckpt_path={ckpt}", "format=tensorrt"]))
    with pytest.raises(ConfigError, match="image_size"):
        export(
            entry_config(
                "export", tmp_path, [f"ckpt_path={ckpt}", "image_size=[100,128]", "model=demo"]
            )
        )
    # a checkpoint for another class count leaves untrained score heads: refused
    torch.save({"model": create_model("demo", num_classes=5).state_dict()}, ckpt)
    with pytest.raises(ConfigError, match="does not fit"):
        export(entry_config("export", tmp_path, [f"ckpt_path={ckpt}", "model=demo"]))
    with pytest.raises(Exception, match="opset"):
        compose_config("export", ["ckpt_path=x", "opset_version=17"])
