"""What the exact (integer) entropy model costs against the float one it replaces, on real
bitstreams: bytes, BD-rate, and encode/decode time per image.

    python bench/exact_vs_float.py --data ../shared/datasets/kodak      # all converted models
    python bench/exact_vs_float.py --models m2t-small-q3 --limit 4       # quicker

For every image and every converted model (one that keeps its float entropy weights as
`legacy_entropy_model`), the same latent y_hat (the transforms are unchanged) is coded twice:
format version 1 (float entropy model, `encode_image(format_version=1)`) and format version 2
(exact model). The distortion is therefore identical and the rate difference is the whole
cost. Every version-2 stream is decoded and checked against the encoder's reconstruction.
Times are medians over the images, one torch thread. Writes bench/results/exact_vs_float.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import DEFAULT_DATA, REPO, LoadMeter, code_state, write_report  # noqa: E402
from m2t_core import load_image, load_model  # noqa: E402
from m2t_core.metrics import psnr  # noqa: E402
from m2t_core.registry import PACKAGE_WEIGHTS  # noqa: E402
from m2t_core.sysinfo import cpu_model  # noqa: E402


def converted_models() -> list[str]:
    names = []
    for path in sorted(PACKAGE_WEIGHTS.glob("*.safetensors")):
        model = load_model(path.stem)
        if model.exact is not None and model.legacy_entropy_model is not None:
            names.append(path.stem)
    return names


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "kodak")
    parser.add_argument("--models", default="all", help="comma-separated names, or all converted models")
    parser.add_argument("--limit", type=int, default=0, help="first N images only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "exact_vs_float.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    files = sorted(p for p in args.data.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if args.limit:
        files = files[: args.limit]
    if not files:
        raise SystemExit(f"no images in {args.data}")
    names = converted_models() if args.models == "all" else args.models.split(",")
    images = [load_image(f) for f in files]
    meter = LoadMeter()
    per_model = {}
    for name in names:
        model = load_model(name)
        rows = []
        for f, rgb in zip(files, images):
            v1, t_enc1 = timed(lambda: model.encode_image(rgb, format_version=1))
            v2, t_enc2 = timed(lambda: model.encode_image(rgb))
            assert torch.equal(v1.y_hat, v2.y_hat), f"{name} {f.name}: the two encodes saw different latents"
            recon = model.reconstruct(v2)
            dec1, t_dec1 = timed(lambda: model.decompress(v1.bitstream))
            dec2, t_dec2 = timed(lambda: model.decompress(v2.bitstream))
            if not np.array_equal(dec2, recon):
                raise SystemExit(f"{name} {f.name}: format-2 decode differs from the encoder's reconstruction")
            pixels = rgb.shape[0] * rgb.shape[1]
            rows.append({"image": f.name, "bytes_float": len(v1.bitstream), "bytes_exact": len(v2.bitstream),
                         "bpp_float": 8 * len(v1.bitstream) / pixels, "bpp_exact": 8 * len(v2.bitstream) / pixels,
                         "psnr": psnr(rgb, recon), "v1_decodes_here": bool(np.array_equal(dec1, recon)),
                         "encode_s_float": t_enc1, "encode_s_exact": t_enc2,
                         "decode_s_float": t_dec1, "decode_s_exact": t_dec2})
            print(f"{name} {f.name}: {rows[-1]['bytes_float']} -> {rows[-1]['bytes_exact']} bytes, "
                  f"encode {t_enc1:.2f} -> {t_enc2:.2f} s, decode {t_dec1:.2f} -> {t_dec2:.2f} s", flush=True)
        col = lambda k: np.array([r[k] for r in rows])  # noqa: E731
        per_model[name] = {
            "mode": model.cfg.mode, "images": len(rows),
            "bpp_float": float(col("bpp_float").mean()), "bpp_exact": float(col("bpp_exact").mean()),
            "psnr": float(col("psnr").mean()),
            "bytes_change_pct": 100 * (col("bytes_exact").sum() / col("bytes_float").sum() - 1),
            "median_s": {k: float(np.median(col(k))) for k in
                         ("encode_s_float", "encode_s_exact", "decode_s_float", "decode_s_exact")},
            "rows": rows,
        }
    load = meter.other_cores()
    # BD-rate over the M2T rate points (the same PSNR at every point: only the rate moves).
    m2t = [n for n in names if per_model[n]["mode"] == "m2t"]
    bd = None
    if len(m2t) >= 4:
        from pipeline.evaluation.rd import bd_rate

        curve = lambda key: {"bpp": [per_model[n][key] for n in m2t], "psnr": [per_model[n]["psnr"] for n in m2t]}  # noqa: E731
        bd = bd_rate(curve("bpp_float"), curve("bpp_exact"))
    report = {"data": str(args.data), "images": len(files), "threads": args.threads, "cpu": cpu_model(),
              "torch": torch.__version__, "other_load_cores": load, "code": code_state(),
              "bd_rate_exact_vs_float_pct": bd, "models": per_model}
    write_report(args.out, report)
    print(f"\n{'model':<16}{'bpp float':>10}{'bpp exact':>10}{'bytes':>9}{'enc s':>14}{'dec s':>14}")
    for n, m in per_model.items():
        t = m["median_s"]
        print(f"{n:<16}{m['bpp_float']:>10.4f}{m['bpp_exact']:>10.4f}{m['bytes_change_pct']:>+8.2f}%"
              f"{t['encode_s_float']:>7.2f}->{t['encode_s_exact']:<5.2f}{t['decode_s_float']:>7.2f}->{t['decode_s_exact']:<5.2f}")
    if bd:
        print(f"BD-rate of the exact models against the float ones (M2T, pchip): {bd['value']:+.3f} %"
              + (f" ({bd['note']})" if bd.get("note") else ""))
    print(f"other processes kept {load} cores busy on average" if load is not None else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
