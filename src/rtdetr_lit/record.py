"""What a checkpoint says about its detector: the record training writes into every checkpoint and
``model.safetensors``, so that eval, export, predict and :func:`rtdetr_lit.load` rebuild the
detector and its pre/post-processing from the file alone.

The record is a JSON-able dict under the key :data:`RECORD_KEY` of a Lightning checkpoint (and a
JSON string under the same key of a safetensors file's metadata)::

    {"version": 1, "package": "0.1.0",
     "model": "r18",                      # the zoo size create_model builds
     "net": {"num_queries": 100, ...},    # every ModelSpec setting that differs from that size
     "num_classes": 6, "class_names": [...], "category_ids": [...],
     "image_size": [640, 640],            # (height, width) of the validation input
     "num_top_queries": 300,              # detections the post-processor keeps per image
     "input": {"channels": "RGB", "scale": 255.0, "mean": null, "std": null},
     "config": {...}}                     # the composed run config, for the record only

``version`` grows when the layout changes; a reader refuses a newer version than it knows with a
message to upgrade, and reads every older one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from rtdetr_lit import __version__
from rtdetr_lit.models.zoo import MODEL_SIZES, ModelSpec, create_model

__all__ = ["RECORD_KEY", "RECORD_VERSION", "ModelRecord", "plain", "record_of"]

RECORD_KEY = "rtdetr_lit"
RECORD_VERSION = 1
# The input convention of every detector of this package (docs/rtdetrv2.md §9): RGB, divided by
# 255 to [0, 1], no mean/std normalisation.
INPUT_CONVENTION = {"channels": "RGB", "scale": 255.0, "mean": None, "std": None}
# Build switches that do not describe the network: where its backbone came from, memory layout.
_NOT_RECORDED = frozenset({"backbone_weights", "channels_last"})


@dataclass(frozen=True)
class ModelRecord:
    """The detector a checkpoint holds and how to feed it; see the module docstring."""

    model: str
    num_classes: int
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    image_size: tuple[int, int]
    net: dict[str, Any] = field(default_factory=dict)
    num_top_queries: int = 300
    config: dict[str, Any] | None = None
    version: int = RECORD_VERSION
    package: str = __version__

    def spec(self) -> dict[str, Any]:
        """Every :class:`ModelSpec` setting of the recorded network (the size's, then ``net``)."""
        full = dataclasses.asdict(MODEL_SIZES[self.model])
        full.update(self.net)
        return {k: v for k, v in full.items() if k not in _NOT_RECORDED}

    def build_net(self, **overrides: Any) -> nn.Module:
        """The recorded detector, randomly initialised (load the checkpoint's weights into it);
        ``overrides`` change inference settings such as ``eval_idx`` or ``sampling_method``."""
        return create_model(self.model, num_classes=self.num_classes, **{**self.net, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "package": self.package,
            "model": self.model,
            "net": dict(self.net),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "category_ids": list(self.category_ids),
            "image_size": list(self.image_size),
            "num_top_queries": self.num_top_queries,
            "input": dict(INPUT_CONVENTION),
            "config": self.config,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> ModelRecord:
        """Read a record written by this or an earlier release; ``ValueError`` naming ``source``
        for a newer version or a record that does not describe a detector of this package."""
        version = data.get("version")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"{source}: its rtdetr_lit record has no valid version: {version!r}")
        if version > RECORD_VERSION:
            raise ValueError(
                f"{source} was written by rtdetr_lit {data.get('package', '?')} (record version "
                f"{version}); this rtdetr_lit {__version__} reads versions up to "
                f"{RECORD_VERSION}: upgrade rtdetr_lit to load it"
            )
        try:
            record = cls(
                model=str(data["model"]),
                num_classes=int(data["num_classes"]),
                class_names=tuple(str(n) for n in data["class_names"]),
                category_ids=tuple(int(i) for i in data["category_ids"]),
                image_size=_pair(data["image_size"]),
                net=dict(data.get("net") or {}),
                num_top_queries=int(data.get("num_top_queries", 300)),
                config=data.get("config"),
                version=version,
                package=str(data.get("package", "?")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: its rtdetr_lit record is incomplete ({err!r})") from None
        fields = {f.name for f in dataclasses.fields(ModelSpec)}
        unknown = sorted(set(record.net) - fields)
        if record.model not in MODEL_SIZES or unknown:
            raise ValueError(
                f"{source}: its rtdetr_lit record names model {record.model!r} with settings "
                f"{unknown or 'as known'}, which this release cannot build"
            )
        if len(record.class_names) != record.num_classes:
            raise ValueError(
                f"{source}: its record has {len(record.class_names)} class names for "
                f"{record.num_classes} classes"
            )
        return record

    @classmethod
    def from_json(cls, text: str, source: str) -> ModelRecord:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: its rtdetr_lit record is not valid JSON: {err}") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: its rtdetr_lit record is not a JSON object")
        return cls.from_dict(data, source)


def _pair(value: Sequence[int]) -> tuple[int, int]:
    height, width = (int(v) for v in value)
    return height, width


def record_of(
    net: nn.Module,
    num_top_queries: int,
    class_names: Sequence[str] | None,
    category_ids: Sequence[int] | None,
    image_size: Sequence[int] | None = None,
    config: dict[str, Any] | None = None,
) -> ModelRecord | None:
    """The record of ``net`` as it is now (its current sampling method and ``eval_idx``), or
    ``None`` when ``net`` was not built by ``create_model`` and so has no size to name.

    Missing class names become ``"class N"`` and missing category ids the contiguous labels;
    ``image_size`` defaults to the network's eval size.
    """
    name, built = getattr(net, "size_name", None), getattr(net, "spec", None)
    if name is None or built is None:
        return None
    current = dataclasses.replace(
        built,
        sampling_method=net.sampling_method,
        discrete_snap=net.discrete_snap,
        eval_idx=net.eval_idx,
    )
    default = MODEL_SIZES[name]
    diff = {}
    for f in dataclasses.fields(ModelSpec):
        value = plain(getattr(current, f.name))
        if f.name not in _NOT_RECORDED and value != plain(getattr(default, f.name)):
            diff[f.name] = value
    num_classes = int(net.decoder.num_classes)
    names = list(class_names) if class_names is not None else None
    ids = list(category_ids) if category_ids is not None else None
    size = image_size if image_size is not None else current.eval_spatial_size
    if size is None:
        raise ValueError("record_of: give image_size for a model built without an eval size")
    return ModelRecord(
        model=name,
        num_classes=num_classes,
        class_names=tuple(names or (f"class {i}" for i in range(num_classes))),
        category_ids=tuple(ids or range(num_classes)),
        image_size=_pair(size),
        net=diff,
        num_top_queries=int(num_top_queries),
        config=config,
    )


def plain(value: Any) -> Any:
    """Sequences (tuples, OmegaConf lists) as lists, as JSON gives them back."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    return value
