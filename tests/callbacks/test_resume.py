"""Exact resume: a run continued from a mid-epoch checkpoint ends where an unbroken run ends.

Deterministic set-up: augmentation probabilities 0 (albumentations draws in every process from
its own seed, which a resumed process does not continue), everything else as in real training:
denoising on (random draws in the main process, restored by the RandomState callback), the
multi-scale policy until epoch 1 (the policy epoch must continue), warmup and EMA ramps running,
the discrete fine-tuning stage from epoch 1 (it must not restart EMA and warmup again), a
persistent DataLoader worker (the sampler must resume at the right epoch and sample).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from rtdetr_lit.train import train
from tests.conftest import QUIET_CPU_RUN, SMALL_SYNTHETIC, compose_config

REPO = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 4  # 8 images, global batch 2
EPOCHS = 2


def tiny_run(root: Path, *extra: str) -> list[str]:
    """Overrides for a deterministic 2-epoch demo run on 8 synthetic 128 px images in ``root``."""
    return [
        f"paths.data_dir={root / 'data'}",
        f"paths.log_dir={root / 'logs'}",
        "data.synthetic.num_train=8",
        "data.synthetic.num_val=2",
        *SMALL_SYNTHETIC,
        "data.num_workers=1",
        "data.augment.photometric_p=0",
        "data.augment.zoom_out_p=0",
        "data.augment.iou_crop_p=0",
        "data.augment.hflip_p=0",
        f"recipe.epochs={EPOCHS}",
        "recipe.aug_stop_epoch=1",
        "recipe.multiscale=true",
        "data.multiscale.sizes=[160]",
        "finetune=discrete",
        "callbacks.discrete_finetune.switch_epoch=1",
        "model.init_from=null",
        f"recipe.discrete_epochs={EPOCHS}",
        "recipe.discrete_aug_stop_epoch=1",
        *QUIET_CPU_RUN,
        "+callbacks.batch_probe._target_=tests.probes.BatchProbe",
        *extra,
    ]


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fast on a shared 2-core machine
    yield
    torch.set_num_threads(threads)
    GlobalHydra.instance().clear()


def _train_in_process(out: Path, overrides: list[str]) -> None:
    cfg = compose_config("train", [*overrides, f"paths.output_dir={out}"])
    train(cfg)


def _batches(run_dir: Path) -> list[dict]:
    lines = (run_dir / "probes" / "batches_rank0.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(resumed: dict, unbroken: dict, rtol: float, atol: float) -> None:
    """Raw weights, EMA weights, optimizer moments, scheduler and EMA counters all agree."""
    assert resumed["global_step"] == unbroken["global_step"]
    for key in ("current_model_state", "state_dict"):  # raw weights, EMA weights (with buffers)
        a, b = resumed[key], unbroken[key]
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(
                a[name], b[name], rtol=rtol, atol=atol, msg=lambda m, k=name: f"{k}: {m}"
            )
    assert resumed["averaging_state"]["n_averaged"] == unbroken["averaging_state"]["n_averaged"]
    opt_a, opt_b = resumed["optimizer_states"][0]["state"], unbroken["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_a[i][moment], opt_b[i][moment], rtol=rtol, atol=atol)
    assert resumed["lr_schedulers"] == unbroken["lr_schedulers"]
    stage = resumed["callbacks"]["DiscreteFinetune"]
    assert stage == unbroken["callbacks"]["DiscreteFinetune"] and stage["switched"]


def test_resume_mid_epoch_or_at_an_epoch_end_matches_an_unbroken_run(
    tmp_path: Path, one_thread: None
) -> None:
    # Keep every checkpoint of the unbroken run: every second step, where the last batch of an
    # epoch is left out (steps 2 and 6), and every epoch end, after validation (steps 4 and 8).
    keep = [
        "callbacks.last_checkpoint_steps.every_n_train_steps=2",
        "callbacks.last_checkpoint_steps.save_top_k=-1",
        "callbacks.last_checkpoint_steps.filename='step_{step:02d}'",
        "+callbacks.last_checkpoint_steps.auto_insert_metric_name=false",
        "callbacks.last_checkpoint.save_top_k=-1",
        "callbacks.last_checkpoint.filename='epoch_end_{step:02d}'",
        "+callbacks.last_checkpoint.auto_insert_metric_name=false",
    ]
    unbroken = tmp_path / "unbroken"
    _train_in_process(unbroken, tiny_run(tmp_path, *keep))
    saved = sorted(p.name for p in (unbroken / "checkpoints").glob("*_0?.ckpt"))
    assert saved == ["epoch_end_04.ckpt", "epoch_end_08.ckpt", "step_02.ckpt", "step_06.ckpt"]
    end = EPOCHS * STEPS_PER_EPOCH
    final = _load(unbroken / "checkpoints" / f"epoch_end_{end:02d}.ckpt")
    assert final["global_step"] == end
    # the policy epoch: multi-scale (160 px) in epoch 0 only
    assert {tuple(b["size"]) for b in _batches(unbroken) if b["epoch"] == 0} == {(160, 160)}

    # From step 6, in the middle of epoch 1 (batches 0-1 done, 2-3 to go), and from the end of
    # epoch 0 (the discrete stage then begins in the resumed run).
    for name, step in (("step_06", 6), ("epoch_end_04", 4)):
        resumed, ckpt = tmp_path / f"resumed_from_{name}", unbroken / "checkpoints" / f"{name}.ckpt"
        _train_in_process(resumed, tiny_run(tmp_path, f"ckpt_path={ckpt}"))
        # Exactly the remaining batches, the same images in the same order, at the same policy.
        expected = [b for b in _batches(unbroken) if b["step"] >= step]
        assert [b["step"] for b in expected] == list(range(step, end))
        assert _batches(resumed) == expected
        assert all(b["size"] == [128, 128] for b in expected)
        # Same process, same thread count: the same arithmetic, so identical states.
        last = _load(resumed / "checkpoints" / "last.ckpt")
        assert_same_training_state(last, final, rtol=0, atol=0)


@pytest.mark.slow  # three fresh training processes: 2-4 minutes on 2 busy cores
def test_run_killed_mid_epoch_resumes_with_ckpt_path_auto_like_an_unbroken_run(
    tmp_path: Path,
) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def command(run_dir: Path, *extra: str) -> list[str]:
        every3 = "callbacks.last_checkpoint_steps.every_n_train_steps=3"
        return [sys.executable, "-m", "rtdetr_lit.train", *tiny_run(tmp_path, every3, *extra),
                f"hydra.run.dir={run_dir}"]  # fmt: skip

    def finish(cmd: list[str]) -> None:
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]

    unbroken, killed = tmp_path / "unbroken", tmp_path / "killed"
    finish(command(unbroken))

    # SIGKILL as soon as the first last.ckpt is in place (step 3, in the middle of epoch 0).
    proc = subprocess.Popen(command(killed), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 900
    while not last.exists():
        assert proc.poll() is None, "the run ended before it wrote last.ckpt"
        assert time.monotonic() < deadline, "no last.ckpt after 15 minutes"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    saved = _load(last)["global_step"]
    assert saved % STEPS_PER_EPOCH, f"last.ckpt is at an epoch end (step {saved})"
    trained = len(_batches(killed))

    # Started again in the same run directory, as a requeued job: ckpt_path=auto finds last.ckpt.
    finish(command(killed, "ckpt_path=auto"))
    expected = [b for b in _batches(unbroken) if b["step"] >= saved]
    assert _batches(killed)[trained:] == expected
    assert_same_training_state(
        _load(killed / "checkpoints" / "last.ckpt"),
        _load(unbroken / "checkpoints" / "last.ckpt"),
        rtol=0,
        atol=0,
    )


def _began_step(run_dir: Path, step: int) -> bool:
    """Whether the batch probe of ``run_dir`` has recorded a batch at ``step`` or later."""
    path = run_dir / "probes" / "batches_rank0.jsonl"
    if not path.exists():
        return False
    complete = path.read_text().split("\n")[:-1]  # the last piece may be a line being written
    return any(json.loads(line)["step"] >= step for line in complete)


def _job_processes(marker: Path) -> list[int]:
    """PIDs of the submitit task below ``marker`` and its DataLoader workers (same command)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
        except OSError:  # the process ended meanwhile
            continue
        if b"submitit.core._submit" in text and str(marker).encode() in text:
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.slow  # a sweep with one job started twice: about 1 minute on an idle machine
def test_preempted_submitit_job_is_requeued_and_resumes_where_it_stopped(tmp_path: Path) -> None:
    """What a pre-empted SLURM job goes through, with submitit's local executor: the signal
    reaches every process of the job, submitit requeues it, the job runs again in the same
    directory and ``ckpt_path=auto`` continues from its last.ckpt."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    every3 = "callbacks.last_checkpoint_steps.every_n_train_steps=3"
    cmd = [sys.executable, "-m", "rtdetr_lit.train", "-m", "hydra/launcher=submitit_local",
           "ckpt_path=auto", *tiny_run(tmp_path, every3)]  # fmt: skip
    with open(tmp_path / "sweep.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        # Signal once the step-3 last.ckpt exists and step 3 has begun, so that the requeued job
        # repeats at least one step (a signal sent right after the save would leave no repeat).
        deadline = time.monotonic() + 900
        while True:
            lasts = list(tmp_path.glob("logs/train/multiruns/*/0/checkpoints/last.ckpt"))
            if lasts and _began_step(lasts[0].parents[1], 3):
                break
            assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "step 3 not reached after 15 minutes"
            time.sleep(0.05)
        pids = _job_processes(tmp_path)
        assert len(pids) == 2  # the task and its DataLoader worker, as SLURM would signal them
        for pid in pids:
            os.kill(pid, signal.SIGUSR2)
        assert proc.wait(timeout=900) == 0, (tmp_path / "sweep.log").read_text()[-4000:]

    job = lasts[0].parents[1]
    submitit_log = "".join(p.read_text() for p in job.parent.glob(".submitit/*/*_log.*"))
    assert "Requeued job" in submitit_log and "Job completed successfully" in submitit_log
    batches = _batches(job)
    steps = [b["step"] for b in batches]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    saved = batches[restart]["step"]
    # The requeued job started at the checkpoint (mid-epoch 0), on the batch the sampler had
    # given at that step, and trained to the end.
    assert 0 < saved < STEPS_PER_EPOCH
    assert batches[restart] == next(b for b in batches[:restart] if b["step"] == saved)
    assert steps[restart:] == list(range(saved, EPOCHS * STEPS_PER_EPOCH))
    assert _load(job / "checkpoints" / "last.ckpt")["global_step"] == EPOCHS * STEPS_PER_EPOCH
