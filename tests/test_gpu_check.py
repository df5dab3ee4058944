"""``scripts/gpu_check.py``: its plan, commands, skip reasons, summary and parity comparison, fast
and without a GPU; the whole ``--cpu-smoke`` pipeline is the one slow test."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from rtdetr_lit.config import CONFIG_DIR
from tests.conftest import compose_config

SCRIPTS = CONFIG_DIR.parent / "scripts"


def _load(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(SCRIPTS))  # as `python scripts/<name>.py` has it
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gc(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return _load("gpu_check", monkeypatch)


def _compose(name: str, cmd: list[str]) -> object:
    """Compose ``conf/<name>.yaml`` with the Hydra overrides of a ``python -m ...`` command."""
    start = cmd.index("-m") + 2 if "-m" in cmd else cmd.index("--") + 1
    try:
        return compose_config(name, cmd[start:])
    finally:
        GlobalHydra.instance().clear()


# -- plan, commands and skip reasons ---------------------------------------------------------
def test_arguments_defaults_and_refusals(gc) -> None:
    args = gc.parse_args([])
    assert not args.cpu_smoke and args.out is None and args.gpus is None
    assert gc.selected_checks(args) == list(gc.CHECKS)
    assert gc.selected_checks(gc.parse_args(["--checks", "train_bf16, eval"])) == [
        "train_bf16",
        "eval",
    ]
    with pytest.raises(SystemExit):
        gc.parse_args(["--checks", "train_bf16,nonsense"])
    with pytest.raises(SystemExit):  # Hydra overrides are not passed through to the checks
        gc.parse_args(["model=r50"])


def test_gpu_plan_trains_r18_at_640_for_50_steps_on_every_gpu(gc, tmp_path: Path) -> None:
    plan = gc.make_plan(gc.parse_args([]), cuda_devices=4, cpus=16)
    assert (plan.model, plan.image_size, plan.steps, plan.fp16_steps) == ("r18", 640, 50, 20)
    assert plan.ranks == 4 and plan.batch == 8 and plan.device == "cuda"
    # One epoch holds the 50 steps of the 4-GPU global batch; cores shared among the ranks.
    assert plan.num_train == 50 * 8 * 4
    assert plan.workers(1) == 8 and plan.workers(4) == 3
    assert plan.provider == "CUDAExecutionProvider" and plan.parity_atol == 1e-3
    with pytest.raises(SystemExit):
        gc.make_plan(gc.parse_args(["--gpus", "5"]), cuda_devices=4)

    data = tmp_path / "data"
    ddp = gc.train_command(plan, "train_ddp", tmp_path / "train_ddp", data)
    assert ddp[:3] == [sys.executable, "-m", "rtdetr_lit.train"]
    for override in ("trainer=ddp", "trainer.devices=4", "trainer.precision=bf16-mixed",
                     "data.batch_size=32", "data.num_workers=3", "++trainer.max_steps=50",
                     "++trainer.limit_train_batches=50", "test=false", "model=r18",
                     "data.image_size=[640,640]"):  # fmt: skip
        assert override in ddp
    fp16 = gc.train_command(plan, "train_fp16", tmp_path / "train_fp16", data)
    for override in ("trainer=gpu", "trainer.precision=16-mixed", "++trainer.max_steps=20",
                     "data.batch_size=8", "data.num_workers=8"):  # fmt: skip
        assert override in fp16

    # The overrides compose: every key exists (or is added with ++/+) where the commands use it.
    cfg = _compose("train", ddp)
    assert cfg.trainer.max_steps == 50 and cfg.trainer.strategy == "ddp"
    assert cfg.callbacks.gpu_probe._target_ == "_gpu_probe.ThroughputProbe"
    assert (
        cfg.callbacks.model_checkpoint is None and cfg.callbacks.last_checkpoint.filename == "last"
    )
    assert cfg.callbacks.gpu_probe.out_dir == str(tmp_path / "train_ddp" / "probe")
    assert cfg.data.synthetic.num_train == 1600 and list(cfg.data.image_size) == [640, 640]
    ckpt = tmp_path / "last.ckpt"
    assert (
        _compose("eval", gc.eval_command(plan, ckpt, tmp_path, data)).trainer.accelerator == "gpu"
    )
    exported = _compose(
        "export", gc.export_command(plan, ckpt, tmp_path / "m.onnx", tmp_path, data)
    )
    assert exported.output == str(tmp_path / "m.onnx") and exported.ckpt_path == str(ckpt)
    parity = gc.parity_command(plan, tmp_path / "m.onnx", tmp_path / "p.json", ckpt, data)
    assert _compose("export", parity).model.net.name == "r18"
    assert "--parity-provider=CUDAExecutionProvider" in parity
    predict = gc.predict_command(plan, ckpt, tmp_path, data)
    assert "device=cuda" in predict and f"source={data / 'synthetic' / 'val'}" in predict


def test_cpu_smoke_plan_is_the_same_pipeline_small_on_the_cpu(gc, tmp_path: Path) -> None:
    plan = gc.make_plan(gc.parse_args(["--cpu-smoke"]), cuda_devices=0, cpus=2)
    assert (plan.model, plan.image_size, plan.steps, plan.fp16_steps) == ("demo", 128, 3, 2)
    assert plan.ranks == 2 and plan.workers(2) == 0 and plan.device == "cpu"
    assert plan.provider == "CPUExecutionProvider" and plan.parity_atol == 1e-4
    ddp = gc.train_command(plan, "train_ddp", tmp_path, tmp_path)
    assert "trainer=ddp_sim" in ddp and "trainer.precision=32-true" in ddp
    # fp16 autocast does not exist on CPUs (Lightning would turn it into bf16): 32-true there.
    assert "trainer.precision=32-true" in gc.train_command(plan, "train_fp16", tmp_path, tmp_path)
    assert "trainer.precision=bf16-mixed" in gc.train_command(
        plan, "train_bf16", tmp_path, tmp_path
    )
    assert "+callbacks.gpu_probe.warmup_steps=1" in ddp


def test_without_cuda_every_gpu_check_is_skipped_with_the_reason(gc) -> None:
    gpu = gc.make_plan(gc.parse_args([]), cuda_devices=0)
    reasons = gc.skip_reasons(gpu, cuda=False, providers=["CPUExecutionProvider"])
    assert reasons == dict.fromkeys(gc.CHECKS, gc.NO_CUDA)
    assert "no CUDA device" in gc.NO_CUDA

    # With CUDA: the parity check needs onnxruntime-gpu.
    reasons = gc.skip_reasons(gpu, cuda=True, providers=["CPUExecutionProvider"])
    assert reasons == {
        "onnx_parity": "onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)",
    }
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert gc.skip_reasons(gpu, cuda=True, providers=providers) == {}
    smoke = gc.make_plan(gc.parse_args(["--cpu-smoke"]), cuda_devices=0)
    assert gc.skip_reasons(smoke, cuda=False, providers=["CPUExecutionProvider"]) == {}


def test_hydra_values_with_grammar_characters_are_quoted(gc) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for path in ("/tmp/run/last.ckpt", "/tmp/my run/x", "/tmp/it's,[1]", "/tmp/a=b"):
        value = gc.hydra_value(Path(path))
        assert parser.parse_override(f"ckpt_path={value}").value() == path
    assert gc.hydra_value(Path("/tmp/run/last.ckpt")) == "/tmp/run/last.ckpt"


def test_main_without_cuda_skips_everything_and_exits_0(gc, monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split(" ")[0] in gc.CHECKS]
    assert len(rows) == len(gc.CHECKS)
    assert all("SKIP" in row and "no CUDA device" in row for row in rows)
    assert "--cpu-smoke" in out and f"0 PASS, 0 FAIL, {len(gc.CHECKS)} SKIP" in out
    assert not (tmp_path / "gpu_check").exists()  # nothing ran, nothing written


# -- reporting -------------------------------------------------------------------------------
def test_summary_table_and_exit_code(gc, tmp_path: Path) -> None:
    ok = [gc.Result("train_bf16", gc.PASS, 41.2, "bf16-mixed: 300.0 img/s"),
          gc.Result("predict", gc.SKIP, details="predict has no device= option yet")]  # fmt: skip
    table, code = gc.summarize(ok)
    assert code == 0
    lines = table.splitlines()
    assert lines[0].split() == ["check", "result", "seconds", "details"]
    assert lines[1].split()[:3] == ["train_bf16", "PASS", "41.2"]
    assert lines[2].split()[:3] == ["predict", "SKIP", "-"]
    assert lines[-1] == "1 PASS, 0 FAIL, 1 SKIP"

    log = tmp_path / "eval.log"
    table, code = gc.summarize([*ok, gc.Result("eval", gc.FAIL, 3.0, "exit code 1", log)])
    assert code == 1
    assert f"log of eval: {log}" in table and table.endswith("1 PASS, 1 FAIL, 1 SKIP")


def test_failure_names_the_last_error_of_the_log(gc, tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("starting\nTraceback (most recent call last):\n  File 'x'\n"
                   "torch.OutOfMemoryError: CUDA out of memory\n\nbye\n")  # fmt: skip
    result = gc.failure("train_bf16", 1, 2.0, log, 300)
    assert result.status == gc.FAIL and result.log == log
    assert result.details == "exit code 1: torch.OutOfMemoryError: CUDA out of memory"
    assert gc.failure("eval", None, 240.0, log, 240).details.startswith("timed out after 240 s")


def test_throughput_details_of_one_and_several_ranks(gc) -> None:
    rank = {"images_per_s": 150.0, "timed_steps": 40, "precision": "bf16-mixed",
            "memory_kind": "cuda max allocated", "peak_memory_gib": 5.123,
            "peak_reserved_gib": 6.0}  # fmt: skip
    two = [rank, {**rank, "peak_memory_gib": 5.0, "peak_reserved_gib": 6.5}]
    assert gc.throughput_details(two) == (
        "bf16-mixed: 300.0 img/s (2 ranks) over 40 steps; peak memory 5.12, 5.00 GiB "
        "(per GPU, allocated; reserved at most 6.50)"
    )
    cpu = {**rank, "images_per_s": None, "memory_kind": "cpu peak RSS"}
    assert "img/s not measured" in gc.throughput_details([cpu])
    assert "CPU peak RSS" in gc.throughput_details([cpu])


def test_run_logged_kills_the_whole_process_group_on_timeout(gc, tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    log = tmp_path / "logs" / "hang.log"
    code, seconds = gc.run_logged(
        [sys.executable, "-c", script], log, 3, tmp_path, dict(os.environ)
    )
    assert code is None and seconds < 30
    assert "started" in log.read_text()
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild (a DDP rank, say) is gone too, once reaped by init
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {child} survived the time-out")

    code, _ = gc.run_logged([sys.executable, "-c", "raise SystemExit(3)"], log, 30, tmp_path,
                            dict(os.environ))  # fmt: skip
    assert code == 3 and log.read_text().startswith("$ ")


# -- the probe and the parity comparison -----------------------------------------------------
def test_throughput_probe_times_the_steps_after_the_warmup_per_rank(monkeypatch, tmp_path) -> None:
    probe_module = _load("_gpu_probe", monkeypatch)
    module = SimpleNamespace(device=torch.device("cpu"))
    batch = (torch.zeros(4, 3, 32, 32), [{}] * 4)
    for rank in (0, 10, 2):  # ranks read back in numeric order
        probe = probe_module.ThroughputProbe(str(tmp_path), warmup_steps=2)
        trainer = SimpleNamespace(global_rank=rank, world_size=11, precision="bf16-mixed")
        for i in range(5):
            probe.on_train_batch_start(trainer, module, batch, i)
            probe.on_train_batch_end(trainer, module, None, batch, i)
        probe.on_train_end(trainer, module)
    records = probe_module.read_records(tmp_path)
    assert [r["rank"] for r in records] == [0, 2, 10]
    first = records[0]
    # Batches 3, 4 and 5 end after the clock started at the end of batch 2: 3 steps of 4 images.
    assert first["timed_steps"] == 3 and first["timed_images"] == 12 and first["steps"] == 5
    assert first["images_per_s"] == pytest.approx(12 / first["seconds"])
    assert first["memory_kind"] == "cpu peak RSS" and first["peak_memory_gib"] > 0
    assert not list(tmp_path.glob("*.tmp"))


def _detections(queries: int = 50, classes: int = 3, seed: int = 0):
    """Fake post-processor output for one image: every query with each class, sorted by score."""
    rng = np.random.default_rng(seed)
    boxes = np.sort(rng.uniform(0, 100, (queries, 4)), axis=-1).astype(np.float32)
    scores = rng.uniform(0, 1, (queries, classes)).astype(np.float32)
    order = np.argsort(-scores.ravel(), kind="stable")
    labels = (order % classes).astype(np.int64)
    return labels, boxes[order // classes], scores.ravel()[order]


def _batch(*images):
    return [np.stack(parts) for parts in zip(*images, strict=True)]


def test_parity_pairs_tied_detections_and_allows_one_query_selected_differently(gc) -> None:
    sizes = np.array([[100, 100]])
    want = _batch(_detections())
    same = gc.compare_detections(want, want, sizes, 1e-4)
    assert same == {"unpaired_queries": 0, "pair_diff": 0.0, "score_diff": 0.0}

    # Two detections with (nearly) tied scores swap places: still every one paired.
    labels, boxes, scores = (a.copy() for a in _detections())
    scores[10] = scores[11] = (scores[10] + scores[11]) / 2
    tied = _batch((labels, boxes, scores))
    swapped = [a.copy() for a in tied]
    for a in swapped:
        a[0, [10, 11]] = a[0, [11, 10]]
    assert gc.compare_detections(swapped, tied, sizes, 1e-4)["unpaired_queries"] == 0

    # A small numeric difference is measured (boxes relative to the image size).
    noisy = [a.copy() for a in want]
    noisy[1][0, 5, 0] += 0.05
    assert gc.compare_detections(noisy, want, sizes, 1e-4)["unpaired_queries"] == 1
    found = gc.compare_detections(noisy, want, sizes, 1e-3)
    assert found["pair_diff"] == pytest.approx(5e-4, rel=1e-3)

    # Another anchor selected for one query: its detections (one box) stay unpaired; two are
    # two queries.
    first_boxes = np.unique(want[1][0], axis=0)[:2]
    for count in (1, 2):
        moved = [a.copy() for a in want]
        for box in first_boxes[:count]:
            moved[1][0][np.all(want[1][0] == box, axis=-1)] += 7.0
        found = gc.compare_detections(moved, want, sizes, 1e-4)
        assert found["unpaired_queries"] == count and found["pair_diff"] == 0.0


def test_parity_ignores_a_different_choice_at_the_top_k_cut_off(gc) -> None:
    sizes = np.array([[100, 100]])
    labels, boxes, scores = _detections()
    want = _batch((labels[:-1], boxes[:-1], scores[:-1]))
    # The last place goes to another detection with (nearly) the same score.
    got = [a.copy() for a in want]
    got[1][0, -1] = [1.0, 2.0, 3.0, 4.0]
    got[0][0, -1] = (got[0][0, -1] + 1) % 3
    assert gc.compare_detections(got, want, sizes, 1e-4)["unpaired_queries"] == 0


# -- the real thing, on the CPU --------------------------------------------------------------
@pytest.mark.slow  # seven short processes, two of them DDP ranks: about 5 minutes on 2 busy cores
def test_cpu_smoke_run_passes_or_skips_every_check(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPTS / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    table = done.stdout[done.stdout.index("check  ") :].splitlines()
    rows = {line.split()[0]: line.split()[1] for line in table[1:9]}
    assert rows == {
        "data": "PASS", "train_bf16": "PASS", "train_ddp": "PASS", "train_fp16": "PASS",
        "eval": "PASS", "predict": rows["predict"], "export_onnx": "PASS", "onnx_parity": "PASS",
    }  # fmt: skip
    assert rows["predict"] in ("PASS", "SKIP")
    (run,) = (tmp_path / "gpu_check").glob("20*")
    ranks = json.loads((run / "train_ddp" / "probe" / "rank1.json").read_text())
    assert ranks["world_size"] == 2 and ranks["timed_steps"] == 2
