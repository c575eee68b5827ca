"""The compression job: a whole corpus -> an m2t archive, on a Ray actor pool (or in-process).

    python jobs/compress.py /data/photos /data/photos.m2t            # local Ray cluster
    m2t compress s3://bucket/shards s3://bucket/archive --config configs/pipeline/default.yaml \
        --set shard_size=512 --set ray.cpus_per_actor=2
    RAY_ADDRESS=... ray job submit --working-dir . -- python jobs/compress.py IN OUT

How it runs: a job on the skeleton of pipeline/jobs/runner.py (CompressJob, run by run_job;
its config in compress_config.py, its printed report in compress_report.py):
  1. plan: the driver lists the inputs and cuts them into shards (pipeline/storage/sources.py),
     loads the model once to record its identity, takes the archive's lease, and skips shards
     whose stats file exists (resume; the archive's upkeep is pipeline/storage/archive.py's).
  2. A pool of actors, each holding a ShardWorker (the model), takes shards (at most
     `ray.shards_in_flight` queued per actor). A worker streams its shard's images through a
     small prefetch thread (read + decode overlap the model), encodes each image, measures the
     decoder's output, appends the bitstream to the shard's .bin, and writes the shard's index
     and stats. Only the small stats dict goes back to the driver (fold).
  3. report: when every shard is done, the driver writes keys.parquet and manifest.json; it
     always writes report.json and prints the report.

A bad input never stops the job: it becomes an index row with status "error" (or
"duplicate") and the reason. A shard whose worker fails (I/O error on the output, a dead
actor) is retried `ray.shard_retries` times, then reported. The actor pool
(pipeline/jobs/pools.py) survives lost nodes: it retries their shards on the actors left,
replaces a lost actor only where the cluster has room, never waits longer than
`ray.placement_timeout_s` for an actor to be placed, and the report's `faults` says what was
lost and retried.

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
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from m2t_core.config import ConfigError
from m2t_core import bitstream
from m2t_core.allocator import keep_freed_memory

from pipeline.config import inputs_and_output, redact, without_retired  # noqa: F401 (redact: used by tests)
from pipeline.jobs.compress_config import DEFAULT_CONFIG, CompressConfig, RayOptions, load_config  # noqa: F401
from pipeline.jobs.compress_config import model_source
from pipeline.jobs.compress_report import format_report, summarize  # noqa: F401 (format_report: for callers)
from pipeline.errors import run_main
from pipeline.storage import archive as A
from pipeline.jobs.runner import EXIT_INCOMPLETE, EXIT_ISSUES, EXIT_OK, EXIT_USAGE  # noqa: F401 (the job's exit codes)
from pipeline.jobs.runner import Item, Job, Placement, Report, Run, cluster_actors, peak_rss_mib, run_job
from pipeline.storage.integrity import file_sha256, sign_manifest, stream_digest
from pipeline.storage.lease import ArchiveLease, check_holder
from pipeline.storage.sources import ShardSpec, SourceItem, iter_shard, plan_shards

log = logging.getLogger(__name__)

EXIT_FAILED_IMAGES = EXIT_ISSUES  # 0 / 1 / 2 / 3: see the docstring and runner.exit_code
FAILURE_EXAMPLES = 10  # per shard stats; the report shows up to 20 overall


@dataclass(frozen=True)
class ShardSettings:
    """What a compression worker needs: the same for every shard of a job."""

    output: str  # the archive's URL
    storage_options: dict
    model_source: str
    model_id: str
    weights_sha256: str  # the driver's model: a worker that loads other weights refuses to start
    max_pixels: int
    compute_psnr: bool
    batch_images: int  # 0: by device (stage_settings)
    coding_threads: int  # -1: by device (stage_settings)
    max_source_bytes: int
    prefetch: int
    torch_threads: int  # 0: the actor's CPUs on Ray, PyTorch's default in process
    cpus_per_actor: float
    lease_owner: str | None = None  # fencing: a worker writes only while this owner holds the lease
    plan_shard_size: int | None = None  # the shard size the shards were planned with (resume)
    node_id: str | None = None  # the worker's Ray node (recorded in each shard's stats)
    quality: float | None = None  # a variable-rate model's quality (None: its default; fixed-rate: None)
    format_version: int | None = None  # the streams' format (None: the model's own; weights_sha256 is its digest)
    refine_steps: int = 0  # latent refinement per image (m2t_core/refine.py; 0: off)


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


def settings_of(job: ShardSettings) -> dict[str, Any]:
    """The settings that change an archive's bytes: a resumed run must use the same ones."""
    settings = {"model_id": job.model_id, "weights_sha256": job.weights_sha256, "max_pixels": job.max_pixels,
                "compute_psnr": job.compute_psnr}
    if job.quality is not None:  # a variable-rate model's (fixed-rate archives record none, as before)
        settings["quality"] = job.quality
    if job.refine_steps:  # archives without refinement record none, as before
        settings["refine_steps"] = job.refine_steps
    return settings


def same_settings(stats: Mapping[str, Any], settings: Mapping[str, Any]) -> bool:
    """Whether a shard's recorded settings are `settings` (keys retired since are not compared)."""
    return without_retired(stats.get("settings")) == settings


def _fence(job: ShardSettings, shard: str, step: str) -> None:
    """Raise LeaseLostError unless the job that sent this shard still holds the archive's lease
    (job.lease_owner): workers of a killed or superseded job must not write."""
    if job.lease_owner:
        check_holder(job.output, job.storage_options, job.lease_owner, what=f"shard {shard} not {step}")


class _NotCoded(Exception):
    """Stands in the Encoder's input for an item that is not coded (a duplicate, an input that
    could not be read): the Encoder passes it through in its place."""


_NOT_CODED = _NotCoded()


def stage_settings(job: ShardSettings, device: str) -> dict[str, int]:
    """The worker's batch size and coding threads: the job's, or (0 / -1) the defaults for
    its device: on a GPU, batches of 16 and every CPU of the actor but one coding."""
    gpu = device.startswith("cuda")
    batch = int(job.batch_images or 0) or (16 if gpu else 1)
    threads = int(job.coding_threads)
    if threads < 0:
        threads = max(1, int(job.cpus_per_actor or 1) - 1) if gpu else 1
    return {"batch_images": batch, "coding_threads": threads}


def compress_shard(model, spec: ShardSpec, job: ShardSettings) -> dict[str, Any]:
    """Compress one shard and write its .bin, index and (last) stats file; returns the stats.

    Three stages overlap: a thread reads and decodes images (`_prefetch`); the codec's Encoder
    runs the model on batches of `batch_images` (g_a, the entropy model's parameters for all
    their windows, g_s for PSNR) while `coding_threads` threads range-code the previous batch.
    Results come back, and are written, in input order. An image's bytes do not depend on the
    threads, nor on the batch on a CPU (which runs g_a one image at a time); a GPU's batched
    g_a may round a few latents differently (bench/batch_consistency.py)."""
    import pyarrow as pa
    from m2t_core import Encoder

    t0 = time.perf_counter()
    job = dataclasses.replace(job, **stage_settings(job, str(model.device)))
    archive = A.Archive(job.output, job.storage_options)
    _fence(job, spec.shard, "cleared")  # an orphaned worker of a stopped job stops here
    archive.clear_shard(spec.shard)
    rows: list[dict[str, Any]] = []
    totals = dict(images=0, ok=0, error=0, duplicate=0, source_bytes=0, compressed_bytes=0, pixels=0,
                  sum_bpp=0.0, sum_psnr=0.0, psnr_images=0, sum_mse=0.0, mse_images=0, model_s=0.0)
    failures: list[dict[str, str]] = []
    encoder = Encoder(model, batch_images=job.batch_images, coding_threads=job.coding_threads,
                      max_pixels=job.max_pixels, reconstruct=job.compute_psnr, quality=job.quality,
                      format_version=job.format_version, refine_steps=job.refine_steps)
    blob = archive.open_blob(spec.shard)
    try:
        decoded = _prefetch(iter_shard(spec, job.storage_options, job.max_source_bytes), job.max_pixels,
                            max(job.prefetch, job.batch_images))
        inputs = ((d, _NOT_CODED if d.rgb is None else d.rgb) for d in decoded)
        for d, result in encoder.encode_tagged(inputs):
            row = _index_row(spec.shard, d)
            if isinstance(result, _NotCoded):
                pass
            elif isinstance(result, Exception):
                row["status"], row["error"] = "error", f"encoding failed: {_image_error(result)}"
            else:
                _add_stream(row, result, d.rgb, blob, totals)
            if row["status"] != "ok":
                totals[row["status"]] += 1
                if len(failures) < FAILURE_EXAMPLES:
                    failures.append({k: row[k] for k in ("key", "source", "status", "error")})
            totals["images"] += 1
            rows.append(row)
        totals["model_s"] = encoder.device_seconds
        _fence(job, spec.shard, "committed")
        blob.commit()
    except BaseException:
        blob.abort()
        raise
    index_sha256 = archive.write_table(archive.shard_path(spec.shard, ".parquet"),
                                       pa.Table.from_pylist(rows, schema=A.index_schema()))
    stats = {
        "shard": spec.shard, "kind": spec.kind, "fingerprint": spec.fingerprint, "settings": settings_of(job),
        # What the manifest records of the shard's files, and `m2t verify` checks (tamper evidence).
        "sha256": {"bin": blob.digest.hexdigest(), "parquet": index_sha256},
        **totals, "wall_s": time.perf_counter() - t0, "failures": failures,
        "worker": f"{socket.gethostname()}:{os.getpid()}", "node_id": job.node_id,
        "plan_shard_size": job.plan_shard_size,
        # What decides the decoded pixels: the integer g_s (m2t >= 0.4), the same on every
        # machine, thread count and batch; verify compares decoded_crc32 wherever these match.
        "numerics": model.numerics(),
        "peak_rss_mib": peak_rss_mib(), "finished_at": A.now_iso(),
    }
    _fence(job, spec.shard, "marked complete")
    archive.commit_stats(spec.shard, stats)  # last: marks completion
    return stats


def _index_row(shard: str, d: _Decoded) -> dict[str, Any]:
    """An input's index row before coding (archive.index_schema())."""
    height, width = d.rgb.shape[:2] if d.rgb is not None else (None, None)
    return dict(key=d.item.key, source=d.item.source, shard=shard, offset=None, length=None, height=height,
                width=width, source_bytes=d.item.source_bytes, bpp=None, psnr=None, mse=None, crc32=None,
                decoded_crc32=None, status=d.item.status, error=d.item.error or None, step_ends=None, digest=None)


def _add_stream(row: dict[str, Any], encoded, rgb: np.ndarray, blob, totals: dict[str, Any]) -> None:
    """Append an image's bitstream to the shard's blob and fill its row and the totals (a failed
    write to the archive fails the shard, not the image)."""
    from m2t_core.metrics import mse as mse_of, psnr_from_mse

    data = encoded.bitstream
    row.update(offset=blob.append(data), length=len(data), bpp=encoded.bpp, crc32=zlib.crc32(data),
               step_ends=list(bitstream.read_header(data).step_ends), digest=stream_digest(row["key"], data))
    totals["ok"] += 1
    totals["source_bytes"] += row["source_bytes"]
    totals["compressed_bytes"] += len(data)
    totals["pixels"] += encoded.height * encoded.width
    totals["sum_bpp"] += encoded.bpp
    if encoded.x_hat is not None:
        err = mse_of(rgb, encoded.x_hat)
        quality = psnr_from_mse(err)
        row.update(mse=err, psnr=quality, decoded_crc32=zlib.crc32(np.ascontiguousarray(encoded.x_hat).tobytes()))
        totals["sum_mse"] += err
        totals["mse_images"] += 1
        if math.isfinite(quality):
            totals["sum_psnr"] += quality
            totals["psnr_images"] += 1


class ShardWorker:
    """A compression worker (on a Ray actor, or once in process): loads the model once, then
    compresses the shards it is given."""

    def __init__(self, settings: ShardSettings, placement: Placement):
        import torch

        threads = settings.torch_threads or (max(1, int(placement.cpus)) if placement.ray else 0)
        if threads:
            torch.set_num_threads(threads)
        keep_freed_memory()
        self.settings = dataclasses.replace(settings, node_id=placement.node_id)
        self.model = A.open_model(settings.model_source, device=placement.device,
                                  storage_options=settings.storage_options)
        digest = self.model.weights_digest(settings.format_version).hex()
        if digest != settings.weights_sha256:
            raise RuntimeError(f"{socket.gethostname()}: model {settings.model_source!r} has weights {digest[:16]}..., "
                               f"the driver's has {settings.weights_sha256[:16]}...: the nodes do not see the same file")

    def process(self, spec: dict[str, Any]) -> dict[str, Any]:
        return compress_shard(self.model, ShardSpec.from_dict(spec), self.settings)


# ====================================================================== the job (driver side)


def _check_resume(planned: dict[str, ShardSpec], completed: dict[str, dict], settings: dict[str, Any]) -> None:
    for shard, stats in sorted(completed.items()):
        spec = planned.get(shard)
        if spec is None:
            raise ConfigError(f"the archive holds shard {shard}, which the current input does not produce "
                              "(the input changed): use --overwrite to start again")
        if stats.get("fingerprint") != spec.fingerprint:
            raise ConfigError(f"shard {shard} in the archive was written from different input than the current "
                              f"listing gives ({spec.root}): use --overwrite to start again")
        if not same_settings(stats, settings):
            theirs = without_retired(stats.get("settings")) or {}
            diff = sorted(k for k in settings if theirs.get(k) != settings[k])
            hint = (" (the weights digest names the bitstream format too: an archive of m2t 0.6-0.7 resumes with "
                    "--set format_version=5)" if "weights_sha256" in diff else "")
            raise ConfigError(f"shard {shard} in the archive was written with different settings ({', '.join(diff)})"
                              f"{hint}: use the same model and settings to resume, or --overwrite to start again")


class CompressJob(Job):
    """m2t compress on the runner's skeleton: plan (model, shards, lease, resume checks), fold
    each shard's stats, report (late checks, keys index, manifest, report.json)."""

    name, what = "compress", "shard"
    worker = ShardWorker

    def __init__(self, cfg: CompressConfig, overwrite: bool = False, break_lease: bool = False,
                 progress: bool = True, sign_key: bytes | None = None):
        super().__init__()
        self.sign_key = sign_key  # signs the manifest (HMAC-SHA256); never written anywhere
        cfg.check_complete()
        inputs, output = inputs_and_output(cfg.input, cfg.output)  # the archive's .parquet files are no inputs
        cfg = dataclasses.replace(cfg, input=inputs, output=output, model=model_source(cfg.model))
        self.cfg, self.overwrite, self.break_lease = cfg, overwrite, break_lease
        self.options = cfg.run_options(progress)
        self.archive = A.Archive(cfg.output, cfg.storage_options)
        self.local_output = cfg.output if self.archive.local else None
        self.lease: ArchiveLease | None = None
        self.done: dict[str, dict] = {}  # this run's shards: their stats

    # -------------------------------------------------------------- plan

    def plan(self) -> list[Item]:
        cfg, archive = self.cfg, self.archive
        # The driver loads the model too: its identity goes into every shard's stats and the manifest.
        self.model = A.open_model(cfg.model, device="cpu", storage_options=cfg.storage_options)
        try:  # a variable-rate model's quality, resolved (its default made explicit); fixed-rate: none
            code = self.model.quality_code(cfg.quality)
        except ValueError as exc:
            raise ConfigError(f"quality: {exc}") from None
        quality = None if code is None else code / bitstream.QUALITY_ONE
        try:  # the streams' format: the model's own unless asked for (decoders of earlier releases)
            version = self.model.write_version(cfg.format_version)
        except ValueError as exc:
            raise ConfigError(f"format_version: {exc}") from None
        if cfg.refine_steps:
            from m2t_core import refine

            try:  # refinement needs an M2T model and the lambda it was trained for
                refine.model_lambda(self.model, code)
            except refine.RefineError as exc:
                raise ConfigError(f"refine_steps: {exc}") from None
        shards = plan_shards(cfg.input, cfg.shard_size, cfg.storage_options, cfg.parquet_image_column,
                             cfg.parquet_key_column)
        shards, plan_size = self._spread_small_corpus(shards)
        # Only now that the model and the input are known good may an old archive be deleted.
        if archive.exists() and not archive.is_empty() and not archive.is_archive():
            raise ConfigError(f"--overwrite: {cfg.output} exists and is not an m2t archive; refusing to delete it"
                              if self.overwrite else f"output {cfg.output} exists, is not empty and is not an m2t archive")
        # One writer at a time: the lease comes before anything in the archive is deleted or written.
        lease = ArchiveLease(cfg.output, cfg.storage_options, timeout_s=cfg.lease_timeout_s, break_stale=self.break_lease)
        self.lease = lease.acquire()
        if self.overwrite and archive.exists():
            log.info("--overwrite: deleting %s", cfg.output)
            archive.clear_for_overwrite()
        self.stale_tmp = archive.remove_stale_temporaries()
        self.settings = ShardSettings(
            output=cfg.output, storage_options=cfg.storage_options, model_source=cfg.model,
            model_id=self.model.model_id, weights_sha256=self.model.weights_digest(version).hex(),
            max_pixels=cfg.max_pixels, compute_psnr=cfg.compute_psnr, batch_images=cfg.batch_images,
            coding_threads=cfg.coding_threads, max_source_bytes=cfg.max_source_bytes, prefetch=cfg.prefetch,
            torch_threads=cfg.torch_threads, cpus_per_actor=cfg.ray.cpus_per_actor,
            lease_owner=lease.owner, plan_shard_size=plan_size,  # fencing: workers check the owner before commits
            quality=quality, format_version=version, refine_steps=cfg.refine_steps)
        self.shards, self.planned = shards, {s.shard: s for s in shards}
        completed = archive.completed_shards()
        _check_resume(self.planned, completed, settings_of(self.settings))
        # Resume trusts no marker blindly: a committed shard whose data is gone or changed is redone.
        self.damaged = archive.check_committed(completed, cfg.verify_existing)
        if self.damaged:
            archive.forget_shards(self.damaged)
            completed = {k: v for k, v in completed.items() if k not in self.damaged}
        todo = [s for s in shards if s.shard not in completed]
        self.skipped = len(shards) - len(todo)
        if cfg.max_shards:
            todo = todo[:cfg.max_shards]
        log.info("%d shard(s) planned from %s; %d already done; %d to do now%s", len(shards), ", ".join(cfg.input),
                 self.skipped, len(todo), f" ({len(self.damaged)} of them damaged: redone)" if self.damaged else "")
        return [Item(s.shard, s.to_dict(), s.planned_images) for s in todo]

    def _spread_small_corpus(self, shards: list[ShardSpec]) -> tuple[list[ShardSpec], int]:
        """(shards, shard size used). A corpus that `shard_size` cuts into fewer shards than the
        cluster has actors is cut finer, so that no actor idles (4 images would otherwise be one
        shard on one actor). Each image's bitstream is the same whatever the split. A resumed run
        reuses the size its archive's shards were planned with (recorded in their stats), so that
        it plans the same shards on any cluster."""
        from pipeline.storage.sources import plan_shards_with_size

        cfg = self.cfg
        replan = lambda size, least=1: plan_shards_with_size(cfg.input, size, cfg.storage_options,
                                                            cfg.parquet_image_column, cfg.parquet_key_column, least)
        if not self.overwrite:
            done = self.archive.completed_shards()
            if done:
                sizes = {s.get("plan_shard_size") or cfg.shard_size for s in done.values()}
                size = sizes.pop() if len(sizes) == 1 else cfg.shard_size
                return (shards, cfg.shard_size) if size == cfg.shard_size else replan(size)
        if not cfg.ray.enabled:
            return shards, cfg.shard_size
        actors = cluster_actors(self.options)
        if len(shards) >= actors:
            return shards, cfg.shard_size
        spread, size = replan(cfg.shard_size, actors)
        log.info("small corpus: %d shard(s) of up to %d for %d actor(s) instead of %d of up to %d",
                 len(spread), size, actors, len(shards), cfg.shard_size)
        return spread, size

    # -------------------------------------------------------------- run

    def fold(self, shard: str, stats: dict) -> tuple[int, int]:
        self.done[shard] = stats
        return stats["images"], stats["error"] + stats["duplicate"]

    def recover(self, shard: str) -> dict | None:
        """A shard whose actor died may have been committed just before: take its stats."""
        stats = self.archive.shard_stats(shard)
        ok = (isinstance(stats, dict) and stats.get("fingerprint") == self.planned[shard].fingerprint
              and same_settings(stats, settings_of(self.settings)))
        return stats if ok else None

    # -------------------------------------------------------------- report

    def _committed_after_run(self) -> dict[str, dict]:
        """Every committed shard's stats, checked once more now that this job's workers have
        stopped: is the lease still ours? Then temporaries left meanwhile (by orphaned workers of
        an earlier job, fenced off) go, and every committed shard is checked again (cheap), so
        that a write which raced the lease's hand-over, or another job's, cannot end up in a
        complete archive."""
        archive, settings = self.archive, settings_of(self.settings)
        self.lease.check()
        self.stale_tmp += archive.remove_stale_temporaries()
        on_disk = {k: v for k, v in archive.completed_shards().items() if k in self.planned}
        late = archive.check_committed(on_disk, verify=False)
        late.update({k: "its stats were written with other settings or input (by another job)"
                     for k, v in on_disk.items() if k not in late
                     and (not same_settings(v, settings) or v.get("fingerprint") != self.planned[k].fingerprint)})
        if late:
            archive.forget_shards(late)
            self.damaged.update(late)
            self.done = {k: v for k, v in self.done.items() if k not in late}
        return {**{k: v for k, v in on_disk.items() if k not in late}, **self.done}

    def report(self, run: Run) -> Report:
        cfg, shards = self.cfg, self.shards
        completed = self._committed_after_run()
        all_stats = [completed[s.shard] for s in shards if s.shard in completed]
        complete = len(all_stats) == len(shards)
        totals = summarize(all_stats)
        this_run = list(self.done.values())
        run_images = sum(s["images"] for s in this_run)
        run_pixels = sum(s["pixels"] for s in this_run)
        report = {
            "input": cfg.input, "output": cfg.output, "model": self.model.model_id, "complete": complete,
            "shards": {"planned": len(shards), "completed": len(all_stats), "this_run": len(self.done),
                       "already_done": self.skipped, "failed": run.failed, "remaining": len(shards) - len(all_stats),
                       # committed shards whose data was missing or changed (redone this run, unless
                       # found after it: then rerun); `verified`: their bitstreams were CRC-checked
                       "damaged": self.damaged, "verified": cfg.verify_existing},
            "stale_temporaries_removed": len(self.stale_tmp),
            "lease": {"owner": self.lease.owner, "timeout_s": cfg.lease_timeout_s,
                      "broke_stale_lease_of": self.lease.broken.describe() if self.lease.broken else None},
            "totals": totals,
            "this_run": {"images": run_images, "megapixels": run_pixels / 1e6, "seconds": run.seconds,
                         "images_per_s": run_images / run.seconds if run.seconds > 0 and run_images else None,
                         "megapixels_per_s": run_pixels / 1e6 / run.seconds if run.seconds > 0 and run_images else None,
                         "model_s": sum(s["model_s"] for s in this_run), "runner": run.runner},
            "wall_s": None, "failure_examples": [f for s in all_stats for f in s.get("failures", [])][:20],
            "finished_at": A.now_iso(),
            # Ray runs: actors lost with their node, shards retried, actors that could not be placed.
            "faults": run.faults,
        }
        if complete:
            self._write_manifest(completed, totals)
        return Report(report, complete, totals["failed"])

    def _write_manifest(self, completed: dict[str, dict], totals: dict[str, Any]) -> None:
        cfg, model, archive = self.cfg, self.model, self.archive
        keys, keys_sha256 = archive.write_keys_index([s.shard for s in self.shards])
        manifest = {
            "format": A.ARCHIVE_FORMAT, "archive_version": A.ARCHIVE_VERSION, "created": A.now_iso(),
            "model": {"id": model.model_id, "source": cfg.model, "weights_sha256": self.settings.weights_sha256,
                      "weights_hash": model.weights_hash(self.settings.format_version).hex(),
                      "config": model.cfg.to_dict()},
            "bitstream_format_version": self.settings.format_version, "code_version": A.code_version(),
            # The streams decode on any machine (exact integer entropy model).
            "portable": True,
            "config": {**cfg.to_dict(), "storage_options": redact(cfg.storage_options)},
            "keys_index": A.KEYS_INDEX, "keys": keys, "keys_sha256": keys_sha256,
            "shards": [{"shard": s.shard, "kind": s.kind, "fingerprint": s.fingerprint,
                        "images": completed[s.shard]["images"], "ok": completed[s.shard]["ok"],
                        "bytes": completed[s.shard]["compressed_bytes"],
                        "sha256": self._shard_digests(s.shard, completed[s.shard]),
                        "numerics": completed[s.shard].get("numerics")} for s in self.shards],
            "totals": totals,
        }
        if self.sign_key is not None:
            manifest = sign_manifest(manifest, self.sign_key)
        archive.write_json(archive.path(A.MANIFEST), manifest)

    def _shard_digests(self, shard: str, stats: Mapping[str, Any]) -> dict[str, str]:
        """The SHA-256 of a shard's .bin and .parquet: from its stats, or (a shard written
        before stats recorded them, resumed) hashed now."""
        recorded = stats.get("sha256")
        if isinstance(recorded, dict) and all(isinstance(recorded.get(n), str) for n in ("bin", "parquet")):
            return {"bin": recorded["bin"], "parquet": recorded["parquet"]}
        return {n: file_sha256(self.archive, self.archive.shard_path(shard, f".{n}")) for n in ("bin", "parquet")}

    def save(self, report: dict[str, Any]) -> None:
        self.archive.write_json(self.archive.path(A.REPORT), report)


def compress_dataset(cfg: CompressConfig, overwrite: bool = False, progress: bool = True,
                     break_lease: bool = False, sign_key: bytes | None = None) -> tuple[dict, int]:
    """Run the job; returns (report, exit code). Raises ConfigError / SourceError for usage
    errors, LeaseHeldError when another job holds the archive's lease (`break_lease`: take over
    a stale one), LeaseLostError when this job lost it while running. The lease is released
    when the job ends, also on errors. `sign_key`: sign the manifest (pipeline/storage/integrity.py)."""
    job = CompressJob(cfg, overwrite, break_lease, progress, sign_key)
    try:
        return run_job(job, job.options)
    finally:
        if job.lease is not None:
            job.lease.release()


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
    parser.add_argument("--sign-key-file", default=None, metavar="PATH",
                        help="sign the manifest (HMAC-SHA256) with this key (default: $M2T_SIGN_KEY if set); "
                             "verify / get given the key then refuse a changed archive")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`m2t compress INPUT [INPUT ...] OUTPUT [options]`; returns the exit code."""
    args = build_parser().parse_args(argv)
    return run_main("m2t compress", lambda: _main(args), logs=True)


def _main(args: argparse.Namespace) -> int:
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
    from pipeline.storage.integrity import sign_key

    report, code = compress_dataset(cfg, overwrite=args.overwrite, progress=not args.no_progress,
                                    break_lease=args.break_lease, sign_key=sign_key(args.sign_key_file))
    print(format_report(report))
    print(f"report: {A.join_url(report['output'], A.REPORT)}")
    return code
