"""Checks of an archive's indexes against its blobs, before anything is decoded.

An index is untrusted data that says where streams are: a hostile or damaged one could name
a million overlapping copies of three real streams and make a reader decode without end.
`check_shard_index` streams a shard's index (shards/<shard>.parquet) by row group, reading
only the columns it needs, and checks, in one pass with O(1) memory besides a bounded list
of bad rows:

* the columns and their types (archive.index_schema());
* every row group's declared size (rows, uncompressed bytes) before it is read;
* each ok row's offset and length: integers, the length at least the smallest possible
  stream (`min_stream_bytes`, from m2t_core.bitstream) and at most `max_stream_bytes`, the
  stream inside the blob;
* the ok rows sorted by offset and not overlapping (each starts at or after the end of the
  one before), which bounds their count by blob size / min_stream_bytes.

A row whose location is invalid is a bad row (`IndexSummary.bad_rows`, reported per key, the
rest of the shard still read); overlapping or unsorted rows, too many bad rows, or a malformed
index refuse the whole shard (IndexCheckError). verify, restore, `m2t get` and the dataset
readers call this before they decode: `check_shard(archive, shard)` is the one-call form.

`unsafe_key_reason` / `safe_relpath`: the rule restore uses for keys that could escape its
output root (verify reports the same keys as issues).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipeline.storage import archive as A

MAX_BAD_ROWS = 1000  # bad rows listed per shard; more refuse the shard (the index is garbage)
INDEX_BATCH_ROWS = 4096  # rows decoded at a time while checking
MAX_INDEX_BYTES = 1 << 30  # a shard index over this is refused before it is read


class IndexCheckError(A.ArchiveError):
    """A shard's index cannot be trusted at all (malformed, overlapping or unsorted rows):
    nothing of the shard is decoded. `kind` is verify's issue kind, `key` the first bad row's."""

    def __init__(self, message: str, kind: str = "bad_index", key: str | None = None):
        super().__init__(message)
        self.kind, self.key = kind, key


def min_stream_bytes() -> int:
    """The fewest bytes any bitstream has (m2t_core.bitstream.MIN_STREAM_BYTES)."""
    from m2t_core import bitstream as bs

    return bs.MIN_STREAM_BYTES


@dataclass
class IndexSummary:
    """What check_shard_index found: rows in the index, rows with status ok, the bytes the
    ok rows with a valid location cover, and the others (row number -> (key, reason))."""

    shard: str
    rows: int = 0
    ok: int = 0
    covered: int = 0
    blob_size: int = 0
    bad_rows: dict[int, tuple[str, str]] = field(default_factory=dict)


def row_location_problem(row: dict[str, Any], blob_size: int, max_stream_bytes: int = A.MAX_STREAM_BYTES) -> str | None:
    """Why an ok row's offset / length cannot be a stream of this blob, or None."""
    offset, length = row.get("offset"), row.get("length")
    if not (isinstance(offset, int) and isinstance(length, int)) or isinstance(offset, bool) or isinstance(length, bool):
        return f"offset {offset!r} / length {length!r} are not integers"
    least = min_stream_bytes()
    if offset < 0 or not least <= length <= max_stream_bytes:
        return (f"offset {offset} / length {length} are not valid (offset >= 0, {least} <= length <= "
                f"{max_stream_bytes}: no stream is shorter than its smallest header)")
    if offset + length > blob_size:
        return f"offset {offset} + length {length} is outside the blob ({blob_size} bytes)"
    return None


def _parquet(source):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(source, pre_buffer=False)
    except Exception as exc:
        raise IndexCheckError(f"not a readable Parquet file: {type(exc).__name__}: {exc}", "missing_index") from None


def _check_layout(pf, shard: str) -> None:
    bad = A.schema_problems(pf.schema_arrow, A.index_schema())
    if bad:
        raise IndexCheckError(f"shard {shard}: malformed index ({'; '.join(bad[:5])})", "missing_index")
    meta = pf.metadata
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        if group.total_byte_size > A.MAX_KEYS_GROUP_BYTES or group.num_rows < 0:
            # Declared by the file itself: refused before anything is allocated from it.
            raise IndexCheckError(f"shard {shard}: malformed index: row group {g} declares {group.num_rows} rows / "
                                  f"{group.total_byte_size} bytes (at most {A.MAX_KEYS_GROUP_BYTES} bytes)",
                                  "missing_index")


def iter_index_rows(source, columns=None, batch_rows: int = 1024) -> Iterator[dict[str, Any]]:
    """A shard index's rows (dicts of `columns`, every status), streamed by row group: memory
    is one batch. `source`: bytes, a pyarrow buffer or a binary file object."""
    import pyarrow as pa

    pf = _parquet(pa.BufferReader(source) if isinstance(source, (bytes, bytearray)) else source)
    wanted = list(columns or A.index_schema().names)
    names = [n for n in wanted if n in pf.schema_arrow.names]
    absent = dict.fromkeys(n for n in wanted if n not in names)  # optional columns of older indexes: None
    for batch in pf.iter_batches(batch_size=batch_rows, columns=names, use_threads=False):
        for row in batch.to_pylist():
            yield {**absent, **row}


def check_shard_index(source, shard: str, blob_size: int, max_stream_bytes: int = A.MAX_STREAM_BYTES) -> IndexSummary:
    """Check a shard's index (`source`: bytes or a binary file object) against its blob's
    size, streaming it; see the module docstring. Returns the summary (bad rows listed);
    raises IndexCheckError when nothing in the shard can be trusted."""
    import pyarrow as pa

    pf = _parquet(pa.BufferReader(source) if isinstance(source, (bytes, bytearray)) else source)
    _check_layout(pf, shard)
    out = IndexSummary(shard, rows=pf.metadata.num_rows, blob_size=blob_size)
    least = min_stream_bytes()
    end, previous = 0, None  # where the last good ok row ended, and its key
    number = 0
    for batch in pf.iter_batches(batch_size=INDEX_BATCH_ROWS, columns=["key", "status", "offset", "length"],
                                 use_threads=False):
        for row in batch.to_pylist():
            number += 1
            if row["status"] != "ok":
                continue
            out.ok += 1
            problem = row_location_problem(row, blob_size, max_stream_bytes)
            if problem:
                out.bad_rows[number - 1] = (row["key"], problem)
                if len(out.bad_rows) > MAX_BAD_ROWS:
                    raise IndexCheckError(f"shard {shard}: more than {MAX_BAD_ROWS} rows point outside "
                                          f"shards/{shard}.bin ({blob_size} bytes): the index is refused", "bad_offset",
                                          row["key"])
                continue
            if row["offset"] < end:
                raise IndexCheckError(
                    f"shard {shard}: row {number - 1} (key {row['key']!r}) at offset {row['offset']} overlaps or "
                    f"precedes the stream before it (key {previous!r}, ending at {end}): a shard's rows are sorted "
                    f"and never overlap, so at most {blob_size // least} streams of >= {least} bytes fit its "
                    f"{blob_size}-byte blob; the index is refused before anything is decoded", "bad_index", row["key"])
            end, previous = row["offset"] + row["length"], row["key"]
            out.covered += row["length"]
    if number != out.rows:
        raise IndexCheckError(f"shard {shard}: the index holds {number} rows, its metadata says {out.rows}",
                              "missing_index")
    return out


def read_index_bytes(archive: A.Archive, shard: str) -> bytes:
    """shards/<shard>.parquet's bytes (read once: checked, hashed and read from the same
    bytes), refused over MAX_INDEX_BYTES before reading. FileNotFoundError passes through."""
    path = archive.shard_path(shard, ".parquet")
    size = archive.fs.size(path)
    if size is None or size > MAX_INDEX_BYTES:
        raise IndexCheckError(f"shard {shard}: shards/{shard}.parquet has {size} bytes (at most {MAX_INDEX_BYTES})",
                              "missing_index")
    return archive.fs.cat_file(path)


def check_shard(archive: A.Archive, shard: str, manifest_entry: Any = None,
                max_stream_bytes: int = A.MAX_STREAM_BYTES) -> tuple[bytes, IndexSummary]:
    """One call for readers: the shard's index bytes, checked against the digest the
    manifest's entry for the shard records (if any: integrity.check_index_digest) and against
    the blob (IndexCheckError / IntegrityError / ArchiveError when the shard cannot be read at
    all). Iterate the rows with iter_index_rows(data, columns), skipping summary.bad_rows."""
    from pipeline.storage.integrity import check_index_digest

    blob = archive.shard_path(shard, ".bin")
    try:
        blob_size = archive.fs.size(blob)
    except FileNotFoundError:
        raise A.ArchiveError(f"shard {shard}: shards/{shard}.bin is missing") from None
    try:
        data = read_index_bytes(archive, shard)
    except FileNotFoundError:
        raise IndexCheckError(f"shard {shard}: shards/{shard}.parquet is missing", "missing_index") from None
    check_index_digest(data, shard, manifest_entry)
    return data, check_shard_index(data, shard, int(blob_size), max_stream_bytes)


# ====================================================================== keys that could escape a folder

_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def unsafe_key_reason(key: Any) -> str | None:
    """Why a key could escape a folder it is written under (absolute, `..`, `.` or empty
    segments, backslashes, drive letters, URLs, control characters such as NUL and newline),
    or None. Keys are never rewritten (two keys could then collide): unsafe ones are refused."""
    if not isinstance(key, str) or not key:
        return "empty or not a string"
    if key.startswith("/"):
        return "absolute path"
    if _UNSAFE_CHARS.search(key):
        return "control character or backslash"
    if re.match(r"^[A-Za-z]:", key) or "://" in key:
        return "drive letter or URL"
    if any(p in ("", ".", "..") for p in key.split("/")):
        return "'..', '.' or empty path segment"
    return None


def safe_relpath(key: str, ext: str) -> str | None:
    """`key` + `ext` as a path relative to an output root, or None if the key could escape it."""
    return None if unsafe_key_reason(key) else key + ext
