#!/usr/bin/env python3
"""Peer speed benchmark (a benchmark, not a test): our M2T against CompressAI and classic codecs.

    python bench/peer_speed.py --quick          # 768x512 only, 1 repeat (~1 min on a 2-core CPU)
    python bench/peer_speed.py                  # 768x512 (3 repeats) and 2000x1500 (1 repeat): ~5 min
    make bench-peers                            # installs CompressAI (see below), then --quick

What is timed, per image size and codec, on the same photo (bench/_common.py's bench_image:
the one bench/codec_speed.py uses), always from a uint8 RGB array to bytes (encode) and from
bytes back to a uint8 RGB array (decode):
  * m2t: our default model (m2t_core.load_model(), i.e. m2t-small-q3),
    `Encoder(model).encode_image` and `Decoder(model).decompress`, on --threads torch threads
    (the codec pins none: its entropy model is exact, any thread count gives the same bytes);
  * mbt2018 (CompressAI's autoregressive "joint" model, Minnen et al. 2018) and
    bmshj2018-hyperprior (Balle et al. 2018), quality 3, RANDOM INIT (pretrained=False;
    speed does not need trained weights), `model.update(force=True)`, then the real
    `compress` / `decompress` (range coding included) under torch.no_grad(). The image is
    zero-padded to a multiple of 64 (what the models need; 2000x1500 -> 2048x1536) and the
    output cropped back, as CompressAI's own evaluation does. Their bpp and PSNR are those of
    an untrained model: only the times mean anything;
  * JPEG (quality 75, 4:2:0), WebP (quality 75, method 4) and AVIF (quality 60, 4:2:0, speed 6
    = Pillow's defaults) through Pillow: the classic floor.
Every peer but ours is a Baseline of pipeline/evaluation/baselines.py (the codecs `m2t eval`
compares against) at the benchmark's chosen point (PEERS below).
Each figure is the median over the timed repeats after one discarded warm-up run; repeats are
interleaved across codecs, so a change of machine load hits all of them alike. At the large
size (2000x1500 by default), where one mbt2018 decode takes minutes, --repeats-large (default 1)
sets the repeats and the warm-up is the one done at the first size on the same model
(--warmup-large adds one there too). Wall and process CPU time are both recorded; the script
also records how many cores OTHER processes kept busy (from /proc/stat).

Threads: --threads (default 1) sets torch's intra-op threads, which our codec and CompressAI
run on, and libavif's threads (Pillow's AVIF plugin), so that every codec runs on as many.

CompressAI is not a project dependency: `pip install compressai` pulls a CUDA build of torch
and torchvision. Install it without dependencies (what `make bench-peers` does):
    .venv/bin/pip install --no-deps compressai==1.2.8 einops torch-geometric psutil pyparsing \
        xxhash pytorch-msssim torchvision==0.28.0
Where the only torchvision wheel is a CUDA build whose compiled ops cannot load against a CPU
torch, `import torchvision` fails ("operator torchvision::nms does not exist");
baselines.import_compressai then stubs out the one module CompressAI's models do not need, and
the script says so (also in the JSON). Without CompressAI the script skips its rows with the
install command and still times the rest.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import m2t_core  # noqa: E402
from m2t_core.metrics import psnr  # noqa: E402
from m2t_core.sysinfo import cpu_model  # noqa: E402
from bench._common import (DEFAULT_DATA, LoadMeter, bench_image, code_state, load_avg,  # noqa: E402
                           parse_size, write_report)
from pipeline.evaluation import baselines as B  # noqa: E402

DEFAULT_SIZES = "768x512,2000x1500"
LARGE_PIXELS = 1_000_000  # sizes with more pixels use --repeats-large
CODECS = ("m2t", "mbt2018", "bmshj2018-hyperprior", "jpeg", "webp", "avif")
COMPRESSAI_CODECS = ("mbt2018", "bmshj2018-hyperprior")
COMPRESSAI_QUALITY = 3


def peers() -> dict[str, tuple[B.Baseline, float]]:
    """The benchmark's chosen point of each baseline: (the baseline, its sweep value). CompressAI
    with random weights (speed does not need trained ones); Pillow at everyday settings."""
    return {
        "mbt2018": (B.BASELINES["compressai-mbt2018"].random_init(), COMPRESSAI_QUALITY),
        "bmshj2018-hyperprior": (B.BASELINES["compressai-bmshj2018-hyperprior"].random_init(), COMPRESSAI_QUALITY),
        "jpeg": (B.BASELINES["jpeg-420"], 75),
        "webp": (B.BASELINES["webp"].with_settings(method=4), 75),
        "avif": (B.BASELINES["avif"].with_settings(subsampling="4:2:0"), 60),  # then all as Pillow's defaults
    }


def peer_note(baseline: B.Baseline, value: float) -> str:
    """'Pillow, q=75, subsampling=4:2:0' / 'CompressAI, q=3, random init (seed 0)'."""
    described = baseline.describe()
    if described["format"] == "CompressAI":
        return f"CompressAI, {baseline.point_label(value)}, {described['settings']['weights']}"
    return ", ".join(["Pillow", baseline.point_label(value)] + [f"{k}={v}" for k, v in described["settings"].items()])


# ------------------------------------------------------------------------------ the peers


class BaselinePeer:
    """A baseline at one point, on `threads` threads."""

    def __init__(self, baseline: B.Baseline, value: float, threads: int):
        baseline.ensure_available()
        baseline.prepare(value)  # CompressAI: build the model now, not in the first timed call
        self.baseline, self.value, self.threads = baseline, value, threads

    def encode(self, rgb: np.ndarray) -> bytes:
        return self.baseline.encode(rgb, self.value, self.threads)

    def decode(self, data: bytes, height: int, width: int) -> np.ndarray:
        return self.baseline.decode(data, height, width, self.threads)


class M2TPeer:
    """Our codec, the way users call it: one image at a time, on the calling thread."""

    def __init__(self, name: str | None = None):
        self.model = m2t_core.load_model(name, cache=False)
        self.encoder, self.decoder = m2t_core.Encoder(self.model), m2t_core.Decoder(self.model)

    def encode(self, rgb: np.ndarray) -> bytes:
        return self.encoder.encode_image(rgb).bitstream

    def decode(self, data: bytes, height: int, width: int) -> np.ndarray:
        return self.decoder.decompress(data)  # the bitstream knows its size


# ------------------------------------------------------------------------------ timing


def timed(fn: Callable, *args):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0, out


def summarize(runs: list[tuple[float, float]]) -> dict:
    walls = [w for w, _ in runs]
    return {"median_s": statistics.median(walls), "min_s": min(walls), "runs_s": walls,
            "cpu_median_s": statistics.median(c for _, c in runs)}


def bench_size(codecs: dict, rgb: np.ndarray, repeats: int, warmup: bool, log: Callable[[str], None]) -> dict:
    h, w = rgb.shape[:2]
    runs = {name: {"encode": [], "decode": []} for name in codecs}
    info: dict[str, dict] = {}
    first = 0 if warmup else 1
    for r in range(first, repeats + 1):  # run 0 is the warm-up, discarded
        for name, codec in codecs.items():
            t_enc, c_enc, data = timed(codec.encode, rgb)
            t_dec, c_dec, out = timed(codec.decode, data, h, w)
            if name not in info:
                if out.shape != rgb.shape or out.dtype != np.uint8:
                    raise RuntimeError(f"{name}: decoded {out.shape} {out.dtype}, expected {rgb.shape} uint8")
                info[name] = {"bytes": len(data), "bpp": 8.0 * len(data) / (h * w), "psnr": psnr(rgb, out)}
            if r > 0:
                runs[name]["encode"].append((t_enc, c_enc))
                runs[name]["decode"].append((t_dec, c_dec))
            log(f"  {'warm-up' if r == 0 else f'run {r}/{repeats}'}: {name:<21} encode {t_enc:8.3f} s  "
                f"decode {t_dec:8.3f} s")
    return {name: {**info[name], "encode": summarize(runs[name]["encode"]),
                   "decode": summarize(runs[name]["decode"])} for name in codecs}


# ------------------------------------------------------------------------------ report


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(threads: int) -> dict:
    from PIL import features

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "compressai": version("compressai"),
        "torchvision": version("torchvision"),
        "pillow": version("pillow"),
        "libjpeg": features.version("jpg"), "libwebp": features.version("webp"),
        "libavif": features.version("avif"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


NOTES = {"m2t": "ours, trained (m2t-small-q3); torch threads: --threads"}  # main() adds the baselines' notes


def fmt_table(results: dict) -> str:
    lines = ["| image | codec | encode s | decode s | encode CPU s | decode CPU s | bpp | PSNR dB | settings |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for size, res in results.items():
        for name, r in res["codecs"].items():
            random = name in COMPRESSAI_CODECS
            lines.append(
                f"| {size} | {name} | {r['encode']['median_s']:.3f} | {r['decode']['median_s']:.3f} | "
                f"{r['encode']['cpu_median_s']:.3f} | {r['decode']['cpu_median_s']:.3f} | "
                f"{'(' if random else ''}{r['bpp']:.3f}{')' if random else ''} | "
                f"{'(' if random else ''}{r['psnr']:.2f}{')' if random else ''} | {NOTES[name]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Encode/decode speed of M2T vs CompressAI (mbt2018, "
                                             "bmshj2018-hyperprior) and JPEG/WebP/AVIF (median of repeats).")
    ap.add_argument("--quick", action="store_true", help="768x512 only, 1 repeat")
    ap.add_argument("--sizes", default=None, help=f"comma-separated WxH (default {DEFAULT_SIZES}; --quick: 768x512)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per figure at sizes up to 1 MP (default 3; --quick: 1)")
    ap.add_argument("--repeats-large", type=int, default=1,
                    help="timed runs per figure at sizes over 1 MP, e.g. 2000x1500 (default 1: one mbt2018 "
                         "encode + decode there takes about 3 minutes on one thread)")
    ap.add_argument("--warmup-large", action="store_true",
                    help="also a warm-up run at the large sizes (default: the first size's warm-up serves)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for CompressAI, and libavif threads (default 1; our model runs on as many)")
    ap.add_argument("--codecs", default=",".join(CODECS), help=f"comma-separated subset of {','.join(CODECS)}")
    ap.add_argument("--model", default=None, help="our model (registry name or path; default: the default model)")
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA,
                    help="datasets folder (kodak/, train/debian-wallpapers/); default ../shared/datasets")
    ap.add_argument("--json", type=Path, default=None,
                    help="where to write results (default bench/results/peer_speed.json; --quick: "
                         "bench/results/peer_speed_quick.json)")
    args = ap.parse_args(argv)

    sizes = [parse_size(s) for s in (args.sizes or ("768x512" if args.quick else DEFAULT_SIZES)).split(",")]
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1 or args.repeats_large < 1 or args.threads < 1:
        ap.error("--repeats, --repeats-large and --threads must be >= 1")
    wanted = [c.strip() for c in args.codecs.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(CODECS))
    if unknown:
        ap.error(f"unknown codec(s) {', '.join(unknown)}; choose from {', '.join(CODECS)}")
    json_path = args.json or REPO / "bench" / "results" / ("peer_speed_quick.json" if args.quick else "peer_speed.json")
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    compressai_status = "not requested"
    chosen = peers()
    codecs: dict = {}
    for name in wanted:
        if name == "m2t":
            codecs[name] = M2TPeer(args.model)
            NOTES["m2t"] = f"ours, trained ({codecs[name].model.model_id}); torch threads: --threads"
            continue
        if name in COMPRESSAI_CODECS and compressai_status == "not requested":
            compressai_status = B.import_compressai()[1]
            if compressai_status.startswith("torchvision workaround"):
                log(f"note: {compressai_status}")
        try:
            codecs[name] = BaselinePeer(*chosen[name], args.threads)
        except B.CodecUnavailableError as exc:
            log(f"skipping {name}: {exc}")
            continue
        NOTES[name] = peer_note(*chosen[name])
    if not codecs:  # every requested codec was skipped: an empty table would pass for a result
        log(f"error: none of the requested codecs ({', '.join(wanted)}) can run here (see above)")
        return 1

    machine = machine_info(args.threads)
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} ({args.threads} thread(s)), "
        f"compressai {machine['compressai']}, Pillow {machine['pillow']} (libavif {machine['libavif']})")
    log(f"codecs:  {', '.join(codecs)}")
    log(f"timing:  median of {repeats} run(s) after 1 warm-up (sizes over 1 MP: {args.repeats_large} run(s)"
        f"{' after 1 warm-up' if args.warmup_large else ', warm-up at the first size'}); "
        f"load average before: {load_avg()}")

    results: dict[str, dict] = {}
    overall = LoadMeter()
    t_start = time.perf_counter()
    for i, size in enumerate(sizes):
        key = f"{size[0]}x{size[1]}"
        rgb, origin = bench_image(size, args.data_root)
        large = size[0] * size[1] > LARGE_PIXELS
        n = args.repeats_large if large else repeats
        warmup = i == 0 or not large or args.warmup_large
        log(f"{key}: {origin} ({n} run(s){', warm-up first' if warmup else ''})")
        meter = LoadMeter()
        res = bench_size(codecs, rgb, n, warmup, log)
        entry = {"image": origin, "repeats": n, "warmup_runs": int(warmup), "codecs": res,
                 "other_processes_cores": meter.other_cores()}
        if "m2t" in res:
            entry["m2t_decode_speedup"] = {p: res[p]["decode"]["median_s"] / res["m2t"]["decode"]["median_s"]
                                           for p in res if p != "m2t"}
            entry["m2t_encode_speedup"] = {p: res[p]["encode"]["median_s"] / res["m2t"]["encode"]["median_s"]
                                           for p in res if p != "m2t"}
        results[key] = entry
        if entry["other_processes_cores"] is not None:
            log(f"  other processes kept {entry['other_processes_cores']:.2f} of {os.cpu_count()} cores busy "
                f"on average during {key}")
    elapsed = time.perf_counter() - t_start
    other_cores = overall.other_cores()
    contended = other_cores is not None and other_cores > max(0.25, (os.cpu_count() or 1) - args.threads)

    log("")
    log(fmt_table(results))
    log("(seconds per image: median wall time, and median process CPU time; bpp and PSNR in parentheses are\n"
        " those of a randomly initialised CompressAI model: only its times mean anything)")
    log("")
    for key, entry in results.items():
        if "mbt2018" in entry["codecs"] and "m2t" in entry["codecs"]:
            log(f"{key}: m2t decode speedup vs mbt2018: {entry['m2t_decode_speedup']['mbt2018']:.2f}x "
                f"(encode {entry['m2t_encode_speedup']['mbt2018']:.2f}x; target: decode >= 10x)")
    log(f"benchmark took {elapsed:.0f} s; load average after: {load_avg()}"
        + (f"; other processes kept {other_cores:.2f} of {os.cpu_count()} cores busy on average"
           + (" (wall times are inflated by that)" if contended else "") if other_cores is not None else ""))

    report = {
        "benchmark": "peer_speed",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": machine,
        "code": code_state(),
        "compressai_import": compressai_status,
        "settings": {"compressai_quality": COMPRESSAI_QUALITY, "compressai_weights": "random init (pretrained=False)",
                     "compressai_padding": "zero-padded to a multiple of 64, output cropped", "pillow": NOTES,
                     "baselines": {name: {**chosen[name][0].describe(), "point": chosen[name][1]}
                                   for name in codecs if name in chosen},
                     "threads": args.threads},
        "repeats": repeats, "repeats_large": args.repeats_large,
        "elapsed_s": elapsed,
        "other_processes_cores": other_cores,
        "wall_times_contended": contended,
        "load_average_after": load_avg(),
        "results": results,
    }
    write_report(json_path, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
