"""The bitstream format does not drift: bytes written by earlier code still decode, anywhere.

Round-trip tests cannot see a change that encoder and decoder make together; these can:

* the entropy coder's output for fixed integer parameters is pinned (integer arithmetic and
  constriction: the same on every machine), for both formats' tables;
* tests/data/golden-v2-<model>.m2t were written by every shipped model from a synthetic
  image, next to the latent they code (golden-v2-<model>.latent.npy); golden-v3-<model>.m2t
  code the same latents in format version 3 (progressive). On ANY machine each stream must
  decode to exactly that latent, and coding that latent must give exactly those bytes. (Re-encoding the image is not the test: g_a is float, and another machine may round
  a latent value differently and write other, equally valid bytes.)
* tests/data/golden-v1-*.m2t are format-1 streams written before the exact entropy model by
  the same models' float weights (kept as `legacy_entropy_model`): they decode on the kind of
  machine that wrote them and elsewhere fail with a message that says why. Never silently
  wrong.

Write the files of a new format version from the committed latents (never rewrite an old
version's): python tests/test_golden.py --write
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
from m2t_core import load_model  # noqa: E402
from m2t_core.bitstream import BitstreamError, read_header  # noqa: E402
from m2t_core.entropy_coding import SymbolDecoder, SymbolEncoder, snap_integer, snap_params  # noqa: E402
from m2t_core.metrics import psnr  # noqa: E402
from m2t_core.registry import PACKAGE_WEIGHTS  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = json.loads((DATA / "golden.json").read_text())
CODER_BYTES_SHA256 = "0f30c7ac786b8a85f336f3d76083079189c341e3a88f7e6ff65322c2171beb72"  # format 1 tables
CODER_BYTES_SHA256_V2 = GOLDEN.get("coder_bytes_sha256_v2")


def _values(rng, n: int) -> np.ndarray:
    """Mostly small values, some far outside the supports (escapes), the extremes included."""
    values = np.round(rng.normal(0, 4, size=n) * rng.choice([1, 1, 1, 50], size=n)).astype(np.int64)
    values[:5] = [30000, -30000, 1 << 15, -(1 << 15), 0]
    return values


def test_entropy_coder_output_is_pinned():
    rng, n = np.random.default_rng(7), 4000
    means = torch.from_numpy(rng.normal(0, 3, size=(n, 3))).float()
    log_scales = torch.from_numpy(rng.uniform(-2.5, 4.5, size=(n, 3))).float()
    logits = torch.from_numpy(rng.normal(0, 2, size=(n, 3))).float()
    params = snap_params(means, log_scales, logits)
    values = _values(rng, n)
    encoder = SymbolEncoder()
    encoder.encode(values, params)
    data = encoder.finish()
    assert hashlib.sha256(data).hexdigest() == CODER_BYTES_SHA256
    np.testing.assert_array_equal(SymbolDecoder(data).decode(params), values)


def _v2_coder_bytes() -> tuple[bytes, np.ndarray, object]:
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
    data, values, params = _v2_coder_bytes()
    assert hashlib.sha256(data).hexdigest() == CODER_BYTES_SHA256_V2
    np.testing.assert_array_equal(SymbolDecoder(data).decode(params), values)


PORTABLE = [(version, name) for version in ("v2", "v3") for name in sorted(GOLDEN.get(version, {}))]


def _latent(name: str) -> np.ndarray:
    return np.load(DATA / f"golden-v2-{name}.latent.npy", allow_pickle=False)


def test_every_shipped_model_has_golden_streams():
    shipped = sorted(p.stem for p in PACKAGE_WEIGHTS.glob("*.safetensors"))
    assert sorted(GOLDEN["v2"]) == sorted(GOLDEN["v3"]) == shipped


@pytest.mark.parametrize("version,name", PORTABLE)
def test_golden_stream_decodes_to_its_latent_anywhere(version, name):
    model = load_model(name)
    data = (DATA / f"golden-{version}-{name}.m2t").read_bytes()
    header, y_hat = model.decode_latent(data)
    assert header.version == int(version[1]) and header.portable
    np.testing.assert_array_equal(y_hat.to(torch.int32).numpy(), _latent(name))
    rgb = golden_image()
    decoded = model.decompress(data)
    assert decoded.shape == rgb.shape and psnr(rgb, decoded) > 20.0


@pytest.mark.parametrize("version,name", PORTABLE)
def test_coding_the_golden_latent_gives_the_golden_bytes(version, name):
    model = load_model(name)
    latent = torch.from_numpy(_latent(name).astype(np.float32))
    rgb = golden_image()
    encoded = model.encode_latent(latent, rgb.shape[0], rgb.shape[1], format_version=int(version[1]))
    assert encoded.bitstream == (DATA / f"golden-{version}-{name}.m2t").read_bytes()


@pytest.mark.parametrize("name", sorted(GOLDEN["v1"]))
def test_format_1_golden_streams_decode_or_say_why(name):
    """Written on one CPU kind by the float entropy model (before format 2): on that kind
    they decode; on another they may fail, but only with an error that says what to do."""
    model = load_model(name)
    data = (DATA / f"golden-v1-{name}.m2t").read_bytes()
    assert read_header(data).version == 1 and not read_header(data).portable
    try:
        decoded = model.decompress(data)
    except BitstreamError as exc:
        assert "Format version 1" in str(exc) and "re-encode" in str(exc), str(exc)
        return
    rgb = golden_image()
    assert decoded.shape == rgb.shape and psnr(rgb, decoded) > 20.0


def write_golden(version: str = "v3") -> None:  # pragma: no cover - run by hand for a new format version
    rgb = golden_image()
    manifest = dict(GOLDEN)
    manifest[version] = {}
    for path in sorted(PACKAGE_WEIGHTS.glob("*.safetensors")):
        model = load_model(path.stem)
        latent = torch.from_numpy(_latent(path.stem).astype(np.float32))
        enc = model.encode_latent(latent, rgb.shape[0], rgb.shape[1], format_version=int(version[1]))
        (DATA / f"golden-{version}-{path.stem}.m2t").write_bytes(enc.bitstream)
        manifest[version][path.stem] = {"bytes": len(enc.bitstream), "bpp": round(enc.bpp, 4)}
    (DATA / "golden.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest[version], indent=1))


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_golden()
    else:
        raise SystemExit("usage: python tests/test_golden.py --write")
