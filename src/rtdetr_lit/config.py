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
  discrete fine-tuning stage from the first step without trained weights to start from;
* a required value (``???`` in a config: ``ckpt_path`` of eval/export/predict, ``source``,
  ``data.root`` of ``data=custom``) that was not given: :func:`check_required` names it with an
  example command.

The schemas of eval, export and predict declare their required values ``MISSING`` too: OmegaConf
keeps a value when ``???`` is merged onto it, so a ``???`` in a YAML file over a schema default (or
over a value of the config it builds on) would otherwise be lost.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "check_config",
    "check_finetune_start",
    "check_required",
    "check_sampling_layout",
    "compose_config",
    "did_you_mean",
    "missing_keys",
    "register_schemas",
    "required_message",
    "suggest",
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
    ckpt_path: Any = MISSING


@dataclass
class ExportSchema(_CommonSchema):
    task_name: str = "export"
    ckpt_path: Any = MISSING
    format: str = "onnx"
    opset: int = 17
    output: Any = None
    image_size: Any = None


@dataclass
class PredictSchema(_CommonSchema):
    task_name: str = "predict"
    ckpt_path: Any = MISSING
    source: Any = MISSING
    threshold: float = 0.5
    backend: str = "torch"
    device: str = "auto"
    precision: str = "fp32"
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
                accepted = [p for p in params if p != "self"]
                close = [m for k in unknown for m in suggest(str(k), accepted)]
                hint = f" ({did_you_mean(f'{path}.{m}' for m in close)})" if close else ""
                raise ConfigError(
                    f"{path}: {target} has no parameter {', '.join(map(repr, unknown))}{hint}; "
                    f"it accepts {', '.join(accepted)}"
                )


def suggest(word: str, candidates: Iterable[str]) -> list[str]:
    """The candidates nearest to a misspelt ``word`` (at most three, best first; none when
    nothing is close): ``suggest("max_epoch", trainer keys) == ["max_epochs"]``."""
    names = [c for c in candidates if isinstance(c, str)]
    close = difflib.get_close_matches(word, names, n=3, cutoff=0.6)
    if not close:
        return []
    best = difflib.SequenceMatcher(None, word, close[0]).ratio()
    # Only the nearest few: max_epoch suggests max_epochs, not min_epochs as well.
    return [c for c in close if difflib.SequenceMatcher(None, word, c).ratio() >= best - 0.1]


def did_you_mean(names: Iterable[str]) -> str:
    """``did you mean a?``, ``did you mean a or b?``, ``did you mean a, b or c?``"""
    words = list(dict.fromkeys(names))
    either = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
    return f"did you mean {either}?"


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
    check_required(cfg)
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


# How a required value is given, in the example command of its error message.
_EXAMPLES = {
    "ckpt_path": "logs/train/runs/<run>/checkpoints/last.ckpt",
    "source": "path/to/images",
    "data.root": "/path/to/dataset",
    "data.num_classes": "N",
    "data.names": "[cat,dog]",
}
# The commands whose Hydra job name (the module's) is worth an example command.
_COMMANDS = ("train", "eval", "export", "predict", "speed_accuracy")


def missing_keys(cfg: DictConfig) -> list[str]:
    """The key paths of the required values (``???``) that ``cfg`` still lacks, in config order;
    Hydra's own node is not searched."""
    found: list[str] = []

    def walk(node: DictConfig | ListConfig, path: str) -> None:
        keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
        for key in keys:
            if node is cfg and key == "hydra":
                continue
            sub = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}".lstrip(".")
            if OmegaConf.is_missing(node, key):
                found.append(sub)
                continue
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)) and not (
                child._is_none() or child._is_interpolation()
            ):
                walk(child, sub)

    walk(cfg, "")
    return found


def required_message(keys: list[str], cfg: DictConfig | None = None) -> str:
    """``ckpt_path is required: python -m rtdetr_lit.eval ckpt_path=...``: the missing keys and
    the command as it was given (Hydra's overrides) with a value for each of them."""
    job, given = "", []
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        job, given = hydra_cfg.job.name, list(hydra_cfg.overrides.task)
    task = cfg.get("task_name") if cfg is not None else None
    if job not in _COMMANDS:
        job = task if task in _COMMANDS else "train"
    # speed_accuracy runs the eval config with task_name=speed_accuracy added to its overrides.
    given = [o for o in given if o != f"task_name={job}" and o.split("=", 1)[0] not in keys]
    words = [f"python -m rtdetr_lit.{job}", *map(shlex.quote, given)]
    words += [f"{k}={_EXAMPLES.get(k, '...')}" for k in keys]
    verb = "is" if len(keys) == 1 else "are"
    named = keys[0] if len(keys) == 1 else f"{', '.join(keys[:-1])} and {keys[-1]}"
    return f"{named} {verb} required: {' '.join(words)}"


def check_required(cfg: DictConfig) -> None:
    """Refuse a composed config that still has a required value (``???``) before anything is built;
    the :class:`ConfigError` names each one and gives an example command."""
    keys = missing_keys(cfg)
    if keys:
        raise ConfigError(required_message(keys, cfg))
