"""Tiled g_a / g_s (m2t_core/tiling.py): small images are untouched, large ones run in
overlapping tiles whose result matches the untiled transform up to float rounding, and the
codec round-trips bit-exactly with tiling on."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2t_core import Encoder, tiling
from m2t_core import bitstream as bs
from m2t_core.metrics import psnr

from _models import build_model, small_config, tiny_config


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config())  # outside inference mode: encode_image hashes its weights


@contextlib.contextmanager
def deterministic_kernels():
    """One torch thread, as the codec codes (thread counts change float results)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, textured test image (not noise: noise makes every latent huge)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 128 + 60 * np.sin(xx / 23.0)[..., None] * np.cos(yy / 17.0)[..., None] + np.array([0, 20, -20])
    return np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def _untiled_analysis(g_a, rgb: np.ndarray) -> torch.Tensor:
    """The pre-tiling code of M2TCodec.analysis (before rounding)."""
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    pad_b, pad_r = (-rgb.shape[0]) % 16, (-rgb.shape[1]) % 16
    return g_a(F.pad(x, (0, pad_r, 0, pad_b), mode="replicate"))[0]


def _untiled_synthesis(g_s, y: torch.Tensor, height: int, width: int) -> np.ndarray:
    """g_s (the float module, or a function giving uint8 pixels: the integer g_s) run whole."""
    x_hat = g_s(y[None].float().contiguous())[0, :, :height, :width]
    if x_hat.dtype != torch.uint8:
        x_hat = torch.round(x_hat.clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return x_hat.permute(1, 2, 0).numpy()


def _count_calls(module) -> list:
    calls = []
    handle = module.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
    return calls, handle


def test_receptive_field_of_the_small_preset():
    # By hand: g_a (5x5/2 convs, 3 residual blocks per stage, attention after stages 2 and 4):
    # 2 + 3*2 + 2*2 + 3*4 + 3*4 + 2*4 + 3*8 + 2*8 + 3*16 = 132 pixels; g_s: 8.25 latents.
    model = build_model(small_config())
    assert tiling.receptive_radius(model.g_a) == 132
    assert tiling.receptive_radius(model.g_s) == 8.25
    plan = tiling.plan_for(model.g_a, 1 / 16)
    assert plan == tiling.TilePlan(tile=80, margin=10)
    assert plan.max_untiled * 256 > 2_000_000  # images up to 2 MP (e.g. 1920x1080) are never tiled
    # A layer it cannot bound (global attention) disables tiling instead of guessing.
    assert tiling.receptive_radius(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.MultiheadAttention(8, 2))) is None


@torch.inference_mode()
def test_small_images_are_not_tiled_and_unchanged(model):
    rgb = _photo(200, 300)
    with deterministic_kernels():
        g_a = model._inference_transform("g_a") or model.g_a  # what analysis() runs here (frozen on a CPU)
    calls, handle = _count_calls(model.g_a)
    try:
        with deterministic_kernels():
            y_hat = model.analysis(rgb)
            if g_a is model.g_a:
                assert len(calls) == 1  # one whole-image call
            ref = torch.round(_untiled_analysis(g_a, rgb)).clamp(-1024, 1024)
    finally:
        handle.remove()
    assert torch.equal(y_hat, ref)
    out = model.synthesis(y_hat, 200, 300)  # the integer g_s, whole
    assert np.array_equal(out, _untiled_synthesis(model._integer_synthesis(bs.FORMAT_VERSION), y_hat, 200, 300))
    # The float g_s it was exported from is the same function up to its quantisation.
    with deterministic_kernels():
        eager = _untiled_synthesis(model.g_s, y_hat, 200, 300)
    assert np.abs(out.astype(int) - eager.astype(int)).mean() < 1.0


@torch.inference_mode()
def test_tiling_kicks_in_above_the_threshold(model):
    plan = tiling.TilePlan(tile=4, margin=2)  # max_untiled: 8x8 latents = 128x128 pixels
    calls, handle = _count_calls(model.g_a)
    try:
        tiling.analysis(model.g_a, torch.from_numpy(_photo(128, 128)).permute(2, 0, 1)[None], plan)
        assert len(calls) == 1
        calls.clear()
        tiling.analysis(model.g_a, torch.from_numpy(_photo(129, 128)).permute(2, 0, 1)[None], plan)
        # 9x8 latents in 4x4 cores: 3 x 2 tiles, each with up to 2 latents (32 px) of context per side.
        assert len(calls) == 6
        assert max(s[-2] for s in calls) == 112 and max(s[-1] for s in calls) == 96  # core + margins, clipped
        assert all(s[-1] % 16 == 0 and s[-2] % 16 == 0 for s in calls)
    finally:
        handle.remove()


@torch.inference_mode()
def test_tiled_transforms_match_untiled(model):
    margin = tiling.plan_for(model.g_a, 1 / 16).margin  # the receptive field's
    H, W = 300, 420  # not multiples of 16: edge padding inside the last tiles
    rgb = _photo(H, W, seed=1)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    with deterministic_kernels():
        ref = _untiled_analysis(model.g_a, rgb)
        tiled = tiling.analysis(model.g_a, x, tiling.TilePlan(tile=5, margin=margin))
        cut = tiling.analysis(model.g_a, x, tiling.TilePlan(tile=5, margin=1))
    scale = ref.abs().max().item()
    assert tiled.shape == ref.shape
    assert (tiled - ref).abs().max().item() <= 1e-5 * scale  # float rounding only
    assert (cut - ref).abs().max().item() > 1e-2 * scale  # too little context does show: the test can fail

    y_hat = torch.round(ref)
    with deterministic_kernels():
        ref_px = _untiled_synthesis(model.g_s, y_hat, H, W)
        px = tiling.synthesis(model.g_s, y_hat[None], H, W, tiling.TilePlan(tile=3, margin=margin))
    px = px.permute(1, 2, 0).numpy()
    assert px.shape == ref_px.shape == (H, W, 3)
    diff = np.abs(px.astype(int) - ref_px.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # rounding of a last-bit difference at most
    # The integer g_s (what decodes): tiles give exactly the untiled pixels.
    int_ref = _untiled_synthesis(model._integer_synthesis(bs.FORMAT_VERSION), y_hat, H, W)
    int_px = tiling.synthesis(model.g_s, y_hat[None], H, W, tiling.TilePlan(tile=3, margin=margin),
                              run=model._integer_synthesis(bs.FORMAT_VERSION))
    assert np.array_equal(int_px.permute(1, 2, 0).numpy(), int_ref)


def test_codec_round_trip_with_tiling_is_bit_exact(model):
    rgb = _photo(250, 330, seed=2)
    plain = Encoder(model, reconstruct=True).encode_image(rgb)
    with tiling.forced_plan(tiling.TilePlan(tile=6, margin=8)):
        encoded = Encoder(model, reconstruct=True).encode_image(rgb)
        recon = encoded.x_hat
        decoded = model.decompress(encoded.bitstream)
    assert np.array_equal(decoded, recon)  # the decoder runs the same tiles as the encoder
    # The tiled latent is (nearly always) the untiled one; rate and quality are the same.
    assert (encoded.y_hat != plain.y_hat).float().mean().item() < 1e-3
    assert abs(len(encoded.bitstream) - len(plain.bitstream)) <= 0.01 * len(plain.bitstream) + 8
    assert abs(psnr(rgb, decoded) - psnr(rgb, plain.x_hat)) < 0.05
