"""Lightning callbacks: weight EMA, discrete fine-tuning, the non-finite guard, pictures, resume."""

from rtdetr_lit.callbacks.ema import EMA, ema_decay
from rtdetr_lit.callbacks.finetune import DiscreteFinetune
from rtdetr_lit.callbacks.guard import NonFiniteGuard
from rtdetr_lit.callbacks.pictures import PredictionPictures
from rtdetr_lit.callbacks.resume import RandomState, StepCheckpoint

__all__ = [
    "EMA",
    "DiscreteFinetune",
    "NonFiniteGuard",
    "PredictionPictures",
    "RandomState",
    "StepCheckpoint",
    "ema_decay",
]
