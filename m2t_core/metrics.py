"""Image quality metrics, as the field reports them (RGB, 8-bit, per image)."""

from __future__ import annotations

import math

import numpy as np


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error over all pixels and channels of two uint8 images (0..255 scale)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(d * d))


def psnr_from_mse(value: float) -> float:
    return math.inf if value == 0 else 10.0 * math.log10(255.0**2 / value)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 RGB images (inf if identical)."""
    return psnr_from_mse(mse(a, b))


def bits_per_pixel(num_bytes: int, height: int, width: int) -> float:
    """bpp = 8 * bytes of the whole bitstream (header included) / pixels of the original."""
    return 8.0 * num_bytes / (height * width)
