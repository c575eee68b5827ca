#!/usr/bin/env python3
"""What latent refinement buys: rate-distortion and encode time of the shipped ladder with and
without it, real bitstreams (a benchmark).

    python bench/refine_rd.py --data ../shared/datasets/val --crop 512 --steps 0,20,40,80   # choose on val
    python bench/refine_rd.py --data ../shared/datasets/val --crop 512 --steps 0,40 --lr 0.01,0.03,0.1
    python bench/refine_rd.py --steps 0,40 --threads 2                                      # Kodak, all 24

For every model of --models, every image and every (steps, lr): g_a's latent is refined in
`steps` gradient steps (m2t_core/refine.py; 0: the plain encoder), coded (`Encoder.encode_latent`)
and the stream decoded by `Decoder.decompress` (the pixels measured are the decoder's). Reported:
mean bpp and PSNR per model and setting, median seconds to refine and code an image, and the
BD-rate and BD-PSNR (pchip, `pipeline.evaluation.rd`) of each refined ladder against the plain
one, and, with --reference (default: the committed Kodak run when --data is Kodak), against every
codec of that evaluation. Images: every .png/.jpg under --data (recursively), centre-cropped to
--crop pixels a side if given. Writes OUT.json and OUT.md (default bench/results/refine_rd).
Tune on `val`, never on Kodak.
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

from bench._common import (DEFAULT_DATA, SHIPPED_M2T, fmt_db, fmt_pct, load_avg, load_cropped,  # noqa: E402
                           markdown_table, reference_curves, study_images, write_report)


def code_images(model, images: list[tuple[str, np.ndarray]], settings: list[tuple[int, float]]) -> dict:
    """(steps, lr) -> one row per image: bpp, PSNR of the decoded stream, seconds to refine and code."""
    from m2t_core import Decoder, Encoder, refine
    from m2t_core.metrics import psnr

    encoder, decoder = Encoder(model), Decoder(model)
    rows: dict[tuple[int, float], list[dict]] = {s: [] for s in settings}
    for name, rgb in images:
        H, W = rgb.shape[:2]
        y = model.latent(rgb)
        for steps, lr in settings:
            t0 = time.perf_counter()
            y_hat = refine.rounded(refine.refine_latent(model, rgb, y, steps, lr=lr)) if steps else model.quantize(y)
            stream = encoder.encode_latent(y_hat, H, W).bitstream
            seconds = time.perf_counter() - t0
            decoded = decoder.decompress(stream)
            rows[steps, lr].append({"image": name, "bytes": len(stream), "bpp": 8 * len(stream) / (H * W),
                                    "psnr": float(psnr(rgb, decoded)), "encode_s": seconds})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=SHIPPED_M2T, help=f"comma-separated fixed-rate models (default {SHIPPED_M2T})")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA / "kodak", help="folder of PNG/JPEG images")
    ap.add_argument("--crop", type=int, default=0, help="centre crops of at most this many pixels a side (0: whole)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    ap.add_argument("--steps", default="0,40", help="comma-separated refinement steps; 0 is the plain encoder")
    ap.add_argument("--lr", default=None, help="comma-separated learning rates (default refine.DEFAULT_LR)")
    ap.add_argument("--reference", type=Path, default=None,
                    help="per-image table of other codecs on the same images (default: the committed Kodak run "
                         "when --data is Kodak; '' for none)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/refine_rd")
    args = ap.parse_args(argv)

    from m2t_core import refine
    from m2t_core.registry import load_model
    from pipeline.evaluation.rd import bd_psnr, bd_rate

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        steps = [int(s) for s in args.steps.split(",")]
        lrs = [float(v) for v in args.lr.split(",")] if args.lr else [refine.DEFAULT_LR]
    except ValueError:
        ap.error("--steps takes integers and --lr numbers, comma-separated")
    if 0 not in steps or min(steps) < 0 or min(lrs) <= 0:
        ap.error("--steps must include 0 (the plain encoder, the anchor) and no negative count; --lr must be > 0")
    settings = [(0, 0.0)] + [(s, lr) for s in steps if s for lr in lrs]
    paths = study_images(args.data, args.limit)
    if not paths:
        ap.error(f"no PNG or JPEG images under {args.data}")
    reference = args.reference
    if reference is None:
        kodak = args.data.resolve() == (DEFAULT_DATA / "kodak").resolve() and not args.crop
        reference = REPO / "docs/results/kodak/per_image.parquet" if kodak else Path("")
    images = [(p.name, load_cropped(p, args.crop)) for p in paths]
    t0 = time.time()
    per_model, curves = {}, {s: {"bpp": [], "psnr": []} for s in settings}
    for name in args.models.split(","):
        try:
            model = load_model(name)
            refine.model_lambda(model)
        except (FileNotFoundError, LookupError, ValueError) as exc:  # ModelNotFoundError, RefineError
            ap.error(f"--models {name}: {exc}")
        rows = code_images(model, images, settings)
        per_model[name] = {f"{s}@{lr:g}": r for (s, lr), r in rows.items()}
        for s in settings:
            curves[s]["bpp"].append(float(np.mean([r["bpp"] for r in rows[s]])))
            curves[s]["psnr"].append(float(np.mean([r["psnr"] for r in rows[s]])))
        print(f"{name}: " + ", ".join(f"{s[0]} steps{'' if not s[0] else f' lr {s[1]:g}'}: {curves[s]['bpp'][-1]:.4f} "
                                      f"bpp {curves[s]['psnr'][-1]:.2f} dB" for s in settings), flush=True)
    use_reference = str(reference) not in ("", ".")
    anchors = {"plain": curves[0, 0.0]}
    if use_reference:
        anchors.update(reference_curves(reference, [p.name for p in paths]))
    bd = {f"{s}@{lr:g}": {name: {"bd_rate": bd_rate(a, curves[s, lr]), "bd_psnr": bd_psnr(a, curves[s, lr])}
                          for name, a in anchors.items()} for s, lr in settings}
    report = {"models": args.models.split(","), "data": str(args.data), "images": len(paths), "crop": args.crop or None,
              "settings": [f"{s}@{lr:g}" for s, lr in settings], "curves": {f"{s}@{lr:g}": c for (s, lr), c in curves.items()},
              "bd": bd, "per_model": per_model, "reference": str(reference) if use_reference else None,
              "torch_threads": torch.get_num_threads(), "wall_s": round(time.time() - t0, 1), "load_avg": load_avg()}
    lines = [f"# Latent refinement on {args.data.name} ({len(paths)} images{f', crops <= {args.crop}' if args.crop else ''})"
             f", real bitstreams, {torch.get_num_threads()} torch thread(s)", ""]
    table = []
    for i, name in enumerate(args.models.split(",")):
        for s, lr in settings:
            table.append([name, s, f"{lr:g}" if s else "-", f"{curves[s, lr]['bpp'][i]:.4f}", f"{curves[s, lr]['psnr'][i]:.2f}",
                          f"{np.median([r['encode_s'] for r in per_model[name][f'{s}@{lr:g}']]):.2f}"])
    lines += markdown_table(["model", "steps", "lr", "mean bpp", "mean PSNR (dB)", "median encode s"], table)
    lines += ["", "BD-rate / BD-PSNR (pchip; negative: fewer bits) of each setting's ladder against:", ""]
    names = list(anchors)
    lines += markdown_table(["setting"] + names, [[key] + [f"{fmt_pct(bd[key][n]['bd_rate']['value'])} / "
                                                           f"{fmt_db(bd[key][n]['bd_psnr']['value'])}" for n in names]
                                                  for key in bd if not key.startswith("0@")])
    write_report(args.out.with_suffix(".json"), report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
