"""The integer g_s's convolutions on the CPU's int8 units (VNNI, AMX), exactly.

int_synthesis runs each convolution as float32 products on two 8-bit planes of the
activation, exact because every partial sum stays below 2^24. The same integers go through
oneDNN's int8 convolution here: the activation's planes as uint8 (value + 128, the zero point
oneDNN subtracts exactly in int32) and the weight's too (w = 256 w_hi + w_lo, both within
int8), so one convolution with 2x the output rows gives all four plane products, accumulated
in int32 and returned as float32:

    out (2B, 2R, H, W) = [[x_hi * w_hi, x_hi * w_lo + f_lo], [x_lo * w_hi, x_lo * w_lo + f_lo]]
    P_hi + f_lo = 256 (x_hi * w_hi) + (x_hi * w_lo + f_lo), and the same for x_lo

which are exactly the two planes' products (plus bias) that int_synthesis's float32 route
computes, so everything after them, and the pixels, are unchanged. Exact when every
accumulator and every partial sum of the combination fits float32 (|.| < 2^24, checked per
convolution from its weights: `fits`) and the kernel really is an int32 sum of int8 products.

The last condition depends on the machine: oneDNN on CPUs without VNNI halves the weights or
saturates 16-bit pair sums. So the kernel is *probed* before use: for every shape a model
needs, random and extreme operands are compared with exact float64 convolutions, and a
single difference (or an exception, a missing operator, a non-x86 build) turns this route off
for the process; int_synthesis then runs its float32 route, which gives the same integers.
M2T_INT8_CONV=0 turns it off by hand (benchmarks, debugging).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from . import cpu_kernels

PLANE = 256
ZERO_POINT = 128  # uint8 plane = int8 plane + 128
FP32_EXACT = 1 << 24
BAND_BYTES = 8 << 20  # per thread: a tile's widest temporary (its plane products, float32); 4 MiB was 6 % slower
TILE_WIDTH = 128  # columns a convolution call computes at most (`convolve`: shapes that do not follow the image)
TILE_STEP = 16  # tile widths are multiples of this
ROW_STEP = 8  # band heights too
HI_RANGE = (-128 * PLANE - ZERO_POINT, 127 * PLANE + 127 - ZERO_POINT)  # w whose w_hi, w_lo fit int8
WEIGHT8_MAX = 127  # a weight within +-127 is its own plane


def enabled() -> bool:
    """Whether this route may run at all here (the probe still decides per shape)."""
    return os.environ.get("M2T_INT8_CONV", "1") != "0" and _onednn_int8()


@functools.lru_cache(maxsize=None)
def _onednn_int8() -> bool:
    """Whether this torch build has oneDNN's int8 convolution (looked up once)."""
    try:
        torch.ops.onednn.qconv2d_pointwise  # noqa: B018  (raises where this build has no oneDNN int8)
        torch.ops.onednn.qconv_prepack  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


def status() -> str:
    """Whether the integer g_s's convolutions run here on int8 units, and why not (benchmark
    records): probed on a typical shape of the small preset."""
    if os.environ.get("M2T_INT8_CONV", "1") == "0":
        return "off (M2T_INT8_CONV=0)"
    if not enabled():
        return "off (this torch build has no oneDNN int8 convolution)"
    return "on" if probe(64, 64, 3) else "off (this CPU's int8 kernels are not exact: the float32 route runs)"


def split_weight(w: torch.Tensor) -> torch.Tensor:
    """Integer weight (R, C, k, k) -> int8 (2R, C, k, k): the rows of w_hi, then of w_lo,
    w = 256 w_hi + w_lo, w_lo in [-128, 127]. The caller checks `fits` first."""
    w = w.to(torch.int64)
    hi = torch.div(w + ZERO_POINT, PLANE, rounding_mode="floor")
    lo = w - PLANE * hi
    return torch.cat([hi, lo]).to(torch.int8)


def weight_planes(w: torch.Tensor) -> int:
    """1 where every weight is within int8 (m2t's integer-v2 weights: the weight is its own
    plane), else 2 (w = 256 w_hi + w_lo)."""
    return 1 if int(w.min()) >= -WEIGHT8_MAX and int(w.max()) <= WEIGHT8_MAX else 2


def fits(w: torch.Tensor, f_lo: torch.Tensor) -> bool:
    """Whether the int8 route is exact for this weight (R, C, k, k) and bias f_lo (R,).
    One plane (`weight_planes`): every accumulator (an activation plane's product plus the
    bias) below 2^24, the bound int_synthesis's float32 route has. Two planes: both within
    int8, every accumulator below 2^24, and so is every partial sum of int_synthesis's
    combination of the four products, floor(x_lo w_lo / 256) + x_lo w_hi + x_hi w_lo (before
    256 x_hi w_hi joins)."""
    w = w.to(torch.int64)
    bias = f_lo.to(torch.int64).abs().cpu()
    if weight_planes(w) == 1:
        return bool((w.abs().flatten(1).sum(dim=1) * 128 + bias < FP32_EXACT).all())
    if int(w.min()) < HI_RANGE[0] or int(w.max()) > HI_RANGE[1]:
        return False
    R = w.shape[0]
    l1 = split_weight(w).to(torch.int64).abs().flatten(1).sum(dim=1) * 128  # (2R,) bounds |x * plane|
    hi, lo = l1[:R], l1[R:]
    accumulators = torch.maximum(hi, lo + bias)
    partial = lo + bias + (lo + bias) // PLANE + 1 + hi
    return bool((accumulators < FP32_EXACT).all() and (partial < FP32_EXACT).all())


def plane_pack(x: torch.Tensor, out: torch.Tensor) -> None:
    """Float32 integers x (B, C, h, W), |x| <= 32639 -> `out` uint8 (2B, C, h, W): the high
    planes (x + 128) // 256 + 128, then the low planes (x + 128) mod 256 = x_lo + 128. Both
    are bytes of v = x + 128 + 2^15 in [0, 2^16), formed as int16: x + 128 fits int16, and
    adding 2^15 mod 2^16 is flipping the sign bit. The low byte is v converted to uint8 (an
    integer conversion keeps it mod 256: C++'s rule, and ATen's on every CPU capability,
    tests/test_int8_conv.py); the high byte is v's arithmetic shift right by 8, converted the
    same way. Contiguous integer passes only: 1.9x quicker than reading strided bytes. Where
    the C kernels are built (cpu_kernels) and x and out are blocks of channels-last pixels
    (`_pixel_block`), one fused pass of the same integer steps instead."""
    B, C, h, W = x.shape
    lib = cpu_kernels.library()
    x_block, out_block = _pixel_block(x), _pixel_block(out)
    if lib is not None and x.dtype == torch.float32 and out.dtype == torch.uint8 and x_block and out_block:
        if x.numel():  # one fused pass (csrc/exact_kernels.c)
            lib.plane_pack(x.data_ptr(), *x_block, B, h, W, C, out.data_ptr(), out[B].data_ptr(), *out_block,
                           torch.get_num_threads())
        return
    v = torch.empty((B, h, W, C), dtype=torch.int16)
    v.copy_(x.permute(0, 2, 3, 1)).add_(ZERO_POINT).bitwise_xor_(-(1 << 15))  # (B, h, W, C): v - 2^16 where v >= 2^15
    planes = out.permute(0, 2, 3, 1)  # (2B, h, W, C)
    planes[B:].copy_(v)
    planes[:B].copy_(v.bitwise_right_shift_(8))


def _pixel_block(t: torch.Tensor) -> tuple[int, int] | None:
    """(image stride, row stride) of t (B, C, h, W) on the CPU where each pixel's C values are
    adjacent and each row's pixels follow one another (a block of rows and columns of a
    channels-last tensor): the layout the fused kernels read and write; else None."""
    _, C, h, W = t.shape
    if t.device.type != "cpu" or (C > 1 and t.stride(1) != 1) or (W > 1 and t.stride(3) != C):
        return None
    return t.stride(0), t.stride(2)


def tile_width(W: int) -> int:
    """Columns a convolution computes per call for a W-pixel-wide activation: W split into
    equal tiles of at most TILE_WIDTH, rounded up to a multiple of TILE_STEP (the tiles on
    the right are padded). So every image size uses one of TILE_WIDTH // TILE_STEP widths."""
    tiles = _ceil_div(W, TILE_WIDTH)
    return _ceil_div(_ceil_div(W, tiles), TILE_STEP) * TILE_STEP


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def convolve(conv: "PackedConv", x: torch.Tensor, finish, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The convolution of float32 integers x (B, C, H, W) as `conv`'s products, in tiles:
    finish(products, out, res) takes each tile's plane products (2B, planes R, n, m) float32
    (`PackedConv.raw`) and writes its output pixels into `out` (B, R, n, m), a block of the
    result (B, R, H, W) channels-last; `res` is the same block of `residual` (B, R, H, W), or
    None. A tile reads `p` rows and columns around it, the zero point beyond the image, so
    the result is the whole convolution's.

    oneDNN compiles a kernel for every input shape it meets (milliseconds each, against a
    fraction of one to run it) and keeps a bounded number. So the calls' shapes do not follow
    the image: tiles of `tile_width` columns, bands of a row count fixed per layer and tile
    width, a last band rounded up to ROW_STEP rows; the padding rows and columns are computed
    and dropped. Each tile comes with its border already padded (the convolution pads
    nothing), which also runs oneDNN's faster kernels for 3x3 convolutions."""
    B, C, H, W = x.shape
    p = conv.kernel // 2
    tw = tile_width(W)
    budget = BAND_BYTES * torch.get_num_threads()  # small bands lose to per-call costs, large ones to the caches
    band = max(ROW_STEP, budget // (2 * B * conv.planes * conv.rows * 4 * tw) // ROW_STEP * ROW_STEP)
    out = torch.empty((B, conv.rows, H, W), dtype=torch.float32, memory_format=torch.channels_last)
    buffers: dict[int, torch.Tensor] = {}
    for y0 in range(0, H, band):
        n = min(band, H - y0)
        rows = _ceil_div(n, ROW_STEP) * ROW_STEP + 2 * p  # input rows of this band's call
        planes = buffers.get(rows)
        if planes is None:
            planes = buffers[rows] = torch.empty((2 * B, C, rows, tw + 2 * p), dtype=torch.uint8,
                                                 memory_format=torch.channels_last)
        a0, a1 = max(0, y0 - p), min(H, y0 + n + p)  # the input rows this band reads
        top = a0 - (y0 - p)
        for x0 in range(0, W, tw):
            m = min(tw, W - x0)
            c0, c1 = max(0, x0 - p), min(W, x0 + m + p)  # and columns
            left = c0 - (x0 - p)
            bottom, right = top + a1 - a0, left + c1 - c0
            for beyond in (planes[:, :, :top], planes[:, :, bottom:], planes[:, :, :, :left], planes[:, :, :, right:]):
                if beyond.numel():
                    beyond.fill_(ZERO_POINT)  # beyond the image: the zero point (a zero activation)
            plane_pack(x[:, :, a0:a1, c0:c1], planes[:, :, top:bottom, left:right])
            raw = conv.raw(planes)  # (2B, planes R, rows - 2p, tw)
            finish(raw[:, :, :n, :m], out[:, :, y0:y0 + n, x0:x0 + m],
                   None if residual is None else residual[:, :, y0:y0 + n, x0:x0 + m])
    return out


def fused_rescale(raw: torch.Tensor, r, planes: int, low: int, high: int, out: torch.Tensor,
                  residual: torch.Tensor | None = None) -> bool:
    """int_synthesis._combine_into (planes=1) or _combine_products (2; rows all wide) of the
    plane products `raw` with int_synthesis.Rescale `r`, clamped into `out` (then plus
    `residual`, clamped again, where given), in one pass of the C kernel (cpu_kernels: the
    same float32 steps in the same order), where it is built and raw, out and residual are
    blocks of channels-last pixels (`_pixel_block`); False where the torch passes must run."""
    lib = cpu_kernels.library()
    B, R, n, W = out.shape
    raw_block, out_block = _pixel_block(raw), _pixel_block(out)
    if (lib is None or raw.dtype != torch.float32 or out.dtype != torch.float32 or not raw_block or not out_block
            or tuple(raw.shape) != (2 * B, planes * R, n, W)
            or residual is not None and (residual.dtype != torch.float32 or residual.shape != out.shape
                                         or residual.stride() != out.stride())):
        return False
    if out.numel():
        lib.rescale_planes(raw.data_ptr(), *raw_block, B, n, W, R, planes, r.lo_scale.data_ptr(),
                           r.hi_scale.data_ptr(), r.delta.data_ptr(), r.scale.data_ptr(), r.b_int.data_ptr(),
                           float(low), float(high), out.data_ptr(), *out_block,
                           None if residual is None else residual.data_ptr(), torch.get_num_threads())
    return True


def fused_gate(x: torch.Tensor, t: torch.Tensor, m: torch.Tensor, table: torch.Tensor, half: int, bits: int,
               limit: int) -> torch.Tensor | None:
    """int_synthesis.IntOps.gate in one pass of the C kernel (the same float32 steps in the same
    order), where it is built and x, t, m (B, C, H, W) are channels-last alike; else None."""
    lib = cpu_kernels.library()
    if (lib is None or x.device.type != "cpu" or not (x.dtype == t.dtype == m.dtype == table.dtype == torch.float32)
            or not x.shape == t.shape == m.shape or not x.is_contiguous(memory_format=torch.channels_last)
            or not x.stride() == t.stride() == m.stride() or not table.is_contiguous()):
        return None
    out = torch.empty_like(x)  # the same layout
    lib.gate(x.data_ptr(), t.data_ptr(), m.data_ptr(), x.numel(), table.data_ptr(), half, bits, float(limit),
             out.data_ptr(), torch.get_num_threads())
    return out


class PackedConv:
    """One convolution's weight planes prepacked for oneDNN, with its bias: one plane where
    the weight is within int8 (`weight_planes`), else two."""

    def __init__(self, weight: torch.Tensor, f_lo: torch.Tensor):
        R, C, k, _ = weight.shape
        self.rows, self.kernel, self.planes = R, k, weight_planes(weight)
        self.w_scale = torch.ones(self.planes * R, dtype=torch.float32)
        self.w_zero = torch.zeros(self.planes * R, dtype=torch.int64)
        w8 = weight.to(torch.int8) if self.planes == 1 else split_weight(weight)
        w8 = w8.contiguous(memory_format=torch.channels_last)
        # The input comes padded (`convolve`): oneDNN pads nothing.
        self.packed = torch.ops.onednn.qconv_prepack(w8, self.w_scale, 1.0, ZERO_POINT, [1, 1], [0, 0], [1, 1], 1,
                                                     None)
        # Two planes: the bias on the w_lo rows only, so that it is added once per activation plane.
        f_lo = f_lo.float().cpu()
        self.bias = f_lo if self.planes == 1 else torch.cat([torch.zeros(R), f_lo])

    def raw(self, planes: torch.Tensor) -> torch.Tensor:
        """uint8 planes (2B, C, n + 2p, m + 2p), padded by p = kernel // 2 rows and columns on
        each side -> the plane products (2B, planes * R, n, m), float32: one weight plane gives
        [x_hi * w + f_lo, x_lo * w + f_lo], two the four products [[x_hi * w_hi, x_hi * w_lo +
        f_lo], [x_lo * w_hi, x_lo * w_lo + f_lo]]."""
        return torch.ops.onednn.qconv2d_pointwise(
            planes, 1.0, ZERO_POINT, self.packed, self.w_scale, self.w_zero, self.bias, [1, 1], [0, 0], [1, 1], 1,
            1.0, 0, torch.float32, "none", [], "")


@functools.lru_cache(maxsize=None)
def probe(c_in: int, c_out: int, kernel: int, planes: int = 2) -> bool:
    """Whether oneDNN's int8 convolution of this shape (a PackedConv of c_out rows and `planes`
    weight planes) is an exact int32 sum of products on this machine: extreme and random
    operands against exact float64 convolutions, in two calls of one input shape (one kernel
    to generate)."""
    if not enabled():
        return False
    g = torch.Generator().manual_seed(c_in * 1009 + c_out * 31 + kernel)
    p = kernel // 2
    x8 = torch.randint(0, 256, (4, c_in, 5, 37), generator=g, dtype=torch.uint8)
    x8[0], x8[1] = 0, 255  # the extremes of the u8 side; images 2, 3 random
    # Nonzero weights on the first `live` input channels only, so that every sum of this probe
    # stays below 2^24 (float32 returns it exactly) while adjacent channels, which non-VNNI
    # kernels add in saturating 16-bit pairs, still meet at the extremes.
    live = max(2, min(c_in, (FP32_EXACT - 1) // (2 * 128 * 128 * kernel * kernel)))
    extreme = torch.where(torch.arange(c_out) % 2 == 0, -128, 127)[:, None, None, None]
    weights = [extreme.expand(c_out, c_in, kernel, kernel).clone(),  # the extremes of the s8 side
               torch.randint(-128, 128, (c_out, c_in, kernel, kernel), generator=g) | 1]  # odd: halving shows
    # The border comes with the input, as `convolve` gives it.
    padded = F.pad(x8, (p, p, p, p), value=ZERO_POINT).contiguous(memory_format=torch.channels_last)
    try:
        for w_small in weights:
            w_small[:, live:] = 0
            w_small = w_small.clamp(-WEIGHT8_MAX, WEIGHT8_MAX) if planes == 1 else w_small
            w = w_small if planes == 1 else w_small * (PLANE + 1)  # two planes: (w_small, w_small)
            f_lo = torch.randint(0, 256, (c_out,), generator=g).float()
            packed = PackedConv(w, f_lo)
            if packed.planes != planes:
                return False
            rows, bias = (w, f_lo) if planes == 1 else (split_weight(w), torch.cat([torch.zeros(c_out), f_lo]))
            want = _reference_conv(x8.double() - ZERO_POINT, rows.double(), bias.double())
            got = packed.raw(padded)
            if not torch.equal(got.double(), want):
                return False
    except Exception:  # noqa: BLE001  (any failure of the int8 route means: use the float32 one)
        return False
    return True


def _reference_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Convolution with zero padding as im2col and a float64 matrix product: exact for these
    integers (every sum below 2^53), and quicker than float64 conv2d on CPUs."""
    B, _, H, W = x.shape
    k = w.shape[-1]
    cols = F.unfold(x, k, padding=k // 2)  # (B, C*k*k, H*W)
    out = torch.matmul(w.reshape(w.shape[0], -1), cols) + bias[:, None]  # (B, rows, H*W)
    return out.view(B, -1, H, W)
