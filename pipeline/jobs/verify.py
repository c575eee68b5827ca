"""The decode job: verify an m2t archive bit for bit, and restore a dataset from it.

    m2t verify ARCHIVE [--shards 00000 00003] [--against-source] [--no-ray] [--report out.json]
    m2t restore ARCHIVE OUTPUT [--format png] [--keys k1 k2] [--no-ray]
    python jobs/decompress.py verify ... | restore ...     (same arguments; for `ray job submit`)

Shards are decoded on a pool of Ray actors (one GPU each where the cluster has GPUs, else
`--cpus-per-actor` CPUs each; sized from ray.cluster_resources() by pipeline/runner.py's
helper), or in this process with --no-ray. Each shard is decoded exactly once.

Nothing in the archive is trusted: the manifest is type-checked (checked_manifest; shard names
must be the archive's own, 5-12 digits), the model is opened only from --model or the installed
registry (name + weights hash; resolve_model never opens the manifest's source path/URL), each
index is checked against archive.index_schema()'s types, every row's offset/length is checked against the blob's
real size before any read, the bitstream's CRC-32 against the index, the bitstream header
(m2t_core.bitstream.unpack, with the archive's max_pixels) before any decoding, the header's
size against the index, and the decoded pixels' CRC-32 against decoded_crc32. Each problem is
an issue {shard, key, kind, message}; see ISSUE_KINDS.

Restore writes `<OUTPUT>/<key>.<format>` (the extension is always appended, so two keys
never map to one path). Keys that could escape OUTPUT (absolute, `..` or `.` segments,
empty segments, backslashes, drive letters, control characters) are refused (issue
`unsafe_key`), never rewritten. Files already present are skipped: rerun to resume.

Exit codes: 0 clean; 1 mismatches or errors found; 2 usage error; 3 incomplete run (no
manifest, or a shard's worker failed).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import socket
import sys
import tarfile
import time
import zlib
from typing import Any, Mapping

import numpy as np

from m2t_core import bitstream as bs
from m2t_core.codec import numerics_environment

from pipeline.storage import archive as A
from pipeline.jobs.runner import EXIT_INCOMPLETE, EXIT_ISSUES, EXIT_OK, EXIT_USAGE  # noqa: F401 (the job's exit codes)
from pipeline.jobs.runner import (JobError, PoolOptions, Progress, actor_class, connect_ray, exit_code, peak_rss_mib, plan_pool,
                     ray_node_id, run_actor_pool, run_in_process)
from pipeline.storage.sources import filesystem, join_url

log = logging.getLogger(__name__)

ISSUE_KINDS = {
    "missing_blob": "shards/<shard>.bin is missing",
    "missing_index": "shards/<shard>.parquet is missing, unreadable or malformed (wrong columns or types)",
    "bad_manifest": "manifest.json is malformed (not an object, wrong types) or names an unsafe shard",
    "incomplete_shard": "shards/<shard>.stats.json (the completion marker) is missing",
    "truncated_blob": "the .bin is shorter (or longer) than the shard's stats say",
    "bad_offset": "an index row's offset/length is missing, negative, too large or outside the blob",
    "crc_mismatch": "the bitstream's bytes do not match the index's CRC-32 (flipped or changed bytes)",
    "unsupported_version": "the bitstream's format version is unknown to this decoder",
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
    "unsafe_key": "restore: the key could escape the output root; refused",
    "write_error": "restore: the image could not be written",
    "worker_failed": "the shard's worker failed (the shard was not checked)",
}
FORMATS = {"png": ("PNG", ".png"), "bmp": ("BMP", ".bmp"), "tiff": ("TIFF", ".tiff"),
           "webp": ("WEBP", ".webp"), "ppm": ("PPM", ".ppm")}  # lossless only
VERIFY_REPORT, RESTORE_REPORT = "verify.json", "restore.json"


def issue(shard, key, kind: str, message: str) -> dict[str, Any]:
    return {"shard": shard, "key": key, "kind": kind, "message": message}


# ====================================================================== model


class ModelUnavailable(RuntimeError):
    pass


def resolve_model(manifest: Mapping[str, Any], override: str | None, storage_options=None) -> str:
    """The model spec (name, path or URL) whose weights are the manifest's; ModelUnavailable
    names the model needed when none is."""
    from m2t_core.registry import MODEL_NAME_RE, find_installed_model

    # Only two places are ever opened: what the user passed (--model) and the installed
    # registry (matched by name and weights hash). The manifest's `source` (a path or URL the
    # compress job used) is shown in messages, never opened: an archive is untrusted.
    info = manifest.get("model") if isinstance(manifest, Mapping) else None
    info = info if isinstance(info, Mapping) else {}
    want_id, want_hash = info.get("id"), info.get("weights_hash")
    if not (isinstance(want_id, str) and MODEL_NAME_RE.match(want_id) and isinstance(want_hash, str)
            and re.fullmatch(r"[0-9a-f]{16}", want_hash)):
        raise ModelUnavailable(f"the manifest's model is malformed (id {want_id!r}, weights hash {want_hash!r}): "
                               "give the model with --model PATH|URL")
    tried = []
    if override:
        try:
            model = A.open_model(override, storage_options=storage_options)
        except Exception as exc:  # not found, unreadable, not a checkpoint
            tried.append(f"{override} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
        else:
            if model.model_id == want_id and model.weights_hash().hex() == want_hash:
                return override
            tried.append(f"{override} ({model.model_id}, weights {model.weights_hash().hex()})")
    path = find_installed_model(want_id, want_hash)
    if path is not None:
        return str(path)
    tried.append(f"installed models named {want_id!r} ($M2T_MODEL_PATH, package weights)")
    raise ModelUnavailable(
        f"the archive needs model {want_id!r} with weights hash {want_hash} "
        f"(sha256 {info.get('weights_sha256')!r}, written from {str(info.get('source'))[:200]!r}, not opened); "
        f"no available checkpoint matches: give it with --model PATH|URL or put it in $M2T_MODEL_PATH "
        f"(tried: {'; '.join(tried[:6])})")


# ====================================================================== one shard


def _read_source(source: str, storage_options, image_column, cache: dict) -> bytes:
    """The bytes of an index row's source: a file URL, `URL#member` (tar), `URL#row=N` (Parquet)."""
    url, _, frag = source.partition("#")
    fs, path = filesystem(url, storage_options)
    if not frag:
        return fs.cat_file(path)
    if frag.startswith("row="):
        if url not in cache:
            import pyarrow.compute as pc
            import pyarrow.parquet as pq

            from pipeline.storage.sources import _pick_columns

            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f, pre_buffer=False)  # no Arrow threads: see A.read_parquet
                column, _ = _pick_columns(pf.schema_arrow, url, image_column, None)
                col = pf.read(columns=[column], use_threads=False).column(0).combine_chunks()
            if hasattr(col.type, "num_fields"):
                col = pc.struct_field(col, "bytes")
            cache[url] = col
        value = cache[url][int(frag[4:])].as_py()
        if value is None:
            raise ValueError("no image bytes in the Parquet row")
        return value
    if url not in cache:  # a tar: read once per shard (a tar is one shard)
        members = {}
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if m.isfile() and m.name not in members:
                    handle = tar.extractfile(m)
                    members[m.name] = handle.read() if handle else b""
        cache[url] = members
    if frag not in cache[url]:
        raise KeyError(f"member {frag!r} not in {url}")
    return cache[url][frag]


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
    if header.model_id != model.model_id or header.weights_hash != model.weights_hash():
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


def process_shard(model, shard: str, job: Mapping[str, Any]) -> dict[str, Any]:
    """Verify (job["mode"] == "verify") or restore one shard; returns counts and issues."""

    t0 = time.perf_counter()
    archive = A.Archive(job["archive"], job["storage_options"])
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
    try:
        table = A.read_parquet(fs, archive.shard_path(shard, ".parquet"))
        schema = A.index_schema()
        bad = A.schema_problems(table.schema, schema)
        if bad:
            raise ValueError(f"malformed index ({'; '.join(bad[:5])})")
        rows = [{"step_ends": None, **r}
                for r in table.select([n for n in schema.names if n in table.schema.names]).to_pylist()]
    except Exception as exc:
        issues.append(issue(shard, None, "missing_index", f"shard {shard}: cannot read shards/{shard}.parquet: "
                            f"{type(exc).__name__}: {exc}"))
        out["seconds"] = time.perf_counter() - t0
        return out
    ok_rows = [r for r in rows if r["status"] == "ok"]
    if job.get("keys") is not None:
        ok_rows = [r for r in ok_rows if r["key"] in job["keys"]]
    expect = job.get("manifest_shard")
    if expect and job.get("keys") is None and isinstance(expect.get("images"), int) \
            and isinstance(expect.get("ok"), int) and (len(rows) != expect["images"] or len([r for r in rows if r["status"] == "ok"]) != expect["ok"]):
        issues.append(issue(shard, None, "index_mismatch", f"shard {shard}: the index has {len(rows)} rows, "
                            f"the manifest says {expect['images']} (ok: manifest {expect['ok']})"))
    blob_path = archive.shard_path(shard, ".bin")
    try:
        size = fs.size(blob_path) if fs.exists(blob_path) else None
    except FileNotFoundError:
        size = None
    if size is None:
        if ok_rows or not stats or stats.get("compressed_bytes"):
            issues.append(issue(shard, None, "missing_blob", f"shard {shard}: shards/{shard}.bin is missing; "
                                f"{len(ok_rows)} image(s) cannot be decoded"))
        out["images"] = len(ok_rows)
        out["seconds"] = time.perf_counter() - t0
        return out
    if stats is not None and stats.get("compressed_bytes") is not None and size != stats["compressed_bytes"]:
        issues.append(issue(shard, None, "truncated_blob",
                            f"shard {shard}: shards/{shard}.bin has {size} bytes, the shard wrote "
                            f"{stats['compressed_bytes']} ({'truncated' if size < stats['compressed_bytes'] else 'extra bytes'})"))
    max_pixels = int(job["max_pixels"])
    max_length = 3 * max_pixels + 65536  # never more bytes than raw RGB: bounds every read
    out_archive = A.Archive(job["output"], job["storage_options"]) if job["mode"] == "restore" else None
    source_cache: dict = {}
    batch = decode_batch(job, model)
    # A bad row becomes an issue here; good ones are decoded `batch` at a time
    # (decompress_many: the windows of many images share each transformer step).
    pending: list[tuple[dict, bytes, Any, str | None]] = []  # (row, stream, header, dest)
    for row in ok_rows:
        key = row["key"]
        out["images"] += 1
        dest = None
        if out_archive is not None:
            rel = safe_relpath(key, job["ext"])
            if rel is None:
                issues.append(issue(shard, key, "unsafe_key", f"shard {shard}, key {key!r}: refused, the key "
                                    "could escape the output root (absolute, '..', '.', empty segment, "
                                    "backslash, drive or control character)"))
                continue
            dest = out_archive.path(rel)
            out["files"][key] = rel
            if fs_exists(out_archive, dest):
                out["skipped"] += 1
                continue
        offset, length = row["offset"], row["length"]
        if offset is None or length is None or offset < 0 or length <= 0 or length > max_length \
                or offset + length > size:
            issues.append(issue(shard, key, "bad_offset", f"shard {shard}, key {key!r}: offset {offset} + length "
                                f"{length} is outside shards/{shard}.bin ({size} bytes)"))
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
            _decode_and_check(model, pending, job, out, out_archive, source_cache, batch)
            pending = []
    if pending:
        _decode_and_check(model, pending, job, out, out_archive, source_cache, batch)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mib"] = peak_rss_mib()  # of the worker process that decoded this shard
    return out


def decode_batch(job: Mapping[str, Any], model) -> int:
    """Streams decoded together: the job's --batch-images, or (0) 16 on a GPU, 1 on a CPU
    (where batching is no faster: bench/codec_speed.py)."""
    return int(job.get("batch_images") or 0) or (16 if model.device.type == "cuda" else 1)


def pixels_comparable(expect: Mapping[str, Any] | None, model, batch: int) -> bool:
    """Whether this worker's decoded pixels can be held to the index's decoded_crc32: only
    under the numerics that wrote it (the latent CRC, checked inside decoding, holds
    everywhere). g_s run on a batch rounds by the batch's shape, so batched pixels (the
    writer's or ours) are never compared."""
    written = (expect or {}).get("numerics")
    if not isinstance(written, Mapping) or written.get("transform_batch", 1) != 1:
        return False
    return batch == 1 and written == model.numerics()


def _decode_and_check(model, pending: list, job: Mapping[str, Any], out: dict, out_archive, source_cache: dict,
                      batch: int) -> None:
    """Decode `pending` streams together, then check (and restore) each decoded image."""
    from m2t_core.image_io import load_image, save_image
    from m2t_core.metrics import mse as mse_of, psnr_from_mse

    shard, issues, max_pixels = out["shard"], out["issues"], int(job["max_pixels"])
    expect = job.get("manifest_shard")
    decoded = model.decompress_many([data for _, data, _, _ in pending], max_pixels=max_pixels, batch=batch)
    comparable = pixels_comparable(expect, model, batch)  # the same for every row of the shard
    for (row, data, header, dest), rgb in zip(pending, decoded):
        key = row["key"]
        if isinstance(rgb, Exception):  # ChecksumMismatchError, BitstreamError from the entropy decoder
            issues.append(issue(shard, key, "decode_error", f"shard {shard}, key {key!r}: "
                                f"{type(rgb).__name__}: {rgb}"))
            continue
        out["pixels"] += header.height * header.width
        got = zlib.crc32(np.ascontiguousarray(rgb).tobytes())
        # Pixels come from float g_s: compared only under the numerics that wrote decoded_crc32.
        same_numerics = header.portable is False or comparable
        out.setdefault("pixel_checks", {"compared": 0, "skipped": 0})["compared" if same_numerics else "skipped"] += 1
        if same_numerics and row["decoded_crc32"] is not None and got != row["decoded_crc32"]:
            issues.append(issue(shard, key, "decoded_mismatch", f"shard {shard}, key {key!r}: decoded pixels have "
                                f"CRC-32 {got:08x}, index says {row['decoded_crc32']:08x}"))
            continue
        if job.get("against_source"):
            try:
                src = load_image(_read_source(row["source"], job["storage_options"], job.get("image_column"),
                                              source_cache), max_pixels=max_pixels)
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
                buf = io.BytesIO()
                save_image(rgb, buf, format=job["format"])
                out_archive.write_bytes(dest, buf.getvalue())
                out["written"] += 1
            except Exception as exc:
                issues.append(issue(shard, key, "write_error", f"shard {shard}, key {key!r}: {dest}: {exc}"))
                continue
        out["verified"] += 1


def _close(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def fs_exists(archive: A.Archive, path: str) -> bool:
    try:
        return archive.fs.exists(path)
    except Exception:
        return False


_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def safe_relpath(key: str, ext: str) -> str | None:
    """`key` + `ext` as a path relative to the output root, or None if the key could escape it.
    Keys are never rewritten (two keys could otherwise collide): unsafe ones are refused."""
    if not key or key.startswith("/") or _UNSAFE_CHARS.search(key) or re.match(r"^[A-Za-z]:", key) \
            or "://" in key:
        return None
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return key + ext


class DecodeWorker:
    """A Ray actor: loads the model once, then verifies / restores the shards it is given."""

    def __init__(self, job: dict[str, Any]):
        import torch

        torch.set_num_threads(max(1, int(job["cpus_per_actor"])))
        self.job = job
        self.node_id = ray_node_id()
        self.model = A.open_model(job["model_source"], device="cuda" if job["use_gpu"] else "cpu",
                                  storage_options=job["storage_options"])

    def ready(self) -> dict[str, Any]:
        """The pool's placement probe: answers once the actor is placed and built."""
        return {"node_id": self.node_id}

    def process(self, shard: str, manifest_shard) -> dict[str, Any]:
        result = process_shard(self.model, shard, {**self.job, "manifest_shard": manifest_shard})
        result["node_id"] = self.node_id
        return result


# ====================================================================== the driver


def _pool_options(args) -> PoolOptions:
    return PoolOptions(address=args.ray_address, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                       retries=getattr(args, "shard_retries", 2),
                       placement_timeout_s=getattr(args, "placement_timeout", 120.0))


def _run_ray(job, shards, manifest_shards, args, bar, results, failed) -> dict[str, Any]:
    """Shards on a pool of DecodeWorker actors (pipeline.runner.run_actor_pool): a shard whose
    actor died with its node is retried on the actors left; an actor that cannot be placed is
    not waited for (--placement-timeout)."""
    options = _pool_options(args)
    connect_ray(options.address)
    plan = plan_pool(options, len(shards))
    n_actors, use_gpu = plan.actors, plan.use_gpu
    job = {**job, "use_gpu": use_gpu}

    def on_result(shard: str, result: dict, node_id) -> None:
        results[shard] = result
        bar.update(result["images"], len(result["issues"]))

    def on_failed(shard: str, reason: str) -> None:
        failed[shard] = reason

    try:
        events = run_actor_pool(
            actor_class(DecodeWorker, options, plan), (job,), n_actors, [(shard, shard) for shard in shards],
            lambda actor, shard: actor.process.remote(shard, manifest_shards.get(shard)), on_result, on_failed,
            retries=options.retries, in_flight=options.in_flight, cpus=options.cpus_per_actor,
            gpus=plan.gpu_per_actor, placement_timeout_s=options.placement_timeout_s)
    except JobError as exc:  # the actors cannot start (e.g. the model): every shard left fails
        for shard in shards:
            if shard not in results:
                failed.setdefault(shard, str(exc))
        events = None
    return {"ray": True, "actors": n_actors, "use_gpu": use_gpu, "faults": events}


def _run_in_process(job, shards, manifest_shards, args, bar, results, failed) -> None:
    """Shards one after the other in this process; a shard whose worker raised is tried
    --shard-retries more times (then it is `worker_failed`)."""
    model = A.open_model(job["model_source"], storage_options=job["storage_options"])

    def on_result(shard: str, result: dict) -> None:
        results[shard] = result
        bar.update(result["images"], len(result["issues"]))

    run_in_process([(shard, shard) for shard in shards],
                   lambda shard: process_shard(model, shard, {**job, "manifest_shard": manifest_shards.get(shard)}),
                   on_result, failed.__setitem__, retries=getattr(args, "shard_retries", 2))


class _Unparsable(str):
    pass


def _count_ok(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checked_manifest(raw: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The parts of a manifest that verify/restore use, type-checked (the archive is untrusted):
    each problem becomes a `bad_manifest` issue and the offending part is left out (a shard
    entry with an unsafe name is never read). Returns (manifest, issues)."""
    if not isinstance(raw, dict):
        what = str(raw) if isinstance(raw, _Unparsable) else f"a JSON {type(raw).__name__}, not an object"
        return {}, [issue(None, None, "bad_manifest", f"manifest.json is {what}: nothing can be checked")]
    problems = []
    manifest = dict(raw)
    for part in ("model", "config"):
        if not isinstance(raw.get(part, {}), dict):
            problems.append(issue(None, None, "bad_manifest", f"manifest.json: {part!r} is a "
                                  f"{type(raw[part]).__name__}, not an object"))
            manifest[part] = {}
    cfg = dict(manifest.get("config", {}))
    if cfg.get("max_pixels") is not None and not (_count_ok(cfg["max_pixels"]) and cfg["max_pixels"] > 0):
        problems.append(issue(None, None, "bad_manifest", f"manifest.json: config max_pixels {cfg['max_pixels']!r} "
                              f"is not a positive integer; using {bs.DEFAULT_MAX_PIXELS}"))
        cfg["max_pixels"] = None
    if not isinstance(cfg.get("parquet_image_column"), (str, type(None))):
        problems.append(issue(None, None, "bad_manifest", "manifest.json: config parquet_image_column is not a string"))
        cfg["parquet_image_column"] = None
    manifest["config"] = cfg
    shards = raw.get("shards", [])
    if not isinstance(shards, list):
        problems.append(issue(None, None, "bad_manifest", f"manifest.json: 'shards' is a {type(shards).__name__}, "
                              "not a list: no shard can be checked"))
        shards = []
    good, seen = [], set()
    for i, entry in enumerate(shards):
        name = entry.get("shard") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not A.SHARD_NAME_RE.match(name):
            problems.append(issue(None, None, "bad_manifest", f"manifest.json: shard entry {i} has an unsafe or "
                                  f"malformed shard name {str(name)[:100]!r} (shard names are 5 to 12 digits); "
                                  "refused, nothing read for it"))
            continue
        if name in seen:
            problems.append(issue(name, None, "bad_manifest", f"manifest.json: shard {name} is listed twice"))
            continue
        seen.add(name)
        if not (_count_ok(entry.get("images")) and _count_ok(entry.get("ok"))):
            problems.append(issue(name, None, "bad_manifest", f"manifest.json: shard {name}'s counts images "
                                  f"{str(entry.get('images'))[:40]!r} / ok {str(entry.get('ok'))[:40]!r} are not "
                                  "non-negative integers; not compared"))
            entry = {k: v for k, v in entry.items() if k not in ("images", "ok")}
        good.append(entry)
    manifest["shards"] = good
    return manifest, problems


def run(mode: str, args, options) -> tuple[dict[str, Any], int]:
    """Verify or restore; returns (report, exit code)."""
    t_start = time.perf_counter()
    archive_url = args.archive if "://" in args.archive else os.path.abspath(args.archive)
    archive = A.Archive(archive_url, options)
    try:
        manifest = archive.read_json(A.MANIFEST)
    except A.ArchiveError as exc:
        raise A.ArchiveError(f"{exc}: the archive is incomplete or not an m2t archive "
                             "(finish it with `m2t compress`)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # not JSON: reported like any other malformed manifest
        manifest = _Unparsable(f"unparsable JSON ({exc})")
    manifest, manifest_issues = checked_manifest(manifest)
    all_shards = [s["shard"] for s in manifest.get("shards", [])]
    manifest_shards = {s["shard"]: s for s in manifest.get("shards", [])}
    shards = all_shards
    if args.shards:
        wanted = [s for item in args.shards for s in item.split(",") if s]
        unknown = [s for s in wanted if s not in manifest_shards]
        if unknown:
            raise A.ArchiveError(f"shard(s) {', '.join(unknown)} not in the manifest (it lists {len(all_shards)})")
        shards = [s for s in all_shards if s in set(wanted)]
    cfg = manifest.get("config", {})
    job = {"mode": mode, "archive": archive_url, "storage_options": options,
           "max_pixels": min(int(cfg.get("max_pixels") or bs.DEFAULT_MAX_PIXELS), bs.DEFAULT_MAX_PIXELS),
           "against_source": getattr(args, "against_source", False),
           "image_column": cfg.get("parquet_image_column"), "cpus_per_actor": args.cpus_per_actor, "use_gpu": False,
           "batch_images": getattr(args, "batch_images", 0)}
    if mode == "restore":
        fmt, ext = FORMATS[args.format]
        job.update(output=args.output if "://" in args.output else os.path.abspath(args.output), format=fmt, ext=ext,
                   keys=set(args.keys) if args.keys else None)
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    issues: list[dict] = list(manifest_issues)
    runner: dict[str, Any] = {"ray": not args.no_ray}
    t_run = time.perf_counter()
    try:
        job["model_source"] = resolve_model(manifest, args.model, options)
    except ModelUnavailable as exc:
        issues.append(issue(None, None, "model_unavailable", str(exc)))
        shards = []
    # The ETA from images/s needs the image count: the manifest's (not with --keys: a subset).
    counts = [manifest_shards.get(s, {}).get("images") for s in shards] if job.get("keys") is None else []
    bar = Progress(len(shards), not args.no_progress, mode, failures="issues",
                   total_images=sum(counts) if counts and all(isinstance(c, int) for c in counts) else None)
    try:
        if shards and args.no_ray:
            _run_in_process(job, shards, manifest_shards, args, bar, results, failed)
        elif shards:
            runner.update(_run_ray(job, shards, manifest_shards, args, bar, results, failed))
    finally:
        bar.close()
    run_s = time.perf_counter() - t_run
    for shard in shards:
        if shard in results:
            issues += results[shard]["issues"]
        elif shard in failed:
            issues.append(issue(shard, None, "worker_failed", f"shard {shard}: worker failed: {failed[shard]}"))
    res = [results[s] for s in shards if s in results]
    images = sum(r["images"] for r in res)
    kinds: dict[str, int] = {}
    for i in issues:
        kinds[i["kind"]] = kinds.get(i["kind"], 0) + 1
    decode_kinds = {"bad_manifest", "decode_error", "corrupt_bitstream", "unsupported_version", "bad_offset", "missing_blob",
                    "missing_index", "worker_failed", "model_unavailable", "source_error", "write_error"}
    report = {
        "mode": mode, "archive": archive_url, "model": manifest.get("model", {}).get("id"),
        "shards": {"checked": len(res), "requested": len(shards),
                   "failed": failed, "decode_counts": {s: 1 for s in results}},
        "workers": sorted({r["worker"] for r in res}),
        "peak_rss_mib": {w: max(r.get("peak_rss_mib") or 0.0 for r in res if r["worker"] == w)
                         for w in sorted({r["worker"] for r in res})},  # per worker process
        "images": images, "verified": sum(r["verified"] for r in res),
        # Every stream's latent CRC is checked (portable: the same on every machine); the
        # decoded pixels' CRC only where this decoder's numerics are the encoder's.
        "checks": {"latent": "every stream",
                   "pixels_compared": sum(r.get("pixel_checks", {}).get("compared", 0) for r in res),
                   "pixels_not_compared": sum(r.get("pixel_checks", {}).get("skipped", 0) for r in res),
                   "numerics": numerics_environment("cuda" if job.get("device") == "cuda" else "cpu")},
        "mismatches": [i for i in issues if i["kind"] not in decode_kinds],
        "errors": [i for i in issues if i["kind"] in decode_kinds],
        "issues": issues, "issue_counts": kinds,
        "seconds": run_s,
        "images_per_s": images / run_s if run_s > 0 and images else None,
        "megapixels_per_s": sum(r["pixels"] for r in res) / 1e6 / run_s if run_s > 0 and images else None,
        "faults": runner.pop("faults", None),  # Ray: actors lost with their node, shards retried
        "runner": runner, "finished_at": A.now_iso(),
    }
    if mode == "restore":
        report.update(output=job["output"], format=args.format, written=sum(r["written"] for r in res),
                      skipped=sum(r["skipped"] for r in res),
                      files={k: v for r in res for k, v in sorted(r["files"].items())})
    code = exit_code(True, failed_items=len(failed), issues=len(issues))
    report["exit_code"] = code
    report["wall_s"] = time.perf_counter() - t_start
    return report, code


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
        p.add_argument("--format", default="png", choices=sorted(FORMATS), help="lossless image format (png)")
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
    parser = _parser(mode)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        options = json.loads(args.storage_options) if args.storage_options else None
        if args.actors < 0 or args.cpus_per_actor < 0:
            raise ValueError("--actors and --cpus-per-actor must be >= 0")
        if args.shard_retries < 0 or args.placement_timeout <= 0:
            raise ValueError("--shard-retries must be >= 0 and --placement-timeout > 0")
        if not 0 <= args.batch_images <= 1024:
            raise ValueError(f"--batch-images must be 0 (auto) to 1024, got {args.batch_images}")
        report, code = run(mode, args, options)
    except A.ArchiveError as exc:
        print(f"m2t {mode}: error: {exc}", file=sys.stderr)
        return EXIT_INCOMPLETE if "incomplete" in str(exc) and "not in the manifest" not in str(exc) else EXIT_USAGE
    except Exception as exc:  # usage / configuration errors; M2T_DEBUG=1 shows the traceback
        if os.environ.get("M2T_DEBUG"):
            raise
        print(f"m2t {mode}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(format_report(report))
    target = args.report
    try:
        if target is None and mode == "restore":
            out = A.Archive(report["output"], options)
            out.write_json(out.path(RESTORE_REPORT), report)
            target = join_url(report["output"], RESTORE_REPORT)
        else:
            target = target or VERIFY_REPORT
            with open(target, "w") as f:
                f.write(A.dumps(report))
        print(f"report: {target}")
    except OSError as exc:
        print(f"m2t {mode}: warning: could not save the report to {target}: {exc}", file=sys.stderr)
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
