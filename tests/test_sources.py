"""Inputs read back from their source strings (pipeline/storage/sources.py, source_formats.py):
read_source(item.source) is the bytes iter_shard gave, for folders, tars and Parquet files,
local and on a real S3 endpoint on loopback (moto); bad sources give errors that name them."""

from __future__ import annotations

import io
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.storage.sources import (SourceCache, SourceError, SourceRef, iter_shard, list_sources, parse_source,
                                      parquet_row_source, plan_shards, read_source, tar_member_source)


def png(seed: int, side: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_inputs(root: Path) -> Path:
    """Every format, with the awkward names: `#` in folder, file and member names, a repeated
    member, a sidecar, row groups smaller than the shards, a null row."""
    (root / "in" / "d#1").mkdir(parents=True)
    (root / "in" / "d#1" / "a#b.png").write_bytes(png(0))
    (root / "in" / "c.jpg").write_bytes(png(1))
    write_tar(root / "in" / "s.tar", [("x#1.png", png(2)), ("x#1.json", b"{}"), ("x#1.png", png(3)),
                                      ("sub/y.png", png(4)), ("row=5.png", png(5))])
    hf = [{"image": {"bytes": None if i == 2 else png(10 + i), "path": f"p{i}.png"}} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(hf), root / "in" / "hf.parquet", row_group_size=2)
    plain = [{"key": f"k{i}", "jpg": png(20 + i)} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(plain), root / "in" / "plain.parquet", row_group_size=1)
    return root / "in"


def items_of(url: str, storage_options=None) -> list:
    return [item for spec in plan_shards(url, 2, storage_options) for item in iter_shard(spec, storage_options)]


def assert_round_trip(url: str, storage_options=None) -> None:
    items = items_of(url, storage_options)
    ok = [item for item in items if item.status == "ok"]
    assert len(ok) == 12 and {item.status for item in items} == {"ok", "error", "duplicate"}
    cache = SourceCache(max_open=1)  # every switch of file closes the other: reopened, resumed
    for item in ok:
        assert read_source(item.source, storage_options, cache=cache) == item.data, item.source
    for item in reversed(ok):  # backwards, and without a cache: each read on its own
        assert read_source(item.source, storage_options) == item.data, item.source
    cache.close()


# ---------------------------------------------------------------- the naming and its inverse


@pytest.mark.parametrize("source, ref", [
    ("file:///d#1/a#b.png", SourceRef("file:///d#1/a#b.png")),
    ("s3://b/s.tar#x#1.png", SourceRef("s3://b/s.tar", member="x#1.png")),
    ("s3://b/d#/s.TAR#sub/y.png", SourceRef("s3://b/d#/s.TAR", member="sub/y.png")),
    ("s3://b/s.tar#row=5.png", SourceRef("s3://b/s.tar", member="row=5.png")),
    ("/x/hf.parquet#row=17", SourceRef("/x/hf.parquet", row=17)),
    ("/x#row=1/hf.pq#row=0", SourceRef("/x#row=1/hf.pq", row=0)),
])
def test_parse_source_inverts_the_naming(source, ref):
    assert parse_source(source) == ref
    if ref.member is not None:
        assert tar_member_source(ref.url, ref.member) == source
    if ref.row is not None:
        assert parquet_row_source(ref.url, ref.row) == source


@pytest.mark.parametrize("source, message", [
    ("/x/hf.parquet#row=x", "malformed Parquet row 'x'"),
    ("/x/hf.parquet#row=-1", "malformed Parquet row '-1'"),
    ("/x/hf.parquet#row=", "malformed Parquet row ''"),
    ("/x/hf.parquet#3", "a Parquet row is named `#row=N`"),
    ("/x/s.tar#", "empty tar member name"),
    ("/x/s.tar", "names a whole tar or Parquet file"),
    ("/x/hf.parquet", "names a whole tar or Parquet file"),
])
def test_malformed_sources_are_refused(source, message):
    with pytest.raises(SourceError, match=message) as err:
        parse_source(source)
    assert source in str(err.value)


# ---------------------------------------------------------------- read_source = what iter_shard read


def test_every_item_reads_back_locally(tmp_path):
    assert_round_trip(str(make_inputs(tmp_path)))


def test_every_item_reads_back_from_s3(tmp_path, s3_bucket):
    import s3fs

    bucket, options = s3_bucket
    s3fs.S3FileSystem(**options).put(str(make_inputs(tmp_path)) + "/", f"{bucket}/in/", recursive=True)
    assert_round_trip(f"s3://{bucket}/in", {"s3": options})


def test_list_sources_names_every_readable_input(tmp_path):
    root = make_inputs(tmp_path)
    write_tar(root / "cut.tar", [("a.png", png(30)), ("b.png", png(31))])
    data = (root / "cut.tar").read_bytes()
    (root / "cut.tar").write_bytes(data[:1024 + 512 + 100])  # a.png whole, b.png's data cut
    cache = SourceCache()
    sources, problems = list_sources(str(root), cache=cache)
    # Each item iter_shard read, once (the tar's repeated member is one source) ...
    items = {item.source: item for item in items_of(str(root)) if item.status != "duplicate"}
    assert [s for s in sources if "cut.tar" not in s] == [s for s in items if "cut.tar" not in s]
    # ... and the damaged tar keeps what is before the damage, with a problem naming it.
    assert [s for s in sources if "cut.tar" in s] == [tar_member_source(f"file://{root}/cut.tar", n)
                                                      for n in ("a.png", "b.png")]
    assert len(problems) == 1 and "cut.tar" in problems[0]
    assert read_source(f"file://{root}/cut.tar#a.png", cache=cache) == png(30)
    with pytest.raises(SourceError, match=r"cut.tar#b.png: member is truncated"):
        read_source(f"file://{root}/cut.tar#b.png", cache=cache)
    for source in sources:
        if items.get(source) is not None and items[source].status == "ok":
            assert read_source(source, cache=cache) == items[source].data


def test_bad_sources_give_errors_naming_them(tmp_path):
    root = make_inputs(tmp_path)
    tar, hf = f"{root}/s.tar", f"{root}/hf.parquet"
    cache = SourceCache()
    cases = [
        (f"{tar}#nope.png", "the tar has no image member 'nope.png' (3 image member"),
        (f"{tar}#x#1.json", "no image member 'x#1.json'"),  # a sidecar is not an input
        (f"{hf}#row=5", "row 5 is out of range (the file has 5 rows)"),
        (f"{hf}#row=2", "no image bytes (null in column 'image')"),
        (f"{hf}#row=x", "malformed Parquet row"),
    ]
    for source, message in cases:
        with pytest.raises(SourceError, match=re.escape(message)) as err:
            read_source(source, cache=cache)
        assert source in str(err.value)
    with pytest.raises(FileNotFoundError):
        read_source(f"{root}/missing.png")
    with pytest.raises(SourceError, match="no column 'pixels'"):
        read_source(f"{hf}#row=0", image_column="pixels", cache=cache)
    with pytest.raises(SourceError, match="no column 'pixels'"):  # the same again: nothing half-open is kept
        read_source(f"{hf}#row=0", image_column="pixels", cache=cache)
    (root / "broken.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(SourceError, match="broken.parquet: not a readable Parquet file"):
        read_source(f"{root}/broken.parquet#row=0")


def test_size_limit_refuses_before_reading(tmp_path):
    root = make_inputs(tmp_path)
    for source, size in [(f"{root}/s.tar#sub/y.png", len(png(4))), (f"{root}/hf.parquet#row=0", len(png(10)))]:
        with pytest.raises(SourceError, match=f"source of {size} bytes exceeds max_source_bytes"):
            read_source(source, max_bytes=size - 1)
        assert len(read_source(source, max_bytes=size)) == size
    size = len(png(1))
    with pytest.raises(SourceError, match=f"source of {size} bytes exceeds max_source_bytes"):
        read_source(f"{root}/c.jpg", max_bytes=size - 1)
    assert read_source(f"{root}/c.jpg", max_bytes=size) == png(1)


def test_size_limit_on_s3_reads_at_most_the_limit(tmp_path, s3_bucket):
    import s3fs

    bucket, options = s3_bucket
    s3fs.S3FileSystem(**options).pipe(f"{bucket}/big.png", png(1))
    url, size = f"s3://{bucket}/big.png", len(png(1))
    with pytest.raises(SourceError, match=f"source of more than {size - 1} bytes exceeds max_source_bytes"):
        read_source(url, {"s3": options}, max_bytes=size - 1)
    assert read_source(url, {"s3": options}, max_bytes=size) == png(1)


def test_cache_bounds_and_copies(tmp_path):
    root = make_inputs(tmp_path)
    cache = SourceCache(max_open=2)
    urls = [f"{root}/s.tar#sub/y.png", f"{root}/hf.parquet#row=4", f"{root}/plain.parquet#row=1"]
    for source in urls:
        read_source(source, cache=cache)
    assert cache.open_files == 2  # the LRU file (the tar) was closed, its index kept
    tar = cache.tar(f"{root}/s.tar")
    assert not tar.complete and list(tar.members) == ["x#1.png", "sub/y.png"]  # scanned only as far as needed
    assert read_source(f"{root}/s.tar#row=5.png", cache=cache) == png(5)  # the scan resumes where it stopped
    copy = pickle.loads(pickle.dumps(cache))  # e.g. a DataLoader worker's: indexes, no open files
    assert copy.open_files == 0 and copy.tar(f"{root}/s.tar").members == tar.members
    assert [read_source(s, cache=copy) for s in urls] == [read_source(s) for s in urls]
    cache.close()
    assert cache.open_files == 0


def test_names_that_are_not_utf8_become_distinct_lossless_keys(tmp_path):
    """Issue 26: names with undecodable bytes (folders, files, tar members) are escaped
    (escape_name), distinct names stay distinct, and every source reads back."""
    import os

    from pipeline.storage.sources import escape_name, unescape_name

    names = [b"a.png", b"\xff\xfe.png", b"%FF%FE.png", b"%25.png", b"caf\xc3\xa9.png", b"caf%C3%A9.png",
             b"\xed\xb3\xbf.png", b"x%20y.png", b"100%.png", b"\xc3.png"]
    keys = [escape_name(os.fsdecode(n)) for n in names]
    assert len(set(keys)) == len(names)
    for name, key in zip(names, keys):
        key.encode("utf-8")  # storable in Parquet and JSON
        assert os.fsencode(unescape_name(key)) == name
    # Names that are valid UTF-8 without %25 / %8X..%FX are kept as they are.
    assert keys[0] == "a.png" and keys[4] == "café.png" and keys[7] == "x%20y.png" and keys[8] == "100%.png"
    assert keys[1] == "%FF%FE.png" and keys[2] == "%25FF%25FE.png"
    root = tmp_path / "in"
    folder = Path(os.fsdecode(os.fsencode(str(root)) + b"/d\xe9"))
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        Path(os.fsdecode(os.fsencode(str(folder)) + b"/" + name)).write_bytes(png(30 + i))
    write_tar(root / "t.tar", [(os.fsdecode(b"m\xff.png"), png(50)), ("m%FF.png", png(51))])
    items = [item for spec in plan_shards(str(root), 100) for item in iter_shard(spec)]
    assert all(item.status == "ok" for item in items) and len({item.key for item in items}) == len(names) + 2
    assert {"t.tar/m%FF.png", "t.tar/m%25FF.png", "d%E9/%FF%FE.png"} <= {item.key for item in items}
    for item in items:
        assert read_source(item.source) == item.data, item.source
    sources, problems = list_sources(str(root))
    assert not problems and sorted(sources) == sorted(item.source for item in items)
