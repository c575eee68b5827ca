#!/usr/bin/env python3
"""One prepared call for a lent GPU machine: continue training a shipped model on the compact
training set carried with the working tree, for a fixed number of seconds, and bring back
the export, the training log and the GPU's busy fraction.

Here, once (the GPU machine reaches no network and has no constriction; the tiles and the
wheel travel with the tree, which holds at most 64 MiB, the shipped weights included; fetch
the wheel first, so that `--budget-mb auto` leaves room for it):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 -d .whl constriction==0.5.0   # .whl/ in .git/info/exclude
    python -m pipeline.training.pack --config configs/train/m2t-small-cpu.yaml --out runs/gpu-pack \\
        --budget-mb auto --png-sources nonphoto

There (device `run`, carry ["runs/gpu-pack", ".whl"], timeout 600):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 bench/gpu_train.py --seconds 420 --out $OUT

On the CPU, as its test does: python bench/gpu_train.py --config configs/train/tiny-test.yaml
--set train_data=DIR --seconds 5 --out /tmp/x --device cpu.

The run is `m2t train` in this process (configs/train/m2t-small-gpu.yaml: the device
loader, so the tiles and every crop live on the GPU; bf16 autocast; fused AdamW;
channels-last), stopped by time_limit_s: it checkpoints every checkpoint_every steps into
OUT/run (what is under OUT comes back even when the call is cut off), and at the limit
calibrates the exact models and exports OUT/run/<model_id>.safetensors. A thread samples
the GPU's utilisation (NVML through torch.cuda.utilization) twice a second. OUT/summary.json
holds images/s (the trainer's, validation and checkpoints excluded), the busy fraction, the
steps reached and the wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


class BusySampler:
    """Mean GPU utilisation (percent of time a kernel ran, NVML) over the run; None on a CPU
    or where NVML is missing."""

    def __init__(self, device: str, interval: float = 0.5):
        import torch

        self.samples: list[float] = []
        self.error = None
        self._stop = threading.Event()
        self._device = device
        self._thread = None
        if device.startswith("cuda") and torch.cuda.is_available():
            self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
            self._thread.start()

    def _run(self, interval: float) -> None:
        import torch

        while not self._stop.wait(interval):
            try:
                self.samples.append(float(torch.cuda.utilization(torch.device(self._device))))
            except Exception as exc:  # no NVML: report why, keep training
                self.error = str(exc)
                return

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return round(statistics.mean(self.samples) / 100, 3) if self.samples else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "train" / "m2t-small-gpu.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seconds", type=float, default=420.0, help="training time limit (default 420)")
    ap.add_argument("--out", required=True, help="folder that comes back ($OUT on the GPU machine)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    import torch

    from pipeline.training import trainer as T

    T._setup_logging()
    out = Path(args.out)
    run_dir = out / "run"
    cfg = T.load_config(args.config, args.overrides + [f"output_dir={run_dir}", f"time_limit_s={args.seconds}",
                                                       f"device={args.device}"])
    device = T.pick_device(cfg.device)
    sampler = BusySampler(str(device))
    t0 = time.time()
    export = T.train(cfg)
    wall = time.time() - t0
    busy = sampler.stop()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    _, _, info = T.registry.read_metadata(export)
    summary = {
        "device": T.hardware_name(device, 1), "torch": torch.__version__, "config": args.config,
        "seconds_limit": args.seconds, "wall_s": round(wall, 1), "steps": info["steps"],
        "crops_seen": info["crops_seen"], "batch_size": cfg.batch_size, "amp": info["amp"],
        "images_per_s_median": round(statistics.median(r["images_per_s"] for r in train[1:]), 1) if len(train) > 1 else None,
        "gpu_busy_fraction": busy, "gpu_busy_note": sampler.error,
        "last_loss": train[-1]["loss"] if train else None, "export": str(export),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
