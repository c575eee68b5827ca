#!/usr/bin/env python3
"""Format 5 against format 4 on the decoder's side: integer-v2 g_s (8-bit weights, one plane
of int8 products) against integer-v1 (two planes), interleaved in one process (a benchmark).

    python bench/synthesis_ab.py                      # m2t-small-q3, kodim01, 1 thread
    python bench/synthesis_ab.py --threads 2 --images kodim01.png,kodim13.png

This VM's speed drifts by up to +-20 % over minutes, so both arithmetics run on the same
latent back to back, round after round, and the medians of the rounds are compared. Per
image: the integer g_s of each format alone (`model.synthesis(y, H, W, version)`) and the
whole decode (`Decoder.decompress` of the format-5 stream; for format 4 its decode_latent and
the integer-v1 g_s: the two formats share the stream's layout and latent). Each decode is
checked against the encoder's reconstruction of its format. Writes OUT.json (default
bench/results/synthesis_ab_t<threads>.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import DEFAULT_DATA, load_avg, write_report  # noqa: E402


def _timed(work) -> float:
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0


def measure(model, rgb: np.ndarray, rounds: int) -> dict:
    from m2t_core import Decoder, Encoder, int8_conv

    enc = Encoder(model).encode_image(rgb)
    decoder = Decoder(model)
    H, W = rgb.shape[:2]
    y = enc.y_hat
    if not np.array_equal(decoder.decompress(enc.bitstream), model.synthesis(y, H, W, version=5)):
        raise RuntimeError("format 5: the decoded image differs from the encoder's reconstruction")
    work = {
        "g_s integer-v1 (format 4)": lambda: model.synthesis(y, H, W, version=4),
        "g_s integer-v2 (format 5)": lambda: model.synthesis(y, H, W, version=5),
        "decompress, format 4": lambda: model.synthesis(decoder.decode_latent(enc.bitstream)[1], H, W, version=4),
        "decompress, format 5": lambda: decoder.decompress(enc.bitstream),
    }
    for w in work.values():
        w()  # warm-up: derivation, probes, oneDNN kernels
    times: dict[str, list[float]] = {k: [] for k in work}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, w in work.items():
                times[name].append(_timed(w))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"bytes": len(enc.bitstream), "median_s": med, "runs_s": times, "int8_conv": int8_conv.status(),
            "speedup_g_s": med["g_s integer-v1 (format 4)"] / med["g_s integer-v2 (format 5)"],
            "speedup_decompress": med["decompress, format 4"] / med["decompress, format 5"]}


def main(argv: list[str] | None = None) -> int:
    from m2t_core import load_model
    from m2t_core.image_io import load_image
    from m2t_core.sysinfo import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="m2t-small-q3")
    ap.add_argument("--kodak", type=Path, default=DEFAULT_DATA / "kodak")
    ap.add_argument("--images", default="kodim01.png", help="comma-separated file names in --kodak")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    results = {}
    for name in args.images.split(","):
        results[name] = r = measure(model, load_image(args.kodak / name), args.rounds)
        print(f"{name} ({args.model}, {args.threads} thread(s), medians of {args.rounds} interleaved rounds):")
        for stage, s in r["median_s"].items():
            print(f"  {stage:<28} {s:.3f} s")
        print(f"  g_s {r['speedup_g_s']:.2f}x, decompress {r['speedup_decompress']:.2f}x faster in format 5")
    report = {"benchmark": "synthesis_ab", "command": " ".join(["bench/synthesis_ab.py"] + (argv or sys.argv[1:])),
              "model": args.model, "threads": args.threads, "rounds": args.rounds,
              "machine": {"cpu": cpu_model(), "torch": torch.__version__}, "load_average_after": load_avg(),
              "images": results}
    write_report(args.out or REPO / "bench" / "results" / f"synthesis_ab_t{args.threads}.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
