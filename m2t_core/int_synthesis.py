"""The synthesis transform g_s in exact integer arithmetic: decoded pixels are a pure function
of the latent, the same on every CPU kind, GPU, thread count, batch, tiling and torch build.

Why: the entropy model is exact, so every decoder recovers the same latent; the float g_s
then rounded differently per machine and thread count (a few pixels one level apart). Here
every number between the latent and the pixels is an integer:

* an activation is an integer tensor with a fixed power-of-two exponent per tensor
  (value = q * 2^-e, |q| <= ACT_LIMIT, 16 bits), chosen once at calibration on training
  latents and stored with the model (`act_exp`);
* a convolution weight row (one output channel) is integer with its own exponent `w_exp`,
  bias at the accumulator's exponent; rescaling is a rounding right shift per channel;
* the products run in float32 *carriers* on integer operands, split so that no partial sum
  can leave the range where float32 is exact: the activation is split into two planes
  (q = 256 * hi + lo, |hi|, |lo| <= 128) that go through the convolution as one batch, and
  every weight row satisfies 128 * sum|w| <= 2^24 - 2^21 (`exactness_margin_bits` checks every
  bound of a model's integers). Every partial sum of every output is then an integer below 2^24, which
  float32 holds exactly, so the result does not depend on summation order, blocking, FMA,
  SIMD width, thread count or device. Only the algorithm must be a sum of products: direct
  convolution or im2col + GEMM (what PyTorch runs on CPUs), never Winograd/FFT or reduced
  precision (TF32, bf16): `exact_products()` turns those off, and GPUs run im2col + matmul.
* the two planes are recombined and rescaled without leaving exact float32 either:
  floor((256 * P_hi + X) / 2^s) = floor((P_hi + floor(X / 256)) / 2^(s - 8)) for s >= 8, the
  bias split into its part in output steps and a remainder below 2^s (`Rescale`);
* the sigmoid of the attention gate is a lookup in a table computed with integer-only
  arithmetic (intmath), the gate an exact product below 2^24;
* pixels: round(clamp(x, 0, 1) * 255) as an integer multiply and shift;
* on CPUs whose int8 kernels are exact (VNNI, AMX: probed, not assumed), the same products
  run on the int8 units in tiles (int8_conv.py); elsewhere, and on GPUs, the float32
  route. Both give the same integers. Speed: docs/benchmarks.md.

Two arithmetics, which the stream's format version selects (`arithmetic`): integer-v1
(formats 3, 4; weights within the float32 budget, so two int8 planes) and integer-v2
(format 5, `IntSynthesis.eight_bit`: weight rows within int8 in every convolution but the
one that writes pixels, one plane of products, derived from the same model): +0.08 % and
+0.55 % BD-rate against the float g_s on Kodak (bench/integer_synthesis.py, docs/models.md).

Layout: tensors are (B, C, H, W) float32 holding integers, in channels-last memory (oneDNN's
faster layout). The structure (which convolutions, in which order) is read from the float
SynthesisTransform, so the two can never disagree.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import int8_conv, intmath, rate
from .transforms import ResidualBottleneck, SimplifiedAttention, SubpixelConvTranspose2d, SynthesisTransform

ACT_LIMIT = 32639  # |q| of an activation: its planes (q + 128) // 256 and the rest stay within int8
PLANE = 256  # q = PLANE * hi + lo
PLANE_MAX = 128  # |hi|, |lo| <= 128
FP32_EXACT = 1 << 24  # every integer below 2^24 is a float32
ROW_BUDGET = FP32_EXACT - (1 << 21)  # PLANE_MAX * sum|w| of a row: |P_hi|, |P_lo| <= this
MAX_SHIFT = 21  # rescaling shifts at most: the high plane's rounding carry f_hi < 2^13
MAX_BIAS_OUT = 1 << 20  # |bias| in output steps (beyond it, the clamp decides anyway)
GATE_IN_EXP = 8  # the attention mask's logits, in 1/256
GATE_HALF = 16 << GATE_IN_EXP  # the sigmoid table covers [-16, 16]
GATE_BITS = 8  # sigmoid in 1/256: |trunk| * 2^8 < 2^24
PIXEL_EXP = 12  # the last convolution's output, in 1/4096 of the [0, 1] pixel range
MIN_EXP, MAX_EXP = -8, 24  # activation exponents are clipped to this range
CALIBRATION_MARGIN = 2.0  # an activation's exponent leaves room for 2x its calibrated maximum
WEIGHT8_MAX = int8_conv.WEIGHT8_MAX  # integer-v2: weight rows within int8
# What decides decoded pixels (M2TCodec.numerics, recorded in archives): the arithmetic, which
# the stream's format version selects (`arithmetic`).
ARITHMETIC_V1 = "integer-v1"  # formats 3 and 4: weights within the float32 budget (two int8 planes)
ARITHMETIC_V2 = "integer-v2"  # format 5: weights within int8 but the pixel convolution's (one plane)


def arithmetic(version: int) -> str:
    """The integer g_s arithmetic that decodes a stream of this format version."""
    return ARITHMETIC_V2 if version >= 5 else ARITHMETIC_V1


def sigmoid_table() -> np.ndarray:
    """The attention gate's sigmoid: round(2^GATE_BITS sigmoid(i / 2^GATE_IN_EXP)), i = -GATE_HALF..GATE_HALF."""
    return intmath.sigmoid_table(GATE_IN_EXP, GATE_HALF, GATE_BITS)


# ---------------------------------------------------------------------- structure


@dataclass(frozen=True)
class ConvSpec:
    name: str  # the float module's path in g_s ("layers.1", "layers.0.trunk.2.body.4", ...)
    c_in: int
    c_out: int  # rows of the integer weight (s*s*C_out for a sub-pixel deconvolution)
    kernel: int
    upsample: int  # 1: an ordinary convolution; s: a stride-s deconvolution (sub-pixel form)


def conv_specs(g_s: SynthesisTransform) -> list[ConvSpec]:
    """Every convolution of g_s, in forward order, with its integer shape."""
    specs = []
    for name, m in g_s.named_modules():
        if isinstance(m, SubpixelConvTranspose2d):
            s = m.stride[0]
            k = m._subpixel_kernel()[0].shape[-1]
            specs.append(ConvSpec(name, m.in_channels, m.out_channels * s * s, k, s))
        elif isinstance(m, nn.Conv2d):
            specs.append(ConvSpec(name, m.in_channels, m.out_channels, m.kernel_size[0], 1))
    return specs


def activation_names(g_s: SynthesisTransform) -> list[str]:
    """The calibrated activations: one stream per resolution stage before the last
    deconvolution ("stream0" holds the latent's stage), and the ReLU outputs inside residual
    blocks ("<block>.body.0.out", "<block>.body.2.out")."""
    deconvs = sum(1 for layer in g_s.layers if isinstance(layer, SubpixelConvTranspose2d))
    names = [f"stream{i}" for i in range(deconvs)]  # the last deconvolution writes pixels
    for name, m in g_s.named_modules():
        if isinstance(m, ResidualBottleneck):
            names += [f"{name}.body.0.out", f"{name}.body.2.out"]
    return names


# ---------------------------------------------------------------------- parameters


class IntConv(nn.Module):
    """One convolution's integers: weight (rows, c_in, k, k) at per-row exponent w_exp, bias
    at the accumulator's exponent (e_in + w_exp)."""

    def __init__(self, spec: ConvSpec):
        super().__init__()
        self.spec = spec
        k = spec.kernel
        self.register_buffer("weight", torch.zeros(spec.c_out, spec.c_in, k, k, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(spec.c_out, dtype=torch.int64))
        self.register_buffer("w_exp", torch.zeros(spec.c_out, dtype=torch.int64))
        self._carriers: dict = {}
        self._int8: tuple | None = None

    def __getstate__(self):
        """Copies and pickles leave the caches behind (oneDNN's packed weights cannot be
        copied); they are rebuilt on first use."""
        state = dict(self.__dict__)
        state["_carriers"], state["_int8"] = {}, None
        return state

    def _weights_key(self) -> tuple | None:
        """What the caches below depend on (None for inference tensors, which have no version
        counter: then nothing is cached)."""
        if self.weight.is_inference():
            return None
        return self.weight._version, self.bias._version, self.w_exp._version

    def int8_conv(self, shift: torch.Tensor) -> "int8_conv.PackedConv | None":
        """The int8 route of this convolution (int8_conv.py) for the shifts `shift`, or None
        where it would not be exact here; cached."""
        key = self._weights_key()
        if self._int8 is None or key is None or self._int8[0] != key or not torch.equal(self._int8[1], shift):
            f_lo = Rescale.of(self.bias, shift, "cpu").f_lo
            spec = self.spec
            usable = (int8_conv.probe(spec.c_in, spec.c_out, spec.kernel, int8_conv.weight_planes(self.weight))
                      and int8_conv.fits(self.weight, f_lo))
            self._int8 = (key, shift.clone(), int8_conv.PackedConv(self.weight, f_lo) if usable else None)
        return self._int8[2]

    def set_rows(self, w: torch.Tensor, b: torch.Tensor, w_exp: torch.Tensor, e_in: int, e_out: int) -> None:
        """The integers of float rows w (rows, K) and bias b (rows,) (float64) at per-row
        exponents w_exp: round(w 2^w_exp), the bias at the accumulator's exponent, limited to
        MAX_BIAS_OUT output steps. Exact: products by powers of two, then round half to even."""
        self.weight.copy_(_round_rows(w, w_exp, self.weight.shape))
        limit = float(MAX_BIAS_OUT) * torch.pow(2.0, w_exp + e_in - e_out)
        self.bias.copy_(torch.round(b * torch.pow(2.0, w_exp + e_in)).clamp(-limit, limit).to(torch.int64))
        self.w_exp.copy_(w_exp.to(torch.int64))

    def carriers(self, device, shift: torch.Tensor) -> tuple[torch.Tensor, "Rescale"]:
        """The float32 weight on `device` (exact: integers below 2^24) and the rescaling terms
        of each row for the shifts `shift` (e_in + w_exp - e_out); cached."""
        key = self._weights_key()
        hit = self._carriers.get(device)
        if hit is None or key is None or hit[0] != key or not torch.equal(hit[2].shift, shift):
            weight = self.weight.to(device, torch.float32).contiguous(memory_format=torch.channels_last)
            hit = (key, weight, Rescale.of(self.bias, shift, device))
            self._carriers[device] = hit
        return hit[1], hit[2]


@dataclass
class Rescale:
    """floor((acc + bias + 2^(s-1)) / 2^s) of each row, split so float32 stays exact:
    bias + 2^(s-1) = 2^s b_int + frac with 0 <= frac < 2^s <= 2^MAX_SHIFT. The convolution adds
    f_lo (frac's low 8 bits where s >= 8, all of it elsewhere) to both planes' products as its
    bias; `_combine` takes floor(x / 2^s) in two steps, first by 2^m with m = min(s, 8):
    b_int + floor((P_hi 2^(8-m) + floor((P_lo + f_lo) / 2^m) + delta) / 2^(s-m)), where
    delta = f_hi - f_lo 2^(8-m) removes the bias from the high plane's product and adds frac's
    high part f_hi."""

    shift: torch.Tensor  # (rows,) int64, on the CPU
    f_lo: torch.Tensor  # (rows,) float32 on the device: the convolution's bias
    delta: torch.Tensor  # (rows, 1, 1) float32 on the device, as the rest
    b_int: torch.Tensor
    scale: torch.Tensor  # 2^-(s - m)
    hi_scale: torch.Tensor  # 2^(8 - m): 1 on wide rows (s >= 8)
    lo_scale: torch.Tensor  # 2^-m
    all_wide: bool  # every row s >= 8 (hi_scale 1, lo_scale 1/256)

    @staticmethod
    def of(bias: torch.Tensor, shift: torch.Tensor, device) -> "Rescale":
        s = shift.to(torch.int64)  # may be negative (an output finer than input x weight): a left shift
        up, down = (-s).clamp(min=0), s.clamp(min=0)
        total = bias.to(torch.int64) + torch.where(s > 0, torch.ones_like(s) << (down - 1).clamp(min=0), 0)
        b_int = torch.where(s >= 0, torch.div(total, torch.ones_like(s) << down, rounding_mode="floor"), total << up)
        frac = torch.where(s >= 0, total - (b_int << down), 0)  # 0 <= frac < 2^s
        wide = s >= 8
        m = s.clamp(max=8)
        f_hi = torch.where(wide, frac >> 8, 0)
        f_lo = torch.where(wide, frac & 255, frac)
        hi_scale = torch.pow(2.0, (8 - m).double())
        col = (lambda t: t.to(device, torch.float32)[:, None, None])  # (rows, 1, 1)
        return Rescale(s.clone(), f_lo.to(device, torch.float32), col(f_hi - f_lo * hi_scale), col(b_int),
                       col(torch.pow(2.0, -(s - m).double())), col(hi_scale), col(torch.pow(2.0, -m.double())),
                       bool(wide.all()))


def _int8_exponents(w: torch.Tensor, cap: int) -> torch.Tensor:
    """Per row of w (rows, K) float64 the largest exponent e <= cap (float64 (rows,)) at which
    the rounded row fits int8 and the float32 budget: max|round(w 2^e)| <= WEIGHT8_MAX and
    PLANE_MAX * sum|round(w 2^e)| <= ROW_BUDGET. Decided on the rounded integers (exact sums),
    from a float estimate at most one too low, so every machine finds the same exponents."""

    def fits(e: torch.Tensor) -> torch.Tensor:
        q = torch.round(w * torch.pow(2.0, e)[:, None]).abs()
        return (q.amax(dim=1) <= WEIGHT8_MAX) & (q.sum(dim=1) * PLANE_MAX <= ROW_BUDGET)

    cap = min(cap, 30)
    peak = w.abs().amax(dim=1).clamp(min=2.0 ** -60)
    e = torch.floor(torch.log2(WEIGHT8_MAX / peak)).clamp(-30, cap)
    for _ in range(2):  # the estimate may be low by one
        up = e + 1
        e = torch.where((up <= cap) & fits(up), up, e)
    while not bool(fits(e).all()):  # rows that the budget (or the estimate) holds lower
        e = torch.where(fits(e), e, e - 1)
    return e


def _round_rows(w: torch.Tensor, w_exp: torch.Tensor, shape) -> torch.Tensor:
    """round(w 2^w_exp) per row (w float64 (rows, K), w_exp (rows,)), as int32 of `shape`."""
    return torch.round(w * torch.pow(2.0, w_exp.double())[:, None]).reshape(shape).to(torch.int32)


class IntSynthesis(nn.Module):
    """The integers of g_s (all buffers): one IntConv per convolution of the float module
    (module paths with '.' -> '_'), and the activation exponents."""

    def __init__(self, g_s: SynthesisTransform):
        super().__init__()
        self.specs = conv_specs(g_s)
        self.program = structure(g_s)
        self.convs = nn.ModuleDict({_key(s.name): IntConv(s) for s in self.specs})
        self.names = activation_names(g_s)
        self._index = {n: i for i, n in enumerate(self.names)}
        self._wiring = {conv: (a_in, a_out) for conv, a_in, a_out in _walk_structure(self.program)}
        self.pixel_conv = next(conv for conv, (_, a_out) in self._wiring.items() if a_out == "pixels")
        self.register_buffer("act_exp", torch.full((len(self.names),), 8, dtype=torch.int64))

    def exp(self, name: str) -> int:
        if name == "pixels":
            return PIXEL_EXP
        if name == "gate":
            return GATE_IN_EXP
        return int(self.act_exp[self._index[name]])

    def conv(self, name: str) -> IntConv:
        return self.convs[_key(name)]

    # ------------------------------------------------------------ float -> integers

    @torch.no_grad()
    def calibrate(self, g_s: SynthesisTransform, latents: list[torch.Tensor]) -> dict[str, float]:
        """Choose the activation exponents from the float g_s's maxima on `latents` (each
        (B, C, h, w) float, from training images), then export the integer weights."""
        observed: dict[str, float] = {}
        ops = FloatOps(g_s, observed)
        for y in latents:
            forward(ops, self.program, y.float())
        exps = []
        for name in self.names:
            m = observed.get(name, 0.0)
            e = MAX_EXP if m <= 0 else math.floor(math.log2(ACT_LIMIT / (CALIBRATION_MARGIN * m)))
            exps.append(max(MIN_EXP, min(MAX_EXP, e)))
        self.act_exp.copy_(torch.tensor(exps, dtype=torch.int64))
        self.export_from(g_s)
        return observed

    @torch.no_grad()
    def export_from(self, g_s: SynthesisTransform) -> None:
        """Round the float weights onto the integer grid with the stored activation exponents:
        per row, the finest weight exponent whose row keeps PLANE_MAX * L1 within the
        float32-exact budget. Deterministic (elementwise float64 rounding of float32 values)."""
        for spec, w, b in self._float_rows(g_s):
            e_in = self.exp(self.input_of(spec.name))
            e_out = self.exp(self.output_of(spec.name))
            l1 = w.abs().sum(dim=1).clamp(min=1e-30)
            # PLANE_MAX * sum|round(w 2^e)| <= PLANE_MAX * (2^e L1 + K / 2) <= ROW_BUDGET, and the
            # rescaling shift (e_in + w_exp - e_out) at most MAX_SHIFT.
            room = ROW_BUDGET / PLANE_MAX - w.shape[1] / 2
            w_exp = torch.floor(torch.log2(room / l1))
            w_exp = w_exp.clamp(max=e_out - e_in + MAX_SHIFT).clamp(-30, 30)
            self.conv(spec.name).set_rows(w, b, w_exp, e_in, e_out)

    def _float_rows(self, g_s: SynthesisTransform):
        """(spec, weights (rows, c_in * k * k) float64, bias (rows,) float64) of every
        convolution of the float g_s, in the integer layout (sub-pixel kernels rearranged:
        copies only)."""
        modules = dict(g_s.named_modules())
        for spec in self.specs:
            module = modules[spec.name]
            if spec.upsample > 1:
                kernel, _ = module._subpixel_kernel()
                bias = module.bias.repeat_interleave(spec.upsample ** 2)
            else:
                kernel, bias = module.weight, module.bias
            yield spec, kernel.detach().double().reshape(spec.c_out, -1), bias.detach().double()  # (rows, c_in * k * k)

    @torch.no_grad()
    def weights_from(self, g_s: SynthesisTransform) -> None:
        """The integer weights from the float g_s with the stored weight exponents:
        round(w 2^w_exp), elementwise (a product by a power of two, then round half to even:
        exact, the same integers on every machine). A checkpoint leaves these weights out
        when this reproduces them (registry.save_checkpoint); loading calls it."""
        for spec, w, _ in self._float_rows(g_s):
            conv = self.conv(spec.name)
            conv.weight.copy_(_round_rows(w, conv.w_exp.double(), conv.weight.shape))

    def derivable_weights(self, g_s: SynthesisTransform) -> bool:
        """Whether weights_from(g_s) gives exactly the integer weights held now."""
        for spec, w, _ in self._float_rows(g_s):
            conv = self.conv(spec.name)
            if not torch.equal(_round_rows(w, conv.w_exp.double(), conv.weight.shape), conv.weight):
                return False
        return True

    @torch.no_grad()
    def eight_bit(self, g_s: SynthesisTransform) -> "IntSynthesis":
        """The integer-v2 arithmetic (format 5) of the same g_s: these activation exponents;
        every convolution but the one that writes pixels with weight rows within +-127 (per
        row the largest exponent at which the row fits: `_int8_exponents`), so the int8 units
        need one plane of products instead of two. The pixel convolution (12 rows, cheap)
        keeps this model's integers: 8 bits there cost most of the PSNR (measured on Kodak:
        docs/benchmarks.md). A pure function of the float g_s and of act_exp and the pixel
        convolution here: derived when needed, never stored."""
        v2 = IntSynthesis(g_s)
        v2.act_exp.copy_(self.act_exp)
        for spec, w, b in self._float_rows(g_s):
            mine, theirs = self.conv(spec.name), v2.conv(spec.name)
            if spec.name == self.pixel_conv:
                for buffer in ("weight", "bias", "w_exp"):
                    getattr(theirs, buffer).copy_(getattr(mine, buffer))
                continue
            e_in, e_out = self.exp(self.input_of(spec.name)), self.exp(self.output_of(spec.name))
            theirs.set_rows(w, b, _int8_exponents(w, e_out - e_in + MAX_SHIFT), e_in, e_out)
        return v2

    def input_of(self, conv_name: str) -> str:
        return self._wiring[conv_name][0]

    def output_of(self, conv_name: str) -> str:
        return self._wiring[conv_name][1]

    def shift(self, conv_name: str) -> torch.Tensor:
        """The rescaling shift of each row of a convolution: e_in + w_exp - e_out."""
        return self.exp(self.input_of(conv_name)) + self.conv(conv_name).w_exp - self.exp(self.output_of(conv_name))

    # ------------------------------------------------------------ checks

    def exactness_margin_bits(self) -> float:
        """log2(2^24 / the largest |intermediate| a convolution's products or rescaling can
        reach). Positive means every product, sum and rescaling step is exact in float32."""
        worst = ACT_LIMIT * (1 << GATE_BITS)  # the attention gate's product
        for spec in self.specs:
            c = self.conv(spec.name)
            shift = self.shift(spec.name)
            if int(shift.max()) > MAX_SHIFT:
                return -math.inf
            r = Rescale.of(c.bias, shift, "cpu")
            p = c.weight.abs().to(torch.int64).reshape(spec.c_out, -1).sum(dim=1) * PLANE_MAX  # bounds |P_hi|, |P_lo|
            conv_out = p + r.f_lo.long()  # the convolution's outputs, bias included
            wide = conv_out + (conv_out >> 8) + 1 + r.delta.flatten().long().abs()  # P_hi + f_hi + q
            worst = max(worst, int(conv_out.max()), int(wide.max()))
        return math.log2(FP32_EXACT) - math.log2(worst)


def _key(name: str) -> str:
    return name.replace(".", "_")


# ---------------------------------------------------------------------- the forward pass, once


def structure(g_s: SynthesisTransform) -> list[tuple]:
    """g_s as a program: ("attn", prefix, trunk RB prefixes, mask RB prefixes, mask conv),
    ("rb", prefix), ("deconv", name), in forward order."""
    program = []
    for i, layer in enumerate(g_s.layers):
        name = f"layers.{i}"
        if isinstance(layer, SimplifiedAttention):
            trunk = [f"{name}.trunk.{j}" for j in range(len(layer.trunk))]
            mask = [f"{name}.mask.{j}" for j in range(len(layer.mask) - 1)]
            program.append(("attn", name, trunk, mask, f"{name}.mask.{len(layer.mask) - 1}"))
        elif isinstance(layer, ResidualBottleneck):
            program.append(("rb", name))
        elif isinstance(layer, SubpixelConvTranspose2d):
            program.append(("deconv", name))
        else:
            raise TypeError(f"g_s layer {name} is a {type(layer).__name__}: the integer synthesis has no form for it")
    return program


def _walk_structure(program: list[tuple]):
    """(conv, input activation, output activation) for every convolution, in forward order."""
    stage = 0
    stream = "stream0"
    last = sum(1 for p in program if p[0] == "deconv")
    for item in program:
        if item[0] == "deconv":
            stage += 1
            out = "pixels" if stage == last else f"stream{stage}"
            yield item[1], stream, out
            stream = out
            continue
        blocks = [item[1]] if item[0] == "rb" else item[2] + item[3]
        for rb in blocks:
            yield f"{rb}.body.0", stream, f"{rb}.body.0.out"
            yield f"{rb}.body.2", f"{rb}.body.0.out", f"{rb}.body.2.out"
            yield f"{rb}.body.4", f"{rb}.body.2.out", stream
        if item[0] == "attn":
            yield item[4], stream, "gate"


def forward(ops, program: list[tuple], y: torch.Tensor) -> torch.Tensor:
    """g_s (as `structure` lists it) written once against an arithmetic `ops` (FloatOps:
    float, observing maxima; IntOps: exact integers). y (B, C, h, w) -> the last
    convolution's output (B, 3, 16h, 16w)."""
    x = ops.enter(y)
    stream = "stream0"
    for item in program:
        if item[0] == "deconv":
            x, stream = ops.deconv(item[1], x, stream)
        elif item[0] == "rb":
            x = _residual(ops, item[1], x, stream)
        else:
            _, _, trunk, mask, gate_conv = item
            t = x
            for rb in trunk:
                t = _residual(ops, rb, t, stream)
            m = x
            for rb in mask:
                m = _residual(ops, rb, m, stream)
            x = ops.gate(x, t, ops.conv(gate_conv, m, stream, "gate", relu=False), stream)
    return x


def _residual(ops, rb: str, x: torch.Tensor, stream: str) -> torch.Tensor:
    h = ops.conv(f"{rb}.body.0", x, stream, f"{rb}.body.0.out", relu=True)
    h = ops.conv(f"{rb}.body.2", h, f"{rb}.body.0.out", f"{rb}.body.2.out", relu=True)
    return ops.conv_add(f"{rb}.body.4", h, x, f"{rb}.body.2.out", stream)  # x + body.4(h)


class FloatOps:
    """The float g_s, step by step, recording each activation's largest |value| (calibration)."""

    def __init__(self, g_s: SynthesisTransform, observed: dict[str, float]):
        self.modules = dict(g_s.named_modules())
        self.observed = observed
        self.deconvs = sum(1 for m in g_s.layers if isinstance(m, SubpixelConvTranspose2d))
        self.stage = 0

    def _see(self, name: str, x: torch.Tensor) -> torch.Tensor:
        self.observed[name] = max(self.observed.get(name, 0.0), float(x.abs().max()))
        return x

    def enter(self, y):
        self.stage = 0
        return self._see("stream0", y)

    def conv(self, name, x, a_in, a_out, relu):
        out = self.modules[name](x)
        out = F.relu(out) if relu else out
        return out if a_out == "gate" else self._see(a_out, out)

    def deconv(self, name, x, stream):
        self.stage += 1
        out = self.modules[name](x)
        if self.stage == self.deconvs:
            return out, "pixels"
        return self._see(f"stream{self.stage}", out), f"stream{self.stage}"

    def conv_add(self, name, h, x, a_in, stream):
        return self._see(stream, x + self.conv(name, h, a_in, stream, relu=False))

    def gate(self, x, t, m, stream):
        return self._see(stream, x + t * torch.sigmoid(m))


class IntOps:
    """Exact integer arithmetic in float32 carriers (see the module docstring for the bounds);
    with `int8`, each convolution runs on the CPU's int8 units where int8_conv finds that
    exact here (the same integers)."""

    def __init__(self, model: IntSynthesis, device: torch.device, int8: bool = True,
                 log2_gain: torch.Tensor | None = None):
        self.m, self.device, self.log2_gain = model, device, log2_gain
        self.int8 = int8 and torch.device(device).type == "cpu" and int8_conv.enabled()
        self.deconvs = sum(1 for s in model.specs if s.upsample > 1)
        self.stage = 0
        self.gate_table = torch.from_numpy(sigmoid_table()).to(device, torch.float32)
        self._looked_up: dict[str, tuple[torch.Tensor, "Rescale"]] = {}  # per conv, for this pass

    def enter(self, y: torch.Tensor) -> torch.Tensor:
        self.stage = 0
        e = self.m.exp("stream0")
        if self.log2_gain is not None:  # a variable-rate latent scaled back, exactly: round(y 2^(e + v/256))
            v = self.log2_gain.to(self.device)[:, :, None, None]  # (1 or B, C, 1, 1)
            q = rate.scale_pow2(y.to(self.device, torch.int64).clamp(-(1 << 16), 1 << 16), v, e)
            return q.clamp_(-ACT_LIMIT, ACT_LIMIT).to(torch.float32).contiguous(memory_format=torch.channels_last)
        y = y.to(self.device, torch.float32).clamp(-ACT_LIMIT, ACT_LIMIT)  # integers (the latent)
        # Channels-last all the way: oneDNN's convolutions are 1.1-2.5x faster on it (same sums).
        return _rescale(y, -e, ACT_LIMIT).contiguous(memory_format=torch.channels_last)

    def _carriers(self, name: str, device) -> tuple[torch.Tensor, "Rescale"]:
        if name not in self._looked_up:  # products and rescaling of one call share the lookup
            self._looked_up[name] = self.m.conv(name).carriers(device, self.m.shift(name))
        return self._looked_up[name]

    def _int8(self, name: str):
        return self.m.conv(name).int8_conv(self.m.shift(name))

    def _products(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The convolution of integer x with the integer weights plus the bias f_lo, exactly:
        (P_hi, P_lo) stacked on the batch (2B, rows, H, W), each |P| < ROW_BUDGET + 2^MAX_SHIFT."""
        weight, rescale = self._carriers(name, x.device)
        k = weight.shape[-1]
        B = x.shape[0]
        planes = torch.empty((2 * B,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device,
                             memory_format=torch.channels_last)  # (2B, C, H, W): hi, then lo; |.| <= 128
        hi = torch.add(x, PLANE // 2, out=planes[:B]).mul_(1.0 / PLANE).floor_()
        torch.sub(x, hi, alpha=PLANE, out=planes[B:])
        if k == 1:  # one matrix product over the channels-last pixels (a GEMM: sums of products)
            _, C, H, W = planes.shape
            out = torch.addmm(rescale.f_lo, planes.permute(0, 2, 3, 1).reshape(-1, C), weight.view(-1, C).t())
            return out.view(2 * B, H, W, -1).permute(0, 3, 1, 2)  # (2B, rows, H, W), channels-last
        if x.device.type == "cpu":  # direct convolution or im2col + GEMM: sums of products
            return F.conv2d(planes, weight, rescale.f_lo, padding=k // 2)
        # GPUs: im2col + matmul (cuDNN may pick Winograd/FFT, which are not sums of products)
        _, C, H, W = planes.shape
        cols = F.unfold(planes, k, padding=k // 2)  # (2B, C*k*k, H*W)
        out = torch.matmul(weight.reshape(weight.shape[0], -1), cols) + rescale.f_lo[:, None]  # (2B, rows, H*W)
        return out.view(2 * B, -1, H, W)

    def _requant(self, name: str, p: torch.Tensor, low: int, high: int) -> torch.Tensor:
        _, rescale = self._carriers(name, p.device)
        return _combine(p, rescale).clamp_(low, high)

    def _convolve(self, name: str, x: torch.Tensor, low: int, high: int,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution's requantised output, clamped to [low, high] (then plus `residual`,
        clamped again, where given): on the int8 units in tiles where that is exact
        here (int8_conv.py), else the float32 route. The same integers either way."""
        fast = self._int8(name) if self.int8 else None
        if fast is None:
            return _add_residual(self._requant(name, self._products(name, x), low, high), residual, low, high)
        _, rescale = self._carriers(name, x.device)
        # One weight plane gives the float32 route's products [P_hi + f_lo, P_lo + f_lo]; two, four products.
        finish = _combine_into if fast.planes == 1 else _combine_products
        return int8_conv.convolve(fast, x, lambda raw, out, res: finish(raw, rescale, low, high, out, res), residual)

    def conv(self, name, x, a_in, a_out, relu):
        if a_out == "gate":
            return self._convolve(name, x, -GATE_HALF, GATE_HALF)
        return self._convolve(name, x, 0 if relu else -ACT_LIMIT, ACT_LIMIT)

    def deconv(self, name, x, stream):
        self.stage += 1
        s = self.m.conv(name).spec.upsample
        out_name = "pixels" if self.stage == self.deconvs else f"stream{self.stage}"
        out = self._convolve(name, x, -ACT_LIMIT, ACT_LIMIT)
        return F.pixel_shuffle(out, s).contiguous(memory_format=torch.channels_last), out_name  # a permutation

    def conv_add(self, name, h, x, a_in, stream):
        """A residual block's last convolution of h, clamped, plus the block's input x,
        clamped: |x + d| < 2^16, exact. On the int8 route the rescaling kernel adds x as it
        writes each band (one pass fewer over the stream)."""
        return self._convolve(name, h, -ACT_LIMIT, ACT_LIMIT, residual=x)

    def gate(self, x, t, m, stream):
        if (fused := int8_conv.fused_gate(x, t, m, self.gate_table, GATE_HALF, GATE_BITS, ACT_LIMIT)) is not None:
            return fused
        sig = self.gate_table[(m + GATE_HALF).long()]  # (B, C, H, W) in 1/2^GATE_BITS
        g = sig.mul_(t).add_(1 << (GATE_BITS - 1)).mul_(1.0 / (1 << GATE_BITS)).floor_()  # |t * sig| < 2^23
        return (x + g).clamp_(-ACT_LIMIT, ACT_LIMIT)


def _combine(p: torch.Tensor, r: Rescale) -> torch.Tensor:
    """floor((PLANE * P_hi + P_lo + bias + 2^(s-1)) / 2^s) of each row from the products
    p = (P_hi + f_lo, P_lo + f_lo) stacked on the batch, in exact float32 steps (in place), as
    `Rescale` splits it. Where s >= 8 every term is an integer below 2^24. A row with s < 8
    (its output finer than input x weight: integer-v2's 8-bit weights have many) or s < 0 (a
    left shift) is b_int + P_hi 2^(8-s) + floor((P_lo + f_lo) / 2^s): scaling by a power of
    two is exact, each step adds two floats, whose sum is exact wherever it lies below 2^24,
    and one beyond 2^24 (rounded: monotonic) stays beyond what the clamp that follows keeps
    (|delta|, |b_int| < 2^21)."""
    B = p.shape[0] // 2
    hi, lo = p[:B], p[B:]
    if r.all_wide:
        q = lo.mul_(1.0 / PLANE).floor_()  # floor((P_lo + f_lo) / 256)
    else:
        q = lo.mul_(r.lo_scale).floor_()  # floor((P_lo + f_lo) / 2^m)
        hi.mul_(r.hi_scale)
    return hi.add_(q).add_(r.delta).mul_(r.scale).floor_().add_(r.b_int)


def _combine_into(p: torch.Tensor, r: Rescale, low: int, high: int, out: torch.Tensor,
                  residual: torch.Tensor | None = None) -> None:
    """_combine of the two planes' products p, clamped to [low, high] into `out` (plus
    `residual`, clamped again, where given)."""
    if not int8_conv.fused_rescale(p, r, 1, low, high, out, residual):
        _add_residual(torch.clamp(_combine(p, r), low, high, out=out), residual, low, high)


def _add_residual(out: torch.Tensor, residual: torch.Tensor | None, low: int, high: int) -> torch.Tensor:
    return out if residual is None else out.add_(residual).clamp_(low, high)


def _combine_products(raw: torch.Tensor, r: Rescale, low: int, high: int, out: torch.Tensor,
                      residual: torch.Tensor | None = None) -> None:
    """_combine, clamped into `out` (B, R, n, W), from the four plane products of int8_conv
    raw = [[hh, hl], [lh, ll]] (2B, 2R, n, W) (x_hi / x_lo on the batch, w_hi / w_lo on the
    rows, f_lo in hl and ll): P_hi + f_lo = 256 hh + hl and floor((P_lo + f_lo) / 256) =
    lh + floor(ll / 256), so for s >= 8 the output is b_int + floor((floor(ll / 256) + lh +
    hl + 256 hh + f_hi - f_lo) / 2^(s-8)), every partial sum below 2^24 (int8_conv.fits)."""
    B, R = raw.shape[0] // 2, raw.shape[1] // 2
    hh, hl, lh, ll = raw[:B, :R], raw[:B, R:], raw[B:, :R], raw[B:, R:]
    if not r.all_wide:  # rare (see _combine): through the two planes' products
        _combine_into(torch.cat([torch.add(hl, hh, alpha=PLANE), torch.add(ll, lh, alpha=PLANE)]), r, low, high, out,
                      residual)
        return
    if int8_conv.fused_rescale(raw, r, 2, low, high, out, residual):
        return
    t = ll.mul(1.0 / PLANE).floor_().add_(lh).add_(hl).add_(hh, alpha=PLANE)  # P_hi + f_lo + floor((P_lo + f_lo) / 256)
    _add_residual(torch.clamp(t.add_(r.delta).mul_(r.scale).floor_().add_(r.b_int), low, high, out=out), residual,
                  low, high)


def _rescale(x: torch.Tensor, shift: int, limit: int) -> torch.Tensor:
    """round(x / 2^shift) (halves up), clamped; exact for integer x below 2^24."""
    if shift <= 0:
        return (x * float(1 << -shift)).clamp_(-limit, limit)
    return torch.floor((x + (1 << (shift - 1))) * (1.0 / (1 << shift))).clamp_(-limit, limit)


@contextlib.contextmanager
def exact_products():
    """Float32 products as exact sums of products: no TF32 / bf16 down-conversion (the
    settings a user may have changed for training)."""
    saved = []
    backends = torch.backends
    for obj, attr, value in ((backends.cuda.matmul, "allow_tf32", False), (backends.cudnn, "allow_tf32", False)):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)
    precision = getattr(backends.mkldnn, "conv", None)
    if precision is not None and hasattr(precision, "fp32_precision"):
        saved.append((precision, "fp32_precision", precision.fp32_precision))
        precision.fp32_precision = "ieee"
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def to_pixels(q: torch.Tensor) -> torch.Tensor:
    """The last convolution's integers (in 1/2^PIXEL_EXP) -> uint8 pixels:
    clamp(floor((255 q + 2^(PIXEL_EXP-1)) / 2^PIXEL_EXP), 0, 255), exact (|255 q| < 2^23)."""
    return torch.floor((q * 255.0 + (1 << (PIXEL_EXP - 1))) * (1.0 / (1 << PIXEL_EXP))).clamp_(0, 255).to(torch.uint8)


@torch.inference_mode()
def synthesize(model: IntSynthesis, y: torch.Tensor, int8: bool = True,
               log2_gain: torch.Tensor | None = None) -> torch.Tensor:
    """The integer g_s: y_hat (B, C, h, w) (integers, any dtype) -> uint8 (B, 3, 16h, 16w).
    int8=False keeps every convolution on the float32 route (benchmarks, tests): the same pixels.
    log2_gain (1 or B, C) int64 in 1/256: a variable-rate latent's scale (rate.py), applied exactly."""
    with exact_products():
        q = forward(IntOps(model, y.device, int8, log2_gain), model.program, y)
    return to_pixels(q)
