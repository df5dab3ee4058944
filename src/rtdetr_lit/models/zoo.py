"""The named model sizes (docs/rtdetrv2.md §1) and ``create_model``, the one public factory.

The Hydra ``model=`` configs build through :func:`create_model` too, passing the size's values
explicitly so they show in the composed config; a test keeps the two in agreement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from rtdetr_lit.models.backbone import PResNet
from rtdetr_lit.models.decoder import RTDETRTransformer
from rtdetr_lit.models.deformable import check_num_points
from rtdetr_lit.models.detector import RTDETR
from rtdetr_lit.models.encoder import HybridEncoder
from rtdetr_lit.sizes import check_sizes

__all__ = ["MODEL_NAMES", "MODEL_SIZES", "ModelSpec", "check_num_points", "create_model"]


@dataclass(frozen=True)
class ModelSpec:
    """Every hyper-parameter of one detector; :func:`create_model` accepts each as an override."""

    backbone_depth: int
    encoder_hidden_dim: int = 256
    encoder_ffn_dim: int = 1024
    expansion: float = 1.0
    num_decoder_layers: int = 6
    eval_idx: int = -1
    freeze_at: int = -1
    freeze_norm: bool = False
    decoder_hidden_dim: int = 256
    decoder_ffn_dim: int = 1024
    num_heads: int = 8
    num_queries: int = 300
    num_points: tuple[int, ...] = (4, 4, 4)
    sampling_method: str = "grid_sample"
    discrete_snap: str = "reference"
    num_denoising: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    eval_spatial_size: tuple[int, int] | None = (640, 640)
    backbone_weights: str | None = None
    channels_last: bool = True


# docs/rtdetrv2.md §1. S and M* train their backbone BN; M, L and X freeze the stem and every
# backbone BN.
MODEL_SIZES: dict[str, ModelSpec] = {
    "r18": ModelSpec(18, expansion=0.5, num_decoder_layers=3),
    "r34": ModelSpec(34, expansion=0.5, num_decoder_layers=4),
    "r50m": ModelSpec(50, expansion=0.5, eval_idx=2, freeze_at=0, freeze_norm=True),
    "r50": ModelSpec(50, freeze_at=0, freeze_norm=True),
    "r101": ModelSpec(
        101, encoder_hidden_dim=384, encoder_ffn_dim=2048, freeze_at=0, freeze_norm=True
    ),
    # Not a zoo size: S slimmed for CPU demos (`make train`); see README "The demo model".
    "demo": ModelSpec(
        18,
        encoder_hidden_dim=128,
        encoder_ffn_dim=512,
        expansion=0.5,
        num_decoder_layers=3,
        decoder_hidden_dim=128,
        decoder_ffn_dim=512,
        num_queries=100,
        num_denoising=50,
        eval_spatial_size=(320, 320),
    ),
}
# The paper's sizes: every entry of the table but the CPU demo.
MODEL_NAMES: tuple[str, ...] = tuple(name for name in MODEL_SIZES if name != "demo")


def _as_size(value: int | Sequence[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    h, w = check_sizes((value, value) if isinstance(value, int) else value, "eval_spatial_size", 2)
    return h, w


def create_model(name: str, num_classes: int = 80, **overrides: object) -> RTDETR:
    """Build the detector ``name``: ``r18``, ``r34``, ``r50m``, ``r50``, ``r101`` or ``demo``.

    ``overrides`` replace any :class:`ModelSpec` field, e.g. ``num_points=[4, 2, 1]``,
    ``sampling_method="discrete"``, ``eval_idx=1`` or ``backbone_weights``: a local file,
    ``"imagenet"`` (the ImageNet backbone of this size) or a name of :mod:`rtdetr_lit.weights`
    (downloaded once into the cache). Weights are randomly initialised as docs/rtdetrv2.md §4-§5
    prescribe and stored channels-last unless ``channels_last=False`` (see
    :attr:`RTDETR.channels_last`).
    """
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_SIZES)}")
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(
            f"create_model({name!r}): unknown override(s) {unknown}; valid: {sorted(fields)}"
        )
    spec = dataclasses.replace(MODEL_SIZES[name], **overrides)
    num_points = check_num_points(spec.num_points)
    eval_size = _as_size(spec.eval_spatial_size)
    weights = None
    if spec.backbone_weights:
        from rtdetr_lit.weights import backbone_file  # the registry builds models to check files

        weights = backbone_file(str(spec.backbone_weights), name)

    backbone = PResNet(
        spec.backbone_depth,
        freeze_at=spec.freeze_at,
        freeze_norm=spec.freeze_norm,
        weights=weights,
    )
    encoder = HybridEncoder(
        backbone.out_channels,
        feat_strides=backbone.out_strides,
        hidden_dim=spec.encoder_hidden_dim,
        num_heads=spec.num_heads,
        dim_feedforward=spec.encoder_ffn_dim,
        expansion=spec.expansion,
        eval_spatial_size=eval_size,
    )
    decoder = RTDETRTransformer(
        num_classes=num_classes,
        hidden_dim=spec.decoder_hidden_dim,
        num_queries=spec.num_queries,
        feat_channels=[spec.encoder_hidden_dim] * len(backbone.out_channels),
        feat_strides=backbone.out_strides,
        num_points=num_points,
        num_heads=spec.num_heads,
        num_layers=spec.num_decoder_layers,
        dim_feedforward=spec.decoder_ffn_dim,
        num_denoising=spec.num_denoising,
        label_noise_ratio=spec.label_noise_ratio,
        box_noise_scale=spec.box_noise_scale,
        eval_spatial_size=eval_size,
        eval_idx=spec.eval_idx,
    )
    model = RTDETR(backbone, encoder, decoder)
    model.set_sampling_method(spec.sampling_method, spec.discrete_snap)
    model.channels_last = spec.channels_last
    # What the model was built as, for the record a checkpoint carries (rtdetr_lit.record).
    model.size_name, model.spec = name, spec
    return model
