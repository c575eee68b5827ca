"""Training throughput on this machine, the real training loop, before vs after the fast-trainer
settings, at an equal number of crops; optionally the RD each reaches (real coding on val).

    python bench/train_speed.py                       # 384 crops each, ~5 minutes on 2 cores
    python bench/train_speed.py --crops 1536 --val    # + RD at equal crops, warm-started from m2t-small-q3

Each variant runs `m2t train` in-process (pipeline.training.trainer.train) on the same data
and warm start and reads crops/s from its metrics.jsonl (the median of its log records after
the first, which holds the warm-up; validation and checkpoint time excluded as the trainer
excludes them). The variants:

* before: the settings of configs/train/m2t-small.yaml run on a CPU: stream loader (JPEG
  decoding per crop in 12 DataLoader workers), bf16 autocast, NCHW, batch 16;
* fp32: the same with TrainConfig's old default amp "none";
* after: configs/train/m2t-small-cpu.yaml's settings: memory loader (pool.py), amp auto,
  channels-last, batch 8 (from `m2t train --probe`).

With --val, each run ends with the trainer's export validation (real bitstreams on the first
16 images of ../shared/datasets/val, centre crops <= 512), so bpp, PSNR and the loss
bpp + lambda * MSE are compared at equal crops seen. Results: bench/results/train_speed.json
and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import DEFAULT_DATA, REPO, LoadMeter, code_state, markdown_table, write_report  # noqa: E402

VARIANTS = {
    "before": {"loader": "stream", "num_workers": 12, "amp": "bf16", "channels_last": False, "batch_size": 16},
    "fp32": {"loader": "stream", "num_workers": 12, "amp": "none", "channels_last": False, "batch_size": 16},
    "after": {"loader": "memory", "amp": "auto", "channels_last": True, "batch_size": 8},
    "after-fp32": {"loader": "memory", "amp": "none", "channels_last": True, "batch_size": 8},
}


def run_variant(name: str, settings: dict, args, out_root: Path) -> dict:
    from pipeline.training import trainer as T

    steps = math.ceil(args.crops / settings["batch_size"])
    overrides = [f"{k}={v}" for k, v in settings.items()] + [
        f"train_data={args.train}", f"steps={steps}", f"log_every={max(1, steps // 4)}",
        f"output_dir={out_root / name}", f"val_data={args.val_data if args.val else 'null'}",
        f"val_images={args.val_images}", f"val_every={10 * steps}", f"checkpoint_every={10 * steps}",
        "init_from=m2t-small-q3", "model_id=m2t-small-q3", "lambda_boost=1.0", "warmup_steps=0",
        f"lr={args.lr}", "qat_from=1.0", "device=cpu", "model=null",
    ]
    cfg = T.load_config(REPO / "configs" / "train" / "m2t-small.yaml", overrides)
    meter = LoadMeter()
    t0 = time.time()
    T.train(cfg)
    wall = time.time() - t0
    records = [json.loads(line) for line in (out_root / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    crops_per_s = statistics.median(r["images_per_s"] for r in train[1:]) if len(train) > 1 else train[0]["images_per_s"]
    row = {"variant": name, **settings, "steps": steps, "crops": steps * settings["batch_size"],
           "crops_per_s": round(crops_per_s, 2), "wall_s": round(wall, 1),
           "other_cores_busy": meter.other_cores()}
    if val:
        lam = cfg.lmbda
        mse = 255.0 ** 2 / 10 ** (val[-1]["psnr"] / 10)
        row.update(val_bpp=round(val[-1]["bpp"], 4), val_psnr=round(val[-1]["psnr"], 3),
                   val_loss=round(val[-1]["bpp"] + lam * mse, 4))
    print(json.dumps(row), flush=True)
    return row


def markdown(report: dict) -> str:
    lines = [f"# Training throughput: {report['machine']}", "",
             f"`{report['command']}`; torch {report['torch']}, {report['threads']} threads; "
             f"{report['crops']} crops per variant, warm-started from m2t-small-q3 on `{report['train_data']}`.", "",
             ]
    before = next((r["crops_per_s"] for r in report["rows"] if r["variant"] == "before"), None)
    lines += markdown_table(
        ["variant", "loader", "amp", "layout", "batch", "crops/s", "x before", "val bpp", "val PSNR", "val loss"],
        [[r["variant"], r["loader"], r["amp"], "NHWC" if r["channels_last"] else "NCHW", r["batch_size"],
          f"{r['crops_per_s']:.2f}", f"{r['crops_per_s'] / before:.2f}" if before else "-",
          r.get("val_bpp", "-"), r.get("val_psnr", "-"), r.get("val_loss", "-")] for r in report["rows"]])
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", type=int, default=384, help="crops per variant (default 384)")
    parser.add_argument("--train", default=str(DEFAULT_DATA / "train2"), help="training images (default train2)")
    parser.add_argument("--val", action="store_true", help="compare RD at equal crops (real coding on val)")
    parser.add_argument("--val-data", default=str(DEFAULT_DATA / "val"))
    parser.add_argument("--val-images", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--variants", default="before,fp32,after", help=f"some of {','.join(VARIANTS)}")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_speed.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from m2t_core.sysinfo import cpu_model

    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="m2t-train-speed-") as tmp:
        for name in names:
            rows.append(run_variant(name, VARIANTS[name], args, Path(tmp)))
    report = {"machine": f"{cpu_model()} ({__import__('os').cpu_count()} cores)", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "crops": args.crops, "train_data": args.train,
              "command": "python bench/train_speed.py " + " ".join(sys.argv[1:]), "rows": rows, **code_state()}
    out = Path(args.out)
    write_report(out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
