"""Resume and concurrency safety of `m2t compress` (issue 13): resume checks what it trusts,
one writer per archive (pipeline/lease.py), orphaned workers are fenced off, and leftovers
of dead jobs are cleaned up. Real parts throughout: a tiny checkpoint, PNG inputs, real
entropy coding, Parquet indexes, the local filesystem, a loopback S3 server (moto) and the
shared Ray cluster for the orphaned-actor case.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2t_core import M2TCodec, ModelConfig, save_checkpoint
from m2t_core.config import ConfigError
from pipeline.storage import archive as A
from pipeline.jobs import compress as C
from pipeline.jobs.runner import Placement
from pipeline.storage import lease as L
from pipeline.storage.sources import plan_shards

TINY = ModelConfig(N=16, C=8, blocks_per_stage=1, window=4, d_model=32, n_layers=1, n_heads=2, d_mlp=64,
                   num_steps=4)
N_IMAGES = 6  # shard_size=2: three shards


def _image(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:48].astype(np.float64)
    img = np.stack([128 + 90 * np.sin(0.1 * (c + 1) * yy + 0.07 * xx + seed) for c in range(3)], axis=-1)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = M2TCodec(TINY, model_id="tiny-lease")
    last = [m for m in model.g_a.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == TINY.C][-1]
    with torch.no_grad():
        last.weight.mul_(8.0)
        last.bias.mul_(8.0)
    path = tmp_path_factory.mktemp("model") / "tiny-lease.safetensors"
    save_checkpoint(model.eval(), path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "in"
    root.mkdir()
    for i in range(N_IMAGES):
        (root / f"img{i}.png").write_bytes(_image(i))
    return root


def config(corpus, output, checkpoint, *sets: str, storage_options=None) -> C.CompressConfig:
    cfg = C.load_config(None, ["shard_size=2", "torch_threads=1", "ray.enabled=false", *sets])
    return C.CompressConfig(**{**cfg.__dict__, "input": str(corpus), "output": str(output),
                               "model": str(checkpoint), "storage_options": storage_options or {}})


def cli(corpus, output, checkpoint, *extra: str) -> list[str]:
    return [str(corpus), str(output), "--model", str(checkpoint), "--no-progress", "--no-ray",
            "--set", "shard_size=2", "--set", "torch_threads=1", *extra]


def bitstreams(archive: str, storage_options=None) -> dict[str, bytes]:
    return {f"img{i}.png": A.read_bitstream(archive, f"img{i}.png", storage_options) for i in range(N_IMAGES)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, checkpoint) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "ref.m2t"
    report, code = C.compress_dataset(config(corpus, out, checkpoint), progress=False)
    assert code == C.EXIT_OK, C.format_report(report)
    return bitstreams(str(out))


def fresh_archive(tmp_path, corpus, checkpoint, name="a.m2t") -> Path:
    out = tmp_path / name
    report, code = C.compress_dataset(config(corpus, out, checkpoint), progress=False)
    assert code == C.EXIT_OK and report["shards"]["planned"] == 3
    assert not (out / L.LEASE).exists()  # released at the end
    return out


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lease(archive: Path, **changes) -> L.LeaseInfo:
    info = L.LeaseInfo.new(timeout_s=60)
    for k, v in changes.items():
        setattr(info, k, v)
    archive.mkdir(parents=True, exist_ok=True)
    (archive / L.LEASE).write_bytes(info.to_bytes())
    return info


# ====================================================================== item 6: resume checks


def test_resume_redoes_deleted_and_truncated_shards(tmp_path, corpus, checkpoint, reference):
    out = fresh_archive(tmp_path, corpus, checkpoint)
    shards = sorted(p.name[:-len(".stats.json")] for p in (out / "shards").glob("*.stats.json"))
    (out / "shards" / f"{shards[0]}.bin").unlink()
    blob = out / "shards" / f"{shards[1]}.bin"
    blob.write_bytes(blob.read_bytes()[:-7])

    report, code = C.compress_dataset(config(corpus, out, checkpoint), progress=False)
    text = C.format_report(report)
    assert code == C.EXIT_OK, text
    damaged = report["shards"]["damaged"]
    assert sorted(damaged) == shards[:2], text
    assert "missing" in damaged[shards[0]] and "bytes" in damaged[shards[1]]
    assert report["shards"]["already_done"] == 1 and report["shards"]["this_run"] == 2
    assert "damaged shards found (2" in text and shards[0] in text
    assert bitstreams(str(out)) == reference  # every key readable again, CRC-checked
    assert (out / A.MANIFEST).exists()


def test_verify_existing_catches_flipped_bits(tmp_path, corpus, checkpoint, reference, capsys):
    out = fresh_archive(tmp_path, corpus, checkpoint)
    shard = sorted(p.name[:-len(".stats.json")] for p in (out / "shards").glob("*.stats.json"))[2]
    blob = out / "shards" / f"{shard}.bin"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size: only the CRC check sees it
    blob.write_bytes(bytes(data))

    report, code = C.compress_dataset(config(corpus, out, checkpoint), progress=False)
    assert report["shards"]["damaged"] == {} and report["shards"]["already_done"] == 3  # the cheap check's limit
    assert C.main(cli(corpus, out, checkpoint, "--verify-existing")) == C.EXIT_OK
    printed = capsys.readouterr().out
    saved = json.loads((out / A.REPORT).read_text())
    assert list(saved["shards"]["damaged"]) == [shard] and saved["shards"]["verified"]
    assert "CRC-32" in saved["shards"]["damaged"][shard] and "img" in saved["shards"]["damaged"][shard]
    assert saved["shards"]["this_run"] == 1 and f"{shard}:" in printed
    assert bitstreams(str(out)) == reference


def test_verify_existing_is_a_config_key(tmp_path):
    assert C.load_config(None, ["verify_existing=true"]).verify_existing is True
    with pytest.raises(ConfigError, match="lease_timeout_s"):
        C.load_config(None, ["lease_timeout_s=0"])


def test_resume_on_s3_checks_sizes_and_holds_a_lease(tmp_path, corpus, checkpoint, reference, s3_bucket):
    bucket, options = s3_bucket
    url = f"s3://{bucket}/archive"
    so = {"s3": options}
    report, code = C.compress_dataset(config(corpus, url, checkpoint, storage_options=so), progress=False)
    assert code == C.EXIT_OK
    archive = A.Archive(url, so)
    assert not archive.fs.exists(archive.path(L.LEASE))
    shard = sorted(p.rsplit("/", 1)[-1][:-len(".stats.json")] for p in archive.fs.ls(archive.path("shards"), detail=False)
                   if p.endswith(".stats.json"))[1]
    archive.fs.rm(archive.shard_path(shard, ".bin"))
    # While a job holds the archive on S3, a second one is refused.
    with L.ArchiveLease(url, so, timeout_s=60):
        with pytest.raises(L.LeaseHeldError, match="in use by another m2t compress"):
            C.compress_dataset(config(corpus, url, checkpoint, storage_options=so), progress=False)
    report, code = C.compress_dataset(config(corpus, url, checkpoint, storage_options=so), progress=False)
    assert code == C.EXIT_OK and list(report["shards"]["damaged"]) == [shard]
    assert bitstreams(url, so) == reference


# ====================================================================== item 7: one writer


def test_a_second_job_is_refused_while_the_first_runs(tmp_path, corpus, checkpoint, capsys):
    out = tmp_path / "busy.m2t"
    with L.ArchiveLease(str(out), timeout_s=60, heartbeat_s=0.2) as first:
        time.sleep(0.5)  # heartbeats happen
        before = sorted(p.name for p in out.iterdir())
        assert C.main(cli(corpus, out, checkpoint)) == C.EXIT_USAGE
        err = capsys.readouterr().err
        assert "in use by another m2t compress" in err and f"pid {os.getpid()}" in err
        assert first.owner[:8] in err and "last heartbeat 0 s ago" in err
        # --break-lease does not break a live lease, and nothing was written or deleted.
        with pytest.raises(L.LeaseHeldError, match="in use"):
            C.compress_dataset(config(corpus, out, checkpoint), progress=False, break_lease=True)
        with pytest.raises(L.LeaseHeldError):
            C.compress_dataset(config(corpus, out, checkpoint), overwrite=True, progress=False)
        assert sorted(p.name for p in out.iterdir()) == before == [L.LEASE]
        first.check()
    assert not (out / L.LEASE).exists()
    assert C.main(cli(corpus, out, checkpoint)) == C.EXIT_OK  # free again


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_lease_is_taken_atomically(tmp_path, where, request):
    if where == "s3":
        bucket, options = request.getfixturevalue("s3_bucket")
        url, so = f"s3://{bucket}/race", {"s3": options}
    else:
        url, so = str(tmp_path / "race"), None
    won, refused = [], []
    barrier = threading.Barrier(8)

    def contender():
        barrier.wait()
        try:
            won.append(L.ArchiveLease(url, so, timeout_s=60).acquire())
        except L.LeaseHeldError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=contender) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7, refused
    assert L.read_lease(url, so).owner == won[0].owner
    won[0].renew()  # a conditional replace of its own lease works
    L.check_holder(url, so, won[0].owner)
    with pytest.raises(L.LeaseLostError, match="no longer holds the lease"):
        L.check_holder(url, so, "0" * 32, what="shard 00007 not committed")
    # Taken over behind its back (as --break-lease does to a stalled job): it notices, and its
    # release leaves the new holder's lease alone.
    first = won[0]
    assert first.store.delete(first.version)
    second = L.ArchiveLease(url, so, timeout_s=60).acquire()
    with pytest.raises(L.LeaseLostError, match="now held by"):
        first.renew()
    with pytest.raises(L.LeaseLostError):
        first.check()
    first.release()
    assert L.read_lease(url, so).owner == second.owner
    second.release()
    assert L.read_lease(url, so) is None


def test_stale_lease_is_broken_only_with_the_flag(tmp_path, corpus, checkpoint, capsys):
    out = tmp_path / "stale.m2t"
    old = write_lease(out, host="another-host", heartbeat=time.time() - 3600)
    assert C.main(cli(corpus, out, checkpoint)) == C.EXIT_USAGE
    err = capsys.readouterr().err
    assert "stale lease" in err and "another-host" in err and "--break-lease" in err
    assert L.read_lease(str(out)).owner == old.owner  # untouched
    # A live lease of another host (fresh heartbeat) is not broken even with the flag.
    write_lease(out, host="another-host")
    with pytest.raises(L.LeaseHeldError, match="in use"):
        C.compress_dataset(config(corpus, out, checkpoint), progress=False, break_lease=True)
    write_lease(out, host="another-host", heartbeat=time.time() - 3600)
    assert C.main(cli(corpus, out, checkpoint, "--break-lease")) == C.EXIT_OK
    report = json.loads((out / A.REPORT).read_text())
    assert "another-host" in report["lease"]["broke_stale_lease_of"]
    assert not (out / L.LEASE).exists()


def test_an_unreadable_lease_is_refused_then_broken_with_the_flag(tmp_path, corpus, checkpoint, capsys):
    out = tmp_path / "corrupt.m2t"
    out.mkdir()
    (out / L.LEASE).write_bytes(b'{"format": "m2t-le')  # a crash mid-write on a non-atomic store
    assert C.main(cli(corpus, out, checkpoint)) == C.EXIT_USAGE
    assert "not a valid lease file" in capsys.readouterr().err
    assert C.main(cli(corpus, out, checkpoint, "--break-lease")) == C.EXIT_OK
    assert not (out / L.LEASE).exists()


def test_the_lease_is_released_when_the_job_fails(tmp_path, corpus, checkpoint):
    out = fresh_archive(tmp_path, corpus, checkpoint)
    with pytest.raises(ConfigError, match="compute_psnr"):  # raised after the lease was taken
        C.compress_dataset(config(corpus, out, checkpoint, "compute_psnr=false"), progress=False)
    assert not (out / L.LEASE).exists()


# ====================================================================== item 8: killed drivers, orphans


def test_rerun_after_a_killed_driver_takes_over_and_cleans_up(tmp_path, corpus, checkpoint, reference):
    out = fresh_archive(tmp_path, corpus, checkpoint)
    shards = sorted(p.name[:-len(".stats.json")] for p in (out / "shards").glob("*.stats.json"))
    # What a SIGKILLed driver on this host leaves: its lease (process gone), a shard in the
    # middle of its commit (no stats), its workers' temporaries.
    write_lease(out, pid=dead_pid())
    (out / "shards" / f"{shards[2]}.stats.json").unlink()
    leftovers = [out / "shards" / f"{shards[2]}.bin.4242-deadbeef.tmp", out / "shards" / f"{shards[2]}.parquet.tmp",
                 out / "report.json.77-0badf00d.tmp"]
    for path in leftovers:
        path.write_bytes(b"partial")
    report, code = C.compress_dataset(config(corpus, out, checkpoint), progress=False)
    assert code == C.EXIT_OK, C.format_report(report)
    assert report["stale_temporaries_removed"] == 3 and not any(p.exists() for p in leftovers)
    assert report["lease"]["broke_stale_lease_of"] and report["shards"]["this_run"] == 1
    assert not list(out.rglob("*.tmp")) and not (out / L.LEASE).exists()
    assert bitstreams(str(out)) == reference


def _spec_and_job(corpus, out, checkpoint, owner: str):
    from m2t_core import load_model

    model = load_model(str(checkpoint))
    spec = plan_shards([str(corpus)], 2)[1]
    job = C.ShardSettings(output=str(out), storage_options={}, model_source=str(checkpoint), model_id=model.model_id,
                          weights_sha256=model.weights_digest().hex(), max_pixels=64_000_000, compute_psnr=True,
                          batch_images=0, coding_threads=-1, max_source_bytes=1 << 28, prefetch=2, torch_threads=1,
                          cpus_per_actor=1, lease_owner=owner)
    return model, spec, job


def test_an_orphaned_worker_cannot_touch_the_new_jobs_shards(tmp_path, corpus, checkpoint):
    out = fresh_archive(tmp_path, corpus, checkpoint)
    old = write_lease(out, pid=dead_pid())  # the killed job ...
    model, spec, job = _spec_and_job(corpus, out, checkpoint, old.owner)
    (out / "shards" / f"{spec.shard}.stats.json").unlink()  # ... was writing this shard
    C.compress_shard(model, spec, job)  # while it held the lease, its worker could commit
    assert (out / "shards" / f"{spec.shard}.stats.json").exists()
    (out / "shards" / f"{spec.shard}.stats.json").unlink()
    files = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    with L.ArchiveLease(str(out), timeout_s=60) as new:  # the rerun takes over
        assert new.broken.owner == old.owner
        with pytest.raises(L.LeaseLostError, match=f"shard {spec.shard} not cleared.*no longer holds the lease"):
            C.compress_shard(model, spec, job)
        assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == files  # nothing deleted or added


def test_an_orphaned_ray_actor_is_fenced(tmp_path, corpus, checkpoint, ray_cluster):
    ray = ray_cluster
    out = fresh_archive(tmp_path, corpus, checkpoint)
    old = write_lease(out, pid=dead_pid())
    _, spec, job = _spec_and_job(corpus, out, checkpoint, old.owner)
    (out / "shards" / f"{spec.shard}.stats.json").unlink()
    # A job's worker on an actor that lives on after "its driver" died.
    actor = ray.remote(C.ShardWorker).options(num_cpus=1).remote(job, Placement(ray=True, cpus=1))
    try:
        with L.ArchiveLease(str(out), timeout_s=60):
            with pytest.raises(ray.exceptions.RayTaskError, match="no longer holds the lease"):
                ray.get(actor.process.remote(spec.to_dict()), timeout=120)
        assert not (out / "shards" / f"{spec.shard}.stats.json").exists()
    finally:
        ray.kill(actor)


def test_an_aborted_blob_leaves_nothing_behind(tmp_path, s3_bucket):
    bucket, options = s3_bucket
    for url, so in ((str(tmp_path / "local"), None), (f"s3://{bucket}/blob", {"s3": options})):
        archive = A.Archive(url, so)
        blob = archive.open_blob("00000")
        blob.append(b"x" * 1000)
        blob.abort()
        archive.fs.invalidate_cache()
        assert not archive.fs.exists(archive.shard_path("00000", ".bin")), url
        if archive.local:
            assert not list((tmp_path / "local" / "shards").iterdir())
