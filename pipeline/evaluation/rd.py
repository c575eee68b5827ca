"""Rate-distortion figures: MS-SSIM, aggregation over images, BD-rate / BD-PSNR, RD plots.

* `aggregate(table)`: per (dataset, codec, rate point), the MEAN over images of each
  image's bpp, PSNR, MS-SSIM, encode and decode time, as CompressAI's `eval_model` reports
  (not total bits / total pixels), over the images that every codec and rate point coded
  (status "ok"): an image one codec failed on is left out of every codec's means, so all
  curves are measured on the same images (`excluded_images` lists them).
* `bd_rate` / `bd_psnr`: Bjontegaard deltas with the `bjontegaard` package (pchip by
  default) on a codec's mean points. A curve is first sorted by rate and reduced to its
  points of strictly increasing rate and quality (a point that costs more bits for no gain
  cannot be interpolated; it is dropped and the note says so). Too few points (< 2) or
  no overlap give None with the reason, never an exception.
* `plot_rd`: PSNR-bpp or MS-SSIM(dB)-bpp, matplotlib's Agg backend, PNG bytes.
* `PAPER_MT_KODAK`: the paper's MT on Kodak, approximate (read from a public plot; see
  ../shared/docs/M2T_REFERENCE.md), drawn as a labelled reference curve.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# The paper's MT (Mentzer et al., ICCV 2023) on Kodak, read from a public plot: approximate.
PAPER_MT_KODAK = {"bpp": [0.058, 0.094, 0.154, 0.247, 0.381], "psnr": [27.07, 28.46, 29.98, 31.65, 33.39]}
PAPER_MT_LABEL = "MT (paper, approx.)"
PAPER_MT_NAME = "mt-paper"

MS_SSIM_MIN_SIDE = 161  # 5 scales and an 11x11 window: the short side must exceed (11 - 1) * 2**4
BD_METHODS = ("pchip", "akima", "cubic")
MIN_BD_POINTS = 2
METRICS = ("psnr", "ms_ssim_db")  # what BD deltas are taken on


# ====================================================================== per image


def ms_ssim(original: np.ndarray, decoded: np.ndarray) -> float | None:
    """MS-SSIM of two RGB uint8 images on the 0..255 scale (data_range=255, 5 scales, 11x11
    Gaussian window, as CompressAI computes it); None if the short side is too small."""
    if min(original.shape[:2]) < MS_SSIM_MIN_SIDE:
        return None
    import torch
    from pytorch_msssim import ms_ssim as _ms_ssim

    def tensor(a: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1)[None]

    with torch.inference_mode():
        return float(_ms_ssim(tensor(original), tensor(decoded), data_range=255, size_average=True))


def ms_ssim_db(value: float | None) -> float | None:
    """MS-SSIM in dB, -10 log10(1 - MS-SSIM), as RD plots usually show it."""
    if value is None or not math.isfinite(value):
        return None
    return math.inf if value >= 1.0 else -10.0 * math.log10(1.0 - value)


# ====================================================================== aggregation


def _image_ids(table):
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(table["dataset"], table["key"], "\x00")


def excluded_images(table) -> dict[str, list[str]]:
    """dataset -> keys of the images that some codec or rate point failed on (or that could not
    be read): `aggregate(common=True)` leaves them out of every codec's means."""
    import pyarrow.compute as pc

    bad = table.filter(pc.not_equal(table["status"], "ok")).select(["dataset", "key"]).to_pylist()
    out: dict[str, set[str]] = {}
    for row in bad:
        out.setdefault(row["dataset"], set()).add(row["key"])
    return {d: sorted(keys) for d, keys in sorted(out.items())}


def aggregate(table, common: bool = True) -> list[dict[str, Any]]:
    """One dict per (dataset, codec, point) of a per-image table (pyarrow), sorted by dataset,
    codec and mean bpp. Means are over the rows with status "ok"; MS-SSIM over those of them
    that have it. With `common`, only over the images that every codec and rate point of the
    dataset coded: a codec that fails on some images must not be compared on an easier set."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = ["dataset", "codec", "point"]
    if table.num_rows == 0:
        return []
    counts = table.group_by(keys + ["status"]).aggregate([([], "count_all")]).to_pylist()
    first = table.group_by(keys, use_threads=False).aggregate(
        [("kind", "first"), ("point_index", "first"), ("param", "first"), ("model", "first")]).to_pylist()
    ok = table.filter(pc.equal(table["status"], "ok"))
    if common:
        bad = pc.unique(_image_ids(table.filter(pc.not_equal(table["status"], "ok"))))
        if len(bad):
            ok = ok.filter(pc.invert(pc.is_in(_image_ids(ok), value_set=pa.array(bad.to_pylist(), pa.string()))))
    # The mean of MS-SSIM in dB is taken of the mean MS-SSIM (CompressAI's ms-ssim-rgb is the
    # plain mean); images too small for MS-SSIM are null and left out of its mean.
    means = ok.group_by(keys).aggregate([
        ("bpp", "mean"), ("bpp", "count"), ("psnr", "mean"), ("mse", "mean"), ("ms_ssim", "mean"), ("ms_ssim", "count"),
        ("encode_s", "mean"), ("decode_s", "mean"), ("bytes", "sum"), ("pixels", "sum"),
        ("encode_s", "sum"), ("decode_s", "sum"),
    ]).to_pylist() if ok.num_rows else []
    by_key: dict[tuple, dict[str, Any]] = {}
    for row in first:
        k = tuple(row[c] for c in keys)
        by_key[k] = {"dataset": k[0], "codec": k[1], "point": k[2], "kind": row["kind_first"],
                     "point_index": row["point_index_first"], "param": row["param_first"],
                     "model": row["model_first"], "images": 0, "ok": 0, "failed": 0, "duplicate": 0, "used": 0,
                     "bpp": None, "psnr": None, "mse": None, "ms_ssim": None, "ms_ssim_db": None,
                     "ms_ssim_images": 0, "encode_s": None, "decode_s": None, "bpp_total": None}
    for row in counts:
        entry = by_key[tuple(row[c] for c in keys)]
        n = row["count_all"]
        entry["images"] += n
        if row["status"] == "ok":
            entry["ok"] += n
        elif row["status"] == "duplicate":
            entry["duplicate"] += n
        else:
            entry["failed"] += n
    for row in means:
        entry = by_key[tuple(row[c] for c in keys)]
        entry.update(used=row["bpp_count"], bpp=row["bpp_mean"], psnr=row["psnr_mean"], mse=row["mse_mean"],
                     ms_ssim=row["ms_ssim_mean"] if row["ms_ssim_count"] else None,
                     ms_ssim_images=row["ms_ssim_count"], encode_s=row["encode_s_mean"],
                     decode_s=row["decode_s_mean"],
                     bpp_total=8.0 * row["bytes_sum"] / row["pixels_sum"] if row["pixels_sum"] else None)
        entry["ms_ssim_db"] = ms_ssim_db(entry["ms_ssim"])
    return sorted(by_key.values(), key=lambda e: (e["dataset"], e["codec"],
                                                  math.inf if e["bpp"] is None else e["bpp"], e["point_index"]))


def curves(points: Iterable[Mapping[str, Any]], dataset: str) -> dict[str, dict[str, list]]:
    """codec -> its points of `dataset` with figures, in increasing bpp (lists side by side)."""
    out: dict[str, dict[str, list]] = {}
    for p in points:
        if p["dataset"] != dataset or p["bpp"] is None:
            continue
        c = out.setdefault(p["codec"], {k: [] for k in ("point", "param", "bpp", "psnr", "ms_ssim", "ms_ssim_db",
                                                        "encode_s", "decode_s", "used", "ok", "failed")})
        for k in c:
            c[k].append(p[k])
    return out


def compressai_json(name: str, description: str, curve: Mapping[str, Sequence]) -> dict[str, Any]:
    """A codec's curve in CompressAI's results format (`compressai.utils.eval_model` and its
    plot script read it): means over images, lists ordered by rate point."""
    return {"name": name, "description": description, "results": {
        "psnr-rgb": list(curve["psnr"]), "ms-ssim-rgb": list(curve["ms_ssim"]), "bpp": list(curve["bpp"]),
        "encoding_time": list(curve["encode_s"]), "decoding_time": list(curve["decode_s"]),
    }}


# ====================================================================== Bjontegaard deltas


def _monotone(rates: Sequence, quality: Sequence) -> tuple[np.ndarray, np.ndarray, int]:
    """(rates, quality) sorted by rate, keeping only points better than every cheaper one
    (strictly increasing in both); also the number of points dropped."""
    pts = sorted((float(r), float(q)) for r, q in zip(rates, quality)
                 if r is not None and q is not None and math.isfinite(r) and math.isfinite(q) and r > 0)
    kept: list[tuple[float, float]] = []
    for r, q in pts:  # by rate, then quality
        if kept and r == kept[-1][0]:
            kept[-1] = (r, q)  # the same rate twice: the better quality (sorted last) stays
        elif not kept or q > kept[-1][1]:
            kept.append((r, q))
    dropped = len(pts) - len(kept)
    return np.array([r for r, _ in kept]), np.array([q for _, q in kept]), dropped


def _bd(anchor: Mapping[str, Sequence], test: Mapping[str, Sequence], metric: str, method: str,
        kind: str) -> dict[str, Any]:
    if method not in BD_METHODS:
        raise ValueError(f"BD method must be one of {BD_METHODS}, got {method!r}")
    ra, qa, da = _monotone(anchor["bpp"], anchor.get(metric, []))
    rt, qt, dt = _monotone(test["bpp"], test.get(metric, []))
    notes = []
    if da or dt:
        notes.append(f"dropped non-monotone points (anchor {da}, test {dt})")
    if len(ra) < MIN_BD_POINTS or len(rt) < MIN_BD_POINTS:
        return {"value": None, "note": f"too few points: anchor {len(ra)}, test {len(rt)}, {MIN_BD_POINTS} needed"}
    if kind == "rate":  # integrate log-rate over the common quality range
        lo, hi = max(qa.min(), qt.min()), min(qa.max(), qt.max())
        unit = "dB" if metric in ("psnr", "ms_ssim_db") else ""
        if hi <= lo:
            return {"value": None, "note": f"no overlap in quality (anchor {qa.min():.2f}-{qa.max():.2f} {unit}, "
                                           f"test {qt.min():.2f}-{qt.max():.2f} {unit})".replace(" )", ")")}
        span = max(qa.max(), qt.max()) - min(qa.min(), qt.min())
    else:  # integrate quality over the common log-rate range
        lo, hi = max(np.log10(ra.min()), np.log10(rt.min())), min(np.log10(ra.max()), np.log10(rt.max()))
        if hi <= lo:
            return {"value": None, "note": f"no overlap in rate (anchor {ra.min():.3f}-{ra.max():.3f} bpp, "
                                           f"test {rt.min():.3f}-{rt.max():.3f} bpp)"}
        span = max(np.log10(ra.max()), np.log10(rt.max())) - min(np.log10(ra.min()), np.log10(rt.min()))
    overlap = (hi - lo) / span if span > 0 else 1.0
    if overlap < 0.5:
        notes.append(f"overlap only {overlap:.0%}")
    import matplotlib

    matplotlib.use("Agg")  # bjontegaard imports pyplot
    import bjontegaard

    fn = bjontegaard.bd_rate if kind == "rate" else bjontegaard.bd_psnr
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = float(fn(ra, qa, rt, qt, method=method, require_matching_points=False, min_overlap=0.0))
    except Exception as exc:
        return {"value": None, "note": f"not computable: {exc}"}
    if not math.isfinite(value):
        return {"value": None, "note": "not computable (non-finite result)"}
    return {"value": value, "note": "; ".join(notes) or None}


def bd_rate(anchor: Mapping[str, Sequence], test: Mapping[str, Sequence], metric: str = "psnr",
            method: str = "pchip") -> dict[str, Any]:
    """{"value": percent or None, "note": reason/caveat or None}: the average difference in bits
    at equal quality (`metric`: "psnr" or "ms_ssim_db"); negative = test needs fewer bits."""
    return _bd(anchor, test, metric, method, "rate")


def bd_psnr(anchor: Mapping[str, Sequence], test: Mapping[str, Sequence], metric: str = "psnr",
            method: str = "pchip") -> dict[str, Any]:
    """{"value": dB or None, "note": ...}: the average quality difference at equal rate."""
    return _bd(anchor, test, metric, method, "quality")


def bd_tables(codec_curves: Mapping[str, Mapping[str, Sequence]], anchor: str, method: str = "pchip",
              references: Mapping[str, Mapping[str, Sequence]] | None = None,
              ours: Sequence[str] = ()) -> dict[str, Any]:
    """BD figures of one dataset: every codec against the anchor (BD-rate and BD-PSNR on
    PSNR, BD-rate on MS-SSIM dB), every codec against every other (BD-rate and BD-PSNR on
    PSNR), and each of `ours` against each reference curve (PSNR only)."""
    names = list(codec_curves)
    vs_anchor = {}
    if anchor in codec_curves:
        a = codec_curves[anchor]
        for name in names:
            vs_anchor[name] = {"bd_rate": bd_rate(a, codec_curves[name], "psnr", method),
                               "bd_psnr": bd_psnr(a, codec_curves[name], "psnr", method),
                               "bd_rate_ms_ssim": bd_rate(a, codec_curves[name], "ms_ssim_db", method)}
    pairwise = {test: {ref: {"bd_rate": bd_rate(codec_curves[ref], codec_curves[test], "psnr", method),
                             "bd_psnr": bd_psnr(codec_curves[ref], codec_curves[test], "psnr", method)}
                       for ref in names if ref != test} for test in names}
    vs_references = {name: {ref: {"bd_rate": bd_rate(curve, codec_curves[name], "psnr", method),
                                  "bd_psnr": bd_psnr(curve, codec_curves[name], "psnr", method)}
                            for ref, curve in (references or {}).items()}
                     for name in ours if name in codec_curves}
    return {"anchor": anchor, "method": method, "vs_anchor": vs_anchor, "pairwise": pairwise,
            "vs_references": vs_references}


# ====================================================================== plots


def plot_rd(codec_curves: Mapping[str, Mapping[str, Sequence]], metric: str, title: str,
            labels: Mapping[str, str] | None = None, ours: Sequence[str] = (),
            references: Mapping[str, Mapping[str, Sequence]] | None = None) -> bytes:
    """PNG bytes of an RD plot: `metric` "psnr" (PSNR-bpp) or "ms_ssim_db" (MS-SSIM in dB vs
    bpp). Our codecs are drawn bold with filled markers, reference curves dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), dpi=110)
    ax = fig.subplots()
    markers = "osD^v<>ph*"
    drawn = 0
    for i, (name, curve) in enumerate(codec_curves.items()):
        pts = [(b, v) for b, v in zip(curve["bpp"], curve.get(metric, []))
               if b is not None and v is not None and math.isfinite(v)]
        if not pts:
            continue
        mine = name in ours
        ax.plot([b for b, _ in pts], [v for _, v in pts], marker=markers[i % len(markers)],
                linewidth=2.2 if mine else 1.2, markersize=6 if mine else 4,
                label=(labels or {}).get(name, name) + (" (ours)" if mine else ""), zorder=3 if mine else 2)
        drawn += 1
    for name, curve in (references or {}).items():
        if metric in curve:
            ax.plot(curve["bpp"], curve[metric], linestyle="--", marker="x", color="black", linewidth=1.2,
                    label=name, zorder=2)
            drawn += 1
    ax.set_xlabel("bits per pixel (bpp)")
    ax.set_ylabel("PSNR (RGB, dB)" if metric == "psnr" else "MS-SSIM (RGB, dB) = -10 log10(1 - MS-SSIM)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
