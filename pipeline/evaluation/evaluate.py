"""The evaluation job: rate-distortion of our models and classic codecs over whole datasets.

    m2t eval --data /data/kodak [URL ...] [--models all] [--baselines jpeg,webp,avif,jpeg2000,jxl] \
        [--anchor jpeg] OUTPUT_URL
    RAY_ADDRESS=... ray job submit --working-dir . -- python jobs/evaluate.py --data s3://b/clic s3://b/eval

Each data URL is one DATASET (a folder, glob, .tar shards or Parquet, read by
pipeline/sources.py). Its images are cut into shards of `shard_size`; the unit of work, retry
and resume is (shard x codec x rate points): one unit per shard for each classic codec (all its
quality points: each image is read once per codec) and one per shard for each of our models.
A job on the skeleton of pipeline/jobs/runner.py (EvalJob; its worker EvalWorker runs
`run_unit` with UnitSettings): units run as Ray tasks (`ray.cpus_per_task` CPUs each; our
models on a GPU each where the cluster has GPUs), or in this process with --no-ray. A worker
process loads each model once and keeps it for the units that follow. The results are written
by pipeline/evaluation/report.py.

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
import os
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

from m2t_core.config import ConfigError
from m2t_core.allocator import keep_freed_memory

from pipeline.config import absolute_url, check_shared_settings, inputs_and_output, load_job_config, need, redact
from pipeline.errors import run_main
from pipeline.storage import archive as A
from pipeline.evaluation import baselines as B
from pipeline.evaluation import rd
from pipeline.jobs.runner import EXIT_INCOMPLETE, EXIT_ISSUES, EXIT_OK, EXIT_USAGE  # noqa: F401 (the job's exit codes)
from pipeline.evaluation.report import REPORT, SUMMARY, format_summary, machine, previous_runs, write_results
from pipeline.jobs.runner import Item, Job, Placement, Report, Run, RunOptions, run_job
from pipeline.storage.sources import ShardSpec, iter_shard, plan_shards

log = logging.getLogger(__name__)

EXIT_FAILED_ROWS = EXIT_ISSUES  # 0 / 1 / 2 / 3: see the docstring and runner.exit_code
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pipeline" / "evaluate.yaml"
EVAL_VERSION = 1  # part of every unit's hash: bump when a row's meaning changes
PARTS_DIR = "parts"


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
    baselines: Any = field(default_factory=lambda: list(B.ALL_BASELINES))  # "all" (the Pillow codecs), "none" or names
    anchor: str = "jpeg"  # the codec BD figures are taken against ("jpeg" = jpeg-420)
    shard_size: int = 16  # images per unit
    max_pixels: int = 64_000_000  # larger images are refused (status error) before decoding
    max_source_bytes: int = 268_435_456  # larger files are refused before they are read
    ms_ssim: bool = True  # compute MS-SSIM (~0.15 s per Kodak image and rate point on a core)
    bd_method: str = "pchip"  # interpolation for BD figures: pchip, akima or cubic
    paper_reference: Any = field(default_factory=lambda: "auto")  # the paper's MT Kodak points: auto (24 kodimNN.png), true, false
    codec_threads: int = 1  # threads of the classic codecs and of torch in each task
    device: str = "auto"  # in-process runs: auto (cuda if available), cpu, cuda
    parquet_image_column: Any = None
    parquet_key_column: Any = None
    storage_options: dict = field(default_factory=dict)  # per protocol: {s3: {endpoint_url: ...}}
    max_units: int = 0  # > 0: stop after this many units in this run (resume later)
    refine_steps: int = 0  # our models' latents refined before coding (m2t_core/refine.py); their curves say so
    ray: RayOptions = field(default_factory=RayOptions)

    def __post_init__(self) -> None:
        need(type(self.refine_steps) is int and 0 <= self.refine_steps <= 10_000,
             f"refine_steps must be an integer from 0 (off) to 10000, got {self.refine_steps!r}")
        need(self.data is None or isinstance(self.data, str)
             or (isinstance(self.data, list) and self.data and all(isinstance(v, str) for v in self.data)),
             f"data must be a URL or a list of URLs, got {self.data!r}")
        need(self.output is None or isinstance(self.output, str), f"output must be a URL, got {self.output!r}")
        for name in ("models", "baselines"):
            value = getattr(self, name)
            need(isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)),
                 f"{name} must be 'all', 'none', a comma-separated string or a list of names, got {value!r}")
        try:
            B.expand_baselines(self.baselines)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        need(isinstance(self.anchor, str) and bool(self.anchor), "anchor must be a codec name")
        for name in ("shard_size", "max_pixels", "max_source_bytes", "codec_threads"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.bd_method in rd.BD_METHODS, f"bd_method must be one of {rd.BD_METHODS}, got {self.bd_method!r}")
        need(self.paper_reference in ("auto", True, False), "paper_reference must be auto, true or false")
        need(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
             f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        need(self.max_units >= 0, "max_units must be >= 0")
        check_shared_settings(self)
        r = self.ray
        need(r.cpus_per_task > 0, "ray.cpus_per_task must be > 0")
        need(r.tasks_in_flight >= 0 and r.unit_retries >= 0, "ray.tasks_in_flight and ray.unit_retries must be >= 0")

    def check_complete(self) -> None:
        if not self.data:
            raise ConfigError("no data: give --data URL [URL ...] or `data` in the config")
        if not self.output:
            raise ConfigError("no output: give OUTPUT_URL on the command line or `output` in the config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_options(self, progress: bool) -> RunOptions:
        r = self.ray
        return RunOptions(ray=r.enabled, address=r.address, cpus_per_actor=r.cpus_per_task, use_gpu=r.use_gpu,
                          in_flight=r.tasks_in_flight, retries=r.unit_retries,
                          placement_timeout_s=r.placement_timeout_s, device=self.device, progress=progress)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> EvalConfig:
    """Read a config file (unknown keys are errors; retired ones ignored with a warning), then
    apply `key=value` overrides."""
    return load_job_config(EvalConfig, path, overrides)


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v for v in (p.strip() for p in value.split(",")) if v]
    return [str(v).strip() for v in value if str(v).strip()]


def resolve_anchor(anchor: str) -> str:
    """The codec an anchor name means: a group alias ("jpeg") means its first codec."""
    name = anchor.strip().lower()
    return B.BASELINE_ALIASES.get(name, (anchor.strip(),))[0]


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
        ("kind", pa.string()),  # "ours", or a baseline's: "classic" (Pillow) or "learned" (CompressAI)
        ("point", pa.string()),  # the rate point: "q=30", "bpp=0.25", or our model's name
        ("point_index", pa.int32()),  # its position in the codec's sweep
        ("param", pa.float64()),  # quality or target bpp; null for our models
        ("model", pa.string()),  # our model's name (null for baselines)
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
    kind: str  # "ours", or the baseline's kind ("classic", "learned")
    group: str  # "sweep" (a baseline's whole sweep) or our model's name
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


def resolve_models(spec: Any, storage_options, refine_steps: int = 0) -> list[dict[str, Any]]:
    """[{name, source, model_id, weights_sha256, mode, family}] for the requested models; each is
    loaded once here (on the driver) to record what it is. With `refine_steps`, each family's
    curve is named for it (m2t-small-refine40): another encoder of the same models."""
    from m2t_core import refine
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
        if name in B.BASELINES:
            raise ConfigError(f"model name {name!r} clashes with a baseline codec's name")
        if refine_steps:
            try:
                refine.check_model(model)
            except refine.RefineError as exc:
                raise ConfigError(f"refine_steps: {exc}") from None
        out.append({"name": name, "source": source, "model_id": model.model_id, "mode": model.cfg.mode,
                    "weights_sha256": model.weights_digest().hex(),
                    "family": model_family(name) + (f"-refine{refine_steps}" if refine_steps else ""),
                    "rate_levels": model.rate_levels})
    if len({m["name"] for m in out}) != len(out):
        raise ConfigError("a model is named twice in --models")
    return out


def plan_units(datasets: list[tuple[str, str]], shards: Mapping[str, list[ShardSpec]], classic: list[str],
               models: list[dict[str, Any]], cfg: EvalConfig) -> list[Unit]:
    units: list[Unit] = []
    common = {"v": EVAL_VERSION, "ms_ssim": cfg.ms_ssim, "max_pixels": cfg.max_pixels}
    descriptions = {name: B.BASELINES[name].describe() for name in classic}
    families: dict[str, list[dict[str, Any]]] = {}
    for m in models:
        families.setdefault(m["family"], []).append(m)
    for name, _url in datasets:
        for spec in shards[name]:
            n = spec.planned_images or cfg.shard_size
            for codec_name in classic:
                codec = B.BASELINES[codec_name]
                points = [{"point": codec.point_label(v), "index": i, "param": float(v), "model": None}
                          for i, v in enumerate(codec.sweep)]
                digest = _digest({**common, "shard": spec.fingerprint, "codec": descriptions[codec_name]})
                units.append(Unit(name, spec, codec_name, codec.kind, "sweep", points, None, digest,
                                  codec.cost * len(points) * n))
            for family, members in families.items():
                for i, m in enumerate(members):
                    refined = {"refine_steps": cfg.refine_steps} if cfg.refine_steps else {}
                    digest = _digest({**common, **refined, "shard": spec.fingerprint,
                                      "model": {k: m[k] for k in ("name", "model_id", "weights_sha256")}})
                    # A variable-rate model is its own curve: one point per level (param: the quality).
                    points = ([{"point": f"{m['name']}@{q}", "index": q - 1, "param": float(q), "model": m["name"]}
                               for q in range(1, m.get("rate_levels", 0) + 1)]
                              or [{"point": m["name"], "index": i, "param": None, "model": m["name"]}])
                    units.append(Unit(name, spec, family, "ours", m["name"], points, m, digest,
                                      (10.0 if m["mode"] == "mt" else 4.0) * n * len(points)))
    return units


# ====================================================================== one unit (on a worker)

@dataclass(frozen=True)
class UnitSettings:
    """What an evaluation worker needs: the same for every unit of a run."""

    output: str  # the results' URL: each unit writes its part file there
    storage_options: dict
    max_pixels: int
    max_source_bytes: int
    ms_ssim: bool
    threads: int  # of the baselines' encoders / decoders and of torch
    device: str = "cpu"  # where our models run: the worker's (EvalWorker fills it in)
    refine_steps: int = 0  # our models' latent refinement (m2t_core/refine.py)


_MODELS: dict[tuple[str, str], Any] = {}  # per worker process: (source, device) -> model


def _setup_worker(threads: int) -> None:
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    keep_freed_memory()


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


def _baseline_row(row: dict[str, Any], codec: B.Baseline, rgb: np.ndarray, param: float, job) -> None:
    try:
        t0 = time.perf_counter()
        data = codec.encode(rgb, param, job.threads)
        t1 = time.perf_counter()
        decoded = codec.decode(data, rgb.shape[0], rgb.shape[1], job.threads)
        t2 = time.perf_counter()
    except Exception as exc:  # an image the format cannot hold, an encoder bug, a bad decode
        row["status"], row["error"] = "error", f"{type(exc).__name__}: {exc}"
        return
    row.update(encode_s=t1 - t0, decode_s=t2 - t1)
    _fill_metrics(row, rgb, decoded, len(data), job.ms_ssim)


def _model_row(row: dict[str, Any], model, rgb: np.ndarray, job, quality: float | None = None) -> None:
    """One image through one of our models (a variable-rate model's at `quality`)."""
    from m2t_core import Decoder, Encoder
    from m2t_core import bitstream as bs

    try:
        t0 = time.perf_counter()
        encoder = Encoder(model, max_pixels=job.max_pixels, quality=quality, refine_steps=job.refine_steps)
        encoded = encoder.encode_image(rgb)
        t1 = time.perf_counter()
        decoded = Decoder(model, max_pixels=job.max_pixels).decompress(encoded.bitstream)
        t2 = time.perf_counter()
    except bs.ChecksumMismatchError as exc:
        row["status"], row["error"] = "mismatch", f"decoding failed: {exc}"
        return
    except Exception as exc:  # e.g. ImageTooLargeError
        row["status"], row["error"] = "error", f"{type(exc).__name__}: {exc}"
        return
    row.update(encode_s=t1 - t0, decode_s=t2 - t1)
    _fill_metrics(row, rgb, decoded, len(encoded.bitstream), job.ms_ssim)
    # The encoder's reconstruction (g_s on the latent it coded), untimed.
    if not np.array_equal(decoded, model.synthesis(encoded.y_hat.float(), encoded.height, encoded.width,
                                                   encoder.format_version, encoder.quality_code)):
        row["status"], row["error"] = "mismatch", "the decoded image differs from the encoder's reconstruction"


def run_unit(unit: Mapping[str, Any], job: UnitSettings) -> dict[str, Any]:
    """Evaluate one unit and write its part file; returns small stats for the driver."""
    import pyarrow as pa
    from m2t_core.image_io import load_image

    t0 = time.perf_counter()
    _setup_worker(job.threads)
    spec = ShardSpec.from_dict(unit["shard"])
    worker = f"{socket.gethostname()}:{os.getpid()}"
    device = "cpu"
    codec = model = None
    unavailable = None
    if unit["kind"] != "ours":
        codec = B.BASELINES[unit["codec"]]
        try:
            codec.ensure_available()
            for p in unit["points"]:
                codec.prepare(p["param"])  # CompressAI: load the models before any timed call
        except B.CodecUnavailableError as exc:  # this node lacks the plugin or weights: every row says so
            unavailable = str(exc)
        except Exception as exc:  # weights that do not load, say: every row says so too
            unavailable = f"{unit['codec']}: {type(exc).__name__}: {exc}"
    else:
        device = job.device
        model = _model(unit["model"], device, job.storage_options)
    rows: list[dict[str, Any]] = []
    for item in iter_shard(spec, job.storage_options, job.max_source_bytes):
        rgb = None
        if item.status == "ok":
            try:
                if not item.data:
                    raise ValueError("empty file (0 bytes)")
                rgb = load_image(item.data, max_pixels=job.max_pixels)
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
                    _baseline_row(row, codec, rgb, p["param"], job)
                else:
                    _model_row(row, model, rgb, job, p["param"])
            rows.append(row)
    out = A.Archive(job.output, job.storage_options)
    out.write_table(out.path(PARTS_DIR, unit["filename"]), pa.Table.from_pylist(rows, schema=row_schema()))
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("ok", "error", "mismatch", "duplicate")}
    return {"unit": unit["uid"], "rows": len(rows), **counts, "seconds": time.perf_counter() - t0, "worker": worker}


class EvalWorker:
    """An evaluation worker (a Ray task, or once in process): runs the units it is given."""

    def __init__(self, settings: UnitSettings, placement: Placement):
        self.settings = dataclasses.replace(settings, device=placement.device)

    def process(self, unit: dict[str, Any]) -> dict[str, Any]:
        return run_unit(unit, self.settings)


# ====================================================================== the job (driver side)


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


class EvalJob(Job):
    """m2t eval on the runner's skeleton: plan the units (resolving codecs, models, datasets;
    only units without a part file), fold each unit's counts, report (summary.json and, once
    every unit is done, the results)."""

    name, what, count = "eval", "unit", "rows"
    pool = "tasks"  # units need different resources: CPU-only baselines, our models on a GPU
    worker = EvalWorker

    def __init__(self, cfg: EvalConfig, overwrite: bool = False, progress: bool = True, command: str | None = None):
        super().__init__()
        self.started_at = A.now_iso()
        cfg.check_complete()
        data, output = inputs_and_output(cfg.data, cfg.output, "data")
        cfg = dataclasses.replace(cfg, data=data, output=output)
        self.cfg, self.overwrite, self.command = cfg, overwrite, command
        self.options = cfg.run_options(progress)
        self.out = A.Archive(cfg.output, cfg.storage_options)
        self.local_output = cfg.output if self.out.local else None
        self.done: dict[str, dict] = {}  # this run's units: their counts

    def plan(self) -> list[Item]:
        cfg, out = self.cfg, self.out
        classic = B.expand_baselines(cfg.baselines)
        for name in classic:
            try:
                B.BASELINES[name].ensure_available()
            except B.CodecUnavailableError as exc:
                raise ConfigError(str(exc)) from None
        models = resolve_models(cfg.models, cfg.storage_options, cfg.refine_steps)
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

        if self.overwrite and out.exists():
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
        self.classic, self.models, self.families, self.anchor = classic, models, families, anchor
        self.datasets, self.shards, self.units, self.already, self.stale = datasets, shards, units, already, stale
        self.settings = UnitSettings(cfg.output, cfg.storage_options, cfg.max_pixels, cfg.max_source_bytes,
                                     cfg.ms_ssim, cfg.codec_threads, refine_steps=cfg.refine_steps)
        # The progress bar counts rows (images x rate points): its ETA from rows/s where shard sizes are known.
        rows = lambda u: None if u.shard.planned_images is None else u.shard.planned_images * len(u.points)
        return [Item(u.uid, u.to_dict(), rows(u), gpu=u.kind == "ours") for u in todo]

    def fold(self, uid: str, stats: dict) -> tuple[int, int]:
        self.done[uid] = stats
        return stats["rows"], stats["error"] + stats["mismatch"]

    def report(self, run: Run) -> Report:
        cfg, out, shards, models = self.cfg, self.out, self.shards, self.models
        present = _list_parts(out)
        remaining = [u.uid for u in self.units if u.filename not in present]
        complete = not remaining
        runs = previous_runs(out)
        runs.append({"started_at": self.started_at, "command": self.command, "units": len(self.done),
                     "failed_units": len(run.failed), "seconds": run.seconds, "machine": machine(run.runner)})
        summary: dict[str, Any] = {
            "command": self.command, "machine": machine(run.runner), "code_version": A.code_version(),
            "started_at": self.started_at, "finished_at": A.now_iso(), "complete": complete,
            "config": {**cfg.to_dict(), "storage_options": redact(cfg.storage_options)},
            "datasets": [{"name": n, "url": u, "shards": len(shards[n]),
                          "planned_images": sum(s.planned_images or 0 for s in shards[n])} for n, u in self.datasets],
            "codecs": {**{name: {"kind": B.BASELINES[name].kind, **B.BASELINES[name].describe()} for name in self.classic},
                       **{f: {"kind": "ours", "models": [m for m in models if m["family"] == f]} for f in self.families}},
            "anchor": self.anchor,
            "units": {"planned": len(self.units), "already_done": self.already, "this_run": len(self.done),
                      "failed": run.failed, "remaining": len(remaining), "stale_parts_ignored": len(self.stale)},
            "this_run": {"seconds": run.seconds, "rows": sum(s["rows"] for s in self.done.values()),
                         "runner": run.runner},
            "faults": run.faults,  # Ray: units retried (lost workers or nodes), unplaceable units
            "runs": runs,  # every run on this output (resumed runs add one each): compute time = the sum
        }
        issues = 0
        if complete:
            summary.update(write_results(out, cfg, _merge(out, self.units), self.datasets, self.classic, models,
                                         self.anchor, summary))
            issues = summary["rows"]["failed"] + summary["rows"]["duplicate"]
        return Report(summary, complete, issues)

    def save(self, summary: dict[str, Any]) -> None:
        self.out.write_json(self.out.path(SUMMARY), summary)


def evaluate(cfg: EvalConfig, overwrite: bool = False, progress: bool = True,
             command: str | None = None) -> tuple[dict[str, Any], int]:
    """Run the job; returns (summary, exit code). Raises ConfigError / SourceError for usage errors."""
    job = EvalJob(cfg, overwrite, progress, command)
    return run_job(job, job.options)


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
                        help=f"baseline codecs, comma-separated: {', '.join(B.BASELINES)}, or jpeg (= jpeg-420 and "
                             "jpeg-444), compressai (both CompressAI models), all (the default: the Pillow codecs; "
                             "CompressAI only by name) or none")
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
    return run_main(prog, lambda: _main(args, f"{prog} {shlex.join(argv)}".strip()), logs=True)


def _main(args: argparse.Namespace, command: str) -> int:
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
    print(format_summary(summary))
    if summary.get("results"):
        print(f"report: {A.join_url(summary['config']['output'], REPORT)}")
    return code
