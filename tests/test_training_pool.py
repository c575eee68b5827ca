"""The memory loader (pipeline/training/pool.py): train_data sources with weights and downscale
ranges, the image pool and its crops, the batch thread; and amp "auto"."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from m2t_core.config import ConfigError
from m2t_core.sysinfo import BF16_CPU_FLAGS, cpu_flags
from pipeline.training import pool as P
from pipeline.training import trainer as T


def write_images(folder, count, size, value, fmt="png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = np.full((size[0], size[1], 3), value, np.uint8)
        img[:, :, 1] = i  # tell the images apart
        Image.fromarray(img).save(folder / f"im{i:02d}.{fmt}")
    return folder


def test_parse_sources_forms_and_errors():
    assert P.parse_sources("/a") == [P.SourceSpec("/a")]
    assert P.parse_sources(["/a", "/b"]) == [P.SourceSpec(["/a", "/b"])]
    mixed = P.parse_sources([{"url": "/a", "weight": 3}, {"url": ["/b"], "downscale": [0.5, 0.8]}])
    assert mixed == [P.SourceSpec("/a", 3.0), P.SourceSpec(["/b"], 1.0, (0.5, 0.8))]
    assert P.parse_sources(P.sources_to_config(mixed)) == mixed
    assert P.sources_to_config([P.SourceSpec("/a")]) == "/a"
    for bad, message in [({"url": "/a"}, "must be a URL"), ([{"url": "/a", "wieght": 1}], "unknown keys"),
                         ([{"weight": 1}], "url must be"), ([{"url": "/a", "weight": 0}], "weight must be"),
                         ([{"url": "/a", "weight": True}], "weight must be"),
                         ([{"url": "/a", "downscale": [0.9, 0.5]}], "downscale must be"),
                         ([{"url": "/a", "downscale": [0, 1]}], "downscale must be"),
                         (["/a", {"url": "/b"}], "mix plain URLs")]:
        with pytest.raises(ConfigError, match=message):
            P.parse_sources(bad)


def test_config_sources_loader_and_amp(tmp_path):
    cfg = T.load_config(None, ["model=x.yaml", "train_data=[{url: /a, weight: 2}, {url: /b, downscale: [0.5, 1.0]}]"])
    assert [s.weight for s in T.train_sources(cfg)] == [2.0, 1.0]
    with pytest.raises(ConfigError, match="need loader: memory"):
        T.load_config(None, ["model=x.yaml", "train_data=[{url: /a, weight: 2}]", "loader=stream"])
    with pytest.raises(ConfigError, match="loader must be"):
        T.load_config(None, ["model=x.yaml", "train_data=/a", "loader=disk"])
    assert T.load_config(None, ["model=x.yaml", "train_data=/a", "loader=stream"]).loader == "stream"
    cpu = torch.device("cpu")
    assert T.resolve_amp("none", cpu) == "none" and T.resolve_amp("bf16", cpu) == "bf16"
    native = any(f in cpu_flags() for f in BF16_CPU_FLAGS)
    assert T.resolve_amp("auto", cpu) == ("bf16" if native else "none")


def test_pool_mixes_sources_by_weight_and_downscales(tmp_path):
    big = write_images(tmp_path / "big", 3, (200, 300), 200)
    small = write_images(tmp_path / "small", 2, (64, 80), 50, fmt="jpg")
    specs = P.parse_sources([{"url": str(big), "weight": 3, "downscale": [0.5, 0.5]}, {"url": str(small)}])
    pool = P.ImagePool.load(specs, crop=32, memory_mb=64, seed=0)
    assert pool.images == 5 and [len(g) for g in pool.groups] == [3, 2]
    assert all(im.shape == (100, 150, 3) for im in pool.groups[0])  # downscaled by 0.5 once, at load
    assert all(im.shape == (64, 80, 3) for im in pool.groups[1])  # no downscale asked
    np.testing.assert_allclose(pool.weights, [0.75, 0.25])
    batch = pool.batch(400, np.random.default_rng(0))
    assert batch.shape == (400, 32, 32, 3) and batch.dtype == np.uint8
    from_big = np.mean(np.abs(batch[:, :, :, 0].astype(int) - 200).max(axis=(1, 2)) < 20)
    assert 0.68 < from_big < 0.82  # 3:1 by weight


def test_pool_downscale_keeps_a_whole_crop_and_the_memory_cap(tmp_path):
    src = write_images(tmp_path / "a", 2, (120, 400), 90)
    pool = P.ImagePool.load(P.parse_sources([{"url": str(src), "downscale": [0.1, 0.1]}]), crop=96,
                            memory_mb=64, seed=1)
    assert all(min(im.shape[:2]) == 96 for im in pool.groups[0])  # floor: the short side stays >= crop
    capped = P.ImagePool.load(P.parse_sources(str(src)), crop=16, memory_mb=1, seed=1, threads=1)
    cap = 2**20 // 3 // 2
    assert all(im.shape[0] * im.shape[1] <= cap * 1.02 for im in capped.groups[0])
    with pytest.raises(ConfigError, match="raise memory_mb to at least"):
        P.ImagePool.load(P.parse_sources(str(src)), crop=512, memory_mb=1, seed=1)


def test_pool_skips_unreadable_images_and_refuses_none(tmp_path, caplog):
    src = write_images(tmp_path / "a", 2, (64, 64), 10)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    pool = P.ImagePool.load(P.parse_sources(str(src)), crop=32, memory_mb=16, seed=0)
    assert pool.images == 2 and "broken.png" in caplog.text
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"nope")
    with pytest.raises(ConfigError, match="no readable training image"):
        P.ImagePool.load(P.parse_sources(str(bad)), crop=32, memory_mb=16, seed=0)


def test_ranks_take_disjoint_images(tmp_path):
    src = write_images(tmp_path / "a", 5, (40, 40), 10)
    ranks = [P.ImagePool.load(P.parse_sources(str(src)), crop=32, memory_mb=16, seed=0, rank=r, world=2)
             for r in range(2)]
    seen = [sorted(int(im[0, 0, 1]) for im in p.groups[0]) for p in ranks]
    assert seen == [[0, 2, 4], [1, 3]]


def test_batch_stream_is_deterministic_channels_last_and_reports_errors(tmp_path):
    src = write_images(tmp_path / "a", 3, (90, 70), 30)
    pool = P.ImagePool.load(P.parse_sources(str(src)), crop=32, memory_mb=16, seed=0)
    first, second = P.BatchStream(pool, 4, seed=5), P.BatchStream(pool, 4, seed=5)
    a, b = [next(first) for _ in range(3)], [next(second) for _ in range(3)]
    first.close(), second.close()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (4, 3, 32, 32) and a[0].is_contiguous(memory_format=torch.channels_last)
    pool.groups = [[np.zeros((0, 0, 3), np.uint8)]]  # an empty image: random_crop fails in the thread
    broken = P.BatchStream(pool, 2, seed=0)
    with pytest.raises(RuntimeError, match="training crops failed"):
        next(broken)
    broken.close()


def test_autocast_runs_the_transforms_ends_in_fp32():
    from _models import tiny_model

    model = tiny_model().train()
    dtypes = {}
    for name, t in (("g_a", model.g_a), ("g_s", model.g_s)):
        for i in (0, 1, len(t.layers) - 1):
            t.layers[i].register_forward_hook(lambda m, inp, out, key=(name, i): dtypes.__setitem__(key, out.dtype))
    # g_a's first stage: its residual stream stays fp32 (an fp32 input + a bf16 body is fp32),
    # the convolutions inside run in bf16.
    model.g_a.layers[1].body[0].register_forward_hook(lambda m, inp, out: dtypes.__setitem__("inner", out.dtype))
    x = torch.rand(1, 3, 128, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model.g_a(x)
        x_hat = model.g_s(torch.round(y))
    last_a, last_s = len(model.g_a.layers) - 1, len(model.g_s.layers) - 1
    assert dtypes[("g_a", 0)] == dtypes[("g_a", last_a)] == torch.float32 and dtypes["inner"] == torch.bfloat16
    assert dtypes[("g_s", 0)] == dtypes[("g_s", last_s)] == torch.float32 and dtypes[("g_s", 1)] == torch.bfloat16
    assert y.dtype == x_hat.dtype == torch.float32
    with torch.no_grad():  # without autocast: exactly the plain Sequential
        assert torch.equal(model.g_a(x), model.g_a.layers(x))


def test_probe_measures_batches_and_settings(capsys):
    from pathlib import Path

    tiny = Path(__file__).resolve().parent.parent / "configs" / "train" / "tiny-test.yaml"
    assert T.main(["--config", str(tiny), "--set", "train_data=/nowhere", "--probe", "--probe-batches", "1,2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("crop")]
    assert len(rows) == 4  # two batch sizes, then the other amp and the other layout at the config's batch
    assert "amp bf16" in rows[2] and "NCHW" in rows[3]
    assert "fastest at crop 64: batch_size" in out and "crops/s" in rows[0]
