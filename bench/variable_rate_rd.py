#!/usr/bin/env python3
"""Rate-distortion of a variable-rate model over its quality range, with real bitstreams (a benchmark).

    python bench/variable_rate_rd.py --model runs/vr/m2t-small-vr.safetensors    # all 24 Kodak images, Q = 1..K
    python bench/variable_rate_rd.py --model runs/vr/m2t-small-vr.safetensors --qualities 1,2.5,4 --limit 4
    python bench/variable_rate_rd.py --model runs/vr/m2t-small-vr.safetensors --data ../shared/datasets/val \
        --crop 512 --reference '' --ladder m2t-small-q1,m2t-small-q2,m2t-small-q3,m2t-small-q4  # val: vs the ladder

No variable-rate model ships yet: --model is a checkpoint you trained (docs/training.md,
configs/train/m2t-small-vr-cpu.yaml), or a registry name once one is installed.

For every image, g_a runs once; for every quality Q the latent is scaled, rounded and coded
(`Encoder.encode_latent`, format 6), and the stream is decoded by `Decoder.decompress` (the
pixels measured are the decoder's). Reported: mean bpp and PSNR per quality, and BD-rate
(pchip, `pipeline.evaluation.rd.bd_rate`) against every codec of a committed evaluation of
the same images (default docs/results/kodak/per_image.parquet: JPEG, WebP, AVIF, JPEG XL,
JPEG 2000 and the fixed-rate ladder), over their common rate range, and with --ladder
against fixed-rate models coded here on the same images (what `val` is judged with). Images:
every .png/.jpg under --data (recursively), centre-cropped to --crop pixels a side if given.
Writes OUT.json and OUT.md (default bench/results/variable_rate_rd).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import (DEFAULT_DATA, fmt_db, fmt_pct, load_avg, load_cropped, markdown_table,  # noqa: E402
                           reference_curves, study_images, write_report)


def code_images(model, paths: list[Path], qualities: list[float], crop: int = 0) -> dict[float, list[dict]]:
    """quality -> one row per image: bytes, bpp, PSNR of the decoded stream, seconds."""
    from m2t_core import Decoder, Encoder
    from m2t_core.metrics import psnr

    encoder, decoder = Encoder(model), Decoder(model)
    codes = [model.quality_code(q) for q in qualities]
    rows: dict[float, list[dict]] = {q: [] for q in qualities}
    for path in paths:
        rgb = load_cropped(path, crop)
        H, W = rgb.shape[:2]
        y = model.latent(rgb)
        for q, code in zip(qualities, codes):
            t0 = time.perf_counter()
            stream = encoder.encode_latent(model.quantize(y, code), H, W, code).bitstream
            t1 = time.perf_counter()
            decoded = decoder.decompress(stream)
            t2 = time.perf_counter()
            rows[q].append({"image": path.name, "bytes": len(stream), "bpp": 8 * len(stream) / (H * W),
                            "psnr": float(psnr(rgb, decoded)), "code_s": t1 - t0, "decode_s": t2 - t1})
        print(f"{path.name}: " + ", ".join(f"Q{q:g} {rows[q][-1]['bpp']:.3f} bpp {rows[q][-1]['psnr']:.2f} dB"
                                           for q in qualities), flush=True)
    return rows


def ladder_curves(names: list[str], paths: list[Path], crop: int) -> dict[str, dict[str, list]]:
    """{"ladder": {"bpp", "psnr"}}: fixed-rate models coded here (real streams, decoded) on the same images."""
    from m2t_core import Decoder, Encoder
    from m2t_core.metrics import psnr
    from m2t_core.registry import load_model

    images = [load_cropped(p, crop) for p in paths]
    curve: dict[str, list] = {"bpp": [], "psnr": [], "models": names}
    for name in names:
        model = load_model(name)
        bpps, psnrs = [], []
        for rgb in images:
            stream = Encoder(model).encode_image(rgb).bitstream
            bpps.append(8 * len(stream) / (rgb.shape[0] * rgb.shape[1]))
            psnrs.append(float(psnr(rgb, Decoder(model).decompress(stream))))
        curve["bpp"].append(float(np.mean(bpps)))
        curve["psnr"].append(float(np.mean(psnrs)))
        print(f"{name}: {curve['bpp'][-1]:.4f} bpp {curve['psnr'][-1]:.2f} dB", flush=True)
    return {"ladder": curve}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a variable-rate model: registry name or checkpoint path")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA / "kodak", help="folder of PNG images")
    ap.add_argument("--qualities", default=None, help="comma-separated (default: 1, 2, ..., K)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    ap.add_argument("--crop", type=int, default=0, help="centre crops of at most this many pixels a side (0: whole)")
    ap.add_argument("--ladder", default="", help="comma-separated fixed-rate models to code here and compare with")
    ap.add_argument("--reference", type=Path, default=REPO / "docs/results/kodak/per_image.parquet",
                    help="per-image table of other codecs on the same images ('' for none)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/variable_rate_rd")
    args = ap.parse_args(argv)

    from m2t_core.registry import load_model
    from pipeline.evaluation.rd import bd_psnr, bd_rate

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = load_model(args.model)
    except (FileNotFoundError, LookupError, ValueError) as exc:  # ModelNotFoundError is a LookupError
        ap.error(f"--model {args.model}: {exc}")
    if not model.rate_levels:
        ap.error(f"{args.model} is a fixed-rate model")
    qualities = ([float(q) for q in args.qualities.split(",")] if args.qualities
                 else [float(q) for q in range(1, model.rate_levels + 1)])
    paths = study_images(args.data, args.limit)
    if not paths:
        ap.error(f"no PNG or JPEG images under {args.data}")
    t0 = time.time()
    rows = code_images(model, paths, qualities, args.crop)
    curve = {"bpp": [float(np.mean([r["bpp"] for r in rows[q]])) for q in qualities],
             "psnr": [float(np.mean([r["psnr"] for r in rows[q]])) for q in qualities]}
    use_reference = str(args.reference) not in ("", ".")
    references = reference_curves(args.reference, [p.name for p in paths]) if use_reference else {}
    if args.ladder:
        references.update(ladder_curves(args.ladder.split(","), paths, args.crop))
    bd = {name: {"bd_rate": bd_rate(ref, curve), "bd_psnr": bd_psnr(ref, curve)} for name, ref in references.items()}
    report = {
        "model": model.model_id, "weights_hash": model.weights_hash(6).hex(),
        "rate_lambdas": list(model.cfg.rate_lambdas),
        "data": str(args.data), "images": len(paths), "crop": args.crop or None, "qualities": qualities, "curve": curve,
        "references": references,
        "per_quality": {str(q): rows[q] for q in qualities}, "reference": str(args.reference), "bd": bd,
        "torch_threads": torch.get_num_threads(), "wall_s": round(time.time() - t0, 1), "load_avg": load_avg(),
    }
    lines = [f"# {model.model_id} on {args.data.name} ({len(paths)} images), real bitstreams", ""]
    lines += markdown_table(["quality", "mean bpp", "mean PSNR (dB)", "median code s", "median decode s"],
                            [[f"{q:g}", f"{b:.4f}", f"{p:.2f}", f"{np.median([r['code_s'] for r in rows[q]]):.2f}",
                              f"{np.median([r['decode_s'] for r in rows[q]]):.2f}"]
                             for q, b, p in zip(qualities, curve["bpp"], curve["psnr"])])
    if bd:
        against = ", ".join(filter(None, [args.reference.name if use_reference else "",
                                          f"the ladder coded here ({args.ladder})" if args.ladder else ""]))
        lines += ["", f"BD-rate and BD-PSNR (pchip; negative: fewer bits) against {against}:", ""]
        lines += markdown_table(["against", "BD-rate", "BD-PSNR", "note"],
                                [[name, fmt_pct(v["bd_rate"]["value"]), fmt_db(v["bd_psnr"]["value"]),
                                  v["bd_rate"]["note"] or ""] for name, v in sorted(bd.items())])
    write_report(args.out.with_suffix(".json"), report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
