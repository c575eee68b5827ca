"""Reading an archive's images for training: what the PyTorch dataset (torch_dataset.py), the
Ray Data source (ray_data.py) and the exports (pipeline/jobs/exports.py) share.

    spec = open_archive(url)                       # manifest checked, model resolved, shard list
    stats = ReadStats()
    rows = ok_rows(read_shard_rows(spec, "00000", stats), stats)   # checked (index_checks), errors counted
    decoder = ImageDecoder(spec, steps=None)       # the model, loaded once per process
    for row, rgb in decoder.decode_rows(spec.archive(), "00000", rows, stats): ...

Nothing in the archive is trusted (as in verify): shard names come from the checked manifest
and are checked again before a path is built, each shard's index is checked against its blob
(pipeline/storage/index_checks.py: offsets, lengths, order, overlap) before a byte is read, whole streams against the index's CRC-32, headers
against the manifest's model and the index's image size. A row that fails is skipped and
counted in ReadStats (with its first messages), never raised: an epoch goes on.
"""

from __future__ import annotations

import collections
import logging
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

from pipeline.storage import archive as A
from pipeline.storage.manifest import ModelUnavailable, read_manifest, resolve_model

log = logging.getLogger(__name__)

# Index columns a reader needs (never more: `error` strings and sources can be long).
READ_COLUMNS = ("key", "source", "shard", "offset", "length", "height", "width", "source_bytes", "bpp", "psnr",
                "crc32", "status", "step_ends")
# Metadata handed out with each image (None floats become NaN, so default_collate works).
METADATA_COLUMNS = ("source", "shard", "height", "width", "source_bytes", "bpp", "psnr")
MAX_MESSAGES = 20  # first failure messages kept per reader
READ_SPAN_SLACK = 1 << 20  # a batch's streams are read in one request unless that reads this much more


@dataclass(frozen=True)
class ArchiveSpec:
    """What every reader of one archive needs; small and picklable (sent to DataLoader
    workers and Ray actors)."""

    url: str
    storage_options: dict | None
    model_source: str  # --model, or the installed checkpoint with the manifest's weights
    shards: tuple[str, ...]  # from the checked manifest, in its order
    max_pixels: int
    images: int  # index rows in the manifest (ok + error + duplicate)
    ok: int  # ok rows in the manifest

    def archive(self) -> A.Archive:
        return A.Archive(self.url, self.storage_options)


def open_archive(url: str, storage_options: Mapping | None = None, model: str | None = None) -> ArchiveSpec:
    """The archive's checked manifest and model: ArchiveError (before any epoch) when the
    manifest is malformed or no available model has its weights."""
    from m2t_core import bitstream as bs

    if "://" not in url:
        import os

        url = os.path.abspath(url)
    archive = A.Archive(url, dict(storage_options) if storage_options else None)
    manifest, problems = read_manifest(archive)
    if problems:
        raise A.ArchiveError(f"{url}: manifest.json is malformed: " + "; ".join(p["message"] for p in problems[:3]))
    try:
        source = resolve_model(manifest, model, archive.storage_options)
    except ModelUnavailable as exc:
        raise A.ArchiveError(str(exc)) from None
    shards = tuple(s["shard"] for s in manifest.get("shards", []))
    max_pixels = min(int(manifest.get("config", {}).get("max_pixels") or bs.DEFAULT_MAX_PIXELS), bs.DEFAULT_MAX_PIXELS)
    count = lambda name: sum(int(s.get(name, 0)) for s in manifest.get("shards", []))
    return ArchiveSpec(archive.url, archive.storage_options, source, shards, max_pixels, count("images"), count("ok"))


@dataclass
class ReadStats:
    """What a reader yielded and skipped: index rows that are not ok (by status), and ok rows
    that failed to read or decode (by reason), with the first messages."""

    yielded: int = 0
    not_ok: collections.Counter = field(default_factory=collections.Counter)  # status -> rows
    failed: collections.Counter = field(default_factory=collections.Counter)  # reason -> rows
    messages: list[str] = field(default_factory=list)

    def fail(self, reason: str, message: str) -> None:
        self.failed[reason] += 1
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)
        log.warning("skipped: %s", message)

    def as_dict(self) -> dict[str, Any]:
        return {"yielded": self.yielded, "not_ok": dict(self.not_ok), "failed": dict(self.failed),
                "messages": list(self.messages)}


def read_shard_rows(spec: ArchiveSpec, shard: str, stats: ReadStats, archive: A.Archive | None = None) -> list[dict]:
    """The rows of one shard's index in index order, after index_checks.check_shard has
    checked them against the blob (every status: callers split rows by position, then
    `ok_rows` drops and counts the rest). A row whose location is invalid is marked
    (`_bad`); a shard whose index cannot be trusted or read is counted as one failure, not
    raised."""
    from pipeline.storage.index_checks import check_shard, iter_index_rows

    archive = archive or spec.archive()
    try:
        data, summary = check_shard(archive, shard, 3 * spec.max_pixels + 65536)
        rows = list(iter_index_rows(data, READ_COLUMNS))
    except (A.ArchiveError, OSError) as exc:
        kind = getattr(exc, "kind", "missing_index" if isinstance(exc, OSError) else "missing_blob")
        stats.fail(kind, f"shard {shard}: {type(exc).__name__}: {exc}")
        return []
    for number, (_, reason) in summary.bad_rows.items():
        rows[number]["_bad"] = reason
    return rows


def ok_rows(rows: list[dict], stats: ReadStats) -> list[dict]:
    """The rows with status ok and a valid location; the others are counted (by status, or
    as bad_offset)."""
    out = []
    for row in rows:
        if row["status"] != "ok":
            stats.not_ok[str(row["status"])] += 1
        elif "_bad" in row:
            stats.fail("bad_offset", f"shard {row['shard']}, key {row['key']!r}: {row['_bad']}")
        else:
            out.append(row)
    return out


def metadata(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row's source metadata, with no None (NaN for a missing number, "" for a source)."""
    out = {}
    for name in METADATA_COLUMNS:
        value = row.get(name)
        if value is None:
            value = "" if name in ("source", "shard") else float("nan")
        out[name] = value
    return out


def _stream_bounds(row: Mapping[str, Any], steps: int | None, blob_size: int) -> tuple[int, int]:
    """(offset, bytes to read) of a row's stream (its first `steps` steps' prefix); the row's
    location was checked against the blob (read_shard_rows); ValueError for bad step_ends."""
    offset, length = row["offset"], row["length"]
    if offset + length > blob_size:  # the blob changed since its index was checked
        raise ValueError(f"offset {offset} + length {length} lies outside the blob ({blob_size} bytes)")
    want = length
    ends = row.get("step_ends")
    if steps is not None and ends:
        if not (len(ends) <= 255 and all(isinstance(e, int) for e in ends)
                and all(0 < a <= b for a, b in zip(ends, list(ends[1:]) + [length])) and ends[-1] == length):
            raise ValueError(f"the index's step_ends are not valid (increasing, ending at the stream length {length})")
        want = ends[min(max(steps, 1), len(ends)) - 1]
    return offset, want


def read_streams(archive: A.Archive, shard: str, rows: list[dict], steps: int | None,
                 stats: ReadStats) -> list[tuple[dict, bytes]]:
    """The streams of `rows` (checked ok rows of one shard): one ranged
    read for the lot when they lie close together (they were appended in order), else one
    each; whole streams are checked against the index's CRC-32. Failures are counted."""
    blob = archive.shard_path(shard, ".bin")
    try:
        size = archive.fs.size(blob)
    except FileNotFoundError:
        for row in rows:
            stats.fail("missing_blob", f"shard {shard}, key {row['key']!r}: shards/{shard}.bin is missing")
        return []
    spans = []
    for row in rows:
        try:
            spans.append((row, *_stream_bounds(row, steps, size)))
        except ValueError as exc:
            stats.fail("bad_offset", f"shard {shard}, key {row['key']!r}: {exc}")
    if not spans:
        return []
    start = min(s[1] for s in spans)
    end = max(s[1] + s[2] for s in spans)
    whole = None
    if end - start <= sum(s[2] for s in spans) + READ_SPAN_SLACK:
        whole = archive.fs.cat_file(blob, start=start, end=end)
    out = []
    for row, offset, want in spans:
        data = whole[offset - start:offset - start + want] if whole is not None \
            else archive.fs.cat_file(blob, start=offset, end=offset + want)
        if len(data) != want:
            stats.fail("bad_offset", f"shard {shard}, key {row['key']!r}: read {len(data)} of {want} bytes")
        elif want == row["length"] and zlib.crc32(data) != row["crc32"]:
            stats.fail("crc_mismatch", f"shard {shard}, key {row['key']!r}: the bytes do not match the index's "
                       f"CRC-32 (flipped or changed bytes)")
        else:
            out.append((row, data))
    return out


class ImageDecoder:
    """The archive's model (loaded once per process) and a batched decoder: whole streams
    `batch_images` at a time (decompress_many), previews of `steps` steps one by one."""

    def __init__(self, spec: ArchiveSpec, steps: int | None = None, batch_images: int = 0, device: str = "cpu"):
        from m2t_core import Decoder

        if steps is not None and steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.model = A.open_model(spec.model_source, device=device, storage_options=spec.storage_options)
        self.steps = steps
        self.batch = int(batch_images) or (16 if self.model.device.type == "cuda" else 1)
        self.decoder = Decoder(self.model, batch_images=self.batch, max_pixels=spec.max_pixels)

    def decode(self, pairs: list[tuple[dict, bytes]], stats: ReadStats) -> list[tuple[dict, np.ndarray]]:
        """(row, RGB uint8 (H, W, 3)) of each stream that decodes to the index's image size;
        the others are counted."""
        if self.steps is None:
            images = self.decoder.decompress_many([data for _, data in pairs])
        else:
            images = []
            for _, data in pairs:
                try:
                    images.append(self.decoder.preview(data, steps=self.steps).image)
                except Exception as exc:
                    images.append(exc)
        out = []
        for (row, _), rgb in zip(pairs, images):
            where = f"shard {row['shard']}, key {row['key']!r}"
            if isinstance(rgb, Exception):
                stats.fail("decode_error", f"{where}: {type(rgb).__name__}: {rgb}")
            elif rgb.shape[:2] != (row["height"], row["width"]):
                stats.fail("size_mismatch", f"{where}: decoded {rgb.shape[0]}x{rgb.shape[1]}, the index says "
                           f"{row['height']}x{row['width']}")
            else:
                out.append((row, rgb))
        return out

    def decode_rows(self, archive: A.Archive, shard: str, rows: list[dict],
                    stats: ReadStats) -> Iterator[tuple[dict, np.ndarray]]:
        """Decode the ok `rows` of one shard, `self.batch` streams per read and decode."""
        for i in range(0, len(rows), self.batch):
            pairs = read_streams(archive, shard, rows[i:i + self.batch], self.steps, stats)
            if pairs:
                yield from self.decode(pairs, stats)


def split_units(shards: tuple[str, ...], consumers: int) -> list[tuple[str, int, int]]:
    """Work units (shard, part, parts) for `consumers` readers (DataLoader workers x ranks):
    whole shards when there are at least as many shards as consumers, else each shard cut
    into `parts` row sets (rows at positions part, part + parts, ...), so that there are at
    least as many units as consumers. Every row is in exactly one unit."""
    if consumers < 1:
        raise ValueError(f"consumers must be >= 1, got {consumers}")
    parts = 1 if len(shards) >= consumers else -(-consumers // max(1, len(shards)))
    return [(shard, part, parts) for shard in shards for part in range(parts)]
