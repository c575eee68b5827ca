"""Training job for the M2T / MT codec: loss, the loop, export, Ray launch (the config in
train_config.py; crops from pool.py in memory, device_pool.py on the GPU or data.py streaming;
the resumable state in checkpoints.py; probe.py measures steps/s).

    python jobs/train.py --config configs/train/m2t-small.yaml --set train_data=/data/photos
    m2t train --config configs/train/m2t-small.yaml --set train_data=s3://bucket/shards --resume
    m2t train --config configs/train/m2t-small.yaml --set train_data=/data/hf-dataset/train-*.parquet

Training reads what `m2t compress` reads (folders and globs of images, .tar shards, Parquet
files with an image column), on any fsspec URL.

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
  last.safetensors, last-optim.safetensors, last-state.json   the training state (checkpoints.py)
  <model_id>.safetensors          the export (export_dtype), loadable by m2t_core.registry
No file is ever unpickled; every write goes to a temporary file first (os.replace).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml

from m2t_core import M2TCodec, rate, registry
from m2t_core.config import ConfigError, ModelConfig, dataclass_from_dict
from m2t_core.metrics import psnr, psnr_from_mse
from m2t_core.sysinfo import cpu_model, native_bf16
from pipeline.storage.sources import SourceCache, SourceError, filesystem
from pipeline.training.checkpoints import (atomic_write, copy_weights, has_state, load_state, save_state,
                                           saved_step, truncate_metrics)
from pipeline.training.data import CropDataset, InfiniteSampler, list_samples, load_val_images
from pipeline.training.device_pool import DeviceBatches
from pipeline.training.pool import BatchStream, ImagePool
from pipeline.training.train_config import EXPORT_DTYPES, TrainConfig, load_config, prepare_config, train_sources
from pipeline.training.train_config import RayConfig, resolve_model_config  # noqa: F401 (the job's API, as before)

log = logging.getLogger(__name__)

# ====================================================================== loss, schedules, validation


def rate_distortion(out: dict, x: torch.Tensor, per_image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(bpp, mse) in fp32 from M2TCodec.forward's output; x in [0, 1]. per_image: each (B,)."""
    lik = out["likelihoods"]["y"].float()  # (B, C, h, w)
    mask = out["rate_mask"]  # (B, 1, h, w) bool: all True for M2T, the masked tokens for MT
    bits = (-torch.log2(lik)).sum(1, keepdim=True)  # (B, 1, h, w) bits per token
    masked_bits = (bits * mask).sum((1, 2, 3))  # (B,)
    # MT: scale the masked tokens' bits to all tokens (M2T: factor 1).
    image_bits = masked_bits * (mask.numel() / mask.sum().clamp_min(1))
    bpp = image_bits / (x.shape[2] * x.shape[3])  # (B,)
    mse = (out["x_hat"].float() * 255.0 - x * 255.0).square().mean((1, 2, 3))  # (B,)
    return (bpp, mse) if per_image else (bpp.mean(), mse.mean())


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
def start_qat(model: M2TCodec, x: torch.Tensor, recalibrate: bool = True) -> None:
    """Calibrate the exact entropy model on the latents of batch `x` (B, 3, H, W) in [0, 1]
    and switch the entropy model to quantisation-aware training. recalibrate=False keeps the
    exponents the model has (a warm start's), re-exporting the integers on them."""
    from m2t_core.coding import pad_latent, to_windows

    if not recalibrate:
        model.sync_exact()  # the integers of the weights as trained, on the exponents they came with
        model.qat = True
        return
    was_training = model.training
    model.eval()
    y = model.g_a(x.float())
    quality, inverse = None, 1.0
    if model.rate_levels:  # a variable-rate model's latents at qualities across its range
        quality = torch.linspace(1, model.rate_levels, x.shape[0], device=x.device)  # (B,)
        v = model.float_rate(quality)[0][:, :, None, None]  # (B, C, 1, 1)
        y, inverse = y * torch.exp2(v), torch.exp2(-v)
    y = torch.round(y)
    tokens = to_windows(pad_latent(y, model.cfg.window), model.cfg.window)  # (B*nW, L, C)
    if quality is not None:
        quality = quality.repeat_interleave(tokens.shape[0] // x.shape[0])  # per window
    model.calibrate_exact(tokens.float(), quality)
    model.calibrate_synthesis([y * inverse])  # the integer g_s's exponents, from the same latents
    model.train(was_training)
    model.qat = True


def validate(model: M2TCodec, images: list[np.ndarray]) -> dict[str, float]:
    """Real entropy coding: mean bpp of the bitstreams and mean PSNR of the decoder's output."""
    from m2t_core import Encoder

    was_training = model.training
    model.eval()
    bpps, psnrs = [], []
    try:
        for enc, rgb in zip(Encoder(model, reconstruct=True).encode(images), images):
            if isinstance(enc, Exception):
                raise enc
            bpps.append(enc.bpp)
            psnrs.append(psnr(enc.x_hat, rgb))
    finally:
        model.train(was_training)
    return {"bpp": float(np.mean(bpps)), "psnr": float(np.mean(psnrs)), "images": len(images)}


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


def resolve_amp(amp: str, device: torch.device) -> str:
    """"auto" -> "bf16" where the device computes bf16 natively, else "none". On the 2-core
    AMD EPYC VM (AVX512-BF16) bf16 autocast made a m2t-small step 2.2x faster (bench/train_speed.py)."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    return "bf16" if native_bf16() else "none"


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


@dataclass
class _Worker:
    """Where this training worker runs: its rank among `world`, its device, whether under Ray."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    under_ray: bool
    amp: str  # resolved: "none" | "bf16"

    @property
    def is_main(self) -> bool:  # rank 0 logs, validates, checkpoints and exports
        return self.rank == 0

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output_dir)


def _train_worker(loop_config: dict[str, Any]) -> None:
    cfg = dataclass_from_dict(TrainConfig, loop_config["train"])
    worker = _place_worker(cfg, under_ray=bool(loop_config.get("ray")))
    model, optimizer, start_step, elapsed_before = _build_model(worker, resume=bool(loop_config.get("resume")))

    # Random streams differ per resume point (a resumed run does not replay the crops it has
    # seen) and per rank, reproducibly; the shuffle is shared by all ranks, which split it.
    shuffle_seed = int(np.random.SeedSequence([cfg.seed, start_step]).generate_state(1)[0])
    run_seed = int(np.random.SeedSequence([cfg.seed, start_step, worker.rank]).generate_state(1)[0])
    torch.manual_seed(run_seed)
    if worker.is_main:
        worker.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(worker.out_dir / "config.yaml",
                     lambda p: p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
        if start_step:
            truncate_metrics(worker.out_dir / "metrics.jsonl", start_step)
        log.info("training on %s x %d, amp %s, %s, loader %s", worker.device, worker.world, worker.amp,
                 "channels-last" if cfg.channels_last else "NCHW", cfg.loader)
    run_log = _RunLog(worker, load_val_images(cfg.val_data, cfg.val_images, cfg.parquet_image_column)
                      if worker.is_main else [])
    batches, stop_batches = _batches(worker, shuffle_seed, run_seed)
    try:
        x, t_start, last_step = _train_steps(worker, model, optimizer, batches, start_step, elapsed_before, run_log)
        if not model.qat and start_step < last_step:  # qat_from = 1 or a time limit: calibrate for the export
            start_qat(model, x, cfg.recalibrate)
    finally:
        stop_batches()

    if worker.is_main:
        export(cfg, model, worker.device, worker.world, elapsed_before + time.time() - t_start,
               run_log.validation, last_step, amp=worker.amp)


def _place_worker(cfg: TrainConfig, under_ray: bool) -> _Worker:
    """This worker's rank and device (from Ray Train under Ray), with CUDA set up for training."""
    if under_ray:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        device = ray.train.torch.get_device()
    else:
        rank, world, device = 0, 1, pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed crop size: autotune once
        torch.backends.cuda.matmul.allow_tf32 = True  # training only; coding turns it off itself
        torch.backends.cudnn.allow_tf32 = True
    return _Worker(cfg, rank, world, device, under_ray, resolve_amp(cfg.amp, device))


def _build_model(worker: _Worker, resume: bool) -> tuple[M2TCodec, torch.optim.Optimizer, int, float]:
    """The model and optimizer on the worker's device, from init_from or the run's last state:
    (model, optimizer, the step to continue from, seconds trained before)."""
    cfg, device = worker.cfg, worker.device
    model_cfg = ModelConfig.from_dict(cfg.model)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = M2TCodec(model_cfg, model_id=cfg.model_id)
    resuming = resume and has_state(worker.out_dir)
    if cfg.init_from and not resuming:
        copy_weights(model, registry.load_checkpoint(cfg.init_from))
        log.info("initialised from %s", cfg.init_from)
    # On the device before the optimizer exists, so restored moments land next to their params.
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    start_step, elapsed_before = 0, 0.0
    if resuming:
        start_step, elapsed_before = load_state(worker.out_dir, model, optimizer)
        log.info("resuming %s at step %d", worker.out_dir, start_step)
    model.qat = start_step >= qat_start_step(cfg)  # the exponents were calibrated before the checkpoint
    if start_step >= cfg.steps:
        log.info("nothing to train: step %d >= steps %d", start_step, cfg.steps)
    return model, optimizer, start_step, elapsed_before


def _batches(worker: _Worker, shuffle_seed: int, run_seed: int):
    """(an endless iterator of uint8 (B, 3, crop, crop) batches, a function that stops it)."""
    cfg = worker.cfg
    if cfg.loader in ("memory", "device"):
        threads = cfg.cpu_threads or torch.get_num_threads()
        pool = ImagePool.load(train_sources(cfg), cfg.crop_size, cfg.memory_mb, seed=run_seed, rank=worker.rank,
                              world=worker.world, image_column=cfg.parquet_image_column, threads=threads)
        if cfg.loader == "device":
            stream = DeviceBatches(pool, cfg.batch_size, seed=run_seed, device=worker.device)
            log.info("training images on %s: %.0f MB", worker.device, stream.nbytes / 2**20)
        else:
            stream = BatchStream(pool, cfg.batch_size, seed=run_seed)
        return stream, stream.close
    sources = SourceCache()  # holds the tar indexes listed here, for the DataLoader workers
    samples = list_samples(cfg.train_data, cfg.parquet_image_column, sources)
    if worker.is_main:
        log.info("%d training images from %s", len(samples), cfg.train_data)
    loader = _data_loader(worker, CropDataset(samples, cfg.crop_size, seed=run_seed,
                                              image_column=cfg.parquet_image_column, cache=sources),
                          shuffle_seed, run_seed)
    batches = iter(loader)

    def stop() -> None:
        nonlocal batches, loader
        del batches, loader  # stops the DataLoader workers
    return batches, stop


def _data_loader(worker: _Worker, dataset: CropDataset, shuffle_seed: int,
                 run_seed: int) -> torch.utils.data.DataLoader:
    workers = worker.cfg.num_workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=worker.cfg.batch_size,
        sampler=InfiniteSampler(len(dataset), seed=shuffle_seed, rank=worker.rank, world=worker.world),
        num_workers=workers, pin_memory=worker.device.type == "cuda", drop_last=True,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(run_seed),
    )


def _training_net(worker: _Worker, model: M2TCodec) -> torch.nn.Module:
    """What the steps call: the model, wrapped in DDP across Ray workers, compiled if asked."""
    net: torch.nn.Module = model
    if worker.under_ray and worker.world > 1:
        import ray.train.torch

        # MT never uses the M2T input embedding: DDP must be told that some parameters get no grad.
        net = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": model.cfg.mode == "mt"})
    if worker.cfg.compile:
        net = torch.compile(net)
    return net


class _RunLog:
    """metrics.jsonl, written by rank 0: training records and validations (real coding)."""

    def __init__(self, worker: _Worker, val_images: list[np.ndarray]):
        self.worker, self.val_images = worker, val_images
        self.path = worker.out_dir / "metrics.jsonl"

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def validation(self, step: int, which: M2TCodec, exported: bool = False) -> dict[str, float] | None:
        if not self.val_images:
            return None
        t0 = time.time()
        result = validate(which, self.val_images)
        log.info("val step %d: %.4f bpp  %.2f dB PSNR  (%d images, real coding, %.1f s)",
                 step, result["bpp"], result["psnr"], result["images"], time.time() - t0)
        self.append({"kind": "val", "step": step, **result, "exported": exported})
        return result

    def progress(self, step: int, lr: float, means: list[float], steps_per_s: float, elapsed_s: float) -> None:
        """The means of loss, bpp and mse since the last record; every rank checks them."""
        cfg = self.worker.cfg
        loss_v, bpp_v, mse_v = means
        if not math.isfinite(loss_v):
            raise RuntimeError(f"training diverged at step {step} (loss {loss_v}); lower lr or use amp: none")
        record = {"kind": "train", "step": step, "loss": loss_v, "bpp": bpp_v, "mse": mse_v,
                  "psnr": psnr_from_mse(mse_v), "lr": lr, "lmbda": lmbda_at(cfg, step),
                  "images_per_s": steps_per_s * cfg.batch_size * self.worker.world,
                  "elapsed_s": elapsed_s, "eta_s": (cfg.steps - step) / steps_per_s}
        if self.worker.is_main:
            log.info("step %d/%d  loss %.4f  bpp %.4f  PSNR %.2f dB  %.0f img/s  ETA %s",
                     step, cfg.steps, loss_v, bpp_v, record["psnr"], record["images_per_s"],
                     _hms(record["eta_s"]))
            self.append(record)


def to_input(batch: torch.Tensor, device: torch.device, layout: torch.memory_format) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1] on the device, in the training layout."""
    return batch.to(device, non_blocking=True).float().div_(255.0).contiguous(memory_format=layout)


def train_step(net: torch.nn.Module, model: M2TCodec, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               lmbda: float, cfg: TrainConfig, autocast) -> torch.Tensor:
    """One optimisation step on batch x; returns (loss, bpp, mse), detached, on the device.
    A variable-rate model trains every image at its own quality, drawn uniformly from [1, K],
    with that quality's lambda (rate.lambda_of; `lmbda` is then unused)."""
    if model.rate_levels:
        quality = 1 + (model.rate_levels - 1) * torch.rand(x.shape[0], device=x.device)  # (B,)
        with autocast:
            out = net(x, cfg.mt_mask_range, quality)
        bpp_i, mse_i = rate_distortion(out, x, per_image=True)
        loss = (bpp_i + rate.lambda_of(quality, model.cfg.rate_lambdas) * mse_i).mean()
        bpp, mse = bpp_i.mean(), mse_i.mean()
    else:
        with autocast:
            out = net(x, cfg.mt_mask_range)
        bpp, mse = rate_distortion(out, x)
        loss = bpp + lmbda * mse
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return torch.stack([loss.detach(), bpp.detach(), mse.detach()])


def _train_steps(worker: _Worker, model: M2TCodec, optimizer: torch.optim.Optimizer, batches: Iterator,
                 start_step: int, elapsed_before: float, run_log: _RunLog) -> tuple[torch.Tensor | None, float, int]:
    """Steps start_step + 1 .. cfg.steps, with logging, validation and checkpoints on rank 0.
    Returns the last batch (None if no step ran), the time the steps started and the last step
    (below cfg.steps when cfg.time_limit_s stopped the run)."""
    cfg, device = worker.cfg, worker.device
    net = _training_net(worker, model)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=worker.amp == "bf16")
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    qat_step = qat_start_step(cfg)
    model.train()
    x = None
    sums = torch.zeros(3, device=device)  # loss, bpp, mse since the last log (no per-step sync)
    t_start = t_log = time.time()
    paused = 0.0  # seconds spent validating / checkpointing since t_log (not training throughput)
    step_log = start_step
    for step in range(start_step + 1, cfg.steps + 1):
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = to_input(next(batches), device, layout)
        if step == qat_step:
            start_qat(model, x, cfg.recalibrate)
            log.info("step %d: exact entropy model %s; quantisation-aware training from here", step,
                     "calibrated" if cfg.recalibrate else "on the exponents it came with")
        sums += train_step(net, model, optimizer, x, lmbda_at(cfg, step), cfg, autocast)

        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.time()
            steps_per_s = (step - step_log) / max(now - t_log - paused, 1e-9)
            run_log.progress(step, lr, (sums / (step - step_log)).tolist(), steps_per_s,
                             elapsed_before + now - t_start)
            sums.zero_()
            t_log, paused, step_log = now, 0.0, step

        t_pause = time.time()
        if worker.is_main and step % cfg.val_every == 0 and step != cfg.steps:
            run_log.validation(step, model)
        if worker.is_main and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save_state(worker.out_dir, model, optimizer, step, elapsed_before + time.time() - t_start, cfg)
        paused += time.time() - t_pause
        if cfg.time_limit_s and time.time() - t_start >= cfg.time_limit_s and step < cfg.steps:
            log.info("time limit of %.0f s reached at step %d of %d: stopping here", cfg.time_limit_s, step, cfg.steps)
            if step % cfg.checkpoint_every:
                save_state(worker.out_dir, model, optimizer, step, elapsed_before + time.time() - t_start, cfg)
            return x, t_start, step
    return x, t_start, max(start_step, cfg.steps)



def export(cfg: TrainConfig, model: M2TCodec, device: torch.device, world: int, wall_s: float,
           run_validation, step: int, amp: str | None = None) -> Path:
    """Round the weights to export_dtype, validate THAT model (its figures are what users get),
    write <model_id>.safetensors."""
    dtype = EXPORT_DTYPES[cfg.export_dtype]
    model.sync_exact()  # the integer models follow the float weights trained since calibration
    exported = M2TCodec(model.cfg, model_id=cfg.model_id)
    exported.load_state_dict({k: v.to(dtype).to(v.dtype) if v.is_floating_point() else v
                              for k, v in model.state_dict().items()})
    # The exact entropy integers are the model (its floats are rebuilt from them), while the
    # integer g_s follows the float g_s as exported: derived from the rounded weights, so the
    # checkpoint can leave them out (registry.save_checkpoint) and loading gives them back.
    exported.g_s_int.export_from(exported.g_s)
    exported.mark_exact_synced()
    exported.to(device).eval()
    val = run_validation(step, exported, exported=True)
    info = {
        "train_data": cfg.train_data, "val_data": cfg.val_data, "crop_size": cfg.crop_size,
        "steps": step, "batch_size": cfg.batch_size * world,
        # A variable-rate model has a lambda per level (its config), none of its own.
        "lambda": None if model.rate_levels else cfg.lmbda,
        "crops_seen": step * cfg.batch_size * world, "loader": cfg.loader, "channels_last": cfg.channels_last,
        "distortion": "MSE on the 0..255 scale", "lr": cfg.lr, "amp": amp or cfg.amp, "init_from": cfg.init_from,
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
        raise ConfigError(f"{out_dir} already holds a training state at step {saved_step(out_dir)}: "
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
    for url in [u for spec in train_sources(cfg) for u in spec.urls]:
        fs, root = filesystem(url)
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
    parser.add_argument("--probe", action="store_true",
                        help="measure training steps/s for a few batch sizes on this machine, then stop")
    parser.add_argument("--probe-batches", default="4,8,16", help="--probe: batch sizes (default 4,8,16)")
    parser.add_argument("--probe-crops", default="", help="--probe: crop sizes (default: the config's)")
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.probe:
            from pipeline.training.probe import run_probe

            ints = lambda text: [int(v) for v in text.split(",") if v.strip()]
            return run_probe(cfg, ints(args.probe_batches), ints(args.probe_crops))
        use_ray = not args.no_ray and _ray_available()
        if not args.no_ray and not use_ray:
            log.info("ray is not installed: training in this process")
        path = train(cfg, resume=args.resume, use_ray=use_ray)
    except (ConfigError, SourceError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
