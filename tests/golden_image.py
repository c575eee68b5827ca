"""The synthetic test image behind tests/data/golden-*.m2t (no data files needed)."""

import numpy as np


def golden_image(height: int = 96, width: int = 144) -> np.ndarray:
    """Smooth colour gradients, a few edges and fixed-seed noise: RGB uint8 (H, W, 3)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 128 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)
    g = 255 * x / width
    b = np.where((x // 24 + y // 24) % 2 == 0, 200.0, 60.0)
    noise = np.random.default_rng(1234).normal(0.0, 6.0, size=(height, width, 3))
    rgb = np.stack([r, g, b], axis=-1) + noise
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
