"""A short measured probe of training throughput on this machine: the real training step
(trainer.train_step) on synthetic crops for a few batch sizes, crop sizes and settings, so a
run's batch size comes from a measurement instead of a guess.

    m2t train --config configs/train/m2t-small-cpu.yaml --probe
    m2t train --config configs/train/m2t-small-cpu.yaml --probe --probe-batches 4,8,16 --probe-crops 192,256

A step's cost does not depend on the pixels (every token is coded, every layer runs), so
random crops measure it; each candidate runs one warm-up step and `steps` timed ones, and the
median counts. Crops/s grows as crops shrink while pixels/s need not: the table shows both,
and the best batch is picked at the configured crop size (a crop smaller than the model's
window trains on padded windows, a larger one changes what the model sees; that choice is
the config's, not throughput's).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
import torch

from m2t_core import M2TCodec
from m2t_core.config import ModelConfig
from pipeline.training import trainer as T
from pipeline.training.train_config import TrainConfig


def measure(cfg: TrainConfig, batch_size: int, crop: int, amp: str, channels_last: bool,
            steps: int = 3, device: torch.device | None = None) -> dict:
    """Median seconds of `steps` training steps (after one warm-up) of a fresh model."""
    device = device or T.pick_device(cfg.device)
    amp = T.resolve_amp(amp, device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = M2TCodec(ModelConfig.from_dict(cfg.model)).to(device, memory_format=layout).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
    batch = torch.randint(0, 256, (batch_size, crop, crop, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # (B, 3, H, W), NHWC memory
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        T.train_step(model, model, optimizer, T.to_input(batch, device, layout), cfg.lmbda, cfg, autocast).tolist()
        if i:
            times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    return {"batch_size": batch_size, "crop_size": crop, "amp": amp, "channels_last": channels_last,
            "s_per_step": seconds, "crops_per_s": batch_size / seconds,
            "mpx_per_s": batch_size * crop * crop / seconds / 1e6}


def probe(cfg: TrainConfig, batch_sizes: Sequence[int], crop_sizes: Sequence[int] = (), steps: int = 3,
          settings: Sequence[tuple[str, bool]] = ()) -> tuple[list[dict], dict]:
    """Rows for every (crop, batch) at the config's amp and layout, plus the config's batch
    under each other (amp, channels_last) in `settings`; and the best row at the config's crop."""
    crops = list(crop_sizes) or [cfg.crop_size]
    device = T.pick_device(cfg.device)
    rows = []
    with T.cpu_threads(cfg.cpu_threads if device.type == "cpu" else 0):
        for crop in crops:
            for batch in batch_sizes:
                rows.append(measure(cfg, batch, crop, cfg.amp, cfg.channels_last, steps, device))
                print(_row(rows[-1]), flush=True)
        for amp, channels_last in settings:
            rows.append(measure(cfg, cfg.batch_size, cfg.crop_size, amp, channels_last, steps, device))
            print(_row(rows[-1]), flush=True)
    at_crop = [r for r in rows if r["crop_size"] == cfg.crop_size and r["amp"] == T.resolve_amp(cfg.amp, device)
               and r["channels_last"] == cfg.channels_last] or rows
    return rows, max(at_crop, key=lambda r: r["crops_per_s"])


def _row(r: dict) -> str:
    return (f"crop {r['crop_size']:4d}  batch {r['batch_size']:3d}  amp {r['amp']:4s}  "
            f"{'NHWC' if r['channels_last'] else 'NCHW'}  {r['s_per_step']:7.3f} s/step  "
            f"{r['crops_per_s']:7.2f} crops/s  {r['mpx_per_s']:6.3f} Mpx/s")


def run_probe(cfg: TrainConfig, batches: Sequence[int], crops: Sequence[int]) -> int:
    cfg = dataclasses.replace(cfg, model=T.resolve_model_config(cfg).to_dict())
    amp = T.resolve_amp(cfg.amp, T.pick_device(cfg.device))
    other_amp = "none" if amp == "bf16" else "bf16"
    settings = [(other_amp, cfg.channels_last), (amp, not cfg.channels_last)]  # what each setting is worth
    print(f"probe: {cfg.model_id} on {T.hardware_name(T.pick_device(cfg.device), 1)}, {torch.get_num_threads()} threads")
    _, best = probe(cfg, batches, crops, settings=settings)
    print(f"fastest at crop {best['crop_size']}: batch_size {best['batch_size']} "
          f"({best['crops_per_s']:.2f} crops/s; the config has {cfg.batch_size})")
    return 0
