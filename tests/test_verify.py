"""The decode job (pipeline/verify.py): verify an archive bit for bit, catch every kind of
tampering, restore images identical to `m2t decode`. A real local Ray cluster (the shared
fixture), a loopback S3 server (moto), and a tiny random-init checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m2t_core import save_checkpoint
from pipeline.cli import main as m2t_main
from pipeline.storage import archive as A
from pipeline.jobs import compress as C
from pipeline.jobs import verify as V
from test_compress import TINY, H, W, add_member, build_model, job_config, png_bytes, random_image

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vmodel") / "tiny-verify.safetensors"
    save_checkpoint(build_model(TINY, model_id="tiny-verify"), path)
    # Installed (as a user would): an archive's bitstreams select their model from the
    # registry by name + weights hash; the path in its manifest is never opened.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("M2T_MODEL_PATH", os.pathsep.join(filter(None, [str(path.parent), os.environ.get("M2T_MODEL_PATH")])))
        yield path


@pytest.fixture(scope="module")
def archive(tmp_path_factory, checkpoint) -> Path:
    """A 2-shard archive: two PNG files (shard 00000) and a tar of two members (shard 00001)."""
    root = tmp_path_factory.mktemp("vcorpus") / "in"
    (root / "photos").mkdir(parents=True)
    for i in range(2):
        (root / "photos" / f"img{i}.png").write_bytes(png_bytes(random_image(H, W, seed=40 + i)))
    with tarfile.open(root / "t.tar", "w") as tar:
        for i in range(2):
            add_member(tar, f"{i}.png", png_bytes(random_image(H, W, seed=50 + i)))
    out = tmp_path_factory.mktemp("varchive") / "a.m2t"
    report, code = C.compress_dataset(job_config(str(root), out, checkpoint, "ray.enabled=false"), progress=False)
    assert code == C.EXIT_OK and report["shards"]["planned"] == 2
    return out


def rows_of(archive: Path, shard: str) -> list[dict]:
    return pq.read_table(archive / "shards" / f"{shard}.parquet").to_pylist()


def write_rows(archive: Path, shard: str, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=A.index_schema()), archive / "shards" / f"{shard}.parquet")


def reseal(archive: Path) -> None:
    """What anyone can do without the signing key: recompute every row digest and the
    manifest's digests after changing the archive (so only a signature can tell)."""
    import hashlib

    from pipeline.storage.integrity import stream_digest

    m = json.loads((archive / A.MANIFEST).read_text())
    for entry in m["shards"]:
        shard = entry["shard"]
        blob = (archive / "shards" / f"{shard}.bin").read_bytes()
        rows = rows_of(archive, shard)
        for r in rows:
            if r["status"] == "ok":
                r["digest"] = stream_digest(r["key"], blob[r["offset"]:r["offset"] + r["length"]])
        write_rows(archive, shard, rows)
        entry["sha256"] = {n: hashlib.sha256((archive / "shards" / f"{shard}.{n}").read_bytes()).hexdigest()
                           for n in ("bin", "parquet")}
    m["keys_sha256"] = hashlib.sha256((archive / A.KEYS_INDEX).read_bytes()).hexdigest()
    (archive / A.MANIFEST).write_text(json.dumps(m))


def verify(archive, tmp_path, *extra) -> tuple[int, dict]:
    report = tmp_path / "verify-report.json"
    code = V.verify_main([str(archive), "--no-progress", "--report", str(report), *extra])
    return code, json.loads(report.read_text())


def test_clean_archive_on_ray_decodes_each_shard_once(archive, tmp_path, ray_cluster, capsys):
    code, report = verify(archive, tmp_path, "--actors", "2", "--against-source")
    assert code == V.EXIT_OK, report["issues"]
    assert report["images"] == report["verified"] == 4 and not report["issues"]
    runner = report["runner"]
    assert (runner["ray"], runner["actors"], runner["use_gpu"], runner["cpus_per_actor"]) == (True, 2, False, 1.0)
    assert report["shards"]["decode_counts"] == {"00000": 1, "00001": 1}
    # Usually one shard on each actor; an actor that is up first may take both while the
    # other starts (the pool never lets a ready actor idle), so that is allowed too.
    assert 1 <= len(report["workers"]) <= 2
    assert sorted(report["peak_rss_mib"]) == report["workers"] and min(report["peak_rss_mib"].values()) > 0
    assert report["images_per_s"] > 0
    assert "CLEAN" in capsys.readouterr().out


def test_clean_archive_on_s3(archive, tmp_path, s3_bucket, ray_cluster):
    import s3fs

    bucket, options = s3_bucket
    s3fs.S3FileSystem(**options).put(str(archive) + "/", f"{bucket}/a.m2t/", recursive=True)
    storage = json.dumps({"s3": options})
    code, report = verify(f"s3://{bucket}/a.m2t", tmp_path, "--storage-options", storage, "--actors", "2")
    assert code == V.EXIT_OK and report["verified"] == 4, report["issues"]
    code, report = verify(f"s3://{bucket}/a.m2t", tmp_path, "--storage-options", storage, "--no-ray",
                          "--shards", "00001")
    assert code == V.EXIT_OK and report["verified"] == 2 and report["shards"]["checked"] == 1


def _flip(a: Path):
    row = rows_of(a, "00000")[1]
    blob = bytearray((a / "shards" / "00000.bin").read_bytes())
    blob[row["offset"] + row["length"] // 2] ^= 0x10
    (a / "shards" / "00000.bin").write_bytes(bytes(blob))
    return "00000", row["key"], "crc_mismatch"


def _truncate(a: Path):
    data = (a / "shards" / "00001.bin").read_bytes()
    (a / "shards" / "00001.bin").write_bytes(data[: len(data) - 5])
    return "00001", None, "truncated_blob"


def _missing_blob(a: Path):
    (a / "shards" / "00001.bin").unlink()
    return "00001", None, "missing_blob"


def _bad_offset(a: Path):
    rows = rows_of(a, "00000")
    rows[0]["offset"] = 10 ** 12
    write_rows(a, "00000", rows)
    return "00000", rows[0]["key"], "bad_offset"


def _unknown_model(a: Path):
    m = json.loads((a / A.MANIFEST).read_text())
    m["model"]["weights_hash"] = "00" * 8
    (a / A.MANIFEST).write_text(json.dumps(m))
    return None, None, "model_unavailable"


def _version(a: Path):
    rows = rows_of(a, "00001")
    blob = bytearray((a / "shards" / "00001.bin").read_bytes())
    blob[rows[0]["offset"] + 4] = 99  # the format version byte; the index CRC updated to match
    rows[0]["crc32"] = zlib.crc32(bytes(blob[rows[0]["offset"]:rows[0]["offset"] + rows[0]["length"]]))
    (a / "shards" / "00001.bin").write_bytes(bytes(blob))
    write_rows(a, "00001", rows)
    return "00001", rows[0]["key"], "unsupported_version"


def _no_marker(a: Path):
    (a / "shards" / "00000.stats.json").unlink()
    return "00000", None, "incomplete_shard"


@pytest.mark.parametrize("tamper", [_flip, _truncate, _missing_blob, _bad_offset, _unknown_model, _version,
                                    _no_marker], ids=lambda f: f.__name__.strip("_"))
def test_tampering_is_detected(archive, tmp_path, tamper, capsys):
    copy = tmp_path / "t.m2t"
    shutil.copytree(archive, copy)
    shard, key, kind = tamper(copy)
    code, report = verify(copy, tmp_path, "--no-ray")
    assert code == V.EXIT_ISSUES
    found = [i for i in report["issues"] if i["kind"] == kind]
    assert found, report["issues"]
    assert found[0]["shard"] == shard and (key is None or found[0]["key"] == key)
    message = found[0]["message"]
    assert (shard or "tiny-verify") in message and (key is None or key in message)
    assert kind in capsys.readouterr().out  # in the printed table too


def test_batched_decoding_isolates_a_stream_that_decodes_wrong(archive, tmp_path):
    """--batch-images 4: the windows of several images share each transformer step. A stream
    that passes every header check but decodes wrong (a payload byte changed, both CRCs
    rewritten to match) is one decode_error; the rest of its batch verifies."""
    import dataclasses

    from m2t_core import bitstream as bs

    code, report = verify(archive, tmp_path, "--no-ray", "--batch-images", "4")
    assert code == V.EXIT_OK and report["verified"] == 4, report["issues"]
    # The integer g_s: batched pixels are the encoder's too, so every image is compared.
    assert report["checks"]["pixels_compared"] == 4 and report["checks"]["pixels_not_compared"] == 0
    model = build_model(TINY, model_id="tiny-verify")
    same = {"numerics": model.numerics()}
    assert V.pixels_comparable(same, model, 1) and V.pixels_comparable(same, model, 4)
    # An archive of m2t 0.3 (float g_s): only under the environment that wrote it, one at a time.
    from m2t_core.model import numerics_environment

    old = {"numerics": numerics_environment(model.device, model.transforms_implementation())}
    assert V.pixels_comparable(old, model, 1) and not V.pixels_comparable(old, model, 4)
    assert not V.pixels_comparable({"numerics": {**old["numerics"], "transform_batch": 16}}, model, 1)
    assert not V.pixels_comparable({"numerics": {**old["numerics"], "threads": 99}}, model, 1)
    assert not V.pixels_comparable(None, model, 1)

    copy = tmp_path / "b.m2t"
    shutil.copytree(archive, copy)
    rows = rows_of(copy, "00000")
    row = rows[0]
    blob = bytearray((copy / "shards" / "00000.bin").read_bytes())
    header, payload = bs.unpack(bytes(blob[row["offset"]:row["offset"] + row["length"]]))
    bad = bytearray(payload)
    bad[len(bad) // 3] ^= 0x5A
    data = bs.pack(dataclasses.replace(header, payload_crc=zlib.crc32(bytes(bad))), bytes(bad))
    assert len(data) == row["length"]
    blob[row["offset"]:row["offset"] + row["length"]] = data
    row["crc32"] = zlib.crc32(data)
    (copy / "shards" / "00000.bin").write_bytes(bytes(blob))
    write_rows(copy, "00000", rows)
    reseal(copy)  # digests rewritten too: only decoding can tell
    for extra in (["--batch-images", "4"], []):
        code, report = verify(copy, tmp_path, "--no-ray", *extra)
        assert code == V.EXIT_ISSUES
        assert [(i["kind"], i["key"]) for i in report["issues"]] == [("decode_error", row["key"])], extra
        assert report["verified"] == 3
    assert V.verify_main([str(archive), "--no-ray", "--batch-images", "-1"]) == V.EXIT_USAGE


def test_restore_matches_m2t_decode_and_resumes(archive, tmp_path, checkpoint):
    out = tmp_path / "restored"
    assert V.restore_main([str(archive), str(out), "--no-ray", "--no-progress"]) == V.EXIT_OK
    report = json.loads((out / V.RESTORE_REPORT).read_text())
    assert report["written"] == 4 and set(report["files"]) == {"photos/img0.png", "photos/img1.png",
                                                              "t.tar/0.png", "t.tar/1.png"}
    for key, rel in report["files"].items():
        bitstream = tmp_path / "one.m2t"
        bitstream.write_bytes(A.read_bitstream(str(archive), key))
        ref = tmp_path / "ref.png"
        assert m2t_main(["decode", str(bitstream), str(ref), "--model", str(checkpoint)]) == 0
        assert (out / rel).read_bytes() == ref.read_bytes(), key
    # Rerun: everything already there is skipped; a deleted file is written again.
    (out / report["files"]["t.tar/1.png"]).unlink()
    assert V.restore_main([str(archive), str(out), "--no-ray", "--no-progress"]) == V.EXIT_OK
    report = json.loads((out / V.RESTORE_REPORT).read_text())
    assert report["written"] == 1 and report["skipped"] == 3


def test_restore_refuses_keys_that_escape(archive, tmp_path):
    for bad in ("../../x", "/etc/passwd", "a/../../b", "a//b", "./a", "C:/x", "a\\..\\b", "s3://b/k", ""):
        assert V.safe_relpath(bad, ".png") is None, bad
    assert V.safe_relpath("2019/beach.jpg", ".png") == "2019/beach.jpg.png"
    copy = tmp_path / "evil.m2t"
    shutil.copytree(archive, copy)
    rows = rows_of(copy, "00000")
    rows[0]["key"] = "../../escaped"
    write_rows(copy, "00000", rows)
    reseal(copy)
    out = tmp_path / "deep" / "out"
    code = V.restore_main([str(copy), str(out), "--no-ray", "--no-progress", "--shards", "00000"])
    assert code == V.EXIT_ISSUES
    report = json.loads((out / V.RESTORE_REPORT).read_text())
    assert [i["kind"] for i in report["issues"]] == ["unsafe_key"] and report["written"] == 1
    assert not list(tmp_path.rglob("escaped*"))


def test_usage_errors_and_job_entry(archive, tmp_path):
    assert V.verify_main([]) == V.EXIT_USAGE
    assert V.verify_main([str(archive), "--no-ray", "--shards", "99999", "--report", str(tmp_path / "r")]) == V.EXIT_USAGE
    assert V.verify_main([str(tmp_path / "nothing"), "--no-ray"]) == V.EXIT_INCOMPLETE
    rc = subprocess.run([sys.executable, str(REPO / "jobs" / "decompress.py"), "verify", str(archive), "--no-ray",
                         "--no-progress", "--report", str(tmp_path / "job.json")], capture_output=True, text=True,
                        timeout=300)
    assert rc.returncode == 0, rc.stderr[-2000:]
    assert json.loads((tmp_path / "job.json").read_text())["verified"] == 4


def test_no_ray_retries_a_shard_whose_worker_failed(archive, tmp_path, monkeypatch, caplog):
    """In-process runs retry a shard whose worker raised (--shard-retries), as the Ray pool does:
    a transient failure (here: the first read of shard 00001 fails) leaves the run clean."""
    real, calls = V.process_shard, []

    def flaky(model, shard, job):
        calls.append(shard)
        if shard == "00001" and calls.count(shard) == 1:
            raise ConnectionResetError("transient: connection reset by peer")
        return real(model, shard, job)

    monkeypatch.setattr(V, "process_shard", flaky)
    code, report = verify(archive, tmp_path, "--no-ray")
    assert code == V.EXIT_OK, report["issues"]
    assert calls == ["00000", "00001", "00001"] and report["verified"] == 4
    assert report["shards"]["failed"] == {} and report["shards"]["decode_counts"] == {"00000": 1, "00001": 1}
    assert "shard 00001 failed (attempt 1 of 3), retrying" in caplog.text


def test_no_ray_shard_failing_every_attempt_is_incomplete(archive, tmp_path, monkeypatch):
    real, calls = V.process_shard, []

    def broken(model, shard, job):
        calls.append(shard)
        if shard == "00000":
            raise OSError("disk gone")
        return real(model, shard, job)

    monkeypatch.setattr(V, "process_shard", broken)
    code, report = verify(archive, tmp_path, "--no-ray", "--shard-retries", "1")
    assert code == V.EXIT_INCOMPLETE and calls.count("00000") == 2  # 1 + --shard-retries
    assert report["shards"]["failed"] == {"00000": "OSError: disk gone"}
    assert [i["kind"] for i in report["issues"]] == ["worker_failed"] and report["verified"] == 2


def test_signed_archives_refuse_what_does_not_match(archive, tmp_path, checkpoint, monkeypatch, capsys):
    """Issue 26, item 4: with a key the manifest is signed (HMAC-SHA256); verify and get given
    the key refuse a changed manifest or index, even one whose digests were all recomputed."""
    key_file = tmp_path / "key"
    key_file.write_text("a-secret-of-at-least-16-bytes\n")
    root = tmp_path / "in"
    root.mkdir()
    for i in range(2):
        (root / f"s{i}.png").write_bytes(png_bytes(random_image(H, W, seed=60 + i)))
    signed = tmp_path / "signed.m2t"
    code = m2t_main(["compress", str(root), str(signed), "--no-ray", "--no-progress", "--model", str(checkpoint),
                     "--set", "torch_threads=1", "--sign-key-file", str(key_file)])
    assert code == C.EXIT_OK, capsys.readouterr()
    manifest = json.loads((signed / A.MANIFEST).read_text())
    assert manifest["signature"]["algorithm"] == "HMAC-SHA256" and "secret" not in json.dumps(manifest)
    assert all(set(s["sha256"]) == {"bin", "parquet"} for s in manifest["shards"]) and manifest["keys_sha256"]
    code, report = verify(signed, tmp_path, "--no-ray", "--sign-key-file", str(key_file))
    assert code == V.EXIT_OK and report["verified"] == 2, report["issues"]
    assert m2t_main(["get", str(signed), "s0.png", str(tmp_path / "o.png"), "--sign-key-file", str(key_file)]) == 0
    # Another key: nothing is read.
    monkeypatch.setenv("M2T_SIGN_KEY", "another-key-16-bytes-or-more")
    code, report = verify(signed, tmp_path, "--no-ray")
    assert code == V.EXIT_ISSUES and report["images"] == 0
    assert [i["kind"] for i in report["issues"]] == ["bad_signature"], report["issues"]
    assert m2t_main(["get", str(signed), "s0.png", str(tmp_path / "o.png")]) == 2
    assert "signature does not match" in capsys.readouterr().err
    monkeypatch.delenv("M2T_SIGN_KEY")
    # Rows remapped in the shard index and keys.parquet, every digest recomputed: unsigned checks
    # pass, the signature does not.
    rows = rows_of(signed, "00000")
    rows[0]["key"], rows[1]["key"] = rows[1]["key"], rows[0]["key"]  # s0.png now names s1's stream
    write_rows(signed, "00000", rows)
    reseal(signed)
    rows = {r["key"]: r for r in rows_of(signed, "00000")}
    keys = [{n: rows[r["key"]].get(n, r[n]) for n in r} for r in pq.read_table(signed / A.KEYS_INDEX).to_pylist()]
    pq.write_table(pa.Table.from_pylist(keys, schema=A.keys_schema()), signed / A.KEYS_INDEX)
    reseal(signed)
    code, report = verify(signed, tmp_path, "--no-ray")
    assert "digest_mismatch" not in {i["kind"] for i in report["issues"]}, report["issues"]
    code, report = verify(signed, tmp_path, "--no-ray", "--sign-key-file", str(key_file))
    assert code == V.EXIT_ISSUES and [i["kind"] for i in report["issues"]] == ["bad_signature"], report["issues"]
    assert m2t_main(["get", str(signed), "s0.png", str(tmp_path / "o.png"), "--sign-key-file", str(key_file)]) == 2
    assert "signature does not match" in capsys.readouterr().err
    # The manifest kept as signed, the index changed: the index is refused.
    (signed / A.MANIFEST).write_text(json.dumps(manifest))
    code, report = verify(signed, tmp_path, "--no-ray", "--sign-key-file", str(key_file))
    assert code == V.EXIT_ISSUES and report["verified"] == 0
    assert {i["kind"] for i in report["issues"]} == {"digest_mismatch"}, report["issues"]
    assert m2t_main(["get", str(signed), "s0.png", str(tmp_path / "o.png"), "--sign-key-file", str(key_file)]) == 2
    assert "not the index the manifest records" in capsys.readouterr().err
    # Too short a key is a usage error.
    key_file.write_text("short")
    assert m2t_main(["get", str(signed), "s0.png", str(tmp_path / "o.png"), "--sign-key-file", str(key_file)]) == 2
