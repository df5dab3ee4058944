"""LightningDataModules for COCO-format, synthetic, YOLO-format and Pascal VOC datasets.

The data module owns the epoch-dependent augmentation policy (docs/rtdetrv2.md §9): the training
sampler tags every sample with its epoch, the dataset picks the pipeline from it and the collate
function the multi-scale size. ``batch_size`` is global: each of the ``world_size`` processes loads
``batch_size / world_size`` images per step.
"""

from __future__ import annotations

import logging
import os
import signal
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from rtdetr_lit.config import ConfigError
from rtdetr_lit.data.annotations import DetectionAnnotations, load_coco, load_yolo
from rtdetr_lit.data.dataset import DetectionDataset, EvalSampler, MultiScaleCollate, TrainSampler
from rtdetr_lit.data.decode import ImageProbe, probe_image
from rtdetr_lit.data.synthetic import SyntheticConfig, ensure_synthetic_dataset
from rtdetr_lit.data.transforms import AugmentConfig
from rtdetr_lit.data.voc import VOC_CLASSES, collect_voc_names, load_voc
from rtdetr_lit.data.yolo_yaml import UltralyticsDataset, load_data_yaml_split, read_data_yaml
from rtdetr_lit.sizes import check_sizes

__all__ = ["CocoDataModule", "SyntheticDataModule", "VocDataModule", "YoloDataModule"]

log = logging.getLogger(__name__)

_SPLITS = ("train", "val", "test")
# The per-split path arguments of CocoDataModule.
_PATH_KEYS = tuple(f"{split}_{kind}" for split in _SPLITS for kind in ("images", "annotations"))


def probe_images(paths: Sequence[str], workers: int = 8) -> list[ImageProbe]:
    """Read the header (and tail) of every image, a few threads at a time."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(probe_image, paths, chunksize=64))


class CocoDataModule(L.LightningDataModule):
    """A COCO-format detection dataset: an image folder and an ``instances`` JSON per split.

    Args:
        root: the dataset folder (used by the config to derive the other paths).
        train_images, train_annotations, val_images, val_annotations: folders and JSON files.
        test_images, test_annotations: the test split; ``None`` tests on the validation split.
        num_classes: the number of categories the model is built for; checked against the data.
        batch_size: global training batch (all devices); ``val_batch_size`` likewise.
        num_workers: DataLoader worker processes per device (persistent).
        pin_memory: page-locked host memory for faster GPU copies.
        image_size: network input (height, width).
        skip_bad_images: leave out (and count) images that are missing, unreadable or of another
            size than the annotations say, instead of stopping at set-up.
        skip_bad_annotations: leave out (and count) broken annotations, boxes with a non-finite
            or non-numeric coordinate (YOLO: label lines that are not a class and 4 finite
            numbers), instead of stopping at set-up.
        augment: ``AugmentConfig`` fields (docs/rtdetrv2.md §9 training augmentation and its stop
        epoch). multiscale: ``enabled``, ``sizes`` and ``stop_epoch`` of the per-batch random
        resize.
    """

    def __init__(
        self,
        root: str | None = None,
        train_images: str | None = None,
        train_annotations: str | None = None,
        val_images: str | None = None,
        val_annotations: str | None = None,
        test_images: str | None = None,
        test_annotations: str | None = None,
        num_classes: int | None = None,
        batch_size: int = 16,
        val_batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool = True,
        image_size: Sequence[int] = (640, 640),
        skip_bad_images: bool = False,
        skip_bad_annotations: bool = False,
        augment: Mapping[str, Any] | None = None,
        multiscale: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.root = root
        self.paths = {
            "train": (train_images, train_annotations),
            "val": (val_images, val_annotations),
            "test": (test_images, test_annotations),
        }
        self._num_classes = num_classes
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.image_size = check_sizes(image_size, "data.image_size", 2)
        self.skip_bad_images = skip_bad_images
        self.skip_bad_annotations = skip_bad_annotations
        self.augment = AugmentConfig(**(augment or {}))
        ms = dict(multiscale or {})
        self.collate_train = MultiScaleCollate(
            ms.get("sizes", ()) if ms.get("enabled", False) else (), ms.get("stop_epoch", 0)
        )
        self.collate_eval = MultiScaleCollate()
        self.annotations: dict[str, DetectionAnnotations] = {}
        self.datasets: dict[str, DetectionDataset] = {}
        # (epoch, samples of it trained on, all ranks) from a checkpoint, for the next train loader.
        self._resume_at: tuple[int, int] = (0, 0)

    # -- what the model needs to know ---------------------------------------------------------
    def _first_loaded(self) -> DetectionAnnotations | None:
        return next(iter(self.annotations.values()), None)

    @property
    def num_classes(self) -> int | None:
        ann = self._first_loaded()
        return ann.num_classes if ann is not None else self._num_classes

    @property
    def category_ids(self) -> list[int] | None:
        ann = self._first_loaded()
        return list(ann.category_ids) if ann is not None else None

    @property
    def class_names(self) -> list[str] | None:
        ann = self._first_loaded()
        return list(ann.class_names) if ann is not None else None

    def count_classes(self) -> int:
        """The dataset's number of classes, from its validation (else training) annotations; no
        image is read."""
        for split in ("val", "train"):
            images, annotations = self.paths[split]
            if annotations is not None and os.path.exists(annotations):
                return self.read_annotations(images, annotations).num_classes
        raise FileNotFoundError(
            "data.num_classes: not given, and no annotations to count the classes in "
            f"(data.val_annotations: {self.paths['val'][1]}, data.train_annotations: "
            f"{self.paths['train'][1]})"
        )

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for split in wanted.get(stage or "", _SPLITS):
            if split in self.datasets:
                continue
            # Without a test split of its own, test on the validation split (read as such).
            source = "val" if split == "test" and self.paths["test"][1] is None else split
            images, annotations = self.paths[source]
            if annotations is None or images is None:
                if stage is None or (stage, split) == ("fit", "val"):
                    continue  # training without validation is allowed
                raise ValueError(f"data.{split}_images / data.{split}_annotations are not set")
            ann = self._load_split(source, images, annotations)
            self.annotations[split] = ann
            augment = self.augment if split == "train" else None
            self.datasets[split] = DetectionDataset(ann, images, self.image_size, augment)

    def read_annotations(self, images: str, annotations: str) -> DetectionAnnotations:
        """Read one split's annotation source (a COCO JSON here)."""
        return load_coco(annotations, skip_bad_annotations=self.skip_bad_annotations)

    def _read_split(self, split: str, images: str, annotations: str) -> DetectionAnnotations:
        """Check that ``split``'s image folder and annotation source exist, and read them."""
        if not os.path.isdir(images):
            raise FileNotFoundError(f"data.{split}_images: no such folder {images}")
        if not os.path.exists(annotations):
            raise FileNotFoundError(f"data.{split}_annotations: no such file {annotations}")
        return self.read_annotations(images, annotations)

    def _load_split(self, split: str, images: str, annotations: str) -> DetectionAnnotations:
        ann = self._read_split(split, images, annotations)
        if self._num_classes is not None and ann.num_classes != self._num_classes:
            raise ValueError(
                f"{annotations} has {ann.num_classes} categories but data.num_classes is "
                f"{self._num_classes}: set data.num_classes={ann.num_classes}"
            )
        for other_split, other in self.annotations.items():
            if other.category_ids != ann.category_ids:
                raise ValueError(
                    f"{annotations}: its categories {list(ann.category_ids)} differ from the "
                    f"{other_split} split's {list(other.category_ids)}"
                )
        ann = self._check_images(split, images, ann)
        log.info(
            "%s: %d images (%d without objects), %d boxes, %d classes",
            split,
            len(ann),
            int((np.diff(ann.box_offsets) == 0).sum()),
            len(ann.boxes),
            ann.num_classes,
        )
        return ann.sanitized(f"{annotations}")

    def _check_images(self, split: str, images: str, ann: DetectionAnnotations):
        """Probe every image: readable, and of the size the annotations were made on.

        An image whose stored size matches the annotations but whose EXIF orientation would
        rotate it is decoded without the rotation (the annotator saw it unrotated).
        """
        paths = [os.path.join(images, ann.file_name(i)) for i in range(len(ann))]
        probes = probe_images(paths)
        errors: list[str] = []
        apply_exif = np.ones(len(ann), bool)
        widths, heights = ann.widths.copy(), ann.heights.copy()
        for i, (path, probe) in enumerate(zip(paths, probes, strict=True)):
            if probe.error is not None:
                errors.append(f"{path}: {probe.error}")
                continue
            declared = (int(ann.widths[i]), int(ann.heights[i]))
            if declared == (0, 0):  # size not given: trust the file (as displayed)
                widths[i], heights[i] = probe.width, probe.height
            elif declared == (probe.raw_width, probe.raw_height) != (probe.width, probe.height):
                apply_exif[i] = False
            elif declared != (probe.width, probe.height):
                errors.append(
                    f"{path}: the image is {probe.width}x{probe.height} but the annotations say "
                    f"{declared[0]}x{declared[1]}"
                )
        ann = ann.with_image_sizes(widths, heights, apply_exif)
        if not errors:
            return ann
        shown = "\n  ".join(errors[:10]) + ("\n  ..." if len(errors) > 10 else "")
        if not self.skip_bad_images:
            raise ValueError(
                f"{split}: {len(errors)} of {len(ann)} images cannot be used (set "
                f"data.skip_bad_images=true to leave them out):\n  {shown}"
            )
        log.warning("%s: skipping %d bad images:\n  %s", split, len(errors), shown)
        bad = {e.split(": ", 1)[0] for e in errors}
        return ann.select_images(np.array([p not in bad for p in paths]))

    # -- loaders -----------------------------------------------------------------------------
    def _world_size(self) -> int:
        trainer = self.trainer
        return trainer.world_size if trainer is not None else 1

    def _per_device(self, batch_size: int, key: str) -> int:
        world = self._world_size()
        if batch_size % world:
            raise ValueError(
                f"data.{key}={batch_size} is the global batch and must be divisible by the "
                f"number of processes ({world})"
            )
        return batch_size // world

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        dataset = self.datasets[split]
        workers = self.num_workers
        if train:
            epoch, done = self._resume_at
            self._resume_at = (0, 0)
            start = done // self._world_size()
            sampler = TrainSampler(dataset, seed=_sampler_seed(), epoch=epoch, start=start)
        else:
            sampler = EvalSampler(dataset)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collate_train if train else self.collate_eval,
            num_workers=workers,
            worker_init_fn=_init_worker,
            # Worker seeds from a generator of the loader's own: starting an epoch or a
            # validation leaves the global one, restored on resume, untouched.
            generator=torch.Generator().manual_seed(_sampler_seed()),
            persistent_workers=workers > 0,
            pin_memory=self.pin_memory,
            drop_last=train,
        )

    def train_dataloader(self) -> DataLoader:
        per_device = self._per_device(self.batch_size, "batch_size")
        log.info(
            "batch size %d = %d per device x %d devices",
            self.batch_size,
            per_device,
            self._world_size(),
        )
        return self._loader("train", per_device, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.paths["val"][1] is None:
            return []  # no validation split: Lightning skips validation
        return self._loader("val", self._per_device(self.val_batch_size, "val_batch_size"), False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self._per_device(self.val_batch_size, "val_batch_size"), False)

    # -- resuming mid-epoch ------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Where training stands, saved in checkpoints: the epoch to continue and how many of its
        samples (all ranks together) were trained on.

        Lightning restores the loop counters from a checkpoint written mid-epoch but restarts a
        plain DataLoader at the beginning; with this state the resumed run's sampler continues at
        the next batch of the same shuffled epoch instead.
        """
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epoch = trainer.current_epoch
        if done >= trainer.num_training_batches:  # the epoch is over: the next one starts afresh
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "samples_done": done * self.batch_size}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not state_dict:
            return
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["samples_done"]))
        # The sampler resumes the epoch, which Lightning cannot see: its warning does not apply.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended")


def _init_worker(worker_id: int) -> None:
    """One core per worker; job-control signals left to the main process; seeds as Lightning's.

    PyTorch runs a worker's torch ops on one thread; OpenCV (decode, resize, colour) gets one too,
    or every worker would start a thread per core and compete with the others and the training
    process. SLURM signals every process of a job step: a requeue handler inherited from the main
    process (submitit's on SIGUSR2, Lightning's on SIGUSR1) would end a worker early, and the
    main process would fail on the lost worker instead of requeueing the job.
    """
    cv2.setNumThreads(1)
    for name in ("SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):  # what Lightning adds without a worker_init_fn
        pl_worker_init_function(worker_id)


def _sampler_seed() -> int:
    """The shuffling seed: the global torch seed, equal on every rank after ``seed_everything``."""
    return int(torch.initial_seed() % 2**31)


class SyntheticDataModule(CocoDataModule):
    """The embedded shapes dataset (``data=synthetic``), generated under ``root`` on first use.

    Args:
        root: where the dataset is generated (``train/``, ``val/``, ``annotations/``).
        synthetic: ``SyntheticConfig`` fields; changing any of them regenerates the dataset.
        **kwargs: as ``CocoDataModule``.
    """

    def __init__(
        self, root: str, synthetic: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        # The generator's layout, unless the caller says otherwise.
        for split in ("train", "val"):
            kwargs.setdefault(f"{split}_images", os.path.join(root, split))
            kwargs.setdefault(
                f"{split}_annotations", os.path.join(root, "annotations", f"instances_{split}.json")
            )
        super().__init__(root=root, **kwargs)
        self.synthetic = SyntheticConfig(**(synthetic or {}))

    def prepare_data(self) -> None:
        ensure_synthetic_dataset(self.root, self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        # A no-op after prepare_data; generates when used outside a Trainer (scripts, notebooks).
        ensure_synthetic_dataset(self.root, self.synthetic)
        super().setup(stage)


def _given(values: Mapping[str, Any]) -> list[str]:
    """The ``data.<key>`` names of the values that are set (not None)."""
    return [f"data.{key}" for key, value in values.items() if value is not None]


def _refuse_unused(values: Mapping[str, Any], why: str) -> None:
    """Refuse settings that would be ignored: ``why`` says what takes their place."""
    given = _given(values)
    if given:
        them = "it" if len(given) == 1 else "them"
        raise ConfigError(f"{', '.join(given)}: {why}; leave {them} unset")


class YoloDataModule(CocoDataModule):
    """A YOLO-format dataset, given by an Ultralytics ``data.yaml`` or by its folders and names.

    Args:
        data_yaml: an Ultralytics dataset file (:mod:`rtdetr_lit.data.yolo_yaml`): the dataset
            root, each split's images (their labels in ``labels/`` beside ``images/``) and the
            class names all come from it, and ``root``, ``names`` and the per-split paths stay
            unset.
        names: otherwise, the class names in label-index order ...
        root: ... and the dataset folder: the ``*_images`` folders default to
            ``root/images/{train,val}`` and the ``*_annotations`` label folders to
            ``root/labels/{train,val}`` (no test split unless given).
        **kwargs: as ``CocoDataModule``.

    Each image ``name.ext`` has ``name.txt`` in its label folder with one ``class cx cy w h`` line
    (normalised) per object; a missing label file means no objects. Evaluated with COCO mAP like
    any other dataset.
    """

    def __init__(
        self,
        names: Sequence[str] | None = None,
        data_yaml: str | None = None,
        root: str | None = None,
        **kwargs: Any,
    ) -> None:
        dataset = None
        if data_yaml is not None:
            _refuse_unused(
                {"root": root, "names": names, **{k: kwargs.get(k) for k in _PATH_KEYS}},
                f"data.data_yaml={data_yaml} gives the dataset root, its image folders and the "
                "class names",
            )
            try:
                dataset = read_data_yaml(data_yaml)
            except (OSError, ValueError) as err:  # a setting the user fixes: one line, no trace
                raise ConfigError(str(err)) from None
            root, names = dataset.root, dataset.names
            for split in dataset.splits:  # the split's sources are read from the file
                kwargs[f"{split}_images"], kwargs[f"{split}_annotations"] = root, dataset.yaml_file
        elif names is None:
            raise ConfigError(
                "data.names: give the class names in label-index order (data.names=[cat,dog]) and "
                "data.root, or an Ultralytics dataset file: data.data_yaml=path/to/data.yaml"
            )
        elif root is not None:  # the layout's folders, where not given
            for split in ("train", "val"):
                for kind, folder in (("images", "images"), ("annotations", "labels")):
                    if kwargs.get(f"{split}_{kind}") is None:
                        kwargs[f"{split}_{kind}"] = os.path.join(root, folder, split)
        elif not _given({k: kwargs.get(k) for k in _PATH_KEYS}):
            raise ConfigError(
                "data.root: give the dataset folder (with images/{train,val} and labels/"
                "{train,val}), or an Ultralytics dataset file: data.data_yaml=path/to/data.yaml"
            )
        super().__init__(root=root, **kwargs)
        self.yaml_dataset: UltralyticsDataset | None = dataset
        self.names = [str(n) for n in names]
        if not self.names:
            raise ConfigError("data.names: the class names list is empty")

    @property
    def class_names(self) -> list[str]:
        return list(self.names)

    @property
    def category_ids(self) -> list[int]:
        return list(range(len(self.names)))

    def count_classes(self) -> int:
        """One class per name (of ``data.names`` or the ``data.yaml``)."""
        return len(self.names)

    def _read_split(self, split: str, images: str, annotations: str) -> DetectionAnnotations:
        if self.yaml_dataset is None:
            return super()._read_split(split, images, annotations)
        return load_data_yaml_split(
            self.yaml_dataset, split, probe_images, skip_bad_annotations=self.skip_bad_annotations
        )

    def read_annotations(self, images: str, annotations: str) -> DetectionAnnotations:
        return load_yolo(
            images,
            annotations,
            self.names,
            probe_images,
            skip_bad_annotations=self.skip_bad_annotations,
        )


class VocDataModule(CocoDataModule):
    """A Pascal VOC dataset: the images of VOC image sets, read by
    :func:`~rtdetr_lit.data.voc.load_voc` (which says how boxes, ``difficult`` objects and broken
    files are treated).

    Args:
        root: the folder the image sets are named from: VOCdevkit, or one year's folder.
        train_sets, val_sets, test_sets: each split's image sets, ``<year folder>/<set>``
            (``VOC2007/trainval`` is ``root/VOC2007/ImageSets/Main/trainval.txt``) or ``<set>``
            for the root's own; the images of several sets are read together. No test sets: test
            on the validation sets.
        names: the class names in label order, the 20 VOC classes by default; ``None``: the names
            found in the XML files of all the sets, sorted.
        **kwargs: as ``CocoDataModule``, without the per-split paths (the image sets replace them).
    """

    def __init__(
        self,
        root: str,
        train_sets: Sequence[str] | str | None = ("VOC2007/trainval", "VOC2012/trainval"),
        val_sets: Sequence[str] | str | None = ("VOC2007/test",),
        test_sets: Sequence[str] | str | None = None,
        names: Sequence[str] | None = VOC_CLASSES,
        **kwargs: Any,
    ) -> None:
        _refuse_unused(
            {k: kwargs.pop(k, None) for k in _PATH_KEYS},
            "data=voc reads the images of data.train_sets, data.val_sets and data.test_sets",
        )
        given = {"train": train_sets, "val": val_sets, "test": test_sets}
        sets = {
            split: [str(v)] if isinstance(v, str) else [str(s) for s in (v or ())]
            for split, v in given.items()
        }
        for split, image_sets in sets.items():
            # The paths say which splits there are, and name the sets in messages.
            if image_sets:
                kwargs[f"{split}_images"] = root
                kwargs[f"{split}_annotations"] = "+".join(image_sets)
        super().__init__(root=root, **kwargs)
        self.sets = sets
        self.names = None if names is None else [str(n) for n in names]
        if self.names is not None and not self.names:
            raise ConfigError("data.names: the class names list is empty (null: read from the XML)")

    def _names(self) -> list[str]:
        """The class names: given, or collected from the XML files once."""
        if self.names is None:
            every_set = [s for image_sets in self.sets.values() for s in image_sets]
            self.names = collect_voc_names(self.root, every_set)
            if not self.names:
                raise ValueError(
                    f"data.names is null and the XML files of {every_set} in {self.root} name no "
                    "object class"
                )
            log.info("data.names: %d classes in the XML files: %s", len(self.names), self.names)
        return self.names

    @property
    def class_names(self) -> list[str] | None:
        return list(self.names) if self.names is not None else super().class_names

    @property
    def category_ids(self) -> list[int] | None:
        return list(range(len(self.names))) if self.names is not None else super().category_ids

    def count_classes(self) -> int:
        """One class per name (given, or found in the XML files)."""
        return len(self._names())

    def _read_split(self, split: str, images: str, annotations: str) -> DetectionAnnotations:
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"data.root: no such folder {self.root}")
        names = self._names()
        try:
            return load_voc(
                self.root, self.sets[split], names, skip_bad_annotations=self.skip_bad_annotations
            )
        except FileNotFoundError as err:  # an image set file: name the setting that lists it
            raise FileNotFoundError(f"data.{split}_sets: {err}") from None
