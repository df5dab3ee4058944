"""``rtdetr_lit.video``: H.264 / yuv420p / .mp4 written (odd sizes padded), read back with PyAV
(codec, pixel format, frame count, fps, pixels); the fallback encoder; the display rotation; errors
naming the file."""

from __future__ import annotations

import wave
from pathlib import Path

import av
import numpy as np
import pytest

from rtdetr_lit import video
from rtdetr_lit.video import VideoReader, VideoWriter

HEIGHT, WIDTH, FPS, COUNT = 64, 97, 12, 10


def make_frames() -> list[np.ndarray]:
    """Smooth RGB gradients that change from frame to frame (codecs keep them closely)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return [
        np.stack([(2 * x + 7 * i) % 256, (3 * y) % 256, np.full_like(x, 20 * i + 30)], -1).astype(
            np.uint8
        )
        for i in range(COUNT)
    ]


def write(path: Path, frames: list[np.ndarray]) -> VideoWriter:
    with VideoWriter(path, FPS) as writer:
        for frame in frames:
            writer.write(frame)
    return writer


def probe(path: Path) -> tuple[str, str, int, int, int, float, list[np.ndarray]]:
    """(codec, pixel format, width, height, frames, fps, RGB frames) as PyAV decodes ``path``."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        context = stream.codec_context
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return (
            context.name,
            context.pix_fmt,
            context.width,
            context.height,
            len(decoded),
            float(stream.average_rate),
            decoded,
        )


def test_h264_mp4_round_trip(tmp_path: Path) -> None:
    frames = make_frames()
    writer = write(tmp_path / "clip.avi", frames)
    assert writer.codec == "libx264", "the PyAV wheel bundles libx264"
    assert writer.path == tmp_path / "clip.mp4" and writer.path.is_file()
    assert writer.frames == COUNT and writer.size == (WIDTH, HEIGHT)

    codec, pix_fmt, width, height, count, fps, decoded = probe(writer.path)
    assert (codec, pix_fmt) == ("h264", "yuv420p")
    assert (width, height) == (WIDTH + 1, HEIGHT), "odd width: one column of padding"
    assert (count, fps) == (COUNT, FPS)
    for given, got in zip(frames, decoded, strict=True):
        assert np.abs(got[:, :WIDTH].astype(int) - given).mean() < 4
        # The padding repeats the last column, so nothing new shows at the right edge.
        assert np.abs(got[:, WIDTH].astype(int) - given[:, -1]).mean() < 6

    with VideoReader(writer.path) as reader:
        read = list(reader)
    assert (reader.fps, reader.frame_count, len(read)) == (FPS, COUNT, COUNT)
    assert all(a.dtype == np.uint8 and a.shape == (HEIGHT, WIDTH + 1, 3) for a in read)
    assert all(np.array_equal(a, b) for a, b in zip(read, decoded, strict=True))


def test_fallback_encoder_writes_its_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without H.264 (simulated) the first browser codec that opens is used, with its suffix."""
    vp9 = next(entry for entry in video.ENCODERS if entry[0] == "libvpx-vp9")
    monkeypatch.setattr(video, "ENCODERS", (("no-such-encoder", ".mp4", {}), vp9))
    video.encoder.cache_clear()
    try:
        writer = write(tmp_path / "clip.mp4", make_frames()[:3])
    finally:
        video.encoder.cache_clear()
    assert writer.path == tmp_path / "clip.webm"
    codec, pix_fmt, _, _, count, fps, _ = probe(writer.path)
    assert (codec, pix_fmt, count, fps) == ("vp9", "yuv420p", 3, FPS)


def test_display_rotation_is_applied(tmp_path: Path) -> None:
    """A portrait phone video (landscape pixels + a 90° display matrix) reads upright."""
    frame = make_frames()[0][:, :96]
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 96, HEIGHT, "yuv420p"
        stream.set_display_rotation(90)
        picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
        container.mux(stream.encode(picture))
        container.mux(stream.encode(None))
    with VideoReader(path) as reader:
        (read,) = list(reader)
    assert read.shape == (96, HEIGHT, 3)
    assert np.abs(read.astype(int) - np.rot90(frame)).mean() < 4


def test_writer_rejects_bad_frames(tmp_path: Path) -> None:
    with VideoWriter(tmp_path / "clip.mp4", FPS) as writer:
        with pytest.raises(ValueError, match="uint8 RGB"):
            writer.write(np.zeros((HEIGHT, WIDTH), np.uint8))
        writer.write(np.zeros((HEIGHT, WIDTH, 3), np.uint8))
        with pytest.raises(ValueError, match="the video is 97x64"):
            writer.write(np.zeros((HEIGHT, WIDTH + 2, 3), np.uint8))
    assert writer.frames == 1
    with VideoWriter(tmp_path / "empty.mp4", FPS) as empty:
        pass
    assert empty.frames == 0 and not empty.path.exists()
    with pytest.raises(ValueError, match="fps"):
        VideoWriter(tmp_path / "clip.mp4", 0)


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.mp4"
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 50)
    sound = tmp_path / "sound.wav"
    with wave.open(str(sound), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(bytes(1600))
    for path, reason in [(missing, "cannot open"), (text, "cannot open"), (sound, "no video")]:
        with pytest.raises(ValueError, match=reason) as error:
            VideoReader(path)
        assert str(path) in str(error.value)
