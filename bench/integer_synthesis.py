#!/usr/bin/env python3
"""What the integer synthesis transforms and formats 4 and 5 cost in rate-distortion (a benchmark).

    python bench/integer_synthesis.py                 # every shipped model, all 24 Kodak images
    python bench/integer_synthesis.py --quick         # 4 images

For every image and model, one real bitstream (`Encoder.encode_image`, format 5) and three
decodes of its latent: integer-v2 (format 5, m2t 0.6: 8-bit weights), integer-v1 (format 4,
m2t 0.4-0.5) and the float g_s both are exported from (what m2t 0.3 decoded with). Formats 4
and 5 have one layout, so one stream's size is the rate of both; the format-3 size is it
minus the piece checksums (2 bytes a piece: a step of a chunk). Reported per model: mean bpp
and PSNR of each, and over the four M2T rate points the BD-rate (pchip,
`pipeline.evaluation.rd.bd_rate`) of
  * each integer g_s against the float g_s at the same rates (the synthesis alone),
  * integer-v2 against integer-v1 (what format 5 costs against format 4), and
  * the current format against m2t 0.3 (format 3, float g_s) (all of it);
for the single MT model, the PSNR and bpp differences. Writes OUT.json and OUT.md
(default bench/results/integer_synthesis).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import DEFAULT_DATA, load_avg  # noqa: E402


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    from m2t_core.metrics import psnr

    return float(psnr(a, b))


def measure(model, rgbs: list[np.ndarray]) -> dict:
    from m2t_core import Encoder, bitstream as bs, tiling

    rows = []
    encoder = Encoder(model)
    for rgb in rgbs:
        enc = encoder.encode_image(rgb)
        H, W = rgb.shape[:2]
        header = bs.read_header(enc.bitstream)
        assert header.version == bs.FORMAT_VERSION
        with torch.inference_mode():
            x_v2 = model.decompress(enc.bitstream)
            x_v1 = model.synthesis(enc.y_hat, H, W, version=4)
            x_float = tiling.synthesis(model.g_s, enc.y_hat[None].float(), H, W).permute(1, 2, 0).numpy()
        bytes_now = len(enc.bitstream)
        bytes_v3 = bytes_now - 2 * header.num_steps * header.num_chunks
        diff = np.abs(x_v2.astype(int) - x_float.astype(int))
        rows.append({"bytes": bytes_now, "bytes_v3": bytes_v3, "pixels": H * W,
                     "psnr_integer_v2": _psnr(rgb, x_v2), "psnr_integer_v1": _psnr(rgb, x_v1),
                     "psnr_float": _psnr(rgb, x_float),
                     "max_abs_diff_v2": int(diff.max()), "frac_diff_v2": float((diff > 0).mean())})
    mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    return {
        "bpp": float(np.mean([8 * r["bytes"] / r["pixels"] for r in rows])),
        "bpp_v3": float(np.mean([8 * r["bytes_v3"] / r["pixels"] for r in rows])),
        "psnr_integer_v2": mean("psnr_integer_v2"), "psnr_integer_v1": mean("psnr_integer_v1"),
        "psnr_float": mean("psnr_float"), "max_abs_diff_v2": max(r["max_abs_diff_v2"] for r in rows),
        "frac_diff_v2": mean("frac_diff_v2"), "images": rows,
    }


def main(argv: list[str] | None = None) -> int:
    from m2t_core import load_model
    from m2t_core.image_io import load_image
    from m2t_core.registry import PACKAGE_WEIGHTS
    from m2t_core.sysinfo import cpu_model
    from pipeline.evaluation.rd import bd_rate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kodak", type=Path, default=DEFAULT_DATA / "kodak")
    ap.add_argument("--quick", action="store_true", help="4 images")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "integer_synthesis")
    args = ap.parse_args(argv)
    paths = sorted(p for p in args.kodak.iterdir() if p.suffix.lower() == ".png")[: 4 if args.quick else None]
    if not paths:
        raise SystemExit(f"no PNG images in {args.kodak}")
    rgbs = [load_image(p) for p in paths]
    t0 = time.time()
    results = {}
    for path in sorted(PACKAGE_WEIGHTS.glob("*.safetensors")):
        results[path.stem] = measure(load_model(path.stem), rgbs)
        r = results[path.stem]
        print(f"{path.stem}: bpp {r['bpp_v3']:.5f} (format 3) {r['bpp']:.5f} (formats 4, 5); PSNR float g_s "
              f"{r['psnr_float']:.4f} integer-v1 {r['psnr_integer_v1']:.4f} integer-v2 {r['psnr_integer_v2']:.4f} dB; "
              f"v2 pixels differing from float {r['frac_diff_v2']:.2%}, at most {r['max_abs_diff_v2']} levels",
              flush=True)
    m2t = [n for n in results if n.startswith("m2t-")]
    curve = lambda bpp, psnr: {"bpp": [results[n][bpp] for n in m2t], "psnr": [results[n][psnr] for n in m2t]}  # noqa: E731
    summary = {
        "bd_rate_integer_v1_vs_float_g_s_pct": bd_rate(curve("bpp", "psnr_float"), curve("bpp", "psnr_integer_v1")),
        "bd_rate_integer_v2_vs_float_g_s_pct": bd_rate(curve("bpp", "psnr_float"), curve("bpp", "psnr_integer_v2")),
        "bd_rate_format_5_vs_4_pct": bd_rate(curve("bpp", "psnr_integer_v1"), curve("bpp", "psnr_integer_v2")),
        "bd_rate_format_5_vs_3_pct": bd_rate(curve("bpp_v3", "psnr_float"), curve("bpp", "psnr_integer_v2")),
    }
    report = {"benchmark": "integer_synthesis", "command": " ".join(["bench/integer_synthesis.py"] + (argv or sys.argv[1:])),
              "machine": {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads()},
              "load_average_after": load_avg(), "images": [p.name for p in paths],
              "seconds": round(time.time() - t0, 1), "summary": summary,
              "models": {n: {k: v for k, v in r.items() if k != "images"} for n, r in results.items()},
              "per_image": {n: r["images"] for n, r in results.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["| model | bpp format 3 | bpp formats 4, 5 | PSNR float g_s | PSNR integer-v1 (format 4) | "
             "PSNR integer-v2 (format 5) | v2 pixels differing from float |", "|---|---:|---:|---:|---:|---:|---:|"]
    for n, r in results.items():
        lines.append(f"| {n} | {r['bpp_v3']:.5f} | {r['bpp']:.5f} | {r['psnr_float']:.4f} | "
                     f"{r['psnr_integer_v1']:.4f} | {r['psnr_integer_v2']:.4f} | "
                     f"{r['frac_diff_v2']:.2%} (max {r['max_abs_diff_v2']}) |")
    bd = lambda key: f"{summary[key]['value']:+.3f} %"  # noqa: E731
    lines += ["", "BD-rate (M2T q1-q4, pchip) at the same rates:",
              f"- integer-v1 (format 4) vs float g_s: {bd('bd_rate_integer_v1_vs_float_g_s_pct')}",
              f"- integer-v2 (format 5) vs float g_s: {bd('bd_rate_integer_v2_vs_float_g_s_pct')}",
              f"- integer-v2 vs integer-v1 (format 5 vs 4): {bd('bd_rate_format_5_vs_4_pct')}",
              f"- format 5 vs m2t 0.3 (format 3, float g_s): {bd('bd_rate_format_5_vs_3_pct')}",
              "", f"Kodak, {len(paths)} images; {report['machine'].get('cpu')}; `{report['command']}`"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-8:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
