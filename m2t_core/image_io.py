"""Image conversion rules: everything becomes RGB uint8 (H, W, 3), explicitly.

* grayscale (L, I;16, I, F, 1-bit): replicated to three channels; 16/32-bit values scaled to 8 bit
* alpha (RGBA, LA, PA): the alpha channel is dropped; colour values are kept as stored
* palette (P): expanded through the palette
* CMYK, YCbCr, LAB, HSV: converted by Pillow to RGB
* EXIF orientation is applied by `load_image` (the pixels are rotated as a viewer shows them)
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps

ImageLike = Union[np.ndarray, Image.Image]


class ImageError(ValueError):
    """The input cannot be read or converted to an RGB image."""


def to_rgb_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise ImageError(f"expected a numpy array or PIL image, got {type(image).__name__}")


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8:
        raise ImageError(f"expected a uint8 array, got dtype {a.dtype} (scale to 0..255 first)")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ImageError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, got {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ImageError(f"empty image of shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        pass
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16)
        return _array_to_rgb((arr >> 8).astype(np.uint8))
    elif mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return _array_to_rgb(np.clip(np.round(arr * 255.0 / hi), 0, 255).astype(np.uint8))
    elif mode in ("RGBA", "RGBa", "RGBX", "LA", "La", "PA"):
        img = img.convert("RGBA" if mode.startswith(("RGB", "P")) else "LA")
        arr = np.asarray(img)
        return _array_to_rgb(arr[:, :, :-1] if arr.shape[2] == 2 else arr[:, :, :3])
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        return _array_to_rgb(np.asarray(img)[:, :, :3])
    else:  # L, 1, CMYK, YCbCr, LAB, HSV, ...
        img = img.convert("RGB")
    return _array_to_rgb(np.asarray(img))


MAX_SIDE = 65535  # the codec's per-side limit (m2t_core.bitstream.MAX_SIDE)


def load_image(source: Union[str, Path, bytes, BinaryIO], max_pixels: int | None = None,
               notes: list[str] | None = None) -> np.ndarray:
    """Decode an image file (path, bytes or file object) to RGB uint8, applying EXIF orientation.

    With `max_pixels`, images declaring more pixels (or a side over 65535) are refused before
    their pixels are decoded. A multi-frame file (animated GIF, multi-page TIFF, ...) gives its
    first frame; with `notes` (a list), a line saying so is appended to it.
    """
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise ImageError("empty file (0 bytes)")
            source = io.BytesIO(source)
        elif isinstance(source, (str, Path)) and Path(source).is_file() and Path(source).stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
        with Image.open(source) as img:
            w, h = img.size
            if max_pixels is not None and (w > MAX_SIDE or h > MAX_SIDE):
                raise ImageError(f"image of {w}x{h} pixels exceeds the limit of {MAX_SIDE} pixels per side")
            if max_pixels is not None and w * h > max_pixels:
                raise ImageError(f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels")
            frames = getattr(img, "n_frames", 1)
            if notes is not None and isinstance(frames, int) and frames > 1:
                notes.append(f"{img.format or 'multi-frame'} file with {frames} frames: only frame 0 was coded")
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb_array(img)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("not an image format Pillow can read") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from None


def save_image(rgb: np.ndarray, dest: Union[str, Path, BinaryIO], format: str | None = None) -> None:
    Image.fromarray(np.asarray(rgb, dtype=np.uint8), mode="RGB").save(dest, format=format)
