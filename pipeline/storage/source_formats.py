"""The input formats, shared by planning, iter_shard and read_source (pipeline/storage/sources.py):
extensions, fsspec URLs, Parquet image columns, the one definition of an item's source
string, and random access into tars and Parquet files (SourceCache, bounded).

An item's source string: a file's URL; `TAR_URL#member` for a tar member; `PARQUET_URL#row=N`
for a Parquet row (tar_member_source, parquet_row_source; parse_source is their inverse).
"""

from __future__ import annotations

import bisect
import copy
import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
TAR_EXTS = (".tar",)  # compressed tars (.tar.gz) cannot be streamed member by member cheaply
PARQUET_EXTS = (".parquet", ".pq")
# Parquet columns looked for, in this order, when the config does not name them.
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes", "bytes")
KEY_COLUMNS = ("key", "path", "file_name", "filename", "name", "id")
MAX_SOURCE_BYTES = 1 << 28  # larger inputs are refused before they are read (compress's default)


class SourceError(ValueError):
    """An input URL or file cannot be listed or understood (a usage error, not a bad image)."""


# ====================================================================== filesystems


def filesystem(url: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None):
    """(fsspec filesystem, path) for a URL. `storage_options` maps a protocol ("s3", "gcs",
    ...) to the keyword arguments of its filesystem, so mixed local/S3 jobs work."""
    import fsspec

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options = dict((storage_options or {}).get(protocol, {}))
    return fsspec.core.url_to_fs(url, **options)


def join_url(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


# ====================================================================== names that are not UTF-8

# A key or source string in escaped form holds one of these; a name kept as it is holds none.
_ESCAPED = re.compile(r"%25|%[89A-F][0-9A-F]")
_ESCAPE = re.compile(r"%([0-9A-F]{2})")


def escape_name(name: str) -> str:
    """A name as keys and source strings record it: valid Unicode (Parquet, JSON, URLs), lossless.

    File and tar member names are bytes; Python gives undecodable ones as surrogates
    U+DC80..U+DCFF (os.fsdecode, tarfile: `surrogateescape`), which no UTF-8 writer accepts.
    A name that is valid UTF-8 and holds neither `%25` nor `%8X`..`%FX` (uppercase hex) is
    kept as it is (almost every name). Any other is escaped: each undecodable byte becomes
    `%XX` (uppercase hex, 80..FF) and each `%` becomes `%25`; the rest is kept. Escaped names
    always hold `%25` or a `%8X`..`%FX`, kept ones never do, so distinct names give distinct
    strings; `unescape_name` is the inverse (docs/archive_format.md)."""
    if not _ESCAPED.search(name) and not any("\udc80" <= c <= "\udcff" for c in name):
        return name
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (not from a file system)
        raw = name.encode("utf-8", "surrogatepass")
    text = raw.decode("utf-8", "surrogateescape")
    return "".join(f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else "%25" if c == "%" else c
                   for c in text)


def unescape_name(text: str) -> str:
    """The name `escape_name` gave `text` for (undecodable bytes as surrogateescape's
    U+DC80..U+DCFF, ready for os.fsencode or open()); a kept name is returned as it is."""
    if not _ESCAPED.search(text):
        return text
    raw = bytearray()
    at = 0
    for match in _ESCAPE.finditer(text):
        raw += text[at:match.start()].encode("utf-8", "surrogatepass") + bytes([int(match[1], 16)])
        at = match.end()
    raw += text[at:].encode("utf-8", "surrogatepass")
    return bytes(raw).decode("utf-8", "surrogateescape")


# ====================================================================== an item's source string


def tar_member_source(tar_url: str, member: str) -> str:
    return f"{tar_url}#{member}"


def parquet_row_source(parquet_url: str, row: int) -> str:
    return f"{parquet_url}#row={row}"


@dataclass(frozen=True)
class SourceRef:
    """A parsed source string: a file, a tar's member, or a Parquet file's row."""

    url: str
    member: str | None = None
    row: int | None = None


_ROW_FRAGMENT = re.compile(r"(.*)#row=(.*)", re.DOTALL)  # greedy: the last `#row=`


def parse_source(source: str) -> SourceRef:
    """The inverse of tar_member_source / parquet_row_source (a plain string is a file URL).

    The container decides: `#row=N` after a Parquet URL; else the first `#` after a `.tar`
    (member names may hold `#`); else no fragment (file names may hold `#` too). Only a path
    that itself holds `.tar#` or `.parquet#` is misread. Raises SourceError for a malformed
    fragment."""
    match = _ROW_FRAGMENT.fullmatch(source)
    if match and match[1].lower().endswith(PARQUET_EXTS):
        if not (match[2].isascii() and match[2].isdigit()):
            raise SourceError(f"{source}: malformed Parquet row {match[2]!r} (expected #row=N, N >= 0)")
        return SourceRef(match[1], row=int(match[2]))
    at = source.find("#")
    while at >= 0:
        if source[:at].lower().endswith(TAR_EXTS):
            if at + 1 == len(source):
                raise SourceError(f"{source}: empty tar member name after '#'")
            return SourceRef(source[:at], member=source[at + 1:])
        if source[:at].lower().endswith(PARQUET_EXTS):
            raise SourceError(f"{source}: a Parquet row is named `#row=N`, not {source[at:]!r}")
        at = source.find("#", at + 1)
    if source.lower().endswith(TAR_EXTS + PARQUET_EXTS):
        raise SourceError(f"{source}: names a whole tar or Parquet file, not one image in it "
                          "(`#member` or `#row=N` missing)")
    return SourceRef(source)


# ====================================================================== Parquet image columns


def pick_columns(schema, url: str, image_column: str | None, key_column: str | None) -> tuple[str, str]:
    """(image column, key column or "") of a Parquet schema; named ones are checked."""
    import pyarrow as pa

    def is_image(field) -> bool:
        t = field.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return True
        return pa.types.is_struct(t) and any(t.field(i).name == "bytes" for i in range(t.num_fields))

    names = schema.names
    if image_column:
        if image_column not in names:
            raise SourceError(f"{url}: no column {image_column!r} (columns: {names})")
        if not is_image(schema.field(image_column)):
            raise SourceError(f"{url}: column {image_column!r} is {schema.field(image_column).type}, "
                              "not binary or a struct with a `bytes` field")
        image = image_column
    else:
        candidates = [n for n in IMAGE_COLUMNS if n in names and is_image(schema.field(n))]
        candidates += [f.name for f in schema if is_image(f) and f.name not in candidates]
        if not candidates:
            raise SourceError(f"{url}: no image column (binary, or a struct with `bytes`) among {names}; "
                              "set parquet_image_column")
        image = candidates[0]
    if key_column:
        if key_column not in names and not key_column.startswith(f"{image}."):
            raise SourceError(f"{url}: no key column {key_column!r} (columns: {names})")
        return image, key_column
    for name in KEY_COLUMNS:
        if name in names and name != image and pa.types.is_string(schema.field(name).type):
            return image, name
    t = schema.field(image).type
    if pa.types.is_struct(t) and any(t.field(i).name == "path" for i in range(t.num_fields)):
        return image, f"{image}.path"  # Hugging Face datasets store the file name here
    return image, ""


def too_big(size: int, limit: int) -> str:
    return f"source of {size} bytes exceeds max_source_bytes ({limit})"


def null_image(column: str) -> str:
    return f"no image bytes (null in column {column!r})"


def image_values(column):
    """A Parquet image column's bytes: the column itself, or a struct's `bytes` field."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_struct(column.type):
        # A null struct has no bytes even where its child array holds a value.
        return pc.if_else(column.is_valid(), pc.struct_field(column, "bytes"), None)
    return column


# ====================================================================== random access into tars and Parquet files


class SourceCache:
    """What read_source keeps between calls, so that reading the items of one tar or Parquet
    file does not re-read the file for each item. Chosen bounds:

    * per tar, its index (member -> offset, size; ~100 bytes a member), built by scanning
      the headers only as far as a lookup needs (sequential reads scan the tar once), kept
      for the cache's life;
    * open files for the `max_open` tars / Parquet files used last (LRU; older ones are
      closed), each Parquet file holding its last decoded row group (image column only).

    So memory is the tar indexes plus `max_open` open files and row groups. Not thread-safe:
    one per thread or worker; a fork or pickled copy keeps the indexes and reopens files."""

    def __init__(self, max_open: int = 4):
        self.max_open = max(1, max_open)
        self._readers: dict[tuple, _TarReader | _ParquetReader] = {}
        self._open: OrderedDict[tuple, None] = OrderedDict()  # readers holding files, LRU first
        self._pid = os.getpid()

    def tar(self, url: str, storage_options=None) -> "_TarReader":
        return self._reader(("tar", url), lambda: _TarReader(url), storage_options)

    def parquet(self, url: str, image_column: str | None, storage_options=None) -> "_ParquetReader":
        return self._reader(("parquet", url, image_column), lambda: _ParquetReader(url, image_column),
                            storage_options)

    def _reader(self, key: tuple, make, storage_options):
        if self._pid != os.getpid():  # a forked copy: the files are the parent's, never touch them
            for reader in self._readers.values():
                reader.forget()
            self._open.clear()
            self._pid = os.getpid()
        reader = self._readers.get(key)
        if reader is None:
            reader = self._readers[key] = make()
        if storage_options is not None:
            reader.storage_options = storage_options
        self._open[key] = None
        self._open.move_to_end(key)
        while len(self._open) > self.max_open:
            self._readers[self._open.popitem(last=False)[0]].release()
        return reader

    @property
    def open_files(self) -> int:
        return len(self._open)

    def close(self) -> None:
        """Close the open files; the indexes stay."""
        for key in self._open:
            self._readers[key].release()
        self._open.clear()

    def __getstate__(self) -> dict:
        # A copy (a DataLoader or Ray worker's) travels without open files: it reopens them.
        readers = {key: copy.copy(reader) for key, reader in self._readers.items()}
        for reader in readers.values():
            reader.forget()
        return {**self.__dict__, "_readers": readers, "_open": OrderedDict(), "_pid": -1}


class _TarReader:
    """One tar: its image members' index, grown by scanning headers, and an open file."""

    def __init__(self, url: str):
        self.url = url
        self.members: dict[str, tuple[int, int]] = {}  # image member -> (data offset, size); first wins
        self.scanned_to = 0  # byte offset of the next header to read
        self.complete = False
        self.error = ""
        self.storage_options = None
        self.forget()

    def forget(self) -> None:
        self._file = self._tarfile = None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
        self.forget()

    def _handle(self):
        if self._file is None:
            fs, path = filesystem(self.url, self.storage_options)
            self._file = fs.open(path, "rb")
        return self._file

    def scan(self, until: str | None = None) -> None:
        """Read headers (seeking past data) until `until` is indexed or the tar ends; a
        damaged tar ends the scan, keeping the members before the damage. Failing to open
        the file (it is missing, ...) raises, and leaves the index as it was."""
        if self.complete:
            return
        if self._tarfile is None:
            self._handle().seek(self.scanned_to)  # a TarFile starts reading where its file is
        try:
            if self._tarfile is None:
                self._tarfile = tarfile.open(fileobj=self._file, mode="r:")
            while (member := self._tarfile.next()) is not None:
                self.scanned_to = self._tarfile.offset
                if member.isfile() and member.name.lower().endswith(IMAGE_EXTS):
                    self.members.setdefault(member.name, (member.offset_data, member.size))
                    if member.name == until:
                        return
            self.complete = True
        except (tarfile.TarError, OSError, EOFError) as exc:
            self.complete, self.error = True, f"{type(exc).__name__}: {exc}"
        self._tarfile = None  # the scan is over: drop the TarFile and its list of members

    def read(self, member: str, limit: int) -> bytes:
        if member not in self.members and not self.complete:
            self.scan(until=member)
        if member not in self.members:
            why = f"damaged after {len(self.members)} image member(s): {self.error}" if self.error \
                else f"{len(self.members)} image member(s)"
            raise SourceError(f"{tar_member_source(self.url, member)}: the tar has no image member "
                              f"{member!r} ({why})")
        offset, size = self.members[member]
        if size > limit:
            raise SourceError(f"{tar_member_source(self.url, member)}: {too_big(size, limit)}")
        f = self._handle()
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise SourceError(f"{tar_member_source(self.url, member)}: member is truncated "
                              f"({len(data)} of {size} bytes)")
        return data


class _ParquetReader:
    """One Parquet file: its image column, row-group bounds, and the last row group read."""

    def __init__(self, url: str, image_column: str | None):
        self.url, self.requested = url, image_column
        self.column = ""
        self.starts: list[int] = []  # first row of each row group, then the row count
        self.storage_options = None
        self.forget()

    def forget(self) -> None:
        self._file = self._parquet = self._values = None
        self._group = -1

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
        self.forget()

    def _open_file(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, path = filesystem(self.url, self.storage_options)
        self._file = fs.open(path, "rb")
        try:
            # No pre-buffering nor Arrow threads: see archive.read_parquet.
            self._parquet = pq.ParquetFile(self._file, pre_buffer=False)
            self.column = pick_columns(self._parquet.schema_arrow, self.url, self.requested, None)[0]
        except (pa.ArrowException, SourceError) as exc:
            self.release()
            if isinstance(exc, SourceError):
                raise
            raise SourceError(f"{self.url}: not a readable Parquet file ({exc})") from None
        meta = self._parquet.metadata
        self.starts = [0]
        for g in range(meta.num_row_groups):
            self.starts.append(self.starts[-1] + meta.row_group(g).num_rows)

    def read(self, row: int, limit: int) -> bytes:
        if self._parquet is None:
            self._open_file()
        source = parquet_row_source(self.url, row)
        if not 0 <= row < self.starts[-1]:
            raise SourceError(f"{source}: row {row} is out of range (the file has {self.starts[-1]} rows)")
        group = bisect.bisect_right(self.starts, row) - 1
        if group != self._group:
            table = self._parquet.read_row_group(group, columns=[self.column], use_threads=False)
            self._values, self._group = image_values(table.column(0)), group
        value = self._values[row - self.starts[group]].as_py()
        if value is None:
            raise SourceError(f"{source}: {null_image(self.column)}")
        if len(value) > limit:
            raise SourceError(f"{source}: {too_big(len(value), limit)}")
        return bytes(value)
