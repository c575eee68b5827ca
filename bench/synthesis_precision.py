#!/usr/bin/env python3
"""What narrower arithmetic would cost the synthesis transform, before any retraining.

The integer g_s (m2t_core/int_synthesis.py) keeps 16-bit activations and runs every
convolution twice, once per 8-bit plane, to stay exact in float32 carriers; that is why it
takes about twice the float g_s's time. One plane would halve its products, at a price this
script measures post-training, on the float g_s with simulated quantisation (PSNR of decoded
val crops against the float g_s on the same latents):

* `inputs-B`: every convolution's input rounded to B bits (a power-of-two step per tensor,
  from the maxima, or the 99.99th percentiles, of training latents); weights untouched;
* `stage S inputs-8`: the same at 8 bits, at one resolution stage only (which layers are
  sensitive);
* `single-plane-B`: B-bit inputs AND integer weights per row within the float32-exact budget
  of a single plane (2^(B-1) * sum|w| <= 2^24 - 2^21): what a one-plane exact g_s would
  compute without quantisation-aware training; all convolutions, then the full-resolution
  stage alone.

Calibration crops come from ../shared/datasets/train2/photos, evaluation crops from
../shared/datasets/val (centre crops, never Kodak). Results: bench/results/synthesis_precision.json / .md.

    python bench/synthesis_precision.py [--model m2t-small-q3] [--crops 12]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import DEFAULT_DATA, REPO, code_state, markdown_table, write_report  # noqa: E402


def centre_crops(folder: Path, count: int, size: int) -> list[np.ndarray]:
    from m2t_core.image_io import load_image
    from pipeline.training.calibrate_synthesis import IMAGE_SUFFIXES

    out = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        rgb = load_image(path)
        h, w = rgb.shape[:2]
        if min(h, w) >= size:
            top, left = (h - size) // 2, (w - size) // 2
            out.append(rgb[top:top + size, left:left + size])
        if len(out) == count:
            break
    if not out:
        raise SystemExit(f"no image of at least {size} px in {folder}")
    return out


class Study:
    """The float g_s of one model, its calibration statistics, and simulated narrower forms."""

    def __init__(self, model, calibration: list, evaluation: list, images: list[np.ndarray]):
        import torch

        from m2t_core import int_synthesis as IS

        self.torch, self.IS, self.model = torch, IS, model
        self.latents, self.images = evaluation, images
        self.stage_of, stage = {}, 0
        for spec in model.g_s_int.specs:
            self.stage_of[spec.name] = stage
            stage += spec.upsample > 1
        self.stats: dict[str, tuple[float, float]] = {}  # conv -> (max |input|, 99.99th percentile)
        for y in calibration:
            self._run(self._ops(model.g_s, observe=True), y)
        self.reference = self.psnr(self._ops(model.g_s))

    def _ops(self, g_s, bits: int = 0, which=lambda name: False, percentile: bool = False, observe: bool = False):
        study, IS, torch = self, self.IS, self.torch

        class Ops(IS.FloatOps):
            def _input(self, name, x):
                if observe:
                    v = x.abs().flatten()
                    sample = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
                    m, p = study.stats.get(name, (0.0, 0.0))
                    study.stats[name] = (max(m, float(v.max())), max(p, float(torch.quantile(sample, 0.9999))))
                if not bits or not which(name):
                    return x
                limit = 2 ** (bits - 1) - 1
                e = math.floor(math.log2(limit / max(study.stats[name][1 if percentile else 0], 1e-12)))
                return torch.clamp(torch.round(x * 2.0 ** e), -limit, limit) * 2.0 ** -e

            def conv(self, name, x, a_in, a_out, relu):
                return super().conv(name, self._input(name, x), a_in, a_out, relu)

            def deconv(self, name, x, stream):
                return super().deconv(name, self._input(name, x), stream)

        return Ops(g_s, {})

    def _run(self, ops, y):
        with self.torch.no_grad():
            return self.IS.forward(ops, self.model.g_s_int.program, y.float())

    def psnr(self, ops) -> float:
        from m2t_core.metrics import psnr

        scores = []
        for y, rgb in zip(self.latents, self.images):
            out = self._run(ops, y)
            px = (out.clamp(0, 1) * 255).round().to(self.torch.uint8)[0].permute(1, 2, 0).numpy()  # (H, W, 3)
            scores.append(psnr(rgb, px))
        return float(np.mean(scores))

    def single_plane_weights(self, bits: int, which):
        """A copy of g_s whose selected weights are per-row integers within one plane's budget."""
        torch, IS = self.torch, self.IS
        g_s = copy.deepcopy(self.model.g_s)
        modules = dict(g_s.named_modules())
        with torch.no_grad():
            for spec in self.model.g_s_int.specs:
                if not which(spec.name):
                    continue
                w = modules[spec.name].weight.double()
                deconv = spec.upsample > 1  # a ConvTranspose2d weight is (C_in, C_out, k, k)
                rows = (w.transpose(0, 1) if deconv else w).reshape(w.shape[1] if deconv else w.shape[0], -1)
                room = IS.ROW_BUDGET / 2 ** (bits - 1) - rows.shape[1] / 2
                e = torch.floor(torch.log2(room / rows.abs().sum(1).clamp(min=1e-30)))[:, None]
                q = torch.round(rows * 2.0 ** e) * 2.0 ** -e
                q = q.reshape(w.shape[1], w.shape[0], *w.shape[2:]).transpose(0, 1) if deconv else q.reshape(w.shape)
                modules[spec.name].weight.copy_(q.float())
        return g_s

    def rows(self) -> list[dict]:
        every, last = (lambda name: True), max(self.stage_of.values())
        full_res = (lambda name: self.stage_of[name] == last)
        out = []

        def add(variant, ops, convs):
            out.append({"variant": variant, "convs": convs, "psnr_db": round(self.psnr(ops), 4)})
            out[-1]["delta_db"] = round(out[-1]["psnr_db"] - self.reference, 4)
            print(f"  {variant}: {out[-1]['delta_db']:+.3f} dB", flush=True)

        n_all = len(self.stage_of)
        for bits in (8, 10):
            for pct in (False, True):
                add(f"inputs-{bits} ({'p99.99' if pct else 'max'} step)", self._ops(self.model.g_s, bits, every, pct), n_all)
        for stage in range(last + 1):
            which = (lambda name, s=stage: self.stage_of[name] == s)
            add(f"stage {stage} inputs-8 (p99.99 step)", self._ops(self.model.g_s, 8, which, True),
                sum(1 for s in self.stage_of.values() if s == stage))
        for bits in (9, 10):
            add(f"single-plane-{bits}, all", self._ops(self.single_plane_weights(bits, every), bits, every), n_all)
            add(f"single-plane-{bits}, stage {last} only", self._ops(self.single_plane_weights(bits, full_res), bits, full_res),
                sum(1 for s in self.stage_of.values() if s == last))
        return out


def markdown(report: dict) -> str:
    lines = [f"# Synthesis precision: {report['model']}", "",
             f"`{report['command']}` on {report['machine']}, torch {report['torch']}: PSNR of "
             f"{report['eval_crops']} val centre crops ({report['crop']} px) decoded by the float g_s with "
             f"simulated quantisation, against the float g_s ({report['reference_psnr_db']:.3f} dB); "
             f"statistics from {report['calibration_crops']} train2 crops.", ""]
    lines += markdown_table(["variant", "convolutions", "PSNR (dB)", "vs float g_s (dB)"],
                            [[r["variant"], r["convs"], f"{r['psnr_db']:.3f}", f"{r['delta_db']:+.3f}"] for r in report["rows"]])
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="m2t-small-q3")
    ap.add_argument("--crops", type=int, default=12, help="calibration and evaluation crops, each")
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "synthesis_precision.json")
    args = ap.parse_args()
    import torch

    from m2t_core import load_model
    from m2t_core.sysinfo import cpu_model

    model = load_model(args.model)
    calibration = centre_crops(args.data_root / "train2" / "photos", args.crops, args.crop)
    images = centre_crops(args.data_root / "val", args.crops, args.crop)
    with torch.no_grad():
        latent = (lambda rgb: model.analysis(rgb)[None])  # (1, C, h, w)
        study = Study(model, [latent(x) for x in calibration], [latent(x) for x in images], images)
    print(f"{args.model}: float g_s {study.reference:.3f} dB on {len(images)} val crops", flush=True)
    report = {"model": args.model, "machine": f"{cpu_model()} ({os.cpu_count()} cores)", "torch": torch.__version__,
              "command": "python bench/synthesis_precision.py " + " ".join(sys.argv[1:]),
              "crop": args.crop, "calibration_crops": len(calibration), "eval_crops": len(images),
              "reference_psnr_db": round(study.reference, 4), "rows": study.rows(), **code_state()}
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
