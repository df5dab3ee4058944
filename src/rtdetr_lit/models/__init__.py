"""RT-DETRv2 networks as plain ``nn.Module``s (no Lightning here)."""

from rtdetr_lit.models.deploy import fuse_for_deploy
from rtdetr_lit.models.detector import RTDETR
from rtdetr_lit.models.postprocess import RTDETRPostProcessor
from rtdetr_lit.models.zoo import MODEL_SIZES, ModelSpec, create_model

__all__ = [
    "MODEL_SIZES",
    "RTDETR",
    "ModelSpec",
    "RTDETRPostProcessor",
    "create_model",
    "fuse_for_deploy",
]
