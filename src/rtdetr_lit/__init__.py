"""rtdetr_lit: RT-DETRv2 detectors with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
