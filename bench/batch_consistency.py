#!/usr/bin/env python3
"""How often batching or the transforms' implementation changes an image's bytes (a
benchmark, not a test), and what it costs in rate and distortion.

    python bench/batch_consistency.py                 # the 24 Kodak images, CPU (~4 min on 2 cores)
    python bench/batch_consistency.py --device cuda   # the same, plus the GPU at batch 1 and 16

Only the entropy model is exact; g_a is float, so its batch size, its implementation (the
frozen TorchScript form a CPU runs by default, or the eager modules) and its device may
round a few latent values differently, and then the stream differs. Every variant is
checked to decode exactly (its latent, through `Decoder.decode_latents`, anywhere), and the report
gives, against the reference (this CPU, g_a one image at a time, frozen transforms):

* the fraction of images whose bytes differ, and of latent values that differ;
* mean bpp and PSNR (decoded on this CPU), so the RD cost of a variant is visible.

Variants: CPU batch 16 (`Encoder(model, batch_images=16)`), CPU eager g_a (what
M2T_EAGER_TRANSFORMS=1 runs), and with --device cuda: the GPU at batch 1 and at batch 16.
Images: Kodak at 768x512 (portrait ones turned), evaluation only. On a CPU with AMX-BF16
the reference's frozen g_a runs in bf16 (m2t 0.7.4; M2T_BF16_ANALYSIS=0 keeps
float32, to compare the float32 forms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import DEFAULT_DATA, code_state, write_report  # noqa: E402
from m2t_core.registry import DEFAULT_MODEL  # noqa: E402
from m2t_core.sysinfo import cpu_model  # noqa: E402


def kodak(data_root: Path, n: int) -> list[tuple[str, np.ndarray]]:
    from PIL import Image

    paths = sorted((data_root / "kodak").glob("kodim*.png"))[:n]
    if not paths:
        raise SystemExit(f"no Kodak images under {data_root / 'kodak'}")
    out = []
    for path in paths:
        img = Image.open(path).convert("RGB")
        if img.height > img.width:
            img = img.transpose(Image.Transpose.ROTATE_90)
        out.append((path.stem, np.asarray(img)))
    return out


def encode_all(model, rgbs: list[np.ndarray], batch: int) -> list:
    """EncodedImage per image from Encoder(model, batch_images=batch); the first failure raises."""
    from m2t_core.encoder import Encoder

    encoded = list(Encoder(model, batch_images=batch).encode(rgbs))
    for n, result in enumerate(encoded):
        if isinstance(result, Exception):
            raise RuntimeError(f"image {n} failed to encode: {result}") from result
    return encoded


def encode_eager(model, rgbs: list[np.ndarray]) -> list:
    """Encoding with g_a run by the eager module (the M2T_EAGER_TRANSFORMS=1 path), one image
    at a time."""
    import torch

    from m2t_core import tiling
    from m2t_core.encoder import Encoder, code_plan
    from m2t_core.entropy_coding import MAX_ABS_SYMBOL

    with torch.inference_mode():
        latents = []
        for rgb in rgbs:
            x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8, a writable copy
            y = torch.round(tiling.analysis(model.g_a, x)).clamp(-MAX_ABS_SYMBOL, MAX_ABS_SYMBOL)
            latents.append((y, rgb.shape[0], rgb.shape[1]))
        return [code_plan(p) for p in Encoder(model).plan(latents)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fraction of images whose bytes change with g_a's batch, "
                                             "implementation and device; every stream decoded exactly.")
    ap.add_argument("--images", type=int, default=24, help="Kodak images (default all 24)")
    ap.add_argument("--batch", type=int, default=16, help="the batched variant's batch (default 16)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: add GPU variants")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "batch_consistency.json")
    args = ap.parse_args(argv)
    import torch

    from m2t_core.decoder import Decoder
    from m2t_core.metrics import psnr
    from m2t_core.registry import load_model

    torch.set_num_threads(1)  # as the jobs' actors run (one thread per CPU)
    images = kodak(args.data_root, args.images)
    names, rgbs = [n for n, _ in images], [r for _, r in images]
    cpu = load_model(args.model, device="cpu")
    with torch.inference_mode():
        g_a = "frozen" if cpu._inference_transform("g_a") is not None else "eager"
    print(f"{len(rgbs)} Kodak images, model {args.model}, {cpu_model()}, torch {torch.__version__}, "
          f"g_a {g_a}, g_s integer", flush=True)

    variants = {"cpu batch 1 (reference)": lambda: encode_all(cpu, rgbs, 1),
                f"cpu batch {args.batch}": lambda: encode_all(cpu, rgbs, args.batch),
                "cpu eager g_a": lambda: encode_eager(cpu, rgbs)}
    if args.device == "cuda":
        gpu = load_model(args.model, device="cuda")
        variants["cuda batch 1"] = lambda: encode_all(gpu, rgbs, 1)
        variants[f"cuda batch {args.batch}"] = lambda: encode_all(gpu, rgbs, args.batch)

    results: dict[str, dict] = {}
    ref = None
    for label, encode in variants.items():
        t0 = time.perf_counter()
        encoded = encode()
        seconds = time.perf_counter() - t0
        streams = [e.bitstream for e in encoded]
        decoded = Decoder(cpu).decode_latents(streams)  # exact, on this CPU, whatever wrote them
        exact = all(not isinstance(d, Exception) and torch.equal(d[1].to(torch.int32), e.y_hat.cpu().to(torch.int32))
                    for d, e in zip(decoded, encoded))
        pixels = Decoder(cpu, batch_images=1).decompress_many(streams)
        bpp = [8 * len(s) / (r.shape[0] * r.shape[1]) for s, r in zip(streams, rgbs)]
        quality = [psnr(r, x) for r, x in zip(rgbs, pixels)]
        row = {"encode_s": seconds, "decodes_exactly": exact, "bpp_mean": statistics.fmean(bpp),
               "psnr_mean": statistics.fmean(quality)}
        if ref is None:
            ref = (streams, [e.y_hat.cpu().to(torch.int32) for e in encoded], row)
        else:
            differ = [a != b for a, b in zip(ref[0], streams)]
            values = [int((y0 != e.y_hat.cpu().to(torch.int32)).sum()) for y0, e in zip(ref[1], encoded)]
            total = sum(y.numel() for y in ref[1])
            row.update(images_with_different_bytes=sum(differ), fraction_images_differ=sum(differ) / len(differ),
                       latent_values_differ=sum(values), fraction_latent_values_differ=sum(values) / total,
                       differing_images=[n for n, d in zip(names, differ) if d],
                       bpp_delta=row["bpp_mean"] - ref[2]["bpp_mean"], psnr_delta=row["psnr_mean"] - ref[2]["psnr_mean"])
        results[label] = row
        extra = "" if "fraction_images_differ" not in row else (
            f"; bytes differ for {row['images_with_different_bytes']}/{len(rgbs)} images, "
            f"{row['latent_values_differ']} latent values ({100 * row['fraction_latent_values_differ']:.4f} %), "
            f"bpp {row['bpp_delta']:+.5f}, PSNR {row['psnr_delta']:+.4f} dB")
        print(f"{label:<26} encode {seconds:6.1f} s, decodes exactly: {exact}, bpp {row['bpp_mean']:.4f}, "
              f"PSNR {row['psnr_mean']:.3f} dB{extra}", flush=True)
        if not exact:
            print(f"ERROR: {label}: a stream did not decode to its latent", file=sys.stderr)

    report = {"benchmark": "batch_consistency",
              "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "machine": {"cpu": cpu_model(), "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
              "code": code_state(), "model": args.model, "images": len(rgbs), "size": "768x512",
              "reference": f"this CPU, g_a ({g_a}) one image at a time",
              "variants": results}
    write_report(args.json, report)
    return 0 if all(r["decodes_exactly"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
