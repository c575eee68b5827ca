"""Reading an archive for training: images/s and peak memory per worker (docs/ml.md).

    .venv/bin/python bench/archive_read.py --quick      # 4 Kodak images (~2 min on 2 cores)
    .venv/bin/python bench/archive_read.py              # 24 Kodak images
    .venv/bin/python bench/archive_read.py --device cuda --workers 1   # on a GPU machine

Compresses the Kodak images (PNG, 768x512 / 512x768) with the shipped default model into an
archive, then reads every image back, one epoch per configuration, in a fresh process each:

  pillow  a DataLoader over the original PNG files, decoded with Pillow (the baseline)
  torch   a DataLoader over pipeline.ml.ArchiveDataset (full decodes, one torch thread a worker)
  ray     pipeline.ml.read_archive on a local Ray cluster, `concurrency` decoder actors

with 1 and 2 workers (DataLoader workers, or Ray actors). Figures: images/s over the timed
epoch (after one untimed warm-up epoch with persistent DataLoader workers; Ray Data starts its
actors with each execution, so its figure is taken from the first block to the last, and its
wall time with start-up is given too), and the peak resident memory (VmHWM) of each worker
process. Results: bench/results/archive_read[_quick].{json,md}. The machine is named in them;
on a shared machine the figures are noisy (the load of other processes is measured and shown).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from _common import DEFAULT_DATA, FamilyCpu, LoadMeter  # noqa: E402

KINDS = ("pillow", "torch", "ray")


# ====================================================================== memory of worker processes


class WorkerPeaks:
    """Peak RSS (VmHWM, MiB) of this process's descendants whose command line holds `match`
    (every descendant when empty), sampled every 0.1 s: DataLoader workers, Ray actors."""

    def __init__(self, match: str = ""):
        self.match, self.peaks = match, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
        out, todo = [], [os.getpid()]
        while todo:
            for child in children.get(todo.pop(), []):
                out.append(child)
                todo.append(child)
        return out

    def sample(self) -> None:
        for pid in self._descendants():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if self.match not in cmd:
                    continue
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peaks[pid] = max(self.peaks.get(pid, 0.0), int(line.split()[1]) / 1024)
            except (OSError, ValueError):
                pass

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            self.sample()

    def done(self) -> list[float]:
        self.sample()
        self.stop.set()
        return sorted((round(v, 1) for v in self.peaks.values()), reverse=True)


# ====================================================================== one configuration (a child process)


class PillowFiles(torch.utils.data.IterableDataset):
    """The baseline: the original files, split across DataLoader workers, decoded with Pillow."""

    def __init__(self, files: list[str]):
        self.files = files

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.files if info is None else self.files[info.id::info.num_workers]
        for path in mine:
            with Image.open(path) as image:
                yield {"key": os.path.basename(path), "image": np.asarray(image.convert("RGB"))}


def run_loader(dataset, workers: int, epochs: int) -> dict:
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=True)
    peaks = WorkerPeaks()
    times = []
    for epoch in range(epochs):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for sample in loader:
            n += 1
        times.append((n, time.perf_counter() - t0))
    per_worker = peaks.done()
    del loader
    n, seconds = times[-1]
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "epochs": len(times),
            "warmup_seconds": times[0][1] if len(times) > 1 else None, "peak_rss_mib": per_worker}


def run_ray(archive: str, workers: int, model: str | None) -> dict:
    import ray

    from pipeline.ml import read_archive

    ray.init(num_cpus=max(2, workers), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    peaks = WorkerPeaks("ArchiveDecoder")
    t0 = time.perf_counter()
    first, n, n_first = None, 0, 0
    ds = read_archive(archive, model=model, concurrency=workers, batch_size=1)
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
        n += len(batch["key"])
        if first is None:
            first, n_first = time.perf_counter(), n
    end = time.perf_counter()
    per_worker = peaks.done()
    ray.shutdown()
    steady = (n - n_first) / (end - first) if n > n_first and end > first else None
    return {"images": n, "seconds": end - t0, "images_per_s": steady, "wall_images_per_s": n / (end - t0),
            "epochs": 1, "warmup_seconds": (first - t0) if first else None, "peak_rss_mib": per_worker}


def run_one(args) -> dict:
    torch.set_num_threads(1)
    family = FamilyCpu()  # this process and its workers: "other cores" are other processes' only
    meter = LoadMeter(own_cpu=family)
    if args.one == "pillow":
        files = sorted(str(p) for p in Path(args.corpus).iterdir())
        result = run_loader(PillowFiles(files), args.workers, args.epochs)
    elif args.one == "torch":
        from pipeline.ml import ArchiveDataset

        result = run_loader(ArchiveDataset(args.archive, model=args.model, device=args.device),
                            args.workers, args.epochs)
    else:
        result = run_ray(args.archive, args.workers, args.model)
    result.update(kind=args.one, workers=args.workers, other_cores_busy=meter.other_cores())
    family.stop()
    return result


# ====================================================================== the driver


def make_archive(data_root: Path, n: int, shard_size: int, model: str | None, work: Path) -> tuple[Path, Path]:
    import shutil

    from pipeline.jobs import compress as C

    kodak = sorted((data_root / "kodak").glob("*.png"))[:n]
    if len(kodak) < n:
        sys.exit(f"need {n} Kodak images under {data_root / 'kodak'}, found {len(kodak)}")
    corpus = work / "corpus"
    corpus.mkdir(parents=True)
    for path in kodak:
        shutil.copy(path, corpus / path.name)
    sets = ["ray.enabled=false", "torch_threads=1", f"shard_size={shard_size}"] + ([f"model={model}"] if model else [])
    cfg = C.load_config(None, sets)
    cfg = dataclasses.replace(cfg, input=str(corpus), output=str(work / "archive.m2t"))
    report, _ = C.compress_dataset(cfg, progress=False)
    assert report["totals"]["ok"] == n, report["totals"]
    return corpus, work / "archive.m2t"


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version()}


def markdown(results: list[dict], info: dict) -> str:
    base = {r["workers"]: r["images_per_s"] for r in results if r["kind"] == "pillow"}
    lines = ["| reader | workers | images/s | vs Pillow | wall s (epoch) | start-up s | peak RSS per worker (MiB) | "
             "other cores busy |", "|---|---|---|---|---|---|---|---|"]
    names = {"pillow": "DataLoader, Pillow on the PNG files", "torch": "DataLoader, ArchiveDataset",
             "ray": "Ray Data, read_archive"}
    for r in results:
        ips = r["images_per_s"]
        ratio = f"{ips / base[r['workers']]:.3f}x" if ips and base.get(r["workers"]) else "n/a"
        fmt = lambda v, f: "n/a" if v is None else format(v, f)
        lines.append(f"| {names[r['kind']]} | {r['workers']} | {fmt(ips, '.2f')} | {ratio} | {r['seconds']:.2f} | "
                     f"{fmt(r['warmup_seconds'], '.1f')} | {', '.join(f'{v:.0f}' for v in r['peak_rss_mib']) or 'n/a'} | "
                     f"{fmt(r['other_cores_busy'], '.2f')} |")
    head = (f"{info['images']} Kodak images (768x512 / 512x768), model {info['model']}, device {info['device']}; "
            f"{info['machine']['cpu']} ({info['machine']['cores']} cores), torch {info['machine']['torch']}; "
            f"`{info['command']}`")
    return head + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 images (default: 24)")
    ap.add_argument("--images", type=int, default=None, help="Kodak images (default 24; --quick: 4)")
    ap.add_argument("--workers", default="1,2", help="worker counts, comma-separated (default 1,2)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"readers to time (default {','.join(KINDS)})")
    ap.add_argument("--model", default=None, help="model to compress with (default: the shipped default)")
    ap.add_argument("--device", default="cpu", help="where ArchiveDataset decodes (cpu, cuda)")
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    # Internal: one configuration, in a process of its own (its memory figures are its own).
    ap.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--archive", help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        args.workers = int(args.workers)
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0
    n = args.images or (4 if args.quick else 24)
    epochs = 2  # DataLoaders: a warm-up epoch, then the timed one
    workers = [int(w) for w in args.workers.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    with tempfile.TemporaryDirectory(prefix="archive-read-") as tmp:
        t0 = time.perf_counter()
        corpus, archive = make_archive(args.data_root, n, max(1, n // 4), args.model, Path(tmp))
        print(f"compressed {n} images in {time.perf_counter() - t0:.1f} s", flush=True)
        results = []
        for w in workers:
            for kind in kinds:
                cmd = [sys.executable, __file__, "--one", kind, "--workers", str(w), "--corpus", str(corpus),
                       "--archive", str(archive), "--epochs", str(epochs), "--device", args.device]
                if args.model:
                    cmd += ["--model", args.model]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{kind} with {w} worker(s) failed:\n{done.stderr[-3000:]}")
                results.append(json.loads(line[len("RESULT "):]))
                r = results[-1]
                print(f"{kind:<7} workers {w}: {r['images']} images, {r['images_per_s'] or 0:.2f} images/s, "
                      f"peak RSS per worker {r['peak_rss_mib']} MiB", flush=True)
    info = {"images": n, "model": args.model or "m2t-small-q3 (default)", "device": args.device,
            "epochs": epochs, "machine": machine(),
            "command": "bench/archive_read.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    table = markdown(results, info)
    print(table)
    stem = "archive_read_quick" if args.quick else "archive_read"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps({"info": info, "results": results}, indent=1) + "\n")
    (args.out_dir / f"{stem}.md").write_text(table)
    print(f"wrote {args.out_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
