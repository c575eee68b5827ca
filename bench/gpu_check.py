#!/usr/bin/env python3
"""One call for a lent GPU machine (a check and a benchmark, prepared and run on CPUs too):

    python bench/gpu_check.py                     # cuda when there is one, else the CPU
    python bench/gpu_check.py --images 8 --quick  # a smoke run (what the CPU test of it runs)

1. Exact pixels across devices: every committed golden stream (tests/data/golden-v4-*.m2t,
   golden-v5-*.m2t and golden-v7-*.m2t: both integer g_s arithmetics, both entropy models)
   decodes on the device to the committed pixel hashes; Kodak images encoded on the device
   decode on the CPU to the pixels the device decodes, and CPU-encoded streams decode on the
   device to the CPU's pixels.
2. The compress and verify jobs on a local Ray cluster (the jobs' defaults: one actor per GPU
   where there are GPUs): images/s, and the GPU's busy fraction while each job runs (the
   mean of `nvidia-smi --query-gpu=utilization.gpu` sampled every 0.2 s; None without one).

Prints a summary and writes bench/results/gpu_check_<device>.json. Exits 1 if any pixel
check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import DEFAULT_DATA  # noqa: E402


class GpuBusy:
    """Samples `nvidia-smi` utilization in a thread; `stop()` returns the mean fraction or None."""

    def __init__(self, interval: float = 0.2):
        self.samples: list[float] = []
        self.interval = interval
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.available:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]) / 100.0)
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.interval)

    def stop(self) -> float | None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=10)
        return float(np.mean(self.samples)) if self.samples else None


def _sha(rgb: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()).hexdigest()


def pixel_checks(device: str, rgbs: list[np.ndarray], model_name: str) -> dict:
    from m2t_core import Encoder, load_model

    data = REPO / "tests" / "data"
    manifest = json.loads((data / "golden.json").read_text())
    out = {"golden": {}, "cross_device": []}
    for version in ("v4", "v5", "v7"):
        for name, entry in manifest[version].items():
            rgb = load_model(name, device=device).decompress((data / f"golden-{version}-{name}.m2t").read_bytes())
            out["golden"][f"{version}-{name}"] = _sha(rgb) == entry["pixels_sha256"]
    dev, cpu = load_model(model_name, device=device), load_model(model_name, device="cpu")
    for i, rgb in enumerate(rgbs):
        on_dev, on_cpu = Encoder(dev).encode_image(rgb).bitstream, Encoder(cpu).encode_image(rgb).bitstream
        out["cross_device"].append({
            "image": i,
            "device_stream_same_pixels": bool(np.array_equal(cpu.decompress(on_dev), dev.decompress(on_dev))),
            "cpu_stream_same_pixels": bool(np.array_equal(dev.decompress(on_cpu), cpu.decompress(on_cpu))),
        })
    out["ok"] = all(out["golden"].values()) and all(
        r["device_stream_same_pixels"] and r["cpu_stream_same_pixels"] for r in out["cross_device"])
    return out


def job_runs(corpus: Path, work: Path, model_name: str) -> dict:
    from pipeline.jobs import compress as C
    from pipeline.jobs import verify as V

    archive = work / "archive.m2t"
    cfg = dataclasses.replace(C.load_config(None, ["shard_size=4"]), input=str(corpus), output=str(archive),
                              model=model_name)
    busy = GpuBusy()
    report, code = C.compress_dataset(cfg, progress=False)
    compress_busy = busy.stop()
    if code != C.EXIT_OK:
        raise RuntimeError(f"compression job exited with {code}:\n{C.format_report(report)}")
    run = report["this_run"]
    report_path = work / "verify.json"
    busy = GpuBusy()
    with contextlib.redirect_stdout(io.StringIO()):
        vcode = V.verify_main([str(archive), "--no-progress", "--report", str(report_path)])
    verify_busy = busy.stop()
    verify = json.loads(report_path.read_text())
    return {
        "compress": {"images": run["images"], "seconds": run["seconds"], "images_per_s": run["images_per_s"],
                     "actors": run["runner"]["actors"], "gpu_busy": compress_busy},
        "verify": {"exit": vcode, "images": verify["images"], "verified": verify["verified"],
                   "pixels_compared": verify["checks"]["pixels_compared"], "seconds": verify["seconds"],
                   "images_per_s": verify["images_per_s"], "gpu_busy": verify_busy},
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from m2t_core.image_io import load_image, save_image
    from m2t_core.registry import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=24, help="Kodak images for the jobs (default 24)")
    ap.add_argument("--quick", action="store_true", help="2 images for the cross-device checks (else 4)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--kodak", type=Path, default=DEFAULT_DATA / "kodak")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    paths = sorted(p for p in args.kodak.iterdir() if p.suffix.lower() == ".png")[: args.images]
    if not paths:
        raise SystemExit(f"no PNG images in {args.kodak}")
    rgbs = [load_image(p) for p in paths]
    t0 = time.time()
    result = {"benchmark": "gpu_check", "device": args.device, "model": args.model,
              "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    result["pixels"] = pixel_checks(args.device, rgbs[: 2 if args.quick else 4], args.model)
    print(f"pixels: golden {result['pixels']['golden']}; cross-device {result['pixels']['cross_device']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "in"
        corpus.mkdir()
        for p, rgb in zip(paths, rgbs):
            save_image(rgb, corpus / p.name)
        result["jobs"] = job_runs(corpus, Path(tmp), args.model)
    result["seconds"] = round(time.time() - t0, 1)
    print(f"jobs: {json.dumps(result['jobs'])}", flush=True)
    out = args.json or REPO / "bench" / "results" / f"gpu_check_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}; pixel checks {'passed' if result['pixels']['ok'] else 'FAILED'}")
    return 0 if result["pixels"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
