"""Export the latest weights of training runs as fp16 registry checkpoints.

    python -m pipeline.training.export_runs runs/ OUT_DIR [--names a,b]

For every run folder holding `last.safetensors` (the training state's weights), writes
OUT_DIR/<run>.safetensors in float16 with the run's step in its info. Used to bring weights
back from a GPU machine mid-training (the full training state is ~6x larger).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from m2t_core.registry import load_checkpoint, read_metadata, save_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--names", default="", help="comma-separated run names (default: all)")
    args = ap.parse_args(argv)
    wanted = set(filter(None, args.names.split(",")))
    for run in sorted(p for p in args.runs.iterdir() if (p / "last.safetensors").is_file()):
        if wanted and run.name not in wanted:
            continue
        model_id, _, info = read_metadata(run / "last.safetensors")
        model = load_checkpoint(run / "last.safetensors")
        state = json.loads((run / "last-state.json").read_text()) if (run / "last-state.json").is_file() else {}
        dest = save_checkpoint(model, args.out / f"{run.name}.safetensors", model_id,
                               info={"step": state.get("step", info.get("step")), "snapshot_of": str(run)},
                               dtype=torch.float16)
        print(f"{run.name}: step {state.get('step')} -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
