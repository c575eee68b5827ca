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

Where the CPU has AMX, `torch._int_mm` still runs oneDNN's older VNNI GEMM; oneDNN's matmul
primitive (`torch.ops.onednn.qlinear_pointwise`, the quantised linear of torch's x86 backend)
runs the same int8 products on the AMX tiles, 1.5-3.5x faster for the larger products of a
decode step (measured on a Xeon with AMX, one thread), but returns float32. Those float32
values are the exact integers where every partial sum stays below 2^24: |P| <= 128 * 128 * K
< 2^24 for K < 1024 (`FP32_INNER`), whatever order the kernel adds in. That route takes the
blocks with at least `ONEDNN_MIN_MACS` multiply-adds (below that its per-call cost loses) and
is probed on its own, like the other; M2T_ONEDNN_LINEAR=0 turns it off.

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
ONEDNN_ENV = "M2T_ONEDNN_LINEAR"
MAX_INNER = 1 << 17  # K: 128 * 128 * K < 2^31 (int32 accumulators)
FP32_INNER = 1 << 10  # K for oneDNN's float32 products: 128 * 128 * K < 2^24 (exact in float32)
ONEDNN_MIN_MACS = 1 << 23  # a block's multiply-adds from which the AMX route wins (~22 us per call)
ROW_BLOCK = 256  # rows of x per product: the temporaries (2 ROW_BLOCK x 2N int32) stay in cache
ONEDNN_ROW_BLOCK = 512  # with the AMX route: fewer, larger calls (MT's decode 3 % faster than at 256)
PROBE_ROWS = (1, 3, 16, 37, 300, 600)  # row counts the probe tries (kernels may differ by shape; 600: blocks)
# A block's rows rounded up to a multiple of this (divides both row blocks): oneDNN compiles a
# kernel for every shape it meets, so the shapes do not follow the image's window count.
ROW_BUCKET = 16  # (a decode of one size: 16 rows 0.6 % slower than none, 32 rows 1.4 %)


def enabled() -> bool:
    """Whether this route may run at all here (the probe still decides per shape)."""
    return os.environ.get(ENV, "1") != "0" and hasattr(torch, "_int_mm") and cpu_kernels.library() is not None


def onednn_enabled() -> bool:
    """Whether the larger products may take oneDNN's matmul here (AMX; the probe still decides)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return (enabled() and os.environ.get(ONEDNN_ENV, "1") != "0" and amx is not None and amx()
            and hasattr(torch.ops.onednn, "qlinear_pointwise"))


def status() -> str:
    """Whether the exact linears run here on int8 units, and why not (benchmark records)."""
    if os.environ.get(ENV, "1") == "0":
        return f"off ({ENV}=0)"
    if not hasattr(torch, "_int_mm"):
        return "off (this torch has no torch._int_mm)"
    if cpu_kernels.library() is None:
        return f"off ({cpu_kernels.missing_reason()})"
    if not probe(192, 576):
        return "off (this CPU's int8 products are not exact: the float64 route runs)"
    return "on, larger products on AMX (oneDNN matmul)" if onednn_enabled() and probe(192, 576, True) else "on"


def weight_planes(weight: torch.Tensor) -> int:
    """1 where every weight is within int8 (format 7's entropy model: exact.eight_bit_weights),
    else 2 (w = 256 c + d + 128)."""
    return 1 if weight.numel() == 0 or (int(weight.min()) >= -128 and int(weight.max()) <= 127) else 2


class PackedLinear:
    """One exact linear's weight planes and per-output terms: y = clamp(floor((x @ W^T + b +
    half) 2^-shift)), W (N, K) int16, b int64, shift int64 (N,) (exact.IntLinear's integers,
    rounded as exact.Float64Ops rounds them). Weights within int8 are their own single plane:
    then one product [a; b] W^T (half the work) and sum_k x_k w_k = 256 P_a + P_b + 128 sum_k w_k."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor, onednn: bool = False):
        w = weight.detach().to("cpu", torch.int64)  # (N, K)
        self.outputs, self.inner = w.shape
        self.weight_planes = weight_planes(w)
        s = shift.detach().to("cpu", torch.int64)
        half = torch.where(s > 0, torch.ones_like(s) << (s - 1).clamp(min=0), 0)  # rounds halves up
        b = bias.detach().to("cpu", torch.int64) + half
        if self.weight_planes == 1:
            rows = w.to(torch.int8)  # (N, K)
            offset = 128 * w.sum(1) + b
        else:
            c = torch.bitwise_right_shift(w, 8)
            d = torch.bitwise_and(w, 255) - 128
            rows = torch.cat([c, d]).to(torch.int8)  # (2N, K): [c; d]
            offset = 32768 * c.sum(1) + 128 * d.sum(1) + 16384 * self.inner + b
        self.planes = rows.t().contiguous()  # (K, planes N): [c | d] or W^T
        # oneDNN's matmul of the same planes (float32 products, exact for K < FP32_INNER), for
        # blocks of at least min_macs multiply-adds; the probe sets min_macs to 0 to try it alone.
        self.onednn = torch.ops.onednn.qlinear_prepack(rows, None) if onednn and self.inner < FP32_INNER else None
        self.min_macs = ONEDNN_MIN_MACS
        if self.onednn is not None:  # the planes' own integers: scale 1, zero point 0
            self.unit_scales = (torch.ones(len(rows)), torch.zeros(len(rows), dtype=torch.int64))
        self.offset = offset.to(torch.float64)  # exact: below 2^53, as Float64Ops's bias
        self.scale = torch.pow(2.0, -s.double())  # exact powers of two

    def __call__(self, x: torch.Tensor, limit: int | None) -> torch.Tensor | None:
        """x (..., K) float64 integers on the CPU -> (..., N) float64, Float64Ops.linear's
        integers; None where some x leaves int16 (the caller's float64 route then runs)."""
        lib = cpu_kernels.library()  # looked up per call: ctypes functions do not copy or pickle
        split = lib.split_planes
        K, N = self.inner, self.outputs
        xm = x.reshape(-1, K).contiguous()  # (M, K)
        M = xm.shape[0]
        out = torch.empty((M, N), dtype=torch.float64)
        if M == 0:
            return out.view(*x.shape[:-1], N)
        cap = float(1 << 62) if limit is None else float(limit)
        block_rows = ROW_BLOCK if self.onednn is None else ONEDNN_ROW_BLOCK
        planes = torch.empty((2 * _bucket(min(M, block_rows)), K), dtype=torch.int8)
        row_term = torch.empty(min(M, block_rows), dtype=torch.int64)
        for r0 in range(0, M, block_rows):
            m = min(M, r0 + block_rows) - r0
            block = planes[:2 * _bucket(m)]  # rows [0, 2m): the planes [a; b] of these m rows
            if 2 * m < len(block):
                block[2 * m:].zero_()  # padding: its products are never read (a call on an empty slice costs ~6 us)
            if not split(xm[r0].data_ptr(), m, K, block.data_ptr(), row_term.data_ptr()):
                return None
            onednn = self.onednn is not None and len(block) * self.planes.shape[1] * K >= self.min_macs
            # (2 m_pad x K) x (K x planes N): float32 from oneDNN, else int32; the combination reads
            # the first 2m rows, the products of [a; b]
            products = self._onednn_products(block) if onednn else torch._int_mm(block, self.planes)
            if self.weight_planes == 1:
                combine = lib.combine_one_f32 if onednn else lib.combine_one
                combine(products.data_ptr(), m, N, self.offset.data_ptr(), self.scale.data_ptr(), cap,
                        out[r0].data_ptr(), N)
            else:
                combine = lib.combine_f32 if onednn else lib.combine
                combine(products.data_ptr(), m, N, row_term.data_ptr(), self.offset.data_ptr(), self.scale.data_ptr(),
                        cap, out[r0].data_ptr(), N)
        return out.view(*x.shape[:-1], N)

    def _onednn_products(self, planes: torch.Tensor) -> torch.Tensor:
        """planes (2m, K) int8 -> (2m, weight planes N) float32 products, contiguous (oneDNN's matmul)."""
        w_scale, w_zero = self.unit_scales
        return torch.ops.onednn.qlinear_pointwise(planes, 1.0, 0, self.onednn, w_scale, w_zero, None, 1.0, 0,
                                                  torch.float32, "none", [None], "")


def _bucket(m: int) -> int:
    """m rows rounded up to a multiple of ROW_BUCKET."""
    return -(-m // ROW_BUCKET) * ROW_BUCKET


def prepare(weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor) -> PackedLinear | None:
    """The int8 route of one exact linear, or None where it is off or not exact here."""
    N, K = weight.shape
    planes = weight_planes(weight)
    if not enabled() or K >= MAX_INNER or not probe(K, N, planes=planes):
        return None
    onednn = onednn_enabled() and K < FP32_INNER and probe(K, N, True, planes)
    return PackedLinear(weight, bias, shift, onednn)


@functools.lru_cache(maxsize=None)
def probe(inner: int, outputs: int, onednn: bool = False, planes: int = 2) -> bool:
    """Whether the route computes exact sums of products for (M, inner) x (inner, outputs) on
    this machine: weight rows at both extremes (int16's, or int8's for one weight plane),
    alternating and random, against int16 activation rows likewise, at each of PROBE_ROWS row
    counts, compared with float64 products (exact: every sum below 2^53; shift 0, so the whole
    sum is compared). onednn: the AMX route's products (oneDNN's matmul) for every block,
    else torch._int_mm's."""
    if not enabled() or onednn and (not onednn_enabled() or inner >= FP32_INNER):
        return False
    g = torch.Generator().manual_seed(inner * 7919 + outputs)
    K, N = inner, outputs
    alternating = torch.where(torch.arange(K) % 2 == 0, -32768, 32767)
    special = torch.stack([torch.full((K,), -32768), torch.full((K,), 32767), alternating, -alternating - 1,
                           torch.full((K,), 255), torch.full((K,), -256)])
    w = torch.randint(-32768, 32768, (N, K), generator=g)
    w[: min(N, len(special))] = special[: min(N, len(special))]
    if planes == 1:  # within int8: the extremes -128 and 127, alternating, and random
        w = torch.bitwise_right_shift(w, 8)
    try:
        route = PackedLinear(w, torch.zeros(N, dtype=torch.int64), torch.zeros(N, dtype=torch.int64), onednn)
        if route.weight_planes != planes:
            return False
        route.min_macs = 0  # with onednn, every block on oneDNN's matmul; else route.onednn is None
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
