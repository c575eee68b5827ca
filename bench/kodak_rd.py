"""Rate-distortion on Kodak: a thin wrapper around the evaluation job (pipeline/evaluation/evaluate.py).

    python bench/kodak_rd.py                      # every installed model, every classic codec
    python bench/kodak_rd.py --out /tmp/kodak-rd --models m2t-small-q1,m2t-small-q2 --no-ray
    python bench/kodak_rd.py --stamp              # also write each model's Kodak bpp/PSNR into its checkpoint
    python bench/kodak_rd.py --refine 40 --models m2t-small-q1,m2t-small-q2,m2t-small-q3,m2t-small-q4 \
        --out /tmp/m2t-eval-kodak-refine40        # the refining encoder's curves (M2T models only)

It runs `m2t eval --data KODAK --models MODELS --baselines all --anchor jpeg OUT` (see the
README's "Evaluating codecs"; the committed run is docs/results/kodak/). `--stamp` then writes
each registry model's Kodak figures (mean bpp and PSNR over the 24 images) into its
checkpoint's metadata, which `m2t models` prints; it refuses if any row failed. `--refine STEPS`
codes with latent refinement (`--set refine_steps=STEPS`; curves named m2t-small-refineSTEPS);
a checkpoint's stamp is its plain encoder's figures, so the two exclude each other.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    from pipeline.evaluation import evaluate as E

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="all", help="comma-separated names/paths, or 'all' installed")
    ap.add_argument("--kodak", default=str(REPO.parent / "shared" / "datasets" / "kodak"))
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "m2t-eval-kodak"))
    ap.add_argument("--no-ray", action="store_true", help="run in this process, without Ray")
    ap.add_argument("--stamp", action="store_true", help="write the Kodak figures into the checkpoints")
    ap.add_argument("--refine", type=int, default=0, metavar="STEPS", help="latent refinement steps (default 0: off)")
    args = ap.parse_args(argv)
    if args.refine < 0 or args.refine and args.stamp:
        ap.error("--refine takes STEPS >= 0, and not with --stamp (a checkpoint records its plain encoder's figures)")

    eval_args = ["--data", args.kodak, "--models", args.models, "--baselines", "all", "--anchor", "jpeg",
                 args.out] + (["--no-ray"] if args.no_ray else []) + (["--set", f"refine_steps={args.refine}"]
                                                                      if args.refine else [])
    code = E.main(eval_args)
    if not args.stamp or code == E.EXIT_USAGE:
        return code
    if code != E.EXIT_OK:
        print("--stamp: not stamping: the evaluation is incomplete or some rows failed", file=sys.stderr)
        return code
    return stamp(args.out)


def stamp(out: str) -> int:
    """Write each of our models' Kodak mean bpp/PSNR from an evaluation output into its checkpoint."""
    import json

    from m2t_core.registry import find_model, update_checkpoint_info

    summary = json.loads((Path(out) / "summary.json").read_text())
    for p in summary["points"]:
        if p["kind"] != "ours" or p["model"] is None:
            continue
        try:
            path = find_model(p["model"])
        except LookupError:
            print(f"--stamp: {p['model']} is not a registry model; skipped", file=sys.stderr)
            continue
        figures = {"bpp": round(p["bpp"], 4), "psnr": round(p["psnr"], 3), "images": p["used"]}
        if update_checkpoint_info(path, {"kodak": figures}):
            print(f"stamped {path.name}: kodak {figures}")
        else:
            print(f"{path.name}: kodak {figures} already stamped; file left as it is")
    return 0


if __name__ == "__main__":
    sys.exit(main())
