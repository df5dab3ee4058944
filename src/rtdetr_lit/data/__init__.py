"""Datasets, augmentation and LightningDataModules."""

from rtdetr_lit.data.synthetic import CLASSES, SyntheticConfig, ensure_synthetic_dataset

__all__ = ["CLASSES", "SyntheticConfig", "ensure_synthetic_dataset"]
