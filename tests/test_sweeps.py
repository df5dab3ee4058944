"""Hydra sweeps through ``python -m rtdetr_lit.train -m``: a grid over model sizes, and the optuna
search (``hparams_search=optuna``), which optimises the value the entry point returns."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.utils import get_class, instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from rtdetr_lit import create_model
from rtdetr_lit.checkpoints import load_model_weights
from rtdetr_lit.run import check_launch, resolve_ckpt_path

from .conftest import QUIET_CPU_RUN, SMALL_SYNTHETIC, compose_config

REPO = Path(__file__).resolve().parents[1]

# Each job: a step or two on synthetic 128 px images (2 per step), validated on 2.
TINY = [
    "data.synthetic.num_val=2",
    *SMALL_SYNTHETIC,
    "data.num_workers=0",
    "recipe.epochs=1",
    *QUIET_CPU_RUN,
]


def _sweep(tmp_path: Path, *args: str, steps: int = 1) -> Path:
    """Run ``python -m rtdetr_lit.train`` with ``args`` in ``tmp_path``; the sweep folder.

    Outputs and data land below the directory the command starts in, as for a user.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "rtdetr_lit.train", *args, *TINY,
           f"data.synthetic.num_train={2 * steps}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    return sweep


def _last_logged(job: Path, name: str) -> float:
    with open(job / "csv" / "metrics.csv") as f:
        values = [row[name] for row in csv.DictReader(f) if row.get(name)]
    return float(values[-1])


def _overrides(job: Path) -> dict[str, str]:
    lines = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return dict(line.split("=", 1) for line in lines)


def test_optuna_search_maximises_the_best_validation_map() -> None:
    cfg = compose_config("train", ["hparams_search=optuna"])
    assert cfg.optimized_metric == "val/mAP_best"
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.direction == "maximize"
    assert get_class(cfg.hydra.sweeper._target_).__name__ == "OptunaSweeper"
    params = set(cfg.hydra.sweeper.params)
    assert params == {"model.optimizer.lr", "model.backbone_lr", "model.optimizer.weight_decay"}
    for key in params:  # every searched key is a number of the train config
        assert isinstance(OmegaConf.select(cfg, key, throw_on_missing=True), float)


@pytest.mark.slow  # two training jobs (r18, r34) in one process: about 40 s on an idle machine
def test_multirun_over_model_sizes_trains_each_size_in_its_own_job(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, "-m", "model=r18,r34")
    assert (sweep / "multirun.yaml").is_file()
    nets = {size: create_model(size, num_classes=6) for size in ("r18", "r34")}
    for num, size in enumerate(("r18", "r34")):
        job = sweep / str(num)
        assert _overrides(job)["model"] == size
        last = job / "checkpoints" / "last.ckpt"
        # The checkpoint is of this job's size: it fits that network and not the other one.
        assert load_model_weights(nets[size], last) == []
        other = "r34" if size == "r18" else "r18"
        with pytest.raises(ValueError, match="does not fit the model"):
            load_model_weights(nets[other], last)
        assert _last_logged(job, "val/mAP_best") >= 0.0


@pytest.mark.slow  # two demo training jobs in one process: about 30 s on an idle machine
def test_optuna_search_gets_the_optimized_metric_of_each_job(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # val/mAP_best is 0 for every job this short, so the search follows the training loss of the
    # second step instead (it depends on the sampled rates): what train.main returns is
    # cfg.optimized_metric of the job, whichever it is.
    sweep = _sweep(
        tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2", "optimized_metric=train/loss",
        "hydra.sweeper.direction=minimize", "trainer.log_every_n_steps=1", steps=2,
    )  # fmt: skip
    jobs = sorted(j for j in sweep.iterdir() if j.is_dir() and j.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    losses = {float(_overrides(j)["model.optimizer.lr"]): _last_logged(j, "train/loss")
              for j in jobs}  # fmt: skip
    assert len(set(losses.values())) == 2  # two different rates, two different second steps
    for job in jobs:
        assert _last_logged(job, "val/mAP_best") >= 0.0  # logged, so sweeps can follow it
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best_lr = float(results["best_params"]["model.optimizer.lr"])
    assert results["best_value"] == pytest.approx(losses[best_lr], rel=1e-6)
    assert results["best_value"] == pytest.approx(min(losses.values()), rel=1e-6)


def test_slurm_launcher_runs_one_task_per_device_under_lightnings_slurm_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8",
                 "trainer.num_nodes=2", "ckpt_path=auto", "hydra.mode=MULTIRUN",
                 f"paths.output_dir={tmp_path}"]  # fmt: skip
    single = compose_config("train", overrides[:1]).hydra.launcher
    assert (single["nodes"], single["tasks_per_node"]) == (1, 1)  # the default trainer
    cfg = compose_config("train", overrides)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 8, 8)
    # requeued at the time limit (and on pre-emption), the job then resumes its own last.ckpt
    assert launcher["max_num_timeout"] > 0 and 0 < launcher["signal_delay_s"] < 60 * 5
    assert resolve_ckpt_path(cfg) == "last"
    assert type(instantiate(cfg.hydra.launcher)).__name__ == "SlurmLauncher"

    # In a task of that allocation (rank 11 = node 1, local rank 3), Lightning takes its place in
    # the world from SLURM and starts no processes itself, so the sweep guard lets it run.
    slurm = {"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2",
             "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "11",
             "SLURM_LOCALID": "3", "SLURM_NODEID": "1", "SLURM_NODELIST": "gpu[01-02]"}  # fmt: skip
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    # The trainer sets the process-wide rank that rank-zero-only code reads: put it back after,
    # or every later test in this process logs nothing (its loggers think they are rank 11).
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning.pytorch.utilities import rank_zero as pytorch_rank_zero
    from lightning_utilities.core import rank_zero as utilities_rank_zero

    for module in (fabric_rank_zero, pytorch_rank_zero, utilities_rank_zero):
        monkeypatch.setattr(module.rank_zero_only, "rank", module.rank_zero_only.rank)
    trainer = instantiate(cfg.trainer, accelerator="cpu", logger=False, enable_checkpointing=False)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.creates_processes_externally
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (
        16, 11, 3, 1,
    )  # fmt: skip
    check_launch(trainer)  # a multirun, but SLURM starts the processes
