"""A compact training set: random tiles of a config's train_data, as a plain folder of images
small enough to travel with the working tree to a lent GPU machine (which receives at most
64 MiB, code and shipped weights included).

    python -m pipeline.training.pack --config configs/train/m2t-small-cpu.yaml --out runs/gpu-pack \\
        --budget-mb auto --png-sources nonphoto

Tiles are cut as the memory loader cuts crops (pool.py): a source by weight, an image of it
(each source's images in a shuffled order, so a small pack sees as many distinct images as
it can), then data.random_crop (random downscale, crop, horizontal flip) at --tile pixels,
from images loaded with their source's random downscale. A tile larger than the training
crop leaves the GPU loader a random offset to draw. Tiles are JPEG at --quality with 4:4:4
chroma (subsampling would blur the colour detail the codec learns to keep); tiles of sources
whose URL contains a --png-sources substring are PNG, because JPEG blurs text and line art.
Tiles are written until the next one would exceed --budget-mb (MiB, tiles only; the folder's
manifest.json adds a few KiB). `--budget-mb auto` is what the GPU machine has left: 64 MiB
less the files that travel anyway (git's tracked and untracked-not-ignored files), less the
other carried paths (--carry, default .whl), less 1 MiB of room. Any image-folder loader reads the result; manifest.json
records what it holds and how it was made.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from m2t_core.config import ConfigError
from pipeline.training.data import random_crop
from pipeline.training.pool import ImagePool, SourceSpec
from pipeline.training.train_config import load_config, train_sources

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TILE_GLOBS = ("tile-*.jpg", "tile-*.png")


class SourcePool(ImagePool):
    """An ImagePool that remembers which train_data source each of its groups came from
    (ImagePool drops sources with no readable image, so group g need not be source g)."""

    def __init__(self, groups: list[list[np.ndarray]], weights: Sequence[float], crop: int):
        self.source_of_group = [i for i, g in enumerate(groups) if g]
        self.loaded_per_source = [len(g) for g in groups]
        super().__init__(groups, weights, crop)


def encode_tile(rgb: np.ndarray, png: bool, quality: int) -> bytes:
    buf = io.BytesIO()
    if png:
        Image.fromarray(rgb).save(buf, "PNG", optimize=True)
    else:
        Image.fromarray(rgb).save(buf, "JPEG", quality=quality, subsampling=0, optimize=True)
    return buf.getvalue()


def wants_png(spec: SourceSpec, png_sources: Sequence[str]) -> bool:
    return any(sub in url for url in spec.urls for sub in png_sources)


def prepare_out(out: Path, overwrite: bool) -> str | None:
    """None when `out` may be written (created if missing), else why not. --overwrite removes
    only a previous pack's files: anything else in the folder would mix into the image folder."""
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a folder"
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if not entries:
        out.mkdir(parents=True, exist_ok=True)
        return None
    if not overwrite:
        return f"--out {out} exists and is not empty ({len(entries)} entries): pass --overwrite or choose another folder"
    ours = {p for pattern in TILE_GLOBS for p in out.glob(pattern)} | {out / MANIFEST}
    foreign = [p.name for p in entries if p not in ours or not p.is_file()]
    if foreign:
        return (f"--out {out} holds files that are not a pack's ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}): --overwrite replaces only tiles and {MANIFEST}")
    for p in entries:
        p.unlink()
    return None


def write_tiles(pool: SourcePool, specs: Sequence[SourceSpec], out: Path, tile: int, budget: int,
                quality: int, png_sources: Sequence[str], seed: int) -> dict:
    """Cut, encode and write tiles until the next one would exceed `budget` bytes; returns the
    tiles' record for the manifest."""
    rng = np.random.default_rng([seed, 23])
    orders = [rng.permutation(len(g)) for g in pool.groups]  # each group's images, shuffled
    taken = [0] * len(pool.groups)
    png_group = [wants_png(specs[s], png_sources) for s in pool.source_of_group]
    names: list[str] = []
    sources: list[int] = []
    sizes: list[int] = []
    used, next_bytes, t0 = 0, 0, time.time()
    while True:
        g = int(rng.choice(len(pool.groups), p=pool.weights))
        group, order = pool.groups[g], orders[g]
        if taken[g] == len(order):  # every image of the source used: a new shuffled pass
            orders[g] = order = rng.permutation(len(group))
            taken[g] = 0
        rgb = random_crop(group[int(order[taken[g]])], tile, rng)
        taken[g] += 1
        data = encode_tile(rgb, png_group[g], quality)
        if used + len(data) > budget:
            next_bytes = len(data)
            break
        name = f"tile-{len(names):05d}.{'png' if png_group[g] else 'jpg'}"
        (out / name).write_bytes(data)
        names.append(name)
        sources.append(pool.source_of_group[g])
        sizes.append(len(data))
        used += len(data)
        if len(names) % 50 == 0:
            print(f"  {len(names)} tiles, {used / 2**20:.2f} MiB ({time.time() - t0:.0f} s)", flush=True)
    return {"names": names, "sources": sources, "sizes": sizes, "bytes": used, "next_tile_bytes": next_bytes}


def summarize(specs: Sequence[SourceSpec], pool: SourcePool, tiles: dict, png_sources: Sequence[str]) -> list[dict]:
    """Per source: its config entry, images loaded, tiles, bytes and format."""
    rows = []
    for s, spec in enumerate(specs):
        mine = [k for k, src in enumerate(tiles["sources"]) if src == s]
        size = sum(tiles["sizes"][k] for k in mine)
        rows.append({"url": spec.url, "weight": spec.weight, "downscale": list(spec.downscale),
                     "format": "png" if wants_png(spec, png_sources) else "jpeg",
                     "images_loaded": pool.loaded_per_source[s], "tiles": len(mine), "bytes": size})
    return rows


def manifest_text(manifest: dict) -> str:
    """JSON with a line per key (and per source): long lists of tiles stay on one line each."""
    def value(v):
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            return "[\n  " + ",\n  ".join(json.dumps(x) for x in v) + "\n ]"
        return json.dumps(v)
    return "{\n" + ",\n".join(f" {json.dumps(k)}: {value(v)}" for k, v in manifest.items()) + "\n}\n"


def print_summary(manifest: dict) -> None:
    total = sum(w["weight"] for w in manifest["sources"])
    print(f"pack {manifest['out']}: {manifest['count']} tiles of {manifest['tile']} px, "
          f"{manifest['bytes'] / 2**20:.2f} MiB of {manifest['budget_bytes'] / 2**20:.2f} MiB "
          f"(mean {manifest['bytes'] / max(1, manifest['count']) / 1024:.1f} KiB/tile)")
    for row in manifest["sources"]:
        share = row["tiles"] / max(1, manifest["count"])
        print(f"  {str(row['url']):48s} {row['format']:4s} {row['tiles']:5d} tiles ({share:5.1%}, weight "
              f"{row['weight'] / total:5.1%}) {row['bytes'] / 2**20:6.2f} MiB, "
              f"{row['bytes'] / max(1, row['tiles']) / 1024:6.1f} KiB/tile, from {row['images_loaded']} images")


TRAVEL_LIMIT = 64 << 20  # bytes of working tree a lent GPU machine receives (code, weights, carried paths)
TRAVEL_ROOM = 1 << 20


def _tree_bytes(paths: Sequence[Path]) -> int:
    return sum(f.stat().st_size for p in paths if p.exists()
               for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file() and not f.is_symlink())


def auto_budget(repo: Path, carried: Sequence[str], out: Path) -> int:
    """Bytes of tiles that still fit beside what travels to a GPU machine: every file git
    tracks or would add (not ignored), and the other carried paths."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.split(b"\0")
    out = out.resolve()
    files = [repo / name.decode("utf-8", "surrogateescape") for name in listed if name]
    files = [f for f in files if out not in f.resolve().parents]  # a re-pack replaces the old tiles
    used = _tree_bytes(files) + _tree_bytes([repo / c for c in carried])
    return TRAVEL_LIMIT - TRAVEL_ROOM - used


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pipeline.training.pack", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="training config whose train_data the tiles come from")
    ap.add_argument("--out", required=True, help="folder to write (must be missing or empty)")
    ap.add_argument("--budget-mb", required=True,
                    help="MiB of tiles at most, or 'auto': what a GPU machine's 64 MiB leaves beside the tree")
    ap.add_argument("--carry", default=".whl",
                    help="--budget-mb auto: other carried paths, comma-separated (default .whl)")
    ap.add_argument("--tile", type=int, default=320, help="tile side in pixels (default 320)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-mb", type=int, default=None,
                    help="decoded images' memory while packing (default: the config's memory_mb)")
    ap.add_argument("--png-sources", default="",
                    help="comma-separated substrings: sources whose URL contains one are saved as PNG")
    ap.add_argument("--threads", type=int, default=2, help="decoding threads while loading")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous pack in --out")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    png_sources = [s for s in args.png_sources.split(",") if s]
    out = Path(args.out)
    try:
        if args.budget_mb == "auto":
            budget = auto_budget(Path.cwd(), [c for c in args.carry.split(",") if c], out)
            print(f"pack: --budget-mb auto: {budget / 2**20:.2f} MiB beside the tree and {args.carry or 'nothing'}")
        else:
            budget = int(float(args.budget_mb) * 2**20)
    except (ValueError, OverflowError):
        budget = 0
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"pack: --budget-mb auto needs a git checkout as the current directory ({exc})", file=sys.stderr)
        return 2
    if args.tile <= 0 or not 1 <= args.quality <= 100 or not budget > 0:
        print(f"pack: --tile and --budget-mb must be positive (here {args.budget_mb!r}: {budget / 2**20:.2f} MiB) "
              "and --quality in 1..100", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
        specs = train_sources(cfg)
        unmatched = [p for p in png_sources if not any(wants_png(s, [p]) for s in specs)]
        if unmatched:
            raise ConfigError(f"--png-sources {unmatched} match no train_data URL "
                              f"({[s.url for s in specs]})")
        refusal = prepare_out(out, args.overwrite)
        if refusal:
            raise ConfigError(refusal)
        memory_mb = args.memory_mb or cfg.memory_mb
        pool = SourcePool.load(specs, crop=args.tile, memory_mb=memory_mb, seed=args.seed,
                               image_column=cfg.parquet_image_column, threads=args.threads)
    except ConfigError as exc:
        print(f"pack: {exc}", file=sys.stderr)
        return 2
    for s, spec in enumerate(specs):
        if s not in pool.source_of_group:
            log.warning("train_data source %s has no readable image: no tile comes from it", spec.url)
    tiles = write_tiles(pool, specs, out, args.tile, budget, args.quality, png_sources, args.seed)
    if not tiles["names"]:
        print(f"pack: --budget-mb {args.budget_mb} holds no tile (the first was {tiles['next_tile_bytes']} bytes)",
              file=sys.stderr)
        return 1
    manifest = {
        "out": str(out), "config": str(args.config), "tile": args.tile, "count": len(tiles["names"]),
        "bytes": tiles["bytes"], "budget_bytes": budget, "next_tile_bytes": tiles["next_tile_bytes"],
        "quality": args.quality, "chroma": "4:4:4", "png_sources": png_sources, "seed": args.seed,
        "memory_mb": memory_mb, "sources": summarize(specs, pool, tiles, png_sources),
        "command": shlex.join(["python", "-m", "pipeline.training.pack",
                               *(sys.argv[1:] if argv is None else argv)]),
        "tiles": tiles["names"], "tile_sources": tiles["sources"],
    }
    (out / MANIFEST).write_text(manifest_text(manifest))
    print_summary(manifest)
    print(f"  folder total with {MANIFEST}: {sum(p.stat().st_size for p in out.iterdir()) / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
