"""Progressive decoding on Kodak: quality against the fraction of the stream read.

For each image and K = 0..S: the preview decoded from the stream's first K steps (exactly
the prefix bytes), its PSNR and MS-SSIM, the fraction of the stream's bytes it read, and the
decode time; beside it what the same bytes buy as a thumbnail: JPEG or WebP of the image
downscaled (x1/2 .. x1/8, the quality searched to fit the budget; the best PSNR over scales),
upscaled back with Lanczos. Also, with --mt-order, the rate of MT's confidence-adaptive order
against the fixed QLDS schedule (same latent, so the same distortion: the byte ratio is the
BD-rate).

    python bench/progressive.py                      # m2t-small-q3, all Kodak images
    python bench/progressive.py --images 6 --mt-order

Writes bench/results/progressive.json, docs/progressive.md's table (printed) and
docs/progressive.png. Kodak is evaluation only: nothing here tunes anything.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import m2t_core  # noqa: E402
from m2t_core import Decoder, Encoder  # noqa: E402
from m2t_core import bitstream as bs  # noqa: E402
from m2t_core.metrics import psnr  # noqa: E402
from m2t_core.model import numerics_environment  # noqa: E402
from pipeline.evaluation.rd import ms_ssim  # noqa: E402

SCALES = (2, 3, 4, 6, 8)


def thumbnail(rgb: np.ndarray, budget: int, fmt: str) -> tuple[np.ndarray, int] | None:
    """The best-PSNR downscaled JPEG/WebP of at most `budget` bytes, upscaled back."""
    H, W = rgb.shape[:2]
    img = Image.fromarray(rgb)
    best = None
    for s in SCALES:
        small = img.resize((max(1, round(W / s)), max(1, round(H / s))), Image.LANCZOS)
        lo, hi, fit = 1, 95, None
        while lo <= hi:  # the highest quality whose file fits
            q = (lo + hi) // 2
            buf = io.BytesIO()
            small.save(buf, format=fmt, quality=q)
            if buf.tell() <= budget:
                fit, lo = buf.getvalue(), q + 1
            else:
                hi = q - 1
        if fit is None:
            continue
        up = np.asarray(Image.open(io.BytesIO(fit)).convert("RGB").resize((W, H), Image.LANCZOS))
        quality = psnr(rgb, up)
        if best is None or quality > best[0]:
            best = (quality, up, len(fit))
    return None if best is None else (best[1], best[2])


def measure(model, rgb: np.ndarray, with_thumbnails: bool) -> list[dict]:
    stream = Encoder(model).encode_image(rgb).bitstream
    header = bs.read_header(stream)
    decoder = Decoder(model)
    rows = []
    for k in range(model.cfg.num_steps + 1):
        end = header.step_ends[k - 1] if k else header.size
        t0 = time.perf_counter()
        preview = decoder.preview(stream[:end], steps=k)
        seconds = time.perf_counter() - t0
        row = dict(steps=k, bytes=end, fraction=end / len(stream), bpp=8 * end / rgb.shape[0] / rgb.shape[1],
                   psnr=psnr(rgb, preview.image), ms_ssim=ms_ssim(rgb, preview.image), decode_s=seconds)
        if with_thumbnails:
            for fmt in ("JPEG", "WEBP"):
                got = thumbnail(rgb, end, fmt)
                row[fmt.lower()] = None if got is None else dict(bytes=got[1], psnr=psnr(rgb, got[0]),
                                                                 ms_ssim=ms_ssim(rgb, got[0]))
        rows.append(row)
    return rows


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="m2t-small-q3")
    parser.add_argument("--kodak", default=str(ROOT.parent / "shared" / "datasets" / "kodak"))
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--mt-order", action="store_true", help="also MT: adaptive order vs QLDS bytes")
    parser.add_argument("--mt-images", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "progressive.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "progressive.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    files = sorted(Path(args.kodak).glob("*.png"))[:args.images]
    model = m2t_core.load_model(args.model)
    per_image = {}
    for f in files:
        rgb = m2t_core.load_image(f)
        t0 = time.perf_counter()
        per_image[f.name] = measure(model, rgb, with_thumbnails=True)
        print(f"{f.name}: {time.perf_counter() - t0:.1f} s", flush=True)
    S = model.cfg.num_steps
    table = []
    for k in range(S + 1):
        rows = [r[k] for r in per_image.values()]
        entry = dict(steps=k, fraction=mean(r["fraction"] for r in rows), bpp=mean(r["bpp"] for r in rows),
                     psnr=mean(r["psnr"] for r in rows), ms_ssim=mean(r["ms_ssim"] for r in rows),
                     decode_s=statistics.median(r["decode_s"] for r in rows))
        for fmt in ("jpeg", "webp"):
            fits = [r[fmt] for r in rows if r.get(fmt)]
            entry[fmt] = dict(images=len(fits), psnr=mean(t["psnr"] for t in fits),
                              ms_ssim=mean(t["ms_ssim"] for t in fits))
        table.append(entry)
    result = dict(model=args.model, images=len(files), threads=args.threads, torch=torch.__version__,
                  cpu=numerics_environment("cpu").get("cpu"), table=table, per_image=per_image)
    if args.mt_order:
        mt = m2t_core.load_model("mt-small-q2")
        qlds, confident, decoder = Encoder(mt), Encoder(mt, adaptive_order=True), Decoder(mt)
        sizes = []
        for f in sorted(Path(args.kodak).glob("*.png"))[:args.mt_images]:
            rgb = m2t_core.load_image(f)
            H, W = rgb.shape[:2]
            with torch.inference_mode():  # as the codec runs g_a / g_s
                y = mt.analysis(rgb)
                fixed = qlds.encode_latent(y, H, W)
                adaptive = confident.encode_latent(y, H, W)
                if not np.array_equal(decoder.decompress(adaptive.bitstream), mt.synthesis(adaptive.y_hat, H, W)):
                    raise RuntimeError(f"MT {f.name}: the adaptive-order stream does not decode to the encoder's "
                                       "reconstruction")
            sizes.append((f.name, len(fixed.bitstream), len(adaptive.bitstream)))
            print(f"MT {f.name}: QLDS {sizes[-1][1]} B, adaptive {sizes[-1][2]} B", flush=True)
        total_fixed, total_adaptive = sum(s[1] for s in sizes), sum(s[2] for s in sizes)
        result["mt_order"] = dict(images=len(sizes), qlds_bytes=total_fixed, adaptive_bytes=total_adaptive,
                                  bd_rate_percent=100 * (total_adaptive / total_fixed - 1),
                                  mean_ratio_percent=100 * (statistics.fmean(s[2] / s[1] for s in sizes) - 1),
                                  per_image=sizes)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    plot(result, args.plot)
    return 0


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def markdown(result) -> str:
    lines = ["| K | bytes read | bpp | PSNR dB | MS-SSIM | JPEG thumb PSNR / MS-SSIM | WebP thumb PSNR / MS-SSIM | decode s |",
             "|---|---|---|---|---|---|---|---|"]
    for e in result["table"]:
        j, w = e["jpeg"], e["webp"]
        lines.append(f"| {e['steps']} | {100 * e['fraction']:.1f} % | {e['bpp']:.3f} | {fmt(e['psnr'])} | "
                     f"{fmt(e['ms_ssim'], '.4f')} | {fmt(j['psnr'])} / {fmt(j['ms_ssim'], '.4f')} ({j['images']}) | "
                     f"{fmt(w['psnr'])} / {fmt(w['ms_ssim'], '.4f')} ({w['images']}) | {e['decode_s']:.2f} |")
    if "mt_order" in result:
        m = result["mt_order"]
        lines.append(f"\nMT adaptive order vs QLDS ({m['images']} images): {m['bd_rate_percent']:+.2f} % bytes "
                     f"(same latent, same PSNR: this is the BD-rate)")
    return "\n".join(lines)


def plot(result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result["table"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [e["bpp"] for e in t]
    ax.plot(x, [e["psnr"] for e in t], "o-", label=f"{result['model']} preview (K = 0..S)")
    for fmt_name, style in (("jpeg", "s--"), ("webp", "^--")):
        pts = [(e["bpp"], e[fmt_name]["psnr"]) for e in t if e[fmt_name]["images"] == result["images"]]
        if pts:
            ax.plot(*zip(*pts), style, label=f"{fmt_name.upper()} thumbnail, same bytes")
    ax.set_xlabel("bits per pixel read (prefix of the stream)")
    ax.set_ylabel("PSNR (dB), Kodak mean")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
