"""Hostile archives (issue 13): an archive is data, never a list of paths or URLs to open.

Archives are built for real (a tiny checkpoint, in-process compression), then tampered with:
traversal shard names in keys.parquet and the manifest, URLs and local paths as the manifest's
model source, wrong types in the manifest and the indexes, huge offsets/lengths. `m2t get`,
`m2t verify` and `m2t restore` must each report a clear error or issue with the documented
exit code, never read outside the archive, never open a path or URL the archive names, and
never allocate from an unchecked size.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import m2t_core
from m2t_core import load_image, save_checkpoint
from pipeline.storage import archive as A
from pipeline.jobs import compress as C
from pipeline.jobs import verify as V
from test_compress import TINY, H, W, build_model, job_config, png_bytes, random_image

REPO = Path(__file__).resolve().parent.parent
MODEL_ID = "tiny-untrusted"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("umodel") / f"{MODEL_ID}.safetensors"
    save_checkpoint(build_model(TINY, model_id=MODEL_ID), path)
    return path


@pytest.fixture
def installed(checkpoint, monkeypatch) -> Path:
    """The checkpoint installed as a user would: its folder in $M2T_MODEL_PATH."""
    monkeypatch.setenv("M2T_MODEL_PATH", str(checkpoint.parent))
    return checkpoint


@pytest.fixture(scope="module")
def archive(tmp_path_factory, checkpoint) -> Path:
    """Two shards of three inputs: good PNGs, a 2-frame GIF, an empty file, keys with a tab
    and a newline."""
    root = tmp_path_factory.mktemp("ucorpus") / "in"
    root.mkdir()
    (root / "img0.png").write_bytes(png_bytes(random_image(H, W, seed=70)))
    (root / "img1.png").write_bytes(png_bytes(random_image(H, W, seed=71)))
    frames = [Image.fromarray(random_image(H, W, seed=s)) for s in (72, 73)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    (root / "empty.png").write_bytes(b"")
    (root / "tab\tkey.png").write_bytes(png_bytes(random_image(H, W, seed=74)))
    (root / "nl\nkey.png").write_bytes(png_bytes(random_image(H, W, seed=75)))
    out = tmp_path_factory.mktemp("uarchive") / "a.m2t"
    report, code = C.compress_dataset(job_config(str(root), out, checkpoint, "ray.enabled=false", "shard_size=3"),
                                      progress=False)
    assert code == 1, report  # the empty file and the two control-character keys
    return out


@pytest.fixture
def copy(archive, tmp_path) -> Path:
    dest = tmp_path / "deep" / "a.m2t"  # shards/../../.. is tmp_path
    shutil.copytree(archive, dest)
    return dest


def rows_of(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def ok_row(archive: Path) -> dict:
    return next(r for r in rows_of(archive / A.KEYS_INDEX) if r["status"] == "ok")


def write_keys(archive: Path, rows: list[dict], schema=None) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema or A.keys_schema()), archive / A.KEYS_INDEX)


def edit_manifest(archive: Path, change) -> None:
    m = json.loads((archive / A.MANIFEST).read_text())
    m = change(m)
    (archive / A.MANIFEST).write_text(json.dumps(m))


def get(archive: Path, key: str, out: Path, *extra: str, capsys=None) -> tuple[int, str]:
    code = A.get_main([str(archive), key, str(out), *extra])
    return code, capsys.readouterr().err if capsys else ""


def verify(archive: Path, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    report = tmp_path / "verify.json"
    code = V.verify_main([str(archive), "--no-ray", "--no-progress", "--report", str(report), *extra])
    return code, json.loads(report.read_text())


def kinds(report: dict) -> set[str]:
    return {i["kind"] for i in report["issues"]}


def plant_stream(dest: Path) -> None:
    """A valid bitstream of another image where a traversal would land."""
    model = build_model(TINY, model_id=MODEL_ID)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(m2t_core.Encoder(model).encode_image(random_image(H, W, seed=99)).bitstream)


# ---------------------------------------------------------------- the clean archive


def test_clean_archive_rows(archive, installed, tmp_path):
    rows = {r["key"]: r for r in rows_of(archive / A.KEYS_INDEX)}
    assert rows["img0.png"]["status"] == "ok"
    # Item 10: a multi-frame file is coded (frame 0) and the row says so.
    anim = next(r for shard in sorted((archive / "shards").glob("*.parquet")) for r in rows_of(shard)
                if r["key"] == "anim.gif")
    assert anim["status"] == "ok" and "2 frames" in anim["error"] and "frame 0" in anim["error"]
    # Keys with control characters are refused at compress time, with the reason.
    for key in ("tab\tkey.png", "nl\nkey.png"):
        assert rows[key]["status"] == "error" and "control character" in rows[key]["error"], rows[key]
    assert rows["empty.png"]["error"] == "empty file (0 bytes)"
    code, report = verify(archive, tmp_path)
    assert code == V.EXIT_OK, report["issues"]
    assert report["verified"] == 3


# ---------------------------------------------------------------- traversal shard names


def test_get_refuses_a_traversal_shard_in_keys_index(copy, installed, tmp_path, capsys):
    row = ok_row(copy)
    evil = tmp_path / "evil" / "x.bin"
    plant_stream(evil)
    rows = rows_of(copy / A.KEYS_INDEX)
    for r in rows:
        if r["key"] == row["key"]:
            r.update(shard="../../../evil/x", offset=0, length=evil.stat().st_size,
                     crc32=zlib.crc32(evil.read_bytes()))
    write_keys(copy, rows)
    assert (copy / "shards" / "../../../evil/x.bin").resolve() == evil.resolve()  # the traversal would land there
    code, err = get(copy, row["key"], tmp_path / "out.png", capsys=capsys)
    assert code == A.EXIT_USAGE and "unsafe shard name" in err, err
    assert not (tmp_path / "out.png").exists()
    code, err = get(copy, row["key"], tmp_path / "out.m2t", "--bitstream", capsys=capsys)
    assert code == A.EXIT_USAGE and "unsafe shard name" in err and not (tmp_path / "out.m2t").exists()


def test_verify_and_restore_refuse_a_traversal_shard_in_the_manifest(copy, installed, tmp_path):
    # A complete shard planted outside the archive: verify must not read it (and not say CLEAN).
    evil = tmp_path / "evil"
    evil.mkdir()
    first = json.loads((copy / A.MANIFEST).read_text())["shards"][0]["shard"]
    for suffix in (".bin", ".parquet", ".stats.json"):
        shutil.copy(copy / "shards" / f"{first}{suffix}", evil / f"shard{suffix}")

    def change(m):
        m["shards"] = [{**m["shards"][0], "shard": "../../../evil/shard"}]
        return m

    edit_manifest(copy, change)
    code, report = verify(copy, tmp_path)
    assert code == V.EXIT_ISSUES and "bad_manifest" in kinds(report), report["issues"]
    assert report["images"] == 0 and report["verified"] == 0
    assert any("../../../evil/shard" in i["message"] and "unsafe" in i["message"] for i in report["issues"])
    out = tmp_path / "restored"
    assert V.restore_main([str(copy), str(out), "--no-ray", "--no-progress"]) == V.EXIT_ISSUES
    assert not [p for p in out.rglob("*") if p.suffix == ".png"]
    # --shards cannot name it either
    code = V.verify_main([str(copy), "--no-ray", "--no-progress", "--report", str(tmp_path / "r.json"),
                          "--shards", "../../../evil/shard"])
    assert code == V.EXIT_USAGE


# ---------------------------------------------------------------- model sources in the manifest


class _Counter(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        _Counter.hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    _Counter.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_url_as_model_source_is_never_fetched(copy, installed, tmp_path, http_server, capsys):
    def change(m):
        m["model"]["source"] = f"{http_server}/m.safetensors"
        return m

    edit_manifest(copy, change)
    code, report = verify(copy, tmp_path)
    assert code == V.EXIT_OK, report["issues"]  # the installed model (name + weights hash) decodes it
    row = ok_row(copy)
    code, err = get(copy, row["key"], tmp_path / "out.png", capsys=capsys)
    assert code == A.EXIT_OK, err
    out = tmp_path / "restored"
    assert V.restore_main([str(copy), str(out), "--no-ray", "--no-progress", "--keys", row["key"]]) == V.EXIT_OK
    assert _Counter.hits == [], f"the archive made us send requests to {_Counter.hits}"


def test_a_local_path_as_model_source_is_never_loaded(copy, checkpoint, tmp_path, monkeypatch, capsys):
    # The manifest names a real, matching checkpoint by path; nothing is installed. Loading it
    # would decode everything: it must not be opened, the model is reported as unavailable.
    planted = tmp_path / "planted" / f"{MODEL_ID}.safetensors"
    planted.parent.mkdir()
    shutil.copy(checkpoint, planted)
    monkeypatch.delenv("M2T_MODEL_PATH", raising=False)

    def change(m):
        m["model"]["source"] = str(planted)
        return m

    edit_manifest(copy, change)
    code, report = verify(copy, tmp_path)
    assert code == V.EXIT_ISSUES and kinds(report) == {"model_unavailable"}, report["issues"]
    message = report["issues"][0]["message"]
    assert MODEL_ID in message and "--model" in message and "not opened" in message
    row = ok_row(copy)
    code, err = get(copy, row["key"], tmp_path / "out.png", capsys=capsys)
    assert code == A.EXIT_USAGE and MODEL_ID in err and "not installed" in err, err
    # What the user passes is used.
    code, err = get(copy, row["key"], tmp_path / "out.png", "--model", str(checkpoint), capsys=capsys)
    assert code == A.EXIT_OK, err
    code, report = verify(copy, tmp_path, "--model", str(checkpoint))
    assert code == V.EXIT_OK, report["issues"]


def test_a_model_id_that_is_a_path_is_not_loaded(copy, checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("M2T_MODEL_PATH", raising=False)

    def change(m):
        m["model"]["id"] = str(checkpoint)
        m["model"]["source"] = None
        return m

    edit_manifest(copy, change)
    code, report = verify(copy, tmp_path)
    assert code == V.EXIT_ISSUES and kinds(report) == {"model_unavailable"}, report["issues"]
    assert "malformed" in report["issues"][0]["message"]


# ---------------------------------------------------------------- wrong types, huge sizes


@pytest.mark.parametrize("manifest", [[1, 2], "text", 7, None], ids=["list", "string", "int", "null"])
def test_a_manifest_of_the_wrong_type_is_an_issue(copy, installed, tmp_path, manifest):
    (copy / A.MANIFEST).write_text(json.dumps(manifest))
    code, report = verify(copy, tmp_path)
    assert code == V.EXIT_ISSUES and "bad_manifest" in kinds(report), report["issues"]
    assert "not an object" in report["issues"][0]["message"]
    out = tmp_path / "restored"
    assert V.restore_main([str(copy), str(out), "--no-ray", "--no-progress"]) == V.EXIT_ISSUES


def test_a_manifest_that_is_not_json_is_an_issue(copy, installed, tmp_path):
    (copy / A.MANIFEST).write_text("{not json")
    code, report = verify(copy, tmp_path)
    assert code == V.EXIT_ISSUES and "bad_manifest" in kinds(report)
    assert "unparsable JSON" in report["issues"][0]["message"]


@pytest.mark.parametrize("change, expect", [
    (lambda m: {**m, "shards": {"a": 1}}, "not a list"),
    (lambda m: {**m, "shards": [{**s, "images": "many"} for s in m["shards"]]}, "not non-negative integers"),
    (lambda m: {**m, "shards": [5] + m["shards"]}, "malformed shard name"),
    (lambda m: {**m, "config": [1]}, "'config' is a list"),
    (lambda m: {**m, "config": {**m["config"], "max_pixels": "lots"}}, "max_pixels"),
    (lambda m: {**m, "model": "x"}, "'model' is a str"),
], ids=["shards-dict", "counts-str", "shard-int", "config-list", "max-pixels-str", "model-str"])
def test_manifest_fields_of_wrong_types(copy, installed, tmp_path, change, expect):
    edit_manifest(copy, change)
    code, report = verify(copy, tmp_path)
    assert code == V.EXIT_ISSUES, report["issues"]
    bad = [i for i in report["issues"] if i["kind"] == "bad_manifest"]
    assert bad and any(expect in i["message"] for i in bad), report["issues"]


def test_index_of_wrong_types(copy, installed, tmp_path, capsys):
    shard = sorted(p for p in (copy / "shards").glob("*.parquet"))[0]
    rows = rows_of(shard)
    table = pa.Table.from_pylist([{**r, "offset": None if r["offset"] is None else str(r["offset"])} for r in rows])
    pq.write_table(table, shard)
    code, report = verify(copy, tmp_path)
    assert code == V.EXIT_ISSUES, report["issues"]
    bad = [i for i in report["issues"] if i["kind"] == "missing_index"]
    assert bad and "offset is string" in bad[0]["message"], report["issues"]
    # keys.parquet with a string offset: refused before any read
    keys = rows_of(copy / A.KEYS_INDEX)
    pq.write_table(pa.Table.from_pylist([{**r, "offset": None if r["offset"] is None else str(r["offset"])}
                                         for r in keys]), copy / A.KEYS_INDEX)
    code, err = get(copy, keys[0]["key"], tmp_path / "o.png", capsys=capsys)
    assert code == A.EXIT_USAGE and "malformed" in err and "offset is string" in err, err
    # keys.parquet that is not Parquet at all
    (copy / A.KEYS_INDEX).write_bytes(b"PAR1 nonsense")
    code, err = get(copy, keys[0]["key"], tmp_path / "o.png", capsys=capsys)
    assert code == A.EXIT_USAGE and "not a readable Parquet file" in err, err


def test_stats_file_of_the_wrong_type(copy, installed, tmp_path):
    stats = sorted((copy / "shards").glob("*.stats.json"))[0]
    stats.write_text("[1, 2, 3]")
    code, report = verify(copy, tmp_path)
    assert code == V.EXIT_ISSUES
    assert any(i["kind"] == "incomplete_shard" and "malformed" in i["message"] for i in report["issues"])


@pytest.mark.parametrize("offset, length", [(10 ** 15, 100), (0, 10 ** 15), (-5, 100), (0, 0), (2 ** 62, 2 ** 62)])
def test_huge_or_negative_offsets_are_refused_before_reading(copy, installed, tmp_path, offset, length, capsys):
    row = ok_row(copy)
    keys = rows_of(copy / A.KEYS_INDEX)
    for r in keys:
        if r["key"] == row["key"]:
            r.update(offset=offset, length=length)
    write_keys(copy, keys)
    shard_index = copy / "shards" / f"{row['shard']}.parquet"
    rows = rows_of(shard_index)
    for r in rows:
        if r["key"] == row["key"]:
            r.update(offset=offset, length=length)
    pq.write_table(pa.Table.from_pylist(rows, schema=A.index_schema()), shard_index)
    code, err = get(copy, row["key"], tmp_path / "o.png", capsys=capsys)
    assert code == A.EXIT_USAGE and ("not valid" in err or "outside" in err), err
    code, report = verify(copy, tmp_path)
    assert code == V.EXIT_ISSUES
    assert any(i["kind"] == "bad_offset" and i["key"] == row["key"] for i in report["issues"]), report["issues"]
    out = tmp_path / "restored"
    assert V.restore_main([str(copy), str(out), "--no-ray", "--no-progress"]) == V.EXIT_ISSUES
    assert not (out / f"{row['key']}.png").exists()


def test_length_mismatch_message_says_what_mismatched(copy, installed, tmp_path, capsys):
    """Item 10: a length reaching past the blob's end used to print two equal CRCs."""
    keys = rows_of(copy / A.KEYS_INDEX)
    ok = [r for r in keys if r["status"] == "ok"]
    last = max(ok, key=lambda r: (r["shard"], r["offset"]))  # a stream at the end of its .bin
    for r in keys:
        if r["key"] == last["key"]:
            r["length"] += 10
    write_keys(copy, keys)
    code, err = get(copy, last["key"], tmp_path / "o.png", capsys=capsys)
    assert code == A.EXIT_USAGE and "length" in err and "outside" in err, err
    # A changed byte: the two CRCs differ and both are shown.
    keys = rows_of(copy / A.KEYS_INDEX)
    for r in keys:
        if r["key"] == last["key"]:
            r["length"] -= 10
            r["crc32"] ^= 1
    write_keys(copy, keys)
    code, err = get(copy, last["key"], tmp_path / "o.png", capsys=capsys)
    assert code == A.EXIT_USAGE and "CRC-32" in err, err
    got, want = err.split("CRC-32 ")[1][:8], err.split("index says ")[1][:8]
    assert got != want


# ---------------------------------------------------------------- item 5: get exits 2, never aborts


def test_get_of_an_error_key_exits_2_every_time(archive, installed, tmp_path):
    """`m2t get` on a key whose status is error used to abort (SIGABRT, exit 134) in about 1 of
    3 runs: Arrow threads reading keys.parquet through the Python file object were still
    alive at interpreter exit."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline.cli", "get", str(archive), "empty.png", str(tmp_path / "o.png")]
    codes, errs = [], []
    for batch in range(4):
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=120)
            codes.append(p.returncode)
            errs.append(err)
    assert codes == [2] * 8, (codes, [e[-300:] for e in errs])
    assert all("was not archived (status error): empty file (0 bytes)" in e for e in errs)
    assert not any("terminate called" in e for e in errs)


# ---------------------------------------------------------------- item 10: messages agree


def test_cli_and_job_agree_on_empty_files_and_side_limits(tmp_path, capsys):
    from m2t_core import ImageError
    from pipeline.cli import main as m2t_main

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert m2t_main(["encode", str(empty), str(tmp_path / "e.m2t")]) == 2
    assert "empty file (0 bytes)" in capsys.readouterr().err
    with pytest.raises(ImageError, match=r"empty file \(0 bytes\)"):
        load_image(b"", max_pixels=1000)
    wide = png_bytes(np.zeros((1, 70000, 3), np.uint8))
    with pytest.raises(ImageError, match="65535 pixels per side"):
        load_image(wide, max_pixels=64_000_000)
    (tmp_path / "wide.png").write_bytes(wide)
    assert m2t_main(["encode", str(tmp_path / "wide.png"), str(tmp_path / "w.m2t")]) == 2
    err = capsys.readouterr().err
    assert "65535" in err and "64000000" not in err, err


def test_an_oversized_keys_row_group_is_refused_before_reading(copy, installed, tmp_path, capsys):
    keys = rows_of(copy / A.KEYS_INDEX)
    filler = [{**keys[0], "key": f"zz{i:06d}"} for i in range(A.KEYS_ROW_GROUP + 10)]
    pq.write_table(pa.Table.from_pylist(keys + filler, schema=A.keys_schema()), copy / A.KEYS_INDEX,
                   row_group_size=len(keys) + len(filler))
    code, err = get(copy, keys[0]["key"], tmp_path / "o.png", capsys=capsys)
    assert code == A.EXIT_USAGE and "row group 0" in err and "malformed" in err, err


# ---------------------------------------------------------------- issue 26: names, index checks, tamper evidence


def _byte_name(folder: Path, name: bytes) -> Path:
    return Path(os.fsdecode(os.fsencode(str(folder)) + b"/" + name))


def test_names_that_are_not_utf8_are_archived_verified_and_restored(tmp_path, installed, checkpoint, capsys):
    """Issue 26, item 1: a file or tar member named with bytes that are not UTF-8 used to fail
    its whole shard on every run (UnicodeEncodeError writing the index): no manifest, ever."""
    from pipeline.cli import main as m2t_main
    from pipeline.storage.sources import escape_name, read_source, unescape_name

    root = tmp_path / "in"
    sub = _byte_name(root, b"dir\xe9")  # a Latin-1 folder name
    sub.mkdir(parents=True)
    _byte_name(root, b"\xff\xfe.png").write_bytes(png_bytes(random_image(H, W, seed=80)))
    _byte_name(sub, b"x\x80.png").write_bytes(png_bytes(random_image(H, W, seed=81)))
    (root / "%FF%FE.png").write_bytes(png_bytes(random_image(H, W, seed=82)))  # valid UTF-8 that looks escaped
    with __import__("tarfile").open(root / "t.tar", "w", format=__import__("tarfile").GNU_FORMAT) as tar:
        from test_compress import add_member

        add_member(tar, os.fsdecode(b"m\xff.png"), png_bytes(random_image(H, W, seed=83)))
        add_member(tar, "plain.png", png_bytes(random_image(H, W, seed=84)))
    out = tmp_path / "a.m2t"
    code = m2t_main(["compress", str(root), str(out), "--no-ray", "--no-progress", "--model", str(checkpoint),
                     "--set", "torch_threads=1"])
    assert code == 0, capsys.readouterr()
    assert (out / A.MANIFEST).exists()
    rows = {r["key"]: r for r in rows_of(out / A.KEYS_INDEX)}
    want = {"%FF%FE.png", "%25FF%25FE.png", "dir%E9/x%80.png", "t.tar/m%FF.png", "t.tar/plain.png"}
    assert set(rows) == want and all(r["status"] == "ok" for r in rows.values()), rows
    # Lossless and distinct: each key unescapes to the name's bytes.
    assert os.fsencode(unescape_name("dir%E9/x%80.png")) == b"dir\xe9/x\x80.png"
    assert unescape_name("%25FF%25FE.png") == "%FF%FE.png" and escape_name("%FF%FE.png") == "%25FF%25FE.png"
    source = next(r["source"] for r in rows_of(next((out / "shards").glob("*.parquet"))) if "%FF%FE" in r["source"])
    assert read_source(source)[:8] == b"\x89PNG\r\n\x1a\n"
    code, report = verify(out, tmp_path, "--against-source")
    assert code == V.EXIT_OK and report["verified"] == 5, report["issues"]
    code, err = get(out, "t.tar/m%FF.png", tmp_path / "m.png", capsys=capsys)
    assert code == A.EXIT_OK, err
    restored = tmp_path / "restored"
    assert V.restore_main([str(out), str(restored), "--no-ray", "--no-progress"]) == V.EXIT_OK
    assert (restored / "dir%E9" / "x%80.png.png").exists() and (restored / "%25FF%25FE.png.png").exists()


def _rewrite_index(archive: Path, shard: str, table: pa.Table) -> None:
    pq.write_table(table, archive / "shards" / f"{shard}.parquet")


def test_a_million_row_index_over_three_streams_is_refused_quickly(copy, installed, tmp_path):
    """Issue 26, item 2: 1,000,003 rows pointing at the shard's real streams kept verify busy
    for minutes at GBs; overlapping rows now refuse the shard before anything is decoded."""
    import time

    shard = "00000"
    real = [r for r in rows_of(copy / "shards" / f"{shard}.parquet") if r["status"] == "ok"]
    n = 1_000_003
    pick = np.arange(n) % len(real)
    table = pa.Table.from_pylist(real, schema=A.index_schema()).take(pa.array(pick))
    table = table.set_column(0, "key", pa.array([f"k{i:07d}" for i in range(n)]))
    _rewrite_index(copy, shard, table)
    t0 = time.perf_counter()
    code, report = verify(copy, tmp_path, "--shards", shard)
    assert time.perf_counter() - t0 < 60
    assert code == V.EXIT_ISSUES and report["verified"] == 0, report["issues"]
    bad = [i for i in report["issues"] if i["kind"] == "bad_index"]
    assert bad and "overlaps" in bad[0]["message"] and "refused" in bad[0]["message"], report["issues"]
    out = tmp_path / "restored"
    assert V.restore_main([str(copy), str(out), "--no-ray", "--no-progress", "--shards", shard]) == V.EXIT_ISSUES
    assert not list(out.rglob("*.png"))


def test_rows_too_short_to_be_a_stream_are_refused(copy, installed, tmp_path, capsys):
    from pipeline.storage.index_checks import min_stream_bytes

    row = ok_row(copy)
    keys = rows_of(copy / A.KEYS_INDEX)
    for r in keys:
        if r["key"] == row["key"]:
            r["length"] = min_stream_bytes() - 1
    write_keys(copy, keys)
    code, err = get(copy, row["key"], tmp_path / "o.png", capsys=capsys)
    assert code == A.EXIT_USAGE and "smallest header" in err, err


@pytest.mark.parametrize("bad_key", ["../up.png", "/abs.png", "nul\x00.png", "nl\n.png"])
def test_verify_reports_keys_restore_would_refuse(copy, installed, tmp_path, bad_key):
    """Issue 26, item 2: verify exited 0 on keys that restore refuses as unsafe."""
    shard = "00000"
    rows = rows_of(copy / "shards" / f"{shard}.parquet")
    first = next(r for r in rows if r["status"] == "ok")
    first["key"] = bad_key
    _rewrite_index(copy, shard, pa.Table.from_pylist(rows, schema=A.index_schema()))
    code, report = verify(copy, tmp_path, "--shards", shard)
    assert code == V.EXIT_ISSUES
    assert [i["key"] for i in report["issues"] if i["kind"] == "unsafe_key"] == [bad_key], report["issues"]


def test_get_refuses_a_stream_whose_size_is_not_the_index(copy, installed, tmp_path, capsys):
    """Issue 26, item 3: the stream's declared size is checked against the index's before decoding."""
    row = ok_row(copy)
    assert row["height"] == H and row["width"] == W
    keys = rows_of(copy / A.KEYS_INDEX)
    for r in keys:
        if r["key"] == row["key"]:
            r["height"] = 8000
    write_keys(copy, keys)
    for extra in ([], ["--preview", "1"]):
        code, err = get(copy, row["key"], tmp_path / "o.png", *extra, capsys=capsys)
        assert code == A.EXIT_USAGE and "refused before decoding" in err and "8000" in err, err


def test_a_row_pointing_at_another_keys_stream_is_found(copy, installed, tmp_path, capsys):
    """Issue 26, item 5: a key's row remapped to another key's stream (with that stream's CRC,
    step table and digest) gave the wrong image with exit 0."""
    keys = rows_of(copy / A.KEYS_INDEX)
    ok = [r for r in keys if r["status"] == "ok"]
    victim, other = ok[0], ok[1]
    for r in keys:
        if r["key"] == victim["key"]:
            r.update({n: other[n] for n in ("shard", "offset", "length", "crc32", "step_ends", "digest")})
    write_keys(copy, keys)
    code, err = get(copy, victim["key"], tmp_path / "o.png", capsys=capsys)
    assert code == A.EXIT_USAGE and "not this key's" in err, err
    # The same remap inside a shard's index: its digest, and the row's, say so.
    shard = victim["shard"]
    rows = rows_of(copy / "shards" / f"{shard}.parquet")
    good = [r for r in rows if r["status"] == "ok"]
    good[0].update({n: good[1][n] for n in ("offset", "length", "crc32", "step_ends", "digest")})
    good[1].update(status="error", offset=None, length=None)
    _rewrite_index(copy, shard, pa.Table.from_pylist(rows, schema=A.index_schema()))
    code, report = verify(copy, tmp_path, "--shards", shard)
    assert code == V.EXIT_ISSUES
    found = {(i["kind"], i["key"]) for i in report["issues"]}
    assert ("digest_mismatch", good[0]["key"]) in found and ("digest_mismatch", None) in found, report["issues"]
