"""The codec end to end: round trips in both modes, input conversion, forward(), and the
consistency of M2T's teacher-forced pass with its cached incremental decoding."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (must be set before torch is imported; a
# value set by the user wins). On a shared 2-core machine a spinning 2-thread torch runs
# the codec's many small ops up to ~30x slower; how work is split between threads, and so
# every number computed, is unchanged (checked: identical bitstreams either way).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import time

import numpy as np
import pytest
import torch
from PIL import Image

import m2t_core
import m2t_core.encoder as encoder_mod
from m2t_core import Decoder, Encoder, ImageError, ImageTooLargeError, M2TCodec, bitstream as bs, entropy_coding as ec
from m2t_core import network as N
from m2t_core.image_io import to_rgb_array

from _models import random_image, small_model, tiny_model

MODES = ["m2t", "mt"]


def assert_roundtrip(model: M2TCodec, image, expect_rgb: np.ndarray | None = None):
    """compress -> decompress equals the encoder-side reconstruction, exactly."""
    rgb = to_rgb_array(image) if expect_rgb is None else expect_rgb
    H, W = rgb.shape[:2]
    enc = Encoder(model, reconstruct=True).encode_image(image)
    assert (enc.height, enc.width) == (H, W)
    assert enc.y_hat.dtype == torch.int32 and enc.y_hat.shape == (model.cfg.C, -(-H // 16), -(-W // 16))
    header, y_dec = Decoder(model).decode_latent(enc.bitstream)
    assert (header.height, header.width) == (H, W)
    assert torch.equal(y_dec.to(torch.int32), enc.y_hat), "decoded latent differs from the encoder's"
    out = model.decompress(enc.bitstream)
    assert out.dtype == np.uint8 and out.shape == (H, W, 3)
    rec = enc.x_hat
    assert rec.dtype == np.uint8 and rec.shape == (H, W, 3)
    if not np.array_equal(out, rec):
        diff = np.abs(out.astype(int) - rec.astype(int))
        raise AssertionError(
            f"decompress() differs from the encoder's reconstruction for {H}x{W} ({model.cfg.mode}): "
            f"{(diff > 0).sum()} values differ, max by {diff.max()}")
    # The encoder's latent is the rounded analysis transform of the image.
    with torch.inference_mode():
        y = model.analysis(rgb)
    assert torch.equal(y.to(torch.int32), enc.y_hat)
    return enc, out


# ----------------------------------------------------------------------------- round trips

SIZES = [(1, 1), (7, 13), (16, 16), (33, 17), (61, 23), (127, 129), (130, 257)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_roundtrip_tiny(mode, size):
    model = tiny_model(mode)
    img = random_image(*size, seed=size[0] * 1000 + size[1])
    enc, _ = assert_roundtrip(model, img)
    assert model.compress(img) == [enc.bitstream]  # deterministic
    assert enc.bpp == pytest.approx(8 * len(enc.bitstream) / (size[0] * size[1]))


@pytest.mark.parametrize("mode,size", [("m2t", (256, 256)), ("m2t", (300, 41)), ("mt", (256, 256)),
                                       ("mt", (37, 300))], ids=lambda v: v if isinstance(v, str) else f"{v[0]}x{v[1]}")
def test_roundtrip_small_preset(mode, size):
    """The shipped m2t-small architecture (random init): 16x16-token windows, C = 128.
    256x256 is exactly one window (the decoder's latent then comes out of from_windows as a
    view with channels-last strides)."""
    assert_roundtrip(small_model(mode), random_image(*size, seed=size[0] + size[1]))


@pytest.mark.parametrize("mode", MODES)
def test_roundtrip_4000x3000(mode):
    model = tiny_model(mode)
    img = random_image(3000, 4000, seed=42)
    t0 = time.perf_counter()
    enc = Encoder(model, reconstruct=True).encode_image(img)
    t1 = time.perf_counter()
    out = model.decompress(enc.bitstream)
    t2 = time.perf_counter()
    assert out.shape == (3000, 4000, 3)
    assert np.array_equal(out, enc.x_hat)
    print(f"4000x3000 {mode}: encode {t1 - t0:.1f}s, decode {t2 - t1:.1f}s, {enc.bpp:.3f} bpp")


def test_compress_batch_forms_and_top_level_api():
    model = tiny_model("m2t")
    imgs = [random_image(20, 30, seed=i) for i in range(3)]
    streams = model.compress(imgs)
    assert len(streams) == 3 and all(isinstance(s, bytes) for s in streams)
    assert model.compress(np.stack(imgs)) == streams  # (B, H, W, 3) array
    assert model.compress(tuple(imgs)) == streams
    assert m2t_core.compress(imgs, model=model) == streams
    for img, s in zip(imgs, streams):
        assert np.array_equal(m2t_core.decompress(s, model=model), model.decompress(s))


def test_codec_refuses_training_mode():
    model = tiny_model("m2t")
    stream = model.compress(random_image(8, 8))[0]
    model.train()
    try:
        with pytest.raises(RuntimeError):
            model.compress(random_image(8, 8))
        with pytest.raises(RuntimeError):
            model.decompress(stream)
    finally:
        model.eval()


def test_encode_refuses_too_large():
    model = tiny_model("m2t")
    with pytest.raises(ImageTooLargeError):
        Encoder(model, max_pixels=1000).encode_image(random_image(40, 40))
    with pytest.raises(ImageTooLargeError):
        model.compress(random_image(40, 40), max_pixels=1000)


def test_encoder_streams_results_in_order_with_errors_in_place():
    """encode_tagged keeps input order, passes a reader's exception through in its place, and
    gives an image that cannot be coded its own error; the others are coded as alone."""
    model = tiny_model("m2t")
    imgs = [random_image(20, 30, seed=i) for i in range(4)]
    alone = [Encoder(model).encode_image(img).bitstream for img in imgs]
    unreadable = OSError("cannot read")
    items = [("a", imgs[0]), ("b", unreadable), ("c", random_image(50, 50)), ("d", imgs[1]), ("e", imgs[2])]
    for batch, threads in [(1, 0), (3, 2)]:
        encoder = Encoder(model, batch_images=batch, coding_threads=threads, max_pixels=2000)
        got = list(encoder.encode_tagged(items))
        assert [tag for tag, _ in got] == ["a", "b", "c", "d", "e"]
        assert got[1][1] is unreadable and isinstance(got[2][1], ImageTooLargeError)
        assert [got[i][1].bitstream for i in (0, 3, 4)] == [alone[0], alone[1], alone[2]]
        assert encoder.device_seconds > 0


# ----------------------------------------------------------------------------- input conversion


def _pil_cases(rng):
    H, W = 21, 34
    gray = rng.integers(0, 256, (H, W), dtype=np.uint8)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (H, W, 1), dtype=np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=2)
    palette = rng.integers(0, 256, 768, dtype=np.uint8)
    idx = rng.integers(0, 256, (H, W), dtype=np.uint8)
    p_img = Image.frombytes("P", (W, H), idx.tobytes())
    p_img.putpalette(palette.tolist())
    p_expect = palette.reshape(256, 3)[idx]
    g16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    i16 = Image.frombytes("I;16", (W, H), g16.astype("<u2").tobytes())
    cmyk_arr = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    cmyk = Image.frombytes("CMYK", (W, H), cmyk_arr.tobytes())
    cmyk_expect = np.asarray(cmyk.convert("RGB"))
    return {
        "L": (Image.fromarray(gray, mode="L"), np.repeat(gray[..., None], 3, axis=2)),
        "RGBA": (Image.fromarray(rgba, mode="RGBA"), rgb),
        "P": (p_img, p_expect),
        "I;16": (i16, np.repeat((g16 >> 8).astype(np.uint8)[..., None], 3, axis=2)),
        "CMYK": (cmyk, cmyk_expect),
        "RGB": (Image.fromarray(rgb, mode="RGB"), rgb),
    }


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "RGB"])
def test_pil_modes_convert_and_roundtrip(mode):
    img, expect = _pil_cases(np.random.default_rng(0))[mode]
    assert img.mode == mode
    rgb = to_rgb_array(img)
    assert rgb.dtype == np.uint8 and rgb.shape == expect.shape
    np.testing.assert_array_equal(rgb, expect)
    model = tiny_model("m2t")
    enc, _ = assert_roundtrip(model, img, expect_rgb=expect)
    # Converting first and coding the RGB array gives the very same bitstream.
    assert model.compress(expect) == [enc.bitstream]


def test_array_forms_convert_and_roundtrip():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (19, 27), dtype=np.uint8)
    rgb3 = np.repeat(gray[..., None], 3, axis=2)
    rgba = np.concatenate([rng.integers(0, 256, (19, 27, 3), dtype=np.uint8),
                           rng.integers(0, 256, (19, 27, 1), dtype=np.uint8)], axis=2)
    model = tiny_model("mt")
    for arr, expect in [(gray, rgb3), (gray[..., None], rgb3), (rgba, rgba[..., :3]),
                        (rgba[:, :, :3][:, ::-1], np.ascontiguousarray(rgba[:, ::-1, :3]))]:
        np.testing.assert_array_equal(to_rgb_array(arr), expect)
        enc, _ = assert_roundtrip(model, arr, expect_rgb=expect)
        assert model.compress(expect) == [enc.bitstream]


@pytest.mark.parametrize("bad", [
    np.zeros((8, 8, 3), dtype=np.float32), np.zeros((8, 8, 3), dtype=np.uint16),
    np.zeros((8, 8), dtype=np.int64), np.zeros((8, 8, 3), dtype=bool), np.zeros((8, 8, 3), dtype=np.int8),
    np.zeros((8, 8, 2), dtype=np.uint8), np.zeros((8, 8, 3, 1), dtype=np.uint8), np.zeros((0, 8, 3), dtype=np.uint8),
    np.zeros(8, dtype=np.uint8), [[0, 1], [2, 3]], "image.png",
], ids=["float32", "uint16", "int64", "bool", "int8", "2ch", "5d", "empty", "1d", "list", "str"])
def test_bad_inputs_raise_image_error(bad):
    with pytest.raises(ImageError):
        to_rgb_array(bad)
    with pytest.raises(ImageError):
        Encoder(tiny_model("m2t")).encode_image(bad)


# ----------------------------------------------------------------------------- forward()


@pytest.mark.parametrize("mode", MODES)
def test_forward_shapes_and_ranges(mode):
    model = tiny_model(mode)
    C = model.cfg.C
    x = torch.from_numpy(np.stack([random_image(48, 160, seed=s) for s in range(2)])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        out = model(x)
    assert set(out) >= {"x_hat", "likelihoods", "rate_mask"}
    assert out["x_hat"].shape == (2, 3, 48, 160)
    lik = out["likelihoods"]["y"]
    assert lik.shape == (2, C, 3, 10)
    assert out["rate_mask"].shape == (2, 1, 3, 10) and out["rate_mask"].dtype == torch.bool
    assert torch.isfinite(lik).all() and (lik > 0).all() and (lik <= 1).all()
    if mode == "m2t":
        assert out["rate_mask"].all()
    else:
        assert out["rate_mask"].any()
    # Training mode: noisy rate term, gradients flow into the transforms and the transformer.
    model_t = type(model)(model.cfg)
    model_t.load_state_dict(model.state_dict())
    model_t.train()
    out = model_t(x)
    lik = out["likelihoods"]["y"]
    assert (lik > 0).all() and (lik <= 1).all()
    rate = -(torch.log2(lik) * out["rate_mask"]).sum()
    loss = rate + ((out["x_hat"] - x) ** 2).mean()
    loss.backward()
    assert model_t.g_a.layers[0].weight.grad.abs().sum() > 0
    assert model_t.entropy_model.linears["head"].weight.grad.abs().sum() > 0
    assert model_t.g_s.layers[-1].weight.grad.abs().sum() > 0


def test_forward_rejects_sizes_not_multiple_of_16():
    with pytest.raises(ValueError):
        tiny_model("m2t")(torch.zeros(1, 3, 40, 32))


# ----------------------------------------------------------------------------- M2T consistency


def _models_for_consistency():
    return [("tiny", tiny_model("m2t")), ("small", small_model("m2t"))]


@pytest.mark.parametrize("which", ["tiny", "small"])
def test_m2t_teacher_forcing_matches_incremental_decoding_in_float(which):
    """The one network in float arithmetic (what training runs): the teacher-forced pass and
    step-by-step decoding, with and without the key/value cache, agree up to float rounding.
    (The exact arithmetic, which codes, agrees bit for bit: tests/test_exact.py.)"""
    model = dict(_models_for_consistency())[which]
    ops = N.FloatOps(model.entropy_model, model.cfg, model.layout)
    L, C = model.cfg.tokens_per_window, model.cfg.C
    gen = torch.Generator().manual_seed(0)
    truth = torch.randint(-6, 7, (2, L, C), generator=gen).float()
    names = ("means", "log_scales", "logits")
    worst = {"cached": 0.0, "uncached": 0.0}
    with torch.inference_mode():
        tf = N.m2t_teacher_forced(ops, truth)
        for use_cache in (True, False):
            key = "cached" if use_cache else "uncached"
            state = N.DecodeState()
            tokens = torch.zeros_like(truth)  # only groups already decoded are filled in
            for i, group in enumerate(model.layout.sched.groups):
                params = N.step(ops, tokens, state, use_cache=use_cache)
                idx = torch.tensor(group)
                assert params.means.shape == (2, len(group), C, model.cfg.n_mixtures)
                for name in names:
                    a, b = getattr(params, name), getattr(tf, name)[:, idx]
                    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4,
                                               msg=lambda m: f"{name}, group {i} ({key}): {m}")
                    worst[key] = max(worst[key], float((a - b).abs().max()))
                tokens[:, idx] = truth[:, idx]
            assert state.step == model.cfg.num_steps
    print(f"max |teacher-forced - incremental|: {worst}")


def _header_len(stream: bytes) -> int:
    return len(stream) - bs.read_header(stream).payload_len


class _RecordingEncoder(ec.SymbolEncoder):
    """SymbolEncoder that also sums estimate_bits over everything it codes."""

    estimated = 0.0
    symbols = 0

    def encode(self, values, params):
        values = np.asarray(values, dtype=np.int64)
        type(self).estimated += ec.estimate_bits(values, params)
        type(self).symbols += values.size
        super().encode(values, params)


@pytest.mark.parametrize("which,size", [("tiny", (256, 256)), ("tiny", (384, 512)), ("small", (256, 256))])
def test_m2t_bits_match_model_estimates(which, size, monkeypatch):
    model = dict(_models_for_consistency())[which]
    img = random_image(*size, seed=17)
    monkeypatch.setattr(encoder_mod, "SymbolEncoder", _RecordingEncoder)
    monkeypatch.setattr(_RecordingEncoder, "estimated", 0.0)
    monkeypatch.setattr(_RecordingEncoder, "symbols", 0)
    enc = Encoder(model).encode_image(img)
    payload_bits = 8 * bs.read_header(enc.bitstream).payload_len
    header_bits = 8 * _header_len(enc.bitstream)
    assert _RecordingEncoder.symbols == enc.y_hat.numel()
    _, y_dec = Decoder(model).decode_latent(enc.bitstream)
    assert torch.equal(y_dec.to(torch.int32), enc.y_hat)

    # (1) The exact snapped model: the range coder is within 1% of its ideal code length.
    est = _RecordingEncoder.estimated
    assert abs(payload_bits - est) <= 0.01 * est + 64, (payload_bits, est)

    # (2) The float model of forward() (eval mode: likelihood of round(y), teacher-forced).
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        out = model(x)
    lik = out["likelihoods"]["y"].double()
    assert lik.shape[1:] == enc.y_hat.shape
    fwd_bits = float(-torch.log2(lik).sum())
    total_bits = 8 * len(enc.bitstream)
    print(f"{which} {size}: payload {payload_bits} bits, header {header_bits} bits, "
          f"estimate_bits {est:.0f} ({payload_bits / est - 1:+.2%}), forward {fwd_bits:.0f} "
          f"({payload_bits / fwd_bits - 1:+.2%}), symbols {enc.y_hat.numel()}, "
          f"nonzero {(enc.y_hat != 0).float().mean():.2f}")
    assert abs(total_bits - fwd_bits) <= 0.01 * fwd_bits + header_bits, (total_bits, fwd_bits)


@pytest.mark.parametrize("c_in, c_out, size", [(128, 64, (5, 7)), (64, 3, (9, 13)), (16, 16, (1, 1))])
def test_subpixel_transposed_convolution_matches_native(c_in, c_out, size):
    """g_s's inference path (one convolution + pixel shuffle on CPU) computes the transposed
    convolution; with gradients on, the native operator runs."""
    from m2t_core.transforms import deconv

    torch.manual_seed(0)
    layer = deconv(c_in, c_out)
    x = torch.randn(2, c_in, *size)
    native = torch.nn.functional.conv_transpose2d(x, layer.weight, layer.bias, stride=2, padding=2, output_padding=1)
    with torch.inference_mode():
        fast = layer(x)
    assert fast.shape == native.shape == (2, c_out, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(fast, native, rtol=1e-5, atol=1e-5)
    trained = layer(x.requires_grad_())
    assert trained.requires_grad
    torch.testing.assert_close(trained.detach(), native)
