"""Helpers shared by the benchmark scripts in bench/ (not a benchmark itself).

* the benchmark images: `bench_image(size, data_root)` picks the same real photo for every
  script (Kodak kodim01 at 768x512, a Debian wallpaper resized otherwise, scikit-image's
  astronaut without ../shared/datasets);
* machine load: `LoadMeter` measures how many cores *other* processes kept busy while a
  benchmark ran (from /proc/stat), so a figure taken on a shared machine says so;
* rate-distortion studies over a folder of images (variable_rate_rd.py, refine_rd.py):
  `study_images`, `load_cropped`, `reference_curves` from a committed evaluation, and the
  `fmt_pct` / `fmt_db` cells of their tables.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets"
WALLPAPER = "lomiri-wallpapers-16.04/Dragonfly_by_Bolly.jpg"  # 4224x3168 photo (4:3)


# ------------------------------------------------------------------------------ inputs


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 768x512, got {text!r}") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"size too small: {text!r}")
    return w, h


def cover_resize(img, size: tuple[int, int]):
    """PIL image -> exactly size (W, H): scale to cover, then center-crop."""
    from PIL import Image

    W, H = size
    f = max(W / img.width, H / img.height)
    scaled = img.resize((max(W, round(img.width * f)), max(H, round(img.height * f))), Image.LANCZOS)
    x0, y0 = (scaled.width - W) // 2, (scaled.height - H) // 2
    return scaled.crop((x0, y0, x0 + W, y0 + H))


def bench_image(size: tuple[int, int], data_root: Path) -> tuple[np.ndarray, str]:
    """A real photo of exactly `size` (W, H) as RGB uint8, and where it came from."""
    from PIL import Image

    kodak = data_root / "kodak" / "kodim01.png"
    if size == (768, 512) and kodak.is_file():
        return np.asarray(Image.open(kodak).convert("RGB")), str(kodak.relative_to(data_root))
    walls = data_root / "train" / "debian-wallpapers"
    if walls.is_dir():
        path = walls / WALLPAPER
        if not path.is_file():
            path = sorted(p for p in walls.rglob("*.jpg"))[0]
        img = cover_resize(Image.open(path).convert("RGB"), size)
        return np.asarray(img), f"{path.relative_to(data_root)} resized to {size[0]}x{size[1]}"
    from skimage import data as skdata

    img = cover_resize(Image.fromarray(skdata.astronaut()), size)
    return np.asarray(img), f"skimage.data.astronaut() resized to {size[0]}x{size[1]}"


# ------------------------------------------------------------------------------ machine load


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have used (from /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class LoadMeter:
    """Average number of cores that OTHER processes kept busy while we ran (Linux only).

    "Own" CPU time is `own_cpu()`: by default this process's (`time.process_time`); a benchmark
    that starts helper processes (e.g. a Ray cluster) passes a `FamilyCpu()`."""

    def __init__(self, own_cpu: Callable[[], float] = time.process_time) -> None:
        self.own_cpu = own_cpu
        self.busy0, self.own0, self.wall0 = busy_cpu_seconds(), own_cpu(), time.perf_counter()

    def other_cores(self) -> float | None:
        busy = busy_cpu_seconds()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.wall0
        own = self.own_cpu() - self.own0
        return max(0.0, (busy - self.busy0 - own) / wall) if wall > 0 else None


class FamilyCpu:
    """CPU seconds of this process and of all its descendants (a local Ray cluster's raylet and
    actors are descendants of the driver), for `LoadMeter(own_cpu=...)`. Linux only; elsewhere
    just this process's.

    A thread samples /proc every `interval` s and keeps each descendant's last-seen CPU time:
    a process that dies is not reaped by us (Ray's actors are reaped by the raylet, which does
    not account for them), so its time would otherwise vanish. At most one interval of a dying
    process's CPU time is missed."""

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        self.interval = interval
        self.seen: dict[tuple[int, int], float] = {}  # (pid, start time) -> utime + stime, seconds
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.sample()
        self.thread = threading.Thread(target=self._run, name="family-cpu", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        try:
            tick = os.sysconf("SC_CLK_TCK")
            procs: dict[int, tuple[int, int, float]] = {}  # pid -> (ppid, start, cpu)
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:  # exited meanwhile
                    continue
                f = stat[stat.rindex(")") + 2:].split()  # fields from 3 (state) on, after "pid (comm) "
                procs[int(entry)] = (int(f[1]), int(f[19]), (int(f[11]) + int(f[12])) / tick)
        except (OSError, ValueError, IndexError):
            return
        me = os.getpid()
        with self.lock:
            for pid, (ppid, start, cpu) in procs.items():
                p, hops = ppid, 0
                while p and p != me and hops < 64:  # walk up towards us (or init)
                    p, hops = procs[p][0] if p in procs else 0, hops + 1
                if p == me and pid != me:
                    self.seen[(pid, start)] = max(cpu, self.seen.get((pid, start), 0.0))

    def __call__(self) -> float:
        self.sample()
        t = os.times()
        with self.lock:
            descendants = sum(self.seen.values())
        return time.process_time() + t.children_user + t.children_system + descendants

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)


def load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def code_state(paths: tuple[str, ...] = ("m2t_core", "pipeline", "bench"), repo: Path = REPO) -> dict:
    """The git commit of `repo` (this checkout by default), and which files under `paths`
    differ from it: figures taken on a working tree with uncommitted changes say so."""
    def git(*cmd: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", *paths)
    return {"git_commit": commit.strip() if commit else None,
            "uncommitted": [line[3:] for line in status.splitlines()] if status else []}


def write_report(json_path: Path, report: dict, markdown: str | None = None) -> None:
    """Write a benchmark's results as indented JSON (folders created) and say where; with
    `markdown`, also that text beside it (.md) and on stdout. A path without the .json
    suffix (`--out NAME`, as the scripts document: "writes NAME.json and NAME.md") gets it."""
    import json

    if json_path.suffix != ".json":
        json_path = json_path.with_name(json_path.name + ".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {json_path}", flush=True)
    if markdown is not None:
        json_path.with_suffix(".md").write_text(markdown)
        print(markdown, flush=True)


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table's lines: the header, its rule, one line per row (cells as str)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


SHIPPED_M2T = "m2t-small-q1,m2t-small-q2,m2t-small-q3,m2t-small-q4"


def add_kodak_study_options(ap: argparse.ArgumentParser, models: str, out: str) -> None:
    """The options of a study over shipped models and Kodak images: --models, --kodak,
    --images, --threads, --out (default bench/results/<out>)."""
    ap.add_argument("--models", default=models, help=f"comma-separated registry names (default {models})")
    ap.add_argument("--kodak", type=Path, default=DEFAULT_DATA / "kodak")
    ap.add_argument("--images", type=int, default=24, help="the first N Kodak images (default all 24)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / out)


def kodak_study_images(ap: argparse.ArgumentParser, args) -> list[Path]:
    """The study's Kodak images (--kodak, the first --images), after torch's threads are set
    to --threads; an argparse error where there are none."""
    import torch

    torch.set_num_threads(args.threads)
    paths = sorted(args.kodak.glob("kodim*.png"))[: args.images]
    if not paths:
        ap.error(f"no kodim*.png in {args.kodak}")
    return paths



# ------------------------------------------------------------------------------ RD studies


def study_images(root: Path, limit: int = 0) -> list[Path]:
    """Every .png/.jpg/.jpeg under `root` (recursively, sorted), the first `limit` (0: all)."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return paths[: limit or None]


def load_cropped(path: Path, crop: int) -> np.ndarray:
    """An image as RGB uint8, centre-cropped to at most `crop` pixels a side (0: whole), as the
    trainer's validation crops it."""
    from m2t_core.image_io import load_image
    from pipeline.training.data import centre_crop

    return centre_crop(load_image(str(path)), crop or None)


def reference_curves(parquet: Path, images: list[str]) -> dict[str, dict[str, list]]:
    """codec -> {"bpp", "psnr"} means per rate point over `images`, from a committed per-image
    table (an evaluation's per_image.parquet); a point that misses an image is left out."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(parquet)
    wanted = pa.array(images, pa.string())
    table = table.filter(pc.and_(pc.equal(table["status"], "ok"), pc.is_in(table["key"], value_set=wanted)))
    means = table.group_by(["codec", "point"]).aggregate([("bpp", "mean"), ("psnr", "mean"), ("key", "count")])
    out: dict[str, dict[str, list]] = {}
    for row in sorted(means.to_pylist(), key=lambda r: (r["codec"], r["bpp_mean"])):
        if row["key_count"] != len(images):
            continue  # not comparable
        curve = out.setdefault(row["codec"], {"bpp": [], "psnr": []})
        curve["bpp"].append(row["bpp_mean"])
        curve["psnr"].append(row["psnr_mean"])
    return out


def fmt_pct(value) -> str:
    """A BD-rate cell: "+1.23 %", or "n/a" where there is none."""
    return "n/a" if value is None else f"{value:+.2f} %"


def fmt_db(value) -> str:
    """A BD-PSNR cell: "+0.123 dB", or "n/a"."""
    return "n/a" if value is None else f"{value:+.3f} dB"
