"""Reading images of any common kind as 8-bit RGB, and a cheap validity check for the set-up pass.

Real datasets mix grayscale, RGBA, palette, 16-bit, CMYK and EXIF-rotated files. Everything comes
out of :func:`read_image` as ``uint8`` ``(H, W, 3)`` RGB:

* grayscale and palette images are expanded to three channels; alpha is dropped (not blended);
* 16-bit images are scaled to 8 bits by ``value / 257`` (OpenCV does this when decoding to 8 bits);
* CMYK (JPEG or TIFF) is converted by the decoder;
* the EXIF orientation is applied when ``apply_exif`` is true (the picture as viewers show it).

OpenCV decodes (it is the fastest and releases the GIL); Pillow is the fallback for formats OpenCV
cannot read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageProbe", "probe_image", "read_image"]

# EXIF orientation values that swap width and height (rotations by 90 or 270 degrees).
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class ImageProbe:
    """What the set-up pass learns from a file's header (and tail) without decoding it.

    ``width``/``height`` are the displayed size (EXIF orientation applied); ``raw_width``/
    ``raw_height`` the stored one. ``error`` is ``None`` for a readable file, else the reason.
    """

    width: int = 0
    height: int = 0
    raw_width: int = 0
    raw_height: int = 0
    error: str | None = None


def _tail_is_complete(path: str | os.PathLike[str], image_format: str | None) -> bool:
    """Whether a JPEG ends with its end-of-image marker or a PNG with its IEND chunk.

    A truncated download still has a valid header, and decoders return a grey-filled picture for it
    with only a warning, so the end of the file is checked as well (reads a few bytes only).
    """
    if image_format not in ("JPEG", "MPO", "PNG"):
        return True
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1024))
        tail = f.read()
    if image_format == "PNG":
        return b"IEND" in tail[-16:]
    # Some cameras append padding after the marker: look for it near the end, not at the end.
    return b"\xff\xd9" in tail


def probe_image(path: str | os.PathLike[str]) -> ImageProbe:
    """Open ``path`` lazily (header only) and report its sizes or why it cannot be used."""
    if not os.path.isfile(path):
        return ImageProbe(error="file not found")
    try:
        with Image.open(path) as im:
            raw_w, raw_h = im.size
            image_format = im.format
            orientation = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception as err:  # Pillow raises many kinds for garbage; all mean "unreadable".
        return ImageProbe(error=f"not a readable image ({type(err).__name__}: {err})")
    if raw_w <= 0 or raw_h <= 0:
        return ImageProbe(error=f"empty image ({raw_w}x{raw_h})")
    if not _tail_is_complete(path, image_format):
        return ImageProbe(error=f"truncated {image_format} file")
    w, h = (raw_h, raw_w) if orientation in _TRANSPOSING_ORIENTATIONS else (raw_w, raw_h)
    return ImageProbe(width=w, height=h, raw_width=raw_w, raw_height=raw_h)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own convert("RGB") clips 16-bit values at 255 instead of scaling them.
        arr = np.asarray(im, dtype=np.float32)
        gray = np.clip(arr / 257.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def read_image(path: str | os.PathLike[str], apply_exif: bool = True) -> np.ndarray:
    """Decode ``path`` to ``uint8`` ``(H, W, 3)`` RGB (C-contiguous).

    Raises ``OSError`` naming the file when it cannot be decoded.
    """
    flags = cv2.IMREAD_COLOR_RGB
    if not apply_exif:
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imread(os.fspath(path), flags)
    if image is not None:
        return image
    try:
        with Image.open(path) as im:
            if apply_exif:
                im = ImageOps.exif_transpose(im)
            return np.ascontiguousarray(_pil_to_rgb(im))
    except Exception as err:
        raise OSError(f"cannot decode image {os.fspath(path)}: {err}") from err
