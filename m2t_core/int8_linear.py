"""The exact entropy model's linears on the CPU's int8 units, with the same integers.

exact.Float64Ops computes each linear as a float64 product of integers (activations and
weights within int16), exact because every partial sum stays below 2^53. Here the same sums
run as int8 products with int32 accumulation (`torch._int_mm`; VNNI and AMX run them about
2.3x faster than float64 products on one thread), by splitting both operands into planes:

    x = 256 a + b + 128,  a = x >> 8,  b = (x & 255) - 128     (a, b in [-128, 127])
    w = 256 c + d + 128,  c = w >> 8,  d = (w & 255) - 128     (any int16 w)
    sum_k x_k w_k = 65536 P_ac + 256 (P_ad + P_bc) + P_bd
                    + 32768 sum_k a_k + 128 sum_k b_k          (per row of x)
                    + 32768 sum_k c_k + 128 sum_k d_k + 16384 K  (per output: a constant)

One `_int_mm` of the stacked planes [a; b] (2M, K) and [c | d] (K, 2N) gives all four
products. Each |P| <= 128 * 128 * K < 2^31 for K < 2^17: int32 sums of int8 products are
exact in any order, on any CPU. The recombination, bias, rounding shift and clamp then run
in one fused pass of exact float64 steps (csrc/exact_kernels.c, built with the package), as do
the plane split and the row sums: as separate torch passes, those cost more than the product
saves.

Exact when the kernel really is an int32 sum of int8 products. oneDNN on CPUs without VNNI
may add adjacent products in saturating 16-bit pairs, so the route is *probed* before use,
per shape (the whole route against the float64 product, with extreme and random operands at
several row counts); a single difference, an exception, a missing operator or a missing kernel
library turns it off for that shape, and Float64Ops's float64 product runs: the same integers. An
activation outside int16 (which no caller produces) is found by the split and sent to the
float64 product too. M2T_INT8_LINEAR=0 turns the route off by hand (benchmarks, debugging).
"""

from __future__ import annotations

import functools
import os

import torch

from . import cpu_kernels

ENV = "M2T_INT8_LINEAR"
MAX_INNER = 1 << 17  # K: 128 * 128 * K < 2^31 (int32 accumulators)
ROW_BLOCK = 256  # rows of x per product: the temporaries (2 ROW_BLOCK x 2N int32) stay in cache
PROBE_ROWS = (1, 3, 16, 37, 300)  # row counts the probe tries (kernels may differ by shape)


def enabled() -> bool:
    """Whether this route may run at all here (the probe still decides per shape)."""
    return os.environ.get(ENV, "1") != "0" and hasattr(torch, "_int_mm") and cpu_kernels.library() is not None


def status() -> str:
    """Whether the exact linears run here on int8 units, and why not (benchmark records)."""
    if os.environ.get(ENV, "1") == "0":
        return f"off ({ENV}=0)"
    if not hasattr(torch, "_int_mm"):
        return "off (this torch has no torch._int_mm)"
    if cpu_kernels.library() is None:
        return f"off ({cpu_kernels.missing_reason()})"
    return "on" if probe(192, 576) else "off (this CPU's int8 products are not exact: the float64 route runs)"


class PackedLinear:
    """One exact linear's weight planes and per-output terms: y = clamp(floor((x @ W^T + b +
    half) 2^-shift)), W (N, K) int16, b int64, shift int64 (N,) (exact.IntLinear's integers,
    rounded as exact.Float64Ops rounds them)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor):
        w = weight.detach().to("cpu", torch.int64)  # (N, K)
        self.outputs, self.inner = w.shape
        c = torch.bitwise_right_shift(w, 8)
        d = torch.bitwise_and(w, 255) - 128
        self.planes = torch.cat([c, d]).to(torch.int8).t().contiguous()  # (K, 2N): [c | d]
        s = shift.detach().to("cpu", torch.int64)
        half = torch.where(s > 0, torch.ones_like(s) << (s - 1).clamp(min=0), 0)  # rounds halves up
        offset = 32768 * c.sum(1) + 128 * d.sum(1) + 16384 * self.inner + bias.detach().to("cpu", torch.int64) + half
        self.offset = offset.to(torch.float64)  # exact: below 2^53, as Float64Ops's bias
        self.scale = torch.pow(2.0, -s.double())  # exact powers of two

    def __call__(self, x: torch.Tensor, limit: int | None) -> torch.Tensor | None:
        """x (..., K) float64 integers on the CPU -> (..., N) float64, Float64Ops.linear's
        integers; None where some x leaves int16 (the caller's float64 route then runs)."""
        lib = cpu_kernels.library()  # looked up per call: ctypes functions do not copy or pickle
        split, combine = lib.split_planes, lib.combine
        K, N = self.inner, self.outputs
        xm = x.reshape(-1, K).contiguous()  # (M, K)
        M = xm.shape[0]
        out = torch.empty((M, N), dtype=torch.float64)
        if M == 0:
            return out.view(*x.shape[:-1], N)
        cap = float(1 << 62) if limit is None else float(limit)
        rows = min(M, ROW_BLOCK)
        planes = torch.empty((2 * rows, K), dtype=torch.int8)
        row_term = torch.empty(rows, dtype=torch.int64)
        for r0 in range(0, M, ROW_BLOCK):
            m = min(M, r0 + ROW_BLOCK) - r0
            block = planes if m == rows else planes[:2 * m]
            if not split(xm[r0].data_ptr(), m, K, block.data_ptr(), row_term.data_ptr()):
                return None
            products = torch._int_mm(block, self.planes)  # (2m, 2N) int32, contiguous
            combine(products.data_ptr(), m, N, row_term.data_ptr(), self.offset.data_ptr(), self.scale.data_ptr(),
                    cap, out[r0].data_ptr(), N)
        return out.view(*x.shape[:-1], N)


def prepare(weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor) -> PackedLinear | None:
    """The int8 route of one exact linear, or None where it is off or not exact here."""
    N, K = weight.shape
    if not enabled() or K >= MAX_INNER or not probe(K, N):
        return None
    return PackedLinear(weight, bias, shift)


@functools.lru_cache(maxsize=None)
def probe(inner: int, outputs: int) -> bool:
    """Whether the route computes exact sums of products for (M, inner) x (inner, outputs) on
    this machine: weight rows at both int16 extremes, alternating and random, against
    activation rows likewise, at each of PROBE_ROWS row counts, compared with float64 products
    (exact: every sum below 2^53; shift 0, so the whole sum is compared)."""
    if not enabled():
        return False
    g = torch.Generator().manual_seed(inner * 7919 + outputs)
    K, N = inner, outputs
    alternating = torch.where(torch.arange(K) % 2 == 0, -32768, 32767)
    special = torch.stack([torch.full((K,), -32768), torch.full((K,), 32767), alternating, -alternating - 1,
                           torch.full((K,), 255), torch.full((K,), -256)])
    w = torch.randint(-32768, 32768, (N, K), generator=g)
    w[: min(N, len(special))] = special[: min(N, len(special))]
    try:
        route = PackedLinear(w, torch.zeros(N, dtype=torch.int64), torch.zeros(N, dtype=torch.int64))
        for M in PROBE_ROWS:
            x = torch.randint(-32768, 32768, (M, K), generator=g)
            x[: min(M, len(special))] = special[: min(M, len(special))].flip(0)
            x = x.double()
            got = route(x, None)
            if got is None or not torch.equal(got, x @ w.double().t()):
                return False
    except Exception:  # noqa: BLE001  (any failure of the int8 route means: use the float64 one)
        return False
    return True
