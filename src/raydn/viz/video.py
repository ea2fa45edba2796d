"""MP4 output through imageio's ffmpeg plugin (``imageio-ffmpeg`` ships the ffmpeg binary in its
wheel: ``pip install 'raydn[infer]'``). No hand-written encoder.

:class:`VideoWriter` writes H.264 (yuv420p, playable everywhere) into a temporary file beside the
destination and renames it onto the final name only when closed without error: an interrupted
run never leaves a half-written video. Frames are padded (black, bottom/right) to multiples of 16
pixels, so ffmpeg never rescales them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from raydn.errors import RaydnError
from raydn.io import atomic_path

__all__ = ["VideoWriter", "count_video_frames", "require_video_support"]

_BLOCK = 16


def require_video_support():
    """Import the encoder library or raise a :class:`RaydnError` with the install line."""
    try:
        import imageio.v2 as imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError as e:
        raise RaydnError(f"writing MP4 needs imageio and imageio-ffmpeg ({e.name} is missing): "
                         "pip install 'raydn[infer]'") from None
    return imageio


def _pad(frame: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """(H, W, 3) uint8 -> padded to ``size`` (H', W') (or to multiples of 16)."""
    H, W = frame.shape[:2]
    if size is None:
        size = (-(-H // _BLOCK) * _BLOCK, -(-W // _BLOCK) * _BLOCK)
    if (H, W) == tuple(size):
        return frame
    if H > size[0] or W > size[1]:
        raise ValueError(f"VideoWriter: frame {W}x{H} larger than the first frame's {size[1]}x{size[0]}")
    out = np.zeros((size[0], size[1], 3), dtype=np.uint8)
    out[:H, :W] = frame
    return out


class VideoWriter:
    """Context manager: ``with VideoWriter("out.mp4", fps=2) as v: v.append(rgb_uint8)``.

    ``append`` takes (H, W, 3) uint8 RGB (or a PIL image); every frame is padded to the first
    frame's padded size. The file appears at ``path`` on a clean exit only."""

    def __init__(self, path: str | os.PathLike, fps: float = 2.0, quality: int = 7):
        self.imageio = require_video_support()
        self.path = Path(path)
        if fps <= 0 or not np.isfinite(fps):
            raise RaydnError(f"video frame rate must be > 0, got {fps}")
        self.fps, self.quality = float(fps), int(quality)
        self.frames = 0
        self._writer = None
        self._size = None
        self._tmp: Path | None = None

    def __enter__(self) -> "VideoWriter":
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        return self

    def append(self, frame) -> None:
        arr = np.ascontiguousarray(np.asarray(frame, dtype=np.uint8)[..., :3])
        if self._writer is None:
            arr = _pad(arr, None)
            self._size = arr.shape[:2]
            self._writer = self.imageio.get_writer(
                self._tmp, format="FFMPEG", mode="I", fps=self.fps, codec="libx264", quality=self.quality,
                pixelformat="yuv420p", macro_block_size=_BLOCK, ffmpeg_log_level="error")
        else:
            arr = _pad(arr, self._size)
        self._writer.append_data(arr)
        self.frames += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
            if exc_type is None and self.frames == 0:
                raise RaydnError(f"{self.path}: no frames to write")
        except BaseException as e:
            self._atomic.__exit__(type(e), e, e.__traceback__)  # removes the temporary file
            raise
        self._atomic.__exit__(exc_type, exc, tb)  # renamed into place, or removed on an error


def count_video_frames(path: str | os.PathLike) -> int:
    """Number of frames of a video, decoded by imageio-ffmpeg (exact count: ffmpeg reads every
    frame)."""
    require_video_support()
    import imageio_ffmpeg  # optional: raydn[infer]
    n, _ = imageio_ffmpeg.count_frames_and_secs(os.fspath(path))
    return int(n)
