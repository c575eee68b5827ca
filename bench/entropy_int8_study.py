#!/usr/bin/env python3
"""The exact entropy model with 8-bit weights (format 7) against 16-bit ones (format 5): what
it costs in rate and gains in speed on the CPU's int8 units (a benchmark, not a test).

    python bench/entropy_int8_study.py                    # every shipped fixed-rate M2T model, Kodak
    python bench/entropy_int8_study.py --models m2t-small-q3,mt-small-q2 --images 4 --threads 2

Rate: each model codes the same latents (g_a of each Kodak image) into real bitstreams of
format 5 (the exact model's int16 weight rows) and format 7 (each row re-rounded within
+-127 at a coarser exponent: exact.eight_bit_weights, no retraining); each stream is decoded
and must give its latent back. bpp of each, and the change; with the mean decode_latent time
of each (one decode per image and format, so indicative: bench/checkout_ab.py times it).

Speed: each linear's product as float64 GEMM of the integers against int8 products with int32
accumulation (`torch._int_mm`): the weights one int8 plane, the int16 activations two (x =
256 x_hi + x_lo, x_hi = x >> 8 in [-128, 127], x_lo in [0, 255] taken as x_lo - 128 in int8,
the 128 sum_k w_k that removes again being a constant per output), recombined in float64 as
256 P_hi + P_lo + 128 sum_k w_k. Every result is compared with the float64 product (the
benchmark stops on a difference); M = the rows of one decoding step of a 768x512 image (6
windows of its largest slot group) and of a 64-window chunk. The kernel's exactness is probed
first with extreme operands (oneDNN without VNNI saturates). Writes OUT.json and OUT.md
(default bench/results/entropy_int8_study.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import (SHIPPED_M2T, add_kodak_study_options, kodak_study_images, load_avg,  # noqa: E402
                           markdown_table, write_report)


def rate_cost(name: str, images: list[Path]) -> dict:
    from m2t_core import Decoder, Encoder, load_model
    from m2t_core.image_io import load_image

    model = load_model(name)
    bits, seconds, pixels = {5: 0, 7: 0}, {5: 0.0, 7: 0.0}, 0
    decoder = Decoder(model)
    for path in images:
        rgb = load_image(path)
        y_hat = model.analysis(rgb)
        for version in bits:
            stream = Encoder(model, format_version=version).encode_latent(y_hat, *rgb.shape[:2]).bitstream
            t0 = time.perf_counter()
            header, decoded = decoder.decode_latent(stream)
            seconds[version] += time.perf_counter() - t0
            if header.version != version or not torch.equal(decoded.to(torch.int32), y_hat.to(torch.int32)):
                raise SystemExit(f"{name}, {path.name}: the format {version} stream did not decode to its latent")
            bits[version] += 8 * len(stream)
        pixels += rgb.shape[0] * rgb.shape[1]
    return {"bpp_int16": bits[5] / pixels, "bpp_int8": bits[7] / pixels,
            "change_pct": 100 * (bits[7] / bits[5] - 1), "images": len(images),
            "decode_latent_s_int16": seconds[5] / len(images), "decode_latent_s_int8": seconds[7] / len(images)}


def int8_product(x: torch.Tensor, w8t: torch.Tensor, colsum128: torch.Tensor) -> torch.Tensor:
    """x (M, K) float64 integers within int16, w8t (K, N) int8 -> x @ w8t exactly, in float64."""
    M = x.shape[0]
    v = x.to(torch.int16)
    planes = torch.empty((2 * M, x.shape[1]), dtype=torch.int8)
    planes[:M].copy_(v >> 8)  # x_hi in [-128, 127]
    planes[M:].copy_(v.bitwise_xor(128))  # low byte with its top bit flipped: x_lo - 128 (an int8 wrap)
    p = torch._int_mm(planes, w8t)  # (2M, N) int32: every sum below 2^31
    return p[:M].double().mul_(256).add_(p[M:]).add_(colsum128)


def kernel_exact() -> bool:
    """_int_mm sums int8 products exactly here: extreme operands against float64."""
    try:
        a = torch.tensor([[127, -128] * 16] * 32, dtype=torch.int8)
        b = torch.tensor([[-128, 127] * 8] * 32, dtype=torch.int8)
        return torch.equal(torch._int_mm(a, b).double(), a.double() @ b.double())
    except RuntimeError:
        return False


def _median_ms(call, runs: int = 25) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def product_speed(cfg, rows: dict[str, int]) -> list[dict]:
    from m2t_core import network as N

    g = torch.Generator().manual_seed(0)
    shapes = [(x.name, x.d_in, x.d_out) for x in N.layer_spec(cfg) if x.kind == "linear" and x.name in
              ("embed", "b0_qkv", "b0_proj", "b0_fc1", "b0_fc2", "head")]
    out = []
    for label, M in rows.items():
        for name, K, Nout in shapes:
            x = torch.randint(-32768, 32768, (M, K), generator=g).double()
            x[0, :] = 32767  # the extremes of int16
            x[1, :] = -32768
            w = torch.randint(-127, 128, (Nout, K), generator=g)
            w64 = w.double().t().contiguous()
            w8t = w.to(torch.int8).t().contiguous()
            colsum128 = 128.0 * w.sum(dim=1).double()
            if not torch.equal(int8_product(x, w8t, colsum128), x @ w64):
                raise SystemExit(f"{name}: the int8 product differs from the float64 one")
            f64 = _median_ms(lambda: torch.matmul(x, w64))
            i8 = _median_ms(lambda: int8_product(x, w8t, colsum128))
            out.append({"rows": label, "M": M, "layer": name, "K": K, "N": Nout, "float64_ms": f64, "int8_ms": i8})
    return out


def main(argv: list[str] | None = None) -> int:
    from m2t_core import load_model
    from m2t_core.sysinfo import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_kodak_study_options(ap, SHIPPED_M2T, "entropy_int8_study.json")
    args = ap.parse_args(argv)
    images = kodak_study_images(ap, args)
    exact = kernel_exact()
    model = load_model(args.models.split(",")[0])
    largest_group = max(model.layout.sched.sizes)
    speed = product_speed(model.cfg, {"768x512, one step": 6 * largest_group, "64-window chunk, one step":
                                      64 * largest_group}) if exact else []
    rates = {}
    for name in args.models.split(","):
        rates[name] = rate_cost(name, images)
        print(f"{name}: {rates[name]['bpp_int16']:.5f} -> {rates[name]['bpp_int8']:.5f} bpp "
              f"({rates[name]['change_pct']:+.3f} %)", flush=True)
    lines = [f"{cpu_model()}, torch {torch.__version__}, {args.threads} thread(s); _int_mm exact here: {exact}", "",
             "Rate, the same latents (Kodak, first {} images, real bitstreams):".format(len(images)), ""]
    lines += markdown_table(["model", "bpp, format 5 (int16 weights)", "bpp, format 7 (8-bit weights)", "change",
                             "decode_latent s, 5 / 7"],
                            [[n, f"{r['bpp_int16']:.5f}", f"{r['bpp_int8']:.5f}", f"{r['change_pct']:+.3f} %",
                              f"{r['decode_latent_s_int16']:.3f} / {r['decode_latent_s_int8']:.3f}"]
                             for n, r in rates.items()])
    if speed:
        lines += ["", "One product, median ms (the same integers):", ""]
        lines += markdown_table(["rows", "layer (K -> N)", "float64 GEMM", "int8 x 2 planes", "speed-up"],
                                [[s["rows"], f"{s['layer']} ({s['K']} -> {s['N']})", f"{s['float64_ms']:.3f}",
                                  f"{s['int8_ms']:.3f}", f"{s['float64_ms'] / s['int8_ms']:.2f}x"] for s in speed])
    command = " ".join(["bench/entropy_int8_study.py"] + (argv or sys.argv[1:]))
    report = {"benchmark": "entropy_int8_study", "command": command,
              "machine": {"cpu": cpu_model(), "torch": torch.__version__}, "threads": args.threads,
              "int_mm_exact": exact, "load_average_after": load_avg(), "rate": rates, "speed": speed}
    write_report(args.out, report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
