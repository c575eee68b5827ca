#!/usr/bin/env python3
"""What a lent GPU machine would receive of this checkout, and making it fit.

A device call (the workplace's `run` tool, bench/gpu_check.py, bench/gpu_train.py) copies the
working tree, tracked files and untracked ones git does not ignore, and refuses a tree over
64 MiB. The replaced weights kept decode-only in m2t_core/weights/previous/ are most of what
a GPU call never reads (they decode streams of retired weights; the GPU scripts use the
current models), so they can stay behind for the call:

    python bench/device_tree.py size    # what would travel, against the limit (--check: exit 1 if over)
    python bench/device_tree.py away    # move previous/*.safetensors out of the checkout
    ... the device call ...
    python bench/device_tree.py back    # and put them back (`git status` is clean again)

`away` moves them to ../m2t-device-away/ beside the checkout (a file that is not in the tree
cannot travel) and refuses if that folder holds files already; `back` refuses to overwrite.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 64 << 20  # the device tool's limit on the working tree that travels
KEPT = Path("m2t_core") / "weights" / "previous"
AWAY = REPO.parent / "m2t-device-away"


def travelling_files() -> list[Path]:
    """The files a device call copies: tracked (and present) or untracked and not ignored."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    paths = {REPO / p for p in out.decode().split("\0") if p}
    return sorted(p for p in paths if p.is_file() and not p.is_symlink())


def size(check: bool = False) -> int:
    files = travelling_files()
    total = sum(p.stat().st_size for p in files)
    kept = sum(p.stat().st_size for p in files if KEPT in p.relative_to(REPO).parents)
    verdict = "fits" if total <= LIMIT_BYTES else "is OVER the limit"
    print(f"{len(files)} files, {total / 2**20:.1f} MiB would travel ({kept / 2**20:.1f} MiB of it in {KEPT}/): "
          f"{verdict} of {LIMIT_BYTES / 2**20:.0f} MiB")
    return 1 if check and total > LIMIT_BYTES else 0


def away() -> int:
    files = sorted((REPO / KEPT).glob("*.safetensors"))
    if AWAY.exists() and any(AWAY.iterdir()):
        raise SystemExit(f"{AWAY} holds files already (an earlier `away` not brought back?): run `back` first")
    AWAY.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.move(str(f), AWAY / f.name)
    print(f"moved {len(files)} kept weights file(s) to {AWAY}; bring them back with: python bench/device_tree.py back")
    return size(check=True)


def back() -> int:
    files = sorted(AWAY.glob("*.safetensors")) if AWAY.is_dir() else []
    clash = [f.name for f in files if (REPO / KEPT / f.name).exists()]
    if clash:
        raise SystemExit(f"{KEPT}/ has {', '.join(clash)} already: not overwritten")
    for f in files:
        shutil.move(str(f), REPO / KEPT / f.name)
    if AWAY.is_dir() and not any(AWAY.iterdir()):
        AWAY.rmdir()
    print(f"put {len(files)} kept weights file(s) back into {KEPT}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("size", "away", "back"))
    ap.add_argument("--check", action="store_true", help="size: exit status 1 where the tree is over the limit")
    args = ap.parse_args(argv)
    return size(args.check) if args.action == "size" else {"away": away, "back": back}[args.action]()


if __name__ == "__main__":
    sys.exit(main())
