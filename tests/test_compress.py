"""The compression job (pipeline/compress.py, sources.py, archive.py), for real: a local Ray
cluster (the shared fixture), a loopback S3 server (moto), Parquet, real entropy coding.

A tiny random-init model (saved as a checkpoint) and 32x48 images keep the whole file to a
few minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import torch

import m2t_core
from m2t_core import M2TCodec, ModelConfig, load_image, save_checkpoint
from m2t_core import bitstream as bs
from m2t_core.config import ConfigError, dataclass_from_dict, load_mapping
from m2t_core.metrics import psnr
from pipeline.storage import archive as A
from pipeline.jobs import compress as C
from pipeline.storage.sources import plan_shards

REPO = Path(__file__).resolve().parent.parent
TINY = ModelConfig(N=16, C=8, blocks_per_stage=1, window=4, d_model=32, n_layers=1, n_heads=2, d_mlp=64,
                   num_steps=4)
H, W = 32, 48


# ---------------------------------------------------------------- model and corpus helpers


def build_model(cfg: ModelConfig, model_id: str = "tiny-pipeline") -> M2TCodec:
    """A random-init codec, the same weights every call. The analysis transform's last conv is
    scaled up so that the rounded latent is not all zeros (the coder gets real symbols)."""
    torch.manual_seed(0)
    model = M2TCodec(cfg, model_id=model_id)
    last = [m for m in model.g_a.modules()
            if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) and m.out_channels == cfg.C][-1]
    with torch.no_grad():
        last.weight.mul_(8.0)
        last.bias.mul_(8.0)
    return model.eval()


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour waves plus noise: natural-ish statistics, distinct per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    f, phase = rng.uniform(0.02, 0.2, size=(3, 2)), rng.uniform(0, 2 * np.pi, size=3)
    img = np.stack([128 + 90 * np.sin(f[c, 0] * yy + f[c, 1] * xx + phase[c]) for c in range(3)], axis=-1)
    return np.clip(np.round(img + rng.normal(0, 10, img.shape)), 0, 255).astype(np.uint8)



def png_bytes(rgb: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_corpus(root: Path) -> list[str]:
    """All three formats under one folder; returns the keys the job must produce."""
    keys = []
    for i in range(5):  # image files in a sub-folder: 3 shards of <= 2
        path = root / "photos" / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(random_image(H, W, seed=i)))
        keys.append(f"photos/img{i}.png")
    with tarfile.open(root / "shard-0.tar", "w") as tar:  # a webdataset shard: one job shard
        for i in range(3):
            add_member(tar, f"{i:06d}.png", png_bytes(random_image(H, W, seed=10 + i)))
            add_member(tar, f"{i:06d}.json", b'{"caption": "not an input"}')
            keys.append(f"shard-0.tar/{i:06d}.png")
    # Hugging Face style: a struct column {bytes, path}; the path is the key.
    rows = [{"image": {"bytes": png_bytes(random_image(H, W, seed=20 + i), "JPEG", quality=90),
                       "path": f"hf/{i}.jpg"}, "label": i} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), root / "hf.parquet")
    keys += [f"hf/{i}.jpg" for i in range(3)]
    # Plain binary column, no key column: keys are row numbers; 2-row row groups straddle shards.
    rows = [{"jpg": png_bytes(random_image(H, W, seed=30 + i), "JPEG")} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), root / "plain.parquet", row_group_size=2)
    keys += [f"plain.parquet#{i}" for i in range(3)]
    return keys


def job_config(inputs, output, model: Path, *sets: str) -> C.CompressConfig:
    cfg = C.load_config(None, ["shard_size=2", "torch_threads=1", *sets])
    return C.CompressConfig(**{**cfg.__dict__, "input": inputs, "output": str(output), "model": str(model)})


def read_index(archive: Path | str, shard: str) -> pa.Table:
    return pq.read_table(f"{archive}/shards/{shard}.parquet")


def all_rows(archive: Path) -> list[dict]:
    rows = []
    for path in sorted((archive / "shards").glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def shard_files(archive: Path) -> dict[str, bytes]:
    """Every .bin and index file of an archive (stats hold timings, so they differ by run)."""
    return {p.name: p.read_bytes() for p in sorted((archive / "shards").iterdir())
            if p.suffix in (".bin", ".parquet")}


def assert_same_archive(a: Path, b: Path) -> None:
    fa, fb = shard_files(a), shard_files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name.endswith(".bin"):
            assert fa[name] == fb[name], f"{name} differs"
    for shard in sorted(p.stem for p in (a / "shards").glob("*.parquet")):
        assert read_index(a, shard).equals(read_index(b, shard)), f"index of shard {shard} differs"
    assert pq.read_table(a / A.KEYS_INDEX).equals(pq.read_table(b / A.KEYS_INDEX))
    ma, mb = (json.loads((x / A.MANIFEST).read_text()) for x in (a, b))
    assert ma["shards"] == mb["shards"] and ma["totals"] == mb["totals"] and ma["model"] == mb["model"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-pipeline.safetensors"
    save_checkpoint(build_model(TINY, model_id="tiny-pipeline"), path)
    # Installed (as a user would): an archive's bitstreams select their model from the
    # registry by name + weights hash; the path in its manifest is never opened.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("M2T_MODEL_PATH", os.pathsep.join(filter(None, [str(path.parent), os.environ.get("M2T_MODEL_PATH")])))
        yield path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("corpus") / "in"
    return root, make_corpus(root)


@pytest.fixture(scope="module")
def local_archive(tmp_path_factory, corpus, tiny_checkpoint, ray_cluster) -> tuple[Path, dict, int]:
    """The reference: one clean run on the Ray cluster over all three formats."""
    out = tmp_path_factory.mktemp("archive") / "clean.m2t"
    t0 = time.perf_counter()
    report, code = C.compress_dataset(job_config(str(corpus[0]), out, tiny_checkpoint), progress=False)
    report["test_seconds"] = time.perf_counter() - t0
    print(C.format_report(report))
    return out, report, code


# ---------------------------------------------------------------- configuration and usage


def test_default_yaml_is_the_dataclass_defaults():
    data = load_mapping(REPO / "configs" / "pipeline" / "default.yaml")
    assert dataclass_from_dict(C.CompressConfig, data) == C.CompressConfig()


def test_a_retired_key_is_ignored_with_a_warning(tmp_path, caplog):
    """window_batch (bitstream format 1's windows per transformer call) left the jobs: old
    config files and --set still load, with a warning."""
    old = tmp_path / "old.yaml"
    old.write_text("shard_size: 3\nwindow_batch: 8\n")
    with caplog.at_level("WARNING"):
        cfg = C.load_config(old, ["window_batch=4"])
    assert cfg == dataclasses.replace(C.CompressConfig(), shard_size=3)
    assert "config key 'window_batch' is ignored" in caplog.text
    assert "window_batch" not in C.CompressConfig().to_dict()
    from pipeline.evaluation import evaluate as E  # the evaluation job's config: the same rule

    assert E.load_config(None, ["window_batch=8"]) == E.EvalConfig()
    with pytest.raises(ConfigError, match="bogus"):  # a key that never existed is still an error
        C.load_config(old, ["bogus=1"])


def test_config_and_usage_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="bogus"):
        C.load_config(None, ["bogus=1"])
    with pytest.raises(ConfigError, match="shard_size"):
        C.load_config(None, ["shard_size=0"])
    with pytest.raises(ConfigError, match="use_gpu"):
        C.load_config(None, ["ray.use_gpu=maybe"])
    assert C.load_config(None, ["max_pixels=1e6"]).max_pixels == 1_000_000
    assert C.main([]) == C.EXIT_USAGE  # no input or output
    assert C.main([str(tmp_path)]) == C.EXIT_USAGE  # only one path
    assert C.main([str(tmp_path / "missing"), str(tmp_path / "out"), "--no-ray"]) == C.EXIT_USAGE
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png_bytes(random_image(H, W)))
    assert C.main([str(tmp_path / "in"), str(tmp_path / "in" / "out.m2t"), "--no-ray"]) == C.EXIT_USAGE
    # An existing folder that is not an archive is never written into, nor deleted.
    assert C.main([str(tmp_path / "in"), str(tmp_path / "notes"), "--overwrite", "--no-ray"]) == C.EXIT_USAGE
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    err = capsys.readouterr().err
    assert "not found" in err and "not an m2t archive" in err and "inside the input" in err
    assert C.redact({"s3": {"key": "AK", "secret": "S", "client_kwargs": {"endpoint_url": "u"}}}) == \
        {"s3": {"key": "***", "secret": "***", "client_kwargs": {"endpoint_url": "u"}}}


def test_planning_is_deterministic_with_stable_keys(corpus):
    root, keys = corpus
    a, b = plan_shards(str(root), 2), plan_shards(str(root), 2)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.kind for s in a] == ["files"] * 3 + ["tar"] + ["parquet"] * 4
    assert [s.shard for s in a] == [f"{i:05d}" for i in range(8)]
    planned = [i["key"] for s in a if s.kind == "files" for i in s.items]
    planned += [k for s in a if s.kind == "parquet" for k in s.keys]
    assert planned == [k for k in keys if ".tar/" not in k]


# ---------------------------------------------------------------- the job on Ray


def test_three_formats_on_ray(local_archive, corpus, tiny_checkpoint, tmp_path):
    out, report, code = local_archive
    root, keys = corpus
    assert code == C.EXIT_OK, C.format_report(report)
    assert report["complete"] and report["totals"]["ok"] == len(keys) == 14
    assert report["this_run"]["runner"]["ray"] and report["this_run"]["runner"]["actors"] == 2
    assert json.loads((out / A.REPORT).read_text())["totals"]["ok"] == 14
    manifest = json.loads((out / A.MANIFEST).read_text())
    model = build_model(TINY, model_id="tiny-pipeline")
    assert manifest["model"]["weights_sha256"] == model.weights_digest().hex()
    assert manifest["bitstream_format_version"] == bs.FORMAT_VERSION == 7
    assert manifest["portable"] and manifest["code_version"]["m2t"]
    assert len(manifest["shards"]) == 8 and manifest["keys"] == 14
    stats = A.Archive(str(out)).completed_shards()  # each shard names its worker's peak RSS
    assert len(stats) == 8 and all(s["peak_rss_mib"] > 0 for s in stats.values())
    assert sorted(pq.read_table(out / A.KEYS_INDEX).column("key").to_pylist()) == sorted(keys)

    rows = all_rows(out)
    assert sorted(r["key"] for r in rows) == sorted(keys) and {r["status"] for r in rows} == {"ok"}
    blobs = {p.stem: p.read_bytes() for p in (out / "shards").glob("*.bin")}
    for row in rows:
        data = blobs[row["shard"]][row["offset"]:row["offset"] + row["length"]]
        assert zlib.crc32(data) == row["crc32"]
        decoded = model.decompress(data)  # real entropy decoding of the stored bytes
        assert zlib.crc32(decoded.tobytes()) == row["decoded_crc32"]
        assert (row["height"], row["width"]) == (H, W) == decoded.shape[:2]
        assert row["bpp"] == pytest.approx(8 * row["length"] / (H * W))
        if row["source"].startswith("file://") and "#" not in row["source"]:
            original = load_image(Path(row["source"][len("file://"):]).read_bytes())
            assert row["psnr"] == pytest.approx(psnr(original, decoded))

    # Random access: `get` returns what decoding the bitstream gives, for every format.
    by_key = {r["key"]: r for r in rows}
    for key in ("photos/img3.png", "shard-0.tar/000001.png", "hf/2.jpg", "plain.parquet#2"):
        rgb = A.get_image(str(out), key)
        assert zlib.crc32(rgb.tobytes()) == by_key[key]["decoded_crc32"]
    png = tmp_path / "got.png"
    assert A.get_main([str(out), "hf/1.jpg", str(png)]) == 0
    assert zlib.crc32(load_image(png).tobytes()) == by_key["hf/1.jpg"]["decoded_crc32"]
    assert A.get_main([str(out), "hf/1.jpg", str(tmp_path / "x.m2t"), "--bitstream"]) == 0
    assert zlib.crc32((tmp_path / "x.m2t").read_bytes()) == by_key["hf/1.jpg"]["crc32"]
    assert A.get_main([str(out), "no/such/key", str(png)]) == A.EXIT_USAGE


def test_in_process_run_gives_the_same_archive(local_archive, corpus, tiny_checkpoint, tmp_path):
    out = tmp_path / "inproc.m2t"  # and range coding on the model's own thread
    report, code = C.compress_dataset(job_config(str(corpus[0]), out, tiny_checkpoint, "ray.enabled=false",
                                                 "coding_threads=0"), progress=False)
    assert code == C.EXIT_OK and not report["this_run"]["runner"]["ray"]
    assert_same_archive(local_archive[0], out)


def test_one_actor_writes_the_bytes_two_actors_wrote(local_archive, corpus, tiny_checkpoint, tmp_path):
    """Same input, same settings, same machine: every .bin byte for byte whatever the actor
    count (the reference ran on 2), and with 2 threads range-coding while the model runs."""
    out = tmp_path / "one-actor.m2t"
    report, code = C.compress_dataset(job_config(str(corpus[0]), out, tiny_checkpoint, "ray.actors=1",
                                                 "coding_threads=2"), progress=False)
    assert code == C.EXIT_OK and report["this_run"]["runner"]["actors"] == 1
    assert_same_archive(local_archive[0], out)


def test_batched_model_stage_decodes_exactly(local_archive, corpus, tiny_checkpoint, tmp_path):
    """batch_images=4: g_a and g_s run on batches (g_a's float rounding may move a few latents,
    so no byte equality is claimed); every stream still decodes exactly to its latent, and to
    the pixels the index recorded (the integer g_s does not see the batch)."""
    out = tmp_path / "batched.m2t"
    report, code = C.compress_dataset(job_config(str(corpus[0]), out, tiny_checkpoint, "ray.enabled=false",
                                                 "batch_images=4", "coding_threads=1"), progress=False)
    assert code == C.EXIT_OK and report["totals"]["ok"] == 14
    stats = A.Archive(str(out)).completed_shards()
    model = build_model(TINY, model_id="tiny-pipeline")
    assert all(s["numerics"] == model.numerics() for s in stats.values())
    blobs = {p.stem: p.read_bytes() for p in (out / "shards").glob("*.bin")}
    rows = all_rows(out)
    streams = [blobs[r["shard"]][r["offset"]:r["offset"] + r["length"]] for r in rows]
    decoded = m2t_core.Decoder(model).decode_latents(streams)
    assert all(not isinstance(d, Exception) and d[0].height == H for d in decoded)
    pixels = m2t_core.Decoder(model).decompress_many(streams)  # one at a time: the batch's pixels
    assert [zlib.crc32(np.ascontiguousarray(p).tobytes()) for p in pixels] == [r["decoded_crc32"] for r in rows]


def test_resume_after_a_partial_run_and_a_crash_mid_shard(local_archive, corpus, tiny_checkpoint, tmp_path):
    out = tmp_path / "resumed.m2t"
    cfg = job_config(str(corpus[0]), out, tiny_checkpoint)
    report, code = C.compress_dataset(C.CompressConfig(**{**cfg.__dict__, "max_shards": 3}), progress=False)
    assert code == C.EXIT_INCOMPLETE and not report["complete"] and report["shards"]["remaining"] == 5
    assert not (out / A.MANIFEST).exists() and (out / A.REPORT).exists()
    done = sorted(p.name.split(".")[0] for p in (out / "shards").glob("*.stats.json"))
    assert len(done) == 3
    with pytest.raises(A.ArchiveError, match="incomplete"):
        A.lookup(str(out), "photos/img0.png")
    # A crash in the middle of a shard: its stats never written, its blob half written, and
    # a temporary file left behind.
    victim = done[1]
    (out / "shards" / f"{victim}.stats.json").unlink()
    blob = out / "shards" / f"{victim}.bin"
    blob.write_bytes(blob.read_bytes()[: len(blob.read_bytes()) // 2])
    (out / "shards" / f"{victim}.parquet.tmp").write_bytes(b"garbage")

    # Shards written before window_batch was retired record it in their settings: they resume.
    for path in (out / "shards").glob("*.stats.json"):
        stats = json.loads(path.read_text())
        path.write_text(json.dumps({**stats, "settings": {**stats["settings"], "window_batch": 8}}))
    report, code = C.compress_dataset(cfg, progress=False)
    assert code == C.EXIT_OK, C.format_report(report)
    assert report["shards"]["already_done"] == 2 and report["shards"]["this_run"] == 6
    assert not list((out / "shards").glob("*.tmp"))
    assert_same_archive(local_archive[0], out)

    # Resuming with other settings or other input is refused, naming the difference.
    with pytest.raises(ConfigError, match=r"different settings \(compute_psnr\)"):
        C.compress_dataset(job_config(str(corpus[0]), out, tiny_checkpoint, "compute_psnr=false"), progress=False)
    changed = tmp_path / "changed"
    shutil.copytree(corpus[0], changed)
    (changed / "photos" / "img9.png").write_bytes(png_bytes(random_image(H, W, seed=99)))
    with pytest.raises(ConfigError, match="different input"):
        C.compress_dataset(job_config(str(changed), out, tiny_checkpoint), progress=False)
    # --overwrite starts over.
    assert C.main([str(changed), str(out), "--model", str(tiny_checkpoint), "--overwrite", "--no-progress",
                   "--set", "shard_size=2", "--set", "torch_threads=1", "--no-ray"]) == C.EXIT_OK
    assert "photos/img9.png" in pq.read_table(out / A.KEYS_INDEX).column("key").to_pylist()


def test_an_archive_for_older_decoders_in_format_5_and_its_resume(corpus, tiny_checkpoint, tmp_path):
    """format_version=5: every stream in the format m2t 0.6-0.7 decode, the manifest naming it
    and its weights hash, and verify passes. An archive of format 5 resumes only with
    format_version=5 (the weights digest names the format); the default says how."""
    from pipeline.jobs import verify as V

    out = tmp_path / "v5.m2t"
    cfg = job_config(str(corpus[0]), out, tiny_checkpoint, "ray.enabled=false", "format_version=5")
    report, code = C.compress_dataset(dataclasses.replace(cfg, max_shards=3), progress=False)
    assert code == C.EXIT_INCOMPLETE
    with pytest.raises(ConfigError, match=r"weights_sha256\).*format_version=5"):
        C.compress_dataset(job_config(str(corpus[0]), out, tiny_checkpoint, "ray.enabled=false"), progress=False)
    report, code = C.compress_dataset(cfg, progress=False)
    assert code == C.EXIT_OK, C.format_report(report)
    manifest = json.loads((out / A.MANIFEST).read_text())
    model = build_model(TINY, model_id="tiny-pipeline")
    assert manifest["bitstream_format_version"] == 5 and manifest["model"]["weights_hash"] == model.weights_hash(5).hex()
    assert manifest["model"]["weights_sha256"] == model.weights_digest(5).hex() != model.weights_digest().hex()
    blobs = {p.stem: p.read_bytes() for p in (out / "shards").glob("*.bin")}
    rows = [r for r in all_rows(out) if r["status"] == "ok"]
    assert len(rows) == 14 and all(
        bs.read_header(blobs[r["shard"]][r["offset"]:r["offset"] + r["length"]]).version == 5 for r in rows)
    assert V.verify_main([str(out), "--no-ray", "--no-progress", "--model", str(tiny_checkpoint),
                          "--report", str(tmp_path / "verify.json")]) == V.EXIT_OK
    with pytest.raises(ConfigError, match="format_version must be null or one of"):
        job_config(str(corpus[0]), out, tiny_checkpoint, "format_version=3")
    with pytest.raises(ConfigError, match="format_version: .*fixed-rate"):
        C.compress_dataset(job_config(str(corpus[0]), tmp_path / "v6.m2t", tiny_checkpoint, "ray.enabled=false",
                                      "format_version=6"), progress=False)


def test_killed_job_process_resumes_to_the_same_archive(local_archive, corpus, tiny_checkpoint, tmp_path,
                                                        ray_cluster):
    """The real thing: the job's driver process is SIGKILLed mid-run (its actors die with it),
    then the same command finishes the archive."""
    out = tmp_path / "killed.m2t"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cmd = [sys.executable, str(REPO / "jobs" / "compress.py"), str(corpus[0]), str(out),
           "--model", str(tiny_checkpoint), "--no-progress", "--set", "shard_size=1", "--set", "ray.actors=1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    stats = lambda: sorted((out / "shards").glob("*.stats.json")) if (out / "shards").exists() else []
    while len(stats()) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Wait for the orphaned actor to be reaped by Ray (no shard may complete behind our back).
    seen, quiet_since = len(stats()), time.time()
    while time.time() - quiet_since < 3:
        time.sleep(0.2)
        if len(stats()) != seen:
            seen, quiet_since = len(stats()), time.time()
    assert 2 <= seen < 12 and not (out / A.MANIFEST).exists()

    rc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rc.returncode == C.EXIT_OK, rc.stderr[-3000:]
    assert "already done" in rc.stdout
    # shard_size=1 cuts differently from the reference: compare what is stored per key.
    ref = {r["key"]: r for r in all_rows(local_archive[0])}
    got = {r["key"]: r for r in all_rows(out)}
    assert sorted(ref) == sorted(got)
    for key, row in got.items():
        assert A.read_bitstream(str(out), key) == A.read_bitstream(str(local_archive[0]), key)
        assert row["decoded_crc32"] == ref[key]["decoded_crc32"] and row["status"] == "ok"


def test_s3_input_and_output(local_archive, corpus, tiny_checkpoint, s3_bucket, tmp_path, ray_cluster):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(corpus[0]) + "/", f"{bucket}/in/", recursive=True)
    storage = {"s3": options}
    cfg = job_config(f"s3://{bucket}/in", f"s3://{bucket}/archive", tiny_checkpoint)
    cfg = C.CompressConfig(**{**cfg.__dict__, "storage_options": storage})
    report, code = C.compress_dataset(cfg, progress=False)
    assert code == C.EXIT_OK, C.format_report(report)
    manifest = json.loads(fs.cat_file(f"{bucket}/archive/{A.MANIFEST}"))
    assert manifest["config"]["storage_options"]["s3"]["secret"] == "***"  # no credentials stored

    ref = local_archive[0]
    for path in sorted(fs.ls(f"{bucket}/archive/shards")):
        name = path.rsplit("/", 1)[1]
        if name.endswith(".bin"):
            assert fs.cat_file(path) == (ref / "shards" / name).read_bytes()
        elif name.endswith(".parquet"):
            got = pq.read_table(io.BytesIO(fs.cat_file(path)))
            want = read_index(ref, name[: -len(".parquet")])
            assert got.drop(["source"]).equals(want.drop(["source"]))
            assert all(s.startswith(f"s3://{bucket}/in/") for s in got.column("source").to_pylist())
    keys_s3 = pq.read_table(io.BytesIO(fs.cat_file(f"{bucket}/archive/{A.KEYS_INDEX}")))
    assert keys_s3.equals(pq.read_table(ref / A.KEYS_INDEX))

    url = f"s3://{bucket}/archive"
    for key in ("shard-0.tar/000002.png", "plain.parquet#0"):
        assert np.array_equal(A.get_image(url, key, storage_options=storage), A.get_image(str(ref), key))
    png = tmp_path / "s3.png"
    assert A.get_main([url, "photos/img0.png", str(png), "--storage-options", json.dumps(storage)]) == 0
    assert np.array_equal(load_image(png), A.get_image(str(ref), "photos/img0.png"))


# ---------------------------------------------------------------- bad inputs


def make_bad_corpus(root: Path) -> dict[str, list[str]]:
    """Every kind of awkward input, and the statuses the job must give them (per key, in order)."""
    good = random_image(H, W, seed=1)
    d = root / "bad"
    d.mkdir(parents=True)
    (d / "good.png").write_bytes(png_bytes(good))
    Image.fromarray(good[..., 0]).save(d / "gray.png")
    Image.fromarray(good[..., 0].astype(np.uint16) * 257).save(d / "gray16.png")  # mode I;16
    Image.fromarray(np.dstack([good, np.full((H, W), 128, np.uint8)])).save(d / "rgba.png")
    Image.fromarray(good).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(d / "palette.png")
    Image.fromarray(good).convert("CMYK").save(d / "cmyk.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(good).save(d / "exif_rotated.jpg", exif=exif.tobytes())
    Image.fromarray(good[:1, :1]).save(d / "one_by_one.png")
    Image.fromarray(random_image(80, 80, seed=3)).save(d / "too_big.png")  # over max_pixels=5000
    jpeg = png_bytes(good, "JPEG")
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "not_an_image.png").write_text("this is a text file with an image's name\n")
    (d / "empty.jpg").write_bytes(b"")
    (d / "readme.txt").write_text("not an input: no image extension")
    with tarfile.open(d / "dups.tar", "w") as tar:  # the same member twice
        add_member(tar, "a.png", png_bytes(good))
        add_member(tar, "a.png", png_bytes(random_image(H, W, seed=2)))
    tar_bytes = (d / "dups.tar").read_bytes()
    (d / "cut.tar").write_bytes(tar_bytes[:700])  # header of a.png, then a cut in its data
    pq.write_table(pa.Table.from_pylist([{"key": "r0", "png": png_bytes(good)}, {"key": "r1", "png": None},
                                         {"key": "r0", "png": png_bytes(good)}]), d / "rows.parquet")
    (root / "bad2").mkdir()
    (root / "bad2" / "good.png").write_bytes(png_bytes(good))  # same key from a second input root
    ok = lambda: ["ok"]
    return {
        "good.png": ["ok", "duplicate"], "gray.png": ok(), "gray16.png": ok(), "rgba.png": ok(),
        "palette.png": ok(), "cmyk.jpg": ok(), "exif_rotated.jpg": ok(), "one_by_one.png": ok(),
        "too_big.png": ["error"], "truncated.jpg": ["error"], "not_an_image.png": ["error"],
        "empty.jpg": ["error"], "dups.tar/a.png": ["ok", "duplicate"], "cut.tar": ["error"],
        "r0": ["ok", "duplicate"], "r1": ["error"],
    }


def test_bad_inputs_get_the_expected_statuses(tmp_path, tiny_checkpoint, ray_cluster):
    expected = make_bad_corpus(tmp_path)
    out = tmp_path / "bad.m2t"
    cfg = job_config([str(tmp_path / "bad"), str(tmp_path / "bad2")], out, tiny_checkpoint,
                     "max_pixels=5000", "shard_size=4")
    report, code = C.compress_dataset(cfg, progress=False)
    print(C.format_report(report))
    assert code == C.EXIT_FAILED_IMAGES and report["complete"]
    rows = all_rows(out)
    statuses: dict[str, list[str]] = {}
    for row in sorted(rows, key=lambda r: (r["shard"], r["source"])):
        statuses.setdefault(row["key"], []).append(row["status"])
    assert {k: sorted(v) for k, v in statuses.items()} == {k: sorted(v) for k, v in expected.items()}
    t = report["totals"]
    assert (t["ok"], t["error"], t["duplicate"], t["images"]) == (10, 6, 3, 19)

    by = {(r["key"], r["status"]): r for r in rows}
    assert (by[("exif_rotated.jpg", "ok")]["height"], by[("exif_rotated.jpg", "ok")]["width"]) == (W, H)
    assert (by[("one_by_one.png", "ok")]["height"], by[("one_by_one.png", "ok")]["width"]) == (1, 1)
    assert "exceeds the limit of 5000" in by[("too_big.png", "error")]["error"]
    assert "not an image format Pillow can read" in by[("not_an_image.png", "error")]["error"]
    assert by[("good.png", "duplicate")]["source"].endswith("/bad2/good.png")
    assert "already taken by file://" in by[("good.png", "duplicate")]["error"]
    assert by[("good.png", "ok")]["source"].endswith("/bad/good.png")  # the first root wins
    assert "twice" in by[("dups.tar/a.png", "duplicate")]["error"]
    assert "tar damaged after 0 complete" in by[("cut.tar", "error")]["error"]
    assert by[("empty.jpg", "error")]["error"] == "empty file (0 bytes)"
    assert "null" in by[("r1", "error")]["error"]
    for key in ("gray.png", "gray16.png", "rgba.png", "palette.png", "cmyk.jpg"):
        assert by[(key, "ok")]["psnr"] is not None and by[(key, "ok")]["length"] > 0
    # `get` serves the kept copy of a duplicated key, and says why a failed key is missing.
    first = np.asarray(A.get_image(str(out), "dups.tar/a.png"))
    assert zlib.crc32(first.tobytes()) == by[("dups.tar/a.png", "ok")]["decoded_crc32"]
    with pytest.raises(A.ArchiveError, match="status error"):
        A.get_image(str(out), "empty.jpg")
    assert json.loads((out / A.REPORT).read_text())["exit_code"] == C.EXIT_FAILED_IMAGES
    assert {f["key"] for f in report["failure_examples"]} >= {"too_big.png", "empty.jpg", "r1"}


# ---------------------------------------------------------------- actor planning


@pytest.mark.parametrize("options, gpus, cpus, shards, expected", [
    ({}, 0, 2, 100, (2, False, 0.0)),  # CPU cluster: one actor per CPU
    ({"cpus_per_actor": 2}, 0, 8, 100, (4, False, 0.0)),
    ({}, 1, 16, 100, (4, True, 0.25)),  # one GPU: up to 4 actors share it
    ({}, 2, 4, 100, (4, True, 0.5)),  # the CPUs allow only 2 per GPU
    ({"actors_per_gpu": 1}, 2, 16, 100, (2, True, 1.0)),
    ({"use_gpu": False}, 2, 16, 100, (16, False, 0.0)),
    ({}, 1, 16, 3, (3, True, 0.25)),  # never more actors than shards
    ({"actors": 3}, 1, 16, 100, (3, True, 0.25)),
])
def test_actor_plan_from_cluster_resources(options, gpus, cpus, shards, expected):
    from pipeline.jobs.compress import RayOptions
    from pipeline.jobs.runner import plan_actors

    plan = plan_actors(RayOptions(**options), gpus, cpus, shards)
    assert (plan.actors, plan.use_gpu, plan.gpu_per_actor) == expected


@pytest.mark.parametrize("options, gpus, cpus, message", [
    ({"use_gpu": True}, 0, 8, "no GPUs"),
    ({"actors": 9}, 2, 32, "2 GPU(s) x ray.actors_per_gpu=4"),
    ({"actors": 5, "use_gpu": False}, 0, 4, "the cluster has 4 CPUs"),
    ({"actors_per_gpu": 8}, 1, 4, "need 8 CPUs"),
])
def test_actor_plan_refuses_what_the_cluster_lacks(options, gpus, cpus, message):
    from pipeline.jobs.compress import RayOptions
    from pipeline.jobs.runner import plan_actors

    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_actors(RayOptions(**options), gpus, cpus, 100)
