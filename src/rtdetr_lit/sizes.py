"""Input sizes the detector accepts: positive multiples of its largest stride, 32."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MAX_STRIDE", "check_sizes"]

# The coarsest feature map is the backbone's stride-32 stage (docs/rtdetrv2.md §1); the encoder's
# 2x upsampling between levels needs every map to be exactly half the previous one.
MAX_STRIDE = 32


def check_sizes(values: Sequence[int], what: str, count: int | None = None) -> tuple[int, ...]:
    """``values`` as a tuple of ints, each a positive multiple of :data:`MAX_STRIDE`.

    Args:
        values: image sizes in pixels.
        what: the setting's name for the message (e.g. ``data.image_size``).
        count: how many values there must be (2 for ``[height, width]``), any number if ``None``.

    Raises:
        ValueError: naming ``what``, the rule and the values given.
    """
    sizes = tuple(int(v) for v in values)
    if (count is not None and len(sizes) != count) or any(v <= 0 or v % MAX_STRIDE for v in sizes):
        shape = "[height, width], " if count == 2 else ""
        raise ValueError(
            f"{what} must be {shape}positive multiples of {MAX_STRIDE}, got {list(sizes)}"
        )
    return sizes
