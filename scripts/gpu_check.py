"""A prepared GPU check: train, evaluate, predict and export r18 on every GPU, one PASS/FAIL each.

    .venv/bin/python scripts/gpu_check.py [--out DIR] [--gpus N] [--checks a,b,...] [--cpu-smoke]

On a machine with 1-8 GPUs this runs each check as its own ``python -m rtdetr_lit.<command>
<overrides>`` process, as a user would (so Lightning launches the DDP ranks as it does for users),
with a time limit and its output in a log file. Meant to take under 10 minutes; not yet run on a
GPU (the project machines have none).

==============  ===============================================================================
``data``        the synthetic dataset (source pictures of 160-224 px, trained at 640x640)
``train_bf16``  r18, ``trainer=gpu`` (bf16-mixed), 50 steps: img/s and peak memory of the GPU
``train_ddp``   r18, ``trainer=ddp trainer.devices=<all>`` (bf16-mixed), 50 steps: img/s of all
                ranks together and peak memory per GPU
``train_fp16``  r18, ``trainer=gpu trainer.precision=16-mixed``, 20 steps
``eval``        ``rtdetr_lit.eval`` of train_bf16's ``last.ckpt`` on the GPU (val mAP, about 0
                after 50 steps: the check is that it runs)
``predict``     ``rtdetr_lit.predict device=cuda`` on the validation pictures
``export_onnx`` ``rtdetr_lit.export`` of the checkpoint
``onnx_parity`` ONNX Runtime's CUDAExecutionProvider against the PyTorch model on CUDA, same
                random input: detections paired within ``--parity-atol`` (TF32 off), one query
                may be selected differently (``compare_detections`` says why)
==============  ===============================================================================

Img/s and peak memory come from ``scripts/_gpu_probe.py``, a callback added to the training run
(each rank writes its own record; the warm-up steps are not timed). Peak memory is
``torch.cuda.max_memory_allocated`` per GPU. Everything goes below ``--out`` (default: the
temporary folder) in ``gpu_check/``: the dataset in ``data/`` (kept and reused by later runs) and
one folder per run, ``<date_time>/<check>/`` with the check's ``<check>.log`` and run directory.

Without CUDA every check is skipped, with the reason, and the exit code is 0. ``--cpu-smoke`` runs
the same pipeline on the CPU instead, small enough for a 2-core machine (about 5 minutes): the demo
model at 128x128, 3 steps (2 for the fp16 check, which runs in 32-true: fp16 autocast does not
exist on CPUs), ``trainer=ddp_sim`` (2 CPU processes) for the DDP check, ``device=cpu`` and ONNX
Runtime's CPUExecutionProvider. The exit code is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent

CHECKS = (
    "data",
    "train_bf16",
    "train_ddp",
    "train_fp16",
    "eval",
    "predict",
    "export_onnx",
    "onnx_parity",
)
TRAIN_CHECKS = ("train_bf16", "train_ddp", "train_fp16")
# Seconds each check may take before it is killed with all its processes: generous, they only stop
# a hang (all checks together should take under 10 minutes on a healthy GPU machine).
TIMEOUTS = {
    "data": 180,
    "train_bf16": 300,
    "train_ddp": 480,
    "train_fp16": 240,
    "eval": 240,
    "predict": 240,
    "export_onnx": 300,
    "onnx_parity": 240,
}
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


# -- what to run -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Sizes and settings of one run of the checks: the GPU check or the CPU smoke run."""

    smoke: bool
    gpus: int  # CUDA devices for train_ddp (0 in the smoke run, which uses ddp_sim's 2 processes)
    model: str
    image_size: int
    steps: int
    fp16_steps: int
    warmup: int  # steps left out of the img/s timing
    batch: int  # images per device and step
    num_val: int
    parity_atol: float
    cpus: int = 1
    num_workers: int | None = None  # DataLoader workers per process; None: see workers()

    @property
    def ranks(self) -> int:
        """Processes of the DDP check."""
        return 2 if self.smoke else self.gpus

    @property
    def num_train(self) -> int:
        # One epoch holds all steps of the largest global batch: max_steps ends the run, never
        # the end of the data, and every check reads the same (cached) dataset.
        return self.steps * self.batch * self.ranks

    def workers(self, ranks: int = 1) -> int:
        """DataLoader workers of each of ``ranks`` processes: ``--num-workers`` if given; none in
        the smoke run (2 cores, no spare); else the cores shared among the ranks, at most 8."""
        if self.num_workers is not None:
            return self.num_workers
        if self.smoke:
            return 0
        return max(1, min(8, self.cpus // ranks - 1))

    @property
    def trainer(self) -> str:
        return "cpu" if self.smoke else "gpu"

    @property
    def ddp_trainer(self) -> str:
        return "ddp_sim" if self.smoke else "ddp"

    @property
    def fp16_precision(self) -> str:
        # Lightning turns 16-mixed on a CPU into bf16-mixed: the smoke run checks 32-true instead.
        return "32-true" if self.smoke else "16-mixed"

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    @property
    def provider(self) -> str:
        return "CPUExecutionProvider" if self.smoke else "CUDAExecutionProvider"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="parent of gpu_check/ (default: the temp folder)"
    )
    parser.add_argument("--gpus", type=int, default=None, help="GPUs for train_ddp (default: all)")
    parser.add_argument(
        "--checks",
        default=",".join(CHECKS),
        help="comma-separated checks to run (default: all); the others are listed as SKIP",
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="run the pipeline small on the CPU instead"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (50; smoke: 3)")
    parser.add_argument(
        "--batch", type=int, default=None, help="images per GPU and step (8; smoke: 2)"
    )
    parser.add_argument(
        "--num-workers", type=int, default=None, help="DataLoader workers per process"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per check (default: per check)"
    )
    parser.add_argument(
        "--parity-atol", type=float, default=None, help="ONNX parity tolerance (1e-3; smoke 1e-4)"
    )
    # Internal: the ONNX parity check runs in a process of its own (its own time limit, and the
    # CUDA context it makes dies with it). gpu_check.py calls itself with these.
    internal = parser.add_argument_group("internal")
    internal.add_argument("--parity-onnx", type=Path, default=None, help=argparse.SUPPRESS)
    internal.add_argument("--parity-result", type=Path, default=None, help=argparse.SUPPRESS)
    internal.add_argument("--parity-provider", default=None, help=argparse.SUPPRESS)
    internal.add_argument("--parity-device", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.overrides and args.parity_onnx is None:
        parser.error(f"unrecognized arguments: {' '.join(args.overrides)}")
    unknown = sorted(set(selected_checks(args)) - set(CHECKS))
    if unknown:
        parser.error(f"--checks: unknown {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    return args


def selected_checks(args: argparse.Namespace) -> list[str]:
    return [c.strip() for c in args.checks.split(",") if c.strip()]


def make_plan(args: argparse.Namespace, cuda_devices: int, cpus: int | None = None) -> Plan:
    """The run's sizes: ``--cpu-smoke`` or the GPU check on ``cuda_devices`` GPUs."""
    cpus = cpus or os.cpu_count() or 1
    if args.cpu_smoke:
        return Plan(
            smoke=True,
            gpus=0,
            model="demo",
            image_size=128,
            steps=args.steps or 3,
            fp16_steps=min(args.steps or 2, 2),
            warmup=1,
            batch=args.batch or 2,
            num_val=4,
            parity_atol=args.parity_atol or 1e-4,
            cpus=cpus,
            num_workers=args.num_workers,
        )
    gpus = args.gpus or cuda_devices
    if cuda_devices and not 1 <= gpus <= cuda_devices:
        raise SystemExit(f"--gpus {gpus}: this machine has {cuda_devices} CUDA device(s)")
    steps = args.steps or 50
    return Plan(
        smoke=False,
        gpus=max(gpus, 1),
        model="r18",
        image_size=640,
        steps=steps,
        fp16_steps=min(steps, 20),
        warmup=min(10, max(steps // 5, 1)),
        batch=args.batch or 8,
        num_val=64,
        parity_atol=args.parity_atol or 1e-3,
        cpus=cpus,
        num_workers=args.num_workers,
    )


def skip_reasons(plan: Plan, *, cuda: bool, providers: Sequence[str]) -> dict[str, str]:
    """Checks that cannot run on this machine, known before anything runs, with the reason."""
    if not plan.smoke and not cuda:
        return dict.fromkeys(CHECKS, NO_CUDA)
    reasons = {}
    if plan.provider not in providers:
        hint = " (pip install onnxruntime-gpu)" if plan.provider.startswith("CUDA") else ""
        reasons["onnx_parity"] = f"onnxruntime has no {plan.provider}{hint}"
    return reasons


# -- the commands ----------------------------------------------------------------------------
def hydra_value(path: Path) -> str:
    """``path`` as a Hydra override value: quoted when it holds characters of the override
    grammar (spaces, commas, brackets, quotes, ...), which a temp folder rarely does."""
    text = str(path)
    if re.fullmatch(r"[\w./:+@~-]+", text):
        return text
    return "'" + text.replace("'", "\\'") + "'"  # in quotes only a quote needs its backslash


def data_overrides(plan: Plan, data_dir: Path, ranks: int = 1) -> list[str]:
    """The synthetic dataset at ``plan.image_size``, the same for every command (one cache), and
    the DataLoader workers of each of ``ranks`` processes."""
    size = plan.image_size
    return [
        "data=synthetic",
        f"paths.data_dir={hydra_value(data_dir)}",
        f"data.synthetic.num_train={plan.num_train}",
        f"data.synthetic.num_val={plan.num_val}",
        f"data.image_size=[{size},{size}]",
        f"data.num_workers={plan.workers(ranks)}",
        f"data.pin_memory={str(not plan.smoke).lower()}",
    ]


def train_command(plan: Plan, check: str, check_dir: Path, data_dir: Path) -> list[str]:
    """``python -m rtdetr_lit.train`` for one of :data:`TRAIN_CHECKS`, writing below ``check_dir``
    (run directory in ``logs/``, the probe's records in ``probe/``)."""
    steps = plan.fp16_steps if check == "train_fp16" else plan.steps
    ranks = plan.ranks if check == "train_ddp" else 1
    if check == "train_ddp":
        trainer = [f"trainer={plan.ddp_trainer}", f"trainer.devices={ranks}"]
        # ddp_sim all-reduces over gloo on CPU processes: keep its own 32-true there.
        trainer.append(f"trainer.precision={'32-true' if plan.smoke else 'bf16-mixed'}")
    elif check == "train_fp16":
        trainer = [f"trainer={plan.trainer}", f"trainer.precision={plan.fp16_precision}"]
    else:
        trainer = [f"trainer={plan.trainer}", "trainer.precision=bf16-mixed"]
    return [
        sys.executable,
        "-m",
        "rtdetr_lit.train",
        f"model={plan.model}",
        *trainer,
        *data_overrides(plan, data_dir, ranks),
        # data.batch_size is the global batch: `batch` images on every rank.
        f"data.batch_size={plan.batch * ranks}",
        f"data.val_batch_size={plan.batch * ranks}",
        f"paths.log_dir={hydra_value(check_dir / 'logs')}",
        # One epoch of exactly `steps` batches, then a short validation that writes last.ckpt.
        "trainer.max_epochs=1",
        f"++trainer.max_steps={steps}",
        f"++trainer.limit_train_batches={steps}",
        "++trainer.limit_val_batches=2",
        "++trainer.num_sanity_val_steps=0",
        "test=false",
        # last.ckpt is what the later checks read; no second copy as the "best" checkpoint (r18
        # with EMA and AdamW moments: about 0.3 GB a file, three training checks per run).
        "callbacks.model_checkpoint=null",
        "+callbacks.gpu_probe._target_=_gpu_probe.ThroughputProbe",
        f"+callbacks.gpu_probe.out_dir={hydra_value(check_dir / 'probe')}",
        f"+callbacks.gpu_probe.warmup_steps={min(plan.warmup, steps - 1)}",
    ]


def eval_command(plan: Plan, ckpt: Path, check_dir: Path, data_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rtdetr_lit.eval",
        f"ckpt_path={hydra_value(ckpt)}",
        f"model={plan.model}",
        f"trainer={plan.trainer}",
        *data_overrides(plan, data_dir),
        f"data.val_batch_size={plan.batch}",
        f"paths.log_dir={hydra_value(check_dir / 'logs')}",
    ]


def predict_command(plan: Plan, ckpt: Path, check_dir: Path, data_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rtdetr_lit.predict",
        f"ckpt_path={hydra_value(ckpt)}",
        f"source={hydra_value(data_dir / 'synthetic' / 'val')}",
        f"device={plan.device}",
        "threshold=0",  # every detection is written: the file cannot be empty by chance
        f"batch_size={plan.batch}",
        f"model={plan.model}",
        *data_overrides(plan, data_dir),
        f"paths.log_dir={hydra_value(check_dir / 'logs')}",
        f"output={hydra_value(check_dir / 'predictions')}",
    ]


def export_overrides(plan: Plan, ckpt: Path, data_dir: Path) -> list[str]:
    """Overrides of ``rtdetr_lit.export``'s config, also composed by the parity check."""
    return [
        f"ckpt_path={hydra_value(ckpt)}",
        f"model={plan.model}",
        *data_overrides(plan, data_dir),
    ]


def export_command(
    plan: Plan, ckpt: Path, onnx: Path, check_dir: Path, data_dir: Path
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rtdetr_lit.export",
        *export_overrides(plan, ckpt, data_dir),
        f"output={hydra_value(onnx)}",
        f"paths.log_dir={hydra_value(check_dir / 'logs')}",
    ]


def parity_command(plan: Plan, onnx: Path, result: Path, ckpt: Path, data_dir: Path) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        f"--parity-onnx={onnx}",
        f"--parity-result={result}",
        f"--parity-provider={plan.provider}",
        f"--parity-device={plan.device}",
        f"--parity-atol={plan.parity_atol}",
        "--",
        *export_overrides(plan, ckpt, data_dir),
    ]


# -- running and reporting -------------------------------------------------------------------
@dataclass
class Result:
    """One row of the summary."""

    name: str
    status: str  # PASS, FAIL or SKIP
    seconds: float = 0.0
    details: str = ""  # the key numbers, or why it was skipped or failed
    log: Path | None = None


def run_logged(
    cmd: Sequence[str], log: Path, timeout: float, cwd: Path, env: dict[str, str]
) -> tuple[int | None, float]:
    """Run ``cmd`` with stdout and stderr into ``log``; ``(exit code or None on timeout, s)``.

    The command gets a session of its own, so that on time-out the whole group is killed: the
    DDP ranks that Lightning started too, not only the first process.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n\n")
        out.flush()
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, time.perf_counter() - start


def last_error(log: Path, limit: int = 160) -> str:
    """The last line of ``log`` that looks like an error (else its last line), shortened."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    pattern = re.compile(r"(Error|Exception|error:|Traceback|Killed)")
    line = next((x for x in reversed(lines) if pattern.search(x)), lines[-1] if lines else "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def failure(name: str, code: int | None, seconds: float, log: Path, timeout: float) -> Result:
    why = f"timed out after {timeout:.0f} s" if code is None else f"exit code {code}"
    error = last_error(log)
    return Result(name, FAIL, seconds, f"{why}: {error}" if error else why, log)


def throughput_details(records: list[dict[str, Any]]) -> str:
    """img/s of all ranks together and the peak memory of each rank, from the probe records."""
    first = records[0]
    rates = [r["images_per_s"] for r in records]
    steps = first["timed_steps"]
    if any(v is None for v in rates):
        rate = "img/s not measured (no step after the warm-up)"
    else:
        ranks = f" ({len(records)} ranks)" if len(records) > 1 else ""
        rate = f"{sum(rates):.1f} img/s{ranks} over {steps} step{'s' * (steps != 1)}"
    memory = ", ".join(f"{r['peak_memory_gib']:.2f}" for r in records)
    if first["memory_kind"].startswith("cuda"):
        reserved = max(r["peak_reserved_gib"] for r in records)
        where = f"per GPU, allocated; reserved at most {reserved:.2f}"
    else:
        where = "per process, CPU peak RSS"
    return f"{first['precision']}: {rate}; peak memory {memory} GiB ({where})"


def summarize(results: Sequence[Result]) -> tuple[str, int]:
    """The summary table and the exit code: 1 if any check failed, else 0."""
    width = max([len(r.name) for r in results] + [5])
    lines = [f"{'check':<{width}}  result  seconds  details"]
    for r in results:
        seconds = f"{r.seconds:7.1f}" if r.status != SKIP else f"{'-':>7}"
        lines.append(f"{r.name:<{width}}  {r.status:<6}  {seconds}  {r.details}")
    for r in results:
        if r.status == FAIL and r.log is not None:
            lines.append(f"log of {r.name}: {r.log}")
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines), int(counts[FAIL] > 0)


class Runner:
    """Runs the checks in order, keeping what later checks need (checkpoint, ONNX file)."""

    def __init__(self, plan: Plan, root: Path, run_dir: Path, timeout: float | None) -> None:
        self.plan = plan
        self.data_dir = root / "data"
        self.run_dir = run_dir
        self.timeout = timeout
        self.env = dict(os.environ)
        # _gpu_probe must be importable by Hydra in every process, DDP ranks included.
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(SCRIPTS), os.environ.get("PYTHONPATH", "")) if p
        )
        self.ckpt: Path | None = None
        self.ckpt_from = ""  # the training check that wrote self.ckpt
        self.onnx: Path | None = None

    def _run(self, name: str, cmd: Sequence[str]) -> tuple[int | None, float, Path, float]:
        timeout = self.timeout or TIMEOUTS[name]
        log = self.run_dir / name / f"{name}.log"
        code, seconds = run_logged(cmd, log, timeout, self.run_dir, self.env)
        return code, seconds, log, timeout

    def data(self) -> Result:
        plan = self.plan
        cmd = [
            sys.executable,
            str(SCRIPTS / "make_synthetic.py"),
            f"--out={self.data_dir / 'synthetic'}",
            f"--num-train={plan.num_train}",
            f"--num-val={plan.num_val}",
        ]
        code, seconds, log, timeout = self._run("data", cmd)
        if code != 0:
            return failure("data", code, seconds, log, timeout)
        details = f"{plan.num_train} train / {plan.num_val} val pictures, trained at "
        return Result("data", PASS, seconds, details + f"{plan.image_size}x{plan.image_size}")

    def train(self, name: str) -> Result:
        from _gpu_probe import read_records

        check_dir = self.run_dir / name
        code, seconds, log, timeout = self._run(
            name, train_command(self.plan, name, check_dir, self.data_dir)
        )
        if code != 0:
            return failure(name, code, seconds, log, timeout)
        records = read_records(check_dir / "probe")
        ranks = self.plan.ranks if name == "train_ddp" else 1
        if len(records) != ranks or any(r["world_size"] != ranks for r in records):
            got = f"{len(records)} record(s)" if records else "no record"
            return Result(name, FAIL, seconds, f"probe: {got}, expected {ranks} rank(s)", log)
        ckpts = sorted((check_dir / "logs").glob("train/runs/*/checkpoints/last.ckpt"))
        if not ckpts:
            return Result(name, FAIL, seconds, "no checkpoints/last.ckpt written", log)
        if self.ckpt is None:  # the first training that passed feeds the later checks
            self.ckpt, self.ckpt_from = ckpts[-1], name
        return Result(name, PASS, seconds, throughput_details(records))

    def evaluate(self) -> Result:
        code, seconds, log, timeout = self._run(
            "eval", eval_command(self.plan, self.ckpt, self.run_dir / "eval", self.data_dir)
        )
        if code != 0:
            return failure("eval", code, seconds, log, timeout)
        found = re.findall(r"val/mAP\s+(-?[0-9.]+)\s*$", log.read_text(), re.MULTILINE)
        if not found:
            return Result("eval", FAIL, seconds, "no val/mAP in the log", log)
        details = f"val/mAP {float(found[-1]):.4f} ({self.ckpt.name} of {self.ckpt_from})"
        return Result("eval", PASS, seconds, details)

    def predict(self) -> Result:
        check_dir = self.run_dir / "predict"
        code, seconds, log, timeout = self._run(
            "predict", predict_command(self.plan, self.ckpt, check_dir, self.data_dir)
        )
        if code != 0:
            return failure("predict", code, seconds, log, timeout)
        results = check_dir / "predictions" / "predictions.json"
        if not results.is_file():
            return Result("predict", FAIL, seconds, f"{results} not written", log)
        detections = json.loads(results.read_text())
        images = len({d.get("file_name") for d in detections})
        details = f"device={self.plan.device}: {len(detections)} detections in {images} pictures"
        return Result("predict", PASS, seconds, details)

    def export(self) -> Result:
        check_dir = self.run_dir / "export_onnx"
        onnx = check_dir / f"{self.plan.model}.onnx"
        code, seconds, log, timeout = self._run(
            "export_onnx", export_command(self.plan, self.ckpt, onnx, check_dir, self.data_dir)
        )
        if code != 0:
            return failure("export_onnx", code, seconds, log, timeout)
        if not onnx.is_file():
            return Result("export_onnx", FAIL, seconds, f"{onnx} not written", log)
        self.onnx = onnx
        return Result("export_onnx", PASS, seconds, f"{onnx.stat().st_size / 2**20:.1f} MiB")

    def parity(self) -> Result:
        result = self.run_dir / "onnx_parity" / "parity.json"
        cmd = parity_command(self.plan, self.onnx, result, self.ckpt, self.data_dir)
        code, seconds, log, timeout = self._run("onnx_parity", cmd)
        if code != 0 or not result.is_file():
            return failure("onnx_parity", code, seconds, log, timeout)
        found = json.loads(result.read_text())
        details = (
            f"{found['provider']} vs torch on {found['device']}: detections paired within "
            f"{found['pair_diff']:.1e} (atol {found['atol']:.0e}), "
            f"{found['unpaired_queries']} query selected differently (at most 1), "
            f"sorted scores within {found['score_diff']:.1e}"
        )
        return Result("onnx_parity", PASS if found["ok"] else FAIL, seconds, details, log)

    def run(self, name: str) -> Result:
        if name == "data":
            return self.data()
        if name in TRAIN_CHECKS:
            return self.train(name)
        if self.ckpt is None:
            return Result(name, SKIP, details="no checkpoint: no training check passed")
        if name == "eval":
            return self.evaluate()
        if name == "predict":
            return self.predict()
        if name == "export_onnx":
            return self.export()
        if self.onnx is None:
            return Result(name, SKIP, details="no ONNX file: export_onnx did not pass")
        return self.parity()


# -- ONNX parity (in its own process) --------------------------------------------------------
def bottleneck_pairing(cost: Any) -> float:
    """The smallest ``t`` such that every row of ``cost`` (rows <= columns) pairs with a column of
    its own at a cost of at most ``t``: the worst pair of the best one-to-one pairing."""
    import numpy as np
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    values = np.unique(cost)
    lo, hi = 0, len(values) - 1
    while lo < hi:  # binary search over the candidate thresholds
        mid = (lo + hi) // 2
        allowed = csr_matrix(cost <= values[mid])
        if (maximum_bipartite_matching(allowed, perm_type="column") >= 0).all():
            hi = mid
        else:
            lo = mid + 1
    return float(values[lo])


def compare_detections(
    got: Sequence[Any], want: Sequence[Any], sizes: Any, atol: float
) -> dict[str, float]:
    """``(labels, boxes, scores)`` of ONNX Runtime against PyTorch (numpy arrays, batch first).

    Detections are paired one to one, per image and in both directions: same label, box (relative
    to the image size) and score within ``atol``. Near-tied scores may swap places between
    runtimes, hence a pairing rather than a comparison by position (as in the tests). Two kinds of
    ties change which detections there are, not their values, and are allowed:

    * the last places: only detections ``2 * atol`` above the lowest score of both lists are
      paired (into the whole other list), since the top-k cut-off may keep either of two tied ones;
    * one query per image: the decoder's queries are the top-k anchors by encoder score, and a
      briefly trained model has many near-tied anchors, so one runtime may select an anchor where
      the other selects its neighbour. That query's detections (all with one box) stay unpaired.

    Returns ``unpaired_queries`` (the most of any image), ``pair_diff`` (the worst pair of the
    best pairing of the others) and ``score_diff`` (sorted scores position by position).
    """
    import numpy as np
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    (lg, bg, sg), (lw, bw, sw) = got, want
    scale = np.tile(sizes, (1, 2))[:, None, :].astype(np.float64)
    bg, bw = bg / scale, bw / scale
    worst, unpaired = 0.0, 0
    for i in range(lg.shape[0]):
        cut = max(sg[i].min(), sw[i].min()) + 2 * atol
        for (la, ba, sa), (lb, bb, sb) in (
            ((lg[i], bg[i], sg[i]), (lw[i], bw[i], sw[i])),
            ((lw[i], bw[i], sw[i]), (lg[i], bg[i], sg[i])),
        ):
            keep = sa > cut
            cost = np.maximum(
                np.abs(ba[keep, None] - bb[None]).max(-1), np.abs(sa[keep, None] - sb[None])
            ).astype(np.float64)
            cost[la[keep, None] != lb[None]] = np.inf
            if not keep.any():
                continue
            paired = maximum_bipartite_matching(csr_matrix(cost <= atol), perm_type="column") >= 0
            # Detections of one query share its box: count the distinct boxes left unpaired.
            lost = np.unique(np.round(ba[keep][~paired] / max(atol, 1e-12)), axis=0)
            unpaired = max(unpaired, len(lost))
            if paired.any():
                worst = max(worst, bottleneck_pairing(cost[paired]))
    return {
        "unpaired_queries": unpaired,
        "pair_diff": worst,
        "score_diff": float(np.abs(sg - sw).max()),
    }


def onnx_parity(
    onnx: Path, overrides: Sequence[str], provider: str, device: str, atol: float
) -> dict[str, Any]:
    """Run the exported graph with ONNX Runtime on ``provider`` and the same checkpoint in PyTorch
    on ``device`` (float32, TF32 off on both sides) on one random batch; compare the detections."""
    import onnxruntime as ort
    import torch
    from hydra import compose, initialize_config_dir

    from rtdetr_lit.config import CONFIG_DIR, register_schemas
    from rtdetr_lit.inference import (
        INPUT_NAMES,
        build_inference_model,
        image_size_of,
        read_checkpoint,
    )

    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("export", overrides=list(overrides))
    # TF32 matmuls keep 10 mantissa bits: a parity check compares float32 with float32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = build_inference_model(cfg, read_checkpoint(cfg.ckpt_path)).to(device)
    height, width = image_size_of(cfg)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, height, width, generator=g)
    sizes = torch.tensor([[width, height], [1280, 720]], dtype=torch.int64)
    with torch.no_grad():
        want = [t.cpu().numpy() for t in model(images.to(device), sizes.to(device))]

    providers: list[Any] = [provider]
    if provider == "CUDAExecutionProvider":
        providers = [(provider, {"use_tf32": "0"}), "CPUExecutionProvider"]
    session = ort.InferenceSession(str(onnx), providers=providers)
    used = session.get_providers()[0]
    got = session.run(None, dict(zip(INPUT_NAMES, (images.numpy(), sizes.numpy()), strict=True)))
    found = compare_detections(got, want, sizes.numpy(), atol)
    # ORT falls back to the CPU quietly when the CUDA libraries do not load: that is no pass.
    ok = used == provider and found["unpaired_queries"] <= 1 and found["pair_diff"] <= atol
    return {
        "provider": used,
        "requested": provider,
        "device": device,
        "atol": atol,
        "ok": ok,
    } | found


# -- main ------------------------------------------------------------------------------------
def _environment() -> tuple[bool, int, list[str], list[str]]:
    """CUDA available, device count, GPU descriptions, ONNX Runtime providers."""
    import torch

    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    gpus = []
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        gpus.append(
            f"cuda:{i} {props.name}, {props.total_memory / 1024**3:.1f} GiB, "
            f"compute capability {props.major}.{props.minor}"
        )
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except ImportError:
        providers = []
    return cuda, count, gpus, providers


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.parity_onnx is not None:  # the internal parity process
        found = onnx_parity(
            args.parity_onnx,
            args.overrides,
            args.parity_provider,
            args.parity_device,
            args.parity_atol,
        )
        print(json.dumps(found, indent=1))
        args.parity_result.write_text(json.dumps(found))
        return 0

    start = time.perf_counter()
    import torch

    cuda, count, gpus, providers = _environment()
    plan = make_plan(args, count)
    root = (args.out or Path(tempfile.gettempdir())).resolve() / "gpu_check"
    run_dir = root / time.strftime("%Y-%m-%d_%H-%M-%S")
    if plan.smoke:
        mode = "CPU smoke run (--cpu-smoke)"
    else:
        mode = f"on {plan.gpus} GPU(s)" if cuda else "no CUDA device, every check is skipped"
    print(f"# rtdetr_lit GPU check: {mode}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {cuda}")
    for line in gpus:
        print(f"  {line}")
    print(f"onnxruntime providers: {', '.join(providers) or 'none (not installed)'}")
    print(
        f"model={plan.model} at {plan.image_size}x{plan.image_size}, {plan.batch} images per "
        f"device, {plan.steps} steps ({plan.fp16_steps} for train_fp16), warm-up {plan.warmup}"
    )
    if plan.smoke or cuda:
        print(f"output: {run_dir}")
    else:
        print("--cpu-smoke runs the same pipeline small on the CPU")
    print()

    reasons = skip_reasons(plan, cuda=cuda, providers=providers)
    chosen = selected_checks(args)
    runner = Runner(plan, root, run_dir, args.timeout)
    results = []
    for name in CHECKS:
        if name in reasons:
            result = Result(name, SKIP, details=reasons[name])
        elif name not in chosen:
            result = Result(name, SKIP, details="not selected (--checks)")
        else:
            print(f"{name} ...", end=" ", flush=True)
            result = runner.run(name)
            print(f"{result.status} ({result.seconds:.1f} s)", flush=True)
        results.append(result)

    table, code = summarize(results)
    print(f"\n{table}\ntotal {time.perf_counter() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
