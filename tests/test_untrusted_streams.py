"""A bitstream's header selects among installed models; it never names a file (issue 13).

The model id in a header is matched against registry names only ($M2T_MODEL_PATH, then the
package's weights), by name and weights hash. A stream naming a path, even one holding a
perfectly good checkpoint, is refused with a BitstreamError before any file is opened; a path
is something the user passes (`--model`, `model=`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import m2t_core
from m2t_core import BitstreamError, UnknownStreamModelError, save_checkpoint
from m2t_core.cli import main as m2t_main
from m2t_core.registry import load_model_for_header
from test_compress import TINY, H, W, build_model, random_image


@pytest.fixture
def short_dir():
    """A short absolute folder: a header's model id holds at most 64 bytes."""
    path = Path(tempfile.mkdtemp(prefix="m2t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _retag(src: Path, dest: Path, model_id: str) -> None:
    """A copy of a checkpoint whose metadata model_id is `model_id` (save_checkpoint refuses
    such names; an attacker writes the file directly)."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta["model_id"] = model_id
    save_file(load_file(str(src)), str(dest), metadata=meta)


def _stream(model_id: str, seed: int = 0) -> bytes:
    model = build_model(TINY, model_id=model_id)
    return m2t_core.Encoder(model).encode_image(random_image(H, W, seed=seed)).bitstream


def test_a_stream_naming_a_checkpoint_path_is_refused(short_dir, tmp_path, capsys):
    good = tmp_path / "tiny.safetensors"
    save_checkpoint(build_model(TINY, model_id="tiny"), good)
    evil = short_dir / "evil.safetensors"
    _retag(good, evil, str(evil))
    data = _stream(str(evil))  # the header names the path; the file would decode it
    assert len(str(evil)) <= 64
    with pytest.raises(UnknownStreamModelError, match="not a valid model name") as err:
        m2t_core.decompress(data)
    assert isinstance(err.value, BitstreamError)
    src = short_dir / "in.m2t"
    src.write_bytes(data)
    out = short_dir / "out.png"
    assert m2t_main(["decode", str(src), str(out)]) == 2
    assert "not a valid model name" in capsys.readouterr().err and not out.exists()
    # The user may name the checkpoint explicitly (it is the writer of the stream).
    assert m2t_main(["decode", str(src), str(out), "--model", str(evil)]) == 0 and out.exists()
    assert m2t_main(["info", str(src)]) == 0
    assert "not a valid model name" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["/etc/passwd", "/proc/self/environ", "../../x", "a/b"])
def test_system_paths_in_headers_are_never_opened(name):
    data = _stream(name)
    with pytest.raises(UnknownStreamModelError, match="not a valid model name"):
        m2t_core.decompress(data)


def test_a_relative_checkpoint_name_is_not_a_path(tmp_path, monkeypatch):
    """`evil.safetensors` is a valid registry name, but load_model() would take it as a file in
    the working directory."""
    ckpt = tmp_path / "evil.safetensors"
    save_checkpoint(build_model(TINY, model_id="evil.safetensors"), ckpt)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("M2T_MODEL_PATH", raising=False)
    data = _stream("evil.safetensors")
    with pytest.raises(UnknownStreamModelError, match="not installed"):
        m2t_core.decompress(data)


def test_installed_models_are_matched_by_name_and_weights_hash(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    # Same name in two folders of $M2T_MODEL_PATH, different weights: the stream picks the
    # one whose weights hash it carries, wherever it is on the path.
    other = build_model(TINY, model_id="tiny-twin")
    import torch

    with torch.no_grad():
        next(other.parameters()).add_(0.5)
    save_checkpoint(other, first / "tiny-twin.safetensors")
    save_checkpoint(build_model(TINY, model_id="tiny-twin"), second / "tiny-twin.safetensors")
    monkeypatch.setenv("M2T_MODEL_PATH", os.pathsep.join([str(first), str(second)]))
    rgb = random_image(H, W, seed=3)
    reference = build_model(TINY, model_id="tiny-twin")
    encoded = m2t_core.Encoder(reference, reconstruct=True).encode_image(rgb)
    out = m2t_core.decompress(encoded.bitstream)
    assert np.array_equal(out, encoded.x_hat)
    header = m2t_core.read_header(encoded.bitstream)
    assert load_model_for_header(header).weights_hash() == reference.weights_hash()
    # Neither installed model: a BitstreamError naming the model and the hash.
    monkeypatch.setenv("M2T_MODEL_PATH", str(first))
    with pytest.raises(UnknownStreamModelError, match=header.weights_hash.hex()) as err:
        m2t_core.decompress(encoded.bitstream)
    assert isinstance(err.value, m2t_core.ModelNotFoundError) and isinstance(err.value, BitstreamError)
    json.dumps(str(err.value))  # a one-line message
    assert "\n" not in str(err.value)
