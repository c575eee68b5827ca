"""The compression job: a whole corpus -> an m2t archive, on a Ray actor pool (or in-process).

    python jobs/compress.py /data/photos /data/photos.m2t            # local Ray cluster
    m2t compress s3://bucket/shards s3://bucket/archive --config configs/pipeline/default.yaml \
        --set shard_size=512 --set ray.cpus_per_actor=2
    RAY_ADDRESS=... ray job submit --working-dir . -- python jobs/compress.py IN OUT

How it runs:
  1. The driver lists the inputs and cuts them into shards (pipeline/sources.py), loads the
     model once to record its identity, and skips shards whose stats file exists (resume).
  2. A pool of actors, each holding the model, takes shards (at most `ray.shards_in_flight`
     queued per actor). An actor streams its shard's images through a small prefetch thread
     (read + decode overlap the model), encodes each image, measures the decoder's output,
     appends the bitstream to the shard's .bin, and writes the shard's index and stats
     (pipeline/archive.py). Only the small stats dict goes back to the driver.
  3. When every shard is done, the driver writes keys.parquet and manifest.json; it always
     writes report.json and prints the report.

A bad input never stops the job: it becomes an index row with status "error" (or
"duplicate") and the reason. A shard whose worker fails (I/O error on the output, a dead
actor) is retried `ray.shard_retries` times, then reported. The actor pool (run_actor_pool)
survives lost nodes: it retries their shards on the actors left, replaces a lost actor only
where the cluster has room, never waits longer than `ray.placement_timeout_s` for an actor to
be placed, and the report's `faults` says what was lost and retried.

Exit codes: 0 every input archived; 1 the archive is complete but some inputs are not in it
(status error or duplicate: see report.json and the index); 2 usage or configuration error;
3 the archive is incomplete (shards failed, the run was stopped by max_shards, or
interrupted): run the same command again to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import queue
import re
import socket
import sys
import threading
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from m2t_core.config import ConfigError, load_config_file
from m2t_core.registry import DEFAULT_MODEL, CheckpointError, ModelNotFoundError
from m2t_core import bitstream
from m2t_core.codec import code_plan

from . import archive as A
from .lease import ArchiveLease, LeaseError, LeaseHeldError, LeaseLostError, check_holder
from .sources import ShardSpec, SourceError, SourceItem, iter_shard, plan_shards

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED_IMAGES, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pipeline" / "default.yaml"
FAILURE_EXAMPLES = 10  # per shard stats; the report shows up to 20 overall
SECRET_RE = re.compile(r"(secret|token|password|passwd|credential|key)", re.IGNORECASE)


# ====================================================================== configuration


@dataclass
class RayOptions:
    enabled: bool = True  # false: compress in this process, shard after shard (small jobs, debugging)
    address: Any = None  # cluster to join; null: $RAY_ADDRESS if set, else start a local cluster
    actors: int = 0  # 0: actors_per_gpu per GPU when the cluster has GPUs, else one per cpus_per_actor CPUs
    cpus_per_actor: float = 1.0  # CPUs reserved per actor; torch uses as many threads
    use_gpu: Any = None  # null: GPUs iff the cluster has some; true / false to force
    # Actors sharing one GPU (each asks for 1/k of it). Entropy coding runs on the CPU, so one
    # actor alone leaves its GPU idle while it codes; k actors keep it busy. 0: as many as the
    # CPUs allow, at most 4.
    actors_per_gpu: int = 0
    shards_in_flight: int = 2  # per actor: the next shard waits in the actor's queue, no idle gap
    shard_retries: int = 2  # a shard whose worker failed is tried this many more times
    # An actor not placed on a node within this many seconds is given up (the cluster lost
    # the capacity, e.g. a node): the job goes on with the actors it has.
    placement_timeout_s: float = 120.0


@dataclass
class CompressConfig:
    input: Any = None  # fsspec URL or list: folders / globs of images, .tar shards, .parquet files
    output: Any = None  # archive URL (local folder or s3://bucket/prefix)
    model: str = DEFAULT_MODEL  # registry name, checkpoint path, or fsspec URL of a checkpoint
    shard_size: int = 256  # images per shard (image files, Parquet rows); a tar is one shard
    max_pixels: int = 64_000_000  # larger images are refused (status error) before decoding
    max_source_bytes: int = 268_435_456  # larger files are refused before they are read
    window_batch: int = 8  # windows per transformer call; stored in every bitstream
    compute_psnr: bool = True  # decode-side reconstruction for PSNR and decoded_crc32 (~1.5x time)
    # Images per model call (g_a, the entropy model, g_s); 0: 16 on a GPU, 1 on a CPU.
    batch_images: int = 0
    # Threads that range-code while the model runs the next batch; -1: 1 on a CPU, on a GPU
    # all the actor's CPUs but one; 0: code in the model's thread.
    coding_threads: int = -1
    prefetch: int = 2  # decoded images queued ahead of the model, per actor
    torch_threads: int = 0  # 0: cpus_per_actor (at least 1) on Ray; PyTorch's default in-process
    device: str = "auto"  # in-process runs: "auto" (cuda if available), "cpu", "cuda"
    parquet_image_column: Any = None  # null: auto (image, jpg, png, ... binary or {bytes, path})
    parquet_key_column: Any = None  # null: auto (key, path, ... or the image struct's path)
    storage_options: dict = field(default_factory=dict)  # per protocol: {s3: {endpoint_url: ...}}
    max_shards: int = 0  # > 0: stop after this many shards in this run (resume later)
    # Resume: a committed shard whose .bin is missing or not the size its stats say is redone;
    # true: also check every bitstream of every committed shard against its index's CRC-32
    # (reads the whole archive). `--verify-existing` on the command line.
    verify_existing: bool = False
    # The job's lease on the archive (pipeline/lease.py) goes stale this long after its last
    # heartbeat (renewed every timeout/4); a stale lease is broken only with --break-lease.
    lease_timeout_s: float = 120.0
    ray: RayOptions = field(default_factory=RayOptions)

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        for name in ("input", "output"):
            value = getattr(self, name)
            need(value is None or isinstance(value, str)
                 or (name == "input" and isinstance(value, list) and value and all(isinstance(v, str) for v in value)),
                 f"{name} must be a URL{' or a list of URLs' if name == 'input' else ''}, got {value!r}")
        need(isinstance(self.model, str) and bool(self.model), f"model must be a name, path or URL, got {self.model!r}")
        for name in ("shard_size", "max_pixels", "max_source_bytes", "window_batch", "prefetch"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.window_batch <= bitstream.MAX_WINDOW_BATCH,
             f"window_batch must be <= {bitstream.MAX_WINDOW_BATCH}, got {self.window_batch}")
        need(self.max_pixels <= bitstream.DEFAULT_MAX_PIXELS,
             f"max_pixels must be <= {bitstream.DEFAULT_MAX_PIXELS} (the decoder's default limit)")
        need(self.torch_threads >= 0 and self.max_shards >= 0, "torch_threads and max_shards must be >= 0")
        need(isinstance(self.batch_images, int) and 0 <= self.batch_images <= 1024,
             f"batch_images must be 0 (auto) to 1024, got {self.batch_images!r}")
        need(isinstance(self.coding_threads, int) and -1 <= self.coding_threads <= 256,
             f"coding_threads must be -1 (auto), 0 (none) or up to 256, got {self.coding_threads!r}")
        need(isinstance(self.verify_existing, bool), f"verify_existing must be true or false, got {self.verify_existing!r}")
        need(self.lease_timeout_s > 0, f"lease_timeout_s must be > 0, got {self.lease_timeout_s}")
        need(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
             f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        for name in ("parquet_image_column", "parquet_key_column"):
            need(getattr(self, name) is None or isinstance(getattr(self, name), str), f"{name} must be a column name")
        need(isinstance(self.storage_options, dict)
             and all(isinstance(v, dict) for v in self.storage_options.values()),
             "storage_options must map a protocol to a mapping of options, e.g. {s3: {endpoint_url: ...}}")
        r = self.ray
        need(r.address is None or isinstance(r.address, str), "ray.address must be a string or null")
        need(r.actors >= 0 and r.cpus_per_actor >= 0, "ray.actors and ray.cpus_per_actor must be >= 0")
        need(r.actors_per_gpu >= 0, "ray.actors_per_gpu must be >= 0")
        need(r.use_gpu in (None, True, False), "ray.use_gpu must be null, true or false")
        need(r.shards_in_flight >= 1 and r.shard_retries >= 0, "ray.shards_in_flight must be >= 1, ray.shard_retries >= 0")
        need(r.placement_timeout_s > 0, "ray.placement_timeout_s must be > 0")

    def check_complete(self) -> None:
        if not self.input:
            raise ConfigError("no input: give INPUT on the command line or `input` in the config")
        if not self.output:
            raise ConfigError("no output: give OUTPUT on the command line or `output` in the config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> CompressConfig:
    """Read a config file (unknown keys are errors), then apply `key=value` overrides (dotted
    keys for nested fields, values parsed as YAML)."""
    return load_config_file(CompressConfig, path, overrides)


def absolute_url(url: str) -> str:
    """Local paths made absolute: Ray workers do not share the driver's working directory."""
    if "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


def _model_source(spec: str) -> str:
    looks_like_path = spec.endswith(".safetensors") or os.sep in spec or "://" in spec
    return absolute_url(spec) if looks_like_path else spec


def redact(value: Any) -> Any:
    """Storage options without credentials, for the manifest and the report."""
    if isinstance(value, dict):
        return {k: ("***" if SECRET_RE.search(str(k)) and not isinstance(v, dict) else redact(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


# ====================================================================== one shard (on a worker)


@dataclass
class _Decoded:
    item: SourceItem
    rgb: np.ndarray | None


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def _image_error(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, MiB (the worker that did a shard), or None."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _prefetch(items: Iterator[SourceItem], max_pixels: int, depth: int) -> Iterator[_Decoded]:
    """Read and decode the next `depth` images in a thread while the caller runs the model.
    Pillow's decoders and fsspec's I/O release the GIL, so the two overlap on a CPU."""
    from m2t_core.image_io import load_image

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(obj) -> bool:
        while not stop.is_set():
            try:
                q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                rgb = None
                if item.status == "ok":
                    try:
                        if not item.data:
                            raise ValueError("empty file (0 bytes)")
                        notes: list[str] = []
                        rgb = load_image(item.data, max_pixels=max_pixels, notes=notes)
                        if notes:  # e.g. a multi-frame GIF/TIFF: status ok, the row's error says so
                            item.error = "; ".join(notes)
                    except Exception as exc:  # ImageError, or anything else Pillow raises
                        item.status, item.error = "error", _image_error(exc)
                    item.data = None  # the decoded pixels are what travels on
                if not put(_Decoded(item, rgb)):
                    return
        except BaseException as exc:  # a bug or an I/O failure outside any one image: fail the shard
            put(_Failure(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # in this thread: the generator runs here
            put(_DONE)

    thread = threading.Thread(target=work, name="m2t-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            obj = q.get()
            if obj is _DONE:
                return
            if isinstance(obj, _Failure):
                raise obj.exc
            yield obj
    finally:
        stop.set()
        thread.join(timeout=30)


def settings_of(job: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that change an archive's bytes: a resumed run must use the same ones."""
    return {k: job[k] for k in ("model_id", "weights_sha256", "window_batch", "max_pixels", "compute_psnr")}


def _fence(job: Mapping[str, Any], shard: str, step: str) -> None:
    """Raise LeaseLostError unless the job that sent this shard still holds the archive's lease
    (job["lease_owner"]): workers of a killed or superseded job must not write."""
    owner = job.get("lease_owner")
    if owner:
        check_holder(job["output"], job["storage_options"], owner, what=f"shard {shard} not {step}")


def _batches(decoded: Iterator[_Decoded], size: int) -> Iterator[list[_Decoded]]:
    batch: list[_Decoded] = []
    for d in decoded:
        batch.append(d)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _coded(plan, format_version: int):
    """The coding stage of one image (CPU only): its EncodedImage, or the exception."""
    try:
        return code_plan(plan, format_version)
    except Exception as exc:
        return exc


def _model_stage(model, batch: list[_Decoded], job: Mapping[str, Any], rows: list[dict]) -> list[tuple]:
    """The device stage of a batch: g_a over the images, the entropy model over all their
    windows (plan_latents), g_s for PSNR. Returns (row, rgb, plan, recon) per image that got
    that far; an image that fails gets its row's error. A batch that fails as a whole is redone
    one image at a time, so the error lands on the image that caused it."""
    todo = []
    for d, row in zip(batch, rows):
        if d.rgb is None:
            continue
        row["height"], row["width"] = int(d.rgb.shape[0]), int(d.rgb.shape[1])
        try:  # e.g. ImageTooLargeError for a side over 65535
            bitstream.check_image_size(d.rgb.shape[0], d.rgb.shape[1], job["max_pixels"])
        except Exception as exc:
            row["status"], row["error"] = "error", f"encoding failed: {_image_error(exc)}"
            continue
        todo.append((d, row))

    def run(part):
        ys = model.analysis_batch([d.rgb for d, _ in part], job["batch_images"])
        latents = [(y, d.rgb.shape[0], d.rgb.shape[1]) for y, (d, _) in zip(ys, part)]
        plans = model.plan_latents(latents)
        recons = model.synthesis_batch(latents, job["batch_images"]) if job["compute_psnr"] else [None] * len(part)
        return [(row, d.rgb, plan, recon) for (d, row), plan, recon in zip(part, plans, recons)]

    if len(todo) > 1:
        try:
            return run(todo)
        except Exception as exc:  # find the image that failed; the others are coded as usual
            log.warning("a batch of %d images failed (%s): coding them one at a time", len(todo), exc)
    staged = []
    for one in todo:
        try:
            staged += run([one])
        except Exception as exc:
            one[1]["status"], one[1]["error"] = "error", f"encoding failed: {_image_error(exc)}"
    return staged


def stage_settings(job: Mapping[str, Any], device: str) -> dict[str, int]:
    """The worker's batch size and coding threads: the job's, or (0 / -1) the defaults for
    its device: on a GPU, batches of 16 and every CPU of the actor but one coding."""
    gpu = device.startswith("cuda")
    batch = int(job.get("batch_images") or 0) or (16 if gpu else 1)
    threads = int(job.get("coding_threads", -1))
    if threads < 0:
        threads = max(1, int(job.get("cpus_per_actor") or 1) - 1) if gpu else 1
    return {"batch_images": batch, "coding_threads": threads}


def compress_shard(model, spec: ShardSpec, job: Mapping[str, Any]) -> dict[str, Any]:
    """Compress one shard and write its .bin, index and (last) stats file; returns the stats.

    Three stages overlap: a thread reads and decodes images (`_prefetch`); this thread runs
    the model on batches of `batch_images` (`_model_stage`: g_a, the entropy model's
    parameters for all their windows, g_s for PSNR); `coding_threads` threads range-code the
    plans (`code_plan`) while the model works on the next batch. Results are written in input
    order. An image's bytes do not depend on the threads, nor on the batch on a CPU (which
    runs g_a one image at a time); a GPU's batched g_a may round a few latents differently
    (bench/batch_consistency.py)."""
    import pyarrow as pa
    from m2t_core.metrics import mse as mse_of, psnr_from_mse

    t0 = time.perf_counter()
    job = {**job, **stage_settings(job, str(model.device))}
    archive = A.Archive(job["output"], job["storage_options"])
    _fence(job, spec.shard, "cleared")  # an orphaned worker of a stopped job stops here
    archive.clear_shard(spec.shard)
    rows: list[dict[str, Any]] = []
    totals = dict(images=0, ok=0, error=0, duplicate=0, source_bytes=0, compressed_bytes=0, pixels=0,
                  sum_bpp=0.0, sum_psnr=0.0, psnr_images=0, sum_mse=0.0, mse_images=0, model_s=0.0)
    failures: list[dict[str, str]] = []
    blob = archive.open_blob(spec.shard)
    threads = job["coding_threads"]
    coder = ThreadPoolExecutor(threads, thread_name_prefix="m2t-code") if threads else None

    def write(batch_rows: list[dict], staged: list[tuple], coded: list) -> None:
        """Commit one batch to the blob and the index rows, in input order."""
        results = {id(row): (rgb, enc.result() if coder else enc, recon)
                   for (row, rgb, _, recon), enc in zip(staged, coded)}
        for row in batch_rows:
            rgb, encoded, recon = results.get(id(row), (None, None, None))
            if isinstance(encoded, Exception):
                row["status"], row["error"], encoded = "error", f"encoding failed: {_image_error(encoded)}", None
            if encoded is not None:
                data = encoded.bitstream
                # A failed write to the archive fails the shard, not the image.
                row.update(offset=blob.append(data), length=len(data), bpp=encoded.bpp, crc32=zlib.crc32(data),
                           step_ends=list(bitstream.read_header(data).step_ends) or None)
                totals["ok"] += 1
                totals["source_bytes"] += row["source_bytes"]
                totals["compressed_bytes"] += len(data)
                totals["pixels"] += encoded.height * encoded.width
                totals["sum_bpp"] += encoded.bpp
                if recon is not None:
                    err = mse_of(rgb, recon)
                    quality = psnr_from_mse(err)
                    row.update(mse=err, psnr=quality, decoded_crc32=zlib.crc32(np.ascontiguousarray(recon).tobytes()))
                    totals["sum_mse"] += err
                    totals["mse_images"] += 1
                    if math.isfinite(quality):
                        totals["sum_psnr"] += quality
                        totals["psnr_images"] += 1
            else:
                totals[row["status"]] += 1
                if len(failures) < FAILURE_EXAMPLES:
                    failures.append({"key": row["key"], "source": row["source"], "status": row["status"],
                                     "error": row["error"]})
            totals["images"] += 1
            rows.append(row)

    try:
        waiting = None  # the previous batch: coded on the coding threads while the model runs this one
        items = iter_shard(spec, job["storage_options"], job["max_source_bytes"])
        for batch in _batches(_prefetch(items, job["max_pixels"], max(job["prefetch"], job["batch_images"])), job["batch_images"]):
            batch_rows = [dict(key=d.item.key, source=d.item.source, shard=spec.shard, offset=None, length=None,
                               height=None, width=None, source_bytes=d.item.source_bytes, bpp=None, psnr=None,
                               mse=None, crc32=None, decoded_crc32=None, status=d.item.status,
                               error=d.item.error or None, step_ends=None) for d in batch]
            t_model = time.perf_counter()
            staged = _model_stage(model, batch, job, batch_rows)
            fv = bitstream.FORMAT_VERSION
            coded = [coder.submit(_coded, plan, fv) if coder else _coded(plan, fv) for _, _, plan, _ in staged]
            totals["model_s"] += time.perf_counter() - t_model
            if waiting is not None:
                write(*waiting)
            waiting = (batch_rows, staged, coded)
        if waiting is not None:
            write(*waiting)
        _fence(job, spec.shard, "committed")
        blob.commit()
    except BaseException:
        blob.abort()
        raise
    finally:
        if coder is not None:
            coder.shutdown(wait=True, cancel_futures=True)
    archive.write_table(archive.shard_path(spec.shard, ".parquet"),
                        pa.Table.from_pylist(rows, schema=A.index_schema()))
    stats = {
        "shard": spec.shard, "kind": spec.kind, "fingerprint": spec.fingerprint, "settings": settings_of(job),
        **totals, "wall_s": time.perf_counter() - t0, "failures": failures,
        "worker": f"{socket.gethostname()}:{os.getpid()}", "node_id": job.get("node_id"),
        "plan_shard_size": job.get("plan_shard_size"),
        # What decided the decoded pixels (g_s is float): verify compares decoded_crc32 only
        # under the same numerics; the latent CRC is checked everywhere.
        "numerics": model.numerics(),
        "peak_rss_mib": peak_rss_mib(), "finished_at": A.now_iso(),
    }
    _fence(job, spec.shard, "marked complete")
    archive.write_json(archive.shard_path(spec.shard, ".stats.json"), stats)  # last: marks completion
    return stats


class ShardWorker:
    """A Ray actor: loads the model once, then compresses the shards it is given."""

    def __init__(self, job: dict[str, Any]):
        import torch

        threads = job["torch_threads"] or max(1, int(job["cpus_per_actor"]))
        torch.set_num_threads(threads)
        logging.basicConfig(level=logging.INFO)
        self.job = {**job, "node_id": ray_node_id()}
        device = "cuda" if job["use_gpu"] else "cpu"
        self.model = A.open_model(job["model_source"], device=device, storage_options=job["storage_options"])
        digest = self.model.weights_digest().hex()
        if digest != job["weights_sha256"]:
            raise RuntimeError(f"{socket.gethostname()}: model {job['model_source']!r} has weights {digest[:16]}..., "
                               f"the driver's has {job['weights_sha256'][:16]}...: the nodes do not see the same file")

    def ready(self) -> dict[str, Any]:
        """The pool's placement probe: answers once the actor is placed and built."""
        return {"node_id": self.job["node_id"], "worker": f"{socket.gethostname()}:{os.getpid()}"}

    def process(self, spec: dict[str, Any]) -> dict[str, Any]:
        return compress_shard(self.model, ShardSpec.from_dict(spec), self.job)


def ray_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


# ====================================================================== the driver


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.images = self.failed = 0
        self.t0 = time.perf_counter()
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="shard", desc="compress", dynamic_ncols=True, file=sys.stderr)

    def update(self, stats: dict[str, Any]) -> None:
        self.images += stats["images"]
        self.failed += stats["error"] + stats["duplicate"]
        if self.bar is not None:
            rate = self.images / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix(images=self.images, failed=self.failed, img_s=f"{rate:.2f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_in_process(todo: list[ShardSpec], job: dict[str, Any], device: str, progress: _Progress,
                    done: dict[str, dict], failed: dict[str, str]) -> None:
    import torch

    threads_before = torch.get_num_threads()
    if job["torch_threads"]:
        torch.set_num_threads(job["torch_threads"])
    try:
        model = A.open_model(job["model_source"], device=device, storage_options=job["storage_options"])
        for spec in todo:
            for attempt in range(job["shard_retries"] + 1):
                try:
                    stats = compress_shard(model, spec, job)
                except Exception as exc:
                    log.warning("shard %s failed (attempt %d): %s", spec.shard, attempt + 1, exc)
                    failed[spec.shard] = f"{type(exc).__name__}: {exc}"
                    continue
                failed.pop(spec.shard, None)
                done[spec.shard] = stats
                progress.update(stats)
                break
    finally:
        torch.set_num_threads(threads_before)  # the caller's process keeps its own setting


def connect_ray(cfg) -> None:
    """Join cfg.ray.address, else $RAY_ADDRESS, else start a local cluster (once per process)."""
    import ray

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, **({} if address else {"include_dashboard": False}))


MAX_AUTO_ACTORS_PER_GPU = 4


def actor_runtime_env() -> dict[str, Any]:
    """The environment of the job's actors. glibc gives every new thread its own malloc arena
    and keeps the freed memory; with a reader thread per shard an actor's resident memory rose
    18% over its first 14 shards before levelling off (bench/pipeline_speed.py). Two arenas
    keep it flat at no measured cost. $MALLOC_ARENA_MAX on the driver overrides the 2."""
    return {"env_vars": {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}}


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    use_gpu: bool
    gpu_per_actor: float  # the fraction of one GPU each actor asks Ray for (0 without GPUs)

    @property
    def description(self) -> str:
        if not self.use_gpu:
            return "CPU only"
        share = round(1 / self.gpu_per_actor)
        return "1 GPU each" if share == 1 else f"{share} actors per GPU"


def plan_actors(options: RayOptions, gpus: int, cpus: float, n_shards: int) -> ActorPlan:
    """How many actors, on what, from what the cluster has: an actor asking for a resource
    the cluster lacks would wait forever, so ask only for what exists."""
    use_gpu = gpus >= 1 if options.use_gpu is None else bool(options.use_gpu)
    if use_gpu and gpus < 1:
        raise ConfigError("ray.use_gpu is true but the cluster has no GPUs")
    per = options.cpus_per_actor
    per_gpu = 1
    if use_gpu:
        cpus_per_gpu = cpus / gpus
        per_gpu = options.actors_per_gpu or max(1, min(MAX_AUTO_ACTORS_PER_GPU,
                                                       int(cpus_per_gpu // per) if per > 0 else 1))
    if options.actors:
        actors = options.actors
        if use_gpu and actors > gpus * per_gpu:
            raise ConfigError(f"ray.actors={actors} GPU actors requested, the cluster has {gpus} GPU(s) "
                              f"x ray.actors_per_gpu={per_gpu}")
        if actors * per > cpus:
            raise ConfigError(f"ray.actors={actors} x ray.cpus_per_actor={per:g} CPUs requested, "
                              f"the cluster has {cpus:g} CPUs")
    elif use_gpu:
        actors = gpus * per_gpu
        if actors * per > cpus:
            raise ConfigError(f"{gpus} GPU(s) x ray.actors_per_gpu={per_gpu} actors need {actors * per:g} CPUs "
                              f"(ray.cpus_per_actor={per:g}), the cluster has {cpus:g}")
    else:
        actors = max(1, int(cpus // per) if per > 0 else int(cpus))
    return ActorPlan(max(1, min(actors, n_shards)), use_gpu, 1.0 / per_gpu if use_gpu else 0.0)


def _ray_resources(cfg: CompressConfig, n_shards: int) -> ActorPlan:
    import ray

    resources = ray.cluster_resources()
    return plan_actors(cfg.ray, int(resources.get("GPU", 0)), resources.get("CPU", 0), n_shards)


# ---------------------------------------------------------------------- the actor pool


def _node_died(text: str) -> bool:
    """Whether a RayActorError says the actor's node (or its process) went away, not that its
    constructor raised."""
    markers = ("node was terminated", "node has died", "node died", "node is dead", "its node",
               "preempted", "worker process has died", "process has died", "out of memory", "OOM", "SIGKILL")
    return any(m.lower() in text.lower() for m in markers)


def _free(resources: Mapping[str, float], cpus: float, gpus: float) -> bool:
    return resources.get("CPU", 0.0) + 1e-9 >= cpus and resources.get("GPU", 0.0) + 1e-9 >= gpus


class _Slot:
    """One actor of the pool: starting (its `ready` probe pending), ready, or gone."""

    def __init__(self, index: int, actor, ready_ref, started: float):
        self.index, self.actor, self.ready_ref, self.started = index, actor, ready_ref, started
        self.ready = False
        self.gone = False
        self.node_id: str | None = None
        self.load = 0


def run_actor_pool(actor_cls, init_args: tuple, target: int, items: Sequence[tuple[str, Any]], submit,
                   on_result, on_failed, *, retries: int, in_flight: int, cpus: float, gpus: float,
                   placement_timeout_s: float, recover=None, what: str = "shard",
                   replan_interval_s: float = 5.0) -> dict[str, Any]:
    """Run `items` ((id, payload) pairs) on a pool of up to `target` Ray actors that survives
    the loss of actors and nodes.

    * An actor gets work only once its `ready()` probe answered (it was placed and built);
      one that is not placed within `placement_timeout_s` is killed and counted as
      unplaceable, so the job never waits on capacity that is gone.
    * An actor that dies (its node was removed, out of memory) takes its queued items with it:
      each is retried on the actors left (`retries` more attempts per item); `recover(id)` may
      first find that the dead actor committed the item before its answer came back.
    * The pool re-plans from what the cluster has *now*: a lost actor is replaced only when
      `ray.available_resources()` shows room for one (`cpus`, `gpus`); every
      `replan_interval_s` it also starts actors up to `target` if capacity came back.
    * With no actor alive and none placeable, the remaining items fail with the reason.

    `submit(actor, payload)` returns an ObjectRef; `on_result(id, result, node_id)` (once per
    id: a second answer is only counted, in "duplicate_results") and `on_failed(id, reason)`
    receive the outcomes. The constructor raising is a JobError (every
    replacement would fail the same way). Returns what happened, for the report."""
    import ray

    t0 = time.monotonic()
    slots: list[_Slot] = []
    pending = deque((key, payload, 0) for key, payload in items)
    inflight: dict[Any, tuple[_Slot, str, Any, int]] = {}
    events: dict[str, Any] = {"actors_started": 0, "actors_lost": [], "actors_unplaceable": 0, "retries": [],
                              "recovered": [], "nodes": {}, "duplicate_results": []}
    answered: set[str] = set()

    def deliver(key: str, result, node_id) -> None:
        if key in answered:  # never expected: an item is only re-sent after its attempt failed
            events["duplicate_results"].append(key)
            log.error("%s %s came back twice", what, key)
            return
        answered.add(key)
        on_result(key, result, node_id)

    def worker_died(exc) -> str:
        """Why an actor died; a constructor that raised is a JobError (any replacement would too)."""
        text = str(exc)
        if "creation task" in text and not _node_died(text):
            raise JobError(f"a worker failed to start: {_cause_line(text)}") from None
        return _cause_line(text) or type(exc).__name__

    max_starts = target * (retries + 2)  # replacements are bounded: never a restart loop

    def start() -> None:
        actor = actor_cls.remote(*init_args)
        slots.append(_Slot(len(slots), actor, actor.ready.remote(), time.monotonic()))
        events["actors_started"] += 1

    def live() -> list[_Slot]:
        return [s for s in slots if not s.gone]

    def lose(slot: _Slot, reason: str, holding: str | None = None) -> None:
        if slot.gone:
            return
        slot.gone = True
        queued = sorted([key for s, key, _, _ in inflight.values() if s is slot] + [holding] * bool(holding))
        events["actors_lost"].append({"actor": slot.index, "node_id": slot.node_id, "reason": reason,
                                      "lost_" + what + "s": queued, "at_s": round(time.monotonic() - t0, 2)})
        log.warning("actor %d on node %s lost (%s); %d %s(s) in its queue go back to the others", slot.index,
                    (slot.node_id or "?")[:12], reason, len(queued), what)
        try:
            ray.kill(slot.actor)
        except Exception:  # already gone with its node
            pass

    def retry_or_fail(key: str, payload, attempt: int, reason: str) -> None:
        if recover is not None:
            got = recover(key)
            if got is not None:  # the dead actor finished it before its answer was lost
                events["recovered"].append(key)
                deliver(key, got, None)
                return
        if attempt < retries:
            log.warning("%s %s failed (attempt %d of %d), retrying: %s", what, key, attempt + 1, retries + 1, reason)
            events["retries"].append({what: key, "attempt": attempt + 1, "reason": reason})
            pending.append((key, payload, attempt + 1))
        else:
            log.error("%s %s failed after %d attempts: %s", what, key, attempt + 1, reason)
            on_failed(key, reason)

    def room() -> bool:
        try:
            return _free(ray.available_resources(), cpus, gpus)
        except Exception:
            return False

    for _ in range(target):
        start()
    last_replan = time.monotonic()
    try:
        while pending or inflight:
            # A fair share per live actor (starting ones included), so that the first actor up
            # does not take every item of a small job; never below 1, so no ready actor idles.
            share = -(-(len(pending) + len(inflight)) // max(1, len(live())))
            cap = min(in_flight, max(1, share))
            for slot in sorted((s for s in slots if s.ready and not s.gone), key=lambda s: s.load):
                while pending and slot.load < cap:
                    key, payload, attempt = pending.popleft()
                    inflight[submit(slot.actor, payload)] = (slot, key, payload, attempt)
                    slot.load += 1
            starting = [s for s in live() if not s.ready]
            if not inflight and not starting:
                # Nobody is left to do the work: start one if it can be placed, else give up.
                if pending and events["actors_started"] < max_starts and room():
                    log.info("no actor left: starting one on the capacity that is free")
                    start()
                    continue
                free = ray.available_resources()
                reason = (f"no worker can be placed: every actor was lost ({events['actors_started']} started) "
                          f"and the cluster has "
                          f"{free.get('CPU', 0):g} CPU / {free.get('GPU', 0):g} GPU free "
                          f"(an actor needs {cpus:g} CPU" + (f", {gpus:g} GPU" if gpus else "") + ")")
                log.error("%s; %d %s(s) left undone (rerun to resume)", reason, len(pending), what)
                while pending:
                    key, _, _ = pending.popleft()
                    on_failed(key, reason)
                break
            now = time.monotonic()
            deadlines = [s.started + placement_timeout_s for s in starting]
            timeout = max(0.05, min([replan_interval_s] + [d - now for d in deadlines]))
            ready_refs = {s.ready_ref: s for s in starting}
            done, _ = ray.wait(list(inflight) + list(ready_refs), num_returns=1, timeout=timeout)
            for ref in done:
                if ref in ready_refs:
                    slot = ready_refs[ref]
                    try:
                        info = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        lose(slot, f"died while starting: {worker_died(exc)}")
                        continue
                    slot.ready, slot.node_id = True, info.get("node_id")
                    events["nodes"].setdefault(slot.node_id, 0)
                    log.info("actor %d ready on node %s after %.1f s", slot.index, slot.node_id,
                             time.monotonic() - slot.started)
                    continue
                slot, key, payload, attempt = inflight.pop(ref)
                slot.load -= 1
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    reason = worker_died(exc)
                    lose(slot, reason, key)
                    retry_or_fail(key, payload, attempt, f"worker died: {reason}")
                    continue
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    first = str(cause).splitlines()[0] if str(cause) else ""
                    retry_or_fail(key, payload, attempt, f"{type(cause).__name__}: {first}")
                    continue
                except ray.exceptions.RayError as exc:  # object lost, owner died, ...
                    retry_or_fail(key, payload, attempt, f"{type(exc).__name__}: {_cause_line(str(exc))}")
                    continue
                events["nodes"][slot.node_id] = events["nodes"].get(slot.node_id, 0) + 1
                deliver(key, result, slot.node_id)
            now = time.monotonic()
            for slot in [s for s in live() if not s.ready]:
                if now - slot.started > placement_timeout_s:
                    events["actors_unplaceable"] += 1
                    slot.gone = True
                    log.warning("actor %d was not placed within %.0f s (the cluster lacks %g CPU%s free): "
                                "going on without it", slot.index, placement_timeout_s, cpus,
                                f" / {gpus:g} GPU" if gpus else "")
                    ray.kill(slot.actor)
            if now - last_replan >= replan_interval_s or (events["actors_lost"] and now - last_replan >= 0.5):
                last_replan = now
                alive = live()
                if (len(alive) < target and pending and not any(not s.ready for s in alive)
                        and events["actors_started"] < max_starts
                        and len(pending) > sum(in_flight - s.load for s in alive if s.ready) and room()):
                    log.info("re-plan: %d actor(s) alive of %d planned, and the cluster has room: starting one",
                             len(alive), target)
                    start()
    finally:
        for slot in slots:
            try:
                ray.kill(slot.actor)
            except Exception:
                pass
    events["actors_final"] = len([s for s in slots if s.ready and not s.gone])
    events["nodes"] = {k: v for k, v in events["nodes"].items() if k}
    return events


def _run_on_ray(cfg: CompressConfig, todo: list[ShardSpec], job: dict[str, Any], progress: _Progress,
                done: dict[str, dict], failed: dict[str, str]) -> dict[str, Any]:
    import ray

    plan = _ray_resources(cfg, len(todo))
    n_actors, use_gpu = plan.actors, plan.use_gpu
    job = {**job, "use_gpu": use_gpu}
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    archive = A.Archive(job["output"], job["storage_options"])
    if len(nodes) > 1 and archive.local:
        log.warning("the output %s is a local path but the cluster has %d nodes: each node writes its shards "
                    "to its own disk unless that path is a shared filesystem", job["output"], len(nodes))
    actor_cls = ray.remote(ShardWorker).options(num_cpus=cfg.ray.cpus_per_actor, num_gpus=plan.gpu_per_actor,
                                                max_restarts=0, runtime_env=actor_runtime_env())
    log.info("%d shard(s) to compress on %d actor(s) (%g CPU each, %s)", len(todo), n_actors,
             cfg.ray.cpus_per_actor, plan.description)
    specs = {spec.shard: spec for spec in todo}

    def on_result(shard: str, stats: dict, node_id) -> None:
        done[shard] = stats
        progress.update(stats)

    def on_failed(shard: str, reason: str) -> None:
        failed[shard] = reason

    def recover(shard: str) -> dict | None:
        """A shard whose actor died may have been committed just before: take its stats."""
        try:
            archive.fs.invalidate_cache()
            stats = json.loads(archive.fs.cat_file(archive.shard_path(shard, ".stats.json")))
        except Exception:  # not there (the usual case), or unreadable: redo the shard
            return None
        ok = stats.get("fingerprint") == specs[shard].fingerprint and stats.get("settings") == settings_of(job)
        return stats if ok else None

    events = run_actor_pool(
        actor_cls, (job,), n_actors, [(spec.shard, spec.to_dict()) for spec in todo],
        lambda actor, payload: actor.process.remote(payload), on_result, on_failed,
        retries=cfg.ray.shard_retries, in_flight=cfg.ray.shards_in_flight, cpus=cfg.ray.cpus_per_actor,
        gpus=plan.gpu_per_actor, placement_timeout_s=cfg.ray.placement_timeout_s, recover=recover)
    return {"actors": n_actors, "use_gpu": use_gpu, "cpus_per_actor": cfg.ray.cpus_per_actor, "nodes": len(nodes),
            "faults": events}


class JobError(RuntimeError):
    """The job cannot go on (e.g. its workers cannot start); completed shards are kept."""


def _cause_line(text: str) -> str:
    """The most telling line of a Ray error: the last line that names an exception."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
    return (named or lines or [""])[-1]


def _check_resume(planned: dict[str, ShardSpec], completed: dict[str, dict], settings: dict[str, Any]) -> None:
    for shard, stats in sorted(completed.items()):
        spec = planned.get(shard)
        if spec is None:
            raise ConfigError(f"the archive holds shard {shard}, which the current input does not produce "
                              "(the input changed): use --overwrite to start again")
        if stats.get("fingerprint") != spec.fingerprint:
            raise ConfigError(f"shard {shard} in the archive was written from different input than the current "
                              f"listing gives ({spec.root}): use --overwrite to start again")
        if stats.get("settings") != settings:
            theirs = stats.get("settings", {})
            diff = sorted(k for k in settings if theirs.get(k) != settings[k])
            raise ConfigError(f"shard {shard} in the archive was written with different settings ({', '.join(diff)}): "
                              "use the same model and settings to resume, or --overwrite to start again")


def _spread_small_corpus(cfg: CompressConfig, shards: list[ShardSpec], overwrite: bool) -> tuple[list[ShardSpec], int]:
    """(shards, shard size used). A corpus that `shard_size` cuts into fewer shards than the
    cluster has actors is cut finer, so that no actor idles (4 images would otherwise be one
    shard on one actor). Each image's bitstream is the same whatever the split. A resumed run
    reuses the size its archive's shards were planned with (recorded in their stats), so that
    it plans the same shards on any cluster."""
    from .sources import plan_shards_with_size

    replan = lambda size, least=1: plan_shards_with_size(cfg.input, size, cfg.storage_options,
                                                        cfg.parquet_image_column, cfg.parquet_key_column, least)
    if not overwrite:
        done = A.Archive(cfg.output, cfg.storage_options).completed_shards()
        if done:
            sizes = {s.get("plan_shard_size") or cfg.shard_size for s in done.values()}
            size = sizes.pop() if len(sizes) == 1 else cfg.shard_size
            return (shards, cfg.shard_size) if size == cfg.shard_size else replan(size)
    if not cfg.ray.enabled:
        return shards, cfg.shard_size
    import ray

    connect_ray(cfg)
    resources = ray.cluster_resources()
    actors = plan_actors(cfg.ray, int(resources.get("GPU", 0)), resources.get("CPU", 0), 1 << 30).actors
    if len(shards) >= actors:
        return shards, cfg.shard_size
    spread, size = replan(cfg.shard_size, actors)
    log.info("small corpus: %d shard(s) of up to %d for %d actor(s) instead of %d of up to %d",
             len(spread), size, actors, len(shards), cfg.shard_size)
    return spread, size


def _is_archive(archive: A.Archive) -> bool:
    """An m2t archive, or a folder where a job took the lease and died before writing more."""
    from .lease import LEASE

    return archive.looks_like_archive() or archive.fs.exists(archive.path(LEASE))


def _clear_for_overwrite(archive: A.Archive) -> None:
    """--overwrite: delete everything in the archive but the lease this job holds."""
    from .lease import LEASE

    archive.fs.invalidate_cache()
    for path in archive.fs.ls(archive.root, detail=False):
        if path.rstrip("/").rsplit("/", 1)[-1] != LEASE:
            archive.fs.rm(path, recursive=True)
    archive.fs.invalidate_cache()


def _remove_stale_temporaries(archive: A.Archive) -> list[str]:
    """Temporary files (`*.tmp`) left by earlier jobs (killed drivers, orphaned workers).
    Only called while this job holds the lease, before its own workers start and after they
    stopped: every temporary then is someone else's leftover."""
    archive.fs.invalidate_cache()
    gone = []
    for folder in (archive.root, archive.path(A.SHARDS_DIR)):
        if not archive.fs.exists(folder):
            continue
        for path in archive.fs.ls(folder, detail=False):
            if path.endswith(".tmp"):
                try:
                    archive.fs.rm(path)
                    gone.append(path.rsplit("/", 1)[-1])
                except FileNotFoundError:  # an orphaned worker's abort removed it first
                    pass
    archive.fs.invalidate_cache()
    if gone:
        log.info("removed %d temporary file(s) left by earlier runs: %s", len(gone), ", ".join(sorted(gone)[:10]))
    return sorted(gone)


def _verify_shard_streams(archive: A.Archive, shard: str, size: int) -> str | None:
    """CRC-check every bitstream of a committed shard against its index; the reason if not."""
    import pyarrow.parquet as pq

    try:
        with archive.fs.open(archive.shard_path(shard, ".parquet"), "rb") as f:
            rows = pq.read_table(f, columns=["key", "offset", "length", "crc32", "status"]).to_pylist()
    except Exception as exc:
        return f"its index cannot be read ({type(exc).__name__}: {exc})"
    data = archive.fs.cat_file(archive.shard_path(shard, ".bin"))
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
        return (f"{len(bad)} of {sum(r['status'] == 'ok' for r in rows)} bitstream(s) fail the CRC-32 of the index "
                f"(first: {bad[0]!r})")
    if covered != len(data):
        return f"its .bin holds {len(data)} bytes, its index's bitstreams {covered}"
    return None


def _check_committed(archive: A.Archive, completed: dict[str, dict], verify: bool) -> dict[str, str]:
    """shard -> why it is damaged, for committed shards (with a stats file) whose data is not
    what their stats and index say. Always (one listing): the .bin and index exist and the
    .bin has the size the stats record. With `verify`: every bitstream's CRC-32 too."""
    if not completed:
        return {}
    archive.fs.invalidate_cache()
    folder = archive.path(A.SHARDS_DIR)
    sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size") for e in archive.fs.ls(folder, detail=True)}
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
            for shard, reason in zip(rest, pool.map(lambda s: _verify_shard_streams(archive, s, sizes[f"{s}.bin"]), rest)):
                if reason:
                    damaged[shard] = reason
    return damaged


def _forget_shards(archive: A.Archive, damaged: Mapping[str, str]) -> None:
    """Unmark damaged shards (their stats go; the rest is redone from scratch) and drop the
    archive-level index and manifest, which described them: they are rewritten when every
    shard is complete again."""
    for shard, reason in sorted(damaged.items()):
        log.warning("shard %s is damaged: %s; it will be redone", shard, reason)
        path = archive.shard_path(shard, ".stats.json")
        if archive.fs.exists(path):
            archive.fs.rm(path)
    for name in (A.MANIFEST, A.KEYS_INDEX):
        if archive.fs.exists(archive.path(name)):
            archive.fs.rm(archive.path(name))
    archive.fs.invalidate_cache()


def summarize(shard_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals and the field's figures over completed shards."""
    from m2t_core.metrics import psnr_from_mse

    keys = ("images", "ok", "error", "duplicate", "source_bytes", "compressed_bytes", "pixels",
            "sum_bpp", "sum_psnr", "psnr_images", "sum_mse", "mse_images")
    t = {k: sum(s[k] for s in shard_stats) for k in keys}
    ok = t["ok"]
    return {
        "images": t["images"], "ok": ok, "error": t["error"], "duplicate": t["duplicate"],
        "failed": t["error"] + t["duplicate"],
        "source_bytes": t["source_bytes"], "compressed_bytes": t["compressed_bytes"], "pixels": t["pixels"],
        "bpp_mean": t["sum_bpp"] / ok if ok else None,  # mean over images of each image's bpp
        "bpp_total": 8.0 * t["compressed_bytes"] / t["pixels"] if t["pixels"] else None,  # all bits / all pixels
        "psnr_mean": t["sum_psnr"] / t["psnr_images"] if t["psnr_images"] else None,
        "psnr_of_mean_mse": psnr_from_mse(t["sum_mse"] / t["mse_images"]) if t["mse_images"] else None,
        "compression_ratio": t["source_bytes"] / t["compressed_bytes"] if t["compressed_bytes"] else None,
        "ratio_vs_raw_rgb": 24.0 * t["pixels"] / (8.0 * t["compressed_bytes"]) if t["compressed_bytes"] else None,
    }


def compress_dataset(cfg: CompressConfig, overwrite: bool = False, progress: bool = True,
                     break_lease: bool = False) -> tuple[dict, int]:
    """Run the job; returns (report, exit code). Raises ConfigError / SourceError for usage
    errors, LeaseHeldError when another job holds the archive's lease (`break_lease`: take over
    a stale one), LeaseLostError when this job lost it while running. The lease is released
    when the job ends, also on errors."""
    leases: list[ArchiveLease] = []
    try:
        return _compress_dataset(cfg, overwrite, progress, break_lease, leases)
    finally:
        for lease in leases:
            lease.release()


def _compress_dataset(cfg: CompressConfig, overwrite: bool, progress: bool, break_lease: bool,
                      leases: list[ArchiveLease]) -> tuple[dict, int]:
    cfg.check_complete()
    inputs = [cfg.input] if isinstance(cfg.input, str) else list(cfg.input)
    cfg = dataclasses.replace(cfg, input=[absolute_url(u) for u in inputs], output=absolute_url(cfg.output),
                              model=_model_source(cfg.model))
    for url in cfg.input:
        # The archive's own .parquet index files would become inputs of a resumed run.
        if (cfg.output.rstrip("/") + "/").startswith(url.rstrip("/") + "/"):
            raise ConfigError(f"output {cfg.output} is inside the input {url}: choose an output outside it")
    t_start = time.perf_counter()
    # The driver loads the model too: its identity goes into every shard's stats and the manifest.
    device = cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = A.open_model(cfg.model, device="cpu", storage_options=cfg.storage_options)
    job = {
        "output": cfg.output, "storage_options": cfg.storage_options, "model_source": cfg.model,
        "model_id": model.model_id, "weights_sha256": model.weights_digest().hex(),
        "window_batch": cfg.window_batch, "max_pixels": cfg.max_pixels, "compute_psnr": cfg.compute_psnr,
        "batch_images": cfg.batch_images, "coding_threads": cfg.coding_threads,
        "max_source_bytes": cfg.max_source_bytes, "prefetch": cfg.prefetch, "torch_threads": cfg.torch_threads,
        "cpus_per_actor": cfg.ray.cpus_per_actor, "use_gpu": False, "shard_retries": cfg.ray.shard_retries,
    }
    settings = settings_of(job)

    shards = plan_shards(cfg.input, cfg.shard_size, cfg.storage_options, cfg.parquet_image_column,
                         cfg.parquet_key_column)
    shards, job["plan_shard_size"] = _spread_small_corpus(cfg, shards, overwrite)
    # Only now that the model and the input are known good may an old archive be deleted.
    archive = A.Archive(cfg.output, cfg.storage_options)
    if archive.exists() and not archive.is_empty() and not _is_archive(archive):
        raise ConfigError(f"--overwrite: {cfg.output} exists and is not an m2t archive; refusing to delete it"
                          if overwrite else f"output {cfg.output} exists, is not empty and is not an m2t archive")
    # One writer at a time: the lease comes before anything in the archive is deleted or written.
    lease = ArchiveLease(cfg.output, cfg.storage_options, timeout_s=cfg.lease_timeout_s, break_stale=break_lease)
    leases.append(lease.acquire())
    job["lease_owner"] = lease.owner  # fencing: workers check it before each commit step
    if overwrite and archive.exists():
        log.info("--overwrite: deleting %s", cfg.output)
        _clear_for_overwrite(archive)
    stale_tmp = _remove_stale_temporaries(archive)

    planned = {s.shard: s for s in shards}
    completed = archive.completed_shards()
    _check_resume(planned, completed, settings)
    # Resume trusts no marker blindly: a committed shard whose data is gone or changed is redone.
    damaged = _check_committed(archive, completed, cfg.verify_existing)
    if damaged:
        _forget_shards(archive, damaged)
        completed = {k: v for k, v in completed.items() if k not in damaged}
    todo = [s for s in shards if s.shard not in completed]
    skipped = len(shards) - len(todo)
    if cfg.max_shards:
        todo = todo[:cfg.max_shards]
    log.info("%d shard(s) planned from %s; %d already done; %d to do now%s", len(shards), ", ".join(cfg.input),
             skipped, len(todo), f" ({len(damaged)} of them damaged: redone)" if damaged else "")

    done: dict[str, dict] = {}
    failed: dict[str, str] = {}
    bar = _Progress(len(todo), progress)
    runner: dict[str, Any] = {"ray": cfg.ray.enabled}
    interrupted = False
    if todo and cfg.ray.enabled:
        connect_ray(cfg)  # before the clock starts: a local cluster takes seconds to start
    t_run = time.perf_counter()
    try:
        if not todo:
            pass
        elif cfg.ray.enabled:
            runner.update(_run_on_ray(cfg, todo, job, bar, done, failed))
        else:
            runner.update({"device": device})
            _run_in_process(todo, {**job, "use_gpu": device.startswith("cuda")}, device, bar, done, failed)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: completed shards are kept; run the same command again to resume")
    finally:
        bar.close()
    run_s = time.perf_counter() - t_run

    # This job's workers have stopped. Before it writes anything more: is the lease still ours?
    # Then temporaries left meanwhile (by orphaned workers of an earlier job, fenced off) go,
    # and every committed shard is checked once more (cheap), so that a write which raced the
    # lease's hand-over, or another job's, cannot end up in a complete archive.
    lease.check()
    stale_tmp += _remove_stale_temporaries(archive)
    on_disk = archive.completed_shards()
    late = _check_committed(archive, {k: v for k, v in on_disk.items() if k in planned}, verify=False)
    late.update({k: "its stats were written with other settings or input (by another job)" for k, v in on_disk.items()
                 if k in planned and k not in late and (v.get("settings") != settings
                                                        or v.get("fingerprint") != planned[k].fingerprint)})
    if late:
        _forget_shards(archive, late)
        damaged.update(late)
        done = {k: v for k, v in done.items() if k not in late}
    completed = {**{k: v for k, v in on_disk.items() if k not in late}, **done}
    all_stats = [completed[s.shard] for s in shards if s.shard in completed]
    complete = len(all_stats) == len(shards)
    totals = summarize(all_stats)
    this_run = list(done.values())
    run_images = sum(s["images"] for s in this_run)
    run_pixels = sum(s["pixels"] for s in this_run)
    failures = [f for s in all_stats for f in s.get("failures", [])][:20]
    report = {
        "input": cfg.input, "output": cfg.output, "model": model.model_id, "complete": complete,
        "shards": {"planned": len(shards), "completed": len(all_stats), "this_run": len(done),
                   "already_done": skipped, "failed": failed,
                   "remaining": len(shards) - len(all_stats),
                   # committed shards whose data was missing or changed (redone this run, unless
                   # found after it: then rerun); `verified`: their bitstreams were CRC-checked
                   "damaged": damaged, "verified": cfg.verify_existing},
                   "stale_temporaries_removed": len(stale_tmp),
                   "lease": {"owner": lease.owner, "timeout_s": cfg.lease_timeout_s,
                             "broke_stale_lease_of": lease.broken.describe() if lease.broken else None},
        "totals": totals,
        "this_run": {"images": run_images, "megapixels": run_pixels / 1e6, "seconds": run_s,
                     "images_per_s": run_images / run_s if run_s > 0 and run_images else None,
                     "megapixels_per_s": run_pixels / 1e6 / run_s if run_s > 0 and run_images else None,
                     "model_s": sum(s["model_s"] for s in this_run), "runner": runner},
        "wall_s": None, "failure_examples": failures, "finished_at": A.now_iso(),
        # Ray runs: actors lost with their node, shards retried, actors that could not be placed.
        "faults": runner.pop("faults", None),
    }
    if complete:
        keys = A.write_keys_index(archive, [s.shard for s in shards])
        manifest = {
            "format": A.ARCHIVE_FORMAT, "archive_version": A.ARCHIVE_VERSION, "created": A.now_iso(),
            "model": {"id": model.model_id, "source": cfg.model, "weights_sha256": job["weights_sha256"],
                      "weights_hash": model.weights_hash().hex(), "config": model.cfg.to_dict()},
            "bitstream_format_version": bitstream.FORMAT_VERSION, "code_version": A.code_version(),
            # Format 2 streams decode on any machine (exact integer entropy model).
            "portable": bitstream.FORMAT_VERSION in bitstream.PORTABLE_VERSIONS,
            "config": {**cfg.to_dict(), "storage_options": redact(cfg.storage_options)}, "keys_index": A.KEYS_INDEX, "keys": keys,
            "shards": [{"shard": s.shard, "kind": s.kind, "fingerprint": s.fingerprint,
                        "images": completed[s.shard]["images"], "ok": completed[s.shard]["ok"],
                        "bytes": completed[s.shard]["compressed_bytes"],
                        "numerics": completed[s.shard].get("numerics")} for s in shards],
            "totals": totals,
        }
        archive.write_json(archive.path(A.MANIFEST), manifest)
    if not complete or interrupted:
        code = EXIT_INCOMPLETE
    elif totals["failed"]:
        code = EXIT_FAILED_IMAGES
    else:
        code = EXIT_OK
    report["exit_code"] = code
    report["wall_s"] = time.perf_counter() - t_start
    archive.write_json(archive.path(A.REPORT), report)
    return report, code


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def format_report(report: dict[str, Any]) -> str:
    t, sh, run = report["totals"], report["shards"], report["this_run"]
    failed_note = f", {len(sh['failed'])} FAILED" if sh["failed"] else ""
    lines = [
        f"m2t compress: {', '.join(report['input'])} -> {report['output']}  (model {report['model']})",
        f"{'shards':<14}{sh['completed']} / {sh['planned']} complete ({sh['this_run']} this run, "
        f"{sh['already_done']} already done{failed_note})",
        f"{'images':<14}{t['images']}  ok {t['ok']}  error {t['error']}  duplicate {t['duplicate']}",
        f"{'bpp':<14}{_fmt(t['bpp_mean'], '.4f')} mean per image   {_fmt(t['bpp_total'], '.4f')} total bits / total pixels",
        f"{'PSNR':<14}{_fmt(t['psnr_mean'], '.2f', ' dB')} mean per image   "
        f"{_fmt(t['psnr_of_mean_mse'], '.2f', ' dB')} of the mean MSE",
        f"{'compression':<14}{_fmt(t['compression_ratio'], '.2f', 'x')} vs source bytes "
        f"({_mb(t['source_bytes'])} -> {_mb(t['compressed_bytes'])})   "
        f"{_fmt(t['ratio_vs_raw_rgb'], '.1f', 'x')} vs 24-bit RGB",
        f"{'throughput':<14}{_fmt(run['images_per_s'], '.2f')} images/s   {_fmt(run['megapixels_per_s'], '.3f')} MP/s"
        f"   (this run: {run['images']} images in {_hms(run['seconds'])})",
        f"{'wall time':<14}{_hms(report['wall_s'])}",
    ]
    faults = report.get("faults")
    if faults and (faults["actors_lost"] or faults["retries"] or faults["actors_unplaceable"]):
        lost_nodes = sorted({(a["node_id"] or "?")[:12] for a in faults["actors_lost"]})
        lines.append(f"{'faults':<14}{len(faults['actors_lost'])} actor(s) lost"
                     + (f" (node {', '.join(lost_nodes)})" if lost_nodes else "")
                     + f", {len(faults['retries'])} shard retr{'y' if len(faults['retries']) == 1 else 'ies'}"
                     + f" ({', '.join(sorted({r['shard'] for r in faults['retries']}))})" * bool(faults["retries"])
                     + (f", {faults['actors_unplaceable']} actor(s) not placeable" if faults["actors_unplaceable"] else "")
                     + f"; {faults['actors_final']} actor(s) at the end")
    if sh.get("damaged"):
        lines.append(f"damaged shards found ({len(sh['damaged'])}; redone, or rerun to redo them"
                     f"{'' if sh.get('verified') else '; --verify-existing also checks every bitstream'}):")
        lines += [f"  {shard}: {reason}" for shard, reason in sorted(sh["damaged"].items())]
    if sh["failed"]:
        lines.append("failed shards (rerun to retry):")
        lines += [f"  {shard}: {reason}" for shard, reason in sorted(sh["failed"].items())]
    if report["failure_examples"]:
        lines.append(f"inputs not archived (first {len(report['failure_examples'])}; all are in the index):")
        lines += [f"  {f['status']:<9} {f['key']}: {f['error']}" for f in report["failure_examples"]]
    if not report["complete"]:
        lines.append(f"INCOMPLETE: {sh['remaining']} shard(s) to go; run the same command again to resume")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `m2t compress` (also used to check deployment manifests' entrypoints)."""
    parser = argparse.ArgumentParser(
        prog="m2t compress", description="Compress an image corpus (folders, .tar shards, Parquet) into an m2t archive.",
        epilog="exit codes: 0 all archived; 1 complete but some inputs failed (see report.json); "
               "2 usage/config error; 3 incomplete (rerun to resume)")
    parser.add_argument("paths", nargs="*", metavar="INPUT ... OUTPUT",
                        help="input URLs then the archive URL (or `input` and `output` in the config)")
    parser.add_argument("--config", default=None, help=f"job config YAML (defaults: {DEFAULT_CONFIG.name})")
    parser.add_argument("--model", default=None, help="registry name, checkpoint path or URL")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (dotted keys for nested, YAML values); repeatable")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing archive at OUTPUT first")
    parser.add_argument("--no-ray", action="store_true", help="compress in this process, without Ray")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verify-existing", action="store_true",
                        help="resume: CRC-check every bitstream of the shards already done (reads them all); "
                             "damaged shards are redone (sizes are always checked)")
    parser.add_argument("--break-lease", action="store_true",
                        help="take over the archive's lease if it is stale (its job died: no heartbeat for "
                             "lease_timeout_s); a live job's lease is never broken")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`m2t compress INPUT [INPUT ...] OUTPUT [options]`; returns the exit code."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if len(args.paths) == 1:
            raise ConfigError("give INPUT ... OUTPUT (at least two paths), or none and `input`/`output` in the config")
        cfg = load_config(args.config, args.overrides)
        if args.paths:
            *inputs, output = args.paths
            cfg = dataclasses.replace(cfg, input=inputs[0] if len(inputs) == 1 else inputs, output=output)
        if args.model:
            cfg = dataclasses.replace(cfg, model=args.model)
        if args.no_ray:
            cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, enabled=False))
        if args.verify_existing:
            cfg = dataclasses.replace(cfg, verify_existing=True)
        report, code = compress_dataset(cfg, overwrite=args.overwrite, progress=not args.no_progress,
                                        break_lease=args.break_lease)
    except (ConfigError, SourceError, A.ArchiveError, FileNotFoundError) as exc:
        if os.environ.get("M2T_DEBUG"):
            raise
        print(f"m2t compress: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LeaseHeldError as exc:
        print(f"m2t compress: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LeaseLostError as exc:  # lost while running: another job took the archive over
        print(f"m2t compress: error: {exc} (this job stopped writing; its completed shards are kept)", file=sys.stderr)
        return EXIT_INCOMPLETE
    except LeaseError as exc:  # e.g. an unreadable lease file
        print(f"m2t compress: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except JobError as exc:
        print(f"m2t compress: error: {exc} (completed shards are kept; rerun to resume)", file=sys.stderr)
        return EXIT_INCOMPLETE
    except (ModelNotFoundError, CheckpointError) as exc:
        print(f"m2t compress: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(format_report(report))
    print(f"report: {A.join_url(report['output'], A.REPORT)}")
    return code
