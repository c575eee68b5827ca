"""The bitstream container: header round trip and every kind of damaged input.

Every damaged stream must raise a subclass of BitstreamError, quickly (< 1 s), and never
return an image that differs from what the encoder meant.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (must be set before torch is imported; a
# value set by the user wins). On a shared 2-core machine a spinning 2-thread torch runs
# the codec's many small ops up to ~30x slower; how work is split between threads, and so
# every number computed, is unchanged (checked: identical bitstreams either way).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import re
import struct
import time
import zlib

import numpy as np
import pytest
import torch

import m2t_core
from m2t_core import bitstream as bs
from m2t_core.bitstream import (BitstreamError, ChecksumMismatchError, Header, ImageTooLargeError,
                                ModelMismatchError, UnsupportedVersionError)
from m2t_core import Decoder, Encoder, M2TCodec, PartialStreamWarning
from m2t_core import coding

from _models import build_model, random_image, tiny_config, tiny_model

TIME_LIMIT = 1.0  # to reject a stream from its header or checksums
DECODE_TIME_LIMIT = 30.0  # a stream that passes them is decoded in full: only a hang guard
FIXED = struct.Struct("<8sIIIII")  # the header fields after the model id, up to num_steps


# ----------------------------------------------------------------------------- helpers


def _layout(data: bytes) -> dict:
    """Byte offsets of the header fields (docs/bitstream.md)."""
    id_len = data[6]
    fixed = 7 + id_len
    # After the fixed fields: num_steps (u8), num_chunks and the step table (varints).
    pos, num_steps = fixed + 29, data[fixed + 28]
    values = []
    while len(values) < 1 + num_steps * (values[0] if values else 1) - 1:
        end = pos
        while data[end] & 0x80:
            end += 1
        values.append(sum((b & 0x7F) << (7 * i) for i, b in enumerate(data[pos:end + 1])))
        pos = end + 1
    return {
        "version": 4, "flags": 5, "id_len": 6, "model_id": 7, "hash": fixed, "height": fixed + 8,
        "width": fixed + 12, "payload_len": fixed + 16, "latent_crc": fixed + 20,
        "payload_crc": fixed + 24, "num_steps": fixed + 28, "table": fixed + 29,
        "piece_crcs": pos, "header_crc": pos + 2 * num_steps * values[0],
        "payload": pos + 2 * num_steps * values[0] + 4,
    }


def _fix_crcs(data: bytes, payload_crc: bool = False) -> bytes:
    """Recompute the header CRC (and optionally the payload CRC) after patching fields."""
    out = bytearray(data)
    lay = _layout(out)
    if payload_crc:
        struct.pack_into("<I", out, lay["payload_crc"], zlib.crc32(bytes(out[lay["payload"]:])))
    struct.pack_into("<I", out, lay["header_crc"], zlib.crc32(bytes(out[:lay["header_crc"]])))
    return bytes(out)


def _patch(data: bytes, field: str, fmt: str, value, fix: bool = True) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, _layout(data)[field], value)
    return _fix_crcs(bytes(out)) if fix else bytes(out)


def _expect_error(decode, data, exc_type=BitstreamError, limit=TIME_LIMIT):
    t0 = time.perf_counter()
    with pytest.raises(exc_type) as info:
        decode(data)
    elapsed = time.perf_counter() - t0
    assert isinstance(info.value, BitstreamError), type(info.value)
    assert elapsed < limit, f"took {elapsed:.2f}s to reject"
    return info.value


@pytest.fixture(scope="module")
def model() -> M2TCodec:
    return tiny_model("m2t")


@pytest.fixture(scope="module")
def encoded(model):
    """A small image coded by the tiny model (2 x 1 windows); decoding is warmed up once."""
    enc = Encoder(model, reconstruct=True).encode_image(random_image(140, 61, seed=8))
    assert np.array_equal(model.decompress(enc.bitstream), enc.x_hat)
    return enc


@pytest.fixture(scope="module")
def stream(encoded) -> bytes:
    return encoded.bitstream


def _header_len(data: bytes) -> int:
    return _layout(data)["payload"]


# ----------------------------------------------------------------------------- header


def test_header_layout_matches_spec(stream, model):
    lay = _layout(stream)
    assert stream[:4] == bs.MAGIC == b"M2TC"
    assert stream[4] == bs.FORMAT_VERSION == 7
    assert stream[7:7 + stream[6]] == model.model_id.encode()
    h = bs.read_header(stream)
    assert h.version == 7 and h.flags == 0
    assert len(h.piece_crcs) == h.num_steps * h.num_chunks and h.piece_crc(0, 0) == h.piece_crcs[0]
    # The step table: S steps x 1 chunk (2 windows), the last piece implied by payload_len.
    assert stream[lay["num_steps"]] == h.num_steps == model.cfg.num_steps and h.num_chunks == 1
    assert stream[lay["table"]] == 1 and _header_len(stream) == h.size
    assert sum(map(sum, h.step_pieces)) == h.payload_len and h.step_ends[-1] == len(stream)
    assert list(h.step_ends) == sorted(h.step_ends) and all(p % 4 == 0 for row in h.step_pieces for p in row)
    assert stream[lay["hash"]:lay["hash"] + 8] == model.weights_hash() == h.weights_hash
    assert FIXED.unpack_from(stream, lay["hash"])[1:] == (
        h.height, h.width, h.payload_len, h.latent_crc, h.payload_crc)
    assert len(stream) == _header_len(stream) + h.payload_len
    assert h.payload_crc == zlib.crc32(stream[_header_len(stream):])
    # The latent CRC covers the image size and the latent shape.
    y = Decoder(model).decode_latent(stream)[1].to(torch.int32)
    assert h.latent_crc == coding.latent_checksum(y, h.height, h.width) != coding.latent_checksum(y, h.height - 1, h.width)


@pytest.mark.parametrize("kw", [
    dict(model_id="m", height=1, width=1, flags=0, step_pieces=((40,),)),
    dict(model_id="m2t-small-q3", height=3000, width=4000, flags=bs.FLAG_CUDA,
         step_pieces=((0, 4, 8), (4, 0, 0), (0, 0, 24))),
    dict(model_id="x" * bs.MAX_MODEL_ID_LEN, height=bs.MAX_SIDE, width=17,
         flags=bs.FLAG_ADAPTIVE_ORDER, step_pieces=tuple((4,) * 5 for _ in range(2))),
])
def test_header_roundtrip(kw):
    payload = bytes(range(40))
    header = Header(weights_hash=b"\x01\x02\x03\x04\x05\x06\x07\x08", payload_len=len(payload),
                    latent_crc=0xDEADBEEF, payload_crc=zlib.crc32(payload),
                    piece_crcs=tuple(range(len(kw["step_pieces"]) * len(kw["step_pieces"][0]))), **kw)
    data = bs.pack(header, payload)
    assert data[:len(header.to_bytes())] == header.to_bytes()
    got, got_payload = bs.unpack(data, max_pixels=bs.MAX_SIDE**2)
    assert got == header and got_payload == payload
    assert bs.read_header(data, max_pixels=bs.MAX_SIDE**2) == header
    assert got.padding == ((-kw["height"]) % 16, (-kw["width"]) % 16)
    # bytearray and memoryview are accepted too.
    assert bs.unpack(bytearray(data), max_pixels=bs.MAX_SIDE**2)[0] == header
    assert bs.unpack(memoryview(data), max_pixels=bs.MAX_SIDE**2)[0] == header


@pytest.mark.parametrize("bad", [dict(model_id=""), dict(model_id="x" * 65), dict(model_id="modèle"),
                                 dict(weights_hash=b"1234567"), dict(version=2), dict(flags=2),
                                 dict(step_pieces=((4,),)), dict(step_pieces=())])
def test_header_to_bytes_validates(bad):
    kw = dict(model_id="m", weights_hash=b"12345678", height=5, width=5, payload_len=0, latent_crc=0,
              payload_crc=0, step_pieces=((0,),))
    kw.update(bad)
    with pytest.raises(ValueError):
        Header(**kw).to_bytes()


def test_pack_checks_payload_length():
    header = Header(model_id="m", weights_hash=b"12345678", height=5, width=5, payload_len=3,
                    latent_crc=0, payload_crc=0, step_pieces=((4,),))
    with pytest.raises(ValueError):
        bs.pack(header, b"abcd")


def test_bytearray_and_memoryview_decode(model, stream, encoded):
    rec = encoded.x_hat
    assert np.array_equal(model.decompress(bytearray(stream)), rec)
    assert np.array_equal(model.decompress(memoryview(stream)), rec)


# ----------------------------------------------------------------------------- damaged streams


def test_empty_and_non_bytes(model):
    for bad in (b"", None, "M2TC", 12345, [1, 2, 3], np.zeros(10, dtype=np.uint8), 3.5):
        _expect_error(model.decompress, bad)
        _expect_error(bs.read_header, bad)
    _expect_error(m2t_core.decompress, b"")  # no model given: fails on the header


def test_truncated(model, stream):
    """A cut inside the header or inside a step is an error. A cut exactly at a step boundary
    is a preview source (format version 3): it decodes, with a PartialStreamWarning, to the
    preview of the steps it holds (tests/test_progressive.py)."""
    hl = _header_len(stream)
    boundaries = set(bs.read_header(stream).step_ends)
    cuts = sorted({0, 1, 3, 4, 5, 6, 7, 9, hl // 2, hl - 5, hl - 4, hl - 1, hl, hl + 1, hl + 4,
                   (hl + len(stream)) // 2, len(stream) - 4, len(stream) - 1} | boundaries - {len(stream)})
    for cut in cuts:
        if cut in boundaries:
            with pytest.warns(PartialStreamWarning):
                assert model.decompress(stream[:cut]).shape == model.decompress(stream).shape
            continue
        _expect_error(model.decompress, stream[:cut])
        _expect_error(m2t_core.decompress, stream[:cut])


def test_truncated_payload_with_consistent_header(model, stream, encoded):
    """A cut payload whose header was rewritten to match (lengths and CRCs fixed up) still
    fails: the latent checksum, not the container, catches it."""
    hl = _header_len(stream)
    n = len(stream) - hl
    for keep in sorted({0, 4, (n // 2) // 4 * 4, n - 8, n - 4, n - 3, n - 1}):
        cut = _patch(stream[:hl + keep], "payload_len", "<I", keep, fix=False)
        cut = _fix_crcs(cut, payload_crc=True)
        try:
            out = model.decompress(cut)
        except BitstreamError:
            continue
        # Only acceptable if what was cut carried no information.
        assert np.array_equal(out, encoded.x_hat), f"silently wrong image (kept {keep}/{n} bytes)"


def test_trailing_garbage(model, stream):
    for extra in (b"\x00", b"\x00" * 4, b"garbage!", stream):
        _expect_error(model.decompress, stream + extra)


def test_wrong_magic(model, stream):
    for magic in (b"M2TD", b"\x00\x00\x00\x00", b"m2tc", b"RIFF"):
        err = _expect_error(model.decompress, magic + stream[4:])
        assert not isinstance(err, UnsupportedVersionError)
    # A PNG file is not a bitstream either.
    _expect_error(model.decompress, b"\x89PNG\r\n\x1a\n" + bytes(64))


def test_a_stream_relabelled_to_another_readable_version_is_refused(model, stream):
    """Versions 4 and 5 share a layout and decode with different integer g_s: the weights
    hash names the one the encoder meant, so a version byte changed (header CRC fixed) is a
    model mismatch, never other pixels (version 3 has no piece checksums: a corrupt header)."""
    _expect_error(model.decompress, _patch(stream, "version", "<B", 4), bs.ModelMismatchError)
    _expect_error(model.decompress, _patch(stream, "version", "<B", 3), bs.BitstreamError)


@pytest.mark.parametrize("version", [0, 1, 2, 8, 255])
def test_unknown_version(model, stream, version):
    """Unknown versions are refused; the retired ones (1, 2) with the release that reads them."""
    bad = _patch(stream, "version", "<B", version)  # header CRC fixed: the version check fires
    assert zlib.crc32(bad[:_layout(bad)["header_crc"]]) == struct.unpack_from("<I", bad, _layout(bad)["header_crc"])[0]
    err = _expect_error(model.decompress, bad, UnsupportedVersionError)
    _expect_error(bs.read_header, bad, UnsupportedVersionError)
    _expect_error(m2t_core.decompress, bad, UnsupportedVersionError)
    retired = "m2t 0.2.0" in str(err) and "re-encode" in str(err)
    assert retired == (version in (1, 2)), str(err)


def test_bit_flips_everywhere(model, stream):
    """Every bit of the header and bits spread over the payload: each flip is rejected."""
    hl = _header_len(stream)
    rng = np.random.default_rng(0)
    payload_positions = sorted(set(rng.choice(np.arange(hl, len(stream)), size=min(60, len(stream) - hl),
                                              replace=False).tolist()) | {hl, len(stream) - 1})
    worst = 0.0
    for pos in list(range(hl)) + payload_positions:
        bits = range(8) if pos < hl else (int(rng.integers(8)),)
        for bit in bits:
            bad = bytearray(stream)
            bad[pos] ^= 1 << bit
            t0 = time.perf_counter()
            with pytest.raises(BitstreamError):
                model.decompress(bytes(bad))
            worst = max(worst, time.perf_counter() - t0)
    assert worst < TIME_LIMIT


def test_payload_corruption_behind_valid_crcs(model, stream, encoded):
    """Flipped payload bits with the payload CRC recomputed (e.g. a bug upstream, or a
    malicious stream): the entropy decoder runs on garbage and the latent checksum or the
    decoder must reject it."""
    hl = _header_len(stream)
    rng = np.random.default_rng(1)
    positions = sorted({hl, hl + 1, hl + 5, (hl + len(stream)) // 2, len(stream) - 1}
                       | set(rng.integers(hl, len(stream), 6).tolist()))
    for pos in positions:
        bad = bytearray(stream)
        bad[pos] ^= 0x10
        bad = _fix_crcs(bytes(bad), payload_crc=True)
        t0 = time.perf_counter()
        try:
            out = model.decompress(bad)
        except BitstreamError:
            assert time.perf_counter() - t0 < DECODE_TIME_LIMIT
            continue
        assert np.array_equal(out, encoded.x_hat), f"silently wrong image (byte {pos})"


def test_consistent_but_wrong_header_fields(model, stream, encoded):
    """Header fields changed with the header CRC fixed up."""
    lay = _layout(stream)
    h = bs.read_header(stream)
    cases = {
        "latent_crc": (_patch(stream, "latent_crc", "<I", h.latent_crc ^ 1), ChecksumMismatchError),
        # The size edited within the same 16-pixel block (same latent): the piece checksums
        # (format 4) cover it, so the first piece fails; the latent CRC would too.
        "height-1": (_patch(stream, "height", "<I", h.height - 1), BitstreamError),
        "height+1": (_patch(stream, "height", "<I", h.height + 1), BitstreamError),
        "width-1": (_patch(stream, "width", "<I", h.width - 1), BitstreamError),
        "width+1": (_patch(stream, "width", "<I", h.width + 1), BitstreamError),
        "flags=2": (_patch(stream, "flags", "<B", 2), BitstreamError),
        "height=0": (_patch(stream, "height", "<I", 0), BitstreamError),
        "width=0": (_patch(stream, "width", "<I", 0), BitstreamError),
        "width>max": (_patch(stream, "width", "<I", bs.MAX_SIDE + 1), BitstreamError),
        "payload_len": (_patch(stream, "payload_len", "<I", h.payload_len + 4), BitstreamError),
        "id_len=0": (stream[:6] + b"\x00" + stream[7:], BitstreamError),
        "id_len-1": (stream[:6] + bytes([stream[6] - 1]) + stream[7:], BitstreamError),
        "id_len=200": (stream[:6] + b"\xc8" + stream[7:], BitstreamError),
        "model_id": (_patch(stream, "model_id", "<B", ord("U")), ModelMismatchError),
        "weights_hash": (_patch(stream, "hash", "<8s", bytes(8)), ModelMismatchError),
        "non-ascii id": (_patch(stream, "model_id", "<B", 0xFF), BitstreamError),
    }
    assert lay["model_id"] == 7 and h.height % 16 not in (0, 1) and h.width % 16 not in (0, 1)
    for name, (bad, exc) in cases.items():
        # A wrong latent CRC is only found after decoding everything.
        limit = DECODE_TIME_LIMIT if name.startswith(("latent_crc", "height", "width")) else TIME_LIMIT
        err = _expect_error(model.decompress, bad, exc, limit)
        assert isinstance(err, exc), name


def test_tiny_stream_cannot_declare_a_huge_image(model, stream, monkeypatch):
    """A few dozen bytes declaring 65535 x 976 (within max_pixels): refused before any model
    work, since the payload cannot hold that many windows (>= 4 bytes each)."""

    def no_decoding(*args, **kwargs):
        raise AssertionError("the decoder ran the model on a stream too short for its size")

    monkeypatch.setattr(coding, "run_steps", no_decoding)
    bad = bytearray(stream)
    struct.pack_into("<II", bad, _layout(stream)["height"], 976, 65535)
    bad = _fix_crcs(bytes(bad))
    err = _expect_error(model.decompress, bad, BitstreamError)
    assert "at least" in str(err) and "payload bytes" in str(err)


def test_huge_declared_size(model, stream, monkeypatch):
    """65535 x 65535 declared: refused from the header alone, nothing allocated."""

    def no_decoding(*args, **kwargs):
        raise AssertionError("the decoder started decoding an image it should have refused")

    monkeypatch.setattr(coding, "run_steps", no_decoding)
    bad = bytearray(stream)
    lay = _layout(stream)
    struct.pack_into("<II", bad, lay["height"], bs.MAX_SIDE, bs.MAX_SIDE)
    bad = _fix_crcs(bytes(bad))
    _expect_error(model.decompress, bad, ImageTooLargeError)
    _expect_error(bs.read_header, bad, ImageTooLargeError)
    _expect_error(m2t_core.decompress, bad, ImageTooLargeError)
    # Large but below MAX_SIDE: refused by the pixel limit, which the caller can lower.
    bad = bytearray(stream)
    struct.pack_into("<II", bad, lay["height"], 10000, 10000)
    _expect_error(model.decompress, _fix_crcs(bytes(bad)), ImageTooLargeError)
    _expect_error(lambda d: model.decompress(d, max_pixels=1000), stream, ImageTooLargeError)


def test_wrong_model(model, stream):
    other = build_model(tiny_config("m2t"), seed=1)  # same config and id, other weights
    assert other.model_id == model.model_id and other.weights_hash() != model.weights_hash()
    _expect_error(other.decompress, stream, ModelMismatchError)
    _expect_error(build_model(tiny_config("mt"), seed=0).decompress, stream, ModelMismatchError)
    renamed = build_model(tiny_config("m2t"), seed=0, model_id="renamed")  # same weights, other id
    assert renamed.weights_hash() == model.weights_hash()
    _expect_error(renamed.decompress, stream, ModelMismatchError)


def test_weights_hash_tracks_weight_changes():
    a = build_model(tiny_config("m2t"), seed=0)
    h0 = a.weights_hash()
    with torch.no_grad():
        a.entropy_model.linears["head"].bias[0] += 1.0
    assert a.weights_hash() != h0
    b = build_model(tiny_config("m2t"), seed=5)
    a.load_state_dict(b.state_dict())
    assert a.weights_hash() == b.weights_hash()


def _fresh_hash(model: M2TCodec) -> bytes:
    twin = M2TCodec(model.cfg, model_id=model.model_id)
    twin.load_state_dict(model.state_dict())
    return twin.weights_hash()


@pytest.mark.parametrize("change", ["data_edit", "half_float_round_trip"])
def test_weights_hash_is_never_stale(change):
    """The header's weights hash is what lets a decoder refuse a stream written by other
    weights; a cached digest must not survive a change of the weights, however it is made
    (`.data` edits as in EMA/init code; a float16 round trip as when simulating an fp16
    checkpoint)."""
    a = build_model(tiny_config("m2t"), seed=0)
    before = a.weights_hash()
    if change == "data_edit":
        a.entropy_model.linears["head"].bias.data[0] += 1.0
    else:
        a.half()
        a.float()
    assert _fresh_hash(a) != before  # the weights did change
    assert a.weights_hash() == _fresh_hash(a), f"stale weights hash after {change}"


def test_a_coding_call_fingerprints_the_weights_once_and_only_for_itself(monkeypatch):
    """Inside weights_fixed() (every Encoder / Decoder entry point) the weights' bit sums are
    taken once per part, however often the call checks them; after the block, or on another
    thread, a change made even through `.data` is seen again."""
    import threading

    from m2t_core import model as M

    a = build_model(tiny_config("m2t"), seed=0)
    stream = Encoder(a).encode_image(random_image(32, 48, seed=1)).bitstream
    counted = []
    bit_sum = M._bit_sum
    monkeypatch.setattr(M, "_bit_sum", lambda t: counted.append(1) or bit_sum(t))
    Decoder(a).decompress(stream)  # derives integer-v2 and its fingerprints once
    counted.clear()
    with a.weights_fixed():
        a.weights_hash()
        once = len(counted)
        for _ in range(3):
            a.sync_exact()
            a.weights_hash()
            Decoder(a).decompress(stream)  # nested blocks share the outer one's fingerprints
        assert len(counted) == once > 0
        seen_elsewhere = []
        worker = threading.Thread(target=lambda: (a.weights_hash(), seen_elsewhere.append(len(counted))))
        worker.start()
        worker.join()
        assert seen_elsewhere[0] > once  # another thread takes its own
    before = a.weights_hash()
    a.g_a.layers[0].bias.data[0] += 1.0  # no version bump
    assert a.weights_hash() != before
    with pytest.raises(bs.ModelMismatchError):
        Decoder(a).decompress(stream)


# ----------------------------------------------------------------------------- decoder numerics


@pytest.mark.parametrize("layer,row", [("head", 0), ("head", 5), ("b0_qkv", 3), ("embed", 1)])
def test_one_unit_integer_mismatch_never_returns_a_wrong_image(layer, row, model, encoded, monkeypatch):
    """A decoder whose integer model differs by one unit in one bias (its hash faked to
    match) either decodes the very same latent or raises: never a wrong image."""
    twin = M2TCodec(model.cfg, model_id=model.model_id)
    twin.load_state_dict(model.state_dict())
    twin.mark_exact_synced()
    twin.eval()
    twin.exact.linears[layer].bias[row] += 1
    true_hash = model.weights_hash()
    monkeypatch.setattr(twin, "weights_hash", lambda version=bs.FORMAT_VERSION: true_hash)
    try:
        out = twin.decompress(encoded.bitstream)
    except BitstreamError:
        return
    _, y = Decoder(twin).decode_latent(encoded.bitstream)
    assert torch.equal(y.to(torch.int32), encoded.y_hat)
    assert np.array_equal(out, encoded.x_hat)


def test_every_piece_a_preview_decodes_is_checked(model, stream):
    """Format 4 checks each piece's decoded symbols: a bit flip in a prefix either fails its
    preview (and the full decode) naming the step, or changes nothing the prefix decodes (a bit
    no decoded value depends on): never a wrong preview, silently. A header that names another
    image size (its CRC recomputed) fails on the preview path too, where no latent CRC exists;
    a damaged later step leaves the preview of the first steps whole."""
    h = bs.read_header(stream)
    first_end = h.step_ends[3]  # a prefix of 4 steps
    assert first_end > h.size
    clean = Decoder(model).preview(stream[:first_end]).image
    caught = 0
    for pos in range(h.size, first_end):  # every byte of the first 4 steps, one bit flip each
        damaged = bytearray(stream)
        damaged[pos] ^= 0x80
        damaged = _fix_crcs(bytes(damaged), payload_crc=True)  # only the piece checksums can tell
        try:
            image = Decoder(model).preview(damaged[:first_end]).image
        except BitstreamError as err:
            assert re.search(r"step [1-4] of", str(err)) and "fails its checksum" in str(err), str(err)
            caught += 1
            err = _expect_error(model.decompress, damaged)  # the full decode fails as early
            assert "fails its checksum" in str(err) or "entropy decoding failed" in str(err), str(err)
            continue
        assert np.array_equal(image, clean), f"byte {pos}: a wrong preview, silently"  # a bit the step never read
    assert caught > 0
    wider = _patch(stream, "width", "<I", h.width + 16)  # one more column of latents: same windows
    err = _expect_error(lambda d: Decoder(model).preview(d, steps=1), wider)
    assert "fails its checksum" in str(err) or "step table" in str(err), str(err)
    late = bytearray(stream)
    late[-1] ^= 0x01
    preview = Decoder(model).preview(bytes(late)[:first_end])
    assert preview.steps == 4 and preview.bytes_read == first_end and np.array_equal(preview.image, clean)
