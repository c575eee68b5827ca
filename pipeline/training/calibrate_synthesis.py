"""Calibrate the integer synthesis transform of checkpoints on training images, and save them
as the current checkpoint version (how the shipped models got their integer g_s).

    python -m pipeline.training.calibrate_synthesis m2t_core/weights/*.safetensors \
        --data ../shared/datasets/train --images 32

For each checkpoint: latents of `--images` training images (centre crops of `--crop` pixels;
never the evaluation or validation sets) through g_a, the integer g_s's activation exponents
chosen from the float g_s's maxima on them (M2TCodec.calibrate_synthesis), the checkpoint
rewritten in place with the details in its info ("integer_synthesis"). The entropy model and
g_a are unchanged, so the latents and the bitstreams' rates are too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from m2t_core import registry
from m2t_core.image_io import load_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def training_images(root: Path, count: int) -> list[Path]:
    """`count` images spread evenly over the sorted files under `root` (deterministic)."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no images under {root}")
    step = max(1, len(files) // count)
    return files[::step][:count]


def centre_crop(rgb, size: int):
    h, w = rgb.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return rgb[top:top + size, left:left + size]


def stored_float_dtype(path: Path) -> torch.dtype:
    """The dtype the checkpoint keeps its float tensors in (the shipped ones: float16)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            if t.get_dtype() in ("F16", "BF16", "F32"):
                return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[t.get_dtype()]
    return torch.float32


def calibrate(path: Path, images: list[Path], crop: int, data: str) -> dict:
    dtype = stored_float_dtype(path)  # rewritten in the same precision: the same weights hash
    model = registry.load_model(path, cache=False)
    model_id, _, info = registry.read_metadata(path)
    t0 = time.time()
    latents = [model.analysis(centre_crop(load_image(p), crop))[None] for p in images]
    model.calibrate_synthesis(latents)
    details = {
        "data": data, "images": len(images), "crop": crop,
        "exactness_margin_bits": round(model.g_s_int.exactness_margin_bits(), 3),
        "seconds": round(time.time() - t0, 1),
    }
    if details["exactness_margin_bits"] <= 0:
        raise SystemExit(f"{path}: the integer g_s is not provably exact (margin {details['exactness_margin_bits']} bits)")
    registry.save_checkpoint(model, path, model_id, info={**info, "integer_synthesis": details},
                             dtype=dtype, float_entropy_model=False)
    return details


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/train"))
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--crop", type=int, default=512)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images = training_images(args.data, args.images)
    for path in args.checkpoints:
        details = calibrate(path, images, args.crop, str(args.data))
        print(f"{path}: {details}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
