"""Draw boxes with readable captions (class name, score) on images, and tile images together."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

__all__ = ["class_colour", "draw_boxes", "tile", "titled"]

# Distinct colours, cycled by class index.
_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
]  # fmt: skip


def class_colour(index: int) -> tuple[int, int, int]:
    """The colour of class ``index`` (contiguous label) in every picture and plot."""
    return _PALETTE[index % len(_PALETTE)]


def _ink(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``background`` (by its luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _font(image: Image.Image) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, int]:
    """Pillow's own scalable font sized to the image (about 28 lines of text on its short side),
    and that size in pixels."""
    size = max(10, round(min(image.size) / 28))
    return ImageFont.load_default(size=size), size


def _to_pil(image: torch.Tensor) -> Image.Image:
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(image.cpu().permute(1, 2, 0).numpy())


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def draw_boxes(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str] | None = None,
    scores: torch.Tensor | None = None,
    captions: Sequence[str] | None = None,
) -> torch.Tensor:
    """Draw ``boxes`` on ``image``, each outlined in its class colour with a caption.

    The caption sits at the box's top-left corner, inside it, on a filled box of the class colour
    in black or white (whichever contrasts more); outline and font scale with the image.

    Args:
        image: (3, H, W) float in [0, 1] or uint8.
        boxes: (N, 4) absolute xyxy pixels of ``image``.
        labels: (N,) int class indices (index into ``class_names`` when given; pick the colour).
        class_names: names to print instead of the indices.
        scores: (N,) optional scores printed after the name.
        captions: (N) texts to print instead of the names and scores.

    Returns:
        (3, H, W) uint8 image.
    """
    picture = _to_pil(image)
    ids = labels.cpu().tolist()
    if captions is None:
        captions = [class_names[i] if class_names is not None else str(i) for i in ids]
        if scores is not None:
            values = scores.cpu().tolist()
            captions = [f"{c} {s:.2f}" for c, s in zip(captions, values, strict=True)]
    draw = ImageDraw.Draw(picture)
    font, size = _font(picture)
    width = max(1, round(min(picture.size) / 200))
    pad = max(1, round(size / 6))
    for (x1, y1, x2, y2), i, caption in zip(boxes.cpu().tolist(), ids, captions, strict=True):
        colour = class_colour(i)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        _, _, right, bottom = draw.textbbox((x1 + pad, y1 + pad), caption, font=font)
        draw.rectangle((x1, y1, right + pad, bottom + pad), fill=colour)
        draw.text((x1 + pad, y1 + pad), caption, fill=_ink(colour), font=font)
    return _to_tensor(picture)


def titled(image: torch.Tensor, title: str) -> torch.Tensor:
    """``image`` (3, H, W) uint8 under a white strip with ``title`` in black."""
    picture = _to_pil(image)
    font, size = _font(picture)
    strip = round(size * 1.6)
    canvas = Image.new("RGB", (picture.width, picture.height + strip), "white")
    canvas.paste(picture, (0, strip))
    ImageDraw.Draw(canvas).text((4, strip / 2), title, fill="black", font=font, anchor="lm")
    return _to_tensor(canvas)


def tile(images: Sequence[torch.Tensor], columns: int = 4) -> torch.Tensor:
    """(3, H, W) uint8 images (each padded to the largest size) ``columns`` to a row, 4 white
    pixels apart: one (3, H', W') uint8 image."""
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    padded = [
        torch.nn.functional.pad(im, (0, w - im.shape[-1], 0, h - im.shape[-2]), value=255)
        for im in images
    ]
    return make_grid(padded, nrow=columns, padding=4, pad_value=255)
