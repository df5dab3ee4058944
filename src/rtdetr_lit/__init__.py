"""rtdetr_lit: RT-DETRv2 detectors with PyTorch Lightning and Hydra.

``rtdetr_lit.create_model("r50", num_classes=80)`` builds a detector, ``rtdetr_lit.load(path)``
loads a trained one for inference; the command-line entry points are ``python -m rtdetr_lit.train``
and friends (see README).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Detections", "Detector", "__version__", "create_model", "load"]


def __getattr__(name: str) -> Any:
    # Imported on first use so that `python -m rtdetr_lit.train --help` does not pay for torch.
    if name == "create_model":
        from rtdetr_lit.models import create_model

        return create_model
    if name in ("Detections", "Detector", "load"):
        from rtdetr_lit import api

        return getattr(api, name)
    raise AttributeError(f"module 'rtdetr_lit' has no attribute {name!r}")
