#!/usr/bin/env python3
"""Memory of the codec vs image size, and the rate-distortion cost of tiling (a benchmark).

    python bench/memory.py --quick                       # 1 MP peak RSS + 4 Kodak images (~1 min)
    python bench/memory.py                               # 1, 16.8 and 64 MP; 8 Kodak images, a 4 MP photo
    python bench/memory.py --sizes 9216x6912 --kodak 0   # one size only

What is measured:
  * peak RSS of an encode (`Encoder(model).encode_image`) and, separately, of a decode
    (`Decoder(model).decompress`) of a real photo, each in a fresh process (VmHWM of that process:
    imports, model and the image included; `baseline` is the peak before the call, so
    peak - baseline is what the call added). Tiled (the default since issue 13: g_a and g_s
    run in overlapping tiles, m2t_core/tiling.py) and, with --untiled-up-to, untiled (tiling
    forced off) for sizes up to that many pixels, for comparison.
  * the RD cost of tiling: bpp and PSNR of Kodak images (first --kodak of them, sorted) coded
    with tiling forced on (a 16x16-latent tile core: 6 tiles per 768x512 image, the
    receptive-field margin) vs untiled, and of a --large photo with the default plan (tiled)
    vs tiling forced off. Measurement only: nothing is tuned on Kodak.
The model is the shipped default (m2t-small-q3) unless --model says otherwise. Results go to
bench/results/memory[_quick].json and are printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import DEFAULT_DATA, LoadMeter, bench_image, code_state, load_avg, parse_size, write_report  # noqa: E402

UNTILED = dict(tile=10**6, margin=0)  # a plan whose one tile holds any image: tiling off


def _peak_mib() -> float:
    """This process's peak resident memory, MiB. VmHWM (Linux) is the high-water mark of this
    process's own memory since its exec; ru_maxrss is not: Linux carries the parent's RSS at
    fork over the exec, so a child of a parent that held a 64 MP image starts 'at' its size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import torch

    from m2t_core import Decoder, Encoder, load_model, tiling

    torch.set_num_threads(1)
    model = load_model(args.model)
    forced = tiling.forced_plan(tiling.TilePlan(**UNTILED)) if args.untiled else None
    t0 = time.perf_counter()
    if args.child == "encode":
        rgb = np.load(args.image)
        baseline = _peak_mib()
        with forced or _null():
            data = Encoder(model).encode_image(rgb).bitstream
        Path(args.stream).write_bytes(data)
        extra = {"bytes": len(data), "bpp": 8 * len(data) / (rgb.shape[0] * rgb.shape[1])}
    else:
        data = Path(args.stream).read_bytes()
        baseline = _peak_mib()
        with forced or _null():
            out = Decoder(model).decompress(data)
        extra = {"shape": list(out.shape)}
    print(json.dumps({"peak_rss_mib": _peak_mib(), "baseline_mib": baseline,
                      "seconds": time.perf_counter() - t0, **extra}), flush=True)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def measure_memory(size: tuple[int, int], untiled: bool, args, tmp: Path) -> dict:
    rgb, source = bench_image(size, args.data)
    image = tmp / f"{size[0]}x{size[1]}.npy"
    np.save(image, np.ascontiguousarray(rgb))
    del rgb
    stream = tmp / f"{size[0]}x{size[1]}{'-untiled' if untiled else ''}.m2t"
    from m2t_core import load_model, tiling

    plan = tiling.plan_for(load_model(args.model).g_a, 1 / 16)
    latents = -(-size[0] // 16) * -(-size[1] // 16)
    row = {"size": f"{size[0]}x{size[1]}", "megapixels": size[0] * size[1] / 1e6,
           "tiling": "off" if untiled else "default",
           "tiled": not untiled and plan is not None and latents > plan.max_untiled, "source": source}
    for step in ("encode", "decode"):
        cmd = [sys.executable, __file__, "--child", step, "--image", str(image), "--stream", str(stream),
               "--model", args.model] + (["--untiled"] if untiled else [])
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{step} {row['size']} failed:\n{result.stderr[-3000:]}")
        row[step] = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"  {row['size']:>10} {'tiled' if row['tiled'] else 'untiled':>8} {step}: peak RSS "
              f"{row[step]['peak_rss_mib']:.0f} MiB (baseline {row[step]['baseline_mib']:.0f}), "
              f"{row[step]['seconds']:.1f} s", flush=True)
    image.unlink()
    return row


def rd_pair(model, rgb: np.ndarray, plan_a, plan_b) -> dict:
    """bpp and PSNR of one image under two tiling plans (None: the default)."""
    from m2t_core import Decoder, Encoder, tiling
    from m2t_core.metrics import psnr

    out = {}
    for name, plan in (("a", plan_a), ("b", plan_b)):
        ctx = tiling.forced_plan(plan) if plan is not None else _null()
        with ctx:
            enc = Encoder(model).encode_image(rgb)
            dec = Decoder(model).decompress(enc.bitstream)
        out[name] = {"bpp": enc.bpp, "psnr": psnr(rgb, dec)}
    return out


def measure_rd(args) -> dict:
    import torch
    from PIL import Image

    from m2t_core import load_model, tiling

    torch.set_num_threads(1)
    model = load_model(args.model)
    margin = tiling.plan_for(model.g_a, 1 / 16).margin
    forced = tiling.TilePlan(tile=16, margin=margin)
    untiled = tiling.TilePlan(**UNTILED)
    result: dict = {"forced_plan": {"tile": forced.tile, "margin": forced.margin},
                    "default_plan_g_a": vars(tiling.plan_for(model.g_a, 1 / 16)),
                    "default_plan_g_s": vars(tiling.plan_for(model.g_s, 1.0))}
    rows = []
    kodak = sorted((args.data / "kodak").glob("kodim*.png"))[:args.kodak]
    for path in kodak:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        pair = rd_pair(model, rgb, forced, untiled)
        rows.append({"image": path.name, "tiled": pair["a"], "untiled": pair["b"]})
        print(f"  {path.name}: tiled {pair['a']['bpp']:.4f} bpp {pair['a']['psnr']:.3f} dB | "
              f"untiled {pair['b']['bpp']:.4f} bpp {pair['b']['psnr']:.3f} dB", flush=True)
    if args.large:
        rgb, source = bench_image(args.large, args.data)
        pair = rd_pair(model, rgb, None, untiled)
        rows.append({"image": source, "tiled": pair["a"], "untiled": pair["b"], "default_plan": True})
        print(f"  {source}: tiled (default plan) {pair['a']['bpp']:.4f} bpp {pair['a']['psnr']:.3f} dB | "
              f"untiled {pair['b']['bpp']:.4f} bpp {pair['b']['psnr']:.3f} dB", flush=True)
    for r in rows:
        r["delta_bpp_pct"] = 100 * (r["tiled"]["bpp"] / r["untiled"]["bpp"] - 1)
        r["delta_psnr_db"] = r["tiled"]["psnr"] - r["untiled"]["psnr"]
    result["images"] = rows
    if rows:
        result["max_abs_delta_bpp_pct"] = max(abs(r["delta_bpp_pct"]) for r in rows)
        result["max_abs_delta_psnr_db"] = max(abs(r["delta_psnr_db"]) for r in rows)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 MP only, 4 Kodak images, no large photo")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=None,
                   help="image sizes WxH for peak RSS (default 1152x864 4736x3552 9216x6912)")
    p.add_argument("--untiled-up-to", type=float, default=None, metavar="MP",
                   help="also measure untiled for sizes up to this many megapixels (default: 1.1 MP)")
    p.add_argument("--kodak", type=int, default=None, help="Kodak images for the RD cost (default 8; quick 4)")
    p.add_argument("--large", type=parse_size, default=None, help="a large photo for the RD cost (default 2304x1728)")
    p.add_argument("--model", default="m2t-small-q3")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", choices=["encode", "decode"], help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    p.add_argument("--stream", help=argparse.SUPPRESS)
    p.add_argument("--untiled", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    sizes = args.sizes or ([(1152, 864)] if args.quick else [(1152, 864), (4736, 3552), (9216, 6912)])
    untiled_up_to = 1.1 if args.untiled_up_to is None else args.untiled_up_to
    args.kodak = (4 if args.quick else 8) if args.kodak is None else args.kodak
    if args.large is None and not args.quick:
        args.large = (2304, 1728)
    meter = LoadMeter()
    report = {"benchmark": "memory", "machine": platform.node(), "cpu": platform.processor() or platform.machine(),
              "code": code_state(), "model": args.model, "memory": [], "rd": None}
    print("peak RSS per call (fresh process each):", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            report["memory"].append(measure_memory(size, False, args, Path(tmp)))
            if size[0] * size[1] / 1e6 <= untiled_up_to:
                report["memory"].append(measure_memory(size, True, args, Path(tmp)))
    if args.kodak or args.large:
        print("RD cost of tiling (bpp, PSNR of the decoded image):", flush=True)
        report["rd"] = measure_rd(args)
        if "max_abs_delta_bpp_pct" in report["rd"]:
            print(f"  largest |change|: {report['rd']['max_abs_delta_bpp_pct']:.3f} % bpp, "
                  f"{report['rd']['max_abs_delta_psnr_db']:.4f} dB", flush=True)
    report["other_cores_busy"] = meter.other_cores()
    report["load_avg"] = load_avg()
    out = args.out or REPO / "bench" / "results" / f"memory{'_quick' if args.quick else ''}.json"
    write_report(out, report)


if __name__ == "__main__":
    main()
