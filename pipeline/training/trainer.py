"""Training job for the M2T / MT codec: config, data, loss, loop, checkpoints, Ray launch.

    python jobs/train.py --config configs/train/m2t-small.yaml --set train_data=/data/photos
    m2t train --config configs/train/m2t-small.yaml --set train_data=s3://bucket/shards --resume

Loss = rate + lambda * distortion, with
  * rate: bits per pixel, sum(-log2 likelihood of y) / pixels. For MT only the masked tokens
    count; their bits are scaled by total/masked tokens so the figure estimates a full image.
  * distortion: MSE on the 0..255 scale of the unclamped x_hat against x.
Mixed precision ("bf16") covers the network only; rate and distortion are reduced in fp32.

The same loop function (`train_loop`) runs in this process (`--no-ray`, or when Ray is not
installed: Ray is imported only on the Ray path) or on every worker of a Ray TorchTrainer.
Rank 0 logs, validates, checkpoints and exports.

Files in output_dir:
  metrics.jsonl                   one JSON object a line: kind "train" or "val"
  config.yaml                     the resolved training config
  last.safetensors                model weights (fp32), an m2t checkpoint
  last-optim.safetensors          AdamW state tensors, keys "<param index>.<name>"
  last-state.json                 step, wall time, seed, optimizer hyper-parameters
  <model_id>.safetensors          the export (export_dtype), loadable by m2t_core.registry
No file is ever unpickled; every write goes to a temporary file first (os.replace).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from m2t_core import registry
from m2t_core.codec import M2TCodec
from m2t_core.config import (ConfigError, ModelConfig, apply_overrides, dataclass_from_dict, load_mapping,
                             load_model_config, yaml_numbers)
from m2t_core.image_io import load_image
from m2t_core.metrics import psnr, psnr_from_mse
from m2t_core.sysinfo import cpu_model

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SHARD_EXTS = (".tar",)  # webdataset shards; compressed tars cannot be read at random offsets
AMP_MODES = ("none", "bf16")
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MAX_DECODE_PIXELS = 100_000_000  # refuse decompression bombs before decoding their pixels
VAL_MAX_SIDE = 512

# A sample: (file URL, member name inside a tar shard or "", byte offset, byte size or -1).
Sample = tuple[str, str, int, int]


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
    # Data: one fsspec URL or a list (folders of images, searched recursively, or .tar shards).
    train_data: Any = None
    val_data: Any = None
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
    lmbda: float = 0.0067  # loss = bpp + lmbda * MSE(0..255)
    lambda_boost: float = 10.0  # lmbda x lambda_boost during the first lambda_boost_fraction
    lambda_boost_fraction: float = 0.15
    mt_mask_range: tuple[float, float] = (0.05, 0.99)  # MT: fraction of tokens masked per window
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    amp: str = "none"  # "none" | "bf16" (autocast of the network only)
    compile: bool = False  # torch.compile the training forward pass
    num_workers: int = 8  # DataLoader worker processes per training worker
    seed: int = 0
    log_every: int = 100
    val_every: int = 2000
    val_images: int = 8
    checkpoint_every: int = 1000
    output_dir: str = "runs/train"
    export_dtype: str = "float16"
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    cpu_threads: int = 0  # torch threads when device is "cpu" (0: PyTorch's default)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.train_data not in (None, "", []),
             "train_data is required (an fsspec URL or a list of them; e.g. --set train_data=/data/photos)")
        for name in ("train_data", "val_data"):
            value = getattr(self, name)
            need(value is None or isinstance(value, str)
                 or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
                 f"{name} must be a URL or a list of URLs, got {value!r}")
        need(self.model is not None or self.init_from is not None,
             "model is required (a preset path or mapping) unless init_from names a checkpoint")
        need(self.model is None or isinstance(self.model, (str, dict)),
             f"model must be a preset path or a mapping, got {self.model!r}")
        need(self.init_from is None or isinstance(self.init_from, str),
             f"init_from must be a checkpoint path or registry name, got {self.init_from!r}")
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
        need(self.ray.use_gpu in (None, True, False), f"ray.use_gpu must be null, true or false")

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


def prepare_config(cfg: TrainConfig) -> TrainConfig:
    """Make paths absolute and the model inline, so that workers anywhere read the same thing."""
    urls = lambda v: None if v is None else (_absolute_url(v) if isinstance(v, str) else [_absolute_url(u) for u in v])
    model_cfg = resolve_model_config(cfg)
    if cfg.init_from is not None:
        init_path = _checkpoint_path(cfg.init_from)
        init_cfg = registry.read_metadata(init_path)[1]
        if init_cfg != model_cfg:
            raise ConfigError(f"init_from {init_path} has a different architecture than `model`: "
                              f"{init_cfg} vs {model_cfg} (leave `model` out to take the checkpoint's)")
    return dataclasses.replace(
        cfg, model=model_cfg.to_dict(), train_data=urls(cfg.train_data), val_data=urls(cfg.val_data),
        output_dir=str(Path(cfg.output_dir).expanduser().resolve()),
        init_from=str(_checkpoint_path(cfg.init_from).resolve()) if cfg.init_from else None,
    )


# ====================================================================== data


def _fs(url: str):
    import fsspec  # here, not at the top: the in-process path works without the pipeline extras on local data

    return fsspec.core.url_to_fs(url)


def list_samples(urls: str | Sequence[str]) -> list[Sample]:
    """Every image file and every image member of every .tar shard under `urls`, sorted."""
    samples: list[Sample] = []
    for url in [urls] if isinstance(urls, str) else urls:
        fs, root, before = *_fs(url), len(samples)
        if any(c in root for c in "*?["):
            paths = fs.glob(root)
        elif fs.isdir(root):
            paths = fs.find(root)
        elif fs.exists(root):
            paths = [root]
        else:
            raise FileNotFoundError(f"data not found: {url}")
        for path in sorted(paths):
            low = path.lower()
            if low.endswith(IMAGE_EXTS):
                samples.append((fs.unstrip_protocol(path), "", 0, -1))
            elif low.endswith(SHARD_EXTS):
                samples.extend(_index_shard(fs, path))
        if len(samples) == before:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) or .tar shards found at {url}")
    return samples


def _index_shard(fs, path: str) -> list[Sample]:
    """Offsets of the image members of a tar shard; tarfile reads headers and seeks past data."""
    url = fs.unstrip_protocol(path)
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            return [(url, m.name, m.offset_data, m.size) for m in tar
                    if m.isfile() and m.name.lower().endswith(IMAGE_EXTS)]
    except (tarfile.TarError, OSError) as exc:
        log.warning("skipping unreadable shard %s: %s", url, exc)
        return []


def read_sample(sample: Sample) -> np.ndarray:
    url, member, offset, size = sample
    fs, path = _fs(url)
    data = fs.cat_file(path) if size < 0 else fs.cat_file(path, start=offset, end=offset + size)
    return load_image(data, max_pixels=MAX_DECODE_PIXELS)


def sample_name(sample: Sample) -> str:
    return f"{sample[0]}:{sample[1]}" if sample[1] else sample[0]


def random_crop(rgb: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """Random downscale, random crop x crop, random horizontal flip.

    The scale is log-uniform between "short side = crop" and 1, so crops see both native
    detail and whole-image structure. Images smaller than the crop are upscaled to fit
    (rare in photo collections; better a soft crop than a lost image). Resizing only the
    crop's source box keeps large images cheap.
    """
    h, w = rgb.shape[:2]
    lo = crop / min(h, w)
    scale = lo if lo >= 1.0 else math.exp(rng.uniform(math.log(lo), 0.0))
    side = min(max(crop, round(crop / scale)), h, w) if lo < 1.0 else min(h, w)  # source box side
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    box = rgb[top:top + side, left:left + side]
    if side != crop:
        box = np.array(Image.fromarray(box).resize((crop, crop), Image.BICUBIC))
    if rng.random() < 0.5:
        box = box[:, ::-1]
    return np.ascontiguousarray(box)


class CropDataset(torch.utils.data.Dataset):
    """Random crops as uint8 (3, crop, crop) tensors; unreadable files are skipped with a warning."""

    MAX_TRIES = 64

    def __init__(self, samples: list[Sample], crop_size: int, seed: int = 0):
        self.samples = samples
        self.crop = crop_size
        self.seed = seed
        self._bad: set[int] = set()
        self._rng: np.random.Generator | None = None
        self._rng_pid = -1

    def __len__(self) -> int:
        return len(self.samples)

    def _generator(self) -> np.random.Generator:
        # One generator per process: DataLoader workers get distinct torch seeds, derive from them.
        if self._rng is None or self._rng_pid != os.getpid():
            self._rng = np.random.default_rng([self.seed, torch.initial_seed() % 2**63])
            self._rng_pid = os.getpid()
        return self._rng

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = self._generator()
        for attempt in range(self.MAX_TRIES):
            i = index if attempt == 0 else int(rng.integers(len(self.samples)))
            if i in self._bad:
                continue
            try:
                rgb = read_sample(self.samples[i])
            except Exception as exc:  # any unreadable file: skip it, never stop training
                self._bad.add(i)
                log.warning("skipping unreadable training image %s: %s", sample_name(self.samples[i]), exc)
                continue
            return torch.from_numpy(random_crop(rgb, self.crop, rng)).permute(2, 0, 1).contiguous()  # NCHW
        raise RuntimeError(f"no readable image in {self.MAX_TRIES} tries: is the training data corrupt?")


class InfiniteSampler(torch.utils.data.Sampler[int]):
    """Endless reshuffled passes over the dataset; rank r of `world` takes every world-th index
    of the same permutation, so ranks see disjoint images in each pass. Endless, so workers
    never drain and restart at epoch boundaries."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        if n < world:
            raise ValueError(f"{n} training images cannot be split over {world} workers")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world

    def __iter__(self) -> Iterator[int]:
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            yield from torch.randperm(self.n, generator=g)[self.rank::self.world].tolist()
            epoch += 1


def load_val_images(urls: str | Sequence[str] | None, count: int) -> list[np.ndarray]:
    """The first `count` readable images, center-cropped to at most 512 x 512."""
    images: list[np.ndarray] = []
    if not urls or count == 0:
        return images
    for sample in list_samples(urls):
        try:
            rgb = read_sample(sample)
        except Exception as exc:
            log.warning("skipping unreadable validation image %s: %s", sample_name(sample), exc)
            continue
        h, w = rgb.shape[:2]
        ch, cw = min(h, VAL_MAX_SIDE), min(w, VAL_MAX_SIDE)
        top, left = (h - ch) // 2, (w - cw) // 2
        images.append(np.ascontiguousarray(rgb[top:top + ch, left:left + cw]))
        if len(images) == count:
            break
    return images


# ====================================================================== loss, schedules, validation


def rate_distortion(out: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bpp, mse) in fp32 from M2TCodec.forward's output; x in [0, 1]."""
    lik = out["likelihoods"]["y"].float()  # (B, C, h, w)
    mask = out["rate_mask"]  # (B, 1, h, w) bool: all True for M2T, the masked tokens for MT
    bits = (-torch.log2(lik)).sum(1, keepdim=True)  # (B, 1, h, w) bits per token
    masked_bits = (bits * mask).sum()
    # MT: scale the masked tokens' bits to all tokens (M2T: factor 1).
    total_bits = masked_bits * (mask.numel() / mask.sum().clamp_min(1))
    bpp = total_bits / (x.shape[0] * x.shape[2] * x.shape[3])
    mse = F.mse_loss(out["x_hat"].float() * 255.0, x * 255.0)
    return bpp, mse


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr, then constant, / 10 from lr_decay_at * steps (step is 1-based)."""
    lr = cfg.lr * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    return lr / 10 if step > cfg.lr_decay_at * cfg.steps else lr


def lmbda_at(cfg: TrainConfig, step: int) -> float:
    return cfg.lmbda * (cfg.lambda_boost if step <= cfg.lambda_boost_fraction * cfg.steps else 1.0)


def qat_start_step(cfg: TrainConfig) -> int:
    """The step at which quantisation-aware training starts (past the end: never)."""
    return math.ceil(cfg.qat_from * cfg.steps) + 1 if cfg.qat_from < 1.0 else cfg.steps + 1


@torch.no_grad()
def start_qat(model: M2TCodec, x: torch.Tensor) -> None:
    """Calibrate the exact entropy model on the latents of batch `x` (B, 3, H, W) in [0, 1]
    and switch the entropy model to quantisation-aware training."""
    from m2t_core.codec import pad_latent, to_windows

    was_training = model.training
    model.eval()
    y = torch.round(model.g_a(x.float()))
    tokens = to_windows(pad_latent(y, model.cfg.window), model.cfg.window)  # (B*nW, L, C)
    model.calibrate_exact(tokens.float())
    model.train(was_training)
    model.qat = True


def copy_weights(model: M2TCodec, source: M2TCodec) -> None:
    """Load `source`'s transforms, float entropy model and (if it has one) exact model into
    `model`; a source without an exact model leaves `model`'s to be re-exported."""
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("legacy_entropy_model.")}
    missing = model.load_state_dict(state, strict=False).missing_keys
    if any(not k.startswith("exact.") for k in missing):
        raise RuntimeError(f"checkpoint lacks tensors {missing[:5]}")
    if source.exact is not None:
        model.mark_exact_synced()


def validate(model: M2TCodec, images: list[np.ndarray]) -> dict[str, float]:
    """Real entropy coding: mean bpp of the bitstreams and mean PSNR of the decoder's output."""
    was_training = model.training
    model.eval()
    bpps, psnrs = [], []
    try:
        for rgb in images:
            enc = model.encode_image(rgb)
            bpps.append(enc.bpp)
            psnrs.append(psnr(model.reconstruct(enc), rgb))
    finally:
        model.train(was_training)
    return {"bpp": float(np.mean(bpps)), "psnr": float(np.mean(psnrs)), "images": len(images)}


# ====================================================================== checkpoints


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def has_state(out_dir: Path) -> bool:
    return (out_dir / "last-state.json").is_file()


def save_state(out_dir: Path, model: M2TCodec, optimizer: torch.optim.Optimizer, step: int,
               elapsed_s: float, cfg: TrainConfig) -> None:
    """Weights + optimizer tensors + a JSON of scalars; the JSON is written last and names
    the step, so a crash between the writes is detected on resume."""
    opt = optimizer.state_dict()
    tensors = {f"{pid}.{name}": t.detach().to("cpu").contiguous()
               for pid, state in opt["state"].items() for name, t in state.items() if torch.is_tensor(t)}
    _atomic_write(out_dir / "last-optim.safetensors",
                  lambda p: save_file(tensors, str(p), metadata={"step": str(step)}))
    registry.save_checkpoint(model, out_dir / "last.safetensors", cfg.model_id,
                             info={"step": step, "training_state": True}, dtype=torch.float32)
    state = {"step": step, "elapsed_s": elapsed_s, "seed": cfg.seed, "model_id": cfg.model_id,
             "param_groups": opt["param_groups"]}
    _atomic_write(out_dir / "last-state.json", lambda p: p.write_text(json.dumps(state, indent=1)))


def load_state(out_dir: Path, model: M2TCodec, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """Restore weights and optimizer state; returns (step, elapsed seconds)."""
    state = json.loads((out_dir / "last-state.json").read_text())
    step = int(state["step"])
    weights_step = registry.read_metadata(out_dir / "last.safetensors")[2].get("step")
    tensors = load_file(str(out_dir / "last-optim.safetensors"))
    with safe_open(str(out_dir / "last-optim.safetensors"), framework="pt") as f:
        optim_step = int((f.metadata() or {}).get("step", -1))
    if weights_step != step or optim_step != step:
        raise RuntimeError(f"{out_dir}: checkpoint files disagree (state step {step}, weights {weights_step}, "
                           f"optimizer {optim_step}): the last save was interrupted")
    copy_weights(model, registry.load_checkpoint(out_dir / "last.safetensors"))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = t
    # Hyper-parameters come from the current config (lr is set every step); only the moments
    # are restored, so a GPU state resumes on a CPU and vice versa.
    optimizer.load_state_dict({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})
    return step, float(state.get("elapsed_s", 0.0))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    _atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in keep)))


def hardware_name(device: torch.device, world: int) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_model()} ({os.cpu_count()} cores)"
    return f"{world} x {name}" if world > 1 else name


# ====================================================================== the loop


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def pick_device(name: str) -> torch.device:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:  # torch.cuda.set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
    return device


@contextlib.contextmanager
def cpu_threads(count: int):
    """Intra-op threads for this run (0: leave PyTorch's default), restored afterwards. Small
    models on a busy CPU run far faster on one thread: spinning OpenMP threads that wait for
    a taken core made a toy model's steps 100x slower (2.6 s instead of 20 ms)."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


def train_loop(loop_config: dict[str, Any]) -> None:
    """One training worker. loop_config: {"train": TrainConfig dict (prepared), "resume": bool,
    "ray": bool}. Runs in-process, or as a Ray Train worker (then ranks come from Ray)."""
    _setup_logging()
    cfg = loop_config["train"]
    with cpu_threads(cfg["cpu_threads"] if cfg["device"] == "cpu" else 0):
        _train_worker(loop_config)


def _train_worker(loop_config: dict[str, Any]) -> None:
    cfg = dataclass_from_dict(TrainConfig, loop_config["train"])
    under_ray = bool(loop_config.get("ray"))
    if under_ray:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        device = ray.train.torch.get_device()
    else:
        rank, world, device = 0, 1, pick_device(cfg.device)
    is_main = rank == 0
    out_dir = Path(cfg.output_dir)
    metrics_path = out_dir / "metrics.jsonl"

    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed crop size: autotune once
        torch.backends.cuda.matmul.allow_tf32 = True  # training only; coding turns it off itself
        torch.backends.cudnn.allow_tf32 = True

    model_cfg = ModelConfig.from_dict(cfg.model)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = M2TCodec(model_cfg, model_id=cfg.model_id)
    resuming = bool(loop_config.get("resume")) and has_state(out_dir)
    if cfg.init_from and not resuming:
        copy_weights(model, registry.load_checkpoint(cfg.init_from))
        log.info("initialised from %s", cfg.init_from)
    # On the device before the optimizer exists, so restored moments land next to their params.
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    start_step, elapsed_before = 0, 0.0
    if resuming:
        start_step, elapsed_before = load_state(out_dir, model, optimizer)
        log.info("resuming %s at step %d", out_dir, start_step)
    qat_step = qat_start_step(cfg)
    model.qat = start_step >= qat_step  # the exponents were calibrated before the checkpoint
    if start_step >= cfg.steps:
        log.info("nothing to train: step %d >= steps %d", start_step, cfg.steps)

    # Random streams differ per resume point (a resumed run does not replay the crops it has
    # seen) and per rank, reproducibly; the shuffle is shared by all ranks, which split it.
    shuffle_seed = int(np.random.SeedSequence([cfg.seed, start_step]).generate_state(1)[0])
    run_seed = int(np.random.SeedSequence([cfg.seed, start_step, rank]).generate_state(1)[0])
    torch.manual_seed(run_seed)
    samples = list_samples(cfg.train_data)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(out_dir / "config.yaml", lambda p: p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
        if start_step:
            _truncate_metrics(metrics_path, start_step)
        log.info("%d training images from %s on %s x %d", len(samples), cfg.train_data, device, world)
    val_images = load_val_images(cfg.val_data, cfg.val_images) if is_main else []

    workers = cfg.num_workers
    loader = torch.utils.data.DataLoader(
        CropDataset(samples, cfg.crop_size, seed=run_seed),
        batch_size=cfg.batch_size,
        sampler=InfiniteSampler(len(samples), seed=shuffle_seed, rank=rank, world=world),
        num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(run_seed),
    )
    net: torch.nn.Module = model
    if under_ray and world > 1:
        import ray.train.torch

        # MT never uses the M2T input embedding: DDP must be told that some parameters get no grad.
        net = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": model_cfg.mode == "mt"})
    if cfg.compile:
        net = torch.compile(net)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")

    def append_metrics(record: dict[str, Any]) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def run_validation(step: int, which: M2TCodec, exported: bool = False) -> dict[str, float] | None:
        if not val_images:
            return None
        t0 = time.time()
        result = validate(which, val_images)
        log.info("val step %d: %.4f bpp  %.2f dB PSNR  (%d images, real coding, %.1f s)",
                 step, result["bpp"], result["psnr"], result["images"], time.time() - t0)
        append_metrics({"kind": "val", "step": step, **result, "exported": exported})
        return result

    model.train()
    batches = iter(loader)
    sums = torch.zeros(3, device=device)  # loss, bpp, mse since the last log (no per-step sync)
    t_start = t_log = time.time()
    paused = 0.0  # seconds spent validating / checkpointing since t_log (not training throughput)
    step_log = start_step
    for step in range(start_step + 1, cfg.steps + 1):
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = next(batches).to(device, non_blocking=True).float().div_(255.0)
        if step == qat_step:
            start_qat(model, x)
            log.info("step %d: exact entropy model calibrated; quantisation-aware training from here", step)
        with autocast:
            out = net(x, cfg.mt_mask_range)
        bpp, mse = rate_distortion(out, x)
        loss = bpp + lmbda_at(cfg, step) * mse
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        sums += torch.stack([loss.detach(), bpp.detach(), mse.detach()])

        if step % cfg.log_every == 0 or step == cfg.steps:
            n = step - step_log
            loss_v, bpp_v, mse_v = (sums / n).tolist()
            if not math.isfinite(loss_v):
                raise RuntimeError(f"training diverged at step {step} (loss {loss_v}); lower lr or use amp: none")
            now = time.time()
            rate = n / max(now - t_log - paused, 1e-9)  # steps per second
            record = {"kind": "train", "step": step, "loss": loss_v, "bpp": bpp_v, "mse": mse_v,
                      "psnr": psnr_from_mse(mse_v), "lr": lr, "lmbda": lmbda_at(cfg, step),
                      "images_per_s": rate * cfg.batch_size * world,
                      "elapsed_s": elapsed_before + now - t_start, "eta_s": (cfg.steps - step) / rate}
            if is_main:
                log.info("step %d/%d  loss %.4f  bpp %.4f  PSNR %.2f dB  %.0f img/s  ETA %s",
                         step, cfg.steps, loss_v, bpp_v, record["psnr"], record["images_per_s"],
                         _hms(record["eta_s"]))
                append_metrics(record)
            sums.zero_()
            t_log, paused, step_log = now, 0.0, step

        t_pause = time.time()
        if is_main and step % cfg.val_every == 0 and step != cfg.steps:
            run_validation(step, model)
        if is_main and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save_state(out_dir, model, optimizer, step, elapsed_before + time.time() - t_start, cfg)
        paused += time.time() - t_pause
    if not model.qat and start_step < cfg.steps:  # qat_from = 1: calibrate for the export
        start_qat(model, x)
    del batches, loader  # stops the DataLoader workers

    if is_main:
        export(cfg, model, device, world, elapsed_before + time.time() - t_start, run_validation,
               max(start_step, cfg.steps))


def export(cfg: TrainConfig, model: M2TCodec, device: torch.device, world: int, wall_s: float,
           run_validation, step: int) -> Path:
    """Round the weights to export_dtype, validate THAT model (its figures are what users get),
    write <model_id>.safetensors."""
    dtype = EXPORT_DTYPES[cfg.export_dtype]
    exported = M2TCodec(model.cfg, model_id=cfg.model_id)
    exported.load_state_dict({k: v.to(dtype).to(v.dtype) if v.is_floating_point() else v
                              for k, v in model.state_dict().items()})
    exported.mark_exact_synced()  # the exact integers are the model: not re-derived from fp16
    exported.to(device).eval()
    val = run_validation(step, exported, exported=True)
    info = {
        "train_data": cfg.train_data, "val_data": cfg.val_data, "crop_size": cfg.crop_size,
        "steps": step, "batch_size": cfg.batch_size * world, "lambda": cfg.lmbda,
        "distortion": "MSE on the 0..255 scale", "lr": cfg.lr, "amp": cfg.amp, "init_from": cfg.init_from,
        "wall_time_s": round(wall_s, 1), "hardware": hardware_name(device, world),
        "val_bpp": val["bpp"] if val else None, "val_psnr": val["psnr"] if val else None,
        "val_images": val["images"] if val else 0,
    }
    path = registry.save_checkpoint(exported, Path(cfg.output_dir) / f"{cfg.model_id}.safetensors",
                                    cfg.model_id, info=info, dtype=dtype, float_entropy_model=False)
    log.info("exported %s (%s)", path, cfg.export_dtype)
    return path


# ====================================================================== launching


def _check_output_dir(cfg: TrainConfig, resume: bool) -> None:
    out_dir = Path(cfg.output_dir)
    if has_state(out_dir) and not resume:
        step = json.loads((out_dir / "last-state.json").read_text()).get("step")
        raise ConfigError(f"{out_dir} already holds a training state at step {step}: "
                          "pass --resume to continue it, or choose another output_dir")
    if resume and not has_state(out_dir):
        log.warning("--resume: no training state in %s, starting from step 0", out_dir)


def run_with_ray(cfg: TrainConfig, resume: bool) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()  # connects to RAY_ADDRESS when set, else starts a local cluster
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    workers = cfg.ray.workers
    # Never ask for resources the cluster lacks: such actors would wait forever.
    use_gpu = gpus >= 1 if cfg.ray.use_gpu is None else cfg.ray.use_gpu
    if use_gpu and gpus < workers:
        raise ConfigError(f"ray: {workers} GPU workers requested, the cluster has {gpus:g} GPUs")
    if workers * cfg.ray.cpus_per_worker > cpus:
        raise ConfigError(f"ray: {workers} workers x {cfg.ray.cpus_per_worker} CPUs requested, "
                          f"the cluster has {cpus:g} CPUs")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": cfg.to_dict(), "resume": resume, "ray": True},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=cfg.model_id, storage_path=str(Path(cfg.output_dir) / "ray")),
    )
    trainer.fit()


def train(cfg: TrainConfig, resume: bool = False, use_ray: bool = False) -> Path:
    """Train (in-process or on Ray) and return the path of the exported model."""
    cfg = prepare_config(cfg)
    for url in [cfg.train_data] if isinstance(cfg.train_data, str) else cfg.train_data:
        fs, root = _fs(url)
        if not (fs.glob(root) if any(c in root for c in "*?[") else fs.exists(root)):
            raise ConfigError(f"train_data not found: {url}")
    _check_output_dir(cfg, resume)
    if use_ray:
        run_with_ray(cfg, resume)
    else:
        train_loop({"train": cfg.to_dict(), "resume": resume, "ray": False})
    return Path(cfg.output_dir) / f"{cfg.model_id}.safetensors"


def _ray_available() -> bool:
    try:
        import ray  # noqa: F401
        import ray.train.torch  # noqa: F401
    except Exception:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m2t train", description="Train an M2T / MT codec.")
    parser.add_argument("--config", required=True, help="training config YAML (configs/train/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (dotted keys for nested, YAML values); repeatable")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir's last state")
    parser.add_argument("--no-ray", action="store_true", help="train in this process, without Ray")
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        use_ray = not args.no_ray and _ray_available()
        if not args.no_ray and not use_ray:
            log.info("ray is not installed: training in this process")
        path = train(cfg, resume=args.resume, use_ray=use_ray)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
