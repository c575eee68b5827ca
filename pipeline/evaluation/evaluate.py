"""The evaluation job: rate-distortion of our models and classic codecs over whole datasets.

    m2t eval --data /data/kodak [URL ...] [--models all] [--baselines jpeg,webp,avif,jpeg2000,jxl] \
        [--anchor jpeg] OUTPUT_URL
    RAY_ADDRESS=... ray job submit --working-dir . -- python jobs/evaluate.py --data s3://b/clic s3://b/eval

Each data URL is one DATASET (a folder, glob, .tar shards or Parquet, read by
pipeline/sources.py). Its images are cut into shards of `shard_size`; the unit of work, retry
and resume is (shard x codec x rate points): one unit per shard for each classic codec (all its
quality points: each image is read once per codec) and one per shard for each of our models.
Units run as Ray tasks (`ray.cpus_per_task` CPUs each; our models on a GPU each where the
cluster has GPUs), or in this process with --no-ray. A worker process loads each model once
and keeps it for the units that follow.

Per image and rate point a row records the real bytes, bpp (8 x bytes / pixels), PSNR (RGB,
8-bit), MS-SSIM (where the short side is >= 161 px), encode and decode seconds, and a status:
"ok"; "error" (the codec raised, the decode had the wrong size, or the input could not be
read: the message says which); "mismatch" (our decoder's output differs from the encoder's
reconstruction); "duplicate" (a key seen before in the dataset). A failing codec never stops
the job; the report counts the failures.

Output (any fsspec URL):

    OUTPUT/parts/<dataset>.<shard>.<codec>.<group>.<hash>.parquet   one per unit, written when the
                 unit is done; <hash> covers the input shard, the codec's settings and library
                 version (or the model's weights), so a rerun recomputes only what is missing or
                 changed (parts of other settings are ignored, never merged)
    OUTPUT/per_image.parquet    every row of every planned unit, merged
    OUTPUT/codecs/<codec>.json  CompressAI-format results (means over images, by rate point)
    OUTPUT/rd_psnr.png, OUTPUT/rd_msssim.png   RD plots
    OUTPUT/report.md            BD-rate tables, per-point table, codec settings, failures
    OUTPUT/summary.json         command, machine, datasets, counts, aggregates, BD figures
                                (written by every run, complete or not)

With several datasets, the per-dataset files (codecs/, the plots) go under OUTPUT/<dataset>/.

Exit codes: 0 every row ok; 1 complete, but some rows failed (status error, mismatch or
duplicate); 2 usage or configuration error; 3 incomplete (a unit failed after retries, the run
was interrupted, or `max_units` stopped it): run the same command again to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import posixpath
import re
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from m2t_core.config import ConfigError, load_config_file
from m2t_core.registry import CheckpointError, ModelNotFoundError

from pipeline.storage import archive as A
from pipeline.evaluation import classic_codecs as CC
from pipeline.evaluation import rd
from pipeline.jobs.compress import absolute_url, redact
from pipeline.jobs.runner import EXIT_INCOMPLETE, EXIT_ISSUES, EXIT_OK, EXIT_USAGE  # noqa: F401 (the job's exit codes)
from pipeline.jobs.runner import Progress, connect_ray, exit_code, run_in_process, run_task_pool
from pipeline.storage.sources import ShardSpec, SourceError, iter_shard, plan_shards

log = logging.getLogger(__name__)

EXIT_FAILED_ROWS = EXIT_ISSUES  # 0 / 1 / 2 / 3: see the docstring and runner.exit_code
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pipeline" / "evaluate.yaml"
EVAL_VERSION = 1  # part of every unit's hash: bump when a row's meaning changes
PARTS_DIR = "parts"
PER_IMAGE = "per_image.parquet"
SUMMARY = "summary.json"
REPORT = "report.md"
FAILURE_EXAMPLES = 20
KODAK_KEY = re.compile(r"^kodim\d\d\.png$", re.IGNORECASE)


# ====================================================================== configuration


@dataclass
class RayOptions:
    enabled: bool = True  # false: run every unit in this process (small jobs, debugging)
    address: Any = None  # cluster to join; null: $RAY_ADDRESS if set, else start a local cluster
    cpus_per_task: float = 1.0  # CPUs reserved per unit task
    use_gpu: Any = None  # our models on GPUs: null: iff the cluster has GPUs; true / false to force
    tasks_in_flight: int = 0  # tasks submitted at once; 0: twice the cluster's CPUs
    unit_retries: int = 2  # a unit whose task failed is tried this many more times
    placement_timeout_s: float = 120.0  # a task no live node can run (its node is gone) is failed after this


@dataclass
class EvalConfig:
    data: Any = None  # fsspec URL or list of URLs; each URL is one dataset
    output: Any = None  # output URL (local folder or s3://bucket/prefix)
    models: Any = field(default_factory=lambda: "all")  # "all", "none", or names / checkpoint paths
    baselines: Any = field(default_factory=lambda: list(CC.ALL_BASELINES))  # "all", "none" or names
    anchor: str = "jpeg"  # the codec BD figures are taken against ("jpeg" = jpeg-420)
    shard_size: int = 16  # images per unit
    max_pixels: int = 64_000_000  # larger images are refused (status error) before decoding
    max_source_bytes: int = 268_435_456  # larger files are refused before they are read
    window_batch: int = 8  # our models: windows per transformer call
    ms_ssim: bool = True  # compute MS-SSIM (~0.15 s per Kodak image and rate point on a core)
    bd_method: str = "pchip"  # interpolation for BD figures: pchip, akima or cubic
    paper_reference: Any = field(default_factory=lambda: "auto")  # the paper's MT Kodak points: auto (24 kodimNN.png), true, false
    codec_threads: int = 1  # threads of the classic codecs and of torch in each task
    device: str = "auto"  # in-process runs: auto (cuda if available), cpu, cuda
    parquet_image_column: Any = None
    parquet_key_column: Any = None
    storage_options: dict = field(default_factory=dict)  # per protocol: {s3: {endpoint_url: ...}}
    max_units: int = 0  # > 0: stop after this many units in this run (resume later)
    ray: RayOptions = field(default_factory=RayOptions)

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.data is None or isinstance(self.data, str)
             or (isinstance(self.data, list) and self.data and all(isinstance(v, str) for v in self.data)),
             f"data must be a URL or a list of URLs, got {self.data!r}")
        need(self.output is None or isinstance(self.output, str), f"output must be a URL, got {self.output!r}")
        for name in ("models", "baselines"):
            value = getattr(self, name)
            need(isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)),
                 f"{name} must be 'all', 'none', a comma-separated string or a list of names, got {value!r}")
        try:
            CC.expand_baselines(self.baselines)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        need(isinstance(self.anchor, str) and bool(self.anchor), "anchor must be a codec name")
        for name in ("shard_size", "max_pixels", "max_source_bytes", "window_batch", "codec_threads"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.bd_method in rd.BD_METHODS, f"bd_method must be one of {rd.BD_METHODS}, got {self.bd_method!r}")
        need(self.paper_reference in ("auto", True, False), "paper_reference must be auto, true or false")
        need(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
             f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        need(self.max_units >= 0, "max_units must be >= 0")
        for name in ("parquet_image_column", "parquet_key_column"):
            need(getattr(self, name) is None or isinstance(getattr(self, name), str), f"{name} must be a column name")
        need(isinstance(self.storage_options, dict)
             and all(isinstance(v, dict) for v in self.storage_options.values()),
             "storage_options must map a protocol to a mapping of options, e.g. {s3: {endpoint_url: ...}}")
        r = self.ray
        need(r.address is None or isinstance(r.address, str), "ray.address must be a string or null")
        need(r.cpus_per_task > 0, "ray.cpus_per_task must be > 0")
        need(r.use_gpu in (None, True, False), "ray.use_gpu must be null, true or false")
        need(r.tasks_in_flight >= 0 and r.unit_retries >= 0, "ray.tasks_in_flight and ray.unit_retries must be >= 0")
        need(r.placement_timeout_s > 0, "ray.placement_timeout_s must be > 0")

    def check_complete(self) -> None:
        if not self.data:
            raise ConfigError("no data: give --data URL [URL ...] or `data` in the config")
        if not self.output:
            raise ConfigError("no output: give OUTPUT_URL on the command line or `output` in the config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> EvalConfig:
    """Read a config file (unknown keys are errors), then apply `key=value` overrides."""
    return load_config_file(EvalConfig, path, overrides)


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v for v in (p.strip() for p in value.split(",")) if v]
    return [str(v).strip() for v in value if str(v).strip()]


def resolve_anchor(anchor: str) -> str:
    """The codec an anchor name means: a group alias ("jpeg") means its first codec."""
    name = anchor.strip().lower()
    return CC.BASELINE_ALIASES.get(name, (anchor.strip(),))[0]


# ====================================================================== plan


def row_schema():
    import pyarrow as pa

    return pa.schema([
        ("dataset", pa.string()),
        ("key", pa.string()),  # the image's key in its dataset (pipeline/sources.py)
        ("source", pa.string()),
        ("shard", pa.string()),
        ("unit", pa.string()),
        ("codec", pa.string()),  # jpeg-420, ..., or one of our model families (m2t-small)
        ("kind", pa.string()),  # "ours" or "classic"
        ("point", pa.string()),  # the rate point: "q=30", "bpp=0.25", or our model's name
        ("point_index", pa.int32()),  # its position in the codec's sweep
        ("param", pa.float64()),  # quality or target bpp; null for our models
        ("model", pa.string()),  # our model's name (null for classic codecs)
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("pixels", pa.int64()),
        ("bytes", pa.int64()),  # the whole encoded file / bitstream, headers included
        ("bpp", pa.float64()),
        ("psnr", pa.float64()),  # RGB, 8-bit, dB
        ("mse", pa.float64()),
        ("ms_ssim", pa.float64()),  # null where the short side is < 161 px or ms_ssim is off
        ("encode_s", pa.float64()),
        ("decode_s", pa.float64()),
        ("device", pa.string()),  # where it was coded: cpu or cuda
        ("status", pa.string()),  # ok, error, mismatch, duplicate
        ("error", pa.string()),
        ("worker", pa.string()),
    ])


@dataclass
class Unit:
    dataset: str
    shard: ShardSpec
    codec: str
    kind: str  # "classic" or "ours"
    group: str  # "sweep" (a classic codec's whole sweep) or our model's name
    points: list[dict[str, Any]]  # [{point, index, param, model}]
    model: dict[str, Any] | None = None  # ours: {name, source, model_id, weights_sha256, mode}
    digest: str = ""
    cost: float = 1.0  # rough seconds per image, to start the longest units first

    @property
    def uid(self) -> str:
        return f"{self.dataset}.{self.shard.shard}.{self.codec}.{self.group}"

    @property
    def filename(self) -> str:
        return f"{self.uid}.{self.digest[:12]}.parquet"

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "shard": self.shard.to_dict(), "codec": self.codec, "kind": self.kind,
                "group": self.group, "points": self.points, "model": self.model, "digest": self.digest,
                "uid": self.uid, "filename": self.filename}


def _digest(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def dataset_names(urls: Sequence[str]) -> list[str]:
    """A short, unique, file-name-safe name per data URL: its last path component."""
    out: list[str] = []
    for url in urls:
        path = url.split("://", 1)[-1].rstrip("/")
        parts = [p for p in path.split("/") if p]
        while parts and any(c in parts[-1] for c in "*?["):
            parts.pop()
        base = parts[-1] if parts else "data"
        for ext in (".tar", ".parquet", ".pq"):
            if base.lower().endswith(ext):
                base = base[: -len(ext)]
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", base).strip("-") or "data"
        unique, n = name, 2
        while unique in out:
            unique, n = f"{name}-{n}", n + 1
        out.append(unique)
    return out


def model_family(name: str) -> str:
    """Our models are grouped into one RD curve per family: m2t-small-q1..q4 -> m2t-small."""
    return re.sub(r"-q\d+$", "", name)


def resolve_models(spec: Any, storage_options) -> list[dict[str, Any]]:
    """[{name, source, model_id, weights_sha256, mode, family}] for the requested models; each is
    loaded once here (on the driver) to record what it is."""
    from m2t_core.registry import list_models

    names = _names(spec)
    if [n.lower() for n in names] == ["none"] or not names:
        return []
    if [n.lower() for n in names] == ["all"]:
        names = [m.name for m in list_models()]
        if not names:
            raise ConfigError("--models all: no models are installed (see `m2t models`)")
    out = []
    for spec_name in names:
        looks_like_path = spec_name.endswith(".safetensors") or os.sep in spec_name or "://" in spec_name
        source = absolute_url(spec_name) if looks_like_path and "://" not in spec_name else spec_name
        model = A.open_model(source, device="cpu", storage_options=storage_options)
        name = Path(spec_name).stem if looks_like_path else spec_name
        if name in CC.CODECS:
            raise ConfigError(f"model name {name!r} clashes with a classic codec's name")
        out.append({"name": name, "source": source, "model_id": model.model_id, "mode": model.cfg.mode,
                    "weights_sha256": model.weights_digest().hex(), "family": model_family(name)})
    if len({m["name"] for m in out}) != len(out):
        raise ConfigError("a model is named twice in --models")
    return out


def plan_units(datasets: list[tuple[str, str]], shards: Mapping[str, list[ShardSpec]], classic: list[str],
               models: list[dict[str, Any]], cfg: EvalConfig) -> list[Unit]:
    units: list[Unit] = []
    common = {"v": EVAL_VERSION, "ms_ssim": cfg.ms_ssim, "max_pixels": cfg.max_pixels}
    descriptions = {name: CC.CODECS[name].describe() for name in classic}
    families: dict[str, list[dict[str, Any]]] = {}
    for m in models:
        families.setdefault(m["family"], []).append(m)
    for name, _url in datasets:
        for spec in shards[name]:
            n = spec.planned_images or cfg.shard_size
            for codec_name in classic:
                codec = CC.CODECS[codec_name]
                points = [{"point": codec.point_label(v), "index": i, "param": float(v), "model": None}
                          for i, v in enumerate(codec.sweep)]
                digest = _digest({**common, "shard": spec.fingerprint, "codec": descriptions[codec_name]})
                units.append(Unit(name, spec, codec_name, "classic", "sweep", points, None, digest,
                                  codec.cost * len(points) * n))
            for family, members in families.items():
                for i, m in enumerate(members):
                    digest = _digest({**common, "shard": spec.fingerprint, "window_batch": cfg.window_batch,
                                      "model": {k: m[k] for k in ("name", "model_id", "weights_sha256")}})
                    point = {"point": m["name"], "index": i, "param": None, "model": m["name"]}
                    units.append(Unit(name, spec, family, "ours", m["name"], [point], m, digest,
                                      (10.0 if m["mode"] == "mt" else 4.0) * n))
    return units


# ====================================================================== one unit (on a worker)

_MODELS: dict[tuple[str, str], Any] = {}  # per worker process: (source, device) -> model
_THREADS: list[int] = []


def _setup_worker(threads: int) -> None:
    import torch

    if _THREADS != [threads]:
        torch.set_num_threads(threads)
        _THREADS[:] = [threads]


def _model(info: Mapping[str, Any], device: str, storage_options):
    key = (info["source"], device)
    model = _MODELS.get(key)
    if model is None:
        model = A.open_model(info["source"], device=device, storage_options=storage_options)
        digest = model.weights_digest().hex()
        if digest != info["weights_sha256"]:
            raise RuntimeError(f"{socket.gethostname()}: model {info['source']!r} has weights {digest[:16]}..., "
                               f"the driver's has {info['weights_sha256'][:16]}...: the nodes do not see the same file")
        _MODELS[key] = model
    return model


def _fill_metrics(row: dict[str, Any], rgb: np.ndarray, decoded: np.ndarray, nbytes: int, want_ms_ssim: bool) -> None:
    from m2t_core.metrics import mse as mse_of, psnr_from_mse

    err = mse_of(rgb, decoded)
    row.update(bytes=nbytes, bpp=8.0 * nbytes / row["pixels"], mse=err, psnr=psnr_from_mse(err))
    if want_ms_ssim:
        row["ms_ssim"] = rd.ms_ssim(rgb, decoded)


def _classic_row(row: dict[str, Any], codec: CC.ClassicCodec, rgb: np.ndarray, param: float, job) -> None:
    try:
        data, enc_s = CC.encode(codec, rgb, param, job["threads"])
        decoded, dec_s = CC.decode(codec, data, rgb.shape[0], rgb.shape[1], job["threads"])
    except Exception as exc:  # an image the format cannot hold, an encoder bug, a bad decode
        row["status"], row["error"] = "error", f"{type(exc).__name__}: {exc}"
        return
    row.update(encode_s=enc_s, decode_s=dec_s)
    _fill_metrics(row, rgb, decoded, len(data), job["ms_ssim"])


def _model_row(row: dict[str, Any], model, rgb: np.ndarray, job) -> None:
    from m2t_core import bitstream as bs

    try:
        t0 = time.perf_counter()
        encoded = model.encode_image(rgb, window_batch=job["window_batch"], max_pixels=job["max_pixels"])
        t1 = time.perf_counter()
        decoded = model.decompress(encoded.bitstream, max_pixels=job["max_pixels"])
        t2 = time.perf_counter()
    except bs.ChecksumMismatchError as exc:
        row["status"], row["error"] = "mismatch", f"decoding failed: {exc}"
        return
    except Exception as exc:  # e.g. ImageTooLargeError
        row["status"], row["error"] = "error", f"{type(exc).__name__}: {exc}"
        return
    row.update(encode_s=t1 - t0, decode_s=t2 - t1)
    _fill_metrics(row, rgb, decoded, len(encoded.bitstream), job["ms_ssim"])
    if not np.array_equal(decoded, model.reconstruct(encoded)):
        row["status"], row["error"] = "mismatch", "the decoded image differs from the encoder's reconstruction"


def run_unit(unit: Mapping[str, Any], job: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate one unit and write its part file; returns small stats for the driver."""
    import pyarrow as pa
    from m2t_core.image_io import load_image

    t0 = time.perf_counter()
    _setup_worker(job["threads"])
    spec = ShardSpec.from_dict(unit["shard"])
    worker = f"{socket.gethostname()}:{os.getpid()}"
    device = "cpu"
    codec = model = None
    unavailable = None
    if unit["kind"] == "classic":
        codec = CC.CODECS[unit["codec"]]
        try:
            CC.ensure_available(codec)
        except CC.CodecUnavailableError as exc:  # this node lacks the plugin: every row says so
            unavailable = str(exc)
    else:
        device = job["device"]
        model = _model(unit["model"], device, job["storage_options"])
    rows: list[dict[str, Any]] = []
    for item in iter_shard(spec, job["storage_options"], job["max_source_bytes"]):
        rgb = None
        if item.status == "ok":
            try:
                if not item.data:
                    raise ValueError("empty file (0 bytes)")
                rgb = load_image(item.data, max_pixels=job["max_pixels"])
            except Exception as exc:  # ImageError or whatever Pillow raises
                item.status, item.error = "error", str(exc) or type(exc).__name__
            item.data = None
        for p in unit["points"]:
            row = {"dataset": unit["dataset"], "key": item.key, "source": item.source, "shard": spec.shard,
                   "unit": unit["uid"], "codec": unit["codec"], "kind": unit["kind"], "point": p["point"],
                   "point_index": p["index"], "param": p["param"], "model": p["model"], "height": None,
                   "width": None, "pixels": None, "bytes": None, "bpp": None, "psnr": None, "mse": None,
                   "ms_ssim": None, "encode_s": None, "decode_s": None, "device": device, "status": "ok",
                   "error": None, "worker": worker}
            if rgb is None:
                row["status"] = item.status
                row["error"] = item.error if item.status == "duplicate" else f"input: {item.error}"
            else:
                row.update(height=int(rgb.shape[0]), width=int(rgb.shape[1]), pixels=int(rgb.shape[0] * rgb.shape[1]))
                if unavailable:
                    row["status"], row["error"] = "error", unavailable
                elif codec is not None:
                    _classic_row(row, codec, rgb, p["param"], job)
                else:
                    _model_row(row, model, rgb, job)
            rows.append(row)
    out = A.Archive(job["output"], job["storage_options"])
    out.write_table(out.path(PARTS_DIR, unit["filename"]), pa.Table.from_pylist(rows, schema=row_schema()))
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("ok", "error", "mismatch", "duplicate")}
    return {"unit": unit["uid"], "rows": len(rows), **counts, "seconds": time.perf_counter() - t0, "worker": worker}


def _ray_run_unit(unit: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO)
    return run_unit(unit, job)


# ====================================================================== the driver


def _progress(todo: list[Unit], enabled: bool) -> Progress:
    """Counts rows (images x rate points); the ETA from rows/s when every shard's size is known."""
    planned = [u.shard.planned_images for u in todo]
    total = (sum(n * len(u.points) for n, u in zip(planned, todo))
             if planned and None not in planned else None)
    return Progress(len(todo), enabled, "eval", unit="unit", total_images=total, count="rows")


def _update(progress: Progress, stats: Mapping[str, Any]) -> None:
    progress.update(stats["rows"], stats["error"] + stats["mismatch"])


def _run_in_process(todo: list[Unit], job: dict[str, Any], progress: Progress, done: dict, failed: dict,
                    retries: int) -> None:
    import torch

    threads_before = torch.get_num_threads()

    def on_result(uid: str, stats: dict) -> None:
        done[uid] = stats
        _update(progress, stats)

    try:
        run_in_process([(unit.uid, unit) for unit in todo], lambda unit: run_unit(unit.to_dict(), job),
                       on_result, failed.__setitem__, retries=retries, what="unit")
    finally:
        torch.set_num_threads(threads_before)
        _THREADS.clear()


def _run_on_ray(cfg: EvalConfig, todo: list[Unit], job: dict[str, Any], progress: Progress, done: dict,
                failed: dict) -> dict[str, Any]:
    """Units as Ray tasks (pipeline.runner.run_task_pool): a unit whose task failed is
    resubmitted up to `ray.unit_retries` times; one that no live node could ever run is failed
    after `ray.placement_timeout_s`."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 0)
    use_gpu = gpus >= 1 if cfg.ray.use_gpu is None else bool(cfg.ray.use_gpu)
    if use_gpu and gpus < 1:
        raise ConfigError("ray.use_gpu is true but the cluster has no GPUs")
    if cfg.ray.cpus_per_task > cpus:
        raise ConfigError(f"ray.cpus_per_task={cfg.ray.cpus_per_task:g} but the cluster has {cpus:g} CPUs")
    job = {**job, "use_gpu": use_gpu, "device": "cuda" if use_gpu else "cpu"}
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and A.Archive(job["output"], job["storage_options"]).local:
        log.warning("the output %s is a local path but the cluster has %d nodes: each node writes its parts "
                    "to its own disk unless that path is a shared filesystem", job["output"], len(nodes))
    log.info("%d unit(s) on Ray (%g CPUs, %d GPUs; %g CPU per task%s)", len(todo), cpus, gpus,
             cfg.ray.cpus_per_task, ", our models on 1 GPU each" if use_gpu else "")

    def on_result(uid: str, stats: dict) -> None:
        done[uid] = stats
        _update(progress, stats)

    items = [(unit.uid, unit.to_dict(), (cfg.ray.cpus_per_task, 1.0 if (use_gpu and unit.kind == "ours") else 0.0))
             for unit in todo]
    faults = run_task_pool(_ray_run_unit, items, on_result, failed.__setitem__, shared=job,
                           retries=cfg.ray.unit_retries, in_flight=cfg.ray.tasks_in_flight or max(2, int(2 * cpus)),
                           placement_timeout_s=cfg.ray.placement_timeout_s, what="unit")
    return {"ray": True, "cpus": cpus, "gpus": gpus, "nodes": len(nodes), "use_gpu": use_gpu,
            "cpus_per_task": cfg.ray.cpus_per_task, "faults": faults}


def machine(runner: Mapping[str, Any] | None = None) -> str:
    import torch

    from m2t_core.sysinfo import cpu_model

    text = (f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")
    if runner and runner.get("nodes"):
        text += (f"; Ray: {runner['nodes']} node(s), {runner['cpus']:g} CPUs, {runner['gpus']} GPUs, "
                 f"{runner['cpus_per_task']:g} CPU per task")
    return text


def _list_parts(out: A.Archive) -> set[str]:
    out.fs.invalidate_cache()
    folder = out.path(PARTS_DIR)
    if not out.fs.exists(folder):
        return set()
    return {posixpath.basename(p) for p in out.fs.ls(folder, detail=False) if p.endswith(".parquet")}


def _looks_like_eval(out: A.Archive) -> bool:
    return any(out.fs.exists(out.path(p)) for p in (PARTS_DIR, SUMMARY))


def _merge(out: A.Archive, units: list[Unit]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for unit in units:
        with out.fs.open(out.path(PARTS_DIR, unit.filename), "rb") as f:
            tables.append(pq.read_table(f, schema=row_schema()))
    table = pa.concat_tables(tables) if tables else row_schema().empty_table()
    return table.sort_by([("dataset", "ascending"), ("codec", "ascending"), ("point_index", "ascending"),
                          ("point", "ascending"), ("key", "ascending")])


def evaluate(cfg: EvalConfig, overwrite: bool = False, progress: bool = True,
             command: str | None = None) -> tuple[dict[str, Any], int]:
    """Run the job; returns (summary, exit code). Raises ConfigError / SourceError for usage errors."""
    t_start, started_at = time.perf_counter(), A.now_iso()
    cfg.check_complete()
    urls = [cfg.data] if isinstance(cfg.data, str) else list(cfg.data)
    cfg = dataclasses.replace(cfg, data=[absolute_url(u) for u in urls], output=absolute_url(cfg.output))
    for url in cfg.data:
        if (cfg.output.rstrip("/") + "/").startswith(url.rstrip("/") + "/"):
            raise ConfigError(f"output {cfg.output} is inside the data {url}: choose an output outside it")

    classic = CC.expand_baselines(cfg.baselines)
    for name in classic:
        try:
            CC.ensure_available(CC.CODECS[name])
        except CC.CodecUnavailableError as exc:
            raise ConfigError(str(exc)) from None
    models = resolve_models(cfg.models, cfg.storage_options)
    families = list(dict.fromkeys(m["family"] for m in models))
    if not classic and not models:
        raise ConfigError("nothing to evaluate: no models and no baselines")
    anchor = resolve_anchor(cfg.anchor)
    codec_names = classic + families
    if anchor not in codec_names:
        raise ConfigError(f"anchor {cfg.anchor!r} is not among the evaluated codecs ({', '.join(codec_names)})")

    names = dataset_names(cfg.data)
    datasets = list(zip(names, cfg.data))
    shards = {}
    for name, url in datasets:
        planned = plan_shards(url, cfg.shard_size, cfg.storage_options, cfg.parquet_image_column,
                              cfg.parquet_key_column)
        shards[name] = planned
    units = plan_units(datasets, shards, classic, models, cfg)

    out = A.Archive(cfg.output, cfg.storage_options)
    if overwrite and out.exists():
        if not (out.is_empty() or _looks_like_eval(out)):
            raise ConfigError(f"--overwrite: {cfg.output} exists and is not an evaluation output; refusing to delete it")
        log.info("--overwrite: deleting %s", cfg.output)
        out.delete()
    elif out.exists() and not out.is_empty() and not _looks_like_eval(out):
        raise ConfigError(f"output {cfg.output} exists, is not empty and is not an evaluation output")

    present = _list_parts(out)
    planned_files = {u.filename for u in units}
    todo = [u for u in units if u.filename not in present]
    already = len(units) - len(todo)
    stale = sorted(present - planned_files)
    todo.sort(key=lambda u: -u.cost)  # the longest units first: the last ones to finish are short
    if cfg.max_units:
        todo = todo[:cfg.max_units]
    log.info("%d unit(s) planned (%d dataset(s), %d codec(s)); %d already done; %d to do now%s", len(units),
             len(datasets), len(codec_names), already, len(todo),
             f"; {len(stale)} part(s) of other settings ignored" if stale else "")

    device = cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    job = {"output": cfg.output, "storage_options": cfg.storage_options, "max_pixels": cfg.max_pixels,
           "max_source_bytes": cfg.max_source_bytes, "window_batch": cfg.window_batch, "ms_ssim": cfg.ms_ssim,
           "threads": cfg.codec_threads, "use_gpu": False, "device": device}
    done: dict[str, dict] = {}
    failed: dict[str, str] = {}
    runner: dict[str, Any] = {"ray": cfg.ray.enabled}
    interrupted = False
    if todo and cfg.ray.enabled:
        connect_ray(cfg.ray.address)
    bar = _progress(todo, progress)
    t_run = time.perf_counter()
    try:
        if not todo:
            pass
        elif cfg.ray.enabled:
            runner.update(_run_on_ray(cfg, todo, job, bar, done, failed))
        else:
            runner.update({"device": device})
            _run_in_process(todo, job, bar, done, failed, cfg.ray.unit_retries)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: finished units are kept; run the same command again to resume")
    finally:
        bar.close()
    run_s = time.perf_counter() - t_run

    present = _list_parts(out)
    remaining = [u.uid for u in units if u.filename not in present]
    complete = not remaining
    runs = _previous_runs(out)
    runs.append({"started_at": started_at, "command": command, "units": len(done), "failed_units": len(failed),
                 "seconds": run_s, "machine": machine(runner)})
    summary: dict[str, Any] = {
        "command": command, "machine": machine(runner), "code_version": A.code_version(),
        "started_at": started_at, "finished_at": A.now_iso(), "complete": complete,
        "config": {**cfg.to_dict(), "storage_options": redact(cfg.storage_options)},
        "datasets": [{"name": n, "url": u, "shards": len(shards[n]),
                      "planned_images": sum(s.planned_images or 0 for s in shards[n])} for n, u in datasets],
        "codecs": {**{name: {"kind": "classic", **CC.CODECS[name].describe()} for name in classic},
                   **{f: {"kind": "ours", "models": [m for m in models if m["family"] == f]} for f in families}},
        "anchor": anchor,
        "units": {"planned": len(units), "already_done": already, "this_run": len(done), "failed": failed,
                  "remaining": len(remaining), "stale_parts_ignored": len(stale)},
        "this_run": {"seconds": run_s, "rows": sum(s["rows"] for s in done.values()), "runner": runner},
        "faults": runner.pop("faults", None),  # Ray: units retried (lost workers or nodes), unplaceable units
        "runs": runs,  # every run on this output (resumed runs add one each): compute time = the sum
    }
    issues = 0
    if complete:
        summary.update(_write_results(out, cfg, units, datasets, classic, models, anchor, summary))
        issues = summary["rows"]["failed"] + summary["rows"]["duplicate"]
    code = exit_code(complete, interrupted=interrupted, issues=issues)
    summary["exit_code"] = code
    summary["wall_s"] = time.perf_counter() - t_start
    out.write_json(out.path(SUMMARY), summary)
    return summary, code


def _previous_runs(out: A.Archive) -> list[dict[str, Any]]:
    """The run log of an earlier summary.json here, if any (a resumed run appends to it)."""
    try:
        with out.fs.open(out.path(SUMMARY), "rb") as f:
            runs = json.load(f).get("runs", [])
        return [r for r in runs if isinstance(r, dict)]
    except Exception:
        return []


# ====================================================================== results


def _describe_codec(name: str, classic: list[str], models: list[dict[str, Any]], dataset: str, images: int) -> str:
    if name in classic:
        c = CC.CODECS[name]
        settings = ", ".join(f"{k}={v}" for k, v in c.save_args.items())
        return (f"{c.label} ({CC.library_version(c)}), {c.param} sweep {list(c.sweep)}, {settings}; "
                f"means over {images} images of {dataset}")
    import m2t_core

    members = [m["name"] for m in models if m["family"] == name]
    mode = next((m["mode"] for m in models if m["family"] == name), "?").upper()
    return (f"{name} ({mode}, ours: {', '.join(members)}), m2t {m2t_core.__version__}, real bitstreams; "
            f"means over {images} images of {dataset}")


def _write_results(out: A.Archive, cfg: EvalConfig, units: list[Unit], datasets, classic, models, anchor,
                   summary) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.compute as pc

    table = _merge(out, units)
    out.write_table(out.path(PER_IMAGE), table)
    points = rd.aggregate(table)
    ours = list(dict.fromkeys(m["family"] for m in models))
    labels = {n: CC.CODECS[n].label for n in classic}
    statuses = table.group_by(["status"]).aggregate([([], "count_all")]).to_pylist()
    by_status = {r["status"]: r["count_all"] for r in statuses}
    failures = table.filter(pc.is_in(table["status"], value_set=pa.array(["error", "mismatch"])))
    failed_by_codec: dict[str, int] = {}
    for r in failures.group_by(["codec"]).aggregate([([], "count_all")]).to_pylist():
        failed_by_codec[r["codec"]] = r["count_all"]
    from_input = pc.fill_null(pc.starts_with(failures["error"], "input: "), False)
    unreadable = (failures.filter(from_input).group_by(["dataset", "key"], use_threads=False)
                  .aggregate([("error", "first")]).slice(0, FAILURE_EXAMPLES).to_pylist())
    codec_failures = (failures.filter(pc.invert(from_input))
                      .group_by(["dataset", "key", "codec", "status"], use_threads=False)
                      .aggregate([("error", "first"), ([], "count_all")]).slice(0, FAILURE_EXAMPLES).to_pylist())
    excluded = rd.excluded_images(table)
    per_dataset = {}
    files = [PER_IMAGE, REPORT, SUMMARY]
    for name, url in datasets:
        prefix = "" if len(datasets) == 1 else f"{name}/"
        sub = table.filter(pc.equal(table["dataset"], name))
        keys = sub.select(["key", "error"]).to_pylist()
        images = len({k["key"] for k in keys})
        codec_curves = rd.curves(points, name)
        # Curves in the order codecs were asked for: ours first, then the baselines.
        codec_curves = {c: codec_curves[c] for c in ours + classic if c in codec_curves}
        kodak = bool(keys) and images == 24 and all(KODAK_KEY.match(k["key"]) for k in keys)
        draw_paper = cfg.paper_reference is True or (cfg.paper_reference == "auto" and kodak)
        references = {rd.PAPER_MT_LABEL: rd.PAPER_MT_KODAK} if draw_paper else {}
        bd = rd.bd_tables(codec_curves, anchor, cfg.bd_method, references, ours)
        for codec, curve in codec_curves.items():
            doc = rd.compressai_json(codec, _describe_codec(codec, classic, models, name, images), curve)
            out.write_json(out.path(f"{prefix}codecs/{codec}.json"), doc)
            files.append(f"{prefix}codecs/{codec}.json")
        title = f"{name}: {images} images"
        out.write_bytes(out.path(f"{prefix}rd_psnr.png"),
                        rd.plot_rd(codec_curves, "psnr", f"{title}, PSNR (RGB) vs rate", labels, ours, references))
        files.append(f"{prefix}rd_psnr.png")
        has_ms_ssim = any(v is not None for c in codec_curves.values() for v in c["ms_ssim"])
        if has_ms_ssim:
            out.write_bytes(out.path(f"{prefix}rd_msssim.png"),
                            rd.plot_rd(codec_curves, "ms_ssim_db", f"{title}, MS-SSIM (RGB) vs rate", labels, ours))
            files.append(f"{prefix}rd_msssim.png")
        per_dataset[name] = {"url": url, "images": images,
                             "unreadable_inputs": len({k["key"] for k in keys if (k["error"] or "").startswith("input: ")}),
                             "excluded_images": len(excluded.get(name, [])),
                             "excluded_examples": excluded.get(name, [])[:FAILURE_EXAMPLES], "kodak": kodak,
                             "paper_reference": draw_paper, "prefix": prefix, "ms_ssim_plot": has_ms_ssim,
                             "bd": bd}
    rows = {"total": table.num_rows, "ok": by_status.get("ok", 0), "error": by_status.get("error", 0),
            "mismatch": by_status.get("mismatch", 0), "duplicate": by_status.get("duplicate", 0)}
    rows["failed"] = rows["error"] + rows["mismatch"]
    results = {"rows": rows, "failed_by_codec": failed_by_codec,
               "unreadable_examples": [{"dataset": r["dataset"], "key": r["key"], "error": r["error_first"]}
                                       for r in unreadable],
               "failure_examples": [{"dataset": r["dataset"], "key": r["key"], "codec": r["codec"],
                                     "status": r["status"], "rate_points": r["count_all"], "error": r["error_first"]}
                                    for r in codec_failures],
               "points": points, "results": per_dataset, "files": files}
    report = render_report({**summary, **results}, classic, models)
    out.write_bytes(out.path(REPORT), report.encode())
    return results


# ====================================================================== report


def _num(value: Any, spec: str, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{spec}}{unit}"


def _bd_cell(entry: Mapping[str, Any] | None, unit: str) -> str:
    if not entry:
        return "-"
    if entry["value"] is None:
        return f"n/a ({entry['note']})"
    text = f"{entry['value']:+.2f}{unit}"
    return f"{text} ({entry['note']})" if entry.get("note") else text


def render_report(s: Mapping[str, Any], classic: list[str], models: list[dict[str, Any]]) -> str:
    anchor = s["anchor"]
    rows = s["rows"]
    lines = [
        "# Rate-distortion evaluation", "",
        f"Command: `{s['command']}`  ",
        f"Machine: {'; '.join(dict.fromkeys(r['machine'] for r in s['runs'] if r['units'])) or s['machine']}  ",
        f"Code: m2t {s['code_version']['m2t']}, commit {s['code_version']['git_commit'] or 'unknown'}; "
        f"finished {s['finished_at']}  ",
        "Datasets: " + ", ".join(f"{n} ({r['images']} images, {r['url']})" for n, r in s["results"].items()) + "  ",
        f"Rows (image x codec x rate point): {rows['total']}; ok {rows['ok']}, failed {rows['failed']} "
        f"(error {rows['error']}, mismatch {rows['mismatch']}), duplicate {rows['duplicate']}  ",
        f"Time: {sum(r['seconds'] for r in s['runs']):.0f} s of unit work in {len(s['runs'])} run(s) "
        f"(wall clock from the first task to the last, start-up excluded)", "",
        "bpp = 8 x bytes of the real file or bitstream (headers included) / pixels; PSNR on RGB 8-bit; "
        "MS-SSIM on RGB 0..255 (data_range 255, 5 scales, short side >= 161 px); every figure is the mean "
        "over images of the per-image values (CompressAI's convention), over the images that every codec "
        "and rate point coded. Encode/decode times are per image "
        "on one task's threads (see the settings below). BD figures: `bjontegaard` package, "
        f"{s['config']['bd_method']} interpolation, over the overlapping range; negative BD-rate = fewer bits "
        "for the same quality.", "",
    ]
    ours = [m["family"] for m in models]
    ours = list(dict.fromkeys(ours))
    for name, r in s["results"].items():
        bd = r["bd"]
        lines += [f"## {name}", ""] if len(s["results"]) > 1 else []
        lines += [f"### BD-rate against {anchor}", "",
                  "| codec | points | BD-rate (PSNR) | BD-PSNR | BD-rate (MS-SSIM) |", "|---|---|---|---|---|"]
        pts = [p for p in s["points"] if p["dataset"] == name]
        for codec in ours + classic:
            entry = bd["vs_anchor"].get(codec)
            if entry is None:
                continue
            n = sum(1 for p in pts if p["codec"] == codec and p["bpp"] is not None)
            label = f"**{codec}** (ours)" if codec in ours else codec
            lines.append(f"| {label} | {n} | {_bd_cell(entry['bd_rate'], ' %')} | {_bd_cell(entry['bd_psnr'], ' dB')} "
                         f"| {_bd_cell(entry['bd_rate_ms_ssim'], ' %')} |")
        if r["paper_reference"] and any(bd["vs_references"].values()):
            lines += ["", f"Against the paper's MT on Kodak (approximate points read from a plot; "
                          f"{rd.PAPER_MT_LABEL} in the plot):", "",
                      "| codec | BD-rate (PSNR) | BD-PSNR |", "|---|---|---|"]
            for codec, refs in bd["vs_references"].items():
                for ref, entry in refs.items():
                    lines.append(f"| {codec} (ours) | {_bd_cell(entry['bd_rate'], ' %')} | {_bd_cell(entry['bd_psnr'], ' dB')} |")
        prefix = r["prefix"]
        lines += ["", f"![PSNR vs bpp]({prefix}rd_psnr.png)", ""]
        if r["ms_ssim_plot"]:
            lines += [f"![MS-SSIM vs bpp]({prefix}rd_msssim.png)", ""]
        else:
            lines += ["(No MS-SSIM plot: every image's short side is below 161 px, or MS-SSIM was off.)", ""]
        names = [c for c in ours + classic if c in bd["pairwise"]]
        if len(names) > 1:
            lines += ["### BD-rate of each codec (row) against each other (column), PSNR", "",
                      "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            for test in names:
                cells = []
                for ref in names:
                    e = bd["pairwise"][test].get(ref, {}).get("bd_rate")
                    cells.append("0" if ref == test else ("n/a" if e is None or e["value"] is None else f"{e['value']:+.1f} %"))
                lines.append(f"| {test} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["### Rate points (means over images)", "",
                  "| codec | point | bpp | PSNR (dB) | MS-SSIM | encode ms | decode ms | images | failed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in sorted(pts, key=lambda p: ((ours + classic).index(p["codec"]) if p["codec"] in ours + classic else 99,
                                            math.inf if p["bpp"] is None else p["bpp"])):
            lines.append(f"| {p['codec']} | {p['point']} | {_num(p['bpp'], '.4f')} | {_num(p['psnr'], '.2f')} | "
                         f"{_num(p['ms_ssim'], '.4f')} | {_num(p['encode_s'] and p['encode_s'] * 1e3, '.1f')} | "
                         f"{_num(p['decode_s'] and p['decode_s'] * 1e3, '.1f')} | {p['used']} | {p['failed']} |")
        lines.append("")
    lines += ["## Codec settings", "", "| codec | library | what varies | sweep | fixed settings |", "|---|---|---|---|---|"]
    for m in models:
        lines.append(f"| {m['family']} (ours) | m2t, model {m['name']} ({m['mode']}), weights "
                     f"{m['weights_sha256'][:12]} | model | {m['name']} | window_batch={s['config']['window_batch']} |")
    for name in classic:
        c = CC.CODECS[name]
        settings = ", ".join(f"{k}={v}" for k, v in c.save_args.items())
        lines.append(f"| {name} | {CC.library_version(c)} | {c.param} | {', '.join(f'{v:g}' for v in c.sweep)} | "
                     f"{settings}; {s['config']['codec_threads']} thread(s) |")
    lines.append("")
    if rows["failed"] or rows["duplicate"]:
        lines += ["## Failures", "", f"{rows['failed']} row(s) failed (" +
                  ", ".join(f"{c} {n}" for c, n in sorted(s["failed_by_codec"].items())) +
                  f"), {rows['duplicate']} duplicate; every row is in per_image.parquet with its status and error. "
                  "Images with a failed row are left out of every codec's means: " +
                  ", ".join(f"{r['excluded_images']} of {r['images']} in {n}" for n, r in s["results"].items()) + ".", ""]
        if s["unreadable_examples"]:
            lines += [f"Inputs that could not be read (first {len(s['unreadable_examples'])}):", ""]
            lines += [f"- {f['dataset']}/{f['key']}: {f['error'][len('input: '):]}" for f in s["unreadable_examples"]]
            lines.append("")
        if s["failure_examples"]:
            lines += [f"Codec failures (image x codec, first {len(s['failure_examples'])}):", ""]
            lines += [f"- {f['dataset']}/{f['key']}, {f['codec']}: {f['status']} at {f['rate_points']} rate point(s): "
                      f"{f['error']}" for f in s["failure_examples"]]
            lines.append("")
    return "\n".join(lines)


def format_summary(s: Mapping[str, Any]) -> str:
    """The table printed at the end of a run."""
    u = s["units"]
    lines = [f"m2t eval: {', '.join(d['url'] for d in s['datasets'])} -> {s['config']['output']}",
             f"{'units':<10}{u['planned'] - u['remaining']} / {u['planned']} done ({u['this_run']} this run, "
             f"{u['already_done']} already done{', ' + str(len(u['failed'])) + ' FAILED' if u['failed'] else ''})"]
    if s.get("results"):
        r = s["rows"]
        lines.append(f"{'rows':<10}{r['total']}  ok {r['ok']}  error {r['error']}  mismatch {r['mismatch']}  "
                     f"duplicate {r['duplicate']}")
        for name, res in s["results"].items():
            left_out = f" ({res['excluded_images']} left out of the means: see report.md)" if res["excluded_images"] else ""
            lines.append(f"{name}: {res['images']} images{left_out}; BD vs {s['anchor']} ({s['config']['bd_method']}):")
            lines.append(f"  {'codec':<16}{'points':>7}{'bpp':>16}{'PSNR dB':>16}{'BD-rate':>10}{'BD-PSNR':>10}"
                         f"{'enc ms':>9}{'dec ms':>9}{'failed':>8}")
            for codec, entry in res["bd"]["vs_anchor"].items():
                pts = [p for p in s["points"] if p["dataset"] == name and p["codec"] == codec and p["bpp"] is not None]
                if not pts:
                    continue
                bpp = f"{min(p['bpp'] for p in pts):.3f}-{max(p['bpp'] for p in pts):.3f}"
                psnr = f"{min(p['psnr'] for p in pts):.2f}-{max(p['psnr'] for p in pts):.2f}"
                enc = np.mean([p["encode_s"] for p in pts]) * 1e3
                dec = np.mean([p["decode_s"] for p in pts]) * 1e3
                rate = entry["bd_rate"]["value"]
                gain = entry["bd_psnr"]["value"]
                lines.append(f"  {codec:<16}{len(pts):>7}{bpp:>16}{psnr:>16}{_num(rate, '+.1f', '%'):>10}"
                             f"{_num(gain, '+.2f'):>10}{enc:>9.1f}{dec:>9.1f}{sum(p['failed'] for p in pts):>8}")
    if u["failed"]:
        lines.append("failed units (rerun to retry):")
        lines += [f"  {uid}: {reason}" for uid, reason in sorted(u["failed"].items())]
    if not s["complete"]:
        lines.append(f"INCOMPLETE: {u['remaining']} unit(s) to go; run the same command again to resume")
    lines.append(f"{'wall time':<10}{s['wall_s']:.1f} s")
    return "\n".join(lines)


# ====================================================================== command line


def build_parser(prog: str = "m2t eval") -> argparse.ArgumentParser:
    """The command line of `m2t eval` (also used to check deployment manifests' entrypoints)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Rate-distortion evaluation of our models and classic codecs over datasets (Ray).",
        epilog="exit codes: 0 all rows ok; 1 complete but some rows failed (see report.md); 2 usage/config error; "
               "3 incomplete (rerun to resume)")
    parser.add_argument("output", nargs="?", metavar="OUTPUT_URL", help="where the results go (or `output` in the config)")
    parser.add_argument("--data", nargs="+", metavar="URL", help="datasets: folders, globs, .tar shards, Parquet")
    parser.add_argument("--models", default=None, help="our models: comma-separated names or paths, 'all' or 'none'")
    parser.add_argument("--baselines", default=None,
                        help=f"classic codecs, comma-separated: {', '.join(CC.CODECS)}, or jpeg (= jpeg-420 and "
                             "jpeg-444), all (the default) or none")
    parser.add_argument("--anchor", default=None, help="the codec BD figures are taken against (default jpeg = jpeg-420)")
    parser.add_argument("--config", default=None, help=f"job config YAML (defaults: {DEFAULT_CONFIG.name})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (dotted keys for nested, YAML values); repeatable")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing evaluation output first")
    parser.add_argument("--no-ray", action="store_true", help="run every unit in this process")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None, prog: str = "m2t eval") -> int:
    """`m2t eval --data URL [URL ...] [options] OUTPUT_URL`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    command = f"{prog} {shlex.join(argv)}".strip()
    try:
        cfg = load_config(args.config, args.overrides)
        data, output = args.data, args.output
        # `--data A B OUT`: argparse hands OUT to --data; the last URL is the output unless one is set.
        if data and output is None and not cfg.output and len(data) >= 2:
            data, output = data[:-1], data[-1]
        changes: dict[str, Any] = {}
        if data:
            changes["data"] = data[0] if len(data) == 1 else data
        if output:
            changes["output"] = output
        for name in ("models", "baselines", "anchor"):
            if getattr(args, name) is not None:
                changes[name] = getattr(args, name)
        if args.no_ray:
            changes["ray"] = dataclasses.replace(cfg.ray, enabled=False)
        cfg = dataclasses.replace(cfg, **changes)  # __post_init__ checks the new values
        summary, code = evaluate(cfg, overwrite=args.overwrite, progress=not args.no_progress, command=command)
    except (ConfigError, SourceError, A.ArchiveError, FileNotFoundError, ModelNotFoundError, CheckpointError) as exc:
        if os.environ.get("M2T_DEBUG"):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(format_summary(summary))
    if summary.get("results"):
        print(f"report: {A.join_url(summary['config']['output'], REPORT)}")
    return code
