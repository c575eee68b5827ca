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
actor) is retried `ray.shard_retries` times, then reported.

Exit codes: 0 every input archived; 1 the archive is complete but some inputs are not in it
(status error or duplicate: see report.json and the index); 2 usage or configuration error;
3 the archive is incomplete (shards failed, the run was stopped by max_shards, or
interrupted): run the same command again to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from m2t_core.config import ConfigError, load_config_file
from m2t_core.registry import DEFAULT_MODEL, CheckpointError, ModelNotFoundError
from m2t_core import bitstream

from . import archive as A
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
    prefetch: int = 2  # decoded images queued ahead of the model, per actor
    torch_threads: int = 0  # 0: cpus_per_actor (at least 1) on Ray; PyTorch's default in-process
    device: str = "auto"  # in-process runs: "auto" (cuda if available), "cpu", "cuda"
    parquet_image_column: Any = None  # null: auto (image, jpg, png, ... binary or {bytes, path})
    parquet_key_column: Any = None  # null: auto (key, path, ... or the image struct's path)
    storage_options: dict = field(default_factory=dict)  # per protocol: {s3: {endpoint_url: ...}}
    max_shards: int = 0  # > 0: stop after this many shards in this run (resume later)
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
                        rgb = load_image(item.data, max_pixels=max_pixels)
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


def compress_shard(model, spec: ShardSpec, job: Mapping[str, Any]) -> dict[str, Any]:
    """Compress one shard and write its .bin, index and (last) stats file; returns the stats."""
    import pyarrow as pa
    from m2t_core.metrics import mse as mse_of, psnr_from_mse

    t0 = time.perf_counter()
    archive = A.Archive(job["output"], job["storage_options"])
    archive.clear_shard(spec.shard)
    rows: list[dict[str, Any]] = []
    totals = dict(images=0, ok=0, error=0, duplicate=0, source_bytes=0, compressed_bytes=0, pixels=0,
                  sum_bpp=0.0, sum_psnr=0.0, psnr_images=0, sum_mse=0.0, mse_images=0, model_s=0.0)
    failures: list[dict[str, str]] = []
    blob = archive.open_blob(spec.shard)
    try:
        items = iter_shard(spec, job["storage_options"], job["max_source_bytes"])
        for decoded in _prefetch(items, job["max_pixels"], job["prefetch"]):
            item, rgb = decoded.item, decoded.rgb
            row = dict(key=item.key, source=item.source, shard=spec.shard, offset=None, length=None,
                       height=None, width=None, source_bytes=item.source_bytes, bpp=None, psnr=None,
                       mse=None, crc32=None, decoded_crc32=None, status=item.status, error=item.error or None)
            encoded = recon = None
            if rgb is not None:
                row["height"], row["width"] = int(rgb.shape[0]), int(rgb.shape[1])
                t_model = time.perf_counter()
                try:
                    encoded = model.encode_image(rgb, window_batch=job["window_batch"], max_pixels=job["max_pixels"])
                    recon = model.reconstruct(encoded) if job["compute_psnr"] else None
                except Exception as exc:  # e.g. ImageTooLargeError for a side over 65535
                    row["status"], row["error"] = "error", f"encoding failed: {exc}"
                totals["model_s"] += time.perf_counter() - t_model
            if encoded is not None:
                data = encoded.bitstream
                # Outside the try above: a failed write to the archive fails the shard, not the image.
                row.update(offset=blob.append(data), length=len(data), bpp=encoded.bpp, crc32=zlib.crc32(data))
                totals["ok"] += 1
                totals["source_bytes"] += item.source_bytes
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
        blob.commit()
    except BaseException:
        blob.abort()
        raise
    archive.write_table(archive.shard_path(spec.shard, ".parquet"),
                        pa.Table.from_pylist(rows, schema=A.index_schema()))
    stats = {
        "shard": spec.shard, "kind": spec.kind, "fingerprint": spec.fingerprint, "settings": settings_of(job),
        **totals, "wall_s": time.perf_counter() - t0, "failures": failures,
        "worker": f"{socket.gethostname()}:{os.getpid()}", "peak_rss_mib": peak_rss_mib(),
        "finished_at": A.now_iso(),
    }
    archive.write_json(archive.shard_path(spec.shard, ".stats.json"), stats)  # last: marks completion
    return stats


class ShardWorker:
    """A Ray actor: loads the model once, then compresses the shards it is given."""

    def __init__(self, job: dict[str, Any]):
        import torch

        threads = job["torch_threads"] or max(1, int(job["cpus_per_actor"]))
        torch.set_num_threads(threads)
        logging.basicConfig(level=logging.INFO)
        self.job = job
        device = "cuda" if job["use_gpu"] else "cpu"
        self.model = A.open_model(job["model_source"], device=device, storage_options=job["storage_options"])
        digest = self.model.weights_digest().hex()
        if digest != job["weights_sha256"]:
            raise RuntimeError(f"{socket.gethostname()}: model {job['model_source']!r} has weights {digest[:16]}..., "
                               f"the driver's has {job['weights_sha256'][:16]}...: the nodes do not see the same file")

    def process(self, spec: dict[str, Any]) -> dict[str, Any]:
        return compress_shard(self.model, ShardSpec.from_dict(spec), self.job)


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


def _run_on_ray(cfg: CompressConfig, todo: list[ShardSpec], job: dict[str, Any], progress: _Progress,
                done: dict[str, dict], failed: dict[str, str]) -> dict[str, Any]:
    import ray

    plan = _ray_resources(cfg, len(todo))
    n_actors, use_gpu = plan.actors, plan.use_gpu
    job = {**job, "use_gpu": use_gpu}
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and A.Archive(job["output"], job["storage_options"]).local:
        log.warning("the output %s is a local path but the cluster has %d nodes: each node writes its shards "
                    "to its own disk unless that path is a shared filesystem", job["output"], len(nodes))
    actor_cls = ray.remote(ShardWorker).options(num_cpus=cfg.ray.cpus_per_actor, num_gpus=plan.gpu_per_actor,
                                                max_restarts=0, runtime_env=actor_runtime_env())
    actors = [actor_cls.remote(job) for _ in range(n_actors)]
    log.info("%d shard(s) to compress on %d actor(s) (%g CPU each, %s)", len(todo), n_actors,
             cfg.ray.cpus_per_actor, plan.description)
    pending = deque((spec, 0) for spec in todo)
    inflight: dict[Any, tuple[int, Any, ShardSpec, int]] = {}  # ref -> (actor slot, actor, spec, attempt)
    load = [0] * n_actors

    def retry_or_fail(spec: ShardSpec, attempt: int, reason: str) -> None:
        if attempt < cfg.ray.shard_retries:
            log.warning("shard %s failed (attempt %d of %d), retrying: %s", spec.shard, attempt + 1,
                        cfg.ray.shard_retries + 1, reason)
            pending.append((spec, attempt + 1))
        else:
            log.error("shard %s failed after %d attempts: %s", spec.shard, attempt + 1, reason)
            failed[spec.shard] = reason

    try:
        while pending or inflight:
            for slot in range(n_actors):
                while pending and load[slot] < cfg.ray.shards_in_flight:
                    spec, attempt = pending.popleft()
                    inflight[actors[slot].process.remote(spec.to_dict())] = (slot, actors[slot], spec, attempt)
                    load[slot] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                slot, actor, spec, attempt = inflight.pop(ref)
                load[slot] -= 1
                try:
                    stats = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    text = str(exc)
                    if "creation task" in text:
                        # The constructor failed (model not loadable, weights differ): every
                        # replacement would fail the same way, so stop here with its reason.
                        raise JobError(f"a worker failed to start: {_cause_line(text)}") from None
                    # The actor died (out of memory, node lost): replace it once, retry its shards.
                    retry_or_fail(spec, attempt, f"worker died: {_cause_line(text) or type(exc).__name__}")
                    if actors[slot] is actor:
                        ray.kill(actor)
                        actors[slot] = actor_cls.remote(job)
                    continue
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    retry_or_fail(spec, attempt, f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
                    continue
                failed.pop(spec.shard, None)
                done[spec.shard] = stats
                progress.update(stats)
    finally:
        for actor in actors:
            ray.kill(actor)
    return {"actors": n_actors, "use_gpu": use_gpu, "cpus_per_actor": cfg.ray.cpus_per_actor, "nodes": len(nodes)}


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


def compress_dataset(cfg: CompressConfig, overwrite: bool = False, progress: bool = True) -> tuple[dict, int]:
    """Run the job; returns (report, exit code). Raises ConfigError / SourceError for usage errors."""
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
        "max_source_bytes": cfg.max_source_bytes, "prefetch": cfg.prefetch, "torch_threads": cfg.torch_threads,
        "cpus_per_actor": cfg.ray.cpus_per_actor, "use_gpu": False, "shard_retries": cfg.ray.shard_retries,
    }
    settings = settings_of(job)

    shards = plan_shards(cfg.input, cfg.shard_size, cfg.storage_options, cfg.parquet_image_column,
                         cfg.parquet_key_column)
    # Only now that the model and the input are known good may an old archive be deleted.
    archive = A.Archive(cfg.output, cfg.storage_options)
    if overwrite and archive.exists():
        if not (archive.is_empty() or archive.looks_like_archive()):
            raise ConfigError(f"--overwrite: {cfg.output} exists and is not an m2t archive; refusing to delete it")
        log.info("--overwrite: deleting %s", cfg.output)
        archive.delete()
    elif archive.exists() and not archive.is_empty() and not archive.looks_like_archive():
        raise ConfigError(f"output {cfg.output} exists, is not empty and is not an m2t archive")

    planned = {s.shard: s for s in shards}
    completed = archive.completed_shards()
    _check_resume(planned, completed, settings)
    todo = [s for s in shards if s.shard not in completed]
    skipped = len(shards) - len(todo)
    if cfg.max_shards:
        todo = todo[:cfg.max_shards]
    log.info("%d shard(s) planned from %s; %d already done; %d to do now", len(shards), ", ".join(cfg.input),
             skipped, len(todo))

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

    completed = {**archive.completed_shards(), **done}
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
                   "remaining": len(shards) - len(all_stats)},
        "totals": totals,
        "this_run": {"images": run_images, "megapixels": run_pixels / 1e6, "seconds": run_s,
                     "images_per_s": run_images / run_s if run_s > 0 and run_images else None,
                     "megapixels_per_s": run_pixels / 1e6 / run_s if run_s > 0 and run_images else None,
                     "model_s": sum(s["model_s"] for s in this_run), "runner": runner},
        "wall_s": None, "failure_examples": failures, "finished_at": A.now_iso(),
    }
    if complete:
        keys = A.write_keys_index(archive, [s.shard for s in shards])
        manifest = {
            "format": A.ARCHIVE_FORMAT, "archive_version": A.ARCHIVE_VERSION, "created": A.now_iso(),
            "model": {"id": model.model_id, "source": cfg.model, "weights_sha256": job["weights_sha256"],
                      "weights_hash": model.weights_hash().hex(), "config": model.cfg.to_dict()},
            "bitstream_format_version": bitstream.FORMAT_VERSION, "code_version": A.code_version(),
            "config": {**cfg.to_dict(), "storage_options": redact(cfg.storage_options)}, "keys_index": A.KEYS_INDEX, "keys": keys,
            "shards": [{"shard": s.shard, "kind": s.kind, "fingerprint": s.fingerprint,
                        "images": completed[s.shard]["images"], "ok": completed[s.shard]["ok"],
                        "bytes": completed[s.shard]["compressed_bytes"]} for s in shards],
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
    if sh["failed"]:
        lines.append("failed shards (rerun to retry):")
        lines += [f"  {shard}: {reason}" for shard, reason in sorted(sh["failed"].items())]
    if report["failure_examples"]:
        lines.append(f"inputs not archived (first {len(report['failure_examples'])}; all are in the index):")
        lines += [f"  {f['status']:<9} {f['key']}: {f['error']}" for f in report["failure_examples"]]
    if not report["complete"]:
        lines.append(f"INCOMPLETE: {sh['remaining']} shard(s) to go; run the same command again to resume")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`m2t compress INPUT [INPUT ...] OUTPUT [options]`; returns the exit code."""
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
    args = parser.parse_args(argv)
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
        report, code = compress_dataset(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    except (ConfigError, SourceError, A.ArchiveError, FileNotFoundError) as exc:
        if os.environ.get("M2T_DEBUG"):
            raise
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
