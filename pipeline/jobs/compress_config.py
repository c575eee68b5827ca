"""The compression job's config (configs/pipeline/default.yaml: every key with its default):
YAML and `--set key=value` into CompressConfig (pipeline/config.py: unknown keys are errors,
retired keys ignored with a warning), and the runner's options it gives (`run_options`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from m2t_core import bitstream
from m2t_core.config import ConfigError
from m2t_core.registry import DEFAULT_MODEL

from pipeline.config import absolute_url, check_shared_settings, load_job_config, need
from pipeline.jobs.runner import RunOptions

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pipeline" / "default.yaml"


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
    quality: Any = None  # a variable-rate model's quality in [1, K] (null: its middle level); fixed-rate: null
    # The bitstream format the archive's streams are written in (null: the model's own, 7 for a
    # fixed-rate model); 5 for decoders of m2t 0.6-0.7 (also resumes their archives), 4 for 0.4-0.5.
    format_version: Any = None
    # Gradient steps refining each image's latent before coding (m2t_core/refine.py): fewer bits
    # and a higher PSNR from the same decoder, each step costing about four plain encodes; 0: off.
    refine_steps: int = 0
    shard_size: int = 256  # images per shard (image files, Parquet rows); a tar is one shard
    max_pixels: int = 64_000_000  # larger images are refused (status error) before decoding
    max_source_bytes: int = 268_435_456  # larger files are refused before they are read
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
        for name in ("input", "output"):
            value = getattr(self, name)
            need(value is None or isinstance(value, str)
                 or (name == "input" and isinstance(value, list) and value and all(isinstance(v, str) for v in value)),
                 f"{name} must be a URL{' or a list of URLs' if name == 'input' else ''}, got {value!r}")
        need(isinstance(self.model, str) and bool(self.model), f"model must be a name, path or URL, got {self.model!r}")
        need(self.quality is None or (isinstance(self.quality, (int, float)) and not isinstance(self.quality, bool)),
             f"quality must be a number or null, got {self.quality!r}")
        need(self.format_version is None or (type(self.format_version) is int
                                             and self.format_version in bitstream.WRITABLE_VERSIONS),
             f"format_version must be null or one of {list(bitstream.WRITABLE_VERSIONS)}, got {self.format_version!r}")
        need(type(self.refine_steps) is int and 0 <= self.refine_steps <= 10_000,
             f"refine_steps must be an integer from 0 (off) to 10000, got {self.refine_steps!r}")
        for name in ("shard_size", "max_pixels", "max_source_bytes", "prefetch"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
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
        check_shared_settings(self)
        r = self.ray
        need(r.actors >= 0 and r.cpus_per_actor >= 0, "ray.actors and ray.cpus_per_actor must be >= 0")
        need(r.actors_per_gpu >= 0, "ray.actors_per_gpu must be >= 0")
        need(r.shards_in_flight >= 1 and r.shard_retries >= 0, "ray.shards_in_flight must be >= 1, ray.shard_retries >= 0")

    def check_complete(self) -> None:
        if not self.input:
            raise ConfigError("no input: give INPUT on the command line or `input` in the config")
        if not self.output:
            raise ConfigError("no output: give OUTPUT on the command line or `output` in the config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_options(self, progress: bool) -> RunOptions:
        r = self.ray
        return RunOptions(ray=r.enabled, address=r.address, actors=r.actors, cpus_per_actor=r.cpus_per_actor,
                          use_gpu=r.use_gpu, actors_per_gpu=r.actors_per_gpu, in_flight=r.shards_in_flight,
                          retries=r.shard_retries, placement_timeout_s=r.placement_timeout_s, device=self.device,
                          progress=progress)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> CompressConfig:
    """Read a config file (unknown keys are errors; retired ones ignored with a warning), then
    apply `key=value` overrides (dotted keys for nested fields, values parsed as YAML)."""
    return load_job_config(CompressConfig, path, overrides)


def model_source(spec: str) -> str:
    """A model given as a path made absolute (workers do not share the driver's directory)."""
    looks_like_path = spec.endswith(".safetensors") or os.sep in spec or "://" in spec
    return absolute_url(spec) if looks_like_path else spec
