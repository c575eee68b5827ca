#!/usr/bin/env python3
"""m2t 0.5.2's arithmetic of the exact entropy model against 0.5.1's, in one process (a benchmark).

    python bench/exact_arith_ab.py                          # m2t-small-q3 and mt-small-q2, 1 thread
    python bench/exact_arith_ab.py --threads 2 --models m2t-small-q3

m2t 0.5.2 changed how the exact entropy model computes, not what: `exact.Float64Ops` runs
attention, GELU, LayerNorm and the linears' requantisation in fewer passes (in place, int32
table lookups, LayerNorm in float64 instead of a round trip through int64), and an MT
decoding step runs the output head on its own group's positions only. The integers, streams
and pixels are the same. On this project's shared VMs the time of one run drifts by +-20 %
over minutes, more than some of these differences, so separate before/after processes
(`bench/codec_speed.py` on two checkouts) compare badly. Here both versions run in one
process, interleaved image by image: "before" is `Float64Ops` of --base (its methods, read
with `git show`, bound onto the current class) with MT steps computing the head for every
position and then selecting, "after" the current code. Every run checks that both write the
same bytes and decode the same latent and pixels. Per model: `Encoder.encode_image`,
`Decoder.decode_latent` and `Decoder.decompress` of one image, medians of --repeats.
Writes bench/results/exact_arith_ab.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import DEFAULT_DATA, LoadMeter, bench_image  # noqa: E402
from m2t_core import exact as X  # noqa: E402
from m2t_core import network as N  # noqa: E402
from m2t_core import registry  # noqa: E402
from m2t_core.sysinfo import cpu_model  # noqa: E402
from m2t_core.decoder import Decoder  # noqa: E402
from m2t_core.encoder import Encoder  # noqa: E402

BASE = "2a8e56b"  # m2t 0.5.1
CHANGED = ("linear", "gelu", "attention", "layer_norm", "_table")


def base_methods(rev: str) -> dict:
    """Float64Ops' changed methods as of `rev` (0.5.1 ran LayerNorm through IntOps in int64)."""
    shown = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:m2t_core/exact.py"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"cannot read m2t_core/exact.py of revision {rev} (this needs a git checkout with that "
                         f"revision in its history, not a shallow clone): {shown.stderr.strip()}")
    src = shown.stdout
    name = "m2t_core._exact_base"
    module = types.ModuleType(name)
    module.__package__ = "m2t_core"
    sys.modules[name] = module
    exec(compile(src, f"{rev}:m2t_core/exact.py", "exec"), module.__dict__)  # our own history
    methods = {m: module.Float64Ops.__dict__[m] for m in CHANGED if m in module.Float64Ops.__dict__}
    if "layer_norm" in methods:  # it called super(), bound to the base class: the same steps here
        methods["layer_norm"] = _int64_layer_norm
    return methods


def _int64_layer_norm(self, name: str, r: torch.Tensor) -> torch.Tensor:
    return X.IntOps.layer_norm(self, name, r.to(torch.int64)).to(torch.float64)


def switcher(rev: str):
    before, after = base_methods(rev), {m: X.Float64Ops.__dict__[m] for m in CHANGED}
    mt_forward = N.mt_forward

    def full_head(ops, tokens, masked, positions=None):  # 0.5.1: the head on every position, then select
        out = mt_forward(ops, tokens, masked)
        return out if positions is None else out.index((slice(None), positions))

    def use(version: str) -> None:
        for m, f in (before if version == "before" else after).items():
            setattr(X.Float64Ops, m, f)
        N.mt_forward = full_head if version == "before" else mt_forward

    return use


def bench_model(name: str, rgb, repeats: int, use, log) -> dict:
    model = registry.load_model(name)
    encoder, decoder = Encoder(model), Decoder(model)
    with torch.inference_mode():
        streams, pixels = {}, {}
        for version in ("before", "after"):
            use(version)
            streams[version] = encoder.encode_image(rgb).bitstream
            pixels[version] = decoder.decompress(streams[version])
        if streams["before"] != streams["after"] or not (pixels["before"] == pixels["after"]).all():
            raise RuntimeError(f"{name}: the two versions coded differently")
        data = streams["after"]
        work = {"encode_image": lambda: encoder.encode_image(rgb), "decode_latent": lambda: decoder.decode_latent(data),
                "decompress": lambda: decoder.decompress(data)}
        runs: dict[str, dict[str, list[float]]] = {stage: {"before": [], "after": []} for stage in work}
        for _ in range(repeats):
            for version in ("before", "after"):
                use(version)
                for stage, fn in work.items():
                    t0 = time.perf_counter()
                    fn()
                    runs[stage][version].append(time.perf_counter() - t0)
    use("after")
    out = {}
    for stage, r in runs.items():
        b, a = statistics.median(r["before"]), statistics.median(r["after"])
        out[stage] = {"before_s": b, "after_s": a, "speedup": b / a, "runs_s": r}
        log(f"  {name:<14} {stage:<14} {b:.3f} -> {a:.3f} s  ({b / a:.2f}x)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=BASE, help=f"the revision to compare with (default {BASE}, m2t 0.5.1)")
    p.add_argument("--models", default="m2t-small-q3,mt-small-q2", help="comma-separated registry names")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7, help="interleaved runs per version (default 7; MT: at most 3)")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "exact_arith_ab.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rgb, source = bench_image((768, 512), args.data_root)
    use = switcher(args.base)
    print(f"before: {args.base} (Float64Ops, MT head on every position); after: this checkout; "
          f"{torch.get_num_threads()} thread(s), {source}, medians of interleaved runs")
    results, meter = {}, LoadMeter()
    for name in args.models.split(","):
        repeats = min(args.repeats, 3) if registry.load_model(name).cfg.mode == "mt" else args.repeats
        results[name] = bench_model(name, rgb, repeats, use, print)
    command = "exact_arith_ab.py " + " ".join(sys.argv[1:] if argv is None else argv)
    record = {"benchmark": "exact_arith_ab", "command": command,
              "base": args.base, "image": source, "threads": torch.get_num_threads(),
              "machine": {"cpu": cpu_model(), "torch": torch.__version__, "python": platform.python_version()},
              "other_processes_cores": meter.other_cores(), "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
