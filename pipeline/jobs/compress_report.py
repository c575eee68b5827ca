"""The compression job's report (pipeline/jobs/compress.py): the totals over its shards'
stats (`summarize`) and the table printed at the end of a run (`format_report`)."""

from __future__ import annotations

from typing import Any

from pipeline.jobs.runner import hms


def summarize(shard_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals and the field's figures over completed shards."""
    from m2t_core.metrics import psnr_from_mse

    keys = ("images", "ok", "error", "duplicate", "source_bytes", "compressed_bytes", "pixels",
            "sum_bpp", "sum_psnr", "psnr_images", "sum_mse", "mse_images")
    t = {k: sum(s[k] for s in shard_stats) for k in keys}
    ok = t["ok"]
    return {
        "images": t["images"], "ok": ok, "error": t["error"], "duplicate": t["duplicate"],
        "failed": t["error"] + t["duplicate"],
        "source_bytes": t["source_bytes"], "compressed_bytes": t["compressed_bytes"], "pixels": t["pixels"],
        "bpp_mean": t["sum_bpp"] / ok if ok else None,  # mean over images of each image's bpp
        "bpp_total": 8.0 * t["compressed_bytes"] / t["pixels"] if t["pixels"] else None,  # all bits / all pixels
        "psnr_mean": t["sum_psnr"] / t["psnr_images"] if t["psnr_images"] else None,
        "psnr_of_mean_mse": psnr_from_mse(t["sum_mse"] / t["mse_images"]) if t["mse_images"] else None,
        "compression_ratio": t["source_bytes"] / t["compressed_bytes"] if t["compressed_bytes"] else None,
        "ratio_vs_raw_rgb": 24.0 * t["pixels"] / (8.0 * t["compressed_bytes"]) if t["compressed_bytes"] else None,
    }


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def format_report(report: dict[str, Any]) -> str:
    t, sh, run = report["totals"], report["shards"], report["this_run"]
    failed_note = f", {len(sh['failed'])} FAILED" if sh["failed"] else ""
    lines = [
        f"m2t compress: {', '.join(report['input'])} -> {report['output']}  (model {report['model']})",
        f"{'shards':<14}{sh['completed']} / {sh['planned']} complete ({sh['this_run']} this run, "
        f"{sh['already_done']} already done{failed_note})",
        f"{'images':<14}{t['images']}  ok {t['ok']}  error {t['error']}  duplicate {t['duplicate']}",
        f"{'bpp':<14}{_fmt(t['bpp_mean'], '.4f')} mean per image   {_fmt(t['bpp_total'], '.4f')} total bits / total pixels",
        f"{'PSNR':<14}{_fmt(t['psnr_mean'], '.2f', ' dB')} mean per image   "
        f"{_fmt(t['psnr_of_mean_mse'], '.2f', ' dB')} of the mean MSE",
        f"{'compression':<14}{_fmt(t['compression_ratio'], '.2f', 'x')} vs source bytes "
        f"({_mb(t['source_bytes'])} -> {_mb(t['compressed_bytes'])})   "
        f"{_fmt(t['ratio_vs_raw_rgb'], '.1f', 'x')} vs 24-bit RGB",
        f"{'throughput':<14}{_fmt(run['images_per_s'], '.2f')} images/s   {_fmt(run['megapixels_per_s'], '.3f')} MP/s"
        f"   (this run: {run['images']} images in {hms(run['seconds'])})",
        f"{'wall time':<14}{hms(report['wall_s'])}",
    ]
    faults = report.get("faults")
    if faults and (faults["actors_lost"] or faults["retries"] or faults["actors_unplaceable"]):
        lost_nodes = sorted({(a["node_id"] or "?")[:12] for a in faults["actors_lost"]})
        lines.append(f"{'faults':<14}{len(faults['actors_lost'])} actor(s) lost"
                     + (f" (node {', '.join(lost_nodes)})" if lost_nodes else "")
                     + f", {len(faults['retries'])} shard retr{'y' if len(faults['retries']) == 1 else 'ies'}"
                     + f" ({', '.join(sorted({r['shard'] for r in faults['retries']}))})" * bool(faults["retries"])
                     + (f", {faults['actors_unplaceable']} actor(s) not placeable" if faults["actors_unplaceable"] else "")
                     + f"; {faults['actors_final']} actor(s) at the end")
    if sh.get("damaged"):
        lines.append(f"damaged shards found ({len(sh['damaged'])}; redone, or rerun to redo them"
                     f"{'' if sh.get('verified') else '; --verify-existing also checks every bitstream'}):")
        lines += [f"  {shard}: {reason}" for shard, reason in sorted(sh["damaged"].items())]
    if sh["failed"]:
        lines.append("failed shards (rerun to retry):")
        lines += [f"  {shard}: {reason}" for shard, reason in sorted(sh["failed"].items())]
    if report["failure_examples"]:
        lines.append(f"inputs not archived (first {len(report['failure_examples'])}; all are in the index):")
        lines += [f"  {f['status']:<9} {f['key']}: {f['error']}" for f in report["failure_examples"]]
    if not report["complete"]:
        lines.append(f"INCOMPLETE: {sh['remaining']} shard(s) to go; run the same command again to resume")
    return "\n".join(lines)
