"""No file a user loads runs code: every loading path refuses a malicious pickle with the
package's own message naming the file, a resumed checkpoint cannot make the test step load a file
of its choosing, and weights holding NaN/inf are refused before anything is loaded."""

from __future__ import annotations

import logging
import pathlib
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import open_dict
from PIL import Image

from rtdetr_lit.checkpoints import UnsafeCheckpointError, load_checkpoint_file
from rtdetr_lit.eval import evaluate
from rtdetr_lit.export import export
from rtdetr_lit.inference import load_checkpoint_weights, read_checkpoint
from rtdetr_lit.plugins import SafeCheckpointIO, ensure_safe_checkpoint_io
from rtdetr_lit.predict import predict
from rtdetr_lit.train import train
from tests.conftest import QUIET_CPU_RUN, SMALL_SYNTHETIC, _cpu_sized, compose_config
from tests.test_export import entry_config

# The package's refusal, never torch's (which suggests weights_only=False).
REFUSAL = r"refused to load it\. The file holds Python objects other than tensors"


class _Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _malicious(path: Path, marker: Path, content: dict | None = None) -> Path:
    """A checkpoint that would create ``marker`` when unpickled unsafely."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(content or {"state_dict": {"w": torch.ones(1)}}), "x": _Payload(marker)}, path)
    return path


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    return _malicious(tmp_path / "shared" / "evil.pth", marker), marker


def _refused(err: BaseException, path: Path) -> None:
    text = str(err)
    assert str(path) in text
    assert "weights_only=False" not in text
    assert err.__cause__ is None and err.__suppress_context__  # torch's advice is not shown


def test_loader_refuses_with_its_own_message(evil) -> None:
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match=REFUSAL) as info:
        load_checkpoint_file(path)
    _refused(info.value, path)
    assert not marker.exists()


@pytest.mark.parametrize("source", ["reference", "hf"])
def test_convert_refuses(evil, tmp_path: Path, source: str) -> None:
    from rtdetr_lit.convert import main

    path, marker = evil
    with pytest.raises(SystemExit, match=REFUSAL) as info:
        main(["--from", source, "--model", "r18", str(path), str(tmp_path / "out.pth")])
    assert str(path) in str(info.value)
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_export_refuses(evil, tmp_path: Path) -> None:
    path, marker = evil
    cfg = entry_config("export", tmp_path, [f"ckpt_path={path}"])
    with pytest.raises(UnsafeCheckpointError, match=REFUSAL) as info:
        export(cfg)
    _refused(info.value, path)
    assert not marker.exists()


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_predict_refuses(evil, tmp_path: Path, backend: str) -> None:
    path, marker = evil
    picture = tmp_path / "image.png"
    Image.new("RGB", (64, 48)).save(picture)
    cfg = entry_config(
        "predict", tmp_path, [f"ckpt_path={path}", f"source={picture}", f"backend={backend}"]
    )
    with pytest.raises(UnsafeCheckpointError, match=REFUSAL) as info:
        predict(cfg)
    _refused(info.value, path)
    assert not marker.exists()


def test_eval_refuses(evil, tmp_path: Path) -> None:
    path, marker = evil
    cfg = _cpu_sized(compose_config("eval", [f"ckpt_path={path}"]), tmp_path)
    GlobalHydra.instance().clear()
    with pytest.raises(UnsafeCheckpointError, match=REFUSAL) as info:
        evaluate(cfg)
    _refused(info.value, path)
    assert not marker.exists()


@pytest.mark.parametrize("key", ["model.init_from", "model.net.backbone_weights"])
def test_model_weights_refuse(evil, key: str) -> None:
    path, marker = evil
    cfg = compose_config("train", [f"{key}={path}"])
    GlobalHydra.instance().clear()
    with pytest.raises(Exception, match=REFUSAL) as info:
        instantiate(cfg.model)
    # Hydra wraps errors raised while instantiating: ours must be in the chain, naming the file.
    err: BaseException | None = info.value
    while err is not None and not isinstance(err, UnsafeCheckpointError):
        err = err.__cause__
    assert err is not None, info.value
    _refused(err, path)
    assert not marker.exists()


# -- resume ------------------------------------------------------------------------------------


def _run(root: Path, out: str, *extra: str) -> list[str]:
    """A one-epoch demo run on 4 synthetic 128 px images (2 steps), outputs in ``root/out``."""
    return [
        f"paths.data_dir={root / 'data'}",
        f"paths.log_dir={root / 'logs'}",
        f"paths.output_dir={root / out}",
        "data.synthetic.num_train=4",
        "data.synthetic.num_val=2",
        *SMALL_SYNTHETIC,
        "data.num_workers=0",
        "recipe.epochs=1",
        "model.init_from=null",
        *QUIET_CPU_RUN,
        *extra,
    ]


def _train(overrides: list[str]) -> dict:
    cfg = compose_config("train", overrides)
    try:
        return train(cfg)
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished one-epoch run that also tested its own best checkpoint."""
    root = tmp_path_factory.mktemp("trained")
    _train(_run(root, "first", "test=true"))
    return root


def test_resume_refuses_a_malicious_ckpt_path(trained: Path, tmp_path: Path, evil) -> None:
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match=REFUSAL) as info:
        _train(_run(trained, "resumed", f"ckpt_path={path}"))
    _refused(info.value, path)
    assert not marker.exists()


def test_a_resumed_checkpoint_cannot_choose_the_file_the_test_step_loads(
    trained: Path, tmp_path: Path, caplog
) -> None:
    """The issue's attack: a checkpoint that loads safely names a malicious file as the best
    one. The resumed run (nothing left to train) must not load it, and tests its own weights."""
    first = trained / "first" / "checkpoints"
    (own_best,) = first.glob("epoch_*.ckpt")
    marker = tmp_path / "code_ran"
    foreign = _malicious(tmp_path / "elsewhere" / "best.ckpt", marker)
    shared = torch.load(first / "last.ckpt", map_location="cpu", weights_only=True)
    planted = 0
    for state in shared["callbacks"].values():
        if "best_model_path" in state:
            state["best_model_path"] = str(foreign)
            planted += 1
    assert planted == 3  # the best-mAP, last and step checkpoint callbacks
    torch.save(shared, tmp_path / "shared.ckpt")

    with caplog.at_level(logging.INFO):
        metrics = _train(
            _run(trained, "resumed", f"ckpt_path={tmp_path / 'shared.ckpt'}", "test=true")
        )
    assert not marker.exists()
    assert str(foreign) not in "".join(
        r.getMessage() for r in caplog.records if "Restoring states" in r.getMessage()
    )
    assert any("not from this run" in r.getMessage() for r in caplog.records)
    assert "test/mAP" in metrics
    # the same run without the planted path tests its own best checkpoint
    assert own_best.is_file()


def test_the_test_step_loads_its_best_checkpoint_safely(trained: Path, tmp_path: Path) -> None:
    """Even a path in this run's own checkpoint folder goes through the safe reader."""
    cfg = compose_config("train", _run(trained, "again"))
    GlobalHydra.instance().clear()
    trainer = instantiate(cfg.trainer)
    ensure_safe_checkpoint_io(trainer)
    marker = tmp_path / "code_ran"
    path = _malicious(tmp_path / "best.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match=REFUSAL):
        trainer.strategy.load_checkpoint(path, weights_only=False)
    assert not marker.exists()


def test_every_trainer_reads_checkpoints_safely(tmp_path: Path) -> None:
    overrides = [f"paths.output_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.plugins=null"]
    cfg = compose_config("train", overrides)
    GlobalHydra.instance().clear()
    trainer = instantiate(cfg.trainer)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    ensure_safe_checkpoint_io(trainer)
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)

    class Other(TorchCheckpointIO):
        pass

    with open_dict(cfg):
        cfg.trainer.plugins = None
    trainer = instantiate(cfg.trainer, plugins=[Other()])
    with pytest.raises(ValueError, match=r"trainer\.plugins: .*Other"):
        ensure_safe_checkpoint_io(trainer)


# -- NaN / inf weights ---------------------------------------------------------------------------


def test_nan_weights_are_refused_naming_the_tensors(trained: Path, tmp_path: Path) -> None:
    (best,) = (trained / "first" / "checkpoints").glob("epoch_*.ckpt")
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    names = [k for k, v in state.items() if k.startswith("net.") and v.is_floating_point()][:2]
    # a best-so-far metric is -inf until the first validation: a checkpoint like that is fine
    assert "val_map_best.max_value" in state
    state["val_map_best.max_value"] = torch.tensor(float("-inf"))
    torch.save(checkpoint, tmp_path / "early.ckpt")
    assert SafeCheckpointIO().load_checkpoint(tmp_path / "early.ckpt")["state_dict"].keys() == (
        state.keys()
    )
    for name, value in zip(names, ("nan", "inf"), strict=True):
        state[name] = state[name].clone().contiguous()
        state[name].view(-1)[0] = float(value)
    broken = tmp_path / "broken.ckpt"
    torch.save(checkpoint, broken)
    message = rf"{broken}: NaN or inf values in 2 of its tensors: {names[0]}, {names[1]}"

    # resume (Lightning's restore) and the test step
    with pytest.raises(ValueError, match=message):
        SafeCheckpointIO().load_checkpoint(broken)
    # eval, export and predict read the same file into the detector; nothing is loaded
    cfg = _cpu_sized(compose_config("eval", [f"ckpt_path={broken}"]), tmp_path)
    GlobalHydra.instance().clear()
    module = instantiate(cfg.model, init_from=None)
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    net_names = [n.removeprefix("net.") for n in names]
    with pytest.raises(ValueError, match=rf"NaN or inf values in 2 of its tensors: {net_names[0]}"):
        load_checkpoint_weights(module.net, read_checkpoint(broken), cfg)
    after = module.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # init_from (Hydra wraps the error)
    with pytest.raises(Exception, match="NaN or inf values in 2 of its tensors"):
        instantiate(cfg.model, init_from=str(broken))


def test_nan_backbone_weights_are_refused(tmp_path: Path) -> None:
    from rtdetr_lit.models.backbone import PResNet

    backbone = PResNet(depth=18)
    state = backbone.state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone().fill_(float("nan"))
    torch.save(state, tmp_path / "backbone.pth")
    with pytest.raises(
        ValueError, match=rf"backbone\.pth: NaN or inf values in 1 of its tensors: {key}"
    ):
        backbone.load_weights(tmp_path / "backbone.pth")
