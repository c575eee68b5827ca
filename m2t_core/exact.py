"""The exact entropy model: the transformer of transformer.py in integer arithmetic.

Why: the decoder must recompute the encoder's distribution parameters bit for bit, on any
CPU, GPU and torch build. Float kernels do not promise that (summation order, FMA, SIMD
width and library versions change the last bits), so every number that decides a
probability is an integer here, computed by operations whose result is defined exactly:

* every activation is an integer tensor with a fixed power-of-two scale (value = int * 2^-e);
  the exponents are part of the model (`act_exp`, per-channel `w_exp`), chosen once at
  calibration and stored in the checkpoint;
* weights are int16 (|w| <= 32767), biases int64; LayerNorm's gamma/beta likewise;
* matrix products run in float64 on integer operands. Every operand is below 2^15, so every
  product is below 2^30 and every partial sum below 2^53 as long as sum_i |w_ji| * 2^15 <
  2^53 (checked by `exactness_margin_bits`, > 20 bits of margin for every shipped model):
  then float64 arithmetic is exact, and the result is the same in any order, blocking,
  thread count or device;
* rescaling is an integer multiply and a rounding right shift (int64); LayerNorm uses an
  exact integer square root; softmax and GELU are lookups in fixed tables computed with
  integer-only code (intmath.py); the output head gives the coding parameters directly
  in their integer units (mean in 1/64, scale level 0..63, logit in 1/8).

Training uses the same model through `FloatOps(quant=True)`: the same structure in float32,
rounded and clamped at every point where the integer path rounds (straight-through
gradients), so quantisation-aware training sees what the integer path will compute.

Invariant (tests/test_exact.py): for the same weights, exponents and tokens, the integer
outputs do not depend on batch size, window batching, teacher-forced vs incremental M2T
(with or without the cache), thread count or device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from . import intmath
from .config import ModelConfig
from .entropy_coding import LOG_SCALE_MIN, LOG_SCALE_STEP, LOGIT_STEPS, MAX_ABS_SYMBOL, MEAN_STEPS, SCALE_LEVELS

ACT_MAX = (1 << 15) - 1  # activations and weights are int16
RESIDUAL_MAX = (1 << 17) - 1  # the residual stream may be 4x wider (int64 storage)
INPUT_EXP = 4  # tokens enter as y * 2^4
MASK_EXP = 24  # the learned mask token, kept at 2^-24 (only to rebuild the float model)
TOKEN_CLAMP = ACT_MAX >> INPUT_EXP  # |y| seen by the network is capped at 2047
SCORE_EXP = intmath.EXP_FRAC_BITS  # attention scores in 1/256
PROB_EXP = intmath.EXP_OUT_BITS  # unnormalised attention weights in 1/2^15
GELU_EXP = intmath.GELU_FRAC_BITS  # GELU in and out in 1/256
ATTN_SCALE_BITS = 15  # 1/sqrt(d_head) as a 15-bit fixed-point multiplier
LN_EXTRA_BITS = 8  # LayerNorm's standard deviation is computed with 8 extra bits
LN_EPS = Fraction(1, 100_000)  # nn.LayerNorm's default eps
TOKEN_INPUT_SCALE = 5  # the paper's y / 5, folded into the embedding weights
LOGIT_MAX = 4096 * LOGIT_STEPS
MEAN_MAX = MAX_ABS_SYMBOL * MEAN_STEPS
EXACT_FLOAT64_BITS = 53


def ln_exponent(d_model: int) -> int:
    """Exponent of LayerNorm's output: the largest e with sqrt(D) * 2^e <= ACT_MAX
    (a normalised vector has |n_i| < sqrt(D))."""
    e = 0
    while d_model * 4 ** (e + 1) <= ACT_MAX * ACT_MAX:
        e += 1
    return e


def _attn_multiplier(d_head: int) -> int:
    """floor(2^15 / sqrt(d_head)), exactly."""
    return math.isqrt((1 << (2 * ATTN_SCALE_BITS)) // d_head)


def _ln_eps_int(exp_in: int) -> int:
    scaled = LN_EPS * (1 << (2 * (exp_in + LN_EXTRA_BITS)))
    return max(1, round(scaled))


# ---------------------------------------------------------------------- parameters


class IntLinear(nn.Module):
    """y = round((x @ W^T + b) / 2^shift): W int16 (out, in) with per-row exponent w_exp,
    b int64 at exponent (in_exp + w_exp), shift = in_exp + w_exp - out_exp per row."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(d_out, d_in, dtype=torch.int16))
        self.register_buffer("bias", torch.zeros(d_out, dtype=torch.int64))
        self.register_buffer("w_exp", torch.zeros(d_out, dtype=torch.int64))
        self.register_buffer("shift", torch.zeros(d_out, dtype=torch.int64))
        self._f64: tuple | None = None

    def weight_f64(self) -> torch.Tensor:
        # Inference tensors (a model made under inference_mode) keep no version counter:
        # never cached, so an in-place sync_exact is always seen.
        key = None if self.weight.is_inference() else (self.weight.data_ptr(), self.weight._version, self.weight.device)
        if self._f64 is None or key is None or self._f64[0] != key:
            self._f64 = (key, self.weight.to(torch.float64).t().contiguous())  # (in, out)
        return self._f64[1]


class IntNorm(nn.Module):
    """LayerNorm's affine part: round((n * gamma + beta) / 2^shift), gamma int16 at g_exp."""

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("gamma", torch.zeros(d, dtype=torch.int16))
        self.register_buffer("beta", torch.zeros(d, dtype=torch.int64))
        self.register_buffer("g_exp", torch.zeros((), dtype=torch.int64))
        self.register_buffer("shift", torch.zeros((), dtype=torch.int64))


def _linear_names(cfg: ModelConfig) -> list[str]:
    names = ["embed"]
    for i in range(cfg.n_layers):
        names += [f"b{i}_qkv", f"b{i}_proj", f"b{i}_fc1", f"b{i}_fc2"]
    return names + ["head"]


def _norm_names(cfg: ModelConfig) -> list[str]:
    return [n for i in range(cfg.n_layers) for n in (f"b{i}_norm1", f"b{i}_norm2")] + ["norm"]


def _act_names(cfg: ModelConfig) -> list[str]:
    """Calibrated activation exponents (the others are fixed constants above)."""
    names = ["residual"]
    for i in range(cfg.n_layers):
        names += [f"b{i}_norm1", f"b{i}_norm2", f"b{i}_q", f"b{i}_k", f"b{i}_v"]
    return names + ["norm"]


def _float_modules(et) -> dict[str, tuple[nn.Module, str]]:
    """Integer layer name -> (float module of transformer.EntropyTransformer, kind)."""
    out = {"embed": (et.embed, "linear"), "head": (et.head, "linear"), "norm": (et.norm, "norm")}
    for i, block in enumerate(et.blocks):
        out[f"b{i}_qkv"] = (block.attn.qkv, "linear")
        out[f"b{i}_proj"] = (block.attn.proj, "linear")
        out[f"b{i}_fc1"] = (block.mlp[0], "linear")
        out[f"b{i}_fc2"] = (block.mlp[2], "linear")
        out[f"b{i}_norm1"] = (block.norm1, "norm")
        out[f"b{i}_norm2"] = (block.norm2, "norm")
    return out


# ---------------------------------------------------------------------- outputs


@dataclass
class IntParams:
    """Coding parameters in integer units, each (..., C, K) int64: mean in 1/MEAN_STEPS,
    scale level 0..SCALE_LEVELS-1, mixture logit in 1/LOGIT_STEPS."""

    mean_q: torch.Tensor
    level: torch.Tensor
    logit_q: torch.Tensor

    def index(self, idx) -> "IntParams":
        return IntParams(self.mean_q[idx], self.level[idx], self.logit_q[idx])

    def flat(self, valid: torch.Tensor) -> "IntParams":
        """Keep the tokens where `valid`, flattened to (n_symbols, K) in (token, channel) order."""
        K = self.mean_q.shape[-1]
        return IntParams(*(t[valid].reshape(-1, K) for t in (self.mean_q, self.level, self.logit_q)))


def head_to_int_params(out: torch.Tensor, C: int, K: int) -> IntParams:
    """Head output (B, T, 3*C*K) int64 in unit scale -> clamped IntParams (B, T, C, K)."""
    B, T, _ = out.shape
    out = out.view(B, T, C, 3, K)  # (B, T, C, 3, K)
    return IntParams(
        out[..., 0, :].clamp(-MEAN_MAX, MEAN_MAX),
        out[..., 1, :].clamp(0, SCALE_LEVELS - 1),
        out[..., 2, :].clamp(-LOGIT_MAX, LOGIT_MAX),
    )


@dataclass
class IntCache:
    """Keys and values of earlier slot groups, one entry per layer, int16 (B, h, T, dh)."""

    k: list = field(default_factory=list)
    v: list = field(default_factory=list)


@dataclass
class ExactDecodeState:
    step: int = 0
    cache: IntCache | None = None


# ---------------------------------------------------------------------- the model


class ExactEntropyModel(nn.Module):
    """Integer tensors and exponents of the exact entropy model (all buffers, no parameters).

    Built from a float `EntropyTransformer` by `export_from` (deterministic rounding with the
    stored exponents) after `calibrate`/`init_exponents` chose the exponents. Shares the
    schedule and slot layout of the float model it was built from.
    """

    def __init__(self, cfg: ModelConfig, layout):
        super().__init__()
        self.cfg = cfg
        self.layout = [layout]  # the float EntropyTransformer (not a submodule: no double state)
        D, C, K = cfg.d_model, cfg.C, cfg.n_mixtures
        dims = {"embed": (C, D), "head": (D, 3 * C * K)}
        for i in range(cfg.n_layers):
            dims.update({f"b{i}_qkv": (D, 3 * D), f"b{i}_proj": (D, D),
                         f"b{i}_fc1": (D, cfg.d_mlp), f"b{i}_fc2": (cfg.d_mlp, D)})
        self.linears = nn.ModuleDict({n: IntLinear(*dims[n]) for n in _linear_names(cfg)})
        self.norms = nn.ModuleDict({n: IntNorm(D) for n in _norm_names(cfg)})
        L = cfg.tokens_per_window
        self.register_buffer("mask_token", torch.zeros(C, dtype=torch.int64))  # at MASK_EXP
        # The embedding of a masked slot (a constant: embed(mask_token)), at the residual exponent.
        self.register_buffer("mask_embed", torch.zeros(D, dtype=torch.int64))
        self.register_buffer("pos_target", torch.zeros(L, D, dtype=torch.int64))
        self.register_buffer("pos_input", torch.zeros(L, D, dtype=torch.int64))
        self.register_buffer("act_exp", torch.zeros(len(_act_names(cfg)), dtype=torch.int64))
        self._act_index = {n: i for i, n in enumerate(_act_names(cfg))}
        self._tables: dict = {}

    # ------------------------------------------------------------ exponents

    def exp(self, name: str) -> int:
        return int(self.act_exp[self._act_index[name]])

    def in_out_exponents(self, name: str) -> tuple[int, torch.Tensor]:
        """(input exponent, per-output-row exponent) of linear layer `name`."""
        cfg, D = self.cfg, self.cfg.d_model
        if name == "embed":
            return INPUT_EXP, torch.full((D,), self.exp("residual"))
        if name == "head":
            return self.exp("norm"), torch.zeros(3 * cfg.C * cfg.n_mixtures, dtype=torch.int64)
        i, kind = name[1:].split("_")
        if kind == "qkv":
            e = [self.exp(f"b{i}_q"), self.exp(f"b{i}_k"), self.exp(f"b{i}_v")]
            return self.exp(f"b{i}_norm1"), torch.tensor(e).repeat_interleave(D)
        if kind == "proj":
            return self.exp(f"b{i}_v"), torch.full((D,), self.exp("residual"))
        if kind == "fc1":
            return self.exp(f"b{i}_norm2"), torch.full((cfg.d_mlp,), GELU_EXP)
        if kind == "fc2":
            return GELU_EXP, torch.full((D,), self.exp("residual"))
        raise ValueError(f"unknown layer {name!r}")

    def norm_exponents(self, name: str) -> tuple[int, int]:
        return ln_exponent(self.cfg.d_model), self.exp(name)

    def init_exponents(self, et, act_max: dict[str, float] | None = None) -> None:
        """Choose every exponent: weights per output row from their magnitude, activations
        from observed maxima `act_max` (calibration) or conservative defaults."""
        defaults = {"residual": 8.0 * 32}  # |r| up to 256 -> exponent 7
        e_ln = ln_exponent(self.cfg.d_model)
        act = {}
        for name in _act_names(self.cfg):
            observed = (act_max or {}).get(name)
            if observed is None:
                if name == "residual":
                    observed = defaults["residual"]
                elif name.endswith(("_q", "_k", "_v")):
                    observed = 64.0
                else:  # LayerNorm affine outputs: |gamma * n + beta|
                    observed = float(2 ** (15 - e_ln + 1))
            limit = RESIDUAL_MAX if name == "residual" else ACT_MAX
            act[name] = _exponent_for(limit, 1.25 * observed)
        self.act_exp.copy_(torch.tensor([act[n] for n in _act_names(self.cfg)], dtype=torch.int64))
        for name, (module, kind) in _float_modules(et).items():
            if kind == "linear":
                w, _ = _folded_linear(name, module, self.cfg)
                row_max = w.detach().abs().amax(dim=1).double()
                self.linears[name].w_exp.copy_(torch.tensor([_exponent_for(ACT_MAX, float(m)) for m in row_max]))
                e_in, e_out = self.in_out_exponents(name)
                self.linears[name].shift.copy_(e_in + self.linears[name].w_exp - e_out)
            else:
                g_exp = _exponent_for(ACT_MAX, float(module.weight.detach().abs().max()))
                e_n, e_out = self.norm_exponents(name)
                self.norms[name].g_exp.fill_(g_exp)
                self.norms[name].shift.fill_(e_n + g_exp - e_out)

    # ------------------------------------------------------------ float -> integers

    @torch.no_grad()
    def export_from(self, et) -> None:
        """Round the float model's weights onto the stored exponents (elementwise, exact
        operations only: the same integers on every machine)."""
        for name, (module, kind) in _float_modules(et).items():
            if kind == "linear":
                w, b = _folded_linear(name, module, self.cfg)
                lin = self.linears[name]
                e_in, _ = self.in_out_exponents(name)
                lin.weight.copy_(_quantize(w, lin.w_exp[:, None]).to(torch.int16))
                lin.bias.copy_(_quantize(b, e_in + lin.w_exp, limit=1 << 50))
            else:
                nrm = self.norms[name]
                e_n, _ = self.norm_exponents(name)
                nrm.gamma.copy_(_quantize(module.weight.double(), int(nrm.g_exp)).to(torch.int16))
                nrm.beta.copy_(_quantize(module.bias.double(), e_n + int(nrm.g_exp), limit=1 << 50))
        e_r = self.exp("residual")
        self.pos_target.copy_(_quantize(et.pos_target.double(), e_r, limit=RESIDUAL_MAX))
        self.pos_input.copy_(_quantize(et.pos_input.double(), e_r, limit=RESIDUAL_MAX))
        self.mask_token.copy_(_quantize(et.mask_token.double(), MASK_EXP, limit=1 << 50))
        # embed(mask) from the integer weights (a product computed once, here, and stored:
        # the decoder never recomputes it).
        lin = self.linears["embed"]
        w = lin.weight.double() * torch.pow(2.0, -lin.w_exp.double())[:, None]
        b = lin.bias.double() * torch.pow(2.0, -(INPUT_EXP + lin.w_exp).double())
        mask = self.mask_token.double() * 2.0 ** -MASK_EXP * TOKEN_INPUT_SCALE
        self.mask_embed.copy_(_quantize(w @ mask + b, e_r, limit=RESIDUAL_MAX))

    @torch.no_grad()
    def load_into(self, et) -> None:
        """The inverse of export_from: set the float model's weights to the integer grid
        values, so a float model rebuilt from a checkpoint trains on from exactly here."""
        for name, (module, kind) in _float_modules(et).items():
            if kind == "linear":
                lin = self.linears[name]
                e_in, _ = self.in_out_exponents(name)
                w = lin.weight.double() * torch.pow(2.0, -lin.w_exp.double())[:, None]
                b = lin.bias.double() * torch.pow(2.0, -(e_in + lin.w_exp).double())
                w, b = _unfold_linear(name, w, b, self.cfg)
                module.weight.copy_(w.to(module.weight.dtype))
                module.bias.copy_(b.to(module.bias.dtype))
            else:
                nrm = self.norms[name]
                e_n, _ = self.norm_exponents(name)
                module.weight.copy_((nrm.gamma.double() * 2.0 ** -int(nrm.g_exp)).to(module.weight.dtype))
                module.bias.copy_((nrm.beta.double() * 2.0 ** -(e_n + int(nrm.g_exp))).to(module.bias.dtype))
        e_r = self.exp("residual")
        et.pos_target.copy_(self.pos_target.double() * 2.0 ** -e_r)
        et.pos_input.copy_(self.pos_input.double() * 2.0 ** -e_r)
        et.mask_token.copy_(self.mask_token.double() * 2.0 ** -MASK_EXP)

    @torch.no_grad()
    def calibrate(self, et, tokens: torch.Tensor, masked: torch.Tensor | None = None) -> dict[str, float]:
        """Choose activation exponents from the float model's maxima on `tokens` (B, L, C)
        (the training distribution, never the evaluation set), then export."""
        self.init_exponents(et)  # weights' exponents; activations get replaced below
        observed: dict[str, float] = {}
        ops = FloatOps(self, et, quant=False, observe=observed)
        if self.cfg.mode == "m2t":
            m2t_teacher_forced(ops, tokens)
        else:
            if masked is None:
                masked = torch.rand(tokens.shape[:2], generator=torch.Generator().manual_seed(0)) < 0.5
            mt_forward(ops, tokens, masked)
        self.init_exponents(et, observed)
        self.export_from(et)
        return observed

    # ------------------------------------------------------------ checks

    def exactness_margin_bits(self) -> float:
        """log2(2^53 / the largest possible |partial sum| of any float64 product), from the
        integer weights and the activation bounds. Positive means provably exact."""
        worst = 0
        for lin in self.linears.values():
            row_abs = lin.weight.abs().to(torch.int64).sum(dim=1)  # sum_i |w_ji|
            worst = max(worst, int(row_abs.max()) * ACT_MAX)
        d_head = self.cfg.d_model // self.cfg.n_heads
        worst = max(worst, d_head * ACT_MAX * ACT_MAX)  # q . k
        slots = max(self.layout[0].num_slots, self.cfg.tokens_per_window)
        worst = max(worst, slots * (1 << PROB_EXP) * ACT_MAX)  # sum_j e_j v_j
        return EXACT_FLOAT64_BITS - math.log2(worst)

    def tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._tables:
            self._tables[device] = {
                "exp": torch.from_numpy(intmath.exp_table()).to(device),
                "gelu": torch.from_numpy(intmath.gelu_table()).to(device),
            }
        return self._tables[device]


def _exponent_for(limit: int, magnitude: float) -> int:
    """The largest e in [0, 30] with magnitude * 2^e <= limit."""
    if not magnitude > 0 or not math.isfinite(magnitude):
        return 30
    return int(max(0, min(30, math.floor(math.log2(limit / magnitude)))))


def _quantize(x: torch.Tensor, exponent, limit: int = ACT_MAX) -> torch.Tensor:
    """clamp(round(x * 2^exponent)) as int64: scaling by a power of two and rounding are exact."""
    scale = torch.pow(torch.tensor(2.0, dtype=torch.float64), torch.as_tensor(exponent, dtype=torch.float64))
    return torch.round(x.double() * scale).clamp(-limit, limit).to(torch.int64)


def _head_row_affine(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row of the head: (scale, offset) taking natural units to integer units:
    mean * 64, (log_scale - LOG_SCALE_MIN) / STEP, logit * 8."""
    K = cfg.n_mixtures
    scale = torch.tensor([float(MEAN_STEPS)] * K + [1.0 / LOG_SCALE_STEP] * K + [float(LOGIT_STEPS)] * K,
                         dtype=torch.float64, device=device)
    offset = torch.tensor([0.0] * K + [-LOG_SCALE_MIN / LOG_SCALE_STEP] * K + [0.0] * K,
                          dtype=torch.float64, device=device)
    return scale.repeat(cfg.C), offset.repeat(cfg.C)  # rows ordered (C, 3, K)


def _folded_linear(name: str, module: nn.Linear, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The float weights the integer layer represents, with its fixed scalings folded in
    (elementwise float64 products: identical on every machine)."""
    w, b = module.weight.double(), module.bias.double()
    if name == "embed":
        return w / TOKEN_INPUT_SCALE, b
    if name == "head":
        scale, offset = _head_row_affine(cfg, w.device)
        return w * scale[:, None], b * scale + offset
    return w, b


def _unfold_linear(name: str, w: torch.Tensor, b: torch.Tensor, cfg: ModelConfig):
    if name == "embed":
        return w * TOKEN_INPUT_SCALE, b
    if name == "head":
        scale, offset = _head_row_affine(cfg, w.device)
        return w / scale[:, None], (b - offset) / scale
    return w, b


# ---------------------------------------------------------------------- arithmetic backends


class IntOps:
    """Exact integer arithmetic (int64 tensors; float64 only for exact matrix products)."""

    exact = True

    def __init__(self, model: ExactEntropyModel):
        self.m = model

    def linear(self, name: str, x: torch.Tensor, limit: int | None = ACT_MAX) -> torch.Tensor:
        lin = self.m.linears[name]
        acc = torch.matmul(x.to(torch.float64), lin.weight_f64()).to(torch.int64) + lin.bias  # exact
        out = intmath.round_shift(acc, lin.shift)
        return out if limit is None else out.clamp(-limit, limit)

    def embed(self, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        u = tokens.to(torch.int64).clamp(-TOKEN_CLAMP, TOKEN_CLAMP) << INPUT_EXP
        return torch.where(masked[..., None], self.m.mask_embed, self.linear("embed", u, RESIDUAL_MAX))

    def pos(self, which: str, idx: torch.Tensor) -> torch.Tensor:
        table = self.m.pos_target if which == "target" else self.m.pos_input
        return torch.where((idx >= 0)[:, None], table[idx.clamp(min=0)], 0)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a + b).clamp(-RESIDUAL_MAX, RESIDUAL_MAX)

    def layer_norm(self, name: str, r: torch.Tensor) -> torch.Tensor:
        D = r.shape[-1]
        e_r = self.m.exp("residual")
        e_n, _ = self.m.norm_exponents(name)
        mu = intmath.round_div(r.sum(-1, keepdim=True), torch.tensor(D, device=r.device))
        d = r - mu  # |d| < 2^18
        q = (d * d).sum(-1, keepdim=True)  # < D * 2^36
        var = torch.div(q << (2 * LN_EXTRA_BITS), D, rounding_mode="floor") + _ln_eps_int(e_r)
        sigma = intmath.isqrt(var)  # std in units of 2^-(e_r + LN_EXTRA_BITS), >= 1
        n = intmath.round_div(d << (e_n + LN_EXTRA_BITS), sigma).clamp(-ACT_MAX, ACT_MAX)
        nrm = self.m.norms[name]
        out = intmath.round_shift(n * nrm.gamma.to(torch.int64) + nrm.beta, int(nrm.shift))
        return out.clamp(-ACT_MAX, ACT_MAX)

    def attention(self, layer: int, q, k, v, valid: torch.Tensor | None) -> torch.Tensor:
        d_head = q.shape[-1]
        e_q, e_k = self.m.exp(f"b{layer}_q"), self.m.exp(f"b{layer}_k")
        raw = torch.matmul(q.to(torch.float64), k.to(torch.float64).transpose(-1, -2)).to(torch.int64)  # exact
        scores = intmath.round_shift(raw * _attn_multiplier(d_head), e_q + e_k + ATTN_SCALE_BITS - SCORE_EXP)
        if valid is not None:
            scores = scores.masked_fill(~valid, -(1 << 40))
        gap = (scores.amax(dim=-1, keepdim=True) - scores).clamp(max=intmath.EXP_SIZE - 1)
        e = self.m.tables(q.device)["exp"][gap]  # (B, h, T, Tk), <= 2^15
        if valid is not None:
            e = e.masked_fill(~valid, 0)
        num = torch.matmul(e.to(torch.float64), v.to(torch.float64)).to(torch.int64)  # exact
        return intmath.round_div(num, e.sum(-1, keepdim=True))  # exponent of v

    def gelu(self, g: torch.Tensor) -> torch.Tensor:
        table = self.m.tables(g.device)["gelu"]
        inside = table[(g + intmath.GELU_HALF).clamp(0, 2 * intmath.GELU_HALF)]
        return torch.where(g > intmath.GELU_HALF, g, torch.where(g < -intmath.GELU_HALF, 0, inside))

    def head(self, x: torch.Tensor) -> IntParams:
        cfg = self.m.cfg
        return head_to_int_params(self.linear("head", x, limit=None), cfg.C, cfg.n_mixtures)

    def cache_store(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.int16)

    def cache_load(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.int64)


def _fq(x: torch.Tensor, exponent: int, limit: int, quant: bool) -> torch.Tensor:
    """Fake quantisation: round to the grid 2^-exponent and clamp, straight-through."""
    if not quant:
        return x
    scale = float(2 ** exponent)
    q = torch.round(x * scale).clamp(-limit, limit) / scale
    return x + (q - x).detach()


class FloatOps:
    """The same computation in float32, for training and calibration. With quant=True every
    weight and activation is rounded where the integer path rounds (straight-through
    gradients), so quantisation-aware training sees the integer model's numbers."""

    exact = False

    def __init__(self, model: ExactEntropyModel, et, quant: bool = True, observe: dict | None = None):
        self.m, self.et, self.quant, self.observe = model, et, quant, observe
        self.modules = _float_modules(et)

    def _watch(self, name: str, x: torch.Tensor) -> None:
        if self.observe is not None:
            self.observe[name] = max(self.observe.get(name, 0.0), float(x.detach().abs().max()))

    def _weights(self, name: str):
        module, _ = self.modules[name]
        w, b = _folded_linear_float(name, module, self.m.cfg)
        if self.quant:
            lin = self.m.linears[name]
            e_in, _ = self.m.in_out_exponents(name)
            w_scale = torch.pow(2.0, lin.w_exp.to(w.device, torch.float32))[:, None]
            b_scale = torch.pow(2.0, (e_in + lin.w_exp).to(w.device, torch.float32))
            w = w + (torch.round(w * w_scale).clamp(-ACT_MAX, ACT_MAX) / w_scale - w).detach()
            b = b + (torch.round(b * b_scale) / b_scale - b).detach()
        return w, b

    def linear(self, name: str, x: torch.Tensor, limit: int | None = ACT_MAX) -> torch.Tensor:
        w, b = self._weights(name)
        out = F.linear(x, w, b)
        if name == "head":
            return _fq(out, 0, 1 << 30, self.quant)
        _, e_out = self.m.in_out_exponents(name)
        if name.endswith("_qkv"):
            D = self.m.cfg.d_model
            i = name[1:].split("_")[0]
            parts = []
            for j, kind in enumerate("qkv"):
                part = out[..., j * D:(j + 1) * D]
                self._watch(f"b{i}_{kind}", part)
                parts.append(_fq(part, int(e_out[j * D]), ACT_MAX, self.quant))
            return torch.cat(parts, dim=-1)
        return _fq(out, int(e_out[0]), limit or (1 << 30), self.quant)

    def embed(self, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        held = self.linear("embed", tokens.clamp(-TOKEN_CLAMP, TOKEN_CLAMP), RESIDUAL_MAX)
        mask = self.linear("embed", (self.et.mask_token * TOKEN_INPUT_SCALE).to(tokens.dtype), RESIDUAL_MAX)
        x = torch.where(masked[..., None], mask, held)
        self._watch("residual", x)
        return x

    def pos(self, which: str, idx: torch.Tensor) -> torch.Tensor:
        table = self.et.pos_target if which == "target" else self.et.pos_input
        table = _fq(table, self.m.exp("residual"), RESIDUAL_MAX, self.quant)
        return torch.where((idx >= 0)[:, None], table[idx.clamp(min=0)], 0.0)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = a + b
        self._watch("residual", out)
        if not self.quant:
            return out
        limit = RESIDUAL_MAX / 2 ** self.m.exp("residual")
        return out + (out.clamp(-limit, limit) - out).detach()

    def layer_norm(self, name: str, r: torch.Tensor) -> torch.Tensor:
        module, _ = self.modules[name]
        e_n, e_out = self.m.norm_exponents(name)
        n = F.layer_norm(r, r.shape[-1:], eps=module.eps)
        n = _fq(n, e_n, ACT_MAX, self.quant)
        gamma, beta = module.weight, module.bias
        if self.quant:
            g_exp = float(self.m.norms[name].g_exp)
            gq = torch.round(gamma * 2 ** g_exp).clamp(-ACT_MAX, ACT_MAX) / 2 ** g_exp
            bq = torch.round(beta * 2 ** (e_n + g_exp)) / 2 ** (e_n + g_exp)
            gamma, beta = gamma + (gq - gamma).detach(), beta + (bq - beta).detach()
        out = n * gamma + beta
        self._watch(name, out)
        return _fq(out, e_out, ACT_MAX, self.quant)

    def attention(self, layer: int, q, k, v, valid: torch.Tensor | None) -> torch.Tensor:
        d_head = q.shape[-1]
        if not self.quant:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=valid)
        mult = _attn_multiplier(d_head) / 2 ** ATTN_SCALE_BITS
        scores = _fq(torch.matmul(q, k.transpose(-1, -2)) * mult, SCORE_EXP, 1 << 30, True)
        if valid is not None:
            scores = scores.masked_fill(~valid, -1e9)
        gap = (scores.amax(dim=-1, keepdim=True).detach() - scores).clamp(max=intmath.EXP_SIZE / 2 ** SCORE_EXP)
        e = _fq(torch.exp(-gap), PROB_EXP, 1 << PROB_EXP, True)
        if valid is not None:
            e = e.masked_fill(~valid, 0.0)
        out = torch.matmul(e, v) / e.sum(-1, keepdim=True)
        return _fq(out, self.m.exp(f"b{layer}_v"), ACT_MAX, True)

    def gelu(self, g: torch.Tensor) -> torch.Tensor:
        return _fq(F.gelu(g), GELU_EXP, ACT_MAX, self.quant)

    def head(self, x: torch.Tensor):
        """Natural-unit mixture parameters (B, T, C, K) x3, as the integer path's units."""
        cfg = self.m.cfg
        out = self.linear("head", x)
        B, T, _ = out.shape
        out = out.view(B, T, cfg.C, 3, cfg.n_mixtures)  # (B, T, C, 3, K)
        means = out[..., 0, :] / MEAN_STEPS
        level = out[..., 1, :]
        if self.quant:
            level = level + (level.clamp(0, SCALE_LEVELS - 1) - level).detach()
        log_scales = LOG_SCALE_MIN + level * LOG_SCALE_STEP
        logits = out[..., 2, :] / LOGIT_STEPS
        return means, log_scales, logits

    def cache_store(self, t):
        return t

    def cache_load(self, t):
        return t


def _folded_linear_float(name: str, module: nn.Linear, cfg: ModelConfig):
    """_folded_linear in the module's dtype, differentiable (for FloatOps)."""
    w, b = module.weight, module.bias
    if name == "embed":
        return w / TOKEN_INPUT_SCALE, b
    if name == "head":
        scale, offset = _head_row_affine(cfg, w.device)
        return w * scale.to(w.dtype)[:, None], b * scale.to(b.dtype) + offset.to(b.dtype)
    return w, b


# ---------------------------------------------------------------------- the network, once


def _split_heads(qkv: torch.Tensor, n_heads: int):
    B, T, D3 = qkv.shape
    D = D3 // 3
    t = qkv.view(B, T, 3, n_heads, D // n_heads).permute(2, 0, 3, 1, 4)  # (3, B, h, T, dh)
    return t[0], t[1], t[2]


def _blocks(ops, x: torch.Tensor, valid: torch.Tensor | None, cache: IntCache | None, n_layers: int, n_heads: int):
    for i in range(n_layers):
        a = ops.layer_norm(f"b{i}_norm1", x)
        q, k, v = _split_heads(ops.linear(f"b{i}_qkv", a), n_heads)  # (B, h, T, dh) each
        if cache is not None:
            if len(cache.k) <= i:
                cache.k.append(ops.cache_store(k))
                cache.v.append(ops.cache_store(v))
            else:
                cache.k[i] = torch.cat([cache.k[i], ops.cache_store(k)], dim=2)
                cache.v[i] = torch.cat([cache.v[i], ops.cache_store(v)], dim=2)
            k, v = ops.cache_load(cache.k[i]), ops.cache_load(cache.v[i])
        o = ops.attention(i, q, k, v, valid)  # (B, h, T, dh)
        B, h, T, dh = o.shape
        o = o.transpose(1, 2).reshape(B, T, h * dh)  # (B, T, D)
        x = ops.add(x, ops.linear(f"b{i}_proj", o))
        a = ops.layer_norm(f"b{i}_norm2", x)
        x = ops.add(x, ops.linear(f"b{i}_fc2", ops.gelu(ops.linear(f"b{i}_fc1", a))))
    return x


def _m2t_slot_inputs(ops, layout, tokens: torch.Tensor, slots: slice) -> torch.Tensor:
    """Embedded inputs of slots[slots] for windows `tokens` (B, L, C) -> (B, T_s, D)."""
    input_pos = layout.slot_input_pos[slots].to(tokens.device)
    target_pos = layout.slot_target_pos[slots].to(tokens.device)
    held = tokens[:, input_pos.clamp(min=0)]  # (B, T_s, C)
    masked = (input_pos < 0)[None, :].expand(tokens.shape[0], -1)
    x = ops.embed(held, masked)
    x = ops.add(x, ops.pos("input", input_pos))
    return ops.add(x, ops.pos("target", target_pos))


def _run(ops, x, valid, cache=None):
    cfg = ops.m.cfg
    h = _blocks(ops, x, valid, cache, cfg.n_layers, cfg.n_heads)
    return ops.head(ops.layer_norm("norm", h))


def m2t_teacher_forced(ops, tokens: torch.Tensor):
    """One pass over all slots: tokens (B, L, C) -> parameters of every position (B, L, C, K)
    (IntParams with IntOps, (means, log_scales, logits) with FloatOps), in position order."""
    layout = ops.m.layout[0]
    x = _m2t_slot_inputs(ops, layout, tokens, slice(None))  # (B, T, D)
    valid = layout.slot_attn_mask.to(tokens.device)  # (T, T)
    h = _blocks(ops, x, valid, None, ops.m.cfg.n_layers, ops.m.cfg.n_heads)
    h = h[:, layout.predicting_slot.to(tokens.device)]  # (B, L, D), position order
    return ops.head(ops.layer_norm("norm", h))


def m2t_step(ops, tokens: torch.Tensor, state: ExactDecodeState, use_cache: bool = True) -> IntParams:
    """Parameters of group `state.step` (B, n_i, C, K), in group order. `tokens` (B, L, C)
    holds the true values of all earlier groups."""
    layout = ops.m.layout[0]
    i = state.step
    n_i = layout.sched.sizes[i]
    if use_cache:
        if state.cache is None:
            state.cache = IntCache()
        x = _m2t_slot_inputs(ops, layout, tokens, slice(layout.slot_starts[i], layout.slot_starts[i + 1]))
        out = _run(ops, x, None, state.cache)  # a slot group sees the cache and itself: no mask
    else:
        end = layout.slot_starts[i + 1]
        x = _m2t_slot_inputs(ops, layout, tokens, slice(0, end))
        out = _run(ops, x, layout.slot_attn_mask[:end, :end].to(tokens.device))
        out = out.index((slice(None), slice(layout.slot_starts[i], None)))
    state.step += 1
    return out.index((slice(None), slice(0, n_i)))


def mt_forward(ops, tokens: torch.Tensor, masked: torch.Tensor):
    """One full MT pass: tokens (B, L, C), masked (B, L) bool -> parameters (B, L, C, K)."""
    x = ops.embed(tokens, masked)
    x = ops.add(x, ops.pos("target", torch.arange(tokens.shape[1], device=tokens.device)))
    return _run(ops, x, None)


def mt_step(ops, tokens: torch.Tensor, state: ExactDecodeState) -> IntParams:
    layout = ops.m.layout[0]
    i = state.step
    masked = (layout.position_step.to(tokens.device) >= i)[None, :].expand(tokens.shape[0], -1)
    group = torch.as_tensor(layout.sched.groups[i], device=tokens.device)
    state.step += 1
    return mt_forward(ops, tokens, masked).index((slice(None), group))


def step(ops, tokens: torch.Tensor, state: ExactDecodeState, use_cache: bool = True) -> IntParams:
    mode = ops.m.cfg.mode
    if mode == "m2t":
        return m2t_step(ops, tokens, state, use_cache)
    if mode == "mt":
        return mt_step(ops, tokens, state)
    raise ValueError(f"unknown mode {mode!r}")


# ---------------------------------------------------------------------- the fast carrier


def _floor_div_f64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """floor(a / b) for integer-valued float64 tensors (b > 0, |a| < 2^52), exactly: the
    float quotient can be off by one where it rounds across an integer; two integer-valued
    comparisons (exact below 2^53) correct it."""
    q = torch.floor(a / b)
    q = q - (q * b > a).to(q.dtype)
    return q + ((q + 1) * b <= a).to(q.dtype)


class Float64Ops(IntOps):
    """IntOps with the integers carried in float64 tensors instead of int64: the same
    integers (every value and intermediate is an integer below 2^53, where float64 addition,
    multiplication by an integer or a power of two, and floor are exact), without converting
    between int64 and float64 around every product. `tests/test_exact.py` checks it against
    the int64 reference (IntOps) bit for bit."""

    def __init__(self, model: ExactEntropyModel):
        super().__init__(model)
        self._req: dict[str, tuple] = {}

    def _requant(self, name: str, device):
        key = (name, device)
        if key not in self._req:
            lin = self.m.linears[name]
            shift = lin.shift.to(device)
            half = torch.where(shift > 0, torch.pow(2.0, (shift - 1).clamp(min=0).double()), 0.0)
            self._req[key] = (lin.bias.to(device, torch.float64) + half,  # bias + rounding half
                              torch.pow(2.0, -shift.double()))  # exact powers of two
        return self._req[key]

    def linear(self, name: str, x: torch.Tensor, limit: int | None = ACT_MAX) -> torch.Tensor:
        bias_half, scale = self._requant(name, x.device)
        acc = torch.matmul(x, self.m.linears[name].weight_f64())  # exact: integers below 2^53
        out = torch.floor((acc + bias_half) * scale)
        return out if limit is None else out.clamp(-limit, limit)

    def embed(self, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        u = tokens.to(torch.float64).clamp(-TOKEN_CLAMP, TOKEN_CLAMP) * (1 << INPUT_EXP)
        return torch.where(masked[..., None], self.m.mask_embed.to(torch.float64),
                           self.linear("embed", u, RESIDUAL_MAX))

    def pos(self, which: str, idx: torch.Tensor) -> torch.Tensor:
        return super().pos(which, idx).to(torch.float64)

    def layer_norm(self, name: str, r: torch.Tensor) -> torch.Tensor:
        return super().layer_norm(name, r.to(torch.int64)).to(torch.float64)

    def attention(self, layer: int, q, k, v, valid: torch.Tensor | None) -> torch.Tensor:
        d_head = q.shape[-1]
        e_q, e_k = self.m.exp(f"b{layer}_q"), self.m.exp(f"b{layer}_k")
        shift = e_q + e_k + ATTN_SCALE_BITS - SCORE_EXP
        raw = torch.matmul(q, k.transpose(-1, -2))  # exact, < 2^36
        scores = torch.floor((raw * _attn_multiplier(d_head) + 2.0 ** (shift - 1)) * 2.0 ** -shift)
        if valid is not None:
            scores = scores.masked_fill(~valid, -2.0 ** 40)
        gap = (scores.amax(dim=-1, keepdim=True) - scores).clamp(max=intmath.EXP_SIZE - 1)
        e = self._table("exp", q.device)[gap.to(torch.int64)]  # (B, h, T, Tk), <= 2^15
        if valid is not None:
            e = e.masked_fill(~valid, 0.0)
        num = torch.matmul(e, v)  # exact, < 2^40
        den = e.sum(-1, keepdim=True)
        return _floor_div_f64(2 * num + den, 2 * den)  # round(num / den), halves up

    def gelu(self, g: torch.Tensor) -> torch.Tensor:
        inside = self._table("gelu", g.device)[(g + intmath.GELU_HALF).clamp(0, 2 * intmath.GELU_HALF).to(torch.int64)]
        return torch.where(g > intmath.GELU_HALF, g, torch.where(g < -intmath.GELU_HALF, 0.0, inside))

    def _table(self, name: str, device) -> torch.Tensor:
        key = (name, device)
        if key not in self._req:
            self._req[key] = self.m.tables(device)[name].to(torch.float64)
        return self._req[key]

    def head(self, x: torch.Tensor) -> IntParams:
        cfg = self.m.cfg
        return head_to_int_params(self.linear("head", x, limit=None).to(torch.int64), cfg.C, cfg.n_mixtures)

    def cache_store(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.int16)

    def cache_load(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64)


# The arithmetic the codec codes with; IntOps (int64 carriers) is the reference it is tested
# against bit for bit (tests/test_exact.py).
CodingOps = Float64Ops
