"""Rate-distortion of installed models on Kodak, with real bitstreams, against JPEG and WebP.

    pip install -e ".[bench]"                      # the bjontegaard package
    python bench/kodak_rd.py                       # every installed model, JPEG + WebP sweeps
    python bench/kodak_rd.py --models m2t-small-q1,m2t-small-q2 --stamp

Per model: every Kodak image is encoded to a real bitstream (bpp = 8 * bytes incl. header /
pixels) and decoded; PSNR is RGB 8-bit per image; figures are means over the 24 images.
Checks that every decode equals the encoder-side reconstruction. Classic codecs go through
Pillow (JPEG 4:2:0 and WebP, quality sweeps; bpp from the file size). BD-rates use the
`bjontegaard` package (pchip). `--stamp` writes each model's Kodak bpp/PSNR into its
checkpoint metadata (what `m2t models` prints).
Writes JSON and Markdown to --out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from m2t_core import list_models, load_image, load_model
from m2t_core.metrics import bits_per_pixel, psnr
from m2t_core.registry import find_model, update_checkpoint_info
from m2t_core.sysinfo import cpu_model

# The paper's MT on Kodak, read from a public plot (../shared/docs/M2T_REFERENCE.md).
PAPER_MT_KODAK = {"bpp": [0.058, 0.094, 0.154, 0.247, 0.381], "psnr": [27.07, 28.46, 29.98, 31.65, 33.39]}


def machine() -> str:
    from m2t_core.codec import CODING_THREADS

    cpu = cpu_model()

    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}, "
            f"codec on {CODING_THREADS} thread (JPEG/WebP: Pillow)")


def classic_curve(images: list[np.ndarray], fmt: str, qualities: list[int], **save_args) -> dict:
    bpps, psnrs = [], []
    for q in qualities:
        b, p = [], []
        for rgb in images:
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format=fmt, quality=q, **save_args)
            decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
            b.append(bits_per_pixel(buf.tell(), *rgb.shape[:2]))
            p.append(psnr(rgb, decoded))
        bpps.append(float(np.mean(b)))
        psnrs.append(float(np.mean(p)))
    return {"quality": qualities, "bpp": bpps, "psnr": psnrs}


def model_point(name: str, images: list[np.ndarray]) -> dict:
    model = load_model(name)
    b, p, enc_s, dec_s = [], [], [], []
    for rgb in images:
        t0 = time.perf_counter()
        enc = model.encode_image(rgb)
        t1 = time.perf_counter()
        decoded = model.decompress(enc.bitstream)
        t2 = time.perf_counter()
        if not np.array_equal(decoded, model.reconstruct(enc)):
            raise SystemExit(f"{name}: decoded image differs from the encoder's reconstruction")
        b.append(enc.bpp)
        p.append(psnr(rgb, decoded))
        enc_s.append(t1 - t0)
        dec_s.append(t2 - t1)
    return {
        "model": name, "mode": model.cfg.mode, "bpp": float(np.mean(b)), "psnr": float(np.mean(p)),
        "encode_s_median": float(np.median(enc_s)), "decode_s_median": float(np.median(dec_s)),
        "per_image": {"bpp": b, "psnr": p},
    }


def bd(anchor: dict, test: dict, kind: str) -> float | None:
    import bjontegaard

    fn = bjontegaard.bd_rate if kind == "rate" else bjontegaard.bd_psnr
    try:
        return float(fn(anchor["bpp"], anchor["psnr"], test["bpp"], test["psnr"], method="pchip",
                        require_matching_points=False, min_overlap=0.0))
    except Exception as exc:  # too little overlap, too few points
        print(f"BD-{kind} not computable: {exc}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="all", help="comma-separated names/paths, or 'all' installed")
    ap.add_argument("--kodak", default=str(Path(__file__).resolve().parents[1] / "../shared/datasets/kodak"))
    ap.add_argument("--out", default="docs/results/kodak-small")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images (quick look)")
    ap.add_argument("--stamp", action="store_true", help="write Kodak figures into the checkpoints")
    args = ap.parse_args(argv)

    files = sorted(Path(args.kodak).glob("kodim*.png"))
    if args.limit:
        files = files[: args.limit]
    if not files:
        raise SystemExit(f"no kodim*.png in {args.kodak}")
    images = [load_image(f) for f in files]
    names = [m.name for m in list_models()] if args.models == "all" else args.models.split(",")
    print(f"{len(images)} Kodak images; models: {', '.join(names)}; {machine()}")

    points = []
    for name in names:
        pt = model_point(name, images)
        points.append(pt)
        print(f"{name:<16} {pt['bpp']:.4f} bpp  {pt['psnr']:.2f} dB  enc {pt['encode_s_median']:.2f}s  dec {pt['decode_s_median']:.2f}s")
        if args.stamp and os.sep not in name:
            update_checkpoint_info(find_model(name), {"kodak": {"bpp": round(pt["bpp"], 4), "psnr": round(pt["psnr"], 3), "images": len(images)}})

    jpeg = classic_curve(images, "JPEG", [5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 95], subsampling=2)
    webp = classic_curve(images, "WEBP", [5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95], method=6)
    curves = {"jpeg-420": jpeg, "webp": webp}
    by_mode: dict[str, dict] = {}
    for pt in sorted(points, key=lambda p: p["bpp"]):
        c = by_mode.setdefault(pt["mode"], {"bpp": [], "psnr": []})
        c["bpp"].append(pt["bpp"])
        c["psnr"].append(pt["psnr"])
    table = []
    for mode, curve in by_mode.items():
        if len(curve["bpp"]) < 2:
            continue
        row = {"codec": f"{mode} (ours)", "points": len(curve["bpp"])}
        for anchor_name, anchor in list(curves.items()) + [("paper-MT", PAPER_MT_KODAK)]:
            row[f"bd_rate_vs_{anchor_name}"] = bd(anchor, curve, "rate")
            row[f"bd_psnr_vs_{anchor_name}"] = bd(anchor, curve, "psnr")
        table.append(row)
    webp_row = {"codec": "webp", "points": len(webp["bpp"]),
                "bd_rate_vs_jpeg-420": bd(jpeg, webp, "rate"), "bd_psnr_vs_jpeg-420": bd(jpeg, webp, "psnr")}
    table.append(webp_row)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/kodak_rd.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "machine": machine(), "images": len(images),
              "models": points, "classic": curves, "paper_mt_kodak": PAPER_MT_KODAK, "bd": table}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "README.md").write_text(render_markdown(result))
    print(render_markdown(result))
    return 0


def _fmt(v, unit=""):
    return "n/a" if v is None else f"{v:+.2f}{unit}"


def render_markdown(r: dict) -> str:
    lines = [
        "# Kodak rate-distortion", "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}  ",
        f"Images: {r['images']} (Kodak, RGB PSNR per image then mean; bpp from real bitstreams/files)", "",
        "| model | mode | bpp | PSNR (dB) | encode s (median) | decode s (median) |", "|---|---|---|---|---|---|",
    ]
    for p in r["models"]:
        lines.append(f"| {p['model']} | {p['mode']} | {p['bpp']:.4f} | {p['psnr']:.2f} | {p['encode_s_median']:.2f} | {p['decode_s_median']:.2f} |")
    lines += ["", "BD-rate (negative = fewer bits at equal PSNR) and BD-PSNR, pchip:", "",
              "| codec | vs JPEG 4:2:0 | vs WebP | vs paper MT (approx.) |", "|---|---|---|---|"]
    for row in r["bd"]:
        def cell(anchor):
            return f"{_fmt(row.get(f'bd_rate_vs_{anchor}'), '%')} / {_fmt(row.get(f'bd_psnr_vs_{anchor}'), ' dB')}" \
                if f"bd_rate_vs_{anchor}" in row else "-"
        lines.append(f"| {row['codec']} | {cell('jpeg-420')} | {cell('webp')} | {cell('paper-MT')} |")
    lines += ["", "Classic codecs (Pillow):", "", "| codec | quality | bpp | PSNR |", "|---|---|---|---|"]
    for name, c in r["classic"].items():
        for q, b, p in zip(c["quality"], c["bpp"], c["psnr"]):
            lines.append(f"| {name} | {q} | {b:.4f} | {p:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
