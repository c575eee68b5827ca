#!/usr/bin/env python3
"""What wider transforms and latents cost on a CPU: for a few (N, C) of the m2t-small preset,
parameters, training crops/s and one Kodak image's encode and decode time on one thread.

    python bench/capacity_sweep.py                       # ~5 minutes on a 2-core CPU
    python bench/capacity_sweep.py --sizes 64x128,128x320

The speed half of choosing C and N for models that reach high rates (issue 23): a user who
decodes on a CPU must keep a fast model, so every candidate's decode time sits next to its
training cost before any of them is trained. Rate-distortion needs trained models and is not
measured here. Models are random-initialised with a fixed seed (speed does not depend on
training except through the entropy coder's work, which depends on the latent's statistics:
a random g_a with its last layer scaled gives latents of the trained models' magnitude);
the integer g_s is calibrated on a synthetic latent as registry does for old checkpoints.
Decode: `Decoder.decompress` of kodim01 (768x512) on one thread, checked equal to the
encoder's reconstruction; encode: `Encoder.encode_image`; each the median of --repeats after
a warm-up. Training: pipeline.training.probe.measure (the real training step, batch 8, crop
256, the trainer's default amp and channels-last) on all cores. Results:
bench/results/capacity_sweep.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import DEFAULT_DATA, REPO, LoadMeter, bench_image, code_state, markdown_table, write_report  # noqa: E402

SEED = 0
LATENT_GAIN = 8.0  # g_a's last layer x8: |y_hat| ~ 1-10, as tests/_models.build_model explains


def build(N: int, C: int):
    import torch

    from m2t_core import M2TCodec, ModelConfig
    from m2t_core.registry import _calibrate_synthesis_without_data

    torch.manual_seed(SEED)
    model = M2TCodec(ModelConfig(N=N, C=C), model_id=f"sweep-N{N}-C{C}")
    with torch.no_grad():
        last = [m for m in model.g_a.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == C][0]
        last.weight.mul_(LATENT_GAIN)
    model.eval()
    _calibrate_synthesis_without_data(model)
    return model


def median_time(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(N: int, C: int, rgb, repeats: int, threads: int) -> dict:
    import numpy as np
    import torch

    from m2t_core import Decoder, Encoder, ModelConfig
    from pipeline.training import probe
    from pipeline.training.train_config import load_config

    model = build(N, C)
    params = sum(p.numel() for p in model.parameters())
    torch.set_num_threads(1)
    encode_s, enc = median_time(lambda: Encoder(model, reconstruct=True).encode_image(rgb), repeats)
    decode_s, decoded = median_time(lambda: Decoder(model).decompress(enc.bitstream), repeats)
    if not np.array_equal(decoded, enc.x_hat):
        raise RuntimeError(f"N={N} C={C}: the decoded image differs from the encoder's reconstruction")
    torch.set_num_threads(threads)
    overrides = ["init_from=null", "device=cpu", "model=" + json.dumps(ModelConfig(N=N, C=C).to_dict())]
    cfg = load_config(REPO / "configs" / "train" / "m2t-small-cpu.yaml", overrides)
    step = probe.measure(cfg, 8, 256, cfg.amp, cfg.channels_last, steps=2)
    row = {"N": N, "C": C, "params_M": round(params / 1e6, 2), "bpp_random_init": round(enc.bpp, 3),
           "encode_s_1thread": round(encode_s, 3), "decode_s_1thread": round(decode_s, 3),
           "train_crops_per_s": round(step["crops_per_s"], 2), "train_amp": step["amp"]}
    print(row, flush=True)
    return row


def markdown(report: dict) -> str:
    rows = report["rows"]
    base = rows[0]
    lines = [f"# Capacity sweep: {report['machine']}", "",
             f"`{report['command']}`; torch {report['torch']}; kodim01 (768x512) on one thread; training on "
             f"{report['threads']} threads, batch 8, crop 256. Random-initialised models: speed only.", ""]
    lines += markdown_table(
        ["N", "C", "params (M)", "encode (s)", "decode (s)", "decode x", "train crops/s", "train x"],
        [[r["N"], r["C"], r["params_M"], f"{r['encode_s_1thread']:.2f}", f"{r['decode_s_1thread']:.2f}",
          f"{r['decode_s_1thread'] / base['decode_s_1thread']:.2f}", f"{r['train_crops_per_s']:.2f}",
          f"{r['train_crops_per_s'] / base['train_crops_per_s']:.2f}"] for r in rows])
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64x128,64x192,96x192,128x192,128x320", help="NxC list; the first is the baseline")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "capacity_sweep.json")
    args = ap.parse_args()
    import torch

    from m2t_core.sysinfo import cpu_model

    threads = torch.get_num_threads()
    rgb, source = bench_image((768, 512), args.data_root)
    meter = LoadMeter()
    rows = [measure(*(int(v) for v in size.lower().split("x")), rgb, args.repeats, threads)
            for size in args.sizes.split(",") if size]
    report = {"machine": f"{cpu_model()} ({os.cpu_count()} cores)", "torch": torch.__version__, "threads": threads,
              "image": source, "command": "python bench/capacity_sweep.py " + " ".join(sys.argv[1:]),
              "other_cores_busy": meter.other_cores(), "rows": rows, **code_state()}
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
