"""The training job's configuration: TrainConfig (YAML, unknown keys are errors), its loading
and its preparation for workers (absolute paths, the model inline).

train_data is a URL, a list of URLs, or a list of sources with sampling weights and random
downscale ranges (pool.SourceSpec); `loader` picks how crops reach the steps: "memory"
(pool.py: every image decoded once, crops cut by a thread; the default), "device" (the
same images held on the training device, crops cut there: device_pool.py) or "stream"
(data.CropDataset in DataLoader workers: corpora larger than memory).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from m2t_core import registry
from m2t_core.config import (ConfigError, ModelConfig, apply_overrides, dataclass_from_dict, load_mapping,
                             load_model_config, yaml_numbers)
from pipeline.training.pool import SourceSpec, parse_sources, sources_to_config

AMP_MODES = ("auto", "none", "bf16")
LOADERS = ("memory", "device", "stream")
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ====================================================================== configuration


@dataclass
class RayConfig:
    workers: int = 1  # training workers (data parallel, one GPU each when GPUs are used)
    use_gpu: Any = None  # null: use GPUs iff the cluster has some; true/false to force
    cpus_per_worker: int = 1  # CPUs Ray reserves per worker (DataLoader workers come on top)


@dataclass
class TrainConfig:
    # Model: a preset path (relative to the config file that names it, or to the current
    # directory when given with --set) or an inline mapping of ModelConfig fields. May be
    # left out when init_from is set: the architecture then comes from that checkpoint.
    model: Any = None
    model_id: str = "m2t-trained"  # registry name of the export
    init_from: Any = None  # checkpoint path or registry name: start from its weights
    # Data: one fsspec URL or a list, as `m2t compress` reads them: folders of images (searched
    # recursively), globs, webdataset .tar shards, Parquet files (one image per row); or a list
    # of sources {url, weight, downscale} (pool.py) mixed by weight.
    train_data: Any = None
    val_data: Any = None
    parquet_image_column: Any = None  # Parquet: the image column (null: found as compress finds it)
    crop_size: int = 256
    batch_size: int = 16  # per worker
    steps: int = 20000
    lr: float = 1e-4
    warmup_steps: int = 500  # linear warm-up from 0
    lr_decay_at: float = 0.9  # lr / 10 from this fraction of the steps on
    # Quantisation-aware training of the entropy model from this fraction of the steps on:
    # at that step the exact (integer) model's exponents are calibrated on the batch's
    # latents, and from then on the entropy model trains through the integer grid
    # (m2t_core/exact.py). 1.0: float training throughout, calibration at export only.
    qat_from: float = 0.8
    # Calibrate those exponents (and the integer g_s's) on that batch, as above; false keeps the
    # exponents init_from came with (warm starts only): the campaign's test of what one batch's
    # calibration costs a fine-tuned model.
    recalibrate: bool = True
    lmbda: float = 0.0067  # loss = bpp + lmbda * MSE(0..255)
    lambda_boost: float = 10.0  # lmbda x lambda_boost during the first lambda_boost_fraction
    lambda_boost_fraction: float = 0.15
    mt_mask_range: tuple[float, float] = (0.05, 0.99)  # MT: fraction of tokens masked per window
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    # "auto": bf16 autocast of the network where the device computes bf16 natively (CUDA
    # with bf16, CPUs with AVX512-BF16 or AMX), else fp32; "none" | "bf16" force it.
    amp: str = "auto"
    channels_last: bool = True  # NHWC activations and weights: oneDNN's and cuDNN's fast layout
    compile: bool = False  # torch.compile the training forward pass (no gain measured on CPU)
    # "memory": images decoded once, crops cut by a thread (pool.py) | "device": images on the
    # training device, crops cut there, no random rescale (device_pool.py; packs of tiles for a
    # GPU) | "stream": DataLoader workers decode per crop (corpora larger than memory)
    loader: str = "memory"
    memory_mb: int = 8192  # loader memory: the decoded images' budget per training worker
    num_workers: int = 8  # loader stream: DataLoader worker processes per training worker
    seed: int = 0
    log_every: int = 100
    val_every: int = 2000
    val_images: int = 8
    checkpoint_every: int = 1000
    output_dir: str = "runs/train"
    export_dtype: str = "float16"
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    cpu_threads: int = 0  # torch threads when device is "cpu" (0: PyTorch's default)
    # Stop after this many seconds of training steps (0: none): checkpoint, calibrate, export
    # at the step reached. For lent machines; one training worker only (ranks would disagree).
    time_limit_s: float = 0.0
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.train_data not in (None, "", []),
             "train_data is required (an fsspec URL or a list of them; e.g. --set train_data=/data/photos)")
        specs = parse_sources(self.train_data)
        value = self.val_data
        need(value is None or isinstance(value, str)
             or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
             f"val_data must be a URL or a list of URLs, got {value!r}")
        need(self.loader in LOADERS, f"loader must be one of {LOADERS}, got {self.loader!r}")
        need(self.loader != "stream" or all(s.is_plain for s in specs),
             "train_data weights and downscale ranges need loader: memory or device")
        need(self.memory_mb > 0, f"memory_mb must be positive, got {self.memory_mb}")
        need(self.time_limit_s >= 0, f"time_limit_s must be >= 0, got {self.time_limit_s}")
        need(not self.time_limit_s or self.ray.workers == 1, "time_limit_s needs ray.workers: 1")
        need(self.parquet_image_column is None or (isinstance(self.parquet_image_column, str)
                                                   and self.parquet_image_column != ""),
             f"parquet_image_column must be a column name or null, got {self.parquet_image_column!r}")
        need(self.model is not None or self.init_from is not None,
             "model is required (a preset path or mapping) unless init_from names a checkpoint")
        need(self.model is None or isinstance(self.model, (str, dict)),
             f"model must be a preset path or a mapping, got {self.model!r}")
        need(self.init_from is None or isinstance(self.init_from, str),
             f"init_from must be a checkpoint path or registry name, got {self.init_from!r}")
        need(isinstance(self.recalibrate, bool), f"recalibrate must be true or false, got {self.recalibrate!r}")
        need(self.recalibrate or self.init_from is not None,
             "recalibrate: false keeps init_from's exponents: it needs init_from (a new model has none)")
        need(bool(registry.MODEL_NAME_RE.match(self.model_id)),
             f"model_id {self.model_id!r} is not a valid registry name (letters, digits, '.', '_', '-')")
        need(self.crop_size > 0 and self.crop_size % 16 == 0,
             f"crop_size must be a positive multiple of 16, got {self.crop_size}")
        for name in ("batch_size", "steps", "log_every", "val_every", "checkpoint_every"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_workers", "val_images", "cpu_threads"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.lr > 0 and self.lmbda > 0 and self.lambda_boost > 0 and self.grad_clip > 0,
             "lr, lmbda, lambda_boost and grad_clip must be positive")
        for name in ("lr_decay_at", "lambda_boost_fraction", "qat_from"):
            need(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.mt_mask_range if len(self.mt_mask_range) == 2 else (-1, -1)
        need(0.0 < lo <= hi <= 1.0, f"mt_mask_range must be [lo, hi] with 0 < lo <= hi <= 1, got {self.mt_mask_range}")
        need(self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        need(self.export_dtype in EXPORT_DTYPES, f"export_dtype must be one of {sorted(EXPORT_DTYPES)}")
        need(self.ray.workers >= 1 and self.ray.cpus_per_worker >= 0, "ray.workers must be >= 1")
        need(self.ray.use_gpu in (None, True, False), "ray.use_gpu must be null, true or false")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mt_mask_range"] = list(self.mt_mask_range)
        return data


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a training config file, then apply `key=value` overrides (dotted keys for nested
    fields, values parsed as YAML). Unknown keys and bad values raise ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml_numbers(load_mapping(path))
        # A preset path in a config file is relative to that file, so configs can move together.
        if isinstance(data.get("model"), str) and not Path(data["model"]).is_absolute():
            data["model"] = str((path.parent / data["model"]).resolve())
    apply_overrides(data, overrides)
    return dataclass_from_dict(TrainConfig, data)


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture to train: from `model`, else from the `init_from` checkpoint."""
    if isinstance(cfg.model, dict):
        return ModelConfig.from_dict(cfg.model)
    if isinstance(cfg.model, str):
        if not Path(cfg.model).is_file():
            raise ConfigError(f"model preset not found: {cfg.model}")
        return load_model_config(cfg.model)
    return registry.read_metadata(_checkpoint_path(cfg.init_from))[1]


def _checkpoint_path(name_or_path: str) -> Path:
    if name_or_path.endswith(".safetensors") or os.sep in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"init_from checkpoint not found: {path}")
        return path
    return registry.find_model(name_or_path)


def _absolute_url(url: str) -> str:
    return url if "://" in url else str(Path(url).expanduser().resolve())


def train_sources(cfg: TrainConfig) -> list[SourceSpec]:
    return parse_sources(cfg.train_data)


def prepare_config(cfg: TrainConfig) -> TrainConfig:
    """Make paths absolute and the model inline, so that workers anywhere read the same thing."""
    urls = lambda v: None if v is None else (_absolute_url(v) if isinstance(v, str) else [_absolute_url(u) for u in v])
    model_cfg = resolve_model_config(cfg)
    if cfg.init_from is not None:
        init_path = _checkpoint_path(cfg.init_from)
        init_cfg = registry.read_metadata(init_path)[1]
        # A variable-rate model may start from the fixed-rate model of its architecture (warm start).
        if init_cfg != model_cfg and not (model_cfg.rate_lambdas and not init_cfg.rate_lambdas
                                          and init_cfg == model_cfg.replace(rate_lambdas=())):
            raise ConfigError(f"init_from {init_path} has a different architecture than `model`: "
                              f"{init_cfg} vs {model_cfg} (leave `model` out to take the checkpoint's)")
    return dataclasses.replace(
        cfg, model=model_cfg.to_dict(), val_data=urls(cfg.val_data),
        train_data=sources_to_config([SourceSpec(urls(s.url), s.weight, s.downscale) for s in train_sources(cfg)]),
        output_dir=str(Path(cfg.output_dir).expanduser().resolve()),
        init_from=str(_checkpoint_path(cfg.init_from).resolve()) if cfg.init_from else None,
    )
