"""Lightning callbacks: EMA of the weights, and (later) the discrete fine-tuning stage."""

from rtdetr_lit.callbacks.ema import EMA, ema_decay

__all__ = ["EMA", "ema_decay"]
