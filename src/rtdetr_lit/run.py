"""Run set-up and teardown shared by the entry points: checks, seeding, loggers and callbacks,
the checkpoint to resume, the final report."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rtdetr_lit.config import ConfigError, check_config

__all__ = [
    "build_callbacks",
    "build_loggers",
    "check_launch",
    "check_sync_batchnorm",
    "derive_num_classes",
    "finish_run",
    "prepare_run",
    "rank_zero_filter",
    "resolve_ckpt_path",
]


def rank_zero_filter(record: logging.LogRecord) -> bool:
    """A logging filter that passes information from rank 0 only, and warnings and errors from
    every rank. Every DDP rank runs the entry point; the others would repeat each line on the
    console and in the run's log file. The rank is Lightning's (``rank_zero_only.rank``: from the
    launcher's environment, then the strategy's)."""
    from lightning.pytorch.utilities import rank_zero_only

    return record.levelno >= logging.WARNING or getattr(rank_zero_only, "rank", 0) == 0


log = logging.getLogger(__name__)


def prepare_run(cfg: DictConfig) -> None:
    """Check ``cfg`` (:func:`~rtdetr_lit.config.check_config`), apply ``cfg.extras`` and seed every
    generator (``cfg.seed``)."""
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_only

    check_config(cfg)
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("enforce_tags") and not cfg.get("tags"):
        raise ConfigError("tags: extras.enforce_tags is on but no tags were given (tags=[a,b])")
    if extras.get("print_config"):
        rank_zero_only(_print_config)(cfg)
    _log_lightning_once()
    for handler in logging.getLogger().handlers:  # Hydra's console and run-file handlers
        if rank_zero_filter not in handler.filters:
            handler.addFilter(rank_zero_filter)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)


def _log_lightning_once() -> None:
    """Print each Lightning message once. Lightning gives its ``lightning`` logger a console handler
    of its own and lets records propagate too, which under Hydra's logging prints every message
    twice. When the root logger has handlers (Hydra's console and run-file ones), drop Lightning's
    console handler: its messages then appear once, formatted like ours, and land in the run's log
    file."""
    if not logging.getLogger().handlers:
        return
    lightning = logging.getLogger("lightning")
    for handler in list(lightning.handlers):
        if type(handler) is logging.StreamHandler:
            lightning.removeHandler(handler)


def _print_config(cfg: DictConfig) -> None:
    from rich.console import Console
    from rich.syntax import Syntax

    text = OmegaConf.to_yaml(cfg, resolve=False)
    Console().print(Syntax(text, "yaml", theme="ansi_dark", word_wrap=True))
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config_tree.yaml").write_text(text)


def _build_group(group: DictConfig | None, kind: str) -> list[Any]:
    from hydra.utils import instantiate

    built = []
    for name, node in (group or {}).items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"{kind}.{name}: expected a node with a _target_")
        built.append(instantiate(node))
    return built


def build_callbacks(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` node of the ``callbacks`` group (null entries are skipped)."""
    return _build_group(group, "callbacks")


def build_loggers(group: DictConfig | None) -> list[Any] | bool:
    """Instantiate every ``_target_`` node of the ``logger`` group; ``False`` when there is none."""
    return _build_group(group, "logger") or False


def derive_num_classes(cfg: DictConfig) -> None:
    """Fill ``data.num_classes`` from the dataset when the config leaves it null (the data
    module's ``count_classes``: a COCO file's categories, YOLO's names), before the model, which
    reads it, is built."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    if OmegaConf.select(cfg, "data.num_classes") is not None:
        return
    datamodule = instantiate(cfg.data)
    try:
        num_classes = datamodule.count_classes()
    except (OSError, ValueError) as err:
        raise ConfigError(str(err)) from None
    with open_dict(cfg):
        cfg.data.num_classes = num_classes
    log.info("data.num_classes=%d, counted in the dataset", num_classes)


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path`` as given; for ``ckpt_path=last`` the newest ``last.ckpt`` of this task (any
    earlier run); for ``ckpt_path=auto`` Lightning's ``"last"``: the newest last checkpoint in this
    run's own checkpoint folder if there is one (a requeued or restarted job), else none."""
    path = cfg.get("ckpt_path")
    if path == "auto":
        return "last"
    if path != "last":
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"ckpt_path: no such file {path}")
        return path
    task_dir = Path(cfg.paths.log_dir) / cfg.task_name
    candidates = sorted(task_dir.glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        log.warning("ckpt_path=last: no last.ckpt below %s, starting from scratch", task_dir)
        return None
    log.info("resuming from %s", candidates[-1])
    return str(candidates[-1])


def check_launch(trainer: Any) -> None:
    """Refuse a local Hydra multirun (``-m``) whose trainer starts its ranks by re-running the
    command (``strategy: ddp`` with several devices): each extra rank would run the whole sweep.

    Where the cluster starts the processes (SLURM through ``hydra/launcher=slurm``, torchrun)
    nothing is re-run and sweeps work.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if (
        isinstance(launcher, _SubprocessScriptLauncher)
        and launcher.num_processes > 1
        and not launcher.cluster_environment.creates_processes_externally
        and HydraConfig.initialized()
        and HydraConfig.get().mode == RunMode.MULTIRUN
    ):
        raise ConfigError(
            f"trainer.strategy: {trainer.strategy.__class__.__name__} starts its other "
            f"{launcher.num_processes - 1} process(es) by re-running the command, which a Hydra "
            "multirun (-m) cannot do. Run the jobs one by one, or submit the sweep to SLURM "
            "(hydra/launcher=slurm), where SLURM starts the processes."
        )


def check_sync_batchnorm(trainer: Any) -> None:
    """Refuse torch's ``SyncBatchNorm`` on CPUs before fitting, where Lightning would fail deep in
    the DDP set-up; ``trainer=ddp_sim`` brings the CPU plugin instead."""
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.plugins import TorchSyncBatchNorm

    layer_sync = trainer._accelerator_connector._layer_sync
    if isinstance(trainer.accelerator, CPUAccelerator) and type(layer_sync) is TorchSyncBatchNorm:
        raise ConfigError(
            "trainer.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only. For DDP on CPUs use "
            "trainer=ddp_sim (its SyncBatchNormCPU plugin synchronises batch norm over gloo), or "
            "set trainer.sync_batchnorm=false"
        )


def finish_run(cfg: DictConfig, trainer: Any, metrics: dict[str, Any]) -> dict[str, float]:
    """Log the final metrics and where the checkpoints are; return the metrics as floats."""
    values = {k: float(v) for k, v in metrics.items()}
    for key in sorted(values):
        if key.startswith(("val/", "test/")):
            log.info("%-20s %.4f", key, values[key])
    ckpt = getattr(trainer, "checkpoint_callback", None)
    if ckpt is not None and ckpt.dirpath:
        log.info("checkpoints: %s", ckpt.dirpath)
    log.info("run directory: %s", cfg.paths.output_dir)
    return values
