"""Where the Hydra configs live, schemas that make a mistyped key an error, and every check of a
composed config that runs before anything is built.

Hydra itself refuses a command-line override of a missing key (``trainer.max_epoch=3``).
More kinds of mistakes are caught here (:func:`check_config` runs them all):

* a key that a config *file* (an experiment, a user's own config) adds at the top level or inside
  ``recipe``, ``sampling``, ``paths`` or ``extras``: those nodes have dataclass schemas, so Hydra
  fails while composing;
* a key inside a ``_target_`` node that the target does not accept: :func:`validate_config` checks
  every such node against the signature of its target before anything is built or downloaded;
* values that only fail deep inside a run: a sampling-point layout the model cannot take, a
  discrete fine-tuning stage from the first step without trained weights to start from.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "check_config",
    "check_finetune_start",
    "check_sampling_layout",
    "compose_config",
    "register_schemas",
    "validate_config",
]


def _find_config_dir() -> Path:
    # A wheel ships the configs as rtdetr_lit/conf; an editable install has conf/ at the repo root.
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"rtdetr_lit configs not found in {here / 'conf'} or the repo root")


CONFIG_DIR: Path = _find_config_dir()


class ConfigError(ValueError):
    """A config value or key that cannot work; the message names the key path."""


@dataclass
class RecipeSchema:
    epochs: int = 72
    aug_stop_epoch: int = 71
    multiscale: bool = True
    discrete_epochs: Any = None
    discrete_aug_stop_epoch: Any = None


@dataclass
class SamplingSchema:
    num_points: list[int] = field(default_factory=lambda: [4, 4, 4])


@dataclass
class PathsSchema:
    root_dir: str = "."
    data_dir: str = "data"
    log_dir: str = "logs"
    output_dir: str = "."
    work_dir: str = "."


@dataclass
class ExtrasSchema:
    ignore_warnings: bool = False
    enforce_tags: bool = False
    print_config: bool = True


@dataclass
class _CommonSchema:
    task_name: str = "train"
    tags: list[str] = field(default_factory=list)
    seed: Any = None
    ckpt_path: Any = None
    data: Any = None
    model: Any = None
    sampling: SamplingSchema = field(default_factory=SamplingSchema)
    recipe: RecipeSchema = field(default_factory=RecipeSchema)
    callbacks: Any = None
    logger: Any = None
    trainer: Any = None
    paths: PathsSchema = field(default_factory=PathsSchema)
    extras: ExtrasSchema = field(default_factory=ExtrasSchema)


@dataclass
class TrainSchema(_CommonSchema):
    train: bool = True
    test: bool = True
    optimized_metric: Any = None


@dataclass
class EvalSchema(_CommonSchema):
    task_name: str = "eval"


@dataclass
class ExportSchema(_CommonSchema):
    task_name: str = "export"
    format: str = "onnx"
    opset: int = 17
    output: Any = None
    image_size: Any = None


@dataclass
class PredictSchema(_CommonSchema):
    task_name: str = "predict"
    source: Any = None
    threshold: float = 0.5
    backend: str = "torch"
    batch_size: int = 1
    output: Any = None
    image_size: Any = None
    opset: int = 17


def _launch_dir() -> str:
    """The directory the command was started from: Hydra's ``runtime.cwd`` inside a job, the
    current directory before one (a multirun resolves its sweep folder before any job exists)."""
    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()


def register_schemas() -> None:
    """Register the schemas that the entry configs (``train.yaml``, ...) name in their defaults,
    and the ``launch_dir`` resolver that ``paths.root_dir`` uses."""
    if not OmegaConf.has_resolver("launch_dir"):
        OmegaConf.register_new_resolver("launch_dir", _launch_dir)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainSchema)
    cs.store(name="eval_schema", node=EvalSchema)
    cs.store(name="export_schema", node=ExportSchema)
    cs.store(name="predict_schema", node=PredictSchema)


_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def _target_nodes(node: Any, path: str) -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            child = node._get_node(key)
            if child is not None and not OmegaConf.is_missing(node, key):
                yield from _target_nodes(node[key], f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _target_nodes(item, f"{path}[{i}]")


def _locate(target: str) -> Any:
    module_name, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        if "." not in module_name:
            raise
        return getattr(_locate(module_name), attr)


def validate_config(cfg: DictConfig, keys: tuple[str, ...] | None = None) -> None:
    """Check every ``_target_`` node below ``cfg`` (or below ``cfg[k]`` for ``k`` in ``keys``).

    Raises :class:`ConfigError` naming the key path when a target cannot be imported or a key is
    not a parameter of it (targets taking ``**kwargs`` check their own keys when built).
    Interpolations are not resolved, so nothing is computed or read from disk.
    """
    roots = [(k, cfg[k]) for k in keys] if keys is not None else [("", cfg)]
    for root_path, root in roots:
        for path, node in _target_nodes(root, root_path):
            target = node["_target_"]
            try:
                obj = _locate(target)
            except (ImportError, AttributeError, ValueError) as err:
                raise ConfigError(f"{path}._target_: cannot import {target!r} ({err})") from err
            try:
                params = inspect.signature(obj).parameters
            except (TypeError, ValueError):
                continue
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                continue
            unknown = [k for k in node if k not in _HYDRA_KEYS and k not in params]
            if unknown:
                raise ConfigError(
                    f"{path}: {target} has no parameter {', '.join(map(repr, unknown))}; "
                    f"it accepts {', '.join(p for p in params if p != 'self')}"
                )


def compose_config(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` outside a Hydra app (tests, scripts),
    Hydra's runtime values (the run directory) included and resolvable."""
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides or [], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    return cfg


_BUILT_GROUPS = ("data", "model", "callbacks", "logger", "trainer")


def check_config(cfg: DictConfig) -> None:
    """Every check of this module on a composed entry config; raises :class:`ConfigError`."""
    validate_config(cfg, keys=tuple(k for k in _BUILT_GROUPS if cfg.get(k) is not None))
    check_sampling_layout(cfg)
    check_finetune_start(cfg)


def check_sampling_layout(cfg: DictConfig) -> None:
    """Refuse point counts the model cannot take before anything is built, naming the key."""
    from rtdetr_lit.models.zoo import check_num_points

    net = OmegaConf.select(cfg, "model.net")
    if not isinstance(net, DictConfig) or "num_points" not in net:
        return
    # Normally model.net.num_points reads ${sampling.num_points}: name the key the user sets.
    from_group = OmegaConf.is_interpolation(net, "num_points")
    key = "sampling.num_points" if from_group else "model.net.num_points"
    try:
        check_num_points(net.num_points)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from err


def check_finetune_start(cfg: DictConfig) -> None:
    """A discrete stage from the first step fine-tunes trained weights: refuse random ones."""
    stage = OmegaConf.select(cfg, "callbacks.discrete_finetune")
    if not cfg.get("train") or not isinstance(stage, DictConfig) or stage.get("switch_epoch") != 0:
        return
    if OmegaConf.select(cfg, "model.init_from") or cfg.get("ckpt_path"):
        return
    raise ConfigError(
        "model.init_from: finetune=discrete samples discretely from the first step, so it "
        "fine-tunes grid_sample-trained weights: give them with model.init_from=PATH (a stage-1 "
        "checkpoint, a converted or a reference file), or set "
        "callbacks.discrete_finetune.switch_epoch=E > 0 to train with grid_sample first"
    )
