"""Ship a retrained checkpoint only if it improves the model ladder on `val` (issue 23).

    python -m pipeline.training.select_model runs/m2t-small-q3/m2t-small-q3.safetensors \\
        [--ladder m2t-small-q1,m2t-small-q2,m2t-small-q3,m2t-small-q4] \\
        [--val ../shared/datasets/val] [--kodak ../shared/datasets/kodak] \\
        [--ship] [--log docs/models.md] [--cache runs/select-cache] [--threads N] [--json OUT.json]

The candidate's `model_id` names the ladder member it would replace; an id that is not in the
ladder is judged as an extra rate point (a new rate, a future variable-rate model), and the
output says so. Every model is measured with real bitstreams: each image (every .png/.jpg
under --val, centre-cropped to at most 512x512 as the trainer's validation does; the codec
pads, so no other size rule) is encoded, the bytes decoded, the decoded pixels checked equal
to the encoder's reconstruction (an error naming the image otherwise), bpp = 8 x bytes /
pixels, PSNR on RGB 8-bit; figures are means over images (docs/models.md's convention).

The decision: BD-rate (pipeline.evaluation.rd.bd_rate on PSNR, pchip) of the ladder with the
candidate in its member's place (test) against the installed ladder (anchor), both on val.
The candidate ships iff it decodes bit-exactly and that is below SHIP_BELOW_PERCENT, or it
dominates the member it replaces (no more bits and no lower PSNR on val, and better in one
by SHIP_BELOW_PERCENT of the bits or DOMINATES_BY_DB): the ladder's piecewise-linear curve
is then better at every PSNR it covers, while PCHIP's BD-rate can say the opposite (the
slopes at the neighbouring points change, which bends the segments beside them: a q4 with
-0.3 % bits and +0.54 dB on val came out at +1.4 %). --kodak
measures the same BD-rate on the full Kodak images for the log: it is reported only and never
enters the decision (Kodak is the report set; choosing on it would tune to it).

Installed models' evaluations are cached as JSON in --cache, keyed by model id, weights
digest, dataset path, a digest of the image files' names and bytes, the crop rule and the
bitstream format, so a campaign's rounds code only the candidate. The candidate is always
coded afresh (its decode check is part of the decision) and then cached too.

--ship copies the candidate over the installed member (registry.find_model(id), normally
m2t_core/weights/; an extra point goes beside the ladder's first member) through a temporary
file and os.replace; a candidate whose architecture config differs from the member's is
refused (exit 2) before anything is evaluated. The replaced file is kept as
previous/<id>@<digest>.safetensors beside it, where the registry finds it for the streams it
wrote (--no-keep-previous: not kept; those streams then no longer decode). --log appends
one row to the table under "## Training campaign log" in a markdown file. Exit codes: 0
evaluated (shipped or not), 2 bad input (missing or bad checkpoint, dataset, ladder, or an
architecture mismatch under --ship).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from m2t_core import bitstream as bs
from m2t_core import registry
from m2t_core.image_io import load_image
from m2t_core.metrics import psnr
from pipeline.errors import PipelineError, UsageError, run_main
from pipeline.training.data import MAX_DECODE_PIXELS, VAL_MAX_SIDE, centre_crop  # the trainer's validation crop

SHIP_BELOW_PERCENT = -0.05  # val BD-rate (%) a candidate must beat (strictly) to ship
DOMINATES_BY_DB = 0.01  # or: no more bits, no lower PSNR, and this much PSNR (or the bits above) gained
DEFAULT_LADDER = ("m2t-small-q1", "m2t-small-q2", "m2t-small-q3", "m2t-small-q4")
DEFAULT_CACHE = Path("runs/select-cache")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_SCHEMA = 1  # bump when what an evaluation records changes
LOG_HEADING = "## Training campaign log"
LOG_COLUMNS = ("date (UTC)", "model", "machine", "steps", "crops seen", "hours", "val BD-rate",
               "Kodak BD-rate", "shipped")
PROG = "python -m pipeline.training.select_model"


class DecodeMismatchError(PipelineError):
    """A stream decoded to other pixels than the encoder's reconstruction."""


# ====================================================================== datasets


@dataclass(frozen=True)
class Dataset:
    name: str  # "val" or "kodak"
    root: Path
    max_side: int | None  # centre crop to at most max_side x max_side; None: whole images
    images: tuple[tuple[str, np.ndarray], ...]  # (path relative to root, RGB uint8)
    digest: str  # SHA-256 over every file's relative path and bytes

    @property
    def crop_rule(self) -> str:
        return f"centre-crop<={self.max_side}" if self.max_side else "full"


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_dataset(name: str, root: Path, max_side: int | None) -> Dataset:
    """Every image under `root` (recursive, sorted), cropped; UsageError naming `root` if it is
    missing or holds none, or naming an unreadable file."""
    if not root.is_dir():
        raise UsageError(f"{name} dataset not found: {root} is not a directory")
    files = image_files(root)
    if not files:
        raise UsageError(f"{name} dataset {root} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    digest, images = hashlib.sha256(), []
    for path in files:
        data, key = path.read_bytes(), path.relative_to(root).as_posix()
        digest.update(f"{key}\0{len(data)}\0".encode())
        digest.update(data)
        try:
            rgb = load_image(data, max_pixels=MAX_DECODE_PIXELS)
        except Exception as exc:
            raise UsageError(f"{name} image {path} cannot be read: {exc}") from None
        images.append((key, centre_crop(rgb, max_side)))
    return Dataset(name, root, max_side, tuple(images), digest.hexdigest())


# ====================================================================== evaluation


def code_images(model, images: Sequence[tuple[str, np.ndarray]], label: str) -> list[dict[str, Any]]:
    """Encode each image, decode its bytes, check the pixels against the encoder's
    reconstruction (DecodeMismatchError naming the image otherwise): one row per image."""
    from m2t_core import Decoder, Encoder

    decoder = Decoder(model)
    rows = []
    tagged = ((key, rgb) for key, rgb in images)
    for (key, rgb), (_, encoded) in zip(images, Encoder(model, reconstruct=True).encode_tagged(tagged)):
        if isinstance(encoded, Exception):
            raise PipelineError(f"{label}: image {key} could not be encoded: {encoded}")
        decoded = decoder.decompress(encoded.bitstream)
        if not np.array_equal(decoded, encoded.x_hat):
            differ = int(np.count_nonzero(decoded != encoded.x_hat))
            raise DecodeMismatchError(f"{label}: image {key}: the decoded pixels differ from the encoder's "
                                      f"reconstruction ({differ} values): the stream does not decode exactly")
        h, w = rgb.shape[:2]
        rows.append({"key": key, "height": h, "width": w, "bytes": len(encoded.bitstream),
                     "bpp": 8.0 * len(encoded.bitstream) / (h * w), "psnr": psnr(decoded, rgb)})
    return rows


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means over images of bpp and PSNR (each image's PSNR, then the mean)."""
    return {"images": len(rows), "bpp": float(np.mean([r["bpp"] for r in rows])),
            "psnr": float(np.mean([r["psnr"] for r in rows]))}


def evaluate(model, dataset: Dataset, label: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    rows = code_images(model, dataset.images, label)
    seconds = time.perf_counter() - t0
    return {**summarise(rows), "seconds": round(seconds, 2), "per_image": rows}


def progress_line(label: str, dataset: Dataset, result: Mapping[str, Any], cached: bool) -> str:
    figures = f"bpp {result['bpp']:.4f}, PSNR {result['psnr']:.2f} dB"
    if cached:
        return f"{label} on {dataset.name}: {result['images']} images from the cache, {figures}"
    rate = result["images"] / result["seconds"] if result["seconds"] > 0 else math.inf
    return (f"{label} on {dataset.name}: {result['images']} images in {result['seconds']:.1f} s "
            f"({rate:.2f} images/s), {figures}")


# ====================================================================== the cache


def cache_key(model_id: str, weights_digest: str, dataset: Dataset) -> dict[str, Any]:
    return {"schema": CACHE_SCHEMA, "model_id": model_id, "weights_digest": weights_digest,
            "dataset": str(dataset.root.resolve()), "images_digest": dataset.digest,
            "crop": dataset.crop_rule, "format_version": bs.FORMAT_VERSION}


def cache_file(cache_dir: Path, key: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / f"{key['model_id']}-{digest}.json"


def read_cache(cache_dir: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cached evaluation for `key`, or None (absent, unreadable or another key)."""
    path = cache_file(cache_dir, key)
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return entry.get("result") if isinstance(entry, dict) and entry.get("key") == dict(key) else None


def write_cache(cache_dir: Path, key: Mapping[str, Any], result: Mapping[str, Any]) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_file(cache_dir, key)
    write_atomically(path, json.dumps({"key": key, "result": result}, indent=1).encode())
    return path


def write_atomically(path: Path, data: bytes) -> None:
    """Write through a temporary file and os.replace; an existing file keeps its mode."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644  # mkstemp's own is 0600
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ====================================================================== models


@dataclass
class Checkpoint:
    path: Path
    model_id: str
    config: Any  # ModelConfig
    info: dict[str, Any]
    model: Any = None  # M2TCodec, loaded on demand

    def loaded(self):
        if self.model is None:
            self.model = registry.load_checkpoint(self.path)
        return self.model

    @property
    def weights_digest(self) -> str:
        return self.loaded().weights_digest().hex()


def read_checkpoint(path: Path, what: str) -> Checkpoint:
    """The metadata of a checkpoint; UsageError naming the path if it is missing or bad."""
    if not path.is_file():
        raise UsageError(f"{what} checkpoint not found: {path}")
    try:
        model_id, config, info = registry.read_metadata(path)
    except registry.CheckpointError as exc:
        raise UsageError(f"bad {what} checkpoint: {exc}") from None
    return Checkpoint(path, model_id, config, info)


def load_candidate(path: Path) -> Checkpoint:
    """The candidate's metadata and model: any error names its path (exit 2)."""
    candidate = read_checkpoint(path, "candidate")
    if candidate.config.rate_lambdas:
        raise UsageError(f"{path} is a variable-rate model: this judges a fixed-rate ladder; measure it over its "
                         "qualities with bench/variable_rate_rd.py (--data ../shared/datasets/val --ladder ...)")
    try:
        candidate.loaded()
    except Exception as exc:
        raise UsageError(f"bad candidate checkpoint {path}: {exc}") from None
    return candidate


def ladder_checkpoints(names: Sequence[str]) -> list[Checkpoint]:
    if not names:
        raise UsageError("--ladder names no model")
    if len(set(names)) != len(names):
        raise UsageError(f"--ladder names a model twice: {','.join(names)}")
    out = []
    for name in names:
        try:
            path = registry.find_model(name)
        except registry.ModelNotFoundError as exc:
            raise UsageError(f"ladder model: {exc}") from None
        out.append(read_checkpoint(path, f"ladder model {name!r}"))
    return out


def evaluate_installed(member: Checkpoint, dataset: Dataset, cache_dir: Path, evaluated: list[str]) -> dict:
    """An installed model's evaluation on `dataset`: from the cache, or coded (and cached)."""
    key = cache_key(member.model_id, member.weights_digest, dataset)
    result = read_cache(cache_dir, key)
    if result is not None:
        print(progress_line(member.model_id, dataset, result, cached=True), flush=True)
        return result
    result = evaluate(member.loaded(), dataset, member.model_id)
    evaluated.append(f"{member.model_id}@{dataset.name}")
    write_cache(cache_dir, key, result)
    print(progress_line(member.model_id, dataset, result, cached=False), flush=True)
    return result


def evaluate_candidate(candidate: Checkpoint, dataset: Dataset, cache_dir: Path,
                       evaluated: list[str]) -> tuple[dict | None, str | None]:
    """(evaluation, None), or (None, the mismatch) when a stream does not decode exactly."""
    label = f"candidate {candidate.model_id}"
    try:
        result = evaluate(candidate.loaded(), dataset, label)
    except DecodeMismatchError as exc:
        print(f"{label} on {dataset.name}: {exc}", flush=True)
        return None, str(exc)
    evaluated.append(f"candidate@{dataset.name}")
    write_cache(cache_dir, cache_key(candidate.model_id, candidate.weights_digest, dataset), result)
    print(progress_line(label, dataset, result, cached=False), flush=True)
    return result, None


# ====================================================================== the decision (pure)


def point(result: Mapping[str, Any]) -> dict[str, float]:
    return {"bpp": float(result["bpp"]), "psnr": float(result["psnr"])}


def curve(points: Iterable[Mapping[str, float]]) -> dict[str, list[float]]:
    ordered = sorted(points, key=lambda p: p["bpp"])
    return {"bpp": [p["bpp"] for p in ordered], "psnr": [p["psnr"] for p in ordered]}


def ladder_curves(ladder: Mapping[str, Mapping[str, float]], candidate_id: str,
                  candidate: Mapping[str, float]) -> tuple[dict, dict, str | None]:
    """(anchor, test, replaced): the installed ladder's curve, the curve with the candidate in
    place of the member of its id (or added as an extra point: replaced is None)."""
    replaced = candidate_id if candidate_id in ladder else None
    test = [p for name, p in ladder.items() if name != replaced] + [candidate]
    return curve(ladder.values()), curve(test), replaced


def decide(bd_rate_percent: float | None, bit_exact: bool,
           threshold: float = SHIP_BELOW_PERCENT, delta: Mapping[str, float] | None = None) -> tuple[bool, str]:
    """(ship, why): ship iff the candidate decodes bit-exactly and the BD-rate is strictly
    below `threshold` (negative = fewer bits at equal PSNR) or it dominates the member it
    replaces (`delta`: its bpp change in percent and PSNR change in dB; see `dominates`)."""
    if not bit_exact:
        return False, "the candidate does not decode bit-exactly"
    if bd_rate_percent is not None and bd_rate_percent < threshold:
        return True, f"BD-rate {bd_rate_percent:+.3f} % < {threshold:+.2f} %"
    if delta is not None and dominates(delta, threshold):
        bd = "not computed" if bd_rate_percent is None else f"{bd_rate_percent:+.3f} %"
        return True, (f"it dominates the model it replaces ({delta['bpp_percent']:+.2f} % bits, "
                      f"{delta['psnr_db']:+.3f} dB): better at every PSNR of the ladder's piecewise-linear curve "
                      f"(BD-rate {bd})")
    if bd_rate_percent is None:
        return False, "no BD-rate could be computed"
    return False, f"BD-rate {bd_rate_percent:+.3f} % is not below {threshold:+.2f} %"


def dominates(delta: Mapping[str, float], threshold: float = SHIP_BELOW_PERCENT) -> bool:
    """No more bits and no lower PSNR than the member replaced, and fewer bits by more than
    |threshold| % or DOMINATES_BY_DB dB more: a point up and to the left of the member's, so
    the segments to its neighbours lie on the better side of the old ones at every PSNR."""
    bits, db = delta["bpp_percent"], delta["psnr_db"]
    return bits <= 0 and db >= 0 and (bits < threshold or db >= DOMINATES_BY_DB)


def compare(ladder: Mapping[str, Mapping[str, float]], candidate_id: str, candidate: Mapping[str, float] | None,
            bit_exact: bool = True, threshold: float = SHIP_BELOW_PERCENT) -> dict[str, Any]:
    """The ladder with the candidate against the ladder: BD-rate, the candidate's point
    against the member it replaces, and the decision. `candidate` None: it was not measured."""
    from pipeline.evaluation.rd import bd_rate

    replaced = candidate_id if candidate_id in ladder else None
    out: dict[str, Any] = {"replaces": replaced, "bd_rate": {"value": None, "note": "the candidate was not measured"},
                           "delta": None, "anchor": curve(ladder.values()), "test": None}
    if candidate is not None:
        anchor, test, _ = ladder_curves(ladder, candidate_id, candidate)
        out.update(bd_rate=bd_rate(anchor, test, "psnr"), test=test)
        if replaced:
            old = ladder[replaced]
            out["delta"] = {"bpp": candidate["bpp"] - old["bpp"],
                            "bpp_percent": 100 * (candidate["bpp"] / old["bpp"] - 1),
                            "psnr_db": candidate["psnr"] - old["psnr"]}
    out["ship"], out["reason"] = decide(out["bd_rate"]["value"], bit_exact and candidate is not None, threshold,
                                        out["delta"])
    return out


# ====================================================================== shipping


def ship_target(candidate: Checkpoint, ladder: Sequence[Checkpoint]) -> tuple[Path, Checkpoint | None]:
    """(where the candidate would go, the installed checkpoint it would replace or None)."""
    try:
        installed = registry.find_model(candidate.model_id)
    except registry.ModelNotFoundError:
        return ladder[0].path.parent / f"{candidate.model_id}.safetensors", None
    member = next((m for m in ladder if m.path == installed), None)
    return installed, member or read_checkpoint(installed, f"installed {candidate.model_id!r}")


def check_architecture(candidate: Checkpoint, replaced: Checkpoint | None) -> None:
    """UsageError unless the candidate has the replaced model's architecture config."""
    if replaced is None:
        return
    ours, theirs = candidate.config.to_dict(), replaced.config.to_dict()
    if ours != theirs:
        differ = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
                           if ours.get(k) != theirs.get(k))
        raise UsageError(f"--ship refused: candidate {candidate.path} has another architecture than the installed "
                         f"{replaced.path} ({differ})")


def keep_previous(replaced: Checkpoint) -> Path:
    """Keep the installed file about to be replaced as previous/<id>@<digest>.safetensors
    beside it, where the registry still finds it for the streams it wrote: decode-only
    (registry.write_decode_only: without g_a, 6.3 of 8.2 MB for the small models), or whole
    where its checkpoint version is older than the one that can be made decode-only."""
    folder = replaced.path.parent / registry.PREVIOUS_DIR
    folder.mkdir(exist_ok=True)
    kept = folder / f"{replaced.model_id}@{replaced.weights_digest[:16]}.safetensors"
    if not kept.exists():
        if registry.read_checkpoint_version(replaced.path) == registry.CHECKPOINT_VERSION:
            registry.write_decode_only(replaced.path, kept)
        else:
            install(replaced.path, kept)
    return kept


def install(candidate: Path, target: Path) -> None:
    """Copy `candidate` to `target` through a temporary file (write_atomically), so a reader
    never sees half a checkpoint."""
    if target.exists() and target.resolve() == candidate.resolve():
        return  # the candidate is the installed file
    write_atomically(target, candidate.read_bytes())


def selection_record(val: Mapping[str, Any], kodak: Mapping[str, Any] | None, replaced: Checkpoint | None,
                     val_images: int) -> dict[str, Any]:
    """What the shipped file's metadata keeps of the decision (`m2t info` shows it)."""
    def bd(part):
        return None if part is None or part["bd_rate"]["value"] is None else round(part["bd_rate"]["value"], 3)

    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "val_bd_rate_percent": bd(val), "val_images": val_images, "kodak_bd_rate_percent": bd(kodak),
            "ladder": list(val["ladder"]),
            "replaces": f"{replaced.model_id}@{replaced.weights_digest[:16]}" if replaced is not None else None}


# ====================================================================== the campaign log


def format_percent(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f} %"  # 3 decimals: the threshold is -0.05 %


def log_row(model_id: str, info: Mapping[str, Any], val_bd: float | None, kodak_bd: float | None,
            shipped: bool, now: dt.datetime | None = None) -> list[str]:
    """The cells of one campaign log row (LOG_COLUMNS); a field the info lacks is "-"."""
    now = now or dt.datetime.now(dt.timezone.utc)
    steps, batch, wall = info.get("steps"), info.get("batch_size"), info.get("wall_time_s")
    crops = steps * batch if isinstance(steps, int) and isinstance(batch, int) else None
    return [now.strftime("%Y-%m-%d %H:%M"), f"`{model_id}`", str(info.get("hardware") or "-"),
            f"{steps:,}" if isinstance(steps, int) else "-", f"{crops:,}" if crops is not None else "-",
            f"{wall / 3600:.2f}" if isinstance(wall, (int, float)) else "-",
            format_percent(val_bd), format_percent(kodak_bd), "yes" if shipped else "no"]


def table_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |\n"


def add_log_row(text: str, cells: Sequence[str]) -> str:
    """`text` with a row appended to the table under LOG_HEADING: after the table's last row,
    or in a new table (and heading, at the end) where there is none. Nothing else changes."""
    lines = text.splitlines(keepends=True)
    table = [table_line(LOG_COLUMNS), table_line(["---"] * len(LOG_COLUMNS))]
    heading = next((i for i, line in enumerate(lines) if line.rstrip() == LOG_HEADING), None)
    if heading is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lead = ["\n"] if lines and lines[-1].strip() else []
        return "".join(lines + lead + [LOG_HEADING + "\n", "\n"] + table + [table_line(cells)])
    end = next((i for i in range(heading + 1, len(lines)) if lines[i].startswith(("# ", "## "))), len(lines))
    rows = [i for i in range(heading + 1, end) if lines[i].lstrip().startswith("|")]
    if rows:
        last = rows[0]
        while last + 1 < end and lines[last + 1].lstrip().startswith("|"):
            last += 1  # the first table's last row: a later table in the section is left alone
        if not lines[last].endswith("\n"):
            lines[last] += "\n"
        return "".join(lines[:last + 1] + [table_line(cells)] + lines[last + 1:])
    after = lines[heading + 1:]
    tail = ["\n"] if after and after[0].strip() else []
    if not lines[heading].endswith("\n"):
        lines[heading] += "\n"
    return "".join(lines[:heading + 1] + ["\n"] + table + [table_line(cells)] + tail + after)


def append_log(path: Path, cells: Sequence[str]) -> None:
    text = path.read_text() if path.exists() else ""
    write_atomically(path, add_log_row(text, cells).encode())


# ====================================================================== the command


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("candidate", type=Path, help="the retrained checkpoint (.safetensors)")
    ap.add_argument("--ladder", default=",".join(DEFAULT_LADDER), help="installed models, comma-separated")
    ap.add_argument("--val", type=Path, default=Path("../shared/datasets/val"), help="the decision's images")
    ap.add_argument("--kodak", type=Path, default=None, help="also Kodak's BD-rate, for the log only")
    ap.add_argument("--ship", action="store_true", help="install the candidate if it improves")
    ap.add_argument("--no-keep-previous", action="store_true",
                    help="--ship: do not keep the replaced file in previous/ (its streams will no longer decode)")
    ap.add_argument("--log", type=Path, default=None, help="append a row to this markdown file's campaign log")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="evaluations of installed models")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args(argv)
    if args.threads < 0:
        ap.error("--threads must be >= 0")
    return args


def measure(candidate: Checkpoint, ladder: Sequence[Checkpoint], dataset: Dataset, cache_dir: Path,
            evaluated: list[str]) -> dict[str, Any]:
    """Ladder (cached) and candidate on one dataset, compared."""
    results = {m.model_id: evaluate_installed(m, dataset, cache_dir, evaluated) for m in ladder}
    result, mismatch = evaluate_candidate(candidate, dataset, cache_dir, evaluated)
    comparison = compare({name: point(r) for name, r in results.items()}, candidate.model_id,
                         point(result) if result else None, bit_exact=mismatch is None)
    return {"dataset": str(dataset.root), "crop": dataset.crop_rule, "images": len(dataset.images),
            "ladder": results, "candidate": result, "mismatch": mismatch, **comparison}


def summary_lines(candidate: Checkpoint, val: dict, kodak: dict | None) -> list[str]:
    kodak_head = f" {'Kodak bpp':>10} {'Kodak PSNR':>10}" if kodak else ""
    lines = [f"{'model':<24} {'val bpp':>10} {'val PSNR':>10}" + kodak_head]
    rows = [(name, name) for name in val["ladder"]] + [(f"candidate {candidate.model_id}", None)]
    for label, name in rows:
        cells = []
        for part in [val] + ([kodak] if kodak else []):
            r = part["ladder"][name] if name else part["candidate"]
            cells.append(f"{r['bpp']:>10.4f} {r['psnr']:>10.3f}" if r else f"{'-':>10} {'-':>10}")
        lines.append(f"{label:<24} " + " ".join(cells))
    role = f"replaces {val['replaces']}" if val["replaces"] else "is not in the ladder: judged as an extra point"
    lines.append(f"candidate {candidate.path} ({candidate.model_id}) {role}")
    if val["delta"]:
        d = val["delta"]
        lines.append(f"candidate vs {val['replaces']} on val: bpp {d['bpp']:+.4f} ({d['bpp_percent']:+.2f} %), "
                     f"PSNR {d['psnr_db']:+.3f} dB")
    for name, part in (("val", val), ("Kodak (report only)", kodak)):
        if part:
            bd = part["bd_rate"]
            note = f" ({bd['note']})" if bd["note"] else ""
            lines.append(f"BD-rate on {name}: {format_percent(bd['value'])}{note}")
    return lines


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    candidate = load_candidate(args.candidate)
    ladder = ladder_checkpoints([n.strip() for n in args.ladder.split(",") if n.strip()])
    target, replaced = ship_target(candidate, ladder)
    if args.ship:
        check_architecture(candidate, replaced)  # before any coding: a refusal costs nothing
    val_set = load_dataset("val", args.val, VAL_MAX_SIDE)
    kodak_set = load_dataset("kodak", args.kodak, None) if args.kodak else None  # Kodak's figures are of whole images
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    evaluated: list[str] = []
    val = measure(candidate, ladder, val_set, args.cache, evaluated)
    kodak = measure(candidate, ladder, kodak_set, args.cache, evaluated) if kodak_set else None
    shipped = False
    if args.ship and val["ship"]:
        if replaced is not None and not args.no_keep_previous:
            print(f"kept the replaced weights for their streams: {keep_previous(replaced)}")
        install(candidate.path, target)
        registry.update_checkpoint_info(target, {"selected": selection_record(val, kodak, replaced, len(val_set.images))})
        shipped = True
    for line in summary_lines(candidate, val, kodak):
        print(line)
    if shipped:
        verdict = f"shipped to {target}"
    elif args.ship:
        verdict = "not shipped"
    else:
        verdict = "would ship" if val["ship"] else "would not ship"
    print(f"decision: {verdict} ({val['reason']})", flush=True)
    if args.log:
        append_log(args.log, log_row(candidate.model_id, candidate.info, val["bd_rate"]["value"],
                                     kodak["bd_rate"]["value"] if kodak else None, shipped))
        print(f"logged to {args.log}")
    if args.json:
        report = {"candidate": {"path": str(candidate.path), "model_id": candidate.model_id,
                                "weights_digest": candidate.weights_digest, "info": candidate.info},
                  "ladder": [m.model_id for m in ladder], "threshold_percent": SHIP_BELOW_PERCENT,
                  "val": val, "kodak": kodak, "ship": val["ship"], "reason": val["reason"], "shipped": shipped,
                  "target": str(target), "evaluated": evaluated, "seconds": round(time.perf_counter() - t0, 1)}
        write_json(args.json, report)
    return 0


def write_json(path: Path, report: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(report, indent=1, default=str).encode())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
