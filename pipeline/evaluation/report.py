"""The evaluation job's results (pipeline/evaluation/evaluate.py): per_image.parquet, the
CompressAI-format JSON per codec, the RD plots, report.md (`render_report`) and the table
printed at the end of a run (`format_summary`)."""

from __future__ import annotations

import json
import math
import os
import platform
import re
from typing import Any, Mapping

import numpy as np

from m2t_core import bitstream as bs

from pipeline.evaluation import baselines as B
from pipeline.evaluation import rd
from pipeline.storage import archive as A

PER_IMAGE = "per_image.parquet"
SUMMARY = "summary.json"
REPORT = "report.md"
FAILURE_EXAMPLES = 20
KODAK_KEY = re.compile(r"^kodim\d\d\.png$", re.IGNORECASE)


def machine(runner: Mapping[str, Any] | None = None) -> str:
    import torch

    from m2t_core.sysinfo import cpu_model

    text = (f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")
    if runner and runner.get("nodes"):
        text += (f"; Ray: {runner['nodes']} node(s), {runner['cpus']:g} CPUs, {runner['gpus']} GPUs, "
                 f"{runner['cpus_per_task']:g} CPU per task")
    return text


def previous_runs(out: A.Archive) -> list[dict[str, Any]]:
    """The run log of an earlier summary.json here, if any (a resumed run appends to it)."""
    try:
        with out.fs.open(out.path(SUMMARY), "rb") as f:
            runs = json.load(f).get("runs", [])
        return [r for r in runs if isinstance(r, dict)]
    except Exception:
        return []


def _describe_codec(name: str, classic: list[str], models: list[dict[str, Any]], dataset: str, images: int) -> str:
    if name in classic:
        c = B.BASELINES[name].describe()
        settings = ", ".join(f"{k}={v}" for k, v in c["settings"].items())
        return (f"{c['label']} ({c['library']}), {c['param']} sweep {c['sweep']}, {settings}; "
                f"means over {images} images of {dataset}")
    import m2t_core

    members = [m["name"] for m in models if m["family"] == name]
    mode = next((m["mode"] for m in models if m["family"] == name), "?").upper()
    return (f"{name} ({mode}, ours: {', '.join(members)}), m2t {m2t_core.__version__}, real bitstreams; "
            f"means over {images} images of {dataset}")


def write_results(out: A.Archive, cfg, table, datasets, classic, models, anchor, summary) -> dict[str, Any]:
    """Write per_image.parquet (`table`: every row of every unit), the CompressAI-format JSON
    and the plots of each dataset, and report.md; returns the summary's results."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out.write_table(out.path(PER_IMAGE), table)
    points = rd.aggregate(table)
    ours = list(dict.fromkeys(m["family"] for m in models))
    labels = {n: B.BASELINES[n].label for n in classic}
    statuses = table.group_by(["status"]).aggregate([([], "count_all")]).to_pylist()
    by_status = {r["status"]: r["count_all"] for r in statuses}
    failures = table.filter(pc.is_in(table["status"], value_set=pa.array(["error", "mismatch"])))
    failed_by_codec: dict[str, int] = {}
    for r in failures.group_by(["codec"]).aggregate([([], "count_all")]).to_pylist():
        failed_by_codec[r["codec"]] = r["count_all"]
    from_input = pc.fill_null(pc.starts_with(failures["error"], "input: "), False)
    unreadable = (failures.filter(from_input).group_by(["dataset", "key"], use_threads=False)
                  .aggregate([("error", "first")]).slice(0, FAILURE_EXAMPLES).to_pylist())
    codec_failures = (failures.filter(pc.invert(from_input))
                      .group_by(["dataset", "key", "codec", "status"], use_threads=False)
                      .aggregate([("error", "first"), ([], "count_all")]).slice(0, FAILURE_EXAMPLES).to_pylist())
    excluded = rd.excluded_images(table)
    per_dataset = {}
    files = [PER_IMAGE, REPORT, SUMMARY]
    for name, url in datasets:
        prefix = "" if len(datasets) == 1 else f"{name}/"
        sub = table.filter(pc.equal(table["dataset"], name))
        keys = sub.select(["key", "error"]).to_pylist()
        images = len({k["key"] for k in keys})
        codec_curves = rd.curves(points, name)
        # Curves in the order codecs were asked for: ours first, then the baselines.
        codec_curves = {c: codec_curves[c] for c in ours + classic if c in codec_curves}
        kodak = bool(keys) and images == 24 and all(KODAK_KEY.match(k["key"]) for k in keys)
        draw_paper = cfg.paper_reference is True or (cfg.paper_reference == "auto" and kodak)
        references = {rd.PAPER_MT_LABEL: rd.PAPER_MT_KODAK} if draw_paper else {}
        bd = rd.bd_tables(codec_curves, anchor, cfg.bd_method, references, ours)
        for codec, curve in codec_curves.items():
            doc = rd.compressai_json(codec, _describe_codec(codec, classic, models, name, images), curve)
            out.write_json(out.path(f"{prefix}codecs/{codec}.json"), doc)
            files.append(f"{prefix}codecs/{codec}.json")
        title = f"{name}: {images} images"
        out.write_bytes(out.path(f"{prefix}rd_psnr.png"),
                        rd.plot_rd(codec_curves, "psnr", f"{title}, PSNR (RGB) vs rate", labels, ours, references))
        files.append(f"{prefix}rd_psnr.png")
        has_ms_ssim = any(v is not None for c in codec_curves.values() for v in c["ms_ssim"])
        if has_ms_ssim:
            out.write_bytes(out.path(f"{prefix}rd_msssim.png"),
                            rd.plot_rd(codec_curves, "ms_ssim_db", f"{title}, MS-SSIM (RGB) vs rate", labels, ours))
            files.append(f"{prefix}rd_msssim.png")
        per_dataset[name] = {"url": url, "images": images,
                             "unreadable_inputs": len({k["key"] for k in keys if (k["error"] or "").startswith("input: ")}),
                             "excluded_images": len(excluded.get(name, [])),
                             "excluded_examples": excluded.get(name, [])[:FAILURE_EXAMPLES], "kodak": kodak,
                             "paper_reference": draw_paper, "prefix": prefix, "ms_ssim_plot": has_ms_ssim,
                             "bd": bd}
    rows = {"total": table.num_rows, "ok": by_status.get("ok", 0), "error": by_status.get("error", 0),
            "mismatch": by_status.get("mismatch", 0), "duplicate": by_status.get("duplicate", 0)}
    rows["failed"] = rows["error"] + rows["mismatch"]
    results = {"rows": rows, "failed_by_codec": failed_by_codec,
               "unreadable_examples": [{"dataset": r["dataset"], "key": r["key"], "error": r["error_first"]}
                                       for r in unreadable],
               "failure_examples": [{"dataset": r["dataset"], "key": r["key"], "codec": r["codec"],
                                     "status": r["status"], "rate_points": r["count_all"], "error": r["error_first"]}
                                    for r in codec_failures],
               "points": points, "results": per_dataset, "files": files}
    report = render_report({**summary, **results}, classic, models)
    out.write_bytes(out.path(REPORT), report.encode())
    return results


def _num(value: Any, spec: str, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{spec}}{unit}"


def _bd_cell(entry: Mapping[str, Any] | None, unit: str) -> str:
    if not entry:
        return "-"
    if entry["value"] is None:
        return f"n/a ({entry['note']})"
    text = f"{entry['value']:+.2f}{unit}"
    return f"{text} ({entry['note']})" if entry.get("note") else text


def render_report(s: Mapping[str, Any], classic: list[str], models: list[dict[str, Any]]) -> str:
    anchor = s["anchor"]
    rows = s["rows"]
    lines = [
        "# Rate-distortion evaluation", "",
        f"Command: `{s['command']}`  ",
        f"Machine: {'; '.join(dict.fromkeys(r['machine'] for r in s['runs'] if r['units'])) or s['machine']}  ",
        f"Code: m2t {s['code_version']['m2t']}, commit {s['code_version']['git_commit'] or 'unknown'}; "
        f"finished {s['finished_at']}  ",
        "Datasets: " + ", ".join(f"{n} ({r['images']} images, {r['url']})" for n, r in s["results"].items()) + "  ",
        f"Rows (image x codec x rate point): {rows['total']}; ok {rows['ok']}, failed {rows['failed']} "
        f"(error {rows['error']}, mismatch {rows['mismatch']}), duplicate {rows['duplicate']}  ",
        f"Time: {sum(r['seconds'] for r in s['runs']):.0f} s of unit work in {len(s['runs'])} run(s) "
        f"(wall clock from the first task to the last, start-up excluded)", "",
        "bpp = 8 x bytes of the real file or bitstream (headers included) / pixels; PSNR on RGB 8-bit; "
        "MS-SSIM on RGB 0..255 (data_range 255, 5 scales, short side >= 161 px); every figure is the mean "
        "over images of the per-image values (CompressAI's convention), over the images that every codec "
        "and rate point coded. Encode/decode times are per image "
        "on one task's threads (see the settings below). BD figures: `bjontegaard` package, "
        f"{s['config']['bd_method']} interpolation, over the overlapping range; negative BD-rate = fewer bits "
        "for the same quality.", "",
    ]
    ours = [m["family"] for m in models]
    ours = list(dict.fromkeys(ours))
    for name, r in s["results"].items():
        bd = r["bd"]
        lines += [f"## {name}", ""] if len(s["results"]) > 1 else []
        lines += [f"### BD-rate against {anchor}", "",
                  "| codec | points | BD-rate (PSNR) | BD-PSNR | BD-rate (MS-SSIM) |", "|---|---|---|---|---|"]
        pts = [p for p in s["points"] if p["dataset"] == name]
        for codec in ours + classic:
            entry = bd["vs_anchor"].get(codec)
            if entry is None:
                continue
            n = sum(1 for p in pts if p["codec"] == codec and p["bpp"] is not None)
            label = f"**{codec}** (ours)" if codec in ours else codec
            lines.append(f"| {label} | {n} | {_bd_cell(entry['bd_rate'], ' %')} | {_bd_cell(entry['bd_psnr'], ' dB')} "
                         f"| {_bd_cell(entry['bd_rate_ms_ssim'], ' %')} |")
        if r["paper_reference"] and any(bd["vs_references"].values()):
            lines += ["", f"Against the paper's MT on Kodak (approximate points read from a plot; "
                          f"{rd.PAPER_MT_LABEL} in the plot):", "",
                      "| codec | BD-rate (PSNR) | BD-PSNR |", "|---|---|---|"]
            for codec, refs in bd["vs_references"].items():
                for ref, entry in refs.items():
                    lines.append(f"| {codec} (ours) | {_bd_cell(entry['bd_rate'], ' %')} | {_bd_cell(entry['bd_psnr'], ' dB')} |")
        prefix = r["prefix"]
        lines += ["", f"![PSNR vs bpp]({prefix}rd_psnr.png)", ""]
        if r["ms_ssim_plot"]:
            lines += [f"![MS-SSIM vs bpp]({prefix}rd_msssim.png)", ""]
        else:
            lines += ["(No MS-SSIM plot: every image's short side is below 161 px, or MS-SSIM was off.)", ""]
        names = [c for c in ours + classic if c in bd["pairwise"]]
        if len(names) > 1:
            lines += ["### BD-rate of each codec (row) against each other (column), PSNR", "",
                      "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            for test in names:
                cells = []
                for ref in names:
                    e = bd["pairwise"][test].get(ref, {}).get("bd_rate")
                    cells.append("0" if ref == test else ("n/a" if e is None or e["value"] is None else f"{e['value']:+.1f} %"))
                lines.append(f"| {test} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["### Rate points (means over images)", "",
                  "| codec | point | bpp | PSNR (dB) | MS-SSIM | encode ms | decode ms | images | failed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in sorted(pts, key=lambda p: ((ours + classic).index(p["codec"]) if p["codec"] in ours + classic else 99,
                                            math.inf if p["bpp"] is None else p["bpp"])):
            lines.append(f"| {p['codec']} | {p['point']} | {_num(p['bpp'], '.4f')} | {_num(p['psnr'], '.2f')} | "
                         f"{_num(p['ms_ssim'], '.4f')} | {_num(p['encode_s'] and p['encode_s'] * 1e3, '.1f')} | "
                         f"{_num(p['decode_s'] and p['decode_s'] * 1e3, '.1f')} | {p['used']} | {p['failed']} |")
        lines.append("")
    lines += ["## Codec settings", "", "| codec | library | what varies | sweep | fixed settings |", "|---|---|---|---|---|"]
    for m in models:
        lines.append(f"| {m['family']} (ours) | m2t, model {m['name']} ({m['mode']}), weights "
                     f"{m['weights_sha256'][:12]} | model | {m['name']} | bitstream format {bs.FORMAT_VERSION} |")
    for name in classic:
        c = B.BASELINES[name].describe()
        settings = ", ".join(f"{k}={v}" for k, v in c["settings"].items())
        lines.append(f"| {name} | {c['library']} | {c['param']} | {', '.join(f'{v:g}' for v in c['sweep'])} | "
                     f"{settings}; {s['config']['codec_threads']} thread(s) |")
    lines.append("")
    if rows["failed"] or rows["duplicate"]:
        lines += ["## Failures", "", f"{rows['failed']} row(s) failed (" +
                  ", ".join(f"{c} {n}" for c, n in sorted(s["failed_by_codec"].items())) +
                  f"), {rows['duplicate']} duplicate; every row is in per_image.parquet with its status and error. "
                  "Images with a failed row are left out of every codec's means: " +
                  ", ".join(f"{r['excluded_images']} of {r['images']} in {n}" for n, r in s["results"].items()) + ".", ""]
        if s["unreadable_examples"]:
            lines += [f"Inputs that could not be read (first {len(s['unreadable_examples'])}):", ""]
            lines += [f"- {f['dataset']}/{f['key']}: {f['error'][len('input: '):]}" for f in s["unreadable_examples"]]
            lines.append("")
        if s["failure_examples"]:
            lines += [f"Codec failures (image x codec, first {len(s['failure_examples'])}):", ""]
            lines += [f"- {f['dataset']}/{f['key']}, {f['codec']}: {f['status']} at {f['rate_points']} rate point(s): "
                      f"{f['error']}" for f in s["failure_examples"]]
            lines.append("")
    return "\n".join(lines)


def format_summary(s: Mapping[str, Any]) -> str:
    """The table printed at the end of a run."""
    u = s["units"]
    lines = [f"m2t eval: {', '.join(d['url'] for d in s['datasets'])} -> {s['config']['output']}",
             f"{'units':<10}{u['planned'] - u['remaining']} / {u['planned']} done ({u['this_run']} this run, "
             f"{u['already_done']} already done{', ' + str(len(u['failed'])) + ' FAILED' if u['failed'] else ''})"]
    if s.get("results"):
        r = s["rows"]
        lines.append(f"{'rows':<10}{r['total']}  ok {r['ok']}  error {r['error']}  mismatch {r['mismatch']}  "
                     f"duplicate {r['duplicate']}")
        for name, res in s["results"].items():
            left_out = f" ({res['excluded_images']} left out of the means: see report.md)" if res["excluded_images"] else ""
            lines.append(f"{name}: {res['images']} images{left_out}; BD vs {s['anchor']} ({s['config']['bd_method']}):")
            lines.append(f"  {'codec':<16}{'points':>7}{'bpp':>16}{'PSNR dB':>16}{'BD-rate':>10}{'BD-PSNR':>10}"
                         f"{'enc ms':>9}{'dec ms':>9}{'failed':>8}")
            for codec, entry in res["bd"]["vs_anchor"].items():
                pts = [p for p in s["points"] if p["dataset"] == name and p["codec"] == codec and p["bpp"] is not None]
                if not pts:
                    continue
                bpp = f"{min(p['bpp'] for p in pts):.3f}-{max(p['bpp'] for p in pts):.3f}"
                psnr = f"{min(p['psnr'] for p in pts):.2f}-{max(p['psnr'] for p in pts):.2f}"
                enc = np.mean([p["encode_s"] for p in pts]) * 1e3
                dec = np.mean([p["decode_s"] for p in pts]) * 1e3
                rate = entry["bd_rate"]["value"]
                gain = entry["bd_psnr"]["value"]
                lines.append(f"  {codec:<16}{len(pts):>7}{bpp:>16}{psnr:>16}{_num(rate, '+.1f', '%'):>10}"
                             f"{_num(gain, '+.2f'):>10}{enc:>9.1f}{dec:>9.1f}{sum(p['failed'] for p in pts):>8}")
    if u["failed"]:
        lines.append("failed units (rerun to retry):")
        lines += [f"  {uid}: {reason}" for uid, reason in sorted(u["failed"].items())]
    if not s["complete"]:
        lines.append(f"INCOMPLETE: {u['remaining']} unit(s) to go; run the same command again to resume")
    lines.append(f"{'wall time':<10}{s['wall_s']:.1f} s")
    return "\n".join(lines)
