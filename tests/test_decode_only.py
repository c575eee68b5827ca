"""Decode-only checkpoints (registry.write_decode_only): the replaced weights kept in
weights/previous/ without g_a, with the weights digests g_a is needed for stored beside a
SHA-256 of the tensors kept. They must decode every stream of the whole model bit for bit,
name the same weights hash for every format, refuse to encode or be saved as whole, and
refuse to load (or to name a hash) once their tensors changed."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _models import build_model, random_image, tiny_config
from m2t_core import Decoder, Encoder, bitstream, registry
from m2t_core.registry import CheckpointError


@pytest.fixture(scope="module", params=["m2t", "mt"])
def whole_and_part(request, tmp_path_factory):
    """A tiny model saved as the shipped ones are (fp16 transforms, no float entropy weights),
    and its decode-only form."""
    folder = tmp_path_factory.mktemp(f"decode-only-{request.param}")
    whole = registry.save_checkpoint(build_model(tiny_config(request.param), seed=4, model_id="tiny-old"),
                                     folder / "tiny-old.safetensors", dtype=torch.float16, float_entropy_model=False)
    part = registry.write_decode_only(whole, folder / "previous" / "tiny-old@x.safetensors")
    return whole, part


def test_a_decode_only_checkpoint_decodes_like_the_whole_one(whole_and_part):
    whole_path, part_path = whole_and_part
    assert part_path.stat().st_size < 0.9 * whole_path.stat().st_size
    assert registry.read_checkpoint_version(part_path) == registry.DECODE_ONLY_VERSION
    whole, part = registry.load_checkpoint(whole_path), registry.load_checkpoint(part_path)
    assert part.decode_only and not whole.decode_only
    for version in bitstream.READABLE_VERSIONS:
        assert part.weights_digest(version) == whole.weights_digest(version), version
    coded = Encoder(whole, reconstruct=True).encode_image(random_image(96, 144, seed=2))
    header, y_whole = Decoder(whole).decode_latent(coded.bitstream)
    part.check_header(header)  # the stream names the decode-only model's weights too
    _, y_part = Decoder(part).decode_latent(coded.bitstream)
    assert torch.equal(y_part, y_whole)
    assert np.array_equal(Decoder(part).decompress(coded.bitstream), coded.x_hat)
    assert np.array_equal(Decoder(part).decompress_many([coded.bitstream])[0], coded.x_hat)


def test_a_decode_only_checkpoint_never_encodes_or_passes_for_whole(whole_and_part, tmp_path):
    whole_path, part_path = whole_and_part
    part = registry.load_checkpoint(part_path)
    rgb = random_image(64, 64, seed=3)
    for encode in (lambda: Encoder(part).encode_image(rgb), lambda: part.analysis(rgb),
                   lambda: part.analysis_batch([rgb]), lambda: part(torch.zeros(1, 3, 64, 64))):
        with pytest.raises(ValueError, match="decode-only"):
            encode()
    with pytest.raises(ValueError, match="decode-only"):
        registry.save_checkpoint(part, tmp_path / "again.safetensors")
    with pytest.raises(CheckpointError, match="already decode-only"):
        registry.write_decode_only(part_path, tmp_path / "again.safetensors")
    assert not list(tmp_path.iterdir())


def _rewrite(source, target, edit_tensors=None, edit_meta=None):
    with safe_open(str(source), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(target), metadata=meta)
    return target


def test_a_changed_decode_only_checkpoint_is_refused(whole_and_part, tmp_path):
    """Its stored digests hold only for the tensors they were computed with: a file whose
    tensors differ fails to load, one without a readable record too, and a loaded model whose
    weights were edited names no weights hash (never the stored one)."""
    _, part_path = whole_and_part

    def bump(tensors):
        name = sorted(k for k in tensors if k.startswith("g_s."))[0]
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] += 1

    with pytest.raises(CheckpointError, match="not the ones its weights digests were computed with"):
        registry.load_checkpoint(_rewrite(part_path, tmp_path / "edited.safetensors", edit_tensors=bump))

    def forget(meta):
        meta["decode_only"] = json.dumps({"weights_digests": {}})

    with pytest.raises(CheckpointError, match="readable record"):
        registry.load_checkpoint(_rewrite(part_path, tmp_path / "no-record.safetensors", edit_meta=forget))

    def drop_a_tensor(tensors):
        del tensors[sorted(k for k in tensors if k.startswith("exact."))[0]]

    with pytest.raises(CheckpointError, match="do not match the config"):
        registry.load_checkpoint(_rewrite(part_path, tmp_path / "short.safetensors", edit_tensors=drop_a_tensor))

    part = registry.load_checkpoint(part_path)
    stored = part.weights_hash()
    with torch.no_grad():
        next(part.g_s.parameters()).data.view(-1)[0] += 1.0
    with pytest.raises(ValueError, match="changed after loading"):
        part.weights_hash()
    assert registry.load_checkpoint(part_path).weights_hash() == stored


def test_a_decode_only_file_older_than_a_format_names_no_hash_for_it():
    """The kept weights in weights/previous/ were written before format 7: they never wrote
    it and know no hash for it. A format-7 stream naming them is another model's stream (a
    mismatch, never a crash), and the registry passes over them to say what is missing."""
    kept = sorted((registry.PACKAGE_WEIGHTS / registry.PREVIOUS_DIR).glob("m2t-small-q3@*.safetensors"))[0]
    old = registry.load_checkpoint(kept)
    assert old.decode_only and 7 not in old.weights_hashes() and old.known_weights_hash(7) is None
    assert set(old.weights_hashes()) == {3, 4, 5, 6}
    with pytest.raises(bitstream.ModelMismatchError, match="recorded no weights hash for format 7"):
        old.weights_hash(7)
    current = registry.load_model("m2t-small-q3")
    stream = Encoder(current).encode_image(random_image(64, 64, seed=5)).bitstream
    header = bitstream.read_header(stream)
    assert header.version == 7 and current.wrote(header)
    posing = dataclasses.replace(header, weights_hash=old.weights_hash(5))  # v7 naming the old weights' v5 hash
    assert not old.wrote(posing)
    with pytest.raises(bitstream.ModelMismatchError, match="of another format"):
        old.check_header(posing)
    with pytest.raises(registry.UnknownStreamModelError, match="older format only"):
        registry.load_model_for_header(posing)
