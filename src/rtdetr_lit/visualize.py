"""Draw boxes with class names (and scores) on images, and tile them into one picture."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, make_grid

__all__ = ["draw_boxes", "save_grid"]

# Distinct colours, cycled by class index.
_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
]  # fmt: skip


def draw_boxes(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str] | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw ``boxes`` on ``image``.

    Args:
        image: (3, H, W) float in [0, 1] or uint8.
        boxes: (N, 4) absolute xyxy pixels of ``image``.
        labels: (N,) int class indices (index into ``class_names`` when given).
        class_names: names to print instead of the indices.
        scores: (N,) optional scores printed after the name.

    Returns:
        (3, H, W) uint8 image.
    """
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    image = image.cpu()
    ids = labels.cpu().tolist()
    text = [class_names[i] if class_names is not None else str(i) for i in ids]
    if scores is not None:
        text = [f"{t} {s:.2f}" for t, s in zip(text, scores.cpu().tolist(), strict=True)]
    colours = [_PALETTE[i % len(_PALETTE)] for i in ids]
    width = max(1, round(min(image.shape[-2:]) / 200))
    return draw_bounding_boxes(image, boxes.cpu().float(), text, colours, width=width)


def save_grid(images: Sequence[torch.Tensor], path: str | Path, columns: int = 4) -> Path:
    """Tile (3, H, W) uint8 images (padded to the largest size) into one PNG at ``path``."""
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    padded = [
        torch.nn.functional.pad(im, (0, w - im.shape[-1], 0, h - im.shape[-2])) for im in images
    ]
    grid = make_grid(padded, nrow=columns, padding=4, pad_value=255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path
