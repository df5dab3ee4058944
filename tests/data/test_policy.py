"""The data module owns the epoch-dependent policy (docs/rtdetrv2.md §9), and the epoch reaches the
workers."""

from __future__ import annotations

import cv2
import lightning as L
import pytest
import torch

from rtdetr_lit.data.dataset import EvalSampler, TrainSampler

from .conftest import make_datamodule

STOP = 2
# Only zoom-out among the strong ops, always on: a box covering the whole image shrinks while the
# strong pipeline runs and stays whole after the stop epoch. Multi-scale: 96 px batches until then.
POLICY = {
    "augment": {"photometric_p": 0.0, "zoom_out_p": 1.0, "iou_crop_p": 0.0, "hflip_p": 0.0,
                "stop_epoch": STOP},
    "multiscale": {"enabled": True, "sizes": [96], "stop_epoch": STOP},
}  # fmt: skip


@pytest.fixture
def whole_image_boxes(coco_writer, tmp_path):
    writer = coco_writer("train")
    for _ in range(8):
        writer.add_box(writer.add_image(64, 48), [0, 0, 64, 48])
    writer.write()
    return tmp_path


class _Recorder(L.LightningModule):
    """Records what each training batch looked like, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, int, float]] = []

    def training_step(self, batch, batch_idx):
        images, targets = batch
        # A zoom-out ratio just above 1 can leave one image's canvas as wide as the image (integer
        # canvas size), so look at the narrowest whole-image box of the batch, not the widest.
        narrowest = min(float(t["boxes"][:, 2].min()) for t in targets)
        self.seen.append((self.current_epoch, images.shape[-1], narrowest))
        return self.weight * images.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_policy_switches_at_the_stop_epoch_in_persistent_workers(whole_image_boxes) -> None:
    dm = make_datamodule(whole_image_boxes, num_workers=2, batch_size=4, **POLICY)
    module = _Recorder()
    trainer = L.Trainer(
        max_epochs=STOP + 2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    loader = trainer.train_dataloader
    assert loader.num_workers == 2 and loader.persistent_workers
    assert [s[0] for s in module.seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    for epoch, size, narrowest in module.seen:
        if epoch < STOP:
            assert size == 96 and narrowest < 1.0, (epoch, size, narrowest)
        else:
            assert size == 64 and narrowest == pytest.approx(1.0), (epoch, size, narrowest)


def test_workers_run_opencv_on_one_thread(whole_image_boxes) -> None:
    """A worker is one core: OpenCV's own thread pool would compete with the other workers."""
    assert cv2.getNumThreads() != 1  # the main process keeps OpenCV's default
    dm = make_datamodule(whole_image_boxes, num_workers=1, batch_size=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.collate_fn = lambda samples: cv2.getNumThreads()
    assert next(iter(loader)) == 1


def test_train_sampler_tags_indices_with_the_epoch_and_reshuffles() -> None:
    sampler = TrainSampler(range(10), seed=3)
    sampler.set_epoch(4)
    keys = list(sampler)
    assert {e for e, _ in keys} == {4} and sorted(i for _, i in keys) == list(range(10))
    sampler.set_epoch(5)
    assert [i for _, i in sampler] != [i for _, i in keys]
    again = TrainSampler(range(10), seed=3)
    again.set_epoch(4)
    assert list(again) == keys  # the same seed and epoch give the same order (resume, ranks)


def test_eval_sampler_covers_every_image_once_over_ranks() -> None:
    seen = []
    for rank in range(3):
        sampler = EvalSampler(range(10))
        sampler.num_replicas, sampler.rank = 3, rank
        assert len(sampler) == len(list(sampler))
        seen += list(sampler)
    assert sorted(seen) == list(range(10))
