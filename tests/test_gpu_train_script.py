"""bench/gpu_train.py, the prepared GPU training call, run on the CPU with the tiny preset
(as the GPU machine runs it, with a time limit, the device loader and a folder of tiles)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from m2t_core import registry
from test_training import make_images

REPO = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_train", REPO / "bench" / "gpu_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_train_on_cpu_with_the_tiny_preset(tmp_path):
    tiles = tmp_path / "pack"
    make_images(tiles, 4)
    script = load_script()
    out = tmp_path / "out"
    argv = ["--config", str(REPO / "configs" / "train" / "tiny-test.yaml"), "--set", f"train_data={tiles}",
            "--set", "loader=device", "--set", "steps=100000", "--set", "checkpoint_every=10",
            "--seconds", "3", "--out", str(out), "--device", "cpu"]
    assert script.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["steps"] < 100000 and summary["crops_seen"] == summary["steps"] * 2
    assert summary["gpu_busy_fraction"] is None  # a CPU: nothing to sample
    assert summary["images_per_s_median"] > 0
    export = out / "run" / "tiny-test.safetensors"
    assert registry.read_metadata(export)[2]["loader"] == "device"
    assert registry.load_checkpoint(export) is not None
    assert (out / "run" / "last.safetensors").is_file()
