"""Read videos as RGB frames and write videos that web browsers play, with PyAV (FFmpeg).

Reading: :class:`VideoReader` opens any file FFmpeg can demux and yields
its first video stream as ``(H, W, 3)`` ``uint8`` RGB arrays. A display rotation stored in the
container (phones record portrait video as landscape plus a 90° rotation) is applied, as players
and ``cv2.VideoCapture`` do, so boxes found on a frame are in the picture the viewer sees.

Writing: :class:`VideoWriter` encodes H.264 (``libx264``, 8-bit ``yuv420p``, High profile, CRF 23,
BT.709 limited range, tagged as such) into ``.mp4`` with the index at the front
(``movflags=+faststart``), which every current browser plays in a ``<video>`` tag. The PyAV wheels
(``av`` 18.1.0 on the project machines) bundle ``libx264``; the encoders are probed once, in this
order, and the first one that opens is used:

==================  ==========  =======================================================
encoder             container   when
==================  ==========  =======================================================
``libx264``         ``.mp4``    the PyAV wheels (H.264)
``libopenh264``     ``.mp4``    FFmpeg builds without x264 (H.264, Cisco's encoder)
``h264``            ``.mp4``    whatever else this FFmpeg calls its H.264 encoder
``libvpx-vp9``      ``.webm``   no H.264 encoder at all (VP9; Chrome, Firefox, Safari)
``libsvtav1``       ``.mp4``    nor VP9 (AV1; current browsers)
==================  ==========  =======================================================

so the file written may not carry the suffix asked for: :attr:`VideoWriter.path` is the path
actually written (the asked-for path with the container's suffix, ``out.avi`` -> ``out.mp4``).

Frame size: 4:2:0 chroma needs an even width and height, so a frame of odd width (height) is
*padded* by repeating its last column (row) once, on the right (bottom). No pixel moves, so a box
drawn at ``(x, y)`` before writing is at ``(x, y)`` in the video; the video is one pixel wider
(taller) than the frames given. Every frame of one video must have the size of the first.

Usage (read, detect, draw, write)::

    with VideoReader(source) as video, VideoWriter(target, video.fps) as writer:
        for frame in video:  # (H, W, 3) uint8 RGB
            writer.write(draw(frame, detect(frame)))
    print(writer.path, writer.frames)  # the file actually written, and how many frames
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import av
import numpy as np
from av.video.frame import VideoFrame

__all__ = ["ENCODERS", "VideoReader", "VideoWriter", "encoder"]

# (encoder, container suffix, encoder options), in order of preference; see the module docstring.
ENCODERS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("libx264", ".mp4", {"preset": "fast", "crf": "23", "profile": "high"}),
    ("libopenh264", ".mp4", {}),
    ("h264", ".mp4", {}),
    (
        "libvpx-vp9",
        ".webm",
        {"crf": "32", "b": "0", "deadline": "good", "cpu-used": "5", "row-mt": "1"},
    ),
    ("libsvtav1", ".mp4", {"crf": "35", "preset": "8"}),
)
# What frames default to when a container gives no usable frame rate.
DEFAULT_FPS = 25.0
# Enum values of FFmpeg's AVColorSpace / AVColorPrimaries / AVColorTransferCharacteristic (BT.709)
# and AVColorRange (MPEG = limited, 16-235).
_BT709 = 1
_RANGE_MPEG = 1
_RANGE_JPEG = 2


_C = TypeVar("_C", bound="_Closing")


class _Closing:
    """A context manager that calls ``close()`` on exit."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class VideoReader(_Closing):
    """The first video stream of ``path`` as RGB ``uint8`` frames ``(H, W, 3)``.

    Opened on construction (:class:`ValueError` naming the file if FFmpeg cannot open it or it has
    no video stream); iterate once to decode the frames in order; the file closes at the end of
    the iteration, on :meth:`close` or on leaving a ``with`` block.

    Attributes:
        path: the file.
        fps: frames per second (the stream's average rate, else its guessed rate, else
            :data:`DEFAULT_FPS`).
        frame_count: frames in the stream as the container states it, ``None`` when it does not
            (``.mkv``, ``.webm`` and raw streams often do not); decoding may yield a few fewer.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            container = av.open(str(self.path), "r")
        except (OSError, av.FFmpegError) as exc:  # av's FileNotFoundError is an OSError too
            raise ValueError(f"cannot open the video {self.path}: {exc}") from exc
        if not container.streams.video:
            container.close()
            raise ValueError(f"no video stream in {self.path}")
        self._container = container
        self._stream = stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else DEFAULT_FPS
        self.frame_count: int | None = stream.frames or None

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._container is None:
            raise ValueError(f"the video {self.path} is closed (a reader iterates once)")
        try:
            for frame in self._container.decode(self._stream):
                yield _to_rgb(frame)
        except av.FFmpegError as exc:
            raise ValueError(f"cannot decode the video {self.path}: {exc}") from exc
        finally:
            self.close()

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def __repr__(self) -> str:
        return f"VideoReader({str(self.path)!r}, fps={self.fps:g}, frame_count={self.frame_count})"


def _to_rgb(frame: VideoFrame) -> np.ndarray:
    # The frame's colour range is passed on: PyAV would take an unspecified one as limited range.
    full = frame.color_range == _RANGE_JPEG or frame.format.name.startswith("yuvj")
    rgb = frame.to_ndarray(format="rgb24", src_color_range="JPEG" if full else None)
    # FFmpeg attaches the container's display matrix to every frame; rotation is counter-clockwise.
    quarter_turns = round(frame.rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, quarter_turns)) if quarter_turns else rgb


@functools.cache
def encoder() -> tuple[str, str, dict[str, str]]:
    """``(encoder, suffix, options)``: the first of :data:`ENCODERS` that this FFmpeg opens.

    Raises :class:`RuntimeError` when none does.
    """
    for name, suffix, options in ENCODERS:
        if name not in av.codecs_available:
            continue
        try:
            context = av.CodecContext.create(name, "w")
            context.width, context.height, context.pix_fmt = 64, 64, "yuv420p"
            context.time_base = Fraction(1, 25)
            context.open()
        except (av.FFmpegError, ValueError, OSError):  # listed but unusable (a missing device)
            continue
        return name, suffix, options
    names = ", ".join(name for name, _, _ in ENCODERS)
    raise RuntimeError(f"this FFmpeg (PyAV {av.__version__}) opens none of the encoders {names}")


class VideoWriter(_Closing):
    """Write RGB ``uint8`` frames ``(H, W, 3)`` as a video browsers play; a context manager.

    Args:
        path: the file to write; its suffix becomes the container's (``.mp4`` for H.264, see the
            module docstring), and :attr:`path` is the path actually written. Parent folders are
            created.
        fps: frames per second (a float such as ``29.97`` is stored as ``30000/1001``).
        options: encoder options that override the defaults of :data:`ENCODERS` (strings, as
            FFmpeg takes them, e.g. ``{"crf": "18"}``).

    The file is created at the first :meth:`write`; a writer given no frame writes nothing
    (:attr:`frames` is 0). Leaving the ``with`` block, even on an exception, finishes the file with
    the frames written so far.
    """

    def __init__(
        self, path: str | Path, fps: float | Fraction, *, options: dict[str, str] | None = None
    ) -> None:
        if not (isinstance(fps, (int, float, Fraction)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        self.codec, suffix, defaults = encoder()
        self.path = Path(path).with_suffix(suffix)
        self.fps = fps
        self.options = {**defaults, **(options or {})}
        self.frames = 0
        self.size: tuple[int, int] | None = None  # (width, height) of the frames given
        self._rate = Fraction(fps).limit_denominator(1001)
        self._container: av.container.OutputContainer | None = None
        self._stream: av.video.stream.VideoStream | None = None
        self._closed = False

    def write(self, frame: np.ndarray) -> None:
        """Append one ``(H, W, 3)`` ``uint8`` RGB frame (odd sizes are padded, see above)."""
        if self._closed:
            raise ValueError(f"the video writer of {self.path} is closed")
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(
                f"a frame must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}"
            )
        height, width = frame.shape[:2]
        if self.size is None:
            self._open(width, height)
        elif (width, height) != self.size:
            raise ValueError(
                f"frame {self.frames} of {self.path} is {width}x{height}; "
                f"the video is {self.size[0]}x{self.size[1]} (its first frame)"
            )
        assert self._container is not None and self._stream is not None
        padding = ((0, height % 2), (0, width % 2), (0, 0))
        if height % 2 or width % 2:
            frame = np.pad(frame, padding, mode="edge")
        picture = VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        picture = picture.reformat(
            format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG"
        )
        picture.colorspace = picture.color_primaries = picture.color_trc = _BT709
        picture.color_range = _RANGE_MPEG
        picture.pts = self.frames
        self._container.mux(self._stream.encode(picture))
        self.frames += 1

    def _open(self, width: int, height: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mp4 = self.path.suffix == ".mp4"
        container = av.open(str(self.path), "w", options={"movflags": "+faststart"} if mp4 else {})
        try:
            stream = container.add_stream(self.codec, rate=self._rate, options=self.options)
            context = stream.codec_context
            context.width, context.height = width + width % 2, height + height % 2
            context.pix_fmt = "yuv420p"
            context.time_base = 1 / self._rate
            if "crf" in self.options:  # constant quality, not PyAV's default of 1 Mbit/s
                context.bit_rate = 0
            context.colorspace = context.color_primaries = context.color_trc = _BT709
            context.color_range = _RANGE_MPEG
        except BaseException:
            container.close()
            raise
        self._container, self._stream, self.size = container, stream, (width, height)

    def close(self) -> None:
        """Flush the encoder and finish the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._container is None:
            return
        try:
            assert self._stream is not None
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()

    def __repr__(self) -> str:
        return f"VideoWriter({str(self.path)!r}, fps={self.fps}, codec={self.codec!r})"
