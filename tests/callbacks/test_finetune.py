"""Discrete fine-tuning (docs/rtdetrv2.md §0.5, §9), sampling layouts through Hydra, the discrete
experiments.

The staged runs use the demo model at 128x128 on the tiny in-memory dataset of test_module.py:
two optimizer steps of one image per epoch, no validation.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from rtdetr_lit.callbacks import EMA, DiscreteFinetune
from rtdetr_lit.config import CONFIG_DIR, ConfigError, check_finetune_start
from rtdetr_lit.optim import restart_warmup, warmup_schedule
from rtdetr_lit.run import prepare_run
from tests.conftest import compose_config
from tests.test_module import _collate, _DataModule, _module, _Squares, _trainer

OFFSETS = ".cross_attn.sampling_offsets."
WEIGHTS = ".cross_attn.attention_weights."
HEAD_LR, BACKBONE_LR = 2e-4, 1e-4  # what test_module._module configures
SCHEDULER_WARMUP = 2  # test_module._module's warmup_schedule
FINETUNE_WARMUP = 4


class _Probe(L.Callback):
    """Per training step: the stage the model is in before it, which parameters reach the
    optimizer with a gradient, and which of the offsets and attention weights the step changed."""

    def __init__(self, ema: EMA) -> None:
        self.ema = ema
        self.steps: list[dict] = []

    def _watched(self, pl_module) -> dict[str, torch.Tensor]:
        return {
            n: p.detach().clone()
            for n, p in pl_module.net.named_parameters()
            if OFFSETS in n or WEIGHTS in n
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        net = pl_module.net
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "method": net.sampling_method,
                "offsets_trainable": [
                    p.requires_grad for n, p in net.named_parameters() if OFFSETS in n
                ],
                "lr": {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups},
                "ema_updates": self.ema.num_updates,
                "watched": self._watched(pl_module),
            }
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps[-1]["with_grad"] = {
            n for n, p in pl_module.net.named_parameters() if p.grad is not None
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        before = self.steps[-1]["watched"]
        self.steps[-1]["changed"] = {
            n for n, p in self._watched(pl_module).items() if not torch.equal(p, before[n])
        }


class _Data(_DataModule):
    def train_dataloader(self):
        return DataLoader(_Squares(2), batch_size=1, collate_fn=_collate)

    def val_dataloader(self):
        return DataLoader(_Squares(2), batch_size=2, collate_fn=_collate)


def _fit(
    root: Path,
    finetune: DiscreteFinetune,
    max_epochs: int,
    ckpt_path: Path | None = None,
    save: bool = False,
) -> tuple[L.Trainer, _Probe, L.LightningModule]:
    module = _module()
    ema = EMA(warmup_steps=2)
    probe = _Probe(ema)
    callbacks = [finetune, ema, probe]
    if save:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=root / "ckpt", save_top_k=0, save_last=True, save_on_train_epoch_end=True
            )
        )
    trainer = _trainer(
        root, max_epochs=max_epochs, limit_val_batches=0, num_sanity_val_steps=0,
        enable_checkpointing=save, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, datamodule=_Data(), ckpt_path=ckpt_path)
    return trainer, probe, module


def _offsets(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if OFFSETS in k}


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """Two epochs with grid_sample in epoch 0 and the switch at epoch 1; last.ckpt kept."""
    root = tmp_path_factory.mktemp("staged")
    finetune = DiscreteFinetune(switch_epoch=1, warmup_steps=FINETUNE_WARMUP)
    trainer, probe, _ = _fit(root, finetune, max_epochs=2, save=True)
    return root, finetune, trainer, probe


def test_switches_at_the_configured_epoch_and_not_before(staged) -> None:
    _, finetune, _, probe = staged
    assert [s["epoch"] for s in probe.steps] == [0, 0, 1, 1]
    assert [s["method"] for s in probe.steps] == ["grid_sample"] * 2 + ["discrete"] * 2
    for step, frozen in zip(probe.steps, [False, False, True, True], strict=True):
        assert len(step["offsets_trainable"]) == 6  # weight and bias of 3 decoder layers
        assert all(t is not frozen for t in step["offsets_trainable"])
    assert finetune.switched


def test_offsets_get_no_update_after_the_switch_while_the_rest_trains(staged) -> None:
    _, _, trainer, probe = staged
    module = trainer.lightning_module
    names = [n for n, p in module.net.named_parameters() if p.requires_grad or OFFSETS in n]
    offsets = {n for n in names if OFFSETS in n}
    weights = {n for n in names if WEIGHTS in n}
    assert len(offsets) == len(weights) == 6  # weight and bias of 3 decoder layers
    for step in probe.steps[:2]:  # grid_sample: the offsets train like everything else
        assert step["with_grad"] == set(names)
        assert step["changed"] == offsets | weights
    for step in probe.steps[2:]:  # discrete: everything but the offsets
        assert step["with_grad"] == set(names) - offsets
        assert step["changed"] == weights
    # The offsets stay in an optimizer group with weight decay: only their missing gradient keeps
    # AdamW from moving them (a decay step alone would have changed them).
    ids = {id(p) for n, p in module.net.named_parameters() if n in offsets}
    decayed = [g for g in trainer.optimizers[0].param_groups if g["weight_decay"] > 0]
    assert ids <= {id(p) for g in decayed for p in g["params"]}


def test_ema_and_warmup_restart_at_the_switch(staged) -> None:
    _, _, trainer, probe = staged
    expected_factors = [1 / SCHEDULER_WARMUP, 1.0, 1 / FINETUNE_WARMUP, 2 / FINETUNE_WARMUP]
    for step, factor in zip(probe.steps, expected_factors, strict=True):
        assert step["lr"]["head"] == pytest.approx(HEAD_LR * factor)
        assert step["lr"]["backbone"] == pytest.approx(BACKBONE_LR * factor)
    assert [s["ema_updates"] for s in probe.steps] == [0, 1, 0, 1]
    ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
    assert ema.num_updates == 2


def test_resume_inside_the_discrete_stage_stays_discrete(staged, tmp_path: Path) -> None:
    root, _, _, _ = staged
    last = root / "ckpt" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["callbacks"]["DiscreteFinetune"] == {"switched": True}

    finetune = DiscreteFinetune(switch_epoch=1, warmup_steps=FINETUNE_WARMUP)
    _, probe, module = _fit(tmp_path, finetune, max_epochs=3, ckpt_path=last)
    assert [s["epoch"] for s in probe.steps] == [2, 2]
    assert all(s["method"] == "discrete" for s in probe.steps)
    assert not any(t for s in probe.steps for t in s["offsets_trainable"])
    # The offsets start from the raw weights of the checkpoint and do not move.
    raw = _offsets(saved["current_model_state"], prefix="net.")
    first = _offsets(probe.steps[0]["watched"])
    assert first.keys() == raw.keys()
    for name, value in raw.items():
        torch.testing.assert_close(first[name], value, rtol=0, atol=0)
    assert not any(
        name in s["changed"] or name in s["with_grad"] for s in probe.steps for name in raw
    )
    # No second restart of EMA or warmup: the warmup begun at step 2 goes on (step 4: factor
    # 3/4) and the average keeps counting.
    assert [s["lr"]["head"] for s in probe.steps] == pytest.approx(
        [HEAD_LR * 3 / FINETUNE_WARMUP, HEAD_LR * 4 / FINETUNE_WARMUP]
    )
    assert [s["ema_updates"] for s in probe.steps] == [2, 3]
    assert module.net.sampling_method == "discrete"


def test_finetune_from_the_start_keeps_offsets_out_and_resumes(tmp_path: Path) -> None:
    """switch_epoch=0, the paper's flow: the offsets never train, are not even in the optimizer,
    and a resumed run rebuilds the same optimizer and goes on with the same warmup."""
    first = DiscreteFinetune(switch_epoch=0, warmup_steps=FINETUNE_WARMUP)
    trainer, probe, _ = _fit(tmp_path / "a", first, max_epochs=1, save=True)
    resumed = DiscreteFinetune(switch_epoch=0, warmup_steps=FINETUNE_WARMUP)
    last = tmp_path / "a" / "ckpt" / "last.ckpt"
    trainer_b, probe_b, _ = _fit(tmp_path / "b", resumed, max_epochs=2, ckpt_path=last)

    steps = probe.steps + probe_b.steps
    assert [s["epoch"] for s in steps] == [0, 0, 1, 1]
    assert all(s["method"] == "discrete" and not any(s["offsets_trainable"]) for s in steps)
    initial = _offsets(steps[0]["watched"])
    assert len(initial) == 6
    for step in steps:
        assert not initial.keys() & (step["changed"] | step["with_grad"])
        for name, value in _offsets(step["watched"]).items():
            torch.testing.assert_close(value, initial[name], rtol=0, atol=0)
    for t in (trainer, trainer_b):
        held = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
        offsets = [p for n, p in t.lightning_module.net.named_parameters() if OFFSETS in n]
        assert not held & {id(p) for p in offsets}
    # The fine-tuning warmup (4 steps) replaces the scheduler's own (2) from the first step.
    factors = [k / FINETUNE_WARMUP for k in (1, 2, 3, 4)]
    assert [s["lr"]["head"] for s in steps] == pytest.approx([HEAD_LR * f for f in factors])
    assert [s["ema_updates"] for s in steps] == [0, 1, 2, 3]


def test_evaluation_under_the_callback_uses_discrete_sampling(tmp_path: Path) -> None:
    module = _module()
    trainer = _trainer(tmp_path, callbacks=[DiscreteFinetune(switch_epoch=0)])
    trainer.validate(module, datamodule=_Data(), verbose=False)
    assert module.net.sampling_method == "discrete"
    # With a later switch the model is evaluated as configured.
    module = _module()
    DiscreteFinetune(switch_epoch=3).setup(trainer, module, "validate")
    assert module.net.sampling_method == "grid_sample"


def test_a_later_switch_under_ddp_needs_the_unused_parameter_search() -> None:
    module = _module()

    def ddp(strategy: str) -> L.Trainer:
        return L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False)

    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        DiscreteFinetune(switch_epoch=2).setup(ddp("ddp"), module, "fit")
    DiscreteFinetune(switch_epoch=2).setup(ddp("ddp_find_unused_parameters_true"), module, "fit")
    assert module.net.sampling_method == "grid_sample"  # switched later, in training
    DiscreteFinetune(switch_epoch=0).setup(ddp("ddp"), module, "fit")  # before DDP wraps it
    assert module.net.sampling_method == "discrete"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="switch_epoch=-1"):
        DiscreteFinetune(switch_epoch=-1)
    with pytest.raises(ValueError, match="warmup_steps=-5"):
        DiscreteFinetune(warmup_steps=-5)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(TypeError, match="warmup_schedule, got StepLR"):
        restart_warmup(torch.optim.lr_scheduler.StepLR(opt, 1), 10)


def test_restarted_warmup_keeps_the_decay_policy_and_survives_a_reload() -> None:
    def cosine(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * step / 10))

    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=0.1)
    sched = warmup_schedule(opt, warmup_steps=2, policy="cosine", total_steps=10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * cosine(5))
    restart_warmup(sched, 4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * cosine(5) / 4)
    assert sched.get_last_lr() == pytest.approx([0.1 * cosine(5) / 4])
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * cosine(6) * 2 / 4)
    # A fresh scheduler loading the state continues the restarted warmup.
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched2 = warmup_schedule(opt2, warmup_steps=2, policy="cosine", total_steps=10)
    sched2.load_state_dict(sched.state_dict())
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * cosine(7) * 3 / 4)


# -- sampling layouts through Hydra ----------------------------------------------------------
LAYOUTS = sorted(p.stem for p in (CONFIG_DIR / "sampling").glob("*.yaml"))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("sampling.num_points=[4,0,4]", "sampling.num_points"),
        ("sampling.num_points=[4,4]", "sampling.num_points"),
        ("sampling.num_points=[4,4,4,4]", "sampling.num_points"),
        ("model.net.num_points=[2,2]", "model.net.num_points"),
    ],
)
def test_an_invalid_layout_is_rejected_naming_the_key(
    override: str, key: str, tmp_path: Path
) -> None:
    cfg = compose_config("train", [override, f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"^{key}: num_points needs one positive count per "):
        prepare_run(cfg)


def test_the_sampling_sweep_builds_one_model_per_layout() -> None:
    """`-m sampling=uniform1,...` : Hydra's parser expands the sweep into one job per layout,
    each composing into a model with that layout in every decoder cross-attention."""
    assert {"uniform1", "uniform2", "uniform3", "uniform4", "levels363", "levels421"} <= set(
        LAYOUTS
    )
    (sweep,) = OverridesParser.create().parse_overrides([f"sampling={','.join(LAYOUTS)}"])
    assert sweep.is_sweep_override()
    jobs = [f"sampling={value}" for value in sweep.sweep_string_iterator()]
    assert len(jobs) == len(LAYOUTS)
    for job in jobs:
        cfg = compose_config("train", [job, "data.image_size=[128,128]"])
        points = list(cfg.sampling.num_points)
        net = instantiate(cfg.model.net).eval()
        for layer in net.decoder.decoder.layers:
            assert layer.cross_attn.num_points_list == points
            assert layer.cross_attn.sampling_offsets.out_features == 8 * sum(points) * 2
        if job == "sampling=levels363":  # a layout with distinct counts per level runs
            with torch.no_grad():
                assert net(torch.rand(1, 3, 128, 128))["pred_boxes"].shape == (1, 100, 4)


@pytest.mark.parametrize("size", ["r18", "r34", "r50m", "r50", "r101", "demo"])
def test_every_size_takes_any_layout(size: str) -> None:
    cfg = compose_config("train", [f"model={size}", "sampling.num_points=[5,1,2]"])
    assert OmegaConf.to_container(cfg.model.net, resolve=True)["num_points"] == [5, 1, 2]


def _quiet(tmp_path: Path) -> list[str]:
    return [f"paths.output_dir={tmp_path}", "extras.print_config=false"]


# -- the two-stage experiments ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "epochs", "stop"),
    [("r18", 36, 33), ("r34", 12, 10), ("r50m", 36, 33), ("r50", 12, 10)],
)
def test_discrete_experiment_fine_tunes_a_grid_checkpoint(
    size: str, epochs: int, stop: int, tmp_path: Path
) -> None:
    name = f"experiment=rtdetrv2_{size}_coco_discrete"
    # Fine-tuning needs the stage-1 weights: forgetting them is an error, not a random start.
    with pytest.raises(ConfigError, match=r"^model\.init_from: finetune=discrete"):
        prepare_run(compose_config("train", [name, *_quiet(tmp_path)]))
    cfg = compose_config("train", [name, "model.init_from=stage1.ckpt"])
    assert cfg.model.init_from == "stage1.ckpt"
    assert cfg.model.net.name == size and cfg.model.net.sampling_method == "grid_sample"
    assert cfg.data._target_ == "rtdetr_lit.data.CocoDataModule"
    assert cfg.trainer.max_epochs == epochs
    assert cfg.data.augment.stop_epoch == cfg.data.multiscale.stop_epoch == stop
    assert "ema" in cfg.callbacks
    callback = instantiate(cfg.callbacks.discrete_finetune)
    assert isinstance(callback, DiscreteFinetune)
    assert (callback.switch_epoch, callback.warmup_steps) == (0, 2000)


@pytest.mark.parametrize(
    "start",
    [["model.init_from=w.pth"], ["ckpt_path=last"], ["callbacks.discrete_finetune.switch_epoch=1"]],
)
def test_discrete_stage_starts_from_weights_a_resume_or_a_later_switch(
    start: list[str], tmp_path: Path
) -> None:
    """Each way to give the discrete stage trained weights passes the run's set-up: the weights
    (init_from), a resume (ckpt_path) or grid_sample epochs first (switch_epoch > 0). Without any
    of them the same config is refused."""
    with pytest.raises(ConfigError, match=r"^model\.init_from: finetune=discrete"):
        prepare_run(compose_config("train", ["finetune=discrete", *_quiet(tmp_path)]))
    cfg = compose_config("train", ["finetune=discrete", *start, *_quiet(tmp_path)])
    assert check_finetune_start(cfg) is None
    prepare_run(cfg)  # the other checks, extras and seeding pass too
    assert torch.initial_seed() == cfg.seed


def test_init_from_is_a_plain_model_key(tmp_path: Path) -> None:
    """Any run (not only the discrete stage) starts from given weights with model.init_from=."""
    cfg = compose_config("train", [])
    assert cfg.model.init_from is None
    torch.manual_seed(1)
    weights = instantiate(cfg.model).net.state_dict()
    torch.save(weights, tmp_path / "w.pth")
    torch.manual_seed(2)
    cfg = compose_config("train", [f"model.init_from={tmp_path / 'w.pth'}"])
    loaded = instantiate(cfg.model).net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
