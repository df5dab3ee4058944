"""Lightning callbacks: weight EMA, discrete fine-tuning, the non-finite guard, pictures, resume,
progress lines, the results table and the evaluation plots."""

from rtdetr_lit.callbacks.ema import EMA, ema_decay
from rtdetr_lit.callbacks.evaluation import EvaluationPlots
from rtdetr_lit.callbacks.finetune import DiscreteFinetune
from rtdetr_lit.callbacks.guard import NonFiniteGuard
from rtdetr_lit.callbacks.pictures import PredictionPictures
from rtdetr_lit.callbacks.progress import ProgressLog
from rtdetr_lit.callbacks.results import ResultsTable
from rtdetr_lit.callbacks.resume import RandomState, StepCheckpoint

__all__ = [
    "EMA",
    "DiscreteFinetune",
    "EvaluationPlots",
    "NonFiniteGuard",
    "PredictionPictures",
    "ProgressLog",
    "RandomState",
    "ResultsTable",
    "StepCheckpoint",
    "ema_decay",
]
