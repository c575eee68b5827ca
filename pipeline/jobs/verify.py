"""The decode job: verify an m2t archive bit for bit, and restore a dataset from it.

    m2t verify ARCHIVE [--shards 00000 00003] [--against-source] [--no-ray] [--report out.json]
    m2t restore ARCHIVE OUTPUT [--format png] [--keys k1 k2] [--no-ray]
    python jobs/decompress.py verify ... | restore ...     (same arguments; for `ray job submit`)

A job on the skeleton of pipeline/jobs/runner.py (VerifyJob; its worker DecodeWorker, its
settings DecodeSettings, its command line VerifyConfig). Shards are decoded on a pool of Ray
actors (up to 4 sharing each GPU where the cluster has GPUs, else `--cpus-per-actor` CPUs each;
sized from ray.cluster_resources()), or in this process with --no-ray. Each shard is decoded
exactly once.

Nothing in the archive is trusted: the manifest is type-checked (pipeline/storage/manifest.py:
shard names must be the archive's own, 5-12 digits), the model is opened only from --model or the
installed registry (name + weights hash; resolve_model never opens the manifest's source), each
index is checked against archive.index_schema()'s types, every row's offset/length is checked against the blob's
real size before any read, the bitstream's CRC-32 against the index, the bitstream header
(m2t_core.bitstream.unpack, with the archive's max_pixels) before any decoding, the header's
size against the index, and the decoded pixels' CRC-32 against decoded_crc32. Each problem is
an issue {shard, key, kind, message}; see ISSUE_KINDS.

Restore writes `<OUTPUT>/<key>.<format>` (the extension is always appended, so two keys
never map to one path). Keys that could escape OUTPUT (absolute, `..` or `.` segments,
empty segments, backslashes, drive letters, control characters) are refused (issue
`unsafe_key`), never rewritten. Files already present are skipped: rerun to resume.
`--format webdataset|parquet` writes one tar / Parquet file per archive shard instead
(pipeline/jobs/exports.py; a shard whose file and marker exist is skipped on a rerun).

Exit codes: 0 clean; 1 mismatches or errors found; 2 usage error; 3 incomplete run (no
manifest, or a shard's worker failed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from m2t_core import bitstream as bs
from m2t_core.allocator import keep_freed_memory
from m2t_core.model import numerics_environment

from pipeline.errors import UsageError, run_main
from pipeline.storage import archive as A
from pipeline.storage.manifest import ModelUnavailable, issue, read_manifest, resolve_model  # noqa: F401
from pipeline.jobs.runner import EXIT_INCOMPLETE, EXIT_ISSUES, EXIT_OK, EXIT_USAGE  # noqa: F401 (the job's exit codes)
from pipeline.jobs.runner import Item, Job, Placement, Report, Run, RunOptions, peak_rss_mib, run_job
from pipeline.storage.sources import SourceCache, join_url, read_source
from pipeline.storage.index_checks import (IndexCheckError, IndexSummary, check_shard_index, iter_index_rows,
                                           read_index_bytes, safe_relpath, unsafe_key_reason)  # noqa: F401
from pipeline.storage.integrity import (IntegrityError, blob_digest_problem, check_index_digest, keys_digest_problem,
                                        sign_key, stream_digest)

log = logging.getLogger(__name__)

ISSUE_KINDS = {
    "missing_blob": "shards/<shard>.bin is missing",
    "missing_index": "shards/<shard>.parquet is missing, unreadable or malformed (wrong columns or types)",
    "bad_manifest": "manifest.json is malformed (not an object, wrong types) or names an unsafe shard",
    "incomplete_shard": "shards/<shard>.stats.json (the completion marker) is missing",
    "truncated_blob": "the .bin is shorter (or longer) than the shard's stats say",
    "bad_offset": "an index row's offset/length is missing, negative, too large or outside the blob",
    "crc_mismatch": "the bitstream's bytes do not match the index's CRC-32 (flipped or changed bytes)",
    "unsupported_version": "the bitstream's format version is not read here (unknown, or retired: the message names the release that reads it)",
    "corrupt_bitstream": "the bitstream header or payload is invalid",
    "model_mismatch": "the bitstream was written by another model than the manifest's",
    "size_mismatch": "the bitstream's image size differs from the index",
    "step_index_mismatch": "the index's step_ends (preview byte ranges) differ from the bitstream's header",
    "decode_error": "decoding failed (e.g. latent checksum mismatch)",
    "decoded_mismatch": "the decoded pixels' CRC-32 differs from decoded_crc32",
    "index_mismatch": "the index disagrees with the manifest (row or ok counts)",
    "model_unavailable": "no available checkpoint has the manifest's model weights",
    "source_error": "--against-source: the source image cannot be read",
    "source_mismatch": "--against-source: recomputed PSNR / bpp / size differ from the index",
    "unsafe_key": "the key could escape an output root (restore refuses it; verify reports it)",
    "bad_index": "a shard index's rows overlap, are not sorted by offset, or outnumber what the blob can hold: "
                 "the shard is refused before anything is decoded",
    "digest_mismatch": "an index, blob or stream is not what the manifest / row digest records (changed or remapped)",
    "bad_signature": "with a signing key: the manifest is unsigned or its signature does not match; nothing is read",
    "write_error": "restore: the image could not be written",
    "worker_failed": "the shard's worker failed (the shard was not checked)",
}
# Issue kinds that are errors (the rest are mismatches: data that decodes, but not to what was recorded).
DECODE_KINDS = {"bad_manifest", "bad_index", "bad_signature", "decode_error", "corrupt_bitstream", "unsupported_version", "bad_offset", "missing_blob",
                "missing_index", "worker_failed", "model_unavailable", "source_error", "write_error"}
FORMATS = {"png": ("PNG", ".png"), "bmp": ("BMP", ".bmp"), "tiff": ("TIFF", ".tiff"),
           "webp": ("WEBP", ".webp"), "ppm": ("PPM", ".ppm")}  # lossless only
VERIFY_REPORT, RESTORE_REPORT = "verify.json", "restore.json"


# ====================================================================== one shard


def _check_stream(model, row, data: bytes, blob_crc_ok: bool, max_pixels: int, where) -> tuple[Any, dict | None]:
    """Header checks before any decoding; returns (header, issue or None)."""
    shard, key = where
    try:
        header, _ = bs.unpack(data, max_pixels)
    except bs.UnsupportedVersionError as exc:
        return None, issue(shard, key, "unsupported_version", f"shard {shard}, key {key!r}: {exc}")
    except bs.BitstreamError as exc:
        kind = "crc_mismatch" if not blob_crc_ok else "corrupt_bitstream"
        return None, issue(shard, key, kind, f"shard {shard}, key {key!r}: "
                           + ("bytes differ from the index's CRC-32; " if not blob_crc_ok else "") + str(exc))
    if not blob_crc_ok:
        return None, issue(shard, key, "crc_mismatch",
                           f"shard {shard}, key {key!r}: CRC-32 {zlib.crc32(data):08x} of the bitstream, "
                           f"index says {row['crc32']:08x} (bytes changed)")
    if row.get("digest") is not None and stream_digest(key, data) != row["digest"]:
        return None, issue(shard, key, "digest_mismatch", f"shard {shard}, key {key!r}: the row's digest does not "
                           "bind this key to these bytes (the row points at another key's stream)")
    if not model.wrote(header):  # the stream's name and its format's weights hash
        return None, issue(shard, key, "model_mismatch",
                           f"shard {shard}, key {key!r}: written by model {header.model_id!r} "
                           f"(weights {header.weights_hash.hex()}), the archive's is {model.model_id!r}")
    if (header.height, header.width) != (row["height"], row["width"]):
        return None, issue(shard, key, "size_mismatch",
                           f"shard {shard}, key {key!r}: bitstream is {header.height}x{header.width}, "
                           f"index says {row['height']}x{row['width']}")
    if row.get("step_ends") is not None and list(row["step_ends"]) != list(header.step_ends):
        return None, issue(shard, key, "step_index_mismatch",
                           f"shard {shard}, key {key!r}: the index's step_ends {list(row['step_ends'])[:4]}... differ "
                           f"from the bitstream's {list(header.step_ends)[:4]}... (previews would read wrong bytes)")
    return header, None


def process_shard(model, shard: str, job: DecodeSettings) -> dict[str, Any]:
    """Verify (job.mode == "verify") or restore one shard; returns counts and issues."""

    t0 = time.perf_counter()
    archive = A.Archive(job.archive, job.storage_options)
    fs = archive.fs
    out = {"shard": shard, "worker": f"{socket.gethostname()}:{os.getpid()}", "images": 0, "verified": 0,
           "written": 0, "skipped": 0, "pixels": 0, "issues": [], "files": {}}
    issues = out["issues"]
    stats = None
    try:
        stats = json.loads(fs.cat_file(archive.shard_path(shard, ".stats.json")))
        if not isinstance(stats, dict) or not isinstance(stats.get("compressed_bytes", 0), (int, type(None))):
            stats = None
            issues.append(issue(shard, None, "incomplete_shard", f"shard {shard}: shards/{shard}.stats.json is "
                                "malformed (not an object, or compressed_bytes is not an integer)"))
    except FileNotFoundError:
        issues.append(issue(shard, None, "incomplete_shard",
                            f"shard {shard}: no completion marker shards/{shard}.stats.json "
                            "(the compression job did not finish this shard)"))
    except (ValueError, UnicodeDecodeError) as exc:
        issues.append(issue(shard, None, "incomplete_shard", f"shard {shard}: shards/{shard}.stats.json is not "
                            f"valid JSON ({exc})"))
    loaded = _checked_index(archive, shard, job, stats, out)
    if loaded is None:  # an issue says why: nothing of the shard is decoded
        out["seconds"] = time.perf_counter() - t0
        return out
    index, summary = loaded
    blob_path = archive.shard_path(shard, ".bin")
    max_pixels = int(job.max_pixels)
    sink = None  # restore: where the images go (pipeline/jobs/exports.py)
    if job.mode == "restore":
        from pipeline.jobs import exports

        sink = exports.open_export(job.export, job.output, job.storage_options, shard, job.format, job.ext)
        if exports.resume_shard(sink, out):  # a shard file written by an earlier run
            out["seconds"] = time.perf_counter() - t0
            return out
    source_cache = SourceCache()  # --against-source: a tar or Parquet file is opened once per shard
    batch = decode_batch(job, model)
    # A bad row becomes an issue here; good ones are decoded `batch` at a time
    # (decompress_many: the windows of many images share each transformer step).
    pending: list[tuple[dict, bytes, Any, str | None]] = []  # (row, stream, header, dest)
    for number, row in enumerate(iter_index_rows(index)):  # streamed: memory is one batch of rows
        key = row["key"]
        if row["status"] != "ok" or (job.keys is not None and key not in job.keys):
            continue
        out["images"] += 1
        dest = None
        unsafe = unsafe_key_reason(key) if sink is None else None  # verify: what restore would refuse
        if unsafe:
            issues.append(issue(shard, key, "unsafe_key", f"shard {shard}, key {key!r}: restore would refuse it "
                                f"({unsafe}: the key could escape an output root)"))
            continue
        if sink is not None:
            rel = sink.place(key)
            if rel is None:
                issues.append(issue(shard, key, "unsafe_key", f"shard {shard}, key {key!r}: refused, the key "
                                    "could escape the output root (absolute, '..', '.', empty segment, "
                                    "backslash, drive or control character)"))
                continue
            dest = rel
            out["files"][key] = rel
            if sink.exists(dest):
                out["skipped"] += 1
                continue
        offset, length = row["offset"], row["length"]
        if number in summary.bad_rows:  # checked before anything was read
            issues.append(issue(shard, key, "bad_offset", f"shard {shard}, key {key!r}: {summary.bad_rows[number][1]} "
                                f"(shards/{shard}.bin)"))
            continue
        data = fs.cat_file(blob_path, start=offset, end=offset + length)
        if len(data) != length:
            issues.append(issue(shard, key, "bad_offset", f"shard {shard}, key {key!r}: read {len(data)} of "
                                f"{length} bytes at offset {offset}"))
            continue
        header, problem = _check_stream(model, row, data, zlib.crc32(data) == row["crc32"], max_pixels, (shard, key))
        if problem:
            issues.append(problem)
            continue
        pending.append((row, data, header, dest))
        if len(pending) >= batch:
            _decode_and_check(model, pending, job, out, sink, source_cache, batch)
            pending = []
    if pending:
        _decode_and_check(model, pending, job, out, sink, source_cache, batch)
    if sink is not None:
        sink.commit(out)  # shard formats: the file moved into place, then its marker
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mib"] = peak_rss_mib()  # of the worker process that decoded this shard
    return out


def _checked_index(archive: A.Archive, shard: str, job: DecodeSettings, stats: dict | None,
                   out: dict) -> tuple[bytes, IndexSummary] | None:
    """The shard's index bytes and their check against its blob (index_checks), before anything
    is decoded; None (with the issue in `out`) when nothing of the shard can be decoded."""
    issues = out["issues"]
    try:
        index = read_index_bytes(archive, shard)
    except Exception as exc:  # missing, too large
        issues.append(issue(shard, None, getattr(exc, "kind", "missing_index"), f"shard {shard}: cannot read "
                            f"shards/{shard}.parquet: {type(exc).__name__}: {exc}"))
        return None
    try:
        check_index_digest(index, shard, job.manifest_shard)
    except IntegrityError as exc:
        issues.append(issue(shard, None, exc.kind, str(exc)))
        if job.signed:  # a signed archive's changed index is refused; otherwise its rows say what changed
            return None
    try:
        size = archive.fs.size(archive.shard_path(shard, ".bin"))
    except FileNotFoundError:
        size = None
    try:
        if size is None:
            ok = sum(r["status"] == "ok" for r in iter_index_rows(index, ["status"]))
            if ok or not stats or stats.get("compressed_bytes"):
                issues.append(issue(shard, None, "missing_blob", f"shard {shard}: shards/{shard}.bin is missing; "
                                    f"{ok} image(s) cannot be decoded"))
            out["images"] = ok
            return None
        summary = check_shard_index(index, shard, int(size), 3 * int(job.max_pixels) + 65536)  # <= raw RGB
    except IndexCheckError as exc:
        issues.append(issue(shard, exc.key, exc.kind, str(exc)))
        return None
    problem = blob_digest_problem(archive, shard, job.manifest_shard)
    if problem:  # the streams are still checked one by one (CRC, digest): they say which
        issues.append(issue(shard, None, "digest_mismatch", problem))
    if stats is not None and stats.get("compressed_bytes") is not None and size != stats["compressed_bytes"]:
        issues.append(issue(shard, None, "truncated_blob",
                            f"shard {shard}: shards/{shard}.bin has {size} bytes, the shard wrote "
                            f"{stats['compressed_bytes']} ({'truncated' if size < stats['compressed_bytes'] else 'extra bytes'})"))
    expect = job.manifest_shard
    if expect and job.keys is None and isinstance(expect.get("images"), int) \
            and isinstance(expect.get("ok"), int) and (summary.rows != expect["images"] or summary.ok != expect["ok"]):
        issues.append(issue(shard, None, "index_mismatch", f"shard {shard}: the index has {summary.rows} rows, "
                            f"the manifest says {expect['images']} (ok: {summary.ok}, manifest {expect['ok']})"))
    return index, summary


def decode_batch(job: DecodeSettings, model) -> int:
    """Streams decoded together: the job's --batch-images, or (0) 16 on a GPU, 1 on a CPU
    (where batching is no faster: bench/codec_speed.py)."""
    return int(job.batch_images or 0) or (16 if model.device.type == "cuda" else 1)


def pixels_comparable(expect: Mapping[str, Any] | None, model, batch: int) -> bool:
    """Whether this worker's decoded pixels can be held to the index's decoded_crc32. Archives
    of m2t >= 0.4 decode with an integer g_s (the one their streams' format names): pixels are
    a pure function of the stream, so they are compared on any machine, thread count and
    batch. Archives of m2t 0.3 (float g_s) recorded the environment that rounded their pixels:
    compared only under the same one, one image at a time (the latent CRC, checked inside
    decoding, holds everywhere)."""
    written = (expect or {}).get("numerics")
    if not isinstance(written, Mapping):
        return False
    if written in model.portable_numerics():  # an integer g_s (integer-v1: format 4, integer-v2: format 5)
        return True
    if written.get("transform_batch", 1) != 1 or batch != 1:
        return False
    return written == numerics_environment(model.device, model.transforms_implementation())


def _decode_and_check(model, pending: list, job: DecodeSettings, out: dict, sink, source_cache: SourceCache,
                      batch: int) -> None:
    """Decode `pending` streams together, then check (and restore) each decoded image."""
    from m2t_core import Decoder
    from m2t_core.image_io import load_image
    from m2t_core.metrics import mse as mse_of, psnr_from_mse

    shard, issues, max_pixels = out["shard"], out["issues"], int(job.max_pixels)
    expect = job.manifest_shard
    decoder = Decoder(model, batch_images=batch, max_pixels=max_pixels)
    decoded = decoder.decompress_many([data for _, data, _, _ in pending])
    comparable = pixels_comparable(expect, model, batch)  # the same for every row of the shard
    for (row, data, header, dest), rgb in zip(pending, decoded):
        key = row["key"]
        if isinstance(rgb, Exception):  # ChecksumMismatchError, BitstreamError from the entropy decoder
            issues.append(issue(shard, key, "decode_error", f"shard {shard}, key {key!r}: "
                                f"{type(rgb).__name__}: {rgb}"))
            continue
        out["pixels"] += header.height * header.width
        got = zlib.crc32(np.ascontiguousarray(rgb).tobytes())
        # Pixels: compared wherever the archive's numerics allow (pixels_comparable).
        out.setdefault("pixel_checks", {"compared": 0, "skipped": 0})["compared" if comparable else "skipped"] += 1
        if comparable and row["decoded_crc32"] is not None and got != row["decoded_crc32"]:
            issues.append(issue(shard, key, "decoded_mismatch", f"shard {shard}, key {key!r}: decoded pixels have "
                                f"CRC-32 {got:08x}, index says {row['decoded_crc32']:08x}"))
            continue
        if job.against_source:
            try:
                src = load_image(read_source(row["source"], job.storage_options, cache=source_cache,
                                             image_column=job.image_column), max_pixels=max_pixels)
            except Exception as exc:
                issues.append(issue(shard, key, "source_error", f"shard {shard}, key {key!r}: cannot read source "
                                    f"{row['source']}: {type(exc).__name__}: {exc}"))
                continue
            bad = []
            if src.shape != rgb.shape:
                bad.append(f"source is {src.shape[0]}x{src.shape[1]}, decoded {rgb.shape[0]}x{rgb.shape[1]}")
            else:
                quality = psnr_from_mse(mse_of(src, rgb))
                if row["psnr"] is not None and not _close(quality, row["psnr"]):
                    bad.append(f"PSNR {quality:.6f} dB, index says {row['psnr']:.6f}")
            bpp = 8.0 * len(data) / (header.height * header.width)
            if row["bpp"] is not None and not _close(bpp, row["bpp"]):
                bad.append(f"bpp {bpp:.6f}, index says {row['bpp']:.6f}")
            if bad:
                issues.append(issue(shard, key, "source_mismatch", f"shard {shard}, key {key!r}: " + "; ".join(bad)))
                continue
        if dest is not None:
            try:
                sink.add(key, dest, rgb, row)
                out["written"] += 1
            except Exception as exc:
                issues.append(issue(shard, key, "write_error", f"shard {shard}, key {key!r}: {dest}: {exc}"))
                continue
        out["verified"] += 1


def _close(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


@dataclass(frozen=True)
class DecodeSettings:
    """What a decode worker needs: the same for every shard of a run (but `manifest_shard`,
    which the worker fills in per shard)."""

    mode: str  # "verify" or "restore"
    archive: str  # the archive's URL
    storage_options: dict | None
    model_source: str  # what resolve_model found: --model, or the installed model with the manifest's weights
    max_pixels: int  # the archive's limit (at most the decoder's default): bounds every read and decode
    batch_images: int = 0  # streams decoded together; 0: 16 on a GPU, 1 on a CPU
    against_source: bool = False  # verify: re-read each source and recompute PSNR and bpp
    image_column: str | None = None  # the compress job's parquet_image_column, for --against-source
    output: str | None = None  # restore: the output root URL
    format: str = "PNG"  # restore: Pillow's format name ...
    ext: str = ".png"  # ... and the extension appended to each key
    export: str = "folder"  # restore: a kind of exports.EXPORT_FORMATS
    keys: frozenset[str] | None = None  # restore: only these keys
    manifest_shard: Mapping[str, Any] | None = None  # the manifest's entry of the shard being decoded
    signed: bool = False  # the manifest's signature was checked: an index that is not the signed one is refused


class DecodeWorker:
    """A decode worker (on a Ray actor, or once in process): loads the model once, then
    verifies / restores the shards it is given ((shard, manifest entry) pairs)."""

    def __init__(self, settings: DecodeSettings, placement: Placement):
        if placement.ray:
            import torch

            torch.set_num_threads(max(1, int(placement.cpus)))
        keep_freed_memory()
        self.settings, self.node_id = settings, placement.node_id
        self.model = A.open_model(settings.model_source, device=placement.device,
                                  storage_options=settings.storage_options)

    def process(self, payload: tuple[str, Any]) -> dict[str, Any]:
        shard, entry = payload
        result = process_shard(self.model, shard, dataclasses.replace(self.settings, manifest_shard=entry))
        result["node_id"] = self.node_id
        return result



# ====================================================================== the job (driver side)


@dataclass(frozen=True)
class VerifyConfig:
    """What `m2t verify` / `m2t restore` were asked to do: their command line, checked."""

    mode: str  # "verify" or "restore"
    archive: str  # URL; a local path made absolute
    runner: RunOptions
    storage_options: dict | None = None
    shards: tuple[str, ...] | None = None  # only these shards
    model: str | None = None  # --model
    against_source: bool = False
    batch_images: int = 0
    output: str | None = None  # restore
    format: str = "png"  # restore: a key of FORMATS
    keys: frozenset[str] | None = None  # restore: only these keys
    report: str | None = None  # where to save the JSON report (None: the default)
    sign_key_file: str | None = None  # the manifest must be signed with this key (else $M2T_SIGN_KEY, if set)

    @classmethod
    def from_args(cls, mode: str, args: argparse.Namespace) -> "VerifyConfig":
        if args.actors < 0 or args.cpus_per_actor < 0:
            raise UsageError("--actors and --cpus-per-actor must be >= 0")
        if args.shard_retries < 0 or args.placement_timeout <= 0:
            raise UsageError("--shard-retries must be >= 0 and --placement-timeout > 0")
        if not 0 <= args.batch_images <= 1024:
            raise UsageError(f"--batch-images must be 0 (auto) to 1024, got {args.batch_images}")
        try:
            options = json.loads(args.storage_options) if args.storage_options else None
        except ValueError as exc:
            raise UsageError(f"--storage-options is not valid JSON: {exc}") from None
        local = lambda url: url if "://" in url else os.path.abspath(url)
        runner = RunOptions(ray=not args.no_ray, address=args.ray_address, actors=args.actors,
                            cpus_per_actor=args.cpus_per_actor, retries=args.shard_retries,
                            placement_timeout_s=args.placement_timeout, device="cpu", progress=not args.no_progress)
        shards = tuple(s for item in args.shards for s in item.split(",") if s) if args.shards else None
        restore = mode == "restore"
        return cls(mode, local(args.archive), runner, storage_options=options, shards=shards, model=args.model,
                   against_source=not restore and args.against_source, batch_images=args.batch_images,
                   output=local(args.output) if restore else None, format=args.format if restore else "png",
                   keys=frozenset(args.keys) if restore and args.keys else None, report=args.report,
                   sign_key_file=args.sign_key_file)


class VerifyJob(Job):
    """m2t verify / restore on the runner's skeleton: plan (the checked manifest, the model),
    fold each shard's counts and issues, report."""

    what, failures = "shard", "issues"
    worker = DecodeWorker

    def __init__(self, cfg: VerifyConfig):
        super().__init__()
        self.cfg, self.name = cfg, cfg.mode
        self.results: dict[str, dict] = {}

    def plan(self) -> list[Item]:
        cfg = self.cfg
        archive = A.Archive(cfg.archive, cfg.storage_options)
        key = sign_key(cfg.sign_key_file)
        self.manifest, self.issues = read_manifest(archive, key)
        problem = keys_digest_problem(archive, self.manifest) if self.manifest.get("shards") else None
        if problem:
            self.issues.append(issue(None, None, "digest_mismatch", problem))
        entries = {s["shard"]: s for s in self.manifest.get("shards", [])}
        self.shards = list(entries)
        if cfg.shards:
            unknown = [s for s in cfg.shards if s not in entries]
            if unknown:
                raise UsageError(f"shard(s) {', '.join(unknown)} not in the manifest (it lists {len(entries)})")
            self.shards = [s for s in entries if s in set(cfg.shards)]
        written = self.manifest.get("config", {})
        try:
            model_source = resolve_model(self.manifest, cfg.model, cfg.storage_options)
        except ModelUnavailable as exc:
            self.issues.append(issue(None, None, "model_unavailable", str(exc)))
            model_source, self.shards = "", []
        from pipeline.jobs.exports import export_settings

        export, fmt, ext = export_settings(cfg.format, cfg.keys)
        self.settings = DecodeSettings(
            cfg.mode, cfg.archive, cfg.storage_options, model_source,
            max_pixels=min(int(written.get("max_pixels") or bs.DEFAULT_MAX_PIXELS), bs.DEFAULT_MAX_PIXELS),
            batch_images=cfg.batch_images, against_source=cfg.against_source,
            image_column=written.get("parquet_image_column"), output=cfg.output, format=fmt, ext=ext, keys=cfg.keys,
            export=export, signed=key is not None)
        # The ETA from images/s needs the image count: the manifest's (not with --keys: a subset).
        count = lambda s: entries[s].get("images") if cfg.keys is None else None
        return [Item(s, (s, entries[s]), count(s)) for s in self.shards]

    def fold(self, shard: str, result: dict) -> tuple[int, int]:
        self.results[shard] = result
        return result["images"], len(result["issues"])

    def report(self, run: Run) -> Report:
        cfg, shards, issues = self.cfg, self.shards, list(self.issues)
        for shard in shards:
            if shard in self.results:
                issues += self.results[shard]["issues"]
            elif shard in run.failed:
                issues.append(issue(shard, None, "worker_failed", f"shard {shard}: worker failed: {run.failed[shard]}"))
        res = [self.results[s] for s in shards if s in self.results]
        images, seconds = sum(r["images"] for r in res), run.seconds
        kinds: dict[str, int] = {}
        for i in issues:
            kinds[i["kind"]] = kinds.get(i["kind"], 0) + 1
        workers = sorted({r["worker"] for r in res})
        report = {
            "mode": cfg.mode, "archive": cfg.archive, "model": self.manifest.get("model", {}).get("id"),
            "shards": {"checked": len(res), "requested": len(shards),
                       "failed": run.failed, "decode_counts": {s: 1 for s in self.results}},
            "workers": workers,
            "peak_rss_mib": {w: max(r.get("peak_rss_mib") or 0.0 for r in res if r["worker"] == w)
                             for w in workers},  # per worker process
            "images": images, "verified": sum(r["verified"] for r in res),
            # Every stream's latent CRC is checked (portable: the same on every machine); the
            # decoded pixels' CRC only where this decoder's numerics are the encoder's.
            "checks": {"latent": "every stream",
                       "pixels_compared": sum(r.get("pixel_checks", {}).get("compared", 0) for r in res),
                       "pixels_not_compared": sum(r.get("pixel_checks", {}).get("skipped", 0) for r in res),
                       "numerics": numerics_environment("cuda" if run.device.startswith("cuda") else "cpu")},
            "mismatches": [i for i in issues if i["kind"] not in DECODE_KINDS],
            "errors": [i for i in issues if i["kind"] in DECODE_KINDS],
            "issues": issues, "issue_counts": kinds,
            "seconds": seconds,
            "images_per_s": images / seconds if seconds > 0 and images else None,
            "megapixels_per_s": sum(r["pixels"] for r in res) / 1e6 / seconds if seconds > 0 and images else None,
            "faults": run.faults,  # Ray: actors lost with their node, shards retried
            "runner": run.runner, "finished_at": A.now_iso(),
        }
        if cfg.mode == "restore":
            report.update(output=cfg.output, format=cfg.format, written=sum(r["written"] for r in res),
                          skipped=sum(r["skipped"] for r in res),
                          files={k: v for r in res for k, v in sorted(r["files"].items())})
        return Report(report, complete=len(res) == len(shards), issues=len(issues))


def format_report(report: dict[str, Any]) -> str:
    fmt = lambda v, s: "n/a" if v is None else f"{v:{s}}"
    sh = report["shards"]
    lines = [f"m2t {report['mode']}: {report['archive']}" + (f" -> {report['output']}" if "output" in report else "")
             + f"  (model {report['model']})",
             f"{'shards':<14}{sh['checked']} checked" + (f", {len(sh['failed'])} FAILED" if sh["failed"] else ""),
             f"{'images':<14}{report['images']}  verified {report['verified']}  mismatches "
             f"{len(report['mismatches'])}  errors {len(report['errors'])}"]
    if "written" in report:
        lines.append(f"{'files':<14}written {report['written']}  already there {report['skipped']}")
    faults = report.get("faults")
    if faults and (faults["actors_lost"] or faults["retries"] or faults["actors_unplaceable"]):
        lines.append(f"{'faults':<14}{len(faults['actors_lost'])} actor(s) lost, {len(faults['retries'])} shard "
                     f"retries, {faults['actors_unplaceable']} actor(s) not placeable; every shard checked once")
    checks = report.get("checks")
    if checks:
        lines.append(f"{'checks':<14}latent CRC of every stream; decoded-pixel CRC of {checks['pixels_compared']}"
                     + (f" ({checks['pixels_not_compared']} decoded under other numerics than the encoder's: "
                        "pixels may differ in the last bit there, not compared)" if checks["pixels_not_compared"] else ""))
    lines.append(f"{'throughput':<14}{fmt(report['images_per_s'], '.2f')} images/s   "
                 f"{fmt(report['megapixels_per_s'], '.3f')} MP/s   ({report['seconds']:.1f} s)")
    if report["issues"]:
        lines.append(f"{'kind':<20}{'shard':<10}{'key':<30}message")
        for i in report["issues"][:50]:
            lines.append(f"{i['kind']:<20}{str(i['shard'] or '-'):<10}{str(i['key'] or '-'):<30}{i['message']}")
        if len(report["issues"]) > 50:
            lines.append(f"... {len(report['issues']) - 50} more in the JSON report")
    lines.append("CLEAN" if report["exit_code"] == EXIT_OK else f"NOT CLEAN (exit {report['exit_code']})")
    return "\n".join(lines)


def _parser(mode: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"m2t {mode}",
        description=("Decode every bitstream of an m2t archive and check it against the index."
                     if mode == "verify" else "Decode an m2t archive's images to any fsspec URL (resumable)."),
        epilog="exit codes: 0 clean; 1 mismatches or errors; 2 usage error; 3 incomplete run")
    p.add_argument("archive", help="archive URL (a folder or s3://bucket/prefix)")
    if mode == "restore":
        p.add_argument("output", help="output root URL; images go to OUTPUT/<key>.<format>")
        p.add_argument("--format", default="png", choices=[*sorted(FORMATS), "folder", "webdataset", "parquet"],
                       help="a folder of lossless images (png, the default, = folder; bmp, tiff, webp, ppm), or "
                            "one PNG tar shard per archive shard (webdataset) or Parquet shard (parquet; Hugging Face "
                            "datasets loads it): pipeline/jobs/exports.py")
        p.add_argument("--keys", nargs="+", default=None, help="restore only these keys")
    else:
        p.add_argument("--against-source", action="store_true",
                       help="also re-read each source image and recompute PSNR and bpp")
    p.add_argument("--shards", nargs="+", default=None, help="only these shards (ids, space or comma separated)")
    p.add_argument("--model", default=None, help="checkpoint (name, path or URL) if the manifest's is not reachable")
    p.add_argument("--storage-options", default=None, metavar="JSON",
                   help='fsspec options per protocol, e.g. \'{"s3": {"endpoint_url": "http://..."}}\'')
    p.add_argument("--report", default=None, metavar="PATH",
                   help=f"where to save the JSON report (default: ./{VERIFY_REPORT if mode == 'verify' else ''}"
                        + ("" if mode == "verify" else f"OUTPUT/{RESTORE_REPORT}") + ")")
    p.add_argument("--sign-key-file", default=None, metavar="PATH",
                   help="the archive must be signed with this key: its manifest's signature and every index's and "
                        "blob's digest are checked, and nothing is read otherwise (default: $M2T_SIGN_KEY if set)")
    p.add_argument("--no-ray", action="store_true", help="decode in this process, without Ray")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    p.add_argument("--actors", type=int, default=0, help="actors (0: one per GPU, else one per --cpus-per-actor)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--shard-retries", type=int, default=2,
                   help="retries of a shard whose worker failed (it raised, or died with its node), "
                        "with Ray or without; default 2")
    p.add_argument("--placement-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="give up an actor not placed on a node within this (capacity lost); default 120")
    p.add_argument("--batch-images", type=int, default=0, metavar="N",
                   help="streams decoded together (the windows of all of them share each transformer step; "
                        "g_s runs on N at a time); 0: 16 on a GPU, 1 on a CPU. Pixels of batched g_s are not "
                        "compared with the index's decoded_crc32 (the latent CRC always is)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _main(mode: str, argv) -> int:
    try:
        args = _parser(mode).parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    return run_main(f"m2t {mode}", lambda: _run(VerifyConfig.from_args(mode, args)), logs=True)


def _run(cfg: VerifyConfig) -> int:
    report, code = run_job(VerifyJob(cfg), cfg.runner)
    print(format_report(report))
    target = cfg.report
    try:
        if target is None and cfg.mode == "restore":
            out = A.Archive(cfg.output, cfg.storage_options)
            out.write_json(out.path(RESTORE_REPORT), report)
            target = join_url(cfg.output, RESTORE_REPORT)
        elif target is not None and "://" in target:  # s3://...: kept when the head node is not
            folder, name = target.rsplit("/", 1)
            out = A.Archive(folder, cfg.storage_options)
            out.write_json(out.path(name), report)
        else:
            target = target or VERIFY_REPORT
            with open(target, "w") as f:
                f.write(A.dumps(report))
        print(f"report: {target}")
    except OSError as exc:
        print(f"m2t {cfg.mode}: warning: could not save the report to {target}: {exc}", file=sys.stderr)
    return code


def verify_main(argv: list[str] | None = None) -> int:
    """`m2t verify ARCHIVE [--shards ...] [--against-source]`; returns the exit code."""
    return _main("verify", argv)


def restore_main(argv: list[str] | None = None) -> int:
    """`m2t restore ARCHIVE OUTPUT [--format png] [--keys ...]`; returns the exit code."""
    return _main("restore", argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("verify", "restore"):
        print("usage: decompress.py {verify|restore} ARCHIVE [...]", file=sys.stderr)
        return EXIT_USAGE
    return verify_main(argv[1:]) if argv[0] == "verify" else restore_main(argv[1:])
