"""Lightning callbacks: EMA of the weights, prediction pictures, the discrete fine-tuning stage."""

from rtdetr_lit.callbacks.ema import EMA, ema_decay
from rtdetr_lit.callbacks.pictures import PredictionPictures

__all__ = ["EMA", "PredictionPictures", "ema_decay"]
