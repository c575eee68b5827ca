"""The bitstream format does not drift: bytes written by earlier code still decode, anywhere.

Round-trip tests cannot see a change that encoder and decoder make together; these can:

* the entropy coder's output for fixed integer parameters is pinned (integer arithmetic and
  constriction: the same on every machine);
* tests/data/golden-v7-<model>.m2t (the format written now), golden-v5-<model>.m2t (m2t
  0.6-0.7) and golden-v4-<model>.m2t (m2t 0.4-0.5) were written by every shipped model,
  coding the latent of a synthetic image (golden-<model>.latent.npy). On ANY machine each
  stream must decode to exactly that latent and its decoded pixels must hash to the committed
  SHA-256 (golden.json), at 1, 2 and 4 threads, alone, in a batch and in tiles, on the int8
  units and off them: the integer synthesis transform of the stream's version (integer-v1 for
  4, integer-v2 from 5) makes pixels a pure function of the stream, and the entropy model of
  its version (8-bit weights for 7) its latent. Coding the latent must give exactly the bytes
  of the current version, and of versions 4 and 5 where asked for. (Re-encoding the image is
  not the test: g_a is float, and another machine may round a latent value differently and
  write other, equally valid bytes.)
* when a model's weights are replaced (a retrained release), its golden stream moves to
  golden-v<N>-<model>@<weights hash>.m2t (golden.json "v<N>_replaced") and must still decode,
  through the stream's own header, to the same latent and pixels: the registry finds the
  replaced weights in weights/previous/. Archives written before a release stay readable.
* variable-rate models write format 6 (the quality in the header): their golden streams
  (golden.json "v6", with the quality) are held to the same rules.
* tests/data/golden-v3-*.m2t (m2t 0.3) still decode to their latent.
* tests/data/golden-v1-*.m2t and golden-v2-*.m2t are streams of the retired format versions
  1 and 2 (m2t 0.2.0 and earlier): they are refused with an error that names the release
  that reads them and says to re-encode. Never silently wrong.

Write the files of a new format version from the committed latents (never rewrite an old
version's): python tests/test_golden.py --write. After shipping new weights for a model:
python tests/test_golden.py --write MODEL (keeps the old stream as a replaced one).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from golden_image import golden_image  # noqa: E402
import m2t_core  # noqa: E402
from m2t_core import Decoder, Encoder, load_model  # noqa: E402
from m2t_core import int_synthesis as IS  # noqa: E402
from m2t_core.bitstream import FORMAT_VERSION, UnsupportedVersionError, read_header  # noqa: E402
from m2t_core.entropy_coding import SymbolDecoder, SymbolEncoder, snap_integer  # noqa: E402
from m2t_core.metrics import psnr  # noqa: E402
from m2t_core.registry import PACKAGE_WEIGHTS, load_model_for_header  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = json.loads((DATA / "golden.json").read_text())
CODER_BYTES_SHA256 = GOLDEN["coder_bytes_sha256_v2"]  # the integer tables (since format 2)


def _values(rng, n: int) -> np.ndarray:
    """Mostly small values, some far outside the supports (escapes), the extremes included."""
    values = np.round(rng.normal(0, 4, size=n) * rng.choice([1, 1, 1, 50], size=n)).astype(np.int64)
    values[:5] = [30000, -30000, 1 << 15, -(1 << 15), 0]
    return values


def _coder_bytes() -> tuple[bytes, np.ndarray, object]:
    rng, n = np.random.default_rng(11), 4000
    values = _values(rng, n)
    mean_q = torch.from_numpy(rng.integers(-400, 400, size=(n, 3)))
    level = torch.from_numpy(rng.integers(0, 64, size=(n, 3)))
    logit_q = torch.from_numpy(rng.integers(-40, 40, size=(n, 3)))
    params = snap_integer(mean_q, level, logit_q)
    encoder = SymbolEncoder()
    encoder.encode(values, params)
    return encoder.finish(), values, params


def test_integer_entropy_coder_output_is_pinned():
    data, values, params = _coder_bytes()
    assert hashlib.sha256(data).hexdigest() == CODER_BYTES_SHA256
    np.testing.assert_array_equal(SymbolDecoder(data).decode(params), values)


CURRENT = f"v{FORMAT_VERSION}"
SHIPPED = sorted(GOLDEN.get(CURRENT, {}))  # the fixed-rate models
VARIABLE = sorted(GOLDEN.get("v6", {}))  # the variable-rate models (format 6)
DECODED = [(version, name) for version in ("v4", "v5", CURRENT, "v6") for name in sorted(GOLDEN.get(version, {}))]
RETIRED = [(version, name) for version in ("v1", "v2") for name in sorted(GOLDEN[version])]
REPLACED = [(version, key) for version in ("v4", "v5", CURRENT)  # "<model>@<weights hash>"
            for key in sorted(GOLDEN.get(f"{version}_replaced", {}))]


def _latent(name: str) -> np.ndarray:
    return np.load(DATA / f"golden-{name}.latent.npy", allow_pickle=False)


def test_every_shipped_model_has_golden_streams():
    shipped = sorted(p.stem for p in PACKAGE_WEIGHTS.glob("*.safetensors"))
    assert sorted(SHIPPED + VARIABLE) == shipped and all((DATA / f"golden-{n}.latent.npy").is_file() for n in shipped)


def _pixels_sha256(rgb: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()).hexdigest()


@pytest.mark.parametrize("version,name", DECODED)
def test_golden_stream_decodes_to_its_latent_and_pixels_anywhere(version, name):
    model = load_model(name)
    data = (DATA / f"golden-{version}-{name}.m2t").read_bytes()
    header, y_hat = Decoder(model).decode_latent(data)
    assert header.version == int(version[1:])
    np.testing.assert_array_equal(y_hat.to(torch.int32).numpy(), _latent(name))
    rgb = golden_image()
    decoded = model.decompress(data)
    assert decoded.shape == rgb.shape and psnr(rgb, decoded) > 20.0
    assert _pixels_sha256(decoded) == GOLDEN[version][name]["pixels_sha256"]


def test_the_current_format_is_version_7():
    """Format 5 is format 4's layout decoded by integer-v2 (8-bit weights): other pixels,
    within a few hundredths of a dB, from the same bytes but the version and weights hash.
    Format 7 is format 5's layout coded by the entropy model with 8-bit weights: the same
    latent and pixels from other bytes (within 1 % of their size)."""
    assert FORMAT_VERSION == 7
    for name in SHIPPED:
        v4, v5, v7 = ((DATA / f"golden-{v}-{name}.m2t").read_bytes() for v in ("v4", "v5", "v7"))
        h4, h5, h7 = read_header(v4), read_header(v5), read_header(v7)
        assert (h4.version, h5.version, h7.version) == (4, 5, 7)
        assert len({h4.weights_hash, h5.weights_hash, h7.weights_hash}) == 3
        assert v4[h4.size:] == v5[h5.size:]  # the same payload: the entropy coding did not change
        assert GOLDEN["v4"][name]["pixels_sha256"] != GOLDEN["v5"][name]["pixels_sha256"]
        assert v5[h5.size:] != v7[h7.size:] and abs(len(v7) - len(v5)) <= 0.01 * len(v5)
        assert GOLDEN["v5"][name]["pixels_sha256"] == GOLDEN["v7"][name]["pixels_sha256"]


def test_a_batch_of_formats_decodes_each_with_its_own_arithmetic():
    """decode_latents and decompress_many group streams by format version: each gets its own
    entropy model (16- or 8-bit weights) and integer g_s."""
    model = load_model("m2t-small-q3")
    versions = ("v4", CURRENT, "v5", "v4", CURRENT, "v5")
    streams = [(DATA / f"golden-{v}-m2t-small-q3.m2t").read_bytes() for v in versions]
    latents = Decoder(model, batch_images=6).decode_latents(streams)
    assert all(np.array_equal(y.to(torch.int32).numpy(), _latent("m2t-small-q3")) for _, y in latents)
    want = [GOLDEN[v]["m2t-small-q3"]["pixels_sha256"] for v in versions]
    got = Decoder(model, batch_images=6).decompress_many(streams + [b"not a stream"])
    assert [_pixels_sha256(rgb) for rgb in got[:6]] == want
    assert isinstance(got[6], Exception)


@pytest.mark.parametrize("version,name", [(v, n) for v in ("v4", CURRENT) for n in ("m2t-small-q2", "mt-small-q2")]
                         + [("v6", n) for n in VARIABLE])
def test_golden_pixels_at_any_thread_count_batch_and_tiling(version, name):
    """Pixels are a pure function of the stream: 1, 2 and 4 threads, a batch of streams of
    one size, tiles (a forced small tile plan) and the float32 route instead of the int8
    units all give the committed pixels."""
    from m2t_core import tiling

    model = load_model(name)
    data = (DATA / f"golden-{version}-{name}.m2t").read_bytes()
    want = GOLDEN[version][name]["pixels_sha256"]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            assert _pixels_sha256(model.decompress(data)) == want, f"{n} threads"
    finally:
        torch.set_num_threads(threads)
    for rgb in Decoder(model, batch_images=3).decompress_many([data, data, data]):
        assert _pixels_sha256(rgb) == want, "in a batch"
    margin = tiling._default_plan(model.g_s, "synthesis").margin  # covers g_s's receptive field
    with tiling.forced_plan(tiling.TilePlan(tile=2, margin=margin)):  # a 6x9 latent in 2x2 tiles
        assert _pixels_sha256(model.decompress(data)) == want, "in tiles"
    header, y_hat = Decoder(model).decode_latent(data)
    quality = header.quality  # a variable-rate model's: its g_s starts from the latent scaled back
    gains = None if quality is None else -model._log2_gains(quality)[None]
    pixels = IS.synthesize(model.int_synthesis(header.version), y_hat[None].float(), int8=False,
                           log2_gain=gains)  # the float32 route
    assert _pixels_sha256(model.synthesis(y_hat, header.height, header.width, header.version, quality)) == want
    H, W = header.height, header.width
    assert _pixels_sha256(pixels[0, :, :H, :W].permute(1, 2, 0).numpy()) == want, "on the float32 route"


@pytest.mark.parametrize("name", SHIPPED + VARIABLE)
def test_coding_the_golden_latent_gives_the_golden_bytes(name):
    """The current format's bytes, and with format_version=5 and 4 exactly what m2t 0.6-0.7
    and 0.4-0.5 wrote (for their decoders), with the reconstruction of that format's
    arithmetic; a variable-rate model's format-6 bytes at its golden quality."""
    model = load_model(name)
    latent = torch.from_numpy(_latent(name).astype(np.float32))
    rgb = golden_image()
    if name in VARIABLE:
        quality = GOLDEN["v6"][name]["quality"]
        encoded = Encoder(model, quality=quality).encode_latent(latent, rgb.shape[0], rgb.shape[1])
        assert encoded.bitstream == (DATA / f"golden-v6-{name}.m2t").read_bytes()
        assert read_header(encoded.bitstream).quality == round(quality * 256)
        return
    encoded = Encoder(model).encode_latent(latent, rgb.shape[0], rgb.shape[1])
    assert encoded.bitstream == (DATA / f"golden-{CURRENT}-{name}.m2t").read_bytes()
    for number in (5, 4):
        old = Encoder(model, format_version=number).encode_latent(latent, rgb.shape[0], rgb.shape[1])
        assert old.bitstream == (DATA / f"golden-v{number}-{name}.m2t").read_bytes()
    image = Encoder(model, format_version=4, reconstruct=True).encode_image(rgb)
    assert read_header(image.bitstream).version == 4
    assert np.array_equal(image.x_hat, model.decompress(image.bitstream))


@pytest.mark.parametrize("version,key", REPLACED)
def test_streams_of_replaced_weights_still_decode_to_their_latent_and_pixels(version, key):
    """A stream written before its model's weights were replaced names the old weights: the
    registry finds them in weights/previous/ (never the current file, whose hash differs)."""
    name, weights = key.split("@")
    data = (DATA / f"golden-{version}-{key}.m2t").read_bytes()
    header = read_header(data)
    assert header.model_id == name and header.weights_hash.hex() == weights
    assert load_model(name).weights_hash(header.version).hex() != weights  # the current weights are others
    model = load_model_for_header(header)
    _, y_hat = Decoder(model).decode_latent(data)
    np.testing.assert_array_equal(y_hat.to(torch.int32).numpy(), _latent(name))
    assert _pixels_sha256(m2t_core.decompress(data)) == GOLDEN[f"{version}_replaced"][key]["pixels_sha256"]


@pytest.mark.parametrize("name", sorted(GOLDEN["v3"]))
def test_streams_of_m2t_0_3_still_decode_to_their_latent(name):
    """Format 3 names the model without its integer g_s (weights_hash(3)): same latent, with
    the weights the stream names (the replaced ones where a model was retrained since)."""
    data = (DATA / f"golden-v3-{name}.m2t").read_bytes()
    model = load_model_for_header(read_header(data))
    header, y_hat = Decoder(model).decode_latent(data)
    assert header.version == 3
    np.testing.assert_array_equal(y_hat.to(torch.int32).numpy(), _latent(name))
    assert psnr(golden_image(), model.decompress(data)) > 20.0


@pytest.mark.parametrize("version,name", RETIRED)
def test_retired_format_streams_name_the_release_that_reads_them(version, name):
    """Format 1 (a float entropy model) and format 2 (one range coder, no previews) are no
    longer read: every way in refuses them with the release that reads them, never decodes."""
    data = (DATA / f"golden-{version}-{name}.m2t").read_bytes()
    assert data[4] == int(version[1])
    for decode in (read_header, load_model(name).decompress, m2t_core.decompress):
        with pytest.raises(UnsupportedVersionError) as info:
            decode(data)
        assert "m2t 0.2.0" in str(info.value) and "re-encode" in str(info.value), str(info.value)


def write_golden(names: list[str]) -> None:  # pragma: no cover - run by hand
    """Streams of the current format for `names` (all shipped models when empty: a new format
    version). A model's stream written by other weights is kept as a replaced one."""
    rgb = golden_image()
    manifest = dict(GOLDEN)
    if not names:
        manifest[f"v{FORMAT_VERSION}"] = {}
    for name in names or sorted(p.stem for p in PACKAGE_WEIGHTS.glob("*.safetensors")):
        model = load_model(name)
        latent_path = DATA / f"golden-{name}.latent.npy"
        if not latent_path.is_file():  # a new model: its latent of the golden image (at its default quality)
            np.save(latent_path, model.analysis(rgb, model.quality_code()).to(torch.int32).numpy())
        latent = torch.from_numpy(_latent(name).astype(np.float32))
        # The version it writes (6 for a variable-rate model), and formats 5 and 4 where the model
        # has streams of them (what m2t 0.6-0.7 and 0.4-0.5 wrote: test_coding_the_golden_latent...
        # codes them too).
        versions = [model.write_version()] + [n for n in (5, 4) if names and name in manifest.get(f"v{n}", {})]
        for number in versions:
            version = f"v{number}"
            manifest.setdefault(version, {})
            replaced = manifest.setdefault(f"{version}_replaced", {})
            path = DATA / f"golden-{version}-{name}.m2t"
            if names and path.is_file():
                old = read_header(path.read_bytes()).weights_hash.hex()
                if old == model.weights_hash(number).hex():
                    raise SystemExit(f"{name}: its golden stream already names the installed weights")
                path.rename(DATA / f"golden-{version}-{name}@{old}.m2t")
                replaced[f"{name}@{old}"] = manifest[version][name]
            enc = Encoder(model, format_version=number).encode_latent(latent, rgb.shape[0], rgb.shape[1])
            path.write_bytes(enc.bitstream)
            manifest[version][name] = {"bytes": len(enc.bitstream), "bpp": round(enc.bpp, 4),
                                       "pixels_sha256": _pixels_sha256(model.decompress(enc.bitstream))}
            if model.rate_levels:
                manifest[version][name]["quality"] = model.default_quality
            print(name, version, json.dumps(manifest[version][name]))
    (DATA / "golden.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write_golden(sys.argv[2:])
    else:
        raise SystemExit("usage: python tests/test_golden.py --write [MODEL ...]")
