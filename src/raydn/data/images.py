"""Camera image files: where an info record's path points (:func:`resolve_image_path`) and decoding
one image to 8-bit RGB (:func:`load_image`; every failure is a :class:`~raydn.errors.DataError` naming
the file). Used by the nuScenes dataset, the own-camera reader and the dataset image scan."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from raydn.errors import DataError

__all__ = ["resolve_image_path", "load_image"]


def resolve_image_path(path: str, data_root: str | os.PathLike | None) -> Path:
    """Map an info ``data_path`` to a file. Without ``data_root`` the path is used as written
    (absolute, or relative to the working directory, as officially). With ``data_root`` the part
    from the first ``samples``/``sweeps`` component on is re-rooted there (so StreamPETR's
    ``./data/nuscenes/samples/...`` paths work from anywhere); other relative paths are joined."""
    p = Path(path)
    if data_root is None:
        return p
    parts = p.parts
    for i, part in enumerate(parts):
        if part in ("samples", "sweeps"):
            return Path(data_root, *parts[i:])
    return p if p.is_absolute() else Path(data_root) / p


def load_image(path: Path, src_size: tuple, draft_size: tuple | None = None) -> Image.Image:
    """Open and fully decode one camera image as RGB; a missing, unreadable or corrupt file, or a
    size other than ``src_size`` (H, W), raises :class:`DataError` naming the file. ``draft_size``
    (W, H) asks libjpeg for DCT-domain down-scaling to exactly that size (ignored if unavailable)."""
    H, W = src_size
    try:
        with Image.open(path) as im:
            if im.size != (W, H):
                raise DataError(f"{path}: image is {im.size[0]}x{im.size[1]}, expected {W}x{H} "
                                "(the official augmentation assumes the nuScenes camera size)")
            if draft_size is not None and im.format == "JPEG":
                im.draft("RGB", draft_size)
                if im.size != tuple(draft_size):  # draft picked another scale: decode full size
                    raise _RetryFull()
            return _to_rgb8(im, path)  # forces the full decode inside the try
    except _RetryFull:
        return load_image(path, src_size, None)
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{path}: camera image not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode camera image ({type(exc).__name__}: {exc})") from exc


class _RetryFull(Exception):
    pass


#: Modes whose conversion to RGB loses nothing a camera image holds (greyscale is replicated).
_RGB_MODES = ("RGB", "L", "P", "YCbCr")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_rgb8(im: Image.Image, path) -> Image.Image:
    """Decode ``im`` to 8-bit RGB without changing what it holds, or raise :class:`DataError`
    naming the file and the mode: RGB / greyscale / palette / YCbCr convert as they are; an alpha
    channel must be fully opaque (it is dropped); 16-bit greyscale (PNG) is scaled 0..65535 ->
    0..255 (not clipped at 255); CMYK, 32-bit integer or float, 1-bit and other modes are refused."""
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        mode = "PA"
    if mode in _RGB_MODES:
        return im.convert("RGB")
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        lo = rgba.getchannel("A").getextrema()[0]
        if lo < 255:
            raise DataError(f"{path}: camera image has transparent pixels (mode {im.mode}, alpha down to "
                            f"{lo}); expected an opaque image: save it as RGB without alpha")
        return rgba.convert("RGB")
    if mode in _16BIT_MODES or (mode == "I" and im.format == "PNG"):
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(f"{path}: camera image of mode {im.mode} has values outside 0..65535; "
                            "expected 16-bit greyscale")
        grey = ((a * 255 + 32767) // 65535).astype(np.uint8)   # full 16-bit range -> 8 bits, rounded
        return Image.fromarray(grey, mode="L").convert("RGB")
    what = {"CMYK": "CMYK colour (print colours; the conversion depends on a colour profile)",
            "I": "32-bit integer", "F": "32-bit float (no defined 0..255 range)", "1": "1-bit black and white",
            }.get(mode, "not an RGB, greyscale or palette image")
    raise DataError(f"{path}: camera image has mode {im.mode} ({what}); expected 8-bit RGB, greyscale "
                    "or palette, or 16-bit greyscale: convert it to 8-bit sRGB first")
