"""Progressive decoding: a prefix of the stream decodes the first steps.

* The coder level: a range coder's stream, cut where the encoder noted a step's end
  (`num_words()` + STEP_READ_AHEAD_WORDS), decodes exactly the symbols written before it,
  for any symbols and parameters (escapes, empty steps, very skewed distributions).
* The codec: for tiny random-init models (M2T, MT, MT with the adaptive order) and for every
  shipped model, a preview at K = S is the full decode bit for bit, and every K < S decodes
  from exactly the prefix bytes (given more, the same image; given one byte less, one step
  less), with the decoded steps' tokens equal to the true latent.
* The archive: `get_image(..., steps=K)` reads one prefix of the stream, no byte past it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see test_bitstream.py

import dataclasses
import warnings
import zlib

import numpy as np
import pytest
import torch

import m2t_core
from m2t_core import bitstream as bs
from m2t_core import Decoder, Encoder, M2TCodec, PartialStreamWarning
from m2t_core.coding import STEP_READ_AHEAD_WORDS, latent_windows
from m2t_core.entropy_coding import SymbolDecoder, SymbolEncoder, mixture_mean_q, snap_integer
from m2t_core.metrics import psnr as psnr_of
from m2t_core.registry import PACKAGE_WEIGHTS

from _models import random_image, tiny_model


# ----------------------------------------------------------------------------- the coder


def _random_step(rng, n: int):
    kind = rng.integers(0, 3)
    mean_q = torch.from_numpy(rng.integers(-3000, 3000, size=(n, 3)))
    level = torch.from_numpy(rng.integers(0, 64, size=(n, 3)) if kind else rng.integers(0, 4, size=(n, 3)))
    logit_q = torch.from_numpy(rng.integers(-60, 60, size=(n, 3)))
    params = snap_integer(mean_q, level, logit_q)
    centre = np.round(mean_q.numpy().mean(axis=1) / 64).astype(np.int64)
    values = centre + np.round(rng.normal(0, 3 if kind else 0.3, size=n) * rng.choice([1, 1, 1, 40], size=n)).astype(np.int64)
    return np.clip(values, -(1 << 15), 1 << 15), params


@pytest.mark.parametrize("seed", range(40))
def test_a_cut_at_a_noted_step_end_decodes_the_steps_before_it(seed):
    rng = np.random.default_rng(seed)
    steps = [_random_step(rng, int(n)) for n in rng.choice([0, 1, 2, 7, 50, 400], size=int(rng.integers(2, 14)))]
    encoder, marks = SymbolEncoder(), []
    for values, params in steps:
        encoder.encode(values, params)
        marks.append(encoder.num_words())
    words = encoder.finish()
    for k, mark in enumerate(marks):
        cut = min(len(words), 4 * (mark + STEP_READ_AHEAD_WORDS))
        decoder = SymbolDecoder(words[:cut] + bytes(4 * STEP_READ_AHEAD_WORDS))
        for values, params in steps[:k + 1]:
            np.testing.assert_array_equal(decoder.decode(params), values)


# ----------------------------------------------------------------------------- the codec


def _true_steps(model: M2TCodec, y_prefix: torch.Tensor, y_true: torch.Tensor, k: int) -> None:
    """The tokens of steps 1..k of every window equal the true latent (fixed schedule)."""
    ww = model.cfg.window
    got = latent_windows(y_prefix.float(), ww)
    want = latent_windows(y_true.float(), ww)
    positions = [p for group in model.layout.sched.groups[:k] for p in group]
    assert torch.equal(got[:, positions], want[:, positions]), f"step {k}: decoded tokens differ from the latent"


def _check_previews(model: M2TCodec, stream: bytes, full: np.ndarray, y_true: torch.Tensor,
                    fixed_order: bool = True, thorough: bool = True) -> list[np.ndarray]:
    header = bs.read_header(stream)
    S = model.cfg.num_steps
    assert header.num_steps == S and header.step_ends[-1] == len(stream)
    decoder = Decoder(model)
    images = []
    for k in range(S + 1):
        end = header.step_ends[k - 1] if k else header.size
        prefix = stream[:end]
        preview = decoder.preview(prefix, steps=k)
        assert (preview.steps, preview.num_steps, preview.bytes_read, preview.total_bytes) == (k, S, end, len(stream))
        if k == S:
            assert np.array_equal(preview.image, full), "a preview of all S steps must be the full decode"
        elif fixed_order:
            _true_steps(model, preview.y.round(), y_true, k)
        if thorough:
            # More bytes than needed: the same image. One byte less: the step is not there.
            assert np.array_equal(decoder.preview(stream, steps=k).image, preview.image)
            if k:
                short = decoder.preview(stream[:end - 1], steps=k)
                assert short.steps == header.steps_in(end - 1) < k
            # max_bytes picks the complete steps that fit.
            assert np.array_equal(decoder.preview(stream, max_bytes=end).image, preview.image)
        images.append(preview.image)
    return images


@pytest.mark.parametrize("mode,adaptive", [("m2t", False), ("mt", False), ("mt", True)])
def test_tiny_models_preview_from_prefixes(mode, adaptive):
    model = tiny_model(mode)
    img = random_image(150, 200, seed=3)  # 2 x 2 windows: one chunk
    enc = Encoder(model, adaptive_order=adaptive, reconstruct=True).encode_image(img)
    full = model.decompress(enc.bitstream)
    assert np.array_equal(full, enc.x_hat)
    images = _check_previews(model, enc.bitstream, full, enc.y_hat, fixed_order=not adaptive)
    # Previews get better with more steps (on average; noise images gain little, so only the
    # end points are compared).
    err = [np.abs(im.astype(int) - full.astype(int)).mean() for im in images]
    assert err[-1] == 0 and err[0] > 0


def test_previews_of_an_image_of_several_chunks():
    """Over CHUNK_WINDOWS windows the chunks have their own coders; the payload still holds
    every chunk's first steps first."""
    model = tiny_model("m2t")
    img = random_image(8 * 16 * 8 + 5, 8 * 16 * 9, seed=4)  # 9 x 9 = 81 windows: 2 chunks
    enc = Encoder(model).encode_image(img)
    header = bs.read_header(enc.bitstream)
    assert header.num_chunks == 2 and len(header.step_pieces[0]) == 2
    full = model.decompress(enc.bitstream)
    for k in (1, 5, model.cfg.num_steps):
        end = header.step_ends[k - 1]
        preview = Decoder(model).preview(enc.bitstream[:end], steps=k)
        if k == model.cfg.num_steps:
            assert np.array_equal(preview.image, full)
        else:
            _true_steps(model, preview.y.round(), enc.y_hat, k)


def test_a_cut_stream_decodes_as_a_preview_only_at_a_step_boundary():
    model = tiny_model("m2t")
    enc = Encoder(model).encode_image(random_image(100, 120, seed=5))
    header = bs.read_header(enc.bitstream)
    end = header.step_ends[3]
    with pytest.warns(PartialStreamWarning, match="4 of 12"):
        rgb = model.decompress(enc.bitstream[:end])
    assert np.array_equal(rgb, Decoder(model).preview(enc.bitstream, steps=4).image)
    assert np.array_equal(model.decompress(enc.bitstream, steps=4), rgb)
    with pytest.warns(PartialStreamWarning):
        assert np.array_equal(m2t_core.decompress(enc.bitstream[:end], model=model), rgb)
    inside = next(n for n in range(end + 1, len(enc.bitstream)) if n not in header.step_ends)
    with pytest.raises(bs.BitstreamError, match="truncated"):
        model.decompress(enc.bitstream[:inside])
    with pytest.raises(bs.BitstreamError, match="truncated"):
        model.decompress(enc.bitstream[:header.size])  # the header alone holds no step
    # Asked for a preview, any cut gives the complete steps it holds.
    assert Decoder(model).preview(enc.bitstream[:inside], steps=12).steps == header.steps_in(inside)
    # The full stream decodes without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.decompress(enc.bitstream)


def test_previews_need_sane_arguments():
    model = tiny_model("m2t")
    decoder = Decoder(model)
    stream = Encoder(model).encode_image(random_image(40, 50, seed=6)).bitstream
    with pytest.raises(ValueError):
        decoder.preview(stream, steps=-1)
    with pytest.raises(ValueError):
        decoder.preview(stream, max_bytes=-5)
    with pytest.raises(bs.BitstreamError, match="truncated"):
        decoder.preview(stream[:20], steps=3)  # a cut inside the header is never a preview source
    assert decoder.preview(stream, steps=99).steps == model.cfg.num_steps


def test_the_step_table_is_checked():
    model = tiny_model("m2t")
    enc = Encoder(model).encode_image(random_image(40, 50, seed=7))
    header, payload = bs.unpack(enc.bitstream)
    # A table with the wrong number of chunks for the image (the header CRC fixed up).
    bad = dataclasses.replace(header, step_pieces=tuple(row + (0,) for row in header.step_pieces),
                              piece_crcs=header.piece_crcs * 2)
    with pytest.raises(bs.BitstreamError, match="chunks"):
        model.decompress(bs.pack(bad, payload))
    # The adaptive-order flag on an M2T stream.
    bad = dataclasses.replace(header, flags=bs.FLAG_ADAPTIVE_ORDER)
    with pytest.raises(bs.BitstreamError, match="adaptive"):
        model.decompress(bs.pack(bad, payload))
    # A table that adds up to more than the payload; a chunk count far beyond the bytes given.
    data = enc.bitstream
    table = 7 + data[6] + 29  # after the model id, the fixed fields and num_steps
    assert data[table] == 1  # num_chunks
    for value, message in ((b"\x7f", "step table"), (b"\xff\xff\x03", "step table"), (b"\x80\x00", "non-canonical")):
        forged = data[:table] + value + data[table + 1:header.size - 4]
        forged += zlib.crc32(forged).to_bytes(4, "little") + payload
        with pytest.raises(bs.BitstreamError, match=message):
            bs.read_header(forged)


def test_adaptive_order_is_mt_only_and_flagged():
    mt, m2t = tiny_model("mt"), tiny_model("m2t")
    img = random_image(150, 200, seed=8)
    fixed = Encoder(mt).encode_image(img)
    adaptive = Encoder(mt, adaptive_order=True, reconstruct=True).encode_image(img)
    assert torch.equal(fixed.y_hat, adaptive.y_hat) and fixed.bitstream != adaptive.bitstream
    assert bs.read_header(adaptive.bitstream).flags & bs.FLAG_ADAPTIVE_ORDER
    assert not bs.read_header(fixed.bitstream).flags & bs.FLAG_ADAPTIVE_ORDER
    assert np.array_equal(mt.decompress(adaptive.bitstream), adaptive.x_hat)
    with pytest.raises(ValueError, match="MT"):
        Encoder(m2t, adaptive_order=True)


def test_mixture_mean_is_integer_and_weighted():
    mean_q = torch.tensor([[64, 640, -64]], dtype=torch.int64)
    logit_q = torch.tensor([[0, 0, -10_000]], dtype=torch.int64)  # the third has no weight
    assert mixture_mean_q(mean_q, logit_q).item() == 352
    assert mixture_mean_q(torch.tensor([[5, 5, 5]]), torch.tensor([[1, 2, 3]])).item() == 5


# ----------------------------------------------------------------------------- shipped models


@pytest.mark.parametrize("name", sorted(p.stem for p in PACKAGE_WEIGHTS.glob("*.safetensors")))
def test_every_shipped_model_previews_from_prefixes(name):
    from golden_image import golden_image

    model = m2t_core.load_model(name)
    rgb = golden_image()
    enc = Encoder(model).encode_image(rgb)
    full = model.decompress(enc.bitstream)
    images = _check_previews(model, enc.bitstream, full, enc.y_hat, thorough=False)
    psnr = [psnr_of(rgb, im) for im in images]
    assert psnr[-1] > psnr[0] and psnr[-1] >= max(psnr) - 0.5, psnr
