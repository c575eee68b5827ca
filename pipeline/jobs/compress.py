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
actor) is retried `ray.shard_retries` times, then reported. The actor pool (pipeline/runner.py)
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from m2t_core.config import ConfigError, load_config_file
from m2t_core.registry import DEFAULT_MODEL, CheckpointError, ModelNotFoundError
from m2t_core import bitstream
from m2t_core.codec import code_plan

from pipeline.storage import archive as A
from pipeline.jobs.runner import EXIT_INCOMPLETE, EXIT_ISSUES, EXIT_OK, EXIT_USAGE  # noqa: F401 (the job's exit codes)
from pipeline.jobs.runner import (JobError, PoolOptions, Progress, actor_class, connect_ray, exit_code, hms, peak_rss_mib,
                     plan_actors, plan_pool, ray_node_id, run_actor_pool, run_in_process)
from pipeline.storage.lease import ArchiveLease, LeaseError, LeaseHeldError, LeaseLostError, check_holder
from pipeline.storage.sources import ShardSpec, SourceError, SourceItem, iter_shard, plan_shards

log = logging.getLogger(__name__)

EXIT_FAILED_IMAGES = EXIT_ISSUES  # 0 / 1 / 2 / 3: see the docstring and runner.exit_code
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pipeline" / "default.yaml"
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
        # under the same numerics, never when g_s ran on batches (it rounds by batch shape);
        # the latent CRC is checked everywhere.
        "numerics": {**model.numerics(), **({"transform_batch": job["batch_images"]} if job["batch_images"] > 1 else {})},
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


# ====================================================================== the driver


def _pool_options(r: RayOptions) -> PoolOptions:
    return PoolOptions(address=r.address, actors=r.actors, cpus_per_actor=r.cpus_per_actor, use_gpu=r.use_gpu,
                       actors_per_gpu=r.actors_per_gpu, in_flight=r.shards_in_flight, retries=r.shard_retries,
                       placement_timeout_s=r.placement_timeout_s)


def _progress(todo: list[ShardSpec], enabled: bool) -> Progress:
    planned = [s.planned_images for s in todo]
    return Progress(len(todo), enabled, "compress",
                    total_images=sum(planned) if planned and None not in planned else None)


def _run_in_process(todo: list[ShardSpec], job: dict[str, Any], device: str, progress: Progress,
                    done: dict[str, dict], failed: dict[str, str]) -> None:
    import torch

    threads_before = torch.get_num_threads()
    if job["torch_threads"]:
        torch.set_num_threads(job["torch_threads"])
    try:
        model = A.open_model(job["model_source"], device=device, storage_options=job["storage_options"])

        def on_result(shard: str, stats: dict) -> None:
            done[shard] = stats
            progress.update(stats["images"], stats["error"] + stats["duplicate"])

        run_in_process([(spec.shard, spec) for spec in todo], lambda spec: compress_shard(model, spec, job),
                       on_result, failed.__setitem__, retries=job["shard_retries"])
    finally:
        torch.set_num_threads(threads_before)  # the caller's process keeps its own setting


def _run_on_ray(cfg: CompressConfig, todo: list[ShardSpec], job: dict[str, Any], progress: Progress,
                done: dict[str, dict], failed: dict[str, str]) -> dict[str, Any]:
    import ray

    options = _pool_options(cfg.ray)
    plan = plan_pool(options, len(todo))
    n_actors, use_gpu = plan.actors, plan.use_gpu
    job = {**job, "use_gpu": use_gpu}
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    archive = A.Archive(job["output"], job["storage_options"])
    if len(nodes) > 1 and archive.local:
        log.warning("the output %s is a local path but the cluster has %d nodes: each node writes its shards "
                    "to its own disk unless that path is a shared filesystem", job["output"], len(nodes))
    log.info("%d shard(s) to compress on %d actor(s) (%g CPU each, %s)", len(todo), n_actors,
             cfg.ray.cpus_per_actor, plan.description)
    specs = {spec.shard: spec for spec in todo}

    def on_result(shard: str, stats: dict, node_id) -> None:
        done[shard] = stats
        progress.update(stats["images"], stats["error"] + stats["duplicate"])

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
        actor_class(ShardWorker, options, plan), (job,), n_actors, [(spec.shard, spec.to_dict()) for spec in todo],
        lambda actor, payload: actor.process.remote(payload), on_result, on_failed,
        retries=options.retries, in_flight=options.in_flight, cpus=options.cpus_per_actor,
        gpus=plan.gpu_per_actor, placement_timeout_s=options.placement_timeout_s, recover=recover)
    return {"actors": n_actors, "use_gpu": use_gpu, "cpus_per_actor": cfg.ray.cpus_per_actor, "nodes": len(nodes),
            "faults": events}


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
    from pipeline.storage.sources import plan_shards_with_size

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

    connect_ray(cfg.ray.address)
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
    from pipeline.storage.lease import LEASE

    return archive.looks_like_archive() or archive.fs.exists(archive.path(LEASE))


def _clear_for_overwrite(archive: A.Archive) -> None:
    """--overwrite: delete everything in the archive but the lease this job holds."""
    from pipeline.storage.lease import LEASE

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
    bar = _progress(todo, progress)
    runner: dict[str, Any] = {"ray": cfg.ray.enabled}
    interrupted = False
    if todo and cfg.ray.enabled:
        connect_ray(cfg.ray.address)  # before the clock starts: a local cluster takes seconds to start
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
    code = exit_code(complete, interrupted=interrupted, issues=totals["failed"])
    report["exit_code"] = code
    report["wall_s"] = time.perf_counter() - t_start
    archive.write_json(archive.path(A.REPORT), report)
    return report, code


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


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
        f"   (this run: {run['images']} images in {hms(run['seconds'])})",
        f"{'wall time':<14}{hms(report['wall_s'])}",
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
