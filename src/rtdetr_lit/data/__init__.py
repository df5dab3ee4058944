"""Datasets (COCO, YOLO, Pascal VOC, synthetic), augmentation and LightningDataModules.

Batches are ``(images, targets)``: ``images`` float (B, 3, H, W) in [0, 1]; ``targets`` one dict per
image with ``boxes`` (N, 4) normalised cxcywh, ``labels`` (N,) int64 contiguous class indices,
``image_id``, ``orig_size`` (w, h) of the original image, ``iscrowd`` (N,) and ``area`` (N,) in
original pixels. Data modules expose ``num_classes``, ``category_ids`` (dataset id of each label)
and ``class_names``.
"""

from rtdetr_lit.data.annotations import DetectionAnnotations, load_coco, load_yolo
from rtdetr_lit.data.datamodule import (
    CocoDataModule,
    SyntheticDataModule,
    VocDataModule,
    YoloDataModule,
)
from rtdetr_lit.data.synthetic import CLASSES, SyntheticConfig, ensure_synthetic_dataset
from rtdetr_lit.data.voc import VOC_CLASSES, load_voc
from rtdetr_lit.data.yolo_yaml import read_data_yaml

__all__ = [
    "CLASSES",
    "VOC_CLASSES",
    "CocoDataModule",
    "DetectionAnnotations",
    "SyntheticConfig",
    "SyntheticDataModule",
    "VocDataModule",
    "YoloDataModule",
    "ensure_synthetic_dataset",
    "load_coco",
    "load_voc",
    "load_yolo",
    "read_data_yaml",
]
