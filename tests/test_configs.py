"""The Hydra config tree: every option composes, sizes carry SPEC's numbers, mistakes are errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError

from rtdetr_lit.config import CONFIG_DIR, ConfigError, validate_config
from rtdetr_lit.models.zoo import MODEL_SIZES
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[1]

# Options that need values a user must give (paths of their own dataset).
_REQUIRED = {
    ("data", "custom"): ["data.root=/datasets/mine", "data.num_classes=3"],
    ("data", "yolo"): ["data.root=/datasets/mine", "data.names=[a,b]", "data.num_classes=2"],
    # Discrete fine-tuning starts from a stage-1 (grid_sample) checkpoint.
    ("finetune", "discrete"): ["model.init_from=stage1.ckpt"],
    **{
        ("experiment", f"rtdetrv2_{size}_coco_discrete"): ["model.init_from=stage1.ckpt"]
        for size in ("r18", "r34", "r50m", "r50")
    },
}


def _options() -> list[tuple[str, str]]:
    pairs = []
    for group_dir in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        for option in sorted(group_dir.glob("*.yaml")):
            if not option.stem.startswith("_"):
                pairs.append((group_dir.name, option.stem))
    return pairs


def test_every_group_has_its_options() -> None:
    options = set(_options())
    for size in ("r18", "r34", "r50m", "r50", "r101"):
        assert ("model", size) in options
    for trainer in ("default", "cpu", "gpu", "ddp", "ddp_sim"):
        assert ("trainer", trainer) in options
    for logger in ("csv", "tensorboard", "wandb"):
        assert ("logger", logger) in options
    for layout in ("uniform1", "uniform2", "uniform3", "uniform4", "levels421"):
        assert ("sampling", layout) in options
    assert {("finetune", "none"), ("finetune", "discrete")} <= options
    assert {("data", "coco"), ("data", "synthetic"), ("data", "custom")} <= options
    for group in ("callbacks", "experiment", "hparams_search", "paths", "extras", "debug"):
        assert any(g == group for g, _ in options), group
    assert (CONFIG_DIR / "hydra" / "default.yaml").is_file()


@pytest.mark.parametrize(("group", "option"), _options(), ids=lambda v: str(v))
def test_every_option_composes_and_resolves(group: str, option: str, tmp_path: Path) -> None:
    # Outside a real run Hydra has no output directory: give one.
    overrides = [f"{group}={option}", f"paths.output_dir={tmp_path}"]
    overrides += _REQUIRED.get((group, option), [])
    cfg = compose_config("train", overrides)
    assert cfg.hydra.runtime.choices[group] == option
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    resolved = OmegaConf.to_container(body, resolve=True, throw_on_missing=True)
    assert resolved["model"]["net"]["num_classes"] == resolved["data"]["num_classes"]
    assert resolved["model"]["net"]["num_points"] == resolved["sampling"]["num_points"]


def test_eval_config_composes() -> None:
    cfg = compose_config("eval", ["ckpt_path=some.ckpt", "model=r50", "data=coco"])
    assert cfg.task_name == "eval"
    assert cfg.model.net.name == "r50"


# docs/rtdetrv2.md §1 and §9, one row per size: backbone depth, encoder hidden/FFN/expansion,
# decoder layers, eval_idx, freeze_at, freeze_norm, backbone lr, epochs, aug stop epoch,
# multi-scale, discrete fine-tuning epochs and stop epoch.
SPEC_SIZES = {
    "r18": (18, 256, 1024, 0.5, 3, -1, -1, False, 1e-4, 120, 117, False, 36, 33),
    "r34": (34, 256, 1024, 0.5, 4, -1, -1, False, 5e-5, 120, 117, True, 12, 10),
    "r50m": (50, 256, 1024, 0.5, 6, 2, 0, True, 1e-5, 84, 81, True, 36, 33),
    "r50": (50, 256, 1024, 1.0, 6, -1, 0, True, 1e-5, 72, 71, True, 12, 10),
    "r101": (101, 384, 2048, 1.0, 6, -1, 0, True, 1e-6, 72, 71, True, None, None),
}


@pytest.mark.parametrize("size", sorted(SPEC_SIZES))
def test_model_sizes_carry_spec_hyper_parameters(size: str) -> None:
    cfg = compose_config("train", [f"model={size}", "data=coco"])
    net, recipe = cfg.model.net, cfg.recipe
    got = (
        net.backbone_depth, net.encoder_hidden_dim, net.encoder_ffn_dim, net.expansion,
        net.num_decoder_layers, net.eval_idx, net.freeze_at, net.freeze_norm,
        cfg.model.backbone_lr, recipe.epochs, recipe.aug_stop_epoch, recipe.multiscale,
        recipe.discrete_epochs, recipe.discrete_aug_stop_epoch,
    )  # fmt: skip
    assert got == SPEC_SIZES[size]
    assert net.name == size
    # Shared by every size (docs/rtdetrv2.md §1, §9).
    assert (net.num_queries, net.num_denoising) == (300, 100)
    assert (net.label_noise_ratio, net.box_noise_scale) == (0.5, 1.0)
    assert list(net.num_points) == [4, 4, 4]
    assert cfg.model.optimizer.lr == 1e-4 and cfg.model.optimizer.weight_decay == 1e-4
    assert cfg.model.scheduler.warmup_steps == 2000
    assert cfg.model.no_weight_decay_on_bias == (size == "r34")
    assert cfg.data.batch_size == 16 and list(cfg.data.image_size) == [640, 640]
    assert cfg.trainer.max_epochs == recipe.epochs
    assert cfg.trainer.gradient_clip_val == 0.1
    assert cfg.data.augment.stop_epoch == recipe.aug_stop_epoch


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_model_configs_and_the_zoo_table_cannot_drift(size: str) -> None:
    """``model=<size>`` builds through ``create_model`` with every value written out: each must
    be the zoo table's, so that the Python factory and the Hydra config build the same model."""
    cfg = compose_config("train", [f"model={size}", "data.image_size=[640,640]"])
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    assert net["name"] == size
    spec = dataclasses.asdict(MODEL_SIZES[size])
    written = {k: v for k, v in net.items() if k in spec}
    # Not size settings: the data config's input size, and a local file the user may give.
    for key in ("eval_spatial_size", "backbone_weights"):
        written.pop(key)
    normalised = {k: tuple(v) if isinstance(v, list) else v for k, v in written.items()}
    assert normalised == {k: spec[k] for k in written}
    # Every field of the table that tells the sizes apart is written in the config.
    varying = {f for f in spec if len({getattr(s, f) for s in MODEL_SIZES.values()}) > 1} - {
        "eval_spatial_size"
    }
    assert varying <= set(written), sorted(varying - set(written))


def test_experiment_recipes_select_their_size() -> None:
    for size in SPEC_SIZES:
        cfg = compose_config("train", [f"experiment=rtdetrv2_{size}_coco"])
        assert cfg.model.net.name == size
        assert cfg.data._target_ == "rtdetr_lit.data.CocoDataModule"


def test_sampling_layout_reaches_the_model() -> None:
    cfg = compose_config("train", ["sampling=levels421"])
    assert list(OmegaConf.to_container(cfg.model.net, resolve=True)["num_points"]) == [4, 2, 1]


def test_mistyped_override_is_an_error() -> None:
    with pytest.raises(ConfigCompositionException, match="max_epoch"):
        compose_config("train", ["trainer.max_epoch=3"])
    with pytest.raises(ConfigCompositionException):
        compose_config("train", ["model=r99"])


def test_mistyped_key_in_a_config_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo_recipe.yaml").write_text(
        "# @package _global_\nrecipe:\n  aug_stop_epochs: 3\n"
    )
    (tmp_path / "experiment" / "typo_top.yaml").write_text("# @package _global_\nseeed: 3\n")
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nrecipe:\n  epochs: 3\n"
    )
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    # A user's own config folder is found through hydra.searchpath ...
    assert compose_config("train", [searchpath, "experiment=mine"]).recipe.epochs == 3
    # ... and a misspelt key in it fails at composition, naming the key.
    for name, key in (("typo_recipe", "aug_stop_epochs"), ("typo_top", "seeed")):
        with pytest.raises((ConfigCompositionException, ConfigKeyError), match=key):
            compose_config("train", [searchpath, f"experiment={name}"])


def test_validate_config_names_the_bad_key() -> None:
    cfg = OmegaConf.create(
        {"model": {"net": {"_target_": "torch.nn.Linear", "in_featurs": 3, "out_features": 2}}}
    )
    with pytest.raises(
        ConfigError, match=r"model\.net: torch\.nn\.Linear has no parameter 'in_featurs'"
    ):
        validate_config(cfg)
    with open_dict(cfg):
        cfg.model.net = {"_target_": "torch.nn.NoSuchLayer"}
    with pytest.raises(ConfigError, match=r"model\.net\._target_: cannot import"):
        validate_config(cfg)
    cfg.model.net = {"_target_": "torch.nn.Linear", "in_features": 3, "out_features": 2}
    validate_config(cfg)


def _run_cli(
    args: list[str], cwd: Path, pythonpath: str | None = None, stderr: bool = False
) -> str:
    """Stdout of ``python -m rtdetr_lit.train ARGS`` (then stderr, with ``stderr=True``)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run(
        [sys.executable, "-m", "rtdetr_lit.train", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + (proc.stderr if stderr else "")


def test_cli_prints_composed_config_from_any_directory(tmp_path: Path) -> None:
    out = _run_cli(["--cfg", "job", "model=r50", "data=coco"], cwd=tmp_path)
    cfg = OmegaConf.create(out)
    assert cfg.model.net.name == "r50" and cfg.model.net.backbone_depth == 50
    assert cfg.model.net.expansion == 1.0 and cfg.model.backbone_lr == 1e-5
    assert "Configuration groups" in _run_cli(["--help"], cwd=tmp_path)


def test_cli_prints_each_lightning_message_once(tmp_path: Path) -> None:
    """Lightning's own console handler is dropped under Hydra's logging, so its messages appear
    once (Hydra's format) and reach the run's log file."""
    args = ["train=false", "test=false", "extras.print_config=false"]
    out = _run_cli(args, tmp_path, stderr=True)
    assert out.count("Seed set to 42") == 1 and out.count("GPU available:") == 1
    (log_file,) = (tmp_path / "logs" / "train" / "runs").glob("*/train.log")
    assert "GPU available:" in log_file.read_text()


def test_multirun_folder_resolves_before_any_job(tmp_path: Path, monkeypatch) -> None:
    """`-m` resolves hydra.sweep.dir in the launching process, before a job's runtime exists."""
    cfg = compose_config("train", ["task_name=sweep"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    assert Path(cfg.hydra.sweep.dir).parent == tmp_path / "logs" / "sweep" / "multiruns"


def test_wheel_ships_the_configs(tmp_path: Path) -> None:
    """A non-editable install finds conf/ inside the package, from any directory."""
    pytest.importorskip("hatchling")
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = dist.glob("rtdetr_lit-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    expected = {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml")}
    assert {f"rtdetr_lit/conf/{e}" for e in expected} <= names
    out = _run_cli(["--cfg", "job", "model=r50", "data=coco"], cwd=tmp_path,
                   pythonpath=str(tmp_path / "site"))  # fmt: skip
    assert OmegaConf.create(out).model.net.name == "r50"
    probe = subprocess.run(
        [sys.executable, "-c", "import rtdetr_lit.config as c; print(c.CONFIG_DIR)"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(probe.stdout.strip()) == tmp_path / "site" / "rtdetr_lit" / "conf"
