#!/usr/bin/env python3
"""Two checkouts of m2t against each other, on the same images, interleaved (a benchmark).

    git worktree add /tmp/m2t-base main               # the "before" (any commit)
    python bench/checkout_ab.py --base /tmp/m2t-base  # this checkout is the "after"
    python bench/checkout_ab.py --base /tmp/m2t-base --threads 2 --rounds 9 --images kodim01.png,kodim13.png

For a change to the hot path that must not change any byte or pixel. Each round runs one
fresh process per checkout, base first and then this one, alternating; each process loads
the model by name from its own checkout, codes every image once to warm up and then times
per image, each the median of --repeats calls (after `allocator.keep_freed_memory()`, as
the `m2t` commands and the jobs' workers call it, where the checkout has it):

* encode: `Encoder(model).encode_image(rgb)` (g_a, the exact entropy model, range coding);
* decode_latent: `Decoder.decode_latent(stream)` (the entropy model's steps, range decoding);
* g_s: `model.synthesis(y_hat, H, W, version)`, the stream's integer synthesis;
* decompress: `Decoder.decompress(stream)`, the whole decode.

The figures are the medians over rounds: this VM's speed drifts by up to +-20 % over
minutes, and alternating processes spreads the drift over both checkouts. The streams and the
decoded pixels of both checkouts must be identical (SHA-256 compared; the benchmark stops
otherwise), since the two checkouts must agree on what they compute; where their encoders
write other format versions (a new format against the old one), the decoded pixels and the
latent must agree and the streams only among processes of one version. Each stage's minor page
faults per call (the median) are recorded too. Writes OUT.json and OUT.md (default
bench/results/checkout_ab_t<threads>.json).

`--distinct-sizes K` times instead what an image of a size not seen before costs: oneDNN
compiles a kernel for each new shape it meets, which a benchmark repeating one image never
shows and a corpus of many sizes pays. Each process crops K images of distinct latent sizes
(between half and all of each side, seeded) from the first image and codes each twice: the
stages "encode, new size" / "decompress, new size" are the first calls, "..., size seen"
the second (medians over the K sizes), after warming up at two other sizes.

`--base-env NAME=VALUE` sets an environment variable for the base's processes only: with
`--base .` it compares a setting against its default in one checkout, e.g.
`--base . --base-env M2T_MALLOC_TUNING=0` (glibc's malloc as it comes, against tuned).

Since m2t 0.7.4, g_a runs in bf16 on CPUs with AMX-BF16, which changes the streams against
an older base on such CPUs; export M2T_BF16_ANALYSIS=0
(both sides inherit it) to compare everything else.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE_STAGES = ("encode, new size", "encode, size seen", "decompress, new size", "decompress, size seen")


def _timed(call) -> tuple[float, int, object]:
    """(seconds, minor page faults, result) of one call."""
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    result = call()
    return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0, result


def distinct_sizes(H: int, W: int, k: int, seed: int = 0) -> list[tuple[int, int]]:
    """k crop sizes (h, w) between half and all of (H, W), no two with the same latent size
    (each side / 16, rounded up), none with the warm-up crops' (`SIZE_WARMUP`)."""
    import numpy as np

    rng, taken, out = np.random.default_rng(seed), {(-(-h // 16), -(-w // 16)) for h, w in SIZE_WARMUP}, []
    for _ in range(100 * k):
        if len(out) == k:
            break
        h, w = int(rng.integers(H // 2, H + 1)), int(rng.integers(W // 2, W + 1))
        if (key := (-(-h // 16), -(-w // 16))) not in taken:
            taken.add(key)
            out.append((h, w))
    return out


SIZE_WARMUP = ((64, 64), (176, 240))


def worker(tree: Path, model_name: str, paths: list[str], threads: int, repeats: int, sizes: int = 0) -> dict:
    """In a process of its own: time the stages of checkout `tree` on each image (or, with
    `sizes`, on crops of that many sizes of the first: `_sizes_worker`)."""
    sys.path.insert(0, str(tree))  # before the installed (editable) m2t
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    import m2t_core
    from m2t_core import Decoder, Encoder, load_model
    from m2t_core.image_io import load_image

    if Path(m2t_core.__file__).resolve().parents[1] != tree.resolve():
        raise RuntimeError(f"imported {m2t_core.__file__}, not the checkout {tree}")
    if importlib.util.find_spec("m2t_core.allocator") is not None:  # m2t >= 0.7.3
        from m2t_core.allocator import keep_freed_memory

        keep_freed_memory()
    model = load_model(model_name)
    if sizes:
        return _sizes_worker(model, load_image(paths[0]), Path(paths[0]).name, sizes)
    out = {}
    for path in paths:
        rgb = load_image(path)
        H, W = rgb.shape[:2]
        encoder, decoder = Encoder(model), Decoder(model)
        stream = encoder.encode_image(rgb).bitstream
        header, y_hat = decoder.decode_latent(stream)
        pixels = decoder.decompress(stream)
        work = {"encode": lambda: encoder.encode_image(rgb), "decode_latent": lambda: decoder.decode_latent(stream),
                "g_s": lambda: model.synthesis(y_hat, H, W, header.version),
                "decompress": lambda: decoder.decompress(stream)}
        times, faults = {}, {}
        for stage, call in work.items():
            runs, faulted = [], []
            for _ in range(repeats):
                seconds, faults_now, _ = _timed(call)
                runs.append(seconds)
                faulted.append(faults_now)
            times[stage], faults[stage] = statistics.median(runs), statistics.median(faulted)
        out[Path(path).name] = {"median_s": times, "page_faults": faults, "format_version": header.version,
                                "stream_sha256": hashlib.sha256(stream).hexdigest(),
                                "latent_sha256": hashlib.sha256(y_hat.to(torch.int32).numpy().tobytes()).hexdigest(),
                                "pixels_sha256": hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()}
    return out


def _sizes_worker(model, rgb, name: str, k: int) -> dict:
    """Each of k crops of distinct sizes coded twice (encode, decompress; then again)."""
    import numpy as np

    from m2t_core import Decoder, Encoder

    encoder, decoder = Encoder(model), Decoder(model)
    for h, w in SIZE_WARMUP:  # one-time costs (probes, first allocations) out of the way
        decoder.decompress(encoder.encode_image(np.ascontiguousarray(rgb[:h, :w])).bitstream)
    times = {s: [] for s in SIZE_STAGES}
    faults = {s: [] for s in SIZE_STAGES}
    digest = hashlib.sha256()
    for h, w in distinct_sizes(*rgb.shape[:2], k):
        crop = np.ascontiguousarray(rgb[:h, :w])
        for when in ("new size", "size seen"):
            for stage, call in (("encode", lambda: encoder.encode_image(crop).bitstream),
                                ("decompress", lambda: decoder.decompress(stream))):
                seconds, faulted, result = _timed(call)
                times[f"{stage}, {when}"].append(seconds)
                faults[f"{stage}, {when}"].append(faulted)
                if stage == "encode":
                    stream = result
                digest.update(result if stage == "encode" else np.ascontiguousarray(result).tobytes())
    key = f"{name}: {k} sizes"
    return {key: {"median_s": {s: statistics.median(v) for s, v in times.items()},
                  "page_faults": {s: statistics.median(v) for s, v in faults.items()},
                  "stream_sha256": digest.hexdigest(), "pixels_sha256": digest.hexdigest()}}


def _run_worker(tree: Path, args, paths: list[str], extra_env: dict[str, str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(tree), "--model", args.model,
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--paths", json.dumps(paths),
           "--distinct-sizes", str(args.distinct_sizes)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), **extra_env)
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the worker for {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_agreement(runs: dict[str, list[dict]]) -> None:
    """Stop unless every process of both checkouts wrote the same streams (of one format
    version) and pixels (and latents, where recorded)."""
    for img in runs["this"][0]:
        for key in ("stream_sha256", "latent_sha256", "pixels_sha256"):
            by_version: dict = {}
            for run in (run for side in runs for run in runs[side]):
                if key in run[img]:
                    version = run[img].get("format_version") if key == "stream_sha256" else None
                    by_version.setdefault(version, set()).add(run[img][key])
            for seen in by_version.values():
                if len(seen) != 1:
                    raise SystemExit(f"{img}: the checkouts disagree on {key.split('_')[0]}: {sorted(seen)} (g_a in "
                                     "bf16 on one side only? export M2T_BF16_ANALYSIS=0 for both)")


def main(argv: list[str] | None = None) -> int:
    from _common import DEFAULT_DATA, code_state, load_avg, markdown_table, write_report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, help="the checkout to compare against (before)")
    ap.add_argument("--model", default="m2t-small-q3")
    ap.add_argument("--kodak", type=Path, default=DEFAULT_DATA / "kodak")
    ap.add_argument("--images", default="kodim01.png,kodim13.png", help="comma-separated file names in --kodak")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="processes per checkout, alternating")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per stage in each process")
    ap.add_argument("--distinct-sizes", type=int, default=0, metavar="K",
                    help="time crops of K distinct sizes of the first image, each coded twice (the first "
                         "call at a size against a repeat) instead of repeats of the same images")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--base-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for the base's processes only (repeatable)")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, json.loads(args.paths), args.threads, args.repeats,
                                args.distinct_sizes)))
        return 0
    if args.base is None or not (args.base / "m2t_core").is_dir():
        ap.error("--base must be a checkout of m2t (a folder with m2t_core/)")
    paths = [str(args.kodak / name) for name in args.images.split(",")]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        ap.error(f"no such image: {missing}")
    if any("=" not in item or not item.split("=", 1)[0] for item in args.base_env):
        ap.error("--base-env takes NAME=VALUE")
    base_env = dict(item.split("=", 1) for item in args.base_env)
    trees = {"base": args.base.resolve(), "this": REPO}
    runs: dict[str, list[dict]] = {"base": [], "this": []}
    for r in range(args.rounds):
        for side, tree in trees.items():
            runs[side].append(_run_worker(tree, args, paths, base_env if side == "base" else {}))
            last = runs[side][-1]
            done = ", ".join(f"{img} {stage} {t:.3f} s" for img, v in last.items()
                             for stage, t in v["median_s"].items() if stage.startswith("decompress"))
            print(f"round {r + 1}/{args.rounds} {side}: {done}", flush=True)
        _check_agreement(runs)  # after every round: a disagreement stops the run early
    results, rows = {}, []
    for img in runs["this"][0]:
        stages = tuple(runs["this"][0][img]["median_s"])
        med = {side: {s: statistics.median(run[img]["median_s"][s] for run in runs[side]) for s in stages}
               for side in runs}
        faults = {side: {s: statistics.median(run[img]["page_faults"][s] for run in runs[side]) for s in stages}
                  for side in runs}
        results[img] = {"median_s": med, "speedup": {s: med["base"][s] / med["this"][s] for s in stages},
                        "page_faults": faults,
                        "runs": {side: [run[img]["median_s"] for run in runs[side]] for side in runs},
                        "stream_sha256": runs["this"][0][img]["stream_sha256"],
                        "pixels_sha256": runs["this"][0][img]["pixels_sha256"]}
        rows += [[img, s, f"{med['base'][s]:.3f}", f"{med['this'][s]:.3f}", f"{med['base'][s] / med['this'][s]:.2f}x",
                  f"{faults['base'][s]:.0f} / {faults['this'][s]:.0f}"] for s in stages]
    from m2t_core.sysinfo import cpu_model

    states = {side: code_state(("m2t_core",), tree) for side, tree in trees.items()}
    commits = {side: (st["git_commit"] or "?")[:7] + ("+changes" if st["uncommitted"] else "")
               for side, st in states.items()}
    with_env = f" with {' '.join(args.base_env)}" if args.base_env else ""
    versions = {side: sorted({run[img].get("format_version") for run in runs[side] for img in run} - {None})
                for side in runs}
    same = ("the same streams and pixels in both" if versions["base"] == versions["this"] else
            f"the same latents and pixels in both, streams of format {versions['base']} (base) and "
            f"{versions['this']} (this)")
    header = (f"m2t {commits['base']} (base{with_env}) against {commits['this']} (this), {args.model}, {args.threads} "
              f"thread(s), {cpu_model()}; medians of {args.rounds} alternating processes, each the median of "
              + (f"{args.repeats} calls" if not args.distinct_sizes else f"{args.distinct_sizes} crop sizes")
              + f"; {same}\n\n")
    table = markdown_table(["image", "stage", "base, s", "this, s", "speed-up", "page faults per call, base / this"],
                           rows)
    report = {"benchmark": "checkout_ab", "command": " ".join(["bench/checkout_ab.py"] + (argv or sys.argv[1:])),
              "commits": commits, "base_env": base_env, "model": args.model, "threads": args.threads,
              "rounds": args.rounds, "repeats": args.repeats, "distinct_sizes": args.distinct_sizes,
              "machine": {"cpu": cpu_model()},
              "load_average_after": load_avg(),
              "images": results}
    write_report(args.out or REPO / "bench" / "results" / f"checkout_ab_t{args.threads}.json", report,
                 header + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
