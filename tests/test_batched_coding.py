"""Staged, batched coding: the encoder's device stage (`Encoder.plan`, g_a/g_s on batches)
apart from its coding stage (`code_plan`), batched decoding (`Decoder.decode_latents`,
`decompress_many`), and the frozen CPU transforms. The law: the exact entropy model's
integers do not depend on what else is in a batch, so the bytes written for a latent, and
the latent decoded from them, are the same whatever the batch; only float g_a/g_s may
round differently, and any stream decodes exactly anywhere.

Random-init tiny models (no weights needed)."""

from __future__ import annotations

import copy
import dataclasses
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from m2t_core import Decoder, Encoder, bitstream as bs, code_plan
from m2t_core import model as model_module
from m2t_core.transforms import BF16_ANALYSIS_ENV

from _models import random_image, tiny_model

# Sizes: one window, padding in both directions, and an image of 99 windows (two chunks of
# CHUNK_WINDOWS: the tiny model's windows are 8x8 latents = 128x128 pixels).
SIZES = [(64, 96), (200, 300), (1100, 1300)]


def _images(seed: int = 0) -> list[np.ndarray]:
    return [random_image(h, w, seed=seed + i) for i, (h, w) in enumerate(SIZES + [(200, 300)])]


@pytest.fixture(scope="module", params=["m2t", "mt"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def encoded(model):
    """One image at a time, as encode_image writes them (the reference)."""
    encoder = Encoder(model)
    return [encoder.encode_image(rgb) for rgb in _images()]


def _corrupt_payload(data: bytes) -> bytes:
    """A stream that passes every header check (both CRCs rewritten) but decodes wrong."""
    header, payload = bs.unpack(data)
    bad = bytearray(payload)
    bad[len(bad) // 2] ^= 0x5A
    return bs.pack(dataclasses.replace(header, payload_crc=zlib.crc32(bytes(bad))), bytes(bad))


@torch.inference_mode()
def test_plans_and_bytes_do_not_depend_on_the_batch(model, encoded):
    latents = [(e.y_hat.float(), e.height, e.width) for e in encoded]
    for windows_per_pass in (1, 3, 64, 1000):  # one chunk per pass ... every image in one pass
        plans = Encoder(model, windows_per_pass=windows_per_pass).plan(latents)
        assert [code_plan(p).bitstream for p in plans] == [e.bitstream for e in encoded], windows_per_pass
    # Coding on threads, in any order, writes the same bytes: a plan needs no model.
    with ThreadPoolExecutor(3) as pool:
        coded = list(pool.map(code_plan, reversed(plans)))[::-1]
    assert [c.bitstream for c in coded] == [e.bitstream for e in encoded]
    # A stream of images with the device's default batch (one image per g_a call on a CPU)
    # and coding threads is encode_image, image for image.
    streamed = Encoder(model, coding_threads=2).encode(_images())
    assert [e.bitstream for e in streamed] == [e.bitstream for e in encoded]


@torch.inference_mode()
def test_adaptive_order_plans_do_not_depend_on_the_batch():
    model = tiny_model("mt")
    images = _images(seed=7)[:3]
    ref = [Encoder(model, adaptive_order=True).encode_image(rgb).bitstream for rgb in images]
    batched = Encoder(model, adaptive_order=True, batch_images=3, windows_per_pass=1000).encode(images)
    assert [e.bitstream for e in batched] == ref
    for got, data in zip(Decoder(model, windows_per_pass=3).decode_latents(ref), ref):
        assert torch.equal(got[1], Decoder(model).decode_latent(data)[1])


@torch.inference_mode()
def test_batched_decoding_gives_each_streams_latent(model, encoded):
    streams = [e.bitstream for e in encoded]
    for windows_per_pass in (1, 3, 64, 1000):
        got = Decoder(model, windows_per_pass=windows_per_pass).decode_latents(streams + streams[:1])
        for (header, y_hat), e in zip(got, encoded + encoded[:1]):
            assert (header.height, header.width) == (e.height, e.width)
            assert torch.equal(y_hat.to(torch.int32), e.y_hat.to(torch.int32))
    # decompress_many with g_s one image at a time is decompress, pixel for pixel.
    for image, data in zip(Decoder(model, batch_images=1).decompress_many(streams), streams):
        assert np.array_equal(image, model.decompress(data))


@torch.inference_mode()
def test_a_bad_stream_fails_alone(model, encoded):
    good = [e.bitstream for e in encoded]
    streams = [good[0], good[1][:-7], b"junk" * 20, _corrupt_payload(good[3]), good[2]]
    for windows_per_pass in (3, 1000):  # the corrupt stream shares passes with good ones
        got = Decoder(model, windows_per_pass=windows_per_pass).decode_latents(streams)
        assert isinstance(got[1], bs.BitstreamError) and isinstance(got[2], bs.BitstreamError)
        assert isinstance(got[3], (bs.BitstreamError, bs.ChecksumMismatchError))
        assert torch.equal(got[0][1], encoded[0].y_hat.float())
        assert torch.equal(got[4][1], encoded[2].y_hat.float())
    images = Decoder(model).decompress_many(streams)
    assert [isinstance(x, Exception) for x in images] == [False, True, True, True, False]
    assert np.array_equal(images[4], model.decompress(good[2]))


@torch.inference_mode()
def test_batched_g_a_streams_decode_exactly():
    """A batch of 4 in g_a may round a few latents differently from one image alone; whatever
    it gives is coded and decoded exactly."""
    model = tiny_model("m2t")
    images = [random_image(200, 300, seed=20 + i) for i in range(5)]
    batched = list(Encoder(model, batch_images=4).encode(images))
    for e, (header, y_hat) in zip(batched, Decoder(model).decode_latents([e.bitstream for e in batched])):
        assert torch.equal(y_hat, e.y_hat.float())
    pixels = Decoder(model, batch_images=4).decompress_many([e.bitstream for e in batched])
    for e, rgb in zip(batched, pixels):  # batched g_s: the same function, up to float rounding
        assert np.abs(rgb.astype(int) - model.decompress(e.bitstream).astype(int)).max() <= 2


def test_frozen_transforms_are_the_modules_and_follow_their_weights(monkeypatch):
    monkeypatch.setattr(model_module, "CPU_TRANSFORMS", "frozen")  # the default, even under M2T_EAGER_TRANSFORMS=1
    monkeypatch.setenv(BF16_ANALYSIS_ENV, "0")  # float32 here, on every CPU; bf16: the next test
    with torch.inference_mode():  # a model made under inference mode holds inference tensors: works too
        frozen_copy = copy.deepcopy(tiny_model("m2t"))
        data = Encoder(frozen_copy).encode_image(random_image(64, 96)).bitstream
        assert np.array_equal(frozen_copy.decompress(data), tiny_model("m2t").decompress(data))
    model = copy.deepcopy(tiny_model("m2t"))
    with torch.inference_mode():
        _check_frozen_transforms(model)


def _check_frozen_transforms(model):
    # g_a runs frozen; the pixels come from the integer g_s, whatever the transforms run as.
    assert model._inference_transform("g_s") is None
    assert model.transforms_implementation() == "frozen"
    assert model.numerics() == {"synthesis": "integer-v2"} and model.numerics(4) == {"synthesis": "integer-v1"}
    for h, w in SIZES[:2] + [(48, 400)]:  # one traced graph serves every size
        x = torch.from_numpy(random_image(h + (-h) % 16, w + (-w) % 16, seed=h)).permute(2, 0, 1)[None].float() / 255
        y_ref = model.g_a(x)
        y = model._inference_transform("g_a")(x)
        assert y.shape == y_ref.shape and torch.allclose(y, y_ref, rtol=1e-4, atol=1e-3 * y_ref.abs().max().item())
    # Weights changed in place (as training or loading a checkpoint does): rebuilt, not stale.
    x = torch.rand(1, 3, 64, 64)
    before = model._inference_transform("g_a")(x)
    with torch.inference_mode(False), torch.no_grad():
        model.g_a.layers[0].weight.mul_(1.5)  # a normal tensor: its version counter moves
    after = model._inference_transform("g_a")(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, model.g_a(x), rtol=1e-4, atol=1e-4 * after.abs().max().item())


def test_bf16_analysis_is_g_a_within_bf16_rounding_and_follows_the_setting(monkeypatch):
    """The frozen g_a in bf16 (the default where the CPU has AMX-BF16; forced here,
    emulated where not): g_a's output within bf16's rounding at several sizes, float32 out; a
    change of the setting or of the weights builds it again; the latents it gives code and
    decode exactly like any other."""
    monkeypatch.setattr(model_module, "CPU_TRANSFORMS", "frozen")
    monkeypatch.setenv(BF16_ANALYSIS_ENV, "1")
    model = copy.deepcopy(tiny_model("m2t"))
    with torch.inference_mode():
        run = model._inference_transform("g_a")
        for h, w in SIZES[:2] + [(48, 400)]:
            x = torch.from_numpy(random_image(h + (-h) % 16, w + (-w) % 16, seed=h)).permute(2, 0, 1)[None].float() / 255
            y_ref, y = model.g_a(x), run(x)
            assert y.dtype == torch.float32 and y.shape == y_ref.shape
            assert (y - y_ref).abs().max() <= 0.05 * y_ref.abs().max(), (h, w)
        assert model._inference_transform("g_a") is run  # kept while nothing changes
        monkeypatch.setenv(BF16_ANALYSIS_ENV, "0")
        fp32 = model._inference_transform("g_a")
        assert fp32 is not run and torch.allclose(fp32(x), y_ref, rtol=1e-4, atol=1e-3 * y_ref.abs().max().item())
        monkeypatch.setenv(BF16_ANALYSIS_ENV, "1")
        image = random_image(64, 96, seed=5)
        stream = Encoder(model).encode_image(image).bitstream
        assert np.array_equal(model.decompress(stream), tiny_model("m2t").decompress(stream))

