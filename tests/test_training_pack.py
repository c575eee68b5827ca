"""The compact training set (pipeline/training/pack.py): tiles of a config's train_data within a
byte budget, JPEG 4:4:4 or PNG by source, a manifest, refusal to write over other files; and
the pack read back by DeviceBatches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from pipeline.training import pack
from pipeline.training.device_pool import DeviceBatches
from pipeline.training.pool import ImagePool, SourceSpec

TILE = 48


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A photo-like source (smooth colour and noise, JPEG) and a line-art one (PNG), and a
    config mixing them 0.6 : 0.4 with a downscale on the photos."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    (root / "photos").mkdir()
    (root / "lineart").mkdir()
    yy, xx = np.mgrid[0:120, 0:160]
    for i in range(6):
        base = np.stack([xx * (i + 1) % 256, yy * 2, (xx + yy) // 2], axis=-1)
        rgb = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(root / "photos" / f"p{i}.jpg", quality=95)
    for i in range(4):
        rgb = np.full((72, 90, 3), 255, np.uint8)
        rgb[::9, :, :] = 0
        rgb[:, 5 + i::11, 1] = 40 * i
        Image.fromarray(rgb).save(root / "lineart" / f"l{i}.png")
    config = root / "train.yaml"
    config.write_text(f"init_from: m2t-small-q3\ntrain_data:\n"
                      f"  - {{url: {root / 'photos'}, weight: 0.6, downscale: [0.8, 1.0]}}\n"
                      f"  - {{url: {root / 'lineart'}, weight: 0.4}}\n")
    return root


def run_pack(config, out, *extra):
    return pack.main(["--config", str(config), "--out", str(out), "--budget-mb", "0.2", "--tile", str(TILE),
                      "--png-sources", "lineart", "--memory-mb", "64", "--threads", "1", *extra])


@pytest.fixture(scope="module")
def packed(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("packs") / "pack"
    assert run_pack(sources / "train.yaml", out) == 0
    return out


def test_pack_fills_the_budget_with_decodable_tiles(packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    tiles = sorted(p for p in packed.iterdir() if p.name != "manifest.json")
    assert [p.name for p in tiles] == manifest["tiles"] and manifest["count"] == len(tiles) > 20
    assert manifest["tiles"][0] == "tile-00000.jpg" or manifest["tiles"][0] == "tile-00000.png"
    used = sum(p.stat().st_size for p in tiles)
    budget = int(0.2 * 2**20)
    assert used == manifest["bytes"] <= budget == manifest["budget_bytes"]
    assert used + manifest["next_tile_bytes"] > budget  # stopped at the first tile that did not fit
    for path, source in zip(tiles, manifest["tile_sources"]):
        with Image.open(path) as im:
            assert im.size == (TILE, TILE) and im.mode == "RGB"
            if source == 1:  # the line-art source, matched by --png-sources
                assert im.format == "PNG" and path.suffix == ".png"
            else:
                assert im.format == "JPEG" and path.suffix == ".jpg"
                assert JpegImagePlugin.get_sampling(im) == 0  # 4:4:4


def test_manifest_records_sources_counts_and_command(sources, packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    assert manifest["tile"] == TILE and manifest["quality"] == 95 and manifest["seed"] == 0
    assert manifest["png_sources"] == ["lineart"] and manifest["chroma"] == "4:4:4"
    photos, lineart = manifest["sources"]
    assert photos["url"] == str(sources / "photos") and photos["weight"] == 0.6
    assert photos["downscale"] == [0.8, 1.0] and photos["format"] == "jpeg" and photos["images_loaded"] == 6
    assert lineart["format"] == "png" and lineart["images_loaded"] == 4
    assert photos["tiles"] + lineart["tiles"] == manifest["count"]
    assert photos["bytes"] + lineart["bytes"] == manifest["bytes"]
    assert np.bincount(manifest["tile_sources"]).tolist() == [photos["tiles"], lineart["tiles"]]
    assert abs(photos["tiles"] / manifest["count"] - 0.6) < 0.15  # by weight
    assert "--budget-mb 0.2" in manifest["command"] and "pipeline.training.pack" in manifest["command"]


def test_same_seed_same_pack_and_refusals(sources, packed, tmp_path, capsys):
    config = sources / "train.yaml"
    assert run_pack(config, packed) == 2  # not empty, no --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    tiles = lambda: {p.name: p.read_bytes() for p in packed.iterdir() if p.name != "manifest.json"}
    before, manifest = tiles(), json.loads((packed / "manifest.json").read_text())
    assert run_pack(config, packed, "--overwrite") == 0
    assert tiles() == before  # deterministic for a seed
    again = json.loads((packed / "manifest.json").read_text())
    assert again.pop("command").endswith("--overwrite") and manifest.pop("command") != ""
    assert again == manifest
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert run_pack(config, other, "--overwrite") == 2  # never deletes what a pack did not write
    assert "notes.txt" in capsys.readouterr().err and (other / "notes.txt").exists()
    assert run_pack(config, tmp_path / "new", "--png-sources", "nonphoto") == 2
    assert "match no train_data URL" in capsys.readouterr().err


def test_a_pack_feeds_device_batches(packed):
    pool = ImagePool.load([SourceSpec(str(packed))], crop=32, memory_mb=16, seed=0, threads=1)
    assert all(im.shape == (TILE, TILE, 3) for im in pool.groups[0])  # tiles arrive unresized
    batch = next(DeviceBatches(pool, 8, seed=0, device="cpu"))
    assert batch.shape == (8, 3, 32, 32) and batch.is_contiguous(memory_format=torch.channels_last)


def test_auto_budget_is_what_the_gpu_machine_has_left(tmp_path):
    """64 MiB less every file that travels (tracked, or untracked and not ignored), less the
    other carried paths, less 1 MiB; ignored files and the pack's own folder do not count."""
    import subprocess

    repo = tmp_path / "repo"
    (repo / "weights").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("runs/\n.whl/\n")
    (repo / "weights" / "model.bin").write_bytes(b"w" * 3_000_000)
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    (repo / "notes.txt").write_bytes(b"n" * 1000)  # untracked, not ignored: it travels
    (repo / "pack").mkdir()
    (repo / "pack" / "old.jpg").write_bytes(b"t" * 5_000_000)  # not ignored, but the new pack replaces it
    (repo / "runs").mkdir()
    (repo / "runs" / "other.bin").write_bytes(b"x" * 7_000_000)  # ignored: stays behind
    (repo / ".whl").mkdir()
    (repo / ".whl" / "constriction.whl").write_bytes(b"c" * 400_000)
    tree = 3_000_000 + 1000 + len("runs/\n.whl/\n")
    got = pack.auto_budget(repo, [".whl"], repo / "pack")
    assert got == (64 << 20) - (1 << 20) - tree - 400_000
    assert pack.auto_budget(repo, [], repo / "pack") == got + 400_000
    assert pack.auto_budget(repo, [], repo / "elsewhere") == got + 400_000 - 5_000_000
