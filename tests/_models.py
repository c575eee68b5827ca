"""Small random-init models and test images shared by the codec tests.

Every model is built from a fixed torch seed and put in eval mode, so two calls with the
same arguments give bit-identical weights (and the same weights hash).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

from m2t_core import M2TCodec, ModelConfig

# A tiny model: 8x8-token windows (128x128 pixels), 12 coding steps. Cheap enough for a
# 4000x3000 image on a 2-core CPU.
TINY = dict(N=16, C=16, blocks_per_stage=1, window=8, d_model=64, n_layers=2, n_heads=2,
            d_mlp=128, num_steps=12)


def tiny_config(mode: str = "m2t", **changes) -> ModelConfig:
    return ModelConfig(mode=mode, **{**TINY, **changes})


def small_config(mode: str = "m2t", **changes) -> ModelConfig:
    """The shipped `m2t-small` preset (ModelConfig defaults), for the heavier tests."""
    return ModelConfig(mode=mode, **changes)


def build_model(cfg: ModelConfig, seed: int = 0, model_id: str = "untrained",
                init_scale: float | None = None) -> M2TCodec:
    """A random-init codec in eval mode. Same (cfg, seed) -> bit-identical weights.

    `init_scale` (default 8) multiplies g_a's last stride-2 conv so the latent is not all
    zeros after rounding (a random-init g_a gives |y| << 1, which would leave the entropy
    coder nothing to do); x8 gives |y_hat| ~ 1 on average, 70-80% non-zero, up to ~10.
    """
    torch.manual_seed(seed)
    model = M2TCodec(cfg, model_id=model_id)
    scale = 8.0 if init_scale is None else init_scale
    with torch.no_grad():
        # g_a's last stride-2 conv (N -> C); the attention block after it keeps the scale.
        last = [m for m in model.g_a.layers if isinstance(m, torch.nn.Conv2d)][-1]
        assert last.out_channels == cfg.C and last.stride == (2, 2)
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return model.eval()


@functools.lru_cache(maxsize=None)
def tiny_model(mode: str = "m2t", seed: int = 0) -> M2TCodec:
    """Cached per process: tests must not modify it (copy it first)."""
    return build_model(tiny_config(mode), seed)


@functools.lru_cache(maxsize=None)
def small_model(mode: str = "m2t", seed: int = 0) -> M2TCodec:
    return build_model(small_config(mode), seed)


def random_image(height: int, width: int, seed: int = 0, smooth: bool = True) -> np.ndarray:
    """An RGB uint8 image: a smooth gradient pattern plus noise (natural-ish statistics)."""
    rng = np.random.default_rng(seed)
    if not smooth:
        return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    freq = rng.uniform(0.01, 0.08, size=(3, 2))
    chans = [127.5 + 90 * np.sin(freq[c, 0] * yy + freq[c, 1] * xx + phase[c]) for c in range(3)]
    img = np.stack(chans, axis=-1) + rng.normal(0, 12, size=(height, width, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with `n` torch threads, restoring the caller's count afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
