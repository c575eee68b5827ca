#!/usr/bin/env python3
"""How one image's coding scales with torch's threads (a benchmark, not a test): issue 22's
"one image on 2 threads at least 1.7x faster than on 1".

    python bench/thread_scaling.py                          # 1 and 2 threads, kodim01 and kodim13
    python bench/thread_scaling.py --threads 1,2,4 --rounds 15

In one process, each round times every stage once per thread count, the thread counts
alternating (torch.set_num_threads), so a drift of the machine's speed meets all of them
alike; each figure is the median over rounds, after one warm-up round. Stages: encode
(`Encoder.encode_image`), decode_latent, g_s (`model.synthesis`) and decompress, as
bench/checkout_ab.py names them. Every decode is checked against the first one (the same
latent and pixels at every thread count; the benchmark stops otherwise). Writes OUT.json and
OUT.md (default bench/results/thread_scaling.json).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import DEFAULT_DATA, code_state, load_avg, markdown_table, write_report  # noqa: E402

from m2t_core import Decoder, Encoder, cpu_kernels, int8_linear, load_model  # noqa: E402
from m2t_core.allocator import keep_freed_memory  # noqa: E402
from m2t_core.image_io import load_image  # noqa: E402
from m2t_core.sysinfo import cpu_model  # noqa: E402

STAGES = ("encode", "decode_latent", "g_s", "decompress")


def _digest(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def measure(model, path: Path, threads: list[int], rounds: int) -> dict:
    """Median seconds per stage and thread count for one image."""
    rgb = load_image(path)
    H, W = rgb.shape[:2]
    encoder, decoder = Encoder(model), Decoder(model)
    stream = encoder.encode_image(rgb).bitstream
    header, y_hat = decoder.decode_latent(stream)
    want = _digest(decoder.decompress(stream))
    work = {"encode": lambda: encoder.encode_image(rgb).bitstream,
            "decode_latent": lambda: decoder.decode_latent(stream),
            "g_s": lambda: model.synthesis(y_hat, H, W, header.version, header.quality),
            "decompress": lambda: decoder.decompress(stream)}
    runs = {n: {stage: [] for stage in STAGES} for n in threads}
    for r in range(rounds + 1):  # round 0 warms every thread count up
        for n in threads:
            torch.set_num_threads(n)
            for stage, call in work.items():
                t0 = time.perf_counter()
                out = call()
                seconds = time.perf_counter() - t0
                if stage == "encode" and out != stream or stage == "decompress" and _digest(out) != want:
                    raise RuntimeError(f"{path.name}: {stage} on {n} threads differs from the first run")
                if r:
                    runs[n][stage].append(seconds)
    return {str(n): {stage: statistics.median(v) for stage, v in runs[n].items()} for n in threads}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="m2t-small-q3")
    ap.add_argument("--kodak", type=Path, default=DEFAULT_DATA / "kodak")
    ap.add_argument("--images", default="kodim01.png,kodim13.png")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "thread_scaling.json")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    if not threads or min(threads) < 1 or args.rounds < 1:
        ap.error("--threads must name counts >= 1 and --rounds must be >= 1")
    paths = [args.kodak / name for name in args.images.split(",")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        ap.error(f"no such image: {', '.join(missing)} (--kodak names the folder)")
    keep_freed_memory()  # as the m2t commands and the jobs' workers do
    model = load_model(args.model)
    results = {}
    for path in paths:
        results[path.name] = measure(model, path, threads, args.rounds)
        print(f"{path.name}: " + ", ".join(f"{n} threads decompress {results[path.name][str(n)]['decompress']:.3f} s"
                                           for n in threads), flush=True)
    base = str(threads[0])
    rows = [[name, stage] + [f"{per[str(n)][stage]:.3f}" for n in threads]
            + [f"{per[base][stage] / per[str(n)][stage]:.2f}x" for n in threads[1:]]
            for name, per in results.items() for stage in STAGES]
    header = ["image", "stage"] + [f"{n} thread(s), s" for n in threads] + [f"{n} vs {base}" for n in threads[1:]]
    code = code_state(("m2t_core",))
    title = (f"m2t {(code['git_commit'] or 'unknown')[:7]}{'+changes' if code['uncommitted'] else ''}, {args.model}, "
             f"{cpu_model()}; medians of {args.rounds} rounds "
             f"in one process, thread counts alternating; C kernels on {cpu_kernels.threads()}, "
             f"int8 linears {int8_linear.status()}")
    markdown = "\n".join([title, ""] + markdown_table(header, rows)) + "\n"
    command = "bench/thread_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"benchmark": "thread_scaling", "command": command, "model": args.model, "threads": threads,
              "rounds": args.rounds, "cpu": cpu_model(), "code": code, "load_average_after": load_avg(),
              "images": results}
    write_report(args.out, report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
