"""Hungarian matcher and RT-DETRv2 criterion as plain ``nn.Module``s (no Lightning here)."""

from rtdetr_lit.loss.criterion import LOSS_NAMES, RTDETRCriterion
from rtdetr_lit.loss.matcher import HungarianMatcher

__all__ = ["LOSS_NAMES", "HungarianMatcher", "RTDETRCriterion"]
