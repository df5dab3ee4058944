"""Lightning callbacks: EMA of the weights, prediction pictures, the discrete fine-tuning
stage, the non-finite step guard."""

from rtdetr_lit.callbacks.ema import EMA, ema_decay
from rtdetr_lit.callbacks.finetune import DiscreteFinetune
from rtdetr_lit.callbacks.guard import NonFiniteGuard
from rtdetr_lit.callbacks.pictures import PredictionPictures

__all__ = ["EMA", "DiscreteFinetune", "NonFiniteGuard", "PredictionPictures", "ema_decay"]
