#!/usr/bin/env python3
"""Pipeline benchmark (a benchmark, not a test): throughput of the compression and verify jobs
with 1 and 2 Ray actors, and the peak memory of an actor as the dataset grows 10x.

    python bench/pipeline_speed.py --quick     # 4 images, 1 repeat; RSS at 2 and 20 images (~1.5 min)
    python bench/pipeline_speed.py             # 24 images, 3 repeats; RSS at 8 and 80 images (~8.5 min on
                                               # 2 idle cores; ~12 min with one core busy elsewhere)
    python bench/pipeline_speed.py --size 1920x1080 --images 6 --skip-memory   # ~2 MP images

What runs: the real jobs, through their library entries: `pipeline.jobs.compress.compress_dataset`
(as jobs/compress.py and tests/test_compress.py call it) and `pipeline.jobs.verify.verify_main`
(as `m2t verify` does), on a local Ray cluster started ONCE with `ray.init(num_cpus=2)` before
any timing (so the cluster's start-up is excluded; the jobs join it). The number of actors
is the jobs' own setting (`ray.actors` for compress, `--actors` for verify), one CPU and one
torch thread each (the defaults), with the default model (m2t-small-q3) and the default job
settings (compute_psnr on: the compression job also reconstructs each image, for PSNR and
the decoded CRC that verify checks).

The corpus: real photographs at --size (default 768x512, Kodak's), written to a temporary
folder: at 768x512, the Kodak images (../shared/datasets/kodak, portrait ones turned) as
PNG, then 768x512 crops of the Debian wallpapers (each cover-resized to 1536x1024, four
quadrants) as JPEG (quality 92); at a larger size, the wallpapers only (all 1.3-13 MP),
each cover-resized to the size, as JPEG (quality 92), never an upscaled Kodak image; without
../shared/datasets, scikit-image's sample photos, resized, cropped and mirrored. Shards of
--shard-size images (default 2: with few images, small shards keep two actors evenly busy
to the end; the job's default is 256).

Per run: images, seconds, images/s and megapixels/s as the job reports them (its clock runs
from just before its actors start to its last shard: each figure includes one actor start-up
and model load, but not the cluster's start-up), and the same with the actor start-up (measured
separately: a Ray actor that imports the pipeline and loads the model) subtracted. Every
figure is the median over --repeats runs; the runs alternate 1 and 2 actors, so a change of
machine load hits both. Then the 2-actor / 1-actor throughput ratio (target: >= 1.7x on 2 cores).

Memory: every worker reports its own peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`;
the `peak_rss_mib` field of the compression job's shard stats and of the verify report). The
compression job runs on N and 10N images (2 actors, same shard size); the largest per-actor
peak must stay flat.

Load: this is a 2-core machine, and other processes may be busy; the script records how many
cores OTHER processes kept busy (from /proc/stat, minus this process and its Ray cluster) and
warns when the figures are contended.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from m2t_core.registry import DEFAULT_MODEL  # noqa: E402
from m2t_core.sysinfo import cpu_model  # noqa: E402
from bench._common import (DEFAULT_DATA, FamilyCpu, LoadMeter, code_state, cover_resize,  # noqa: E402
                           load_avg, write_report)

SIZE = (768, 512)  # width, height; --size changes it
CLUSTER_CPUS = 2


# ------------------------------------------------------------------------------ corpus


def photos(data_root: Path) -> Iterator[tuple[str, object, str]]:
    """(name, 768x512 PIL image, format) of real photographs, in a fixed order."""
    from PIL import Image

    kodak = data_root / "kodak"
    walls = data_root / "train" / "debian-wallpapers"
    if SIZE[0] * SIZE[1] > 768 * 512 and walls.is_dir():
        for path in sorted(walls.rglob("*.jpg")):
            yield f"wall-{path.stem}", cover_resize(Image.open(path).convert("RGB"), SIZE), "JPEG"
        return
    if kodak.is_dir() or walls.is_dir():
        for path in sorted(kodak.glob("kodim*.png")) if kodak.is_dir() else []:
            img = Image.open(path).convert("RGB")
            if img.height > img.width:
                img = img.transpose(Image.Transpose.ROTATE_90)
            yield f"kodak-{path.stem}", cover_resize(img, SIZE), "PNG"
        for path in sorted(walls.rglob("*.jpg")) if walls.is_dir() else []:
            big = cover_resize(Image.open(path).convert("RGB"), (2 * SIZE[0], 2 * SIZE[1]))
            for q, (x, y) in enumerate([(0, 0), (SIZE[0], 0), (0, SIZE[1]), (SIZE[0], SIZE[1])]):
                yield f"wall-{path.stem}-{q}", big.crop((x, y, x + SIZE[0], y + SIZE[1])), "JPEG"
        return
    from skimage import data as skdata

    samples = {"astronaut": skdata.astronaut(), "coffee": skdata.coffee(), "chelsea": skdata.chelsea(),
               "rocket": skdata.rocket(), "motorcycle": skdata.stereo_motorcycle()[0]}
    for scale in (1.0, 1.5, 2.0, 2.5):
        for name, rgb in samples.items():
            img = Image.fromarray(np.ascontiguousarray(rgb[..., :3]))
            img = cover_resize(img, (round(SIZE[0] * scale), round(SIZE[1] * scale)))
            x0, y0 = (img.width - SIZE[0]) // 2, (img.height - SIZE[1]) // 2
            crop = img.crop((x0, y0, x0 + SIZE[0], y0 + SIZE[1]))
            yield f"skimage-{name}-x{scale:g}", crop, "PNG"
            yield f"skimage-{name}-x{scale:g}-mirrored", crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "JPEG"


def write_pool(folder: Path, n: int, data_root: Path) -> list[Path]:
    """The first n photos as files in `folder`; cycles when n exceeds the supply."""
    folder.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    while len(made) < n:
        before = len(made)
        for name, img, fmt in photos(data_root):
            if len(made) >= n:
                break
            ext = ".png" if fmt == "PNG" else ".jpg"
            path = folder / f"{len(made):04d}-{name}{ext}"
            img.save(path, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
            made.append(path)
        if len(made) == before:
            raise RuntimeError(f"no photographs found under {data_root} and no scikit-image fallback")
    return made


def corpus(pool: list[Path], n: int, folder: Path) -> Path:
    """A folder holding the first n pool images (hard links: no copies)."""
    folder.mkdir(parents=True)
    for src in pool[:n]:
        try:
            os.link(src, folder / src.name)
        except OSError:
            shutil.copy2(src, folder / src.name)
    return folder


# ------------------------------------------------------------------------------ runs


def startup_seconds(actors: int, model: str) -> float:
    """Wall time until `actors` fresh Ray actors (1 CPU each) have imported the pipeline and
    loaded the model: the fixed cost in each job's figure."""
    import ray

    @ray.remote(num_cpus=1)
    class Loader:
        def __init__(self, name: str):
            import torch

            torch.set_num_threads(1)
            from pipeline.storage import archive as A

            self.model = A.open_model(name, device="cpu")

    t0 = time.perf_counter()
    handles = [Loader.remote(model) for _ in range(actors)]
    ray.get([h.__ray_ready__.remote() for h in handles])
    elapsed = time.perf_counter() - t0
    for h in handles:
        ray.kill(h)
    return elapsed


def run_compress(inp: Path, out: Path, actors: int, shard_size: int, model: str) -> dict:
    from pipeline.storage import archive as A
    from pipeline.jobs import compress as C

    cfg = C.load_config(None, [f"shard_size={shard_size}", f"ray.actors={actors}"])
    cfg = dataclasses.replace(cfg, input=str(inp), output=str(out), model=model)
    report, code = C.compress_dataset(cfg, progress=False)
    if code != C.EXIT_OK:
        raise RuntimeError(f"compression job exited with {code}:\n{C.format_report(report)}")
    run = report["this_run"]
    stats = sorted(A.Archive(str(out)).completed_shards().values(), key=lambda s: s["shard"])
    peaks: dict[str, float] = {}
    series: dict[str, list[float]] = {}  # per worker: its peak RSS after each of its shards, in order
    for s in stats:
        peaks[s["worker"]] = max(peaks.get(s["worker"], 0.0), s["peak_rss_mib"])
        series.setdefault(s["worker"], []).append(round(s["peak_rss_mib"], 1))
    return {"images": run["images"], "megapixels": run["megapixels"], "seconds": run["seconds"],
            "images_per_s": run["images_per_s"], "megapixels_per_s": run["megapixels_per_s"],
            "actors": run["runner"]["actors"], "shards": report["shards"]["this_run"],
            "bpp_mean": report["totals"]["bpp_mean"], "psnr_mean": report["totals"]["psnr_mean"],
            "peak_rss_mib": peaks, "peak_rss_mib_after_each_shard": series}


def run_verify(archive: Path, actors: int, report_path: Path) -> dict:
    from pipeline.jobs import verify as V

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = V.verify_main([str(archive), "--actors", str(actors), "--no-progress", "--report", str(report_path)])
    if code != V.EXIT_OK:
        raise RuntimeError(f"verify job exited with {code}:\n{printed.getvalue()}")
    report = json.loads(report_path.read_text())
    pixels = report["megapixels_per_s"] * report["seconds"]
    return {"images": report["images"], "megapixels": pixels, "seconds": report["seconds"],
            "images_per_s": report["images_per_s"], "megapixels_per_s": report["megapixels_per_s"],
            "actors": report["runner"]["actors"], "shards": report["shards"]["checked"],
            "peak_rss_mib": report["peak_rss_mib"]}


def summarize(runs: list[dict], startup: dict[int, float]) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    startup_s = startup[runs[0]["actors"]]  # the job may start fewer actors than asked (one per shard at most)
    seconds = med("seconds")
    images, megapixels = runs[0]["images"], runs[0]["megapixels"]
    steady = max(seconds - startup_s, 1e-9)
    return {
        "images": images, "megapixels": megapixels, "actors": runs[0]["actors"], "shards": runs[0]["shards"],
        "seconds": seconds, "runs_s": [r["seconds"] for r in runs],
        "images_per_s": med("images_per_s"), "megapixels_per_s": med("megapixels_per_s"),
        "startup_s": startup_s,
        "images_per_s_excl_startup": images / steady, "megapixels_per_s_excl_startup": megapixels / steady,
        "peak_rss_mib_max": max(max(r["peak_rss_mib"].values()) for r in runs),
        "other_processes_cores_runs": [r["other_processes_cores"] for r in runs],
        "peak_rss_mib_runs": [r["peak_rss_mib"] for r in runs],
    }


# ------------------------------------------------------------------------------ report


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    import torch

    from m2t_core import int8_conv

    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "ray_cluster_cpus": CLUSTER_CPUS, "torch": torch.__version__, "ray": version("ray"),
            "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "int8_conv": int8_conv.status()}


def fmt_tables(throughput: dict, ratios: dict, rss: dict) -> str:
    lines = []
    if throughput:
        lines += ["| job | actors | images | shards | seconds | images/s | MP/s | images/s excl. start-up | "
                  "peak RSS per actor, MiB (max) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for job, by_actors in throughput.items():
            for actors, r in by_actors.items():
                lines.append(f"| {job} | {actors} | {r['images']} | {r['shards']} | {r['seconds']:.1f} | "
                             f"{r['images_per_s']:.3f} | {r['megapixels_per_s']:.3f} | "
                             f"{r['images_per_s_excl_startup']:.3f} | {r['peak_rss_mib_max']:.0f} |")
        lines += ["", "| job | 2 actors / 1 actor, images/s | excl. start-up | target |", "|---|---:|---:|---:|"]
        for job, r in ratios.items():
            lines.append(f"| {job} | {r['ratio']:.2f}x | {r['ratio_excl_startup']:.2f}x | >= 1.7x |")
        lines.append("")
    if not rss:
        return "\n".join(lines)
    lines.append("| compress, 2 actors | images | shards | seconds | images/s | peak RSS per actor, MiB |")
    lines.append("|---|---:|---:|---:|---:|---|")
    for label, r in rss["runs"].items():
        per = ", ".join(f"{v:.0f}" for v in sorted(r["peak_rss_mib"].values()))
        lines.append(f"| {label} | {r['images']} | {r['shards']} | {r['seconds']:.1f} | {r['images_per_s']:.3f} | "
                     f"{per} (max {max(r['peak_rss_mib'].values()):.0f}) |")
    lines.append(f"\npeak RSS per actor, 10N / N: {rss['ratio']:.3f}x (flat means ~1.0x); within the 10N run, "
                 f"end / halfway: {rss['second_half_growth_max']:.3f}x (largest over the actors)")
    long_run = list(rss["runs"].values())[-1]
    for i, series in enumerate(long_run["peak_rss_mib_after_each_shard"].values()):
        lines.append(f"  10N run, actor {i + 1}, peak RSS after each of its shards (MiB): "
                     + " ".join(f"{v:.0f}" for v in series))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Throughput of the compression and verify jobs with 1 and 2 actors, "
                                             "and per-actor peak RSS as the dataset grows 10x.")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 images, 1 repeat, RSS at 2 and 20 images")
    ap.add_argument("--images", type=int, default=None, help="throughput corpus (default 24; --quick: 4)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per throughput figure (default 3; --quick: 1)")
    ap.add_argument("--rss-images", type=int, default=None,
                    help="N for the memory runs at N and 10N images (default 8; --quick: 2)")
    ap.add_argument("--skip-throughput", action="store_true", help="only the memory runs (N and 10N images)")
    ap.add_argument("--skip-memory", action="store_true", help="only the throughput runs (no N / 10N memory runs)")
    ap.add_argument("--size", default="768x512", metavar="WxH",
                    help="image size (default 768x512, Kodak's; e.g. 1920x1080 for ~2 MP)")
    ap.add_argument("--shard-size", type=int, default=2, help="images per shard (default 2)")
    ap.add_argument("--malloc-arena-max", type=int, default=0,
                    help="run every Ray worker with MALLOC_ARENA_MAX=N (glibc), through the cluster's runtime_env; "
                         "default: unset, the jobs as they ship")
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA,
                    help="datasets folder (kodak/, train/debian-wallpapers/); default ../shared/datasets")
    ap.add_argument("--workdir", type=Path, default=None, help="folder (made if missing) under which the corpus and archives go, in a temp "
                         "dir removed at the end (default: the system's temp folder)")
    ap.add_argument("--json", type=Path, default=None,
                    help="where to write results (default bench/results/pipeline_speed.json; --quick: "
                         "bench/results/pipeline_speed_quick.json)")
    args = ap.parse_args(argv)
    global SIZE
    try:
        SIZE = tuple(int(v) for v in args.size.lower().split("x"))
        assert len(SIZE) == 2 and min(SIZE) >= 16
    except (ValueError, AssertionError):
        ap.error(f"--size must be WIDTHxHEIGHT, got {args.size!r}")
    if args.skip_memory and args.skip_throughput:
        ap.error("--skip-memory and --skip-throughput leave nothing to measure")
    n_images = args.images or (4 if args.quick else 24)
    repeats = args.repeats or (1 if args.quick else 3)
    n_rss = args.rss_images or (2 if args.quick else 8)
    if min(n_images, repeats, n_rss, args.shard_size) < 1:
        ap.error("--images, --repeats, --rss-images and --shard-size must be >= 1")
    json_path = args.json or REPO / "bench" / "results" / (
        "pipeline_speed_quick.json" if args.quick else "pipeline_speed.json")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def log(msg: str) -> None:
        print(msg, flush=True)

    import ray

    machine = machine_info()
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, ray {machine['ray']}")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)  # the temp dir goes inside it
    tmp = tempfile.TemporaryDirectory(prefix="m2t-pipeline-bench-", dir=args.workdir)
    work = Path(tmp.name)
    family = FamilyCpu()  # CPU time of this process and its Ray cluster: not "other processes"
    try:
        t0 = time.perf_counter()
        pool = write_pool(work / "pool", n_images if args.skip_memory else max(n_images, 10 * n_rss), args.data_root)
        log(f"corpus:  {len(pool)} photos at {SIZE[0]}x{SIZE[1]} written to {work / 'pool'} in "
            f"{time.perf_counter() - t0:.1f} s (first: {pool[0].name}, last: {pool[-1].name})")
        t0 = time.perf_counter()
        env = {"env_vars": {"MALLOC_ARENA_MAX": str(args.malloc_arena_max)}} if args.malloc_arena_max else None
        ray.init(num_cpus=CLUSTER_CPUS, include_dashboard=False, log_to_driver=False, runtime_env=env)
        log(f"ray:     local cluster with {CLUSTER_CPUS} CPUs started in {time.perf_counter() - t0:.1f} s "
            "(not timed below)")
        startup_seconds(2, args.model)  # warm-up: first imports from disk, Ray's worker pool
        startup = {a: statistics.median(startup_seconds(a, args.model) for _ in range(3)) for a in (1, 2)}
        log(f"start-up: {startup[1]:.2f} s for 1 actor, {startup[2]:.2f} s for 2 actors (median of 3; a fresh Ray "
            "actor that imports the pipeline and loads the model)")
        log(f"load average before: {load_avg()}")

        overall = LoadMeter(family)
        meter = LoadMeter(family)
        inp = corpus(pool, n_images, work / f"in-{n_images}")
        raw: dict[str, dict[int, list]] = {"compress": {1: [], 2: []}, "verify": {1: [], 2: []}}
        t_start = time.perf_counter()

        def measured(fn, *fn_args) -> dict:
            run_meter = LoadMeter(family)
            res = fn(*fn_args)
            res["other_processes_cores"] = run_meter.other_cores()
            return res

        for r in range(0 if args.skip_throughput else repeats):
            for actors in ((1, 2) if r % 2 == 0 else (2, 1)):
                out = work / f"archive-r{r}-a{actors}.m2t"
                res = measured(run_compress, inp, out, actors, args.shard_size, args.model)
                raw["compress"][actors].append(res)
                log(f"  run {r + 1}/{repeats}: compress {actors} actor(s): {res['images']} images in "
                    f"{res['seconds']:.1f} s, {res['images_per_s']:.3f} images/s; other processes: "
                    f"{res['other_processes_cores'] or 0:.2f} cores")
            for actors in ((1, 2) if r % 2 == 0 else (2, 1)):
                res = measured(run_verify, work / f"archive-r{r}-a1.m2t", actors, work / f"verify-r{r}-a{actors}.json")
                raw["verify"][actors].append(res)
                log(f"  run {r + 1}/{repeats}: verify   {actors} actor(s): {res['images']} images in "
                    f"{res['seconds']:.1f} s, {res['images_per_s']:.3f} images/s; other processes: "
                    f"{res['other_processes_cores'] or 0:.2f} cores")
            for actors in (1, 2):
                shutil.rmtree(work / f"archive-r{r}-a{actors}.m2t", ignore_errors=True)
        if args.skip_throughput:
            raw = {}
        throughput = {job: {a: summarize(runs, startup) for a, runs in by.items()} for job, by in raw.items()}
        ratios = {job: {"ratio": t[2]["images_per_s"] / t[1]["images_per_s"],
                        "ratio_excl_startup": t[2]["images_per_s_excl_startup"] / t[1]["images_per_s_excl_startup"]}
                  for job, t in throughput.items()}
        throughput_other = meter.other_cores()
        log(f"throughput runs took {time.perf_counter() - t_start:.0f} s; other processes kept "
            f"{throughput_other if throughput_other is not None else float('nan'):.2f} cores busy on average")

        meter = LoadMeter(family)
        rss_runs: dict[str, dict] = {}
        for label, n in () if args.skip_memory else ((f"N = {n_rss}", n_rss), (f"10N = {10 * n_rss}", 10 * n_rss)):
            res = measured(run_compress, corpus(pool, n, work / f"rss-in-{n}"), work / f"rss-{n}.m2t", 2,
                           args.shard_size, args.model)
            rss_runs[label] = res
            log(f"  memory: compress {n} images on 2 actors in {res['seconds']:.1f} s; peak RSS per actor "
                + ", ".join(f"{v:.0f}" for v in sorted(res["peak_rss_mib"].values())) + " MiB")
            shutil.rmtree(work / f"rss-{n}.m2t", ignore_errors=True)
        rss = None
        if rss_runs:
            small, large = (max(r["peak_rss_mib"].values()) for r in rss_runs.values())
            # Growth within the long run: each actor's peak at the end over its peak halfway through.
            halves = [v[-1] / v[(len(v) - 1) // 2] for v in rss_runs[f"10N = {10 * n_rss}"][
                "peak_rss_mib_after_each_shard"].values()]
            rss = {"n": n_rss, "runs": rss_runs, "max_peak_rss_mib": {"N": small, "10N": large},
                   "ratio": large / small, "second_half_growth_max": max(halves),
                   "other_processes_cores": meter.other_cores()}
        other_cores = overall.other_cores()
    finally:
        ray.shutdown()
        family.stop()
        tmp.cleanup()

    contended = other_cores is not None and other_cores > 0.25
    log("")
    log(fmt_tables(throughput, ratios, rss))
    log("(seconds and images/s: the job's own clock and figures, median of the runs: it starts just before the "
        "actors do, so one actor start-up + model load is in; the cluster's start-up is not. 'excl. start-up' "
        "subtracts the separately measured start-up.)")
    for job, r in ratios.items():
        log(f"{job}: 2 actors / 1 actor throughput: {r['ratio']:.2f}x ({r['ratio_excl_startup']:.2f}x excl. start-up)")
    if rss:
        log(f"compress, max per-actor peak RSS: {rss['max_peak_rss_mib']['N']:.0f} MiB at {n_rss} images, "
            f"{rss['max_peak_rss_mib']['10N']:.0f} MiB at {10 * n_rss} images: {rss['ratio']:.3f}x")
    if other_cores is not None:
        log(f"other processes kept {other_cores:.2f} of {os.cpu_count()} cores busy on average"
            + (": the 2-actor figures are contended (two actors need both cores)" if contended else ""))

    report = {
        "benchmark": "pipeline_speed",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": machine,
        "code": code_state(),
        "settings": {"model": args.model, "image_size": f"{SIZE[0]}x{SIZE[1]}", "images": n_images,
                     "repeats": repeats, "shard_size": args.shard_size, "rss_images": None if args.skip_memory else [n_rss, 10 * n_rss],
                     "malloc_arena_max": args.malloc_arena_max or None, "skip_throughput": args.skip_throughput,
                     "cpus_per_actor": 1, "torch_threads_per_actor": 1, "compute_psnr": True,
                     "timing": "the jobs' own clocks: from just before the actors start to the last shard; the Ray "
                               "cluster is started once before any timing"},
        "startup_s": {str(a): s for a, s in startup.items()},
        "throughput": {job: {str(a): r for a, r in t.items()} for job, t in throughput.items()},
        "ratio_2_over_1": ratios,
        "rss": rss,
        "other_processes_cores": other_cores,
        "other_processes_cores_throughput_runs": throughput_other,
        "contended": contended,
        "load_average_after": load_avg(),
    }
    write_report(json_path, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
