"""The compressed-dataset archive: layout, atomic per-shard writes, random-access `get`.

    ARCHIVE/
      shards/<shard>.bin          the shard's bitstreams, concatenated (each a complete M2T stream)
      shards/<shard>.parquet      the shard's index: one row per input (schema INDEX_SCHEMA)
      shards/<shard>.stats.json   the shard's totals; written LAST: its presence marks the shard done
      keys.parquet                every key -> shard, offset, length, status (sorted by key)
      manifest.json               model, versions, config, shard list, totals; written when all is done
      report.json                 the job's report (also written by incomplete runs)

ARCHIVE is any fsspec URL (a local folder, s3://bucket/prefix, ...). On a local filesystem
every file is written under a temporary name and renamed into place; on object stores an
object only appears when its upload completes, so files are written in place. Either way
the stats file comes last, so a shard whose stats file exists is complete, and a shard
without one is redone from scratch on resume.

The upkeep of an archive is `Archive`'s, done by the job that holds its lease
(pipeline/storage/lease.py): completion markers (`completed_shards`, `commit_stats`,
`forget_shards`), checks of committed shards (`check_committed`), stale temporaries
(`remove_stale_temporaries`), `--overwrite` (`clear_for_overwrite`), `write_keys_index`.

`m2t get ARCHIVE KEY OUT.png` reads keys.parquet (sorted, in row groups with min/max
statistics, so a lookup reads its footer and one row group), then one byte range of one
.bin file, and decodes it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.errors import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, UsageError, run_main  # noqa: F401
from pipeline.storage.sources import filesystem, join_url

ARCHIVE_FORMAT = "m2t-archive"
ARCHIVE_VERSION = 1
SHARDS_DIR = "shards"
MANIFEST = "manifest.json"
REPORT = "report.json"
KEYS_INDEX = "keys.parquet"
KEYS_ROW_GROUP = 65536  # rows per row group of keys.parquet: what one lookup reads
MAX_KEYS_GROUP_BYTES = 1 << 28  # a lookup refuses a row group that declares more (uncompressed)
REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)

# Shard ids are what plan_shards writes: zero-padded decimal numbers. Anything else read
# from an archive (a manifest's shard list, an index row) is refused before any path is built.
SHARD_NAME_RE = re.compile(r"^[0-9]{5,12}$")
MAX_STREAM_BYTES = 3 * 64_000_000 + 65536  # a bitstream is never more bytes than raw RGB at the pixel limit


def check_shard_name(shard: Any) -> str:
    """`shard` if it is a shard id of the archive's own naming, else ArchiveError (before any read)."""
    if not isinstance(shard, str) or not SHARD_NAME_RE.match(shard):
        raise ArchiveError(f"unsafe shard name {shard!r} in the archive: shard names are 5 to 12 digits "
                           "(refused before reading anything)")
    return shard


def read_parquet(fs, path: str, columns=None, row_group: int | None = None):
    """A Parquet table read through an fsspec file object, on this thread only: no pre-buffering
    and no Arrow thread pools, whose threads reading through the Python file object can still
    be alive at interpreter exit and abort the process ("terminate called without an active
    exception")."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f, pre_buffer=False)
        if row_group is not None:
            return pf.read_row_group(row_group, columns=columns, use_threads=False)
        return pf.read(columns=columns, use_threads=False)


class ArchiveError(UsageError):
    """The archive is missing or malformed, or does not hold what was asked for (exit 2)."""


class ArchiveIncompleteError(ArchiveError):
    """The archive is not finished (no manifest or keys index yet): rerun `m2t compress` (exit 3)."""

    exit_code = EXIT_INCOMPLETE


def index_schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()),
        ("source", pa.string()),  # file URL; `#member` for tar members, `#row=N` for Parquet rows
        ("shard", pa.string()),
        ("offset", pa.int64()),  # byte offset in shards/<shard>.bin (null unless status is ok)
        ("length", pa.int64()),  # bitstream bytes (null unless ok)
        ("height", pa.int32()),  # image size after EXIF orientation (null if it was not decoded)
        ("width", pa.int32()),
        ("source_bytes", pa.int64()),  # bytes of the source file / member / Parquet cell
        ("bpp", pa.float64()),
        ("psnr", pa.float64()),  # of the decoder's output vs the source pixels, dB (inf: identical)
        ("mse", pa.float64()),
        ("crc32", pa.int64()),  # CRC-32 of the bitstream
        ("decoded_crc32", pa.int64()),  # CRC-32 of the decoder's RGB uint8 output (H, W, 3), C order
        ("status", pa.string()),  # "ok", "error" or "duplicate"
        ("error", pa.string()),  # why, when status is not ok
        # Format version 3: for each coding step k, the length of the bitstream's prefix that
        # holds steps 1..k (header included): a preview of K steps is one ranged read.
        ("step_ends", pa.list_(pa.int64())),
        # SHA-256 (hex) of the key (UTF-8), a NUL byte and the bitstream: binds the row's key to
        # its bytes, so a row pointing at another key's stream is found (pipeline/storage/integrity.py).
        ("digest", pa.string()),
    ])


def keys_schema():
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("shard", pa.string()), ("offset", pa.int64()),
                      ("length", pa.int64()), ("crc32", pa.int64()), ("status", pa.string()),
                      ("error", pa.string()), ("step_ends", pa.list_(pa.int64())), ("digest", pa.string()),
                      ("height", pa.int32()), ("width", pa.int32())])


# Columns added after the first archives were written: a reader accepts an index without them.
OPTIONAL_COLUMNS = ("step_ends", "digest")
KEYS_OPTIONAL_COLUMNS = OPTIONAL_COLUMNS + ("height", "width")  # keys.parquet got these later still


def schema_problems(actual, expected, optional=OPTIONAL_COLUMNS) -> list[str]:
    """What is wrong with an index's columns: missing ones (but the optional) or wrong types."""
    return [f"{n} is {actual.field(n).type if n in actual.names else 'missing'}" for n in expected.names
            if (n not in actual.names and n not in optional)
            or (n in actual.names and actual.field(n).type != expected.field(n).type)]


def _json_default(value: Any):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(data: Any) -> str:
    """JSON with non-finite floats as strings ("inf"): strict parsers reject Infinity."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(data), indent=1, sort_keys=False, default=_json_default) + "\n"


class Archive:
    """An archive location: paths, atomic writes, listing of completed shards."""

    def __init__(self, url: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None):
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        self.fs, self.root = filesystem(self.url, storage_options)
        self.root = self.root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.local = bool({"file", "local"} & set(protocols))

    # -------------------------------------------------------------- paths

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def shard_path(self, shard: str, suffix: str) -> str:
        return self.path(SHARDS_DIR, f"{check_shard_name(shard)}{suffix}")

    # -------------------------------------------------------------- writing

    def _tmp(self, path: str) -> str:
        # A name of this writer's own (process + random): two writers never share or delete
        # each other's temporaries. Leftovers of dead writers are removed by the next job that
        # holds the archive's lease (pipeline/storage/lease.py, remove_stale_temporaries).
        return f"{path}.{os.getpid()}-{os.urandom(4).hex()}.tmp" if self.local else path

    def _commit(self, tmp: str, path: str) -> None:
        if tmp != path:
            self.fs.mv(tmp, path)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Whole-file write that never leaves a partial file under the final name."""
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = self._tmp(path)
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self._commit(tmp, path)

    def write_json(self, path: str, data: Any) -> None:
        self.write_bytes(path, dumps(data).encode())

    def write_table(self, path: str, table, **kwargs) -> str:
        """Write a Parquet file (whole-file, like write_bytes); returns its SHA-256 (hex)."""
        import hashlib

        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **kwargs)
        data = sink.getvalue().to_pybytes()
        self.write_bytes(path, data)
        return hashlib.sha256(data).hexdigest()

    def open_blob(self, shard: str):
        """A ShardBlob: an open file for the shard's bitstreams, moved into place by commit()."""
        return ShardBlob(self, shard)

    # -------------------------------------------------------------- state

    def exists(self) -> bool:
        return self.fs.exists(self.root)

    def is_empty(self) -> bool:
        return not self.exists() or not self.fs.ls(self.root, detail=False)

    def looks_like_archive(self) -> bool:
        return any(self.fs.exists(self.path(p)) for p in (SHARDS_DIR, MANIFEST, REPORT))

    def delete(self) -> None:
        if self.exists():
            self.fs.rm(self.root, recursive=True)
        self.fs.invalidate_cache()

    def clear_shard(self, shard: str) -> None:
        """Remove what an interrupted attempt at `shard` may have left (never a stats file of a
        completed shard: callers only clear shards that have none)."""
        for suffix in (".bin", ".parquet", ".bin.tmp", ".parquet.tmp", ".stats.json.tmp"):
            path = self.shard_path(shard, suffix)
            if self.fs.exists(path):
                self.fs.rm(path)

    def completed_shards(self) -> dict[str, dict[str, Any]]:
        """shard id -> its stats, for every shard whose stats file exists."""
        self.fs.invalidate_cache()
        folder = self.path(SHARDS_DIR)
        if not self.fs.exists(folder):
            return {}
        paths = [p for p in self.fs.ls(folder, detail=False) if p.endswith(".stats.json")]
        if not paths:
            return {}
        out = {}
        for path, data in sorted(self.fs.cat(paths).items()):  # concurrent reads on object stores
            stats = json.loads(data)
            out[stats["shard"]] = stats
        return out

    def read_json(self, name: str) -> dict[str, Any]:
        path = self.path(name)
        if not self.fs.exists(path):
            raise ArchiveError(f"{join_url(self.url, name)} not found")
        return json.loads(self.fs.cat_file(path))

    # -------------------------------------------------------------- upkeep (by the job holding the lease)

    def is_archive(self) -> bool:
        """An m2t archive, or a folder where a job took the lease and died before writing more."""
        from pipeline.storage.lease import LEASE

        return self.looks_like_archive() or self.fs.exists(self.path(LEASE))

    def commit_stats(self, shard: str, stats: Mapping[str, Any]) -> None:
        """Write a shard's stats: its completion marker, always the last file of a shard."""
        self.write_json(self.shard_path(shard, ".stats.json"), stats)

    def shard_stats(self, shard: str) -> dict[str, Any] | None:
        """A shard's stats as stored now (no cached listing), or None if it has none (or they
        cannot be read)."""
        try:
            self.fs.invalidate_cache()
            return json.loads(self.fs.cat_file(self.shard_path(shard, ".stats.json")))
        except Exception:
            return None

    def forget_shards(self, damaged: Mapping[str, str]) -> None:
        """Unmark damaged shards (their stats go; the rest is redone from scratch) and drop the
        archive-level index and manifest, which described them: they are rewritten when every
        shard is complete again."""
        for shard, reason in sorted(damaged.items()):
            log.warning("shard %s is damaged: %s; it will be redone", shard, reason)
            path = self.shard_path(shard, ".stats.json")
            if self.fs.exists(path):
                self.fs.rm(path)
        for name in (MANIFEST, KEYS_INDEX):
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name))
        self.fs.invalidate_cache()

    def clear_for_overwrite(self) -> None:
        """--overwrite: delete everything in the archive but the lease the job holds."""
        from pipeline.storage.lease import LEASE

        self.fs.invalidate_cache()
        for path in self.fs.ls(self.root, detail=False):
            if path.rstrip("/").rsplit("/", 1)[-1] != LEASE:
                self.fs.rm(path, recursive=True)
        self.fs.invalidate_cache()

    def remove_stale_temporaries(self) -> list[str]:
        """Remove temporary files (`*.tmp`) left by earlier jobs (killed drivers, orphaned
        workers); returns their names. Only while the caller holds the lease, before its own
        workers start and after they stopped: every temporary then is someone else's leftover."""
        self.fs.invalidate_cache()
        gone = []
        for folder in (self.root, self.path(SHARDS_DIR)):
            if not self.fs.exists(folder):
                continue
            for path in self.fs.ls(folder, detail=False):
                if path.endswith(".tmp"):
                    try:
                        self.fs.rm(path)
                        gone.append(path.rsplit("/", 1)[-1])
                    except FileNotFoundError:  # an orphaned worker's abort removed it first
                        pass
        self.fs.invalidate_cache()
        if gone:
            log.info("removed %d temporary file(s) left by earlier runs: %s", len(gone), ", ".join(sorted(gone)[:10]))
        return sorted(gone)

    def check_committed(self, completed: Mapping[str, Mapping[str, Any]], verify: bool) -> dict[str, str]:
        """shard -> why it is damaged, for committed shards (with a stats file) whose data is not
        what their stats and index say. Always (one listing): the .bin and index exist and the
        .bin has the size the stats record. With `verify`: every bitstream's CRC-32 too."""
        if not completed:
            return {}
        self.fs.invalidate_cache()
        sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size")
                 for e in self.fs.ls(self.path(SHARDS_DIR), detail=True)}
        damaged: dict[str, str] = {}
        for shard, stats in sorted(completed.items()):
            size = sizes.get(f"{shard}.bin", 0 if stats.get("compressed_bytes") == 0 else None)
            if size is None:
                damaged[shard] = "its .bin is missing"
            elif f"{shard}.parquet" not in sizes:
                damaged[shard] = "its index (.parquet) is missing"
            elif size != stats.get("compressed_bytes"):
                damaged[shard] = (f"its .bin has {size} bytes, its stats say {stats.get('compressed_bytes')} "
                                  "(truncated, extended or replaced)")
        if verify:
            from concurrent.futures import ThreadPoolExecutor

            rest = [s for s in sorted(completed) if s not in damaged]
            with ThreadPoolExecutor(max_workers=8) as pool:  # I/O bound: object stores answer in parallel
                for shard, reason in zip(rest, pool.map(self._check_streams, rest)):
                    if reason:
                        damaged[shard] = reason
        return damaged

    def _check_streams(self, shard: str) -> str | None:
        """CRC-check every bitstream of a committed shard against its index; the reason if not."""
        try:
            rows = read_parquet(self.fs, self.shard_path(shard, ".parquet"),
                                columns=["key", "offset", "length", "crc32", "status"]).to_pylist()
        except Exception as exc:
            return f"its index cannot be read ({type(exc).__name__}: {exc})"
        data = self.fs.cat_file(self.shard_path(shard, ".bin"))
        bad, covered = [], 0
        for row in rows:
            if row["status"] != "ok":
                continue
            start, length = int(row["offset"]), int(row["length"])
            covered += length
            chunk = data[start:start + length]
            if len(chunk) != length or zlib.crc32(chunk) != row["crc32"]:
                bad.append(row["key"])
        if bad:
            return (f"{len(bad)} of {sum(r['status'] == 'ok' for r in rows)} bitstream(s) fail the CRC-32 of the "
                    f"index (first: {bad[0]!r})")
        if covered != len(data):
            return f"its .bin holds {len(data)} bytes, its index's bitstreams {covered}"
        return None

    def write_keys_index(self, shards: list[str]) -> tuple[int, str]:
        """Gather every shard's index into keys.parquet, sorted by key; returns the row count and
        the file's SHA-256."""
        import pyarrow as pa

        schema = keys_schema()
        tables = []
        for shard in shards:
            table = read_parquet(self.fs, self.shard_path(shard, ".parquet"), columns=schema.names)
            for name in KEYS_OPTIONAL_COLUMNS:  # a shard indexed before the column existed (resumed archive)
                if name not in table.schema.names:
                    table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
            tables.append(table.select(schema.names).cast(schema))
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        table = table.sort_by([("key", "ascending"), ("shard", "ascending")])
        digest = self.write_table(self.path(KEYS_INDEX), table, row_group_size=KEYS_ROW_GROUP, write_statistics=True)
        return table.num_rows, digest


class ShardBlob:
    """Bitstreams appended one by one to shards/<shard>.bin (via a temporary name locally)."""

    def __init__(self, archive: Archive, shard: str):
        self.archive = archive
        self.path = archive.shard_path(shard, ".bin")
        self.tmp = archive._tmp(self.path)
        archive.fs.makedirs(archive.path(SHARDS_DIR), exist_ok=True)
        self.file = archive.fs.open(self.tmp, "wb")
        self.offset = 0
        self.digest = hashlib.sha256()  # of every byte written: the manifest records it

    def append(self, data: bytes) -> int:
        """Write one bitstream; returns its offset."""
        offset = self.offset
        self.file.write(data)
        self.digest.update(data)
        self.offset += len(data)
        return offset

    def commit(self) -> None:
        self.file.close()
        self.archive._commit(self.tmp, self.path)

    def abort(self) -> None:
        discard_partial_file(self.archive.fs, self.file, self.tmp, self.path)


def discard_partial_file(fs, file, tmp: str, path: str) -> None:
    """Drop what was written to `file` (opened at `tmp`, to be committed to `path`): locally
    the temporary file is removed; on object stores the upload is discarded (closing would
    complete it and put a partial file in place). Never raises: it runs on error paths."""
    try:
        if tmp == path and hasattr(file, "discard"):
            file.discard()
            file.closed = True  # never flushed later (by close() or the GC)
        else:
            file.close()
            if tmp != path and fs.exists(tmp):
                fs.rm(tmp)
    except Exception:
        pass


# ====================================================================== finishing


def code_version() -> dict[str, Any]:
    import m2t_core

    commit = None
    try:
        result = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if result.returncode == 0:
            commit = result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass  # no git, or not a checkout (e.g. a Ray job's unpacked working dir)
    return {"m2t": m2t_core.__version__, "git_commit": commit}


# ====================================================================== random access


def lookup(archive_url: str, key: str, storage_options=None) -> dict[str, Any]:
    """The keys.parquet row of `key` (the kept one, status ok, when a key was duplicated)."""
    import pyarrow.parquet as pq

    archive = Archive(archive_url, storage_options)
    path = archive.path(KEYS_INDEX)
    if not archive.fs.exists(path):
        if archive.looks_like_archive():
            raise ArchiveIncompleteError(f"{join_url(archive.url, KEYS_INDEX)} not found (the archive is "
                                         "incomplete: run `m2t compress` again to finish it)")
        raise ArchiveError(f"{join_url(archive.url, KEYS_INDEX)} not found (not an m2t archive)")
    rows = []
    schema = keys_schema()
    # pre_buffer off and no thread pools: see read_parquet (threads alive at exit abort `m2t get`).
    with archive.fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f, pre_buffer=False)
        except Exception as exc:
            raise ArchiveError(f"{join_url(archive.url, KEYS_INDEX)} is not a readable Parquet file: {exc}") from None
        bad = schema_problems(pf.schema_arrow, schema, KEYS_OPTIONAL_COLUMNS)
        if bad:
            raise ArchiveError(f"{join_url(archive.url, KEYS_INDEX)} is malformed ({'; '.join(bad)}; "
                               f"expected {', '.join(f'{f.name}: {f.type}' for f in schema)})")
        column = pf.schema_arrow.get_field_index("key")
        for g in range(pf.metadata.num_row_groups):
            # The file is sorted by key: the min/max statistics say which row group can hold it.
            stats = pf.metadata.row_group(g).column(column).statistics
            if stats is not None and stats.has_min_max and isinstance(stats.min, str) \
                    and isinstance(stats.max, str) and not stats.min <= key <= stats.max:
                continue
            group = pf.metadata.row_group(g)
            if group.num_rows > KEYS_ROW_GROUP or group.total_byte_size > MAX_KEYS_GROUP_BYTES:
                # Sizes from the file's own metadata: checked before anything is allocated.
                raise ArchiveError(f"{join_url(archive.url, KEYS_INDEX)} is malformed: row group {g} holds "
                                   f"{group.num_rows} rows / {group.total_byte_size} bytes (at most "
                                   f"{KEYS_ROW_GROUP} rows / {MAX_KEYS_GROUP_BYTES} bytes)")
            names = [n for n in schema.names if n in pf.schema_arrow.names]
            table = pf.read_row_group(g, columns=names, use_threads=False)
            rows += [{**dict.fromkeys(KEYS_OPTIONAL_COLUMNS), **r} for r in table.to_pylist() if r["key"] == key]
    if not rows:
        raise ArchiveError(f"key {key!r} is not in the archive {archive.url}")
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        r = rows[0]
        raise ArchiveError(f"key {key!r} was not archived (status {r['status']}): {r['error']}")
    return ok[0]


def read_bitstream(archive_url: str, key: str, storage_options=None, steps: int | None = None,
                   sign_key: bytes | None = None) -> bytes:
    """The bitstream of `key`: one index lookup and one byte-range read, CRC-checked, and
    checked against the row's digest (which binds the key to its bytes).

    steps=K reads only the prefix that holds the first K coding steps:
    one ranged read at the index's step_ends (an index written before that column existed
    costs one more small read, of the header). A prefix cannot be checked against the index's
    CRC-32 or digest (which cover the whole stream); the decoder checks the stream's own
    checksums. `sign_key` (default: $M2T_SIGN_KEY): the manifest's signature must match it,
    and the row is taken from the shard's index, whose digest the signed manifest records."""
    return _read_row_stream(archive_url, key, storage_options, steps, sign_key)[1]


def _read_row_stream(archive_url: str, key: str, storage_options, steps: int | None,
                     sign_key: bytes | None) -> tuple[dict[str, Any], bytes]:
    from pipeline.storage import index_checks, integrity

    sign_key = sign_key if sign_key is not None else integrity.sign_key()
    row = lookup(archive_url, key, storage_options)
    archive = Archive(archive_url, storage_options)
    # Nothing in the index is trusted: the shard name, offset and length are checked before
    # any path is built or any byte is read.
    path = archive.shard_path(row["shard"], ".bin")
    if sign_key is not None:
        row = integrity.signed_row(archive, row, key, sign_key)
    start, length, crc = row["offset"], row["length"], row["crc32"]
    if not isinstance(crc, int):
        raise ArchiveError(f"key {key!r}: the index's CRC-32 {crc!r} is not an integer")
    try:
        size = archive.fs.size(path)
    except FileNotFoundError:
        raise ArchiveError(f"key {key!r}: shards/{row['shard']}.bin is missing") from None
    problem = index_checks.row_location_problem(row, size)
    if problem:
        raise ArchiveError(f"key {key!r}: {problem} (shards/{row['shard']}.bin)")
    if steps is not None:
        want = _prefix_length(archive, path, row, key, steps)
        if want < length:
            data = archive.fs.cat_file(path, start=start, end=start + want)
            if len(data) != want:
                raise ArchiveError(f"key {key!r}: read {len(data)} bytes from shard {row['shard']}, wanted {want}")
            return row, data
    data = archive.fs.cat_file(path, start=start, end=start + length)
    if len(data) != length:
        raise ArchiveError(f"key {key!r}: read {len(data)} bytes from shard {row['shard']}, the index says "
                           f"{length} (the .bin is shorter than the index)")
    if zlib.crc32(data) != crc:
        raise ArchiveError(f"key {key!r}: the bytes in shard {row['shard']} do not match the index "
                           f"(CRC-32 {zlib.crc32(data):08x}, index says {crc & 0xFFFFFFFF:08x})")
    if row.get("digest") is not None and integrity.stream_digest(key, data) != row["digest"]:
        raise integrity.IntegrityError(f"key {key!r}: the stream at shard {row['shard']} offset {start} is not this "
                                       "key's (its digest binds another key or other bytes): the index was remapped")
    if sign_key is not None and row.get("digest") is None:
        raise integrity.IntegrityError(f"key {key!r}: the signed index records no digest for it")
    return row, data


# The most a format-3 header can need to be read before its step table is known (64 MP at the
# smallest window: ~1000 chunks x 12 steps x 2 bytes); only for indexes without step_ends.
MAX_HEADER_READ = 1 << 17


def _prefix_length(archive: "Archive", path: str, row: Mapping[str, Any], key: str, steps: int) -> int:
    """Bytes of `key`'s stream that hold its first `steps` coding steps (the whole stream when
    it has fewer)."""
    from m2t_core import bitstream as bs

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    length, ends = row["length"], row.get("step_ends")
    if ends is not None:
        if not (ends and len(ends) <= 255 and all(isinstance(e, int) for e in ends)
                and all(0 < a <= b for a, b in zip(ends, ends[1:] + [length])) and ends[-1] == length):
            raise ArchiveError(f"key {key!r}: the index's step_ends are not valid (increasing, ending at the "
                               f"stream length {length})")
        if 1 <= steps:
            return ends[min(steps, len(ends)) - 1]
    head = archive.fs.cat_file(path, start=row["offset"], end=row["offset"] + min(length, MAX_HEADER_READ))
    header = bs.read_header(head, max_pixels=bs.MAX_SIDE ** 2, prefix=True)
    return header.step_ends[min(steps, header.num_steps) - 1] if steps else header.size


def open_model(spec: str | None, device: str = "cpu", storage_options=None):
    """A model by registry name, local checkpoint path, or fsspec URL of a checkpoint (fetched
    to a local temporary file: safetensors loads from a path)."""
    from m2t_core import load_model

    if spec and "://" in spec and not spec.startswith("file://"):
        fs, path = filesystem(spec, storage_options)
        cache = Path(tempfile.gettempdir()) / "m2t-models"
        cache.mkdir(parents=True, exist_ok=True)
        local = cache / f"{zlib.crc32(spec.encode()):08x}-{os.path.basename(path)}"
        if not local.name.endswith(".safetensors"):
            local = local.with_name(local.name + ".safetensors")
        tmp = local.with_name(f"{local.name}.{os.getpid()}.tmp")
        fs.get_file(path, str(tmp))
        os.replace(tmp, local)  # fetched afresh each time: the URL may now hold newer weights
        return load_model(str(local), device=device, cache=False)
    if spec and spec.startswith("file://"):
        spec = spec[len("file://"):]
    return load_model(spec, device=device)


def _archive_model(archive_url: str, header, override: str | None, storage_options):
    """The model to decode `header` with: --model if given (the user's name, path or URL),
    else the installed model the bitstream names (registry name + weights hash). The
    manifest's model source is never opened: a path or URL in an archive is not trusted."""
    from m2t_core.registry import load_model_for_header

    if override:
        return open_model(override, storage_options=storage_options)
    return load_model_for_header(header)


def get_image(archive_url: str, key: str, model: str | None = None, storage_options=None,
              steps: int | None = None, sign_key: bytes | None = None) -> np.ndarray:
    """Decode one image of an archive: RGB uint8 (H, W, 3). steps=K: a preview from the first
    K coding steps, read as one prefix of the stream. The stream's declared size must be the
    index's before anything is decoded; `sign_key`: see read_bitstream."""
    from m2t_core import Decoder, read_header

    row, data = _read_row_stream(archive_url, key, storage_options, steps, sign_key)
    header = read_header(data, prefix=steps is not None)
    if row.get("height") is not None and (header.height, header.width) != (row["height"], row["width"]):
        raise ArchiveError(f"key {key!r}: the stream declares {header.height}x{header.width} pixels, the index records "
                           f"{row['height']}x{row['width']}: refused before decoding")
    decoder = Decoder(_archive_model(archive_url, header, model, storage_options))
    return decoder.decompress(data) if steps is None else decoder.preview(data, steps=steps).image


def get_main(argv: list[str] | None = None) -> int:
    """`m2t get ARCHIVE KEY OUT`: write one archived image (PNG, or by OUT's extension; `-`
    with --bitstream writes the raw bitstream to stdout)."""
    parser = argparse.ArgumentParser(prog="m2t get", description="Extract one image from an m2t archive.")
    parser.add_argument("archive", help="archive URL (a folder or s3://bucket/prefix)")
    parser.add_argument("key", help="the image's key, as in the archive's index")
    parser.add_argument("output", help="image file to write (PNG by default; the extension picks the format)")
    parser.add_argument("--bitstream", action="store_true", help="write the .m2t bitstream instead of pixels")
    parser.add_argument("--preview", type=int, default=None, metavar="K",
                        help="decode only the first K coding steps, read as one prefix of the stream")
    parser.add_argument("--model", default=None, help="decode with this model (name, path or URL)")
    parser.add_argument("--storage-options", default=None, metavar="JSON",
                        help='fsspec options per protocol, e.g. \'{"s3": {"endpoint_url": "http://..."}}\'')
    parser.add_argument("--sign-key-file", default=None, metavar="PATH",
                        help="the archive must be signed with this key (default: $M2T_SIGN_KEY if set)")
    args = parser.parse_args(argv)
    return run_main("m2t get", lambda: _get(args))


def _get(args) -> int:
    from pipeline.storage.integrity import sign_key

    options = json.loads(args.storage_options) if args.storage_options else None
    key = sign_key(args.sign_key_file)
    if args.bitstream:
        data = read_bitstream(args.archive, args.key, options, steps=args.preview, sign_key=key)
        if args.output == "-":
            sys.stdout.buffer.write(data)
        else:
            Path(args.output).write_bytes(data)
        return EXIT_OK
    from m2t_core import save_image

    rgb = get_image(args.archive, args.key, args.model, options, steps=args.preview, sign_key=key)
    out = Path(args.output)
    save_image(rgb, out, format=None if out.suffix else "PNG")
    what = "" if args.preview is None else f" (preview of {args.preview} steps)"
    print(f"{args.key} -> {out}: {rgb.shape[1]}x{rgb.shape[0]}{what}")
    return EXIT_OK


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
