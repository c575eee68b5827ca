#!/usr/bin/env python3
"""Every benchmark in bench/ run to the end once, at its smallest settings (issue 22: "every
benchmark in bench/ runs to the end on a fresh clone"). Not a measurement: the figures of
these runs are meaningless; what counts is that each script finishes with exit status 0.

    python bench/smoke.py                     # all of them, ~10 min on a 2-core VM (make bench-smoke)
    python bench/smoke.py codec_speed memory  # some
    python bench/smoke.py --list

Each script runs in its own process with its output under a temporary folder (never
bench/results), on two Kodak images (kodim01, kodim04) and, for the training benchmarks,
eight train2 photos (never Kodak or val for training). A script that needs what this checkout
cannot give (exact_arith_ab's base revision in a shallow clone) is reported as skipped, with
why. Exit status 1 if any script failed; the table says which, with its log's last lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import DEFAULT_DATA, markdown_table  # noqa: E402

TIMEOUT_S = 900  # per script: the slowest takes ~3 min on a 2-core VM
KODAK_IMAGES = ("kodim01.png", "kodim04.png")  # a landscape and a portrait image
TRAIN_IMAGES = 8


def _links(folder: Path, sources: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for src in sources:
        (folder / src.name).symlink_to(src.resolve())
    return folder


def scripts(work: Path, data: Path) -> dict[str, list[list[str]]]:
    """Script name -> the argument lists of its runs: `python bench/<name>.py ARGS`, or where
    a run's first item names another script (`jobs/...py`), that one with the rest. A name of
    several runs runs them in order, each needing the one before."""
    kodak = str(_links(work / "kodak", [data / "kodak" / n for n in KODAK_IMAGES]))
    photos = sorted(p for p in (data / "train2" / "photos").rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    train = str(_links(work / "train", photos[:TRAIN_IMAGES]))
    out = work / "out"
    vr = out / "vr"
    return {
        "analysis_precision": [["--models", "m2t-small-q1,mt-small-q2", "--kodak", kodak, "--images", "1",
                                "--threads", "1", "--repeats", "1", "--out", f"{out}/analysis_precision.json"]],
        "archive_read": [["--images", "2", "--workers", "1", "--out-dir", f"{out}/archive_read"]],
        "batch_consistency": [["--images", "2", "--batch", "2", "--json", f"{out}/batch_consistency.json"]],
        "capacity_sweep": [["--sizes", "64x128", "--repeats", "1", "--out", f"{out}/capacity_sweep.json"]],
        "checkout_ab": [["--base", str(REPO), "--images", "kodim01.png", "--threads", "1", "--rounds", "1",
                         "--repeats", "1", "--out", f"{out}/checkout_ab"]],
        "codec_speed": [["--quick", "--repeats", "1", "--steps", "4", "--json", f"{out}/codec_speed.json"]],
        "device_tree": [["size"]],  # not away/back: the smoke leaves the checkout as it is
        "entropy_int8_study": [["--models", "m2t-small-q3,mt-small-q2", "--kodak", kodak, "--images", "1",
                                "--threads", "1", "--out", f"{out}/entropy_int8_study"]],
        "exact_arith_ab": [["--models", "m2t-small-q3,mt-small-q2", "--threads", "1", "--repeats", "1",
                            "--json", f"{out}/exact_arith_ab.json"]],
        "gpu_check": [["--device", "cpu", "--images", "2", "--quick", "--json", f"{out}/gpu_check.json"]],
        "gpu_train": [["--config", "configs/train/tiny-test.yaml", "--set", f"train_data={train}",
                       "--set", "loader=device", "--set", "steps=100000", "--set", "checkpoint_every=10",
                       "--seconds", "5", "--out", f"{out}/gpu_train", "--device", "cpu"]],
        "hostile_streams": [["--quick", "--json", f"{out}/hostile_streams.json"]],
        "integer_synthesis": [["--quick", "--kodak", kodak, "--out", f"{out}/integer_synthesis"]],
        "kodak_rd": [["--models", "m2t-small-q1", "--kodak", kodak, "--out", f"{out}/kodak_rd"]],
        "refine_rd": [["--models", "m2t-small-q1,m2t-small-q3", "--data", kodak, "--limit", "1", "--steps", "0,2",
                       "--threads", "1", "--out", f"{out}/refine_rd"]],
        "memory": [["--quick", "--kodak", "1", "--large", "1152x864", "--out", f"{out}/memory.json"]],
        "peer_speed": [["--quick", "--json", f"{out}/peer_speed.json"]],  # CompressAI's codecs skip where it is missing
        "pipeline_speed": [["--quick", "--images", "2", "--rss-images", "1", "--workdir", f"{out}/pipeline",
                            "--json", f"{out}/pipeline_speed.json"]],
        "progressive": [["--model", "m2t-small-q3", "--kodak", kodak, "--images", "1", "--mt-order",
                         "--mt-images", "1", "--threads", "1", "--out", f"{out}/progressive.json",
                         "--plot", f"{out}/progressive.png"]],
        "synthesis_ab": [["--images", "kodim01.png", "--threads", "1", "--rounds", "1", "--out",
                          f"{out}/synthesis_ab"]],
        "synthesis_precision": [["--crops", "2", "--crop", "128", "--out", f"{out}/synthesis_precision.json"]],
        "thread_scaling": [["--kodak", kodak, "--images", "kodim01.png", "--threads", "1,2", "--rounds", "1",
                            "--out", f"{out}/thread_scaling.json"]],
        "train_speed": [["--crops", "32", "--train", train, "--val", "--val-images", "1",
                         "--out", f"{out}/train_speed.json"]],
        # no variable-rate model ships: a 2-step one is trained first (jobs/train.py), then measured
        "variable_rate_rd": [["jobs/train.py", "--config", "configs/train/m2t-small-vr-cpu.yaml", "--no-ray",
                              "--set", f"train_data={train}", "--set", "val_data=null", "--set", "steps=2",
                              "--set", "warmup_steps=0", "--set", "log_every=1", "--set", "checkpoint_every=2",
                              "--set", "memory_mb=256", "--set", f"output_dir={vr}"],
                             ["--model", f"{vr}/m2t-small-vr.safetensors", "--limit", "1", "--qualities", "1,2.5,7",
                              "--ladder", "m2t-small-q1", "--threads", "1", "--out", f"{out}/variable_rate_rd"]],
    }


def skip_reason(name: str) -> str | None:
    """Why `name` cannot run in this checkout, or None."""
    if name == "exact_arith_ab":
        from bench.exact_arith_ab import BASE

        known = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{BASE}^{{commit}}"], capture_output=True)
        if known.returncode != 0:
            return f"its base revision {BASE} is not in this clone's history (a shallow clone)"
    return None


def run_one(name: str, runs: list[list[str]], logs: Path) -> dict:
    """Run a script's runs in order; the first failure stops it."""
    t0 = time.perf_counter()
    log = logs / f"{name}.log"
    with open(log, "w") as sink:
        for args in runs:
            own = not args[0].endswith(".py")
            command = [sys.executable, f"bench/{name}.py" if own else args[0], *(args if own else args[1:])]
            sink.write("$ " + " ".join(command) + "\n")
            sink.flush()
            try:
                rc = subprocess.run(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                    timeout=TIMEOUT_S).returncode
            except subprocess.TimeoutExpired:
                rc = f"timed out after {TIMEOUT_S} s"
            if rc != 0:
                break
    tail = log.read_text(errors="replace").splitlines()[-12:] if rc != 0 else []
    return {"status": "ok" if rc == 0 else "failed", "exit": rc, "seconds": round(time.perf_counter() - t0, 1),
            "tail": tail}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="scripts to run (default: all)")
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help="datasets folder (kodak/, train2/)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (outputs and logs)")
    ap.add_argument("--list", action="store_true", help="print the scripts and their arguments, run nothing")
    args = ap.parse_args(argv)
    present = sorted(p.stem for p in (REPO / "bench").glob("*.py") if not p.stem.startswith("_") and p.stem != "smoke")
    work = Path(tempfile.mkdtemp(prefix="m2t-bench-smoke-"))
    try:
        table = scripts(work, args.data_root)
        missing = sorted(set(present) - set(table))
        if missing:  # a new benchmark must say how it runs here
            ap.error(f"bench/smoke.py has no settings for: {', '.join(missing)}")
        unknown = sorted(set(args.names) - set(table))
        if unknown:
            ap.error(f"unknown benchmark(s): {', '.join(unknown)} (--list shows them)")
        names = args.names or sorted(table)
        if args.list:
            for name in names:
                for run in table[name]:
                    print(name, " ".join(run))
            return 0
        logs = work / "logs"
        logs.mkdir()
        results = {}
        for i, name in enumerate(names, 1):
            reason = skip_reason(name)
            if reason:
                results[name] = {"status": "skipped", "why": reason}
            else:
                results[name] = run_one(name, table[name], logs)
            print(f"[{i}/{len(names)}] {name}: {results[name]['status']}"
                  + (f" ({results[name]['seconds']} s)" if "seconds" in results[name] else f": {reason}"), flush=True)
        rows = [[name, r["status"], r.get("seconds", ""), r.get("why", "") or (f"exit {r['exit']}" if r["exit"] else "")]
                for name, r in results.items()]
        print("\n".join(markdown_table(["script", "status", "seconds", "note"], rows)))
        failed = [name for name, r in results.items() if r["status"] == "failed"]
        for name in failed:
            print(f"\n--- {name} (exit {results[name]['exit']}), the end of its log:\n" + "\n".join(results[name]["tail"]))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        if args.keep:
            print(f"outputs and logs kept in {work}")
        return 1 if failed else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
