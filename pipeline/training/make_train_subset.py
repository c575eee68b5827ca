#!/usr/bin/env python3
"""Build a compact, deterministic training set to carry to a GPU machine.

    python -m pipeline.training.make_train_subset --src ../shared/datasets/train --out .traindata \
        --budget-mb 44 --val 16

Writes
  <out>/train/*.jpg  RGB JPEG, quality 95, 4:4:4 (no chroma subsampling)
  <out>/val/*.png    RGB PNG center crops (at most 512x512, sides multiples of 16)
  <out>/manifest.json  what was written, from which source file, at which scale

How
  * Every source folder under --src (bsds500, imagenet-sample, sun-hays80, skimage-data,
    debian-wallpapers) contributes. Images are downscaled by a random (seeded) factor so the
    short side lands in [288, 512] (never upscaled: an image whose short side is already
    below the target keeps its size). Downscaling also averages away the JPEG artefacts of
    the sources.
  * Large images (short side >= 1000 px: the wallpapers) give several items: each is a
    ~512x512 random crop after its own random downscale (short side between 512 and
    short/1.5, at most 1536), so crops see natural detail at several scales.
  * Grayscale / palette / CMYK images are converted to RGB; EXIF orientation is applied.
  * The byte budget (MiB, counted in 4 KiB disk blocks so that `du` agrees, val included)
    is spread fairly: the next item always comes from the source that has used the fewest
    bytes so far; a source that runs out of images leaves its share to the others.
  * --val images are held out from imagenet-sample and sun-hays80 (alternating) and never
    used for training.
Everything is seeded (--seed): the same sources give the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageOps

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SHORT_MIN, SHORT_MAX = 288, 512
LARGE_SHORT = 1000  # short side from which an image is "large" and gives several crops
CROP = 512
MAX_CROPS_PER_IMAGE = 12
VAL_SOURCES = ("imagenet-sample", "sun-hays80")
VAL_MAX = 512
BLOCK = 4096


def disk_bytes(n: int) -> int:
    """Bytes a file of n bytes occupies on a 4 KiB-block file system (what `du` reports)."""
    return max(BLOCK, -(-n // BLOCK) * BLOCK)


def file_rng(seed: int, *parts: str) -> random.Random:
    """An independent RNG per (seed, parts): results do not depend on processing order."""
    digest = hashlib.sha256("|".join([str(seed), *parts]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def resize_short(im: Image.Image, short: int) -> Image.Image:
    w, h = im.size
    if min(w, h) <= short:
        return im
    f = short / min(w, h)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return im.resize(size, Image.LANCZOS, reducing_gap=3.0)


JPEG_QUALITY = 95  # set from --quality


def encode_jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=True)
    return buf.getvalue()


def encode_png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def safe_stem(source: str, path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:60]
    return f"{source}__{stem}"


@dataclass
class Item:
    name: str
    data: bytes
    origin: str
    size: tuple[int, int]


def source_items(source: str, files: list[Path], src_root: Path, seed: int) -> Iterator[Item]:
    """Lazily yields the training items of one source in a seeded order.

    Normal images give one item each. Large images give up to MAX_CROPS_PER_IMAGE crops,
    interleaved (first crop of every large image, then the second, ...), so that a small
    budget still sees every large image.
    """
    order = list(files)
    random.Random(f"{seed}|order|{source}").shuffle(order)
    large: list[tuple[Path, tuple[int, int]]] = []
    for path in order:
        with Image.open(path) as im:
            w, h = im.size
        if min(w, h) >= LARGE_SHORT:
            large.append((path, (w, h)))
            continue
        rel = str(path.relative_to(src_root))
        rng = file_rng(seed, "scale", rel)
        im = load_rgb(path)
        short = min(im.size)
        target = rng.randint(SHORT_MIN, SHORT_MAX)
        im = resize_short(im, min(target, short))
        yield Item(safe_stem(source, path) + ".jpg", encode_jpeg(im), rel, im.size)
    for k in range(MAX_CROPS_PER_IMAGE):
        for path, (w, h) in large:
            rel = str(path.relative_to(src_root))
            rng = file_rng(seed, "crop", rel, str(k))
            short = min(w, h)
            lo, hi = CROP, max(CROP, min(short / 1.5, 3 * CROP))
            target = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            im = resize_short(load_rgb(path), target)
            cw, ch = min(CROP, im.size[0]), min(CROP, im.size[1])
            x0 = rng.randint(0, im.size[0] - cw)
            y0 = rng.randint(0, im.size[1] - ch)
            im = im.crop((x0, y0, x0 + cw, y0 + ch))
            name = f"{safe_stem(source, path)}__c{k:02d}.jpg"
            yield Item(name, encode_jpeg(im), f"{rel} (crop {k}: short side {target}, at {x0},{y0})", im.size)


def val_image(path: Path) -> Image.Image:
    """Downscale to short side <= 512, center-crop to at most 512x512 with sides multiple of 16."""
    im = resize_short(load_rgb(path), VAL_MAX)
    w, h = im.size
    cw = min(VAL_MAX, w) // 16 * 16
    ch = min(VAL_MAX, h) // 16 * 16
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return im.crop((x0, y0, x0 + cw, y0 + ch))


def list_sources(src: Path) -> dict[str, list[Path]]:
    sources = {}
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if files:
            sources[d.name] = files
    return sources


def pick_val(sources: dict[str, list[Path]], count: int, seed: int) -> list[tuple[str, Path]]:
    pools = []
    for name in VAL_SOURCES:
        if name in sources:
            pool = list(sources[name])
            random.Random(f"{seed}|val|{name}").shuffle(pool)
            pools.append((name, pool))
    if count and not pools:
        raise SystemExit(f"no validation source found (need one of {VAL_SOURCES})")
    picked: list[tuple[str, Path]] = []
    while len(picked) < count and any(pool for _, pool in pools):
        for name, pool in pools:
            while pool and len(picked) < count:
                path = pool.pop(0)
                with Image.open(path) as im:
                    if min(im.size) < 256:  # too small for a useful crop
                        continue
                picked.append((name, path))
                break
    return picked


def main(argv: list[str] | None = None) -> int:
    global JPEG_QUALITY, SHORT_MIN, SHORT_MAX
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=Path("../shared/datasets/train"))
    ap.add_argument("--out", type=Path, default=Path(".traindata"))
    ap.add_argument("--budget-mb", type=float, default=44.0,
                    help="total size of train + val in MiB, counted in 4 KiB blocks (as du does)")
    ap.add_argument("--val", type=int, default=16, help="held-out validation images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of the training items")
    ap.add_argument("--short-side", type=int, nargs=2, default=(288, 512), metavar=("MIN", "MAX"),
                    help="range of the short side after the random downscale (more, smaller items fit the budget)")
    args = ap.parse_args(argv)
    JPEG_QUALITY = args.quality
    SHORT_MIN, SHORT_MAX = args.short_side

    src: Path = args.src
    if not src.is_dir():
        raise SystemExit(f"source folder not found: {src}")
    if "kodak" in str(src.resolve()).lower():
        raise SystemExit("refusing to build a training set from Kodak")
    sources = list_sources(src)
    if not sources:
        raise SystemExit(f"no image folders under {src}")
    budget = int(args.budget_mb * (1 << 20))

    out: Path = args.out
    train_dir, val_dir = out / "train", out / "val"
    for d in (train_dir, val_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    manifest: dict = {"seed": args.seed, "budget_bytes": budget, "src": str(src), "val": [], "train": []}
    used = 0

    # Validation first: it is held out of every source list and counted in the budget.
    val = pick_val(sources, args.val, args.seed)
    held = {p for _, p in val}
    for i, (name, path) in enumerate(val):
        data = encode_png(val_image(path))
        fname = f"{i:02d}_{safe_stem(name, path)}.png"
        (val_dir / fname).write_bytes(data)
        used += disk_bytes(len(data))
        manifest["val"].append({"file": fname, "origin": str(path.relative_to(src))})
    if used > budget:
        raise SystemExit(f"validation images alone take {used / 2**20:.1f} MiB > budget")

    # Training items: always take the next item from the source with the fewest bytes so far.
    gens = {name: source_items(name, [p for p in files if p not in held], src, args.seed)
            for name, files in sources.items()}
    spent = {name: 0 for name in gens}
    counts = {name: 0 for name in gens}
    active = set(gens)
    while active:
        name = min(sorted(active), key=lambda n: spent[n])
        item = next(gens[name], None)
        if item is None:
            active.discard(name)
            continue
        cost = disk_bytes(len(item.data))
        if used + cost > budget:
            active.discard(name)  # this source is done; smaller items of others may still fit
            continue
        (train_dir / item.name).write_bytes(item.data)
        used += cost
        spent[name] += cost
        counts[name] += 1
        manifest["train"].append({"file": item.name, "origin": item.origin, "size": list(item.size)})
        if counts[name] % 50 == 0:
            print(f"  {name}: {counts[name]} images", file=sys.stderr)

    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{'source':<20} {'images':>7} {'MiB':>7}")
    for name in sorted(counts):
        print(f"{name:<20} {counts[name]:>7} {spent[name] / 2**20:>7.2f}")
    val_bytes = sum(disk_bytes((val_dir / v["file"]).stat().st_size) for v in manifest["val"])
    print(f"{'val (png)':<20} {len(val):>7} {val_bytes / 2**20:>7.2f}")
    print(f"total: {sum(counts.values())} train + {len(val)} val images, "
          f"{used / 2**20:.2f} MiB on disk (budget {budget / 2**20:.2f} MiB) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
