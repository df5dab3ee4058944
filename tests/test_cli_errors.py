"""The entry points report a user's mistake in one line on stderr (exit code 2, no traceback): a
required value not given, a ConfigError of a task, a misspelt key or group option.
``HYDRA_FULL_ERROR=1`` shows the traceback instead.

The commands run as subprocesses, each in a folder of its own under pytest's temporary directory
(their run directories land there), all started at once: each one that imports torch takes a few
seconds."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from rtdetr_lit.config import ConfigError, check_required, validate_config
from tests.conftest import compose_config

CKPT_EXAMPLE = "ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt"
BACKEND_ERROR = "backend: 'tensorrt' is not one of ['torch', 'onnx']"

# name: (module, arguments, HYDRA_FULL_ERROR)
COMMANDS = {
    "eval": ("eval", [], False),
    "no_source": ("predict", ["ckpt_path=x.ckpt"], False),
    "custom": ("train", ["data=custom"], False),
    "max_epoch": ("train", ["trainer.max_epoch=3"], False),
    "r05": ("train", ["model=r05"], False),
    "backend": ("predict", ["ckpt_path=x.ckpt", "source=.", "backend=tensorrt"], False),
    "backend_full": ("predict", ["ckpt_path=x.ckpt", "source=.", "backend=tensorrt"], True),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Exit code and stderr of each command, all started at once (each in its own folder)."""
    procs = {}
    for name, (module, args, full_error) in COMMANDS.items():
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        if full_error:
            env["HYDRA_FULL_ERROR"] = "1"
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"rtdetr_lit.{module}", *args],
            cwd=tmp_path_factory.mktemp(name), env=env, text=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
    return {name: (proc.wait(timeout=300), proc.stderr.read()) for name, proc in procs.items()}


def test_missing_required_values_are_one_line_with_an_example(runs) -> None:
    assert runs["eval"] == (2, f"ckpt_path is required: python -m rtdetr_lit.eval {CKPT_EXAMPLE}\n")
    assert runs["no_source"] == (
        2,
        "source is required: python -m rtdetr_lit.predict ckpt_path=x.ckpt source=path/to/images\n",
    )
    # train keeps its defaults (no ckpt_path); data=custom needs where the data is.
    assert runs["custom"] == (
        2,
        "data.root is required: python -m rtdetr_lit.train data=custom "
        "data.root=/path/to/dataset\n",
    )


def test_misspelt_key_and_option_suggest_the_nearest(runs) -> None:
    assert runs["max_epoch"] == (
        2,
        "Could not override 'trainer.max_epoch': trainer has no key 'max_epoch', "
        "did you mean trainer.max_epochs?\n",
    )
    assert runs["r05"] == (
        2,
        "In 'train': Could not find 'model/r05', did you mean model=r50? "
        "Options in 'model': demo, r101, r18, r34, r50, r50m\n",
    )


def test_config_error_of_a_task_is_one_line_unless_hydra_full_error(runs) -> None:
    code, stderr = runs["backend"]
    assert code == 2 and "Traceback" not in stderr
    assert stderr.splitlines()[-1] == BACKEND_ERROR
    code, stderr = runs["backend_full"]
    assert code == 1 and "Traceback (most recent call last)" in stderr
    assert stderr.splitlines()[-1] == f"rtdetr_lit.config.ConfigError: {BACKEND_ERROR}"


def test_required_values_survive_composition() -> None:
    """A ``???`` merged onto a value keeps the value: the schemas and data/_default.yaml hold the
    markers, so every required value is still missing in the composed config."""
    for name, overrides, missing in (
        ("eval", [], "ckpt_path"),
        ("export", [], "ckpt_path"),
        ("predict", ["ckpt_path=x"], "source"),
        ("train", ["data=custom", "data.num_classes=3"], "data.root"),
    ):
        cfg = compose_config(name, overrides)
        parent, _, leaf = missing.rpartition(".")
        assert OmegaConf.is_missing(OmegaConf.select(cfg, parent) if parent else cfg, leaf)
        with pytest.raises(ConfigError, match=rf"^{missing} is required: python -m "):
            check_required(cfg)
    check_required(compose_config("train", []))  # train needs nothing


def test_unknown_target_parameter_suggests_the_nearest() -> None:
    cfg = OmegaConf.create(
        {"model": {"net": {"_target_": "torch.nn.Linear", "in_featurs": 3, "out_features": 2}}}
    )
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert str(info.value) == (
        "model.net: torch.nn.Linear has no parameter 'in_featurs' (did you mean "
        "model.net.in_features?); it accepts in_features, out_features, bias, device, dtype"
    )
