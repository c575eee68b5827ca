"""Input corpora, for every job that reads them (compress, eval, verify --against-source,
training): listing, sharding and reading, behind one interface.

Three input formats, recognised per file by extension, can be mixed under one input URL:

* image files (a folder, searched recursively, or a glob): key = the path relative to the
  input root (`photos/2019/a.jpg`);
* webdataset-style `.tar` shards: every image member is an input; key = the tar's relative
  path, a slash, and the member name (`train-0001.tar/000123.jpg`); other members (captions,
  JSON sidecars) are not inputs;
* Parquet files with one row per image: the image bytes come from a binary column or from a
  Hugging Face-style struct column `{bytes, path}`; key = the value of the key column when
  there is one (`key`, as img2dataset writes, or the struct's `path`, ...), else the file's
  relative path, `#` and the row number (`part-0.parquet#17`).

The unit of work is a SHARD: up to `shard_size` image files, one whole tar, or up to
`shard_size` rows of one Parquet file. `plan_shards` lists the inputs on the driver and
returns the shards in a deterministic order, each with a fingerprint of what it covers (keys,
sources, sizes), so that a resumed run can tell whether the input changed. Duplicate keys
among files and Parquet rows are found while planning (the first occurrence in plan order
wins); duplicates inside one tar are found while it is read (tars are streamed, never indexed
on the driver: that would download every tar twice).

`iter_shard(spec, ...)` reads one shard item by item (one image in memory at a time), on a
worker, and yields `SourceItem`s: the bytes of an image or the reason there are none.

File and member names need not be UTF-8 (bytes such as `\xff\xfe` are common in real folders
and tars): keys and source strings hold them escaped (`escape_name`: lossless, distinct names
give distinct keys; names that are valid UTF-8 without `%25` / `%8X`..`%FX` are unchanged),
so such a name never stops an archive; `read_source` unescapes.

Every item names where it came from in `SourceItem.source` (what archive indexes record):
the file's URL; `TAR_URL#member` for a tar member; `PARQUET_URL#row=N` for a Parquet row.
`tar_member_source`, `parquet_row_source` and `parse_source` (source_formats.py, with the
extensions, Parquet columns and the readers behind SourceCache) are the one definition of
these strings, and `read_source(source)` is their inverse: the bytes the item was read from
(verify --against-source and training read inputs through it). `list_sources` lists every
input of a corpus as such strings (tars indexed by their headers), for random access.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

# The formats' definitions live in source_formats; they are this module's interface too.
from pipeline.storage.source_formats import (  # noqa: F401
    IMAGE_COLUMNS, IMAGE_EXTS, KEY_COLUMNS, MAX_SOURCE_BYTES, PARQUET_EXTS, TAR_EXTS, SourceCache, SourceError,
    SourceRef, escape_name, filesystem, image_values, join_url, null_image, parquet_row_source, parse_source,
    pick_columns, tar_member_source, too_big, unescape_name)


@dataclass
class SourceItem:
    """One input image as a worker sees it: bytes, or the reason why there are none."""

    key: str
    source: str  # URL of the file, with `#member` / `#row=N` for tar members and Parquet rows
    data: bytes | None = None
    status: str = "ok"  # "ok" (data is set), "error" or "duplicate"
    error: str = ""
    source_bytes: int = 0


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


# ====================================================================== planning


@dataclass
class ShardSpec:
    """What one worker call compresses. Plain data: it travels to Ray actors as a dict."""

    shard: str  # shard id, e.g. "00042": names the output files
    kind: str  # "files", "tar" or "parquet"
    root: str  # the input root URL the keys are relative to
    items: list[dict[str, Any]]  # files: [{key, url, size}]; tar: [{key, url, size}] (the tar itself)
    # parquet: row range of one file and the columns to read
    row_start: int = 0
    row_end: int = 0
    image_column: str = ""
    key_column: str = ""
    keys: list[str] | None = None  # parquet: the planned key of every row in the range
    # Plan-level duplicates: item/row index (as a string, JSON-friendly) -> reason.
    duplicates: dict[str, str] | None = None

    @property
    def fingerprint(self) -> str:
        """What this shard covers: a resumed run must find the same input here."""
        body = {k: v for k, v in self.to_dict().items() if k != "duplicates"}
        body["duplicates"] = sorted((self.duplicates or {}).items())
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]

    @property
    def planned_images(self) -> int | None:
        """Images in the shard if known before reading it (a tar's count is not)."""
        if self.kind == "files":
            return len(self.items)
        if self.kind == "parquet":
            return self.row_end - self.row_start
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard, "kind": self.kind, "root": self.root, "items": self.items,
            "row_start": self.row_start, "row_end": self.row_end, "image_column": self.image_column,
            "key_column": self.key_column, "keys": self.keys, "duplicates": self.duplicates,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShardSpec":
        return cls(**data)


def _list_root(url: str, storage_options) -> tuple[str, list[tuple[str, str, int]]]:
    """Files under one input URL: (root URL, [(relative path, file URL, size)]), sorted."""
    fs, path = filesystem(url, storage_options)
    if _has_magic(path):
        # Keys relative to the directory above the first wildcard: `data/*/x.jpg` -> `a/x.jpg`.
        prefix = path[:min(path.index(c) for c in "*?[" if c in path)]
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        found = fs.glob(path, detail=True)
        entries = {p: info for p, info in found.items() if info.get("type") != "directory"}
    elif fs.isdir(path):
        base = path.rstrip("/")
        entries = fs.find(path, detail=True)
    elif fs.exists(path):
        base = posixpath.dirname(path.rstrip("/"))
        entries = {path: fs.info(path)}
    else:
        raise SourceError(f"input not found: {url}")
    root = fs.unstrip_protocol(base) if base else url
    files = []
    for p in sorted(entries):
        rel = p[len(base):].lstrip("/") if base and p.startswith(base) else posixpath.basename(p)
        files.append((rel, fs.unstrip_protocol(p), int(entries[p].get("size") or 0)))
    return root, files


def _read_key_column(pf, key: str) -> list:
    """The key column's values; `image.path` names a field of a struct column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = pf.read(columns=[key]).column(0)
    # Reading a nested field gives its parent struct (holding only that field): unwrap it.
    for name in key.split(".")[1:]:
        if pa.types.is_struct(column.type):
            column = pc.struct_field(column, name)
    return [None if v is None else str(v) for v in column.to_pylist()]


def _parquet_info(rel: str, url: str, storage_options, image_column: str | None,
                  key_column: str | None) -> tuple[str, str, list[str]]:
    """(image column, key column, the planned key of every row) of one Parquet file."""
    import pyarrow.parquet as pq

    fs, path = filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            image, key = pick_columns(pf.schema_arrow, url, image_column, key_column)
            rows = pf.metadata.num_rows
            keys_col = _read_key_column(pf, key) if key else [None] * rows
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"{url}: not a readable Parquet file ({exc})") from None
    keys = [str(k) if k not in (None, "") else f"{rel}#{i}" for i, k in enumerate(keys_col)]
    return image, key, keys


def _parquet_shards(rel: str, url: str, root: str, size: int, shard_size: int, storage_options,
                    image_column: str | None, key_column: str | None, info=None) -> list[ShardSpec]:
    image, key, keys = info or _parquet_info(rel, url, storage_options, image_column, key_column)
    rows = len(keys)
    return [
        ShardSpec(shard="", kind="parquet", root=root, items=[{"key": rel, "url": url, "size": size}],
                  row_start=start, row_end=min(start + shard_size, rows), image_column=image,
                  key_column=key, keys=keys[start:start + shard_size])
        for start in range(0, rows, shard_size)
    ]


def small_corpus_shard_size(counts: Sequence[int], unsplittable: int, shard_size: int, min_shards: int) -> int:
    """The shard size that cuts a corpus into at least `min_shards` shards when `shard_size`
    gives fewer: about total / min_shards (even shards), smaller if the runs' rounding needs
    it, 1 at the least. `counts` are the sizes of the splittable runs (the image files of one
    input URL, the rows of one Parquet file); `unsplittable` counts the tars (one shard each).
    Each image's bitstream does not depend on the split, only which shard holds it."""
    def shards_at(size: int) -> int:
        return unsplittable + sum(-(-n // size) for n in counts)

    if min_shards <= 1 or shards_at(shard_size) >= min_shards:
        return shard_size
    size = min(shard_size, max(1, -(-sum(counts) // max(1, min_shards - unsplittable))))
    while size > 1 and shards_at(size) < min_shards:
        size -= 1
    return size


def plan_shards(urls: str | Sequence[str], shard_size: int,
                storage_options: Mapping[str, Mapping[str, Any]] | None = None,
                image_column: str | None = None, key_column: str | None = None,
                min_shards: int = 1) -> list[ShardSpec]:
    """List every input and cut it into shards, numbered in a deterministic order: per input
    URL (in the order given), its image files in chunks, then its tars, then its Parquet files
    (each sorted by path). Raises SourceError if an input has nothing to compress.

    `min_shards` > 1: a corpus that `shard_size` cuts into fewer shards is cut finer (see
    small_corpus_shard_size), so that a small job still gives every actor work;
    plan_shards_with_size also returns the size used."""
    return plan_shards_with_size(urls, shard_size, storage_options, image_column, key_column, min_shards)[0]


def plan_shards_with_size(urls: str | Sequence[str], shard_size: int,
                          storage_options: Mapping[str, Mapping[str, Any]] | None = None,
                          image_column: str | None = None, key_column: str | None = None,
                          min_shards: int = 1) -> tuple[list[ShardSpec], int]:
    """plan_shards, and the shard size it used (smaller than `shard_size` only for a corpus
    that would otherwise give fewer than `min_shards` shards)."""
    if shard_size < 1:
        raise SourceError(f"shard_size must be >= 1, got {shard_size}")
    listed = []
    for url in [urls] if isinstance(urls, str) else list(urls):
        root, files = _list_root(url, storage_options)
        images = [(r, u, s) for r, u, s in files if r.lower().endswith(IMAGE_EXTS)]
        tars = [(r, u, s) for r, u, s in files if r.lower().endswith(TAR_EXTS)]
        parquets = [(r, u, s) for r, u, s in files if r.lower().endswith(PARQUET_EXTS)]
        if not (images or tars or parquets):
            raise SourceError(f"no images ({', '.join(IMAGE_EXTS)}), .tar or .parquet files found at {url}")
        parquets = [(r, u, s, _parquet_info(r, u, storage_options, image_column, key_column))
                    for r, u, s in parquets]
        listed.append((root, images, tars, parquets))
    counts = [len(images) for _, images, _, _ in listed] + [len(info[2]) for *_, pqs in listed
                                                             for *_, info in pqs]
    size = small_corpus_shard_size(counts, sum(len(tars) for _, _, tars, _ in listed), shard_size, min_shards)
    shards: list[ShardSpec] = []
    for root, images, tars, parquets in listed:
        for start in range(0, len(images), size):
            chunk = images[start:start + size]
            shards.append(ShardSpec(shard="", kind="files", root=root,
                                    items=[{"key": r, "url": u, "size": s} for r, u, s in chunk]))
        for r, u, s in tars:
            shards.append(ShardSpec(shard="", kind="tar", root=root, items=[{"key": r, "url": u, "size": s}]))
        for r, u, s, info in parquets:
            shards.extend(_parquet_shards(r, u, root, s, size, storage_options, image_column, key_column, info))
    width = max(5, len(str(len(shards) - 1)))
    first_seen: dict[str, str] = {}
    for i, spec in enumerate(shards):
        spec.shard = f"{i:0{width}d}"
        _mark_duplicates(spec, first_seen)
    return shards, size


def _mark_duplicates(spec: ShardSpec, first_seen: dict[str, str]) -> None:
    """Record in `spec` which of its keys were already planned (in an earlier shard or earlier
    in this one). Tar member keys start with the tar's unique relative path, and a tar's own
    repeats are found while it is read, so tars need nothing here."""
    if spec.kind == "tar":
        return
    if spec.kind == "files":
        keys = [(item["key"], item["url"]) for item in spec.items]
    else:
        url = spec.items[0]["url"]
        keys = [(k, parquet_row_source(url, spec.row_start + j)) for j, k in enumerate(spec.keys or [])]
    dups = {}
    for j, (key, source) in enumerate(keys):
        if key in first_seen:
            dups[str(j)] = f"duplicate key {key!r}: already taken by {first_seen[key]}"
        else:
            first_seen[key] = source
    spec.duplicates = dups or None


# ====================================================================== reading (on a worker)


def iter_shard(spec: ShardSpec, storage_options=None, max_source_bytes: int = MAX_SOURCE_BYTES) -> Iterator[SourceItem]:
    """The inputs of one shard in order, one at a time. Never raises for a bad input: an
    unreadable file or row becomes an item with status "error" and the reason."""
    if spec.kind == "files":
        items = _iter_files(spec, storage_options, max_source_bytes)
    elif spec.kind == "tar":
        items = _iter_tar(spec, storage_options, max_source_bytes)
    elif spec.kind == "parquet":
        items = _iter_parquet(spec, storage_options, max_source_bytes)
    else:
        raise SourceError(f"shard {spec.shard}: unknown kind {spec.kind!r}")
    for item in items:
        # Names as the file system or tar gave them (undecodable bytes as surrogates) are
        # recorded escaped: valid Unicode, lossless (read_source unescapes the source).
        item.key, item.source = escape_name(item.key), escape_name(item.source)
        if item.status == "ok" and _CONTROL_CHARS.search(item.key):
            # Such a key could be archived but never restored to a file (restore refuses it).
            item.status, item.data = "error", None
            item.error = (f"key {item.key!r} contains a control character (newline, tab, ...): refused, "
                          "it could never be restored to a file")
        yield item


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _iter_files(spec: ShardSpec, storage_options, limit: int) -> Iterator[SourceItem]:
    dups = spec.duplicates or {}
    for j, item in enumerate(spec.items):
        key, url, size = item["key"], item["url"], int(item["size"])
        if str(j) in dups:
            yield SourceItem(key, url, status="duplicate", error=dups[str(j)], source_bytes=size)
            continue
        if size > limit:
            yield SourceItem(key, url, status="error", error=too_big(size, limit), source_bytes=size)
            continue
        try:
            fs, path = filesystem(url, storage_options)
            data = fs.cat_file(path)
        except Exception as exc:  # missing since listing, permission, network after retries
            yield SourceItem(key, url, status="error", error=f"cannot read: {exc}", source_bytes=size)
            continue
        yield SourceItem(key, url, data=data, source_bytes=len(data))


def _iter_tar(spec: ShardSpec, storage_options, limit: int) -> Iterator[SourceItem]:
    """Stream the tar once, front to back (mode "r|": no seeks, so S3 reads are sequential)."""
    tar_key, url = spec.items[0]["key"], spec.items[0]["url"]
    seen: dict[str, str] = {}
    rows = 0  # image members yielded so far (each became a row)
    try:
        fs, path = filesystem(url, storage_options)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile() or not member.name.lower().endswith(IMAGE_EXTS):
                    continue
                key, source = f"{tar_key}/{member.name}", tar_member_source(url, member.name)
                if key in seen:
                    item = SourceItem(key, source, status="duplicate", source_bytes=member.size,
                                      error=f"duplicate key {key!r}: the tar holds this member twice; "
                                            f"the first copy ({seen[key]}) was kept")
                elif member.size > limit:
                    item = SourceItem(key, source, status="error", error=too_big(member.size, limit),
                                      source_bytes=member.size)
                else:
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} is truncated "
                                                f"({len(data)} of {member.size} bytes)")
                    item = SourceItem(key, source, data=data, source_bytes=len(data))
                seen.setdefault(key, f"image member {rows + 1}")
                rows += 1
                yield item
    except (tarfile.TarError, OSError, EOFError) as exc:
        # Members after the damage cannot be listed: one row, keyed by the tar itself, says so.
        yield SourceItem(tar_key, url, status="error",
                         error=f"tar damaged after {rows} complete image member(s): {exc}")


def _iter_parquet(spec: ShardSpec, storage_options, limit: int) -> Iterator[SourceItem]:
    url = spec.items[0]["url"]
    done = 0
    try:
        for item in _read_parquet_rows(spec, storage_options, limit):
            done += 1
            yield item
    except Exception as exc:  # the file changed or broke since planning: every row left fails
        keys = spec.keys or []
        for j in range(done, spec.row_end - spec.row_start):
            yield SourceItem(keys[j], parquet_row_source(url, spec.row_start + j), status="error",
                             error=f"cannot read the Parquet file: {exc}")


def _read_parquet_rows(spec: ShardSpec, storage_options, limit: int) -> Iterator[SourceItem]:
    import pyarrow.parquet as pq

    url = spec.items[0]["url"]
    keys = spec.keys or []
    dups = spec.duplicates or {}
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        # Only the row groups that overlap [row_start, row_end); batches keep memory small.
        groups, first_row, offset = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < spec.row_end and offset + n > spec.row_start:
                groups.append(g)
                first_row = offset if first_row is None else first_row
            offset += n
        row = first_row or 0
        for batch in pf.iter_batches(batch_size=16, row_groups=groups, columns=[spec.image_column]):
            for value in image_values(batch.column(0)):
                if spec.row_start <= row < spec.row_end:
                    j = row - spec.row_start
                    key, source = keys[j], parquet_row_source(url, row)
                    data = value.as_py()
                    if str(j) in dups:
                        yield SourceItem(key, source, status="duplicate", error=dups[str(j)],
                                         source_bytes=len(data or b""))
                    elif data is None:
                        yield SourceItem(key, source, status="error", error=null_image(spec.image_column))
                    elif len(data) > limit:
                        yield SourceItem(key, source, status="error", error=too_big(len(data), limit),
                                         source_bytes=len(data))
                    else:
                        yield SourceItem(key, source, data=bytes(data), source_bytes=len(data))
                row += 1
                if row >= spec.row_end:
                    return
    if row < spec.row_end:
        raise SourceError(f"the file has {row} rows, {spec.row_end} were planned")


# ====================================================================== reading one item back


def read_source(source: str, storage_options=None, *, image_column: str | None = None,
                cache: "SourceCache | None" = None, max_bytes: int = MAX_SOURCE_BYTES) -> bytes:
    """The bytes of the item named `source` (a SourceItem.source: the inverse of the naming).

    `image_column`: a Parquet file's image column as planning was given it (None: picked the
    same way). `cache`: keep tar indexes and open files between calls (see SourceCache);
    without one, each call opens (and a tar member scans) its file anew. Sources over
    `max_bytes` are refused before they are read, as iter_shard does. Raises SourceError
    naming the source for a malformed source, a missing member or row, a null image or a
    size over the limit; I/O errors (a missing file, ...) pass through. `source` is in the
    escaped form that indexes record (escape_name)."""
    ref = parse_source(unescape_name(source))
    if ref.member is None and ref.row is None:
        return _read_file(ref.url, storage_options, max_bytes)
    own = cache is None
    cache = SourceCache(max_open=1) if own else cache
    try:
        if ref.member is not None:
            return cache.tar(ref.url, storage_options).read(ref.member, max_bytes)
        return cache.parquet(ref.url, image_column, storage_options).read(ref.row, max_bytes)
    finally:
        if own:
            cache.close()


def _read_file(url: str, storage_options, limit: int) -> bytes:
    from fsspec.implementations.local import LocalFileSystem

    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):  # a stat is free here (and read(limit) would allocate the limit)
        size = fs.size(path)
        if size > limit:
            raise SourceError(f"{url}: {too_big(size, limit)}")
        return fs.cat_file(path)
    data = fs.cat_file(path, start=0, end=limit + 1)  # one ranged request, never more than the limit
    if len(data) > limit:
        raise SourceError(f"{url}: source of more than {limit} bytes exceeds max_source_bytes ({limit})")
    return data


def list_sources(urls: str | Sequence[str], storage_options=None, image_column: str | None = None,
                 cache: "SourceCache | None" = None) -> tuple[list[str], list[str]]:
    """Every input under `urls`, as read_source's strings, in plan order: image files, each
    image member of each tar (scanned by headers; the first of a repeated name), each row of
    each Parquet file. Planned duplicate keys are kept (they are distinct images; only an
    archive needs unique keys). Sources are escaped as an index records them (escape_name).
    Returns (sources, problems): a damaged tar keeps the members
    before the damage and adds a problem. With a cache, the tar indexes stay in it (its files
    are closed), so that reading through it (or a fork or copy of it) needs no second scan."""
    sources: list[str] = []
    problems: list[str] = []
    cache = SourceCache(max_open=1) if cache is None else cache
    try:
        for spec in plan_shards(urls, 1 << 30, storage_options, image_column):
            url = spec.items[0]["url"]
            if spec.kind == "files":
                sources += [escape_name(item["url"]) for item in spec.items]
            elif spec.kind == "parquet":
                sources += [escape_name(parquet_row_source(url, row)) for row in range(spec.row_start, spec.row_end)]
            else:
                index = cache.tar(url, storage_options)
                index.scan()
                sources += [escape_name(tar_member_source(url, name)) for name in index.members]
                if index.error:
                    problems.append(f"{url}: tar damaged after {len(index.members)} image member(s): "
                                    f"{index.error}")
    finally:
        cache.close()  # the indexes stay; no file is left open
    return sources, problems

