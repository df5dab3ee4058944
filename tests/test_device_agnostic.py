"""Device-agnostic by construction: the package never creates a tensor without saying where.

A tensor factory (``torch.zeros``, ``torch.arange``, ``torch.tensor``, ...) called without
``device=`` puts its result on the default device, the CPU, whatever device the model and the
batch are on: harmless on a CPU-only machine, a device-mismatch error (or a silent host-to-device
copy every step) on a GPU. These tests run a training step (forward with denoising, matcher, losses,
backward, optimizer step), a validation step (post-processor, mAP), the callbacks' hooks, the data
pipeline with its multi-scale collate, and prediction under :class:`FactoryDeviceMode`, which
records every factory call made without a device from a file of ``src/rtdetr_lit``. The ``_like``
and ``Tensor.new_*`` factories are not checked: they take their input's device.

``test_a_checkpoint_written_on_a_gpu_loads_on_the_cpu`` covers the other half of the issue:
checkpoints written on a GPU load on a machine without one.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, SimpleNamespace
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
import torch.serialization
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import open_dict
from torch.overrides import TorchFunctionMode

import rtdetr_lit
from rtdetr_lit.api import Detector
from rtdetr_lit.callbacks import EMA, DiscreteFinetune, NonFiniteGuard, PredictionPictures
from rtdetr_lit.callbacks.resume import RandomState
from rtdetr_lit.checkpoints import load_checkpoint_file
from rtdetr_lit.inference import ClassInfo, InferenceModel
from rtdetr_lit.loss import HungarianMatcher, RTDETRCriterion
from rtdetr_lit.models.deformable import MSDeformableAttention
from rtdetr_lit.models.denoising import get_contrastive_denoising_training_group
from rtdetr_lit.plugins import SafeCheckpointIO
from tests.conftest import SMALL_SYNTHETIC, compose_config

PACKAGE_DIR = os.path.dirname(os.path.realpath(rtdetr_lit.__file__)) + os.sep
TORCH_DIR = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep
# torch's data loading machinery: what it creates (sampler permutations, worker seeds) lives on the
# host by design, and the package has no say in it.
TORCH_DATA_DIR = os.path.join(TORCH_DIR, "utils", "data") + os.sep

# Factories whose result lands on the default device unless ``device=`` (or ``out=``) is given.
FACTORIES = (
    torch.arange, torch.as_tensor, torch.asarray, torch.bartlett_window, torch.blackman_window,
    torch.empty, torch.empty_strided, torch.eye, torch.full, torch.hamming_window,
    torch.hann_window, torch.kaiser_window, torch.linspace, torch.logspace, torch.normal,
    torch.ones, torch.rand, torch.randint, torch.randn, torch.randperm, torch.scalar_tensor,
    torch.sparse_coo_tensor, torch.tensor, torch.tril_indices, torch.triu_indices, torch.zeros,
)  # fmt: skip
_FACTORY_IDS = {id(f): f.__name__ for f in FACTORIES}
# These take the device of a tensor given as their data (``as_tensor(t)``, ``normal(mean_t, 1.0)``).
_FOLLOW_TENSOR_DATA = {id(f) for f in (torch.as_tensor, torch.asarray, torch.tensor, torch.normal)}


@functools.lru_cache(maxsize=4096)
def _real(filename: str) -> str:
    return os.path.realpath(filename)


def device_is_explicit(func, args: tuple, kwargs: dict) -> bool:
    """Whether a factory call says where its result goes (or takes it from a tensor argument)."""
    if kwargs.get("device") is not None or kwargs.get("out") is not None:
        return True
    return id(func) in _FOLLOW_TENSOR_DATA and any(isinstance(a, torch.Tensor) for a in args)


def package_caller(frames: Iterable[tuple[str, int, str]]) -> tuple[str, int, str, str] | None:
    """The package location responsible for a factory call, or None when it is not the package's.

    ``frames`` are ``(filename, line, function)`` from the innermost caller outwards. Torch's own
    frames are skipped: ``nn.Conv2d(...)`` without ``device=`` allocates its weights inside torch,
    on behalf of the code that built the module. The first frame outside torch decides: a file of
    ``src/rtdetr_lit`` is a violation, anything else (torchvision, lightning, torchmetrics,
    albumentations, the standard library, these tests) is not the package's business. Nor is a
    call from torch's data loading machinery (``TORCH_DATA_DIR``), even when the package iterates a
    loader or a sampler; the package's datasets and collate functions that such a loader calls
    are checked, since their frames come first.

    Returns ``(file relative to the package, line, function, via)``, ``via`` being the torch file
    that made the call on the package's behalf ("" for a call written in the package itself).
    """
    via = ""
    for filename, line, function in frames:
        path = _real(filename)
        if path.startswith(TORCH_DATA_DIR):
            return None
        if path.startswith(TORCH_DIR):
            via = via or os.path.relpath(path, os.path.dirname(TORCH_DIR.rstrip(os.sep)))
            continue
        if path.startswith(PACKAGE_DIR):
            return os.path.relpath(path, PACKAGE_DIR), line, function, via
        return None
    return None


def _frames(frame: FrameType | None) -> Iterator[tuple[str, int, str]]:
    while frame is not None:
        yield frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name
        frame = frame.f_back


@dataclass(frozen=True)
class Violation:
    file: str  # relative to src/rtdetr_lit
    line: int
    function: str
    via: str  # the torch file that called the factory for the package, "" if none
    factory: str

    def __str__(self) -> str:
        through = f" (inside {self.via})" if self.via else ""
        return f"{self.file}:{self.line} in {self.function}(): torch.{self.factory}{through}"


class FactoryDeviceMode(TorchFunctionMode):
    """Records every tensor factory called without a device from the package's code, and which
    package files called factories at all (to check that a test reached the code it means to)."""

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[Violation] = []
        self.callers: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _FACTORY_IDS.get(id(func))
        if name is not None:
            # frame 0 is this method; frame 1 called the factory (factories are C functions)
            where = package_caller(_frames(sys._getframe(1)))
            if where is not None:
                self.callers.add(where[0])
                if not device_is_explicit(func, args, kwargs):
                    self.violations.append(Violation(*where, name))
        return func(*args, **kwargs)


def _report(violations: Iterable[Violation]) -> str:
    return "\n".join(sorted({str(v) for v in violations}))


def assert_no_violations(violations: list[Violation]) -> None:
    """Fail naming every factory call made without a device."""
    assert not violations, "tensors created without a device:\n" + _report(violations)


# -- the mode itself ------------------------------------------------------------------------------


def test_frame_filter_blames_the_first_frame_outside_torch() -> None:
    conv = os.path.join(TORCH_DIR, "nn", "modules", "conv.py")
    module = os.path.join(TORCH_DIR, "nn", "modules", "module.py")
    common = os.path.join(PACKAGE_DIR, "models", "common.py")
    fit_loop = os.path.join(os.path.dirname(L.__file__), "pytorch", "loops", "fit_loop.py")
    assert package_caller([(common, 12, "fuse")]) == ("models/common.py", 12, "fuse", "")
    # torch allocating on the package's behalf (building a module it asked for): the package's
    assert package_caller([(conv, 1, "__init__"), (module, 2, "x"), (common, 12, "fuse")]) == (
        "models/common.py", 12, "fuse", "torch/nn/modules/conv.py",
    )  # fmt: skip
    # a library or the tests calling torch, even when the package called them: not the package's
    assert package_caller([(fit_loop, 3, "run"), (common, 12, "fuse")]) is None
    assert package_caller([(conv, 1, "__init__"), (fit_loop, 3, "run"), (common, 9, "f")]) is None
    assert package_caller([(__file__, 5, "test"), (common, 12, "fuse")]) is None
    # torch's data loading machinery, even when the package iterates a loader
    loader = os.path.join(TORCH_DATA_DIR, "dataloader.py")
    assert package_caller([(loader, 7, "__init__"), (common, 12, "fuse")]) is None
    # a folder whose name merely starts like the package's is not the package
    assert package_caller([(PACKAGE_DIR.rstrip(os.sep) + "_old/x.py", 1, "f")]) is None
    assert package_caller([]) is None


def _run_as_package_code(source: str, **names) -> list[Violation]:
    """Run ``source`` in frames that claim a file of the package (no file is written to src/)."""
    code = compile(source, os.path.join(PACKAGE_DIR, "models", "not_a_real_file.py"), "exec")
    with FactoryDeviceMode() as mode:
        exec(code, {"torch": torch, **names})
    return mode.violations


@pytest.mark.parametrize(
    "call",
    [
        "torch.zeros(3)", "torch.ones(2, 2)", "torch.empty(4)", "torch.full((2,), 7.0)",
        "torch.arange(5)", "torch.linspace(0, 1, 3)", "torch.tensor([1.0, 2.0])",
        "torch.as_tensor([1, 2])", "torch.as_tensor(np.zeros(2))", "torch.rand(2)",
        "torch.randn(2)", "torch.randint(0, 3, (2,))", "torch.randperm(4)", "torch.eye(3)",
        "torch.scalar_tensor(1.0)", "torch.normal(0.0, 1.0, (2,))", "torch.zeros(3, device=None)",
        "torch.rand(2, generator=torch.Generator())",
        # allocated inside torch on the package's behalf
        "torch.nn.Linear(2, 2)",
    ],
)  # fmt: skip
def test_mode_catches_a_factory_without_device_in_package_code(call: str) -> None:
    violations = _run_as_package_code(call, np=np)
    assert violations, f"{call} called from a package file was not caught"
    assert violations[0].file == "models/not_a_real_file.py"
    with pytest.raises(AssertionError, match=r"not_a_real_file\.py:1 "):
        assert_no_violations(violations)


@pytest.mark.parametrize(
    "call",
    [
        "torch.zeros(3, device=x.device)", "torch.arange(5, device='cpu')",
        "torch.tensor([1.0], dtype=x.dtype, device=x.device)", "torch.as_tensor(x)",
        "torch.zeros_like(x)", "x.new_zeros(3)", "x.new_tensor([1.0])", "torch.full_like(x, 2.0)",
        "torch.arange(3, out=x.new_empty(0))", "torch.cat([x, x])",
        "torch.nn.Linear(2, 2, device=x.device)",
    ],
)  # fmt: skip
def test_mode_accepts_factories_that_say_or_inherit_the_device(call: str) -> None:
    assert _run_as_package_code(call, x=torch.ones(2)) == []


def test_mode_ignores_code_outside_the_package() -> None:
    with FactoryDeviceMode() as mode:
        torch.zeros(3)
        torch.nn.Linear(2, 2)
    assert mode.violations == []


# -- the package under the mode -------------------------------------------------------------------

IMAGE = 128


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    """One training and one validation batch (2 images of 128 px), everything under the mode.

    The training batch is resized to 96 px by the multi-scale collate, so its anchors are computed
    on the fly; validation at 128 px uses the precomputed ones. Callbacks: EMA, the discrete
    fine-tuning stage (discrete sampling from the start, EMA and warmup restarted at the first
    epoch), the non-finite guard, the prediction pictures (drawn after fit). Returns the module
    and the violations.
    """
    tmp = tmp_path_factory.mktemp("device")
    cfg = compose_config(
        "train",
        [
            *SMALL_SYNTHETIC,
            "data.synthetic.num_train=2",
            "data.synthetic.num_val=2",
            "data.synthetic.empty_fraction=0.0",
            "data.num_workers=0",
            "recipe.multiscale=true",
            "recipe.aug_stop_epoch=1",
            "data.multiscale.sizes=[96]",
            "model.scheduler.warmup_steps=2",
        ],
    )
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp / "data")
        cfg.paths.output_dir = str(tmp / "out")
    GlobalHydra.instance().clear()
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    pictures = PredictionPictures(num_images=2, score_threshold=0.0)
    callbacks = [
        EMA(warmup_steps=2),
        DiscreteFinetune(0, warmup_steps=1),
        NonFiniteGuard(),
        pictures,
    ]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp,
        callbacks=callbacks, gradient_clip_val=0.1,
    )  # fmt: skip
    with FactoryDeviceMode() as mode:
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1 and module.net.sampling_method == "discrete"
    assert "val/mAP" in trainer.callback_metrics and pictures.path.is_file()
    # the code under test was reached (with num_workers > 0, say, the dataset would run elsewhere)
    reached = {"data/dataset.py", "loss/matcher.py", "loss/criterion.py", "models/denoising.py",
               "models/decoder.py", "models/encoder.py", "models/sampling.py",
               "callbacks/pictures.py"}  # fmt: skip
    assert reached <= mode.callers, reached - mode.callers
    return module, mode.violations


def test_training_validation_callbacks_and_collate_give_every_tensor_a_device(fitted) -> None:
    _, violations = fitted
    assert_no_violations(violations)


def test_deformable_attention_samplers_give_every_tensor_a_device() -> None:
    """Both bilinear variants (mixing first on a large map, projecting first on a small one) and
    the discrete sampler, forward and backward, with box and with point references."""
    torch.manual_seed(0)
    attn = MSDeformableAttention(embed_dim=32, num_heads=2, num_levels=2, num_points=[3, 2])
    query = torch.randn(2, 3, 32)
    with FactoryDeviceMode() as mode:
        for shapes in ([(32, 32), (16, 16)], [(2, 2), (1, 1)]):
            value = torch.randn(2, sum(h * w for h, w in shapes), 32, requires_grad=True)
            for method in ("grid_sample", "discrete"):
                attn.set_method(method)
                for ref in (torch.rand(2, 3, 1, 4), torch.rand(2, 3, 1, 2)):
                    attn(query, ref, value, shapes).sum().backward()
    assert_no_violations(mode.violations)
    assert "models/sampling.py" in mode.callers


def test_predict_gives_every_tensor_a_device(fitted) -> None:
    """Fusing for deployment, and the ``Detector`` of ``rtdetr_lit.load`` and ``predict``."""
    module, _ = fitted
    pictures = np.random.default_rng(0).integers(0, 256, (2, IMAGE, 2 * IMAGE, 3), np.uint8)
    classes = ClassInfo.complete(None, None, module.postprocessor.num_classes, "test")
    with FactoryDeviceMode() as mode:
        # a copy: fusing for deployment changes the module in place
        model = InferenceModel(copy.deepcopy(module.net), module.postprocessor)
        found = Detector(None, classes, (IMAGE, IMAGE), model=model).predict(list(pictures), 0.0)
    assert_no_violations(mode.violations)
    assert "models/common.py" in mode.callers  # the fused convolutions were built under the mode
    assert [d.image_size for d in found] == [(IMAGE, 2 * IMAGE)] * 2 and len(found[0]) > 0


@pytest.mark.parametrize("boxes_per_image", [(0, 2), (0, 0)])
def test_denoising_and_losses_on_images_without_boxes_give_every_tensor_a_device(
    boxes_per_image: tuple[int, int],
) -> None:
    """The padded denoising group and the matcher's empty indices: paths a batch with boxes in
    every image never takes."""
    torch.manual_seed(0)
    classes, queries = 3, 8
    targets = [
        {"labels": torch.randint(0, classes, (n,)), "boxes": torch.rand(n, 4) * 0.5 + 0.25}
        for n in boxes_per_image
    ]
    criterion = RTDETRCriterion(
        classes, HungarianMatcher(), {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    )
    embed = torch.nn.Embedding(classes + 1, 16, padding_idx=classes)

    def head(n: int) -> dict[str, torch.Tensor]:
        return {
            "pred_logits": torch.randn(2, n, classes, requires_grad=True),
            "pred_boxes": torch.rand(2, n, 4, requires_grad=True),
        }

    with FactoryDeviceMode() as mode:
        dn = get_contrastive_denoising_training_group(targets, classes, queries, embed, 10)
        num_dn = dn.meta["dn_num_split"][0]
        outputs = {**head(queries), "aux_outputs": [head(queries)], "enc_outputs": [head(queries)]}
        outputs.update(dn_outputs=[head(num_dn)], dn_meta=dn.meta)
        sum(criterion(outputs, targets).values()).backward()
    assert_no_violations(mode.violations)
    assert {"models/denoising.py", "loss/criterion.py", "loss/matcher.py"} <= mode.callers


# -- checkpoints across devices -------------------------------------------------------------------


def _save_as_if_on_cuda(obj, path: Path) -> None:
    """``torch.save`` with every storage tagged ``cuda:0``, as a run on a GPU writes it: loading
    the file without a ``map_location`` needs CUDA."""
    with mock.patch.object(torch.serialization, "location_tag", lambda storage: "cuda:0"):
        torch.save(obj, path)


def _lightning_checkpoint() -> dict:
    """A small checkpoint shaped like Lightning's: weights under ``net.``, an AdamW state after one
    step (moments and step counters), hyper-parameters."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = torch.optim.AdamW(net.parameters())
    net(torch.rand(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    return {
        "epoch": 0,
        "global_step": 1,
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        "optimizer_states": [optimizer.state_dict()],
        "hyper_parameters": {"category_ids": [1, 3]},
    }


def test_a_checkpoint_written_on_a_gpu_loads_on_the_cpu(tmp_path: Path) -> None:
    saved = _lightning_checkpoint()
    path = tmp_path / "from_gpu.ckpt"
    _save_as_if_on_cuda(saved, path)
    # the file really asks for CUDA: a plain load fails without a GPU, and lands on one with it
    if torch.cuda.is_available():
        assert torch.load(path, weights_only=True)["state_dict"]["net.0.weight"].is_cuda
    else:
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)

    # what init_from, export and predict read (load_checkpoint_file), and what a resumed run reads
    for checkpoint in (load_checkpoint_file(path), SafeCheckpointIO().load_checkpoint(path)):
        state = checkpoint["state_dict"]
        assert state.keys() == saved["state_dict"].keys()
        assert all(v.device.type == "cpu" and torch.equal(v, saved["state_dict"][k])
                   for k, v in state.items())  # fmt: skip
        moments = [
            t for s in checkpoint["optimizer_states"][0]["state"].values() for t in s.values()
        ]
        assert len(moments) == 3 * len(list(saved["optimizer_states"][0]["state"]))
        assert all(t.device.type == "cpu" for t in moments)


def test_random_state_callback_gives_every_tensor_a_device() -> None:
    """Collecting the generator states for a checkpoint and setting them again on resume."""
    callback = RandomState()
    with FactoryDeviceMode() as mode:
        callback.load_state_dict(callback.state_dict())
        callback.on_train_start(SimpleNamespace(world_size=1, global_rank=0), None)
    assert_no_violations(mode.violations)
