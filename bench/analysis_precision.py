#!/usr/bin/env python3
"""What running the analysis transform g_a in bf16 costs and buys (a benchmark, not a test).

The encoder decides the latent and the stream carries it, so g_a may round as it likes: a
decoder reproduces whatever latent was written. On CPUs with AMX-BF16 the frozen g_a runs
in bf16 by default (m2t_core/transforms.py, M2T_BF16_ANALYSIS). For every shipped model
(M2T and MT), on Kodak with real bitstreams (each image's latent from the float32 g_a, then
from the bf16 one, both coded and decoded with the exact codec), this reports:

* mean bpp and PSNR (RGB, 8 bits, per image then the mean) of each, and their differences;
* the fraction of the rounded latent's values that bf16 changes;
* g_a's time on the first image (median of --repeats, frozen forms both, --threads threads).

    python bench/analysis_precision.py [--models m2t-small-q1,...] [--images 24] [--threads 1]

Results: bench/results/analysis_precision.json / .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (SHIPPED_M2T, add_kodak_study_options, code_state, kodak_study_images,  # noqa: E402
                           markdown_table, write_report)


def _latent(model, rgb, run):
    """y_hat of an RGB image with g_a run by `run` (the codec's own path otherwise)."""
    import torch

    from m2t_core import tiling

    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    return model.quantize(tiling.analysis(model.g_a, x, run=run))


def measure(name: str, paths: list[Path], repeats: int) -> dict:
    import torch

    from m2t_core import Decoder, Encoder, load_model
    from m2t_core.image_io import load_image
    from m2t_core.metrics import bits_per_pixel, psnr
    from m2t_core.transforms import frozen_for_inference

    model = load_model(name)
    runs = {"float32": frozen_for_inference(model.g_a, 3, bf16=False),
            "bf16": frozen_for_inference(model.g_a, 3, bf16=True)}
    encoder, decoder = Encoder(model), Decoder(model)
    rd = {k: [] for k in runs}
    changed = []
    seconds = {}
    with torch.inference_mode():
        for n, path in enumerate(paths):
            rgb = load_image(path)
            H, W = rgb.shape[:2]
            latents = {k: _latent(model, rgb, run) for k, run in runs.items()}
            changed.append(float((latents["bf16"] != latents["float32"]).float().mean()))
            for k, y_hat in latents.items():
                stream = encoder.encode_latent(y_hat, H, W).bitstream
                rd[k].append((bits_per_pixel(len(stream), H, W), psnr(decoder.decompress(stream), rgb)))
            if n == 0:
                for k, run in runs.items():
                    times = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        _latent(model, rgb, run)
                        times.append(time.perf_counter() - t0)
                    seconds[k] = statistics.median(times)
    mean = {k: {"bpp": float(np.mean([b for b, _ in v])), "psnr": float(np.mean([p for _, p in v]))}
            for k, v in rd.items()}
    return {"mean": mean, "per_image": {k: v for k, v in rd.items()},
            "bpp_change_percent": 100 * (mean["bf16"]["bpp"] / mean["float32"]["bpp"] - 1),
            "psnr_change_db": mean["bf16"]["psnr"] - mean["float32"]["psnr"],
            "latent_values_changed": float(np.mean(changed)), "g_a_seconds_first_image": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_kodak_study_options(ap, SHIPPED_M2T + ",mt-small-q2", "analysis_precision.json")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    from m2t_core.sysinfo import cpu_model, native_bf16

    paths = kodak_study_images(ap, args)
    results = {}
    for name in args.models.split(","):
        results[name] = r = measure(name, paths, args.repeats)
        seconds = r["g_a_seconds_first_image"]
        print(f"{name}: bpp {r['bpp_change_percent']:+.3f} %, PSNR {r['psnr_change_db']:+.4f} dB, "
              f"{100 * r['latent_values_changed']:.2f} % of latent values changed; g_a "
              f"{seconds['float32']:.3f} -> {seconds['bf16']:.3f} s", flush=True)
    cpu = f"{cpu_model()} ({'native' if native_bf16() else 'emulated'} bf16)"
    rows = []
    for name, r in results.items():
        mean, seconds = r["mean"], r["g_a_seconds_first_image"]
        rows.append([name, f"{mean['float32']['bpp']:.5f} / {mean['bf16']['bpp']:.5f}",
                     f"{r['bpp_change_percent']:+.3f} %",
                     f"{mean['float32']['psnr']:.4f} / {mean['bf16']['psnr']:.4f}", f"{r['psnr_change_db']:+.4f}",
                     f"{100 * r['latent_values_changed']:.2f} %", f"{seconds['float32']:.3f} / {seconds['bf16']:.3f}"])
    header = ["model", "bpp float32 / bf16", "bpp change", "PSNR float32 / bf16 (dB)", "PSNR change (dB)",
              "latent values changed", "g_a float32 / bf16, s"]
    md = "\n".join([f"g_a in float32 against bf16 (frozen forms), {len(paths)} Kodak images, real bitstreams; "
                    f"{cpu}, {args.threads} thread(s); g_a time: the first image, median of {args.repeats}", ""]
                   + markdown_table(header, rows)) + "\n"
    report = {"benchmark": "analysis_precision", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "code": code_state(), "cpu": cpu, "threads": args.threads, "images": [p.name for p in paths],
              "results": results}
    write_report(args.out, report, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
