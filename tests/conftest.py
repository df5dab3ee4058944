"""Shared fixtures: composed CPU-only configs whose outputs and data live in temporary folders."""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from rtdetr_lit.config import compose_config

# Tests never reach the network: HF models are built from configs, data is generated.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# State-dict layouts of the reference checkpoints (name, shape, dtype; docs/rtdetrv2.md §10).
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def _cpu_sized(cfg: DictConfig, tmp_path: Path) -> DictConfig:
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.devices = 1
        cfg.extras.print_config = False
        cfg.data.num_workers = 0
    return cfg


@pytest.fixture
def cfg_train(tmp_path: Path) -> Iterator[DictConfig]:
    """The default train config on the CPU, writing only below ``tmp_path``."""
    yield _cpu_sized(compose_config("train"), tmp_path)
    GlobalHydra.instance().clear()


@pytest.fixture
def cfg_eval(tmp_path: Path) -> Iterator[DictConfig]:
    """The default eval config on the CPU, writing only below ``tmp_path``."""
    yield _cpu_sized(compose_config("eval", ["ckpt_path=none.ckpt"]), tmp_path)
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``tests/reference``: state-dict layouts of the reference checkpoints."""
    return REFERENCE_DIR


_DTYPES = {"torch.float32": torch.float32, "torch.int64": torch.int64, "torch.bool": torch.bool}


def reference_layout(name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (shape, dtype)}`` of reference checkpoint ``name`` (skips the test if absent)."""
    path = REFERENCE_DIR / f"official_state_dict_{name}.tsv"
    if not path.is_file():
        pytest.skip(f"reference layout {path} not found")
    rows = (line.rstrip("\n").split("\t") for line in path.read_text().splitlines())
    return {key: (ast.literal_eval(shape), _DTYPES[dtype]) for key, shape, dtype in rows}


def random_state(layout: dict, seed: int, resize: dict[str, tuple[int, ...]] | None = None):
    """Random tensors (never all zero) per (name, shape, dtype); ``resize`` overrides shapes.
    Values are small and batch-norm variances positive, as in a trained network, so that a model
    holding them computes finite outputs (standard normal weights overflow within a few layers)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, (shape, dtype) in layout.items():
        shape = (resize or {}).get(key, shape)
        if dtype == torch.bool:
            state[key] = torch.rand(shape, generator=gen) > 0.3
        elif dtype == torch.int64:
            state[key] = torch.randint(1, 10_000, shape, generator=gen)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.05
    return state


def reference_shapes(name: str, prefix: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the reference checkpoint ``name`` under ``prefix`` (the prefix stripped)."""
    return {
        key[len(prefix) :]: shape
        for key, (shape, _) in reference_layout(name).items()
        if key.startswith(prefix)
    }


# A synthetic set of small images (128-160 px, up to 3 objects) trained at 128 px, 2 per step.
SMALL_SYNTHETIC = [
    "data.synthetic.min_size=128",
    "data.synthetic.max_size=160",
    "data.synthetic.max_object=64",
    "data.synthetic.max_objects=3",
    "data.image_size=[128,128]",
    "data.batch_size=2",
    "data.val_batch_size=2",
]

# A command-line training run for tests: CPU, no sanity check, test or console extras, no pictures.
QUIET_CPU_RUN = [
    "+trainer.num_sanity_val_steps=0",
    "trainer.accelerator=cpu",
    "test=false",
    "extras.print_config=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.prediction_pictures=null",
    "callbacks.evaluation_plots=null",
]
