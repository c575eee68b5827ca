"""The shipped checkpoints: they load, are listed, and decode what they encode bit-exactly."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import m2t_core
from m2t_core import list_models, load_image, load_model
from m2t_core.metrics import psnr

KODAK = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "kodak"
SHIPPED = ["m2t-small-q1", "m2t-small-q2", "m2t-small-q3", "m2t-small-q4", "mt-small-q2"]


def _photo() -> np.ndarray:
    if (KODAK / "kodim23.png").is_file():
        return load_image(KODAK / "kodim23.png")
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, :3])


def test_all_shipped_models_are_registered():
    names = {m.name for m in list_models()}
    assert set(SHIPPED) <= names
    assert m2t_core.DEFAULT_MODEL in names


def test_default_model_full_image_round_trip():
    """A full photo (Kodak 768x512 when ../shared is there) decodes bit-exactly."""
    model = load_model()
    rgb = _photo()
    [stream] = m2t_core.compress(rgb)
    decoded = m2t_core.decompress(stream)
    enc = m2t_core.Encoder(model, reconstruct=True).encode_image(rgb)
    assert enc.bitstream == stream
    assert np.array_equal(decoded, enc.x_hat)
    assert 0.2 < enc.bpp < 1.5 and psnr(rgb, decoded) > 28.0


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_model_round_trips(name):
    model = load_model(name)
    rgb = _photo()[:192, :256]
    enc = m2t_core.Encoder(model, reconstruct=True).encode_image(rgb)
    assert np.array_equal(model.decompress(enc.bitstream), enc.x_hat)


def test_rates_increase_with_model_quality():
    rgb = _photo()[:256, :256]
    bpps = [m2t_core.Encoder(load_model(n)).encode_image(rgb).bpp for n in SHIPPED[:4]]
    assert bpps == sorted(bpps), bpps


def test_cli_lists_models_with_kodak_figures():
    out = subprocess.run([sys.executable, "-m", "m2t_core.cli", "models"], capture_output=True, text=True, check=True)
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    for name in SHIPPED:
        assert name in lines and "MB" in lines[name] and "bpp" in lines[name], out.stdout


def test_cli_lists_replaced_weights_on_request():
    previous = sorted(p.stem for p in (Path(m2t_core.__file__).resolve().parent / "weights" / "previous").glob("*.safetensors"))
    run = [sys.executable, "-m", "m2t_core.cli", "models"]
    plain = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    listed = subprocess.run(run + ["--previous"], capture_output=True, text=True, check=True).stdout
    assert previous and not any(name in plain for name in previous)
    for name in previous:
        line = listed.split(name)[1].splitlines()[0]
        assert f"{name}  " in listed and "replaced" in line and "decode-only" in line, listed  # without g_a (m2t 0.7.6)


def test_every_weights_file_is_in_the_package_data():
    """A pip install must carry every checkpoint, the replaced ones in weights/previous/ too
    (old streams name them): each file under m2t_core/weights matches pyproject's package-data."""
    import fnmatch
    import tomllib

    root = Path(m2t_core.__file__).resolve().parent
    repo = root.parent
    globs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["m2t_core"]
    files = [p.relative_to(root).as_posix() for p in (root / "weights").rglob("*.safetensors")]
    assert files and all(any(fnmatch.fnmatchcase(f, g) and f.count("/") == g.count("/") for g in globs) for f in files), \
        (files, globs)
