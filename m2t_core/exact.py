"""The exact entropy model: the network of network.py in integer arithmetic.

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
  2^53 (checked by `exactness_margin_bits`, about 15 bits of margin for every shipped model):
  then float64 arithmetic is exact, and the result is the same in any order, blocking,
  thread count or device;
* rescaling is an integer multiply and a rounding right shift (int64); LayerNorm uses an
  exact integer square root; softmax and GELU are lookups in fixed tables computed with
  integer-only code (intmath.py); the output head gives the coding parameters directly
  in their integer units (mean in 1/64, scale level 0..63, logit in 1/8).

The layers are network.layer_spec's; the forward pass is network.py's, run with `IntOps`
(int64 carriers, the reference) or `Float64Ops` (the same integers in float64 carriers:
what codes). Training runs the same network with network.FloatOps(quant=True), rounded
where this arithmetic rounds.

Invariant (tests/test_exact.py): for the same weights, exponents and tokens, the integer
outputs do not depend on batch size, window batching, teacher-forced vs incremental M2T
(with or without the cache), thread count or device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from . import cpu_kernels, int8_linear, intmath
from . import network as N
from . import rate as R
from .config import ModelConfig
from .entropy_coding import MAX_ABS_SYMBOL, MEAN_STEPS, SCALE_LEVELS, LOGIT_STEPS
from .network import ACT_MAX, INPUT_EXP, RESIDUAL_MAX, TOKEN_CLAMP, TOKEN_INPUT_SCALE

MASK_EXP = 24  # the learned mask token, kept at 2^-24 (only to rebuild the float parameters)
LN_EXTRA_BITS = 8  # LayerNorm's standard deviation is computed with 8 extra bits
LN_EPS = Fraction(1, 100_000)  # nn.LayerNorm's default eps
LOGIT_MAX = 4096 * LOGIT_STEPS
MEAN_MAX = MAX_ABS_SYMBOL * MEAN_STEPS
EXACT_FLOAT64_BITS = 53
# Exponents that are constants of the design, not calibrated (network.Layer.act_in/act_out).
FIXED_EXPONENTS = {"input": INPUT_EXP, "gelu": N.GELU_EXP, "unit": 0}


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
        self._int8: tuple | None = None

    def __getstate__(self):
        """Copies and pickles leave the int8 route behind (oneDNN's packed weights cannot be
        copied); it is rebuilt on first use."""
        state = dict(self.__dict__)
        state["_int8"] = None
        return state

    def _cached(self, slot: str, tensors: tuple, make):
        """make(), kept in attribute `slot` until one of `tensors` changes (storage or version
        counter). Inference tensors (a model made under inference_mode) keep no version
        counter: never cached, so an in-place export is always seen."""
        key = None if self.weight.is_inference() else tuple((t.data_ptr(), t._version, t.device) for t in tensors)
        hit = getattr(self, slot)
        if hit is None or key is None or hit[0] != key:
            hit = (key, make())
            setattr(self, slot, hit)
        return hit[1]

    def weight_f64(self) -> torch.Tensor:
        return self._cached("_f64", (self.weight,), lambda: self.weight.to(torch.float64).t().contiguous())  # (in, out)

    def int8(self) -> "int8_linear.PackedLinear | None":
        """This linear on the CPU's int8 units (int8_linear.py), or None where that route is
        off or not exact here; cached like weight_f64."""
        if not int8_linear.enabled():
            return None
        return self._cached("_int8", (self.weight, self.bias, self.shift),
                            lambda: int8_linear.prepare(self.weight, self.bias, self.shift))


class IntNorm(nn.Module):
    """LayerNorm's affine part: round((n * gamma + beta) / 2^shift), gamma int16 at g_exp."""

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("gamma", torch.zeros(d, dtype=torch.int16))
        self.register_buffer("beta", torch.zeros(d, dtype=torch.int64))
        self.register_buffer("g_exp", torch.zeros((), dtype=torch.int64))
        self.register_buffer("shift", torch.zeros((), dtype=torch.int64))


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


def head_to_int_params(out: torch.Tensor, C: int, K: int, rate=None) -> IntParams:
    """Head output (B, T, 3*C*K) int64 in unit scale -> clamped IntParams (B, T, C, K); a
    variable-rate model's means and levels scaled to its windows' gains (rate.ExactRate)."""
    B, T, _ = out.shape
    out = out.view(B, T, C, 3, K)  # (B, T, C, 3, K)
    if rate is not None:
        mean, level = rate.scale_params(out[..., 0, :], out[..., 1, :], MEAN_MAX, SCALE_LEVELS)
        return IntParams(mean, level, out[..., 2, :].clamp(-LOGIT_MAX, LOGIT_MAX))
    return IntParams(
        out[..., 0, :].clamp(-MEAN_MAX, MEAN_MAX),
        out[..., 1, :].clamp(0, SCALE_LEVELS - 1),
        out[..., 2, :].clamp(-LOGIT_MAX, LOGIT_MAX),
    )


# ---------------------------------------------------------------------- the model


class ExactEntropyModel(nn.Module):
    """Integer tensors and exponents of the exact entropy model (all buffers, no parameters),
    one IntLinear / IntNorm per layer of network.layer_spec.

    Built from float `EntropyParameters` by `export_from` (deterministic rounding with the
    stored exponents) after `calibrate`/`init_exponents` chose the exponents; `load_into`
    is the inverse."""

    def __init__(self, cfg: ModelConfig, layout: N.SlotLayout):
        super().__init__()
        self.cfg = cfg
        self.layout = layout
        self.spec = {layer.name: layer for layer in N.layer_spec(cfg)}
        layers = self.spec.values()
        self.linears = nn.ModuleDict({x.name: IntLinear(x.d_in, x.d_out) for x in layers if x.kind == "linear"})
        self.norms = nn.ModuleDict({x.name: IntNorm(x.d_in) for x in layers if x.kind == "norm"})
        L, C, D = cfg.tokens_per_window, cfg.C, cfg.d_model
        self.register_buffer("mask_token", torch.zeros(C, dtype=torch.int64))  # at MASK_EXP
        # The embedding of a masked slot (a constant: embed(mask_token)), at the residual exponent.
        self.register_buffer("mask_embed", torch.zeros(D, dtype=torch.int64))
        self.register_buffer("pos_target", torch.zeros(L, D, dtype=torch.int64))
        self.register_buffer("pos_input", torch.zeros(L, D, dtype=torch.int64))
        if cfg.rate_lambdas:  # variable rate (rate.py): log2 gains in 1/256, rate embeddings at the residual exponent
            self.register_buffer("rate_log2_gain", torch.zeros(len(cfg.rate_lambdas), C, dtype=torch.int64))
            self.register_buffer("rate_embed", torch.zeros(len(cfg.rate_lambdas), D, dtype=torch.int64))
        names = N.calibrated_activations(cfg)
        self.register_buffer("act_exp", torch.zeros(len(names), dtype=torch.int64))
        self._act_index = {n: i for i, n in enumerate(names)}
        self._tables: dict = {}

    # ------------------------------------------------------------ exponents

    def exp(self, name: str) -> int:
        """The exponent of activation `name`: calibrated (act_exp) or a constant of the design."""
        if name in FIXED_EXPONENTS:
            return FIXED_EXPONENTS[name]
        if name == "layer_norm":
            return N.ln_exponent(self.cfg.d_model)
        return int(self.act_exp[self._act_index[name]])

    def in_out_exponents(self, name: str) -> tuple[int, torch.Tensor]:
        """(input exponent, per-output-row exponent) of linear layer `name`."""
        layer = self.spec[name]
        rows = layer.d_out // len(layer.act_out)
        return self.exp(layer.act_in), torch.tensor([self.exp(a) for a in layer.act_out]).repeat_interleave(rows)

    def init_exponents(self, params: N.EntropyParameters, act_max: dict[str, float] | None = None) -> None:
        """Choose every exponent: weights per output row from their magnitude, activations
        from observed maxima `act_max` (calibration) or conservative defaults."""
        e_ln = N.ln_exponent(self.cfg.d_model)
        act = {}
        for name in N.calibrated_activations(self.cfg):
            observed = (act_max or {}).get(name)
            if observed is None:
                if name == "residual":
                    observed = 8.0 * 32  # |r| up to 256 -> exponent 7
                elif name.endswith(("_q", "_k", "_v")):
                    observed = 64.0
                else:  # LayerNorm affine outputs: |gamma * n + beta|
                    observed = float(2 ** (15 - e_ln + 1))
            limit = RESIDUAL_MAX if name == "residual" else ACT_MAX
            act[name] = _exponent_for(limit, 1.25 * observed)
        self.act_exp.copy_(torch.tensor([act[n] for n in N.calibrated_activations(self.cfg)], dtype=torch.int64))
        for name, lin in self.linears.items():
            module = params.linears[name]
            w, _ = N.folded_linear(name, module.weight.detach().double(), module.bias.detach().double(), self.cfg)
            row_max = w.abs().amax(dim=1)
            lin.w_exp.copy_(torch.tensor([_exponent_for(ACT_MAX, float(m)) for m in row_max]))
            e_in, e_out = self.in_out_exponents(name)
            lin.shift.copy_(e_in + lin.w_exp - e_out)
        for name, nrm in self.norms.items():
            g_exp = _exponent_for(ACT_MAX, float(params.norms[name].weight.detach().abs().max()))
            nrm.g_exp.fill_(g_exp)
            nrm.shift.fill_(N.ln_exponent(self.cfg.d_model) + g_exp - self.exp(name))

    # ------------------------------------------------------------ float <-> integers

    @torch.no_grad()
    def export_from(self, params: N.EntropyParameters) -> None:
        """Round the float parameters onto the stored exponents (elementwise, exact
        operations only: the same integers on every machine)."""
        e_ln = N.ln_exponent(self.cfg.d_model)
        for name, lin in self.linears.items():
            module = params.linears[name]
            w, b = N.folded_linear(name, module.weight.double(), module.bias.double(), self.cfg)
            e_in, _ = self.in_out_exponents(name)
            lin.weight.copy_(_quantize(w, lin.w_exp[:, None]).to(torch.int16))
            lin.bias.copy_(_quantize(b, e_in + lin.w_exp, limit=1 << 50))
        for name, nrm in self.norms.items():
            module = params.norms[name]
            nrm.gamma.copy_(_quantize(module.weight.double(), int(nrm.g_exp)).to(torch.int16))
            nrm.beta.copy_(_quantize(module.bias.double(), e_ln + int(nrm.g_exp), limit=1 << 50))
        e_r = self.exp("residual")
        self.pos_target.copy_(_quantize(params.pos_target.double(), e_r, limit=RESIDUAL_MAX))
        self.pos_input.copy_(_quantize(params.pos_input.double(), e_r, limit=RESIDUAL_MAX))
        self.mask_token.copy_(_quantize(params.mask_token.double(), MASK_EXP, limit=1 << 50))
        if self.cfg.rate_lambdas:
            self.rate_log2_gain.copy_(_quantize(params.log2_gain.double(), R.LOG2_FRAC_BITS, limit=R.LOG2_LIMIT))
            self.rate_embed.copy_(_quantize(params.rate_embed.double(), e_r, limit=RESIDUAL_MAX))
        # embed(mask) from the integer weights (a product computed once, here, and stored:
        # the decoder never recomputes it).
        lin = self.linears["embed"]
        w = lin.weight.double() * torch.pow(2.0, -lin.w_exp.double())[:, None]
        b = lin.bias.double() * torch.pow(2.0, -(INPUT_EXP + lin.w_exp).double())
        mask = self.mask_token.double() * 2.0 ** -MASK_EXP * TOKEN_INPUT_SCALE
        self.mask_embed.copy_(_quantize(w @ mask + b, e_r, limit=RESIDUAL_MAX))

    @torch.no_grad()
    def load_into(self, params: N.EntropyParameters) -> None:
        """The inverse of export_from: set the float parameters to the integer grid values,
        so float parameters rebuilt from a checkpoint train on from exactly here."""
        e_ln = N.ln_exponent(self.cfg.d_model)
        for name, lin in self.linears.items():
            module = params.linears[name]
            e_in, _ = self.in_out_exponents(name)
            w = lin.weight.double() * torch.pow(2.0, -lin.w_exp.double())[:, None]
            b = lin.bias.double() * torch.pow(2.0, -(e_in + lin.w_exp).double())
            w, b = _unfold_linear(name, w, b, self.cfg)
            module.weight.copy_(w.to(module.weight.dtype))
            module.bias.copy_(b.to(module.bias.dtype))
        for name, nrm in self.norms.items():
            module = params.norms[name]
            module.weight.copy_((nrm.gamma.double() * 2.0 ** -int(nrm.g_exp)).to(module.weight.dtype))
            module.bias.copy_((nrm.beta.double() * 2.0 ** -(e_ln + int(nrm.g_exp))).to(module.bias.dtype))
        e_r = self.exp("residual")
        params.pos_target.copy_(self.pos_target.double() * 2.0 ** -e_r)
        params.pos_input.copy_(self.pos_input.double() * 2.0 ** -e_r)
        params.mask_token.copy_(self.mask_token.double() * 2.0 ** -MASK_EXP)
        if self.cfg.rate_lambdas:
            params.log2_gain.copy_(self.rate_log2_gain.double() * 2.0 ** -R.LOG2_FRAC_BITS)
            params.rate_embed.copy_(self.rate_embed.double() * 2.0 ** -e_r)

    @torch.no_grad()
    def calibrate(self, params: N.EntropyParameters, tokens: torch.Tensor,
                  masked: torch.Tensor | None = None, rate=None) -> dict[str, float]:
        """Choose activation exponents from the float network's maxima on `tokens` (B, L, C)
        (the training distribution, never the evaluation set; a variable-rate model's with
        their windows' rate.FloatRate), then export."""
        self.init_exponents(params)  # weights' exponents; activations get replaced below
        observed: dict[str, float] = {}
        ops = N.FloatOps(params, self.cfg, self.layout, observe=observed, rate=rate)
        if self.cfg.mode == "m2t":
            N.m2t_teacher_forced(ops, tokens)
        else:
            if masked is None:
                masked = torch.rand(tokens.shape[:2], generator=torch.Generator().manual_seed(0)) < 0.5
            N.mt_forward(ops, tokens, masked)
        self.init_exponents(params, observed)
        self.export_from(params)
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
        slots = max(self.layout.num_slots, self.cfg.tokens_per_window)
        worst = max(worst, slots * (1 << N.PROB_EXP) * ACT_MAX)  # sum_j e_j v_j
        return EXACT_FLOAT64_BITS - math.log2(worst)

    def tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._tables:
            self._tables[device] = {
                "exp": torch.from_numpy(intmath.exp_table()).to(device),
                "gelu": torch.from_numpy(intmath.gelu_table()).to(device),
            }
        return self._tables[device]


WEIGHT8_MAX = 127  # format 7's entropy model: weights within +-127, one int8 plane (int8_linear)


def eight_bit_weights(model: ExactEntropyModel) -> ExactEntropyModel:
    """Format 7's entropy model: a copy of `model` whose linears' weights lie within
    +-WEIGHT8_MAX. Each row w becomes floor((w + 2^(k-1)) / 2^k) at the smallest k where that
    fits; its bias (at the accumulator's exponent, in_exp + w_exp) is rounded alike, and its
    w_exp and shift drop by k, so the row's output exponent stays. Everything else is the same
    integers. Integer steps only: the same copy on every machine. Without retraining this
    costs about 0.03 % of the bits on Kodak (bench/entropy_int8_study.py)."""
    device = model.act_exp.device
    copy = ExactEntropyModel(model.cfg, model.layout)
    copy.load_state_dict(model.state_dict())
    copy = copy.to(device)
    with torch.no_grad():
        for lin in copy.linears.values():
            w = lin.weight.to(torch.int64)  # (out, in)
            k = torch.zeros(w.shape[0], dtype=torch.int64, device=device)
            for _ in range(16):  # int16 rows need k <= 9
                half = torch.where(k > 0, torch.ones_like(k) << (k - 1).clamp(min=0), 0)
                w8 = (w + half[:, None]) >> k[:, None]  # arithmetic shifts: floor
                over = w8.abs().amax(dim=1) > WEIGHT8_MAX
                if not bool(over.any()):
                    break
                k += over.to(torch.int64)
            lin.weight.copy_(w8.to(torch.int16))
            lin.bias.copy_((lin.bias + half) >> k)
            lin.w_exp.sub_(k)
            lin.shift.sub_(k)
    return copy


def _exponent_for(limit: int, magnitude: float) -> int:
    """The largest e in [0, 30] with magnitude * 2^e <= limit."""
    if not magnitude > 0 or not math.isfinite(magnitude):
        return 30
    return int(max(0, min(30, math.floor(math.log2(limit / magnitude)))))


def _quantize(x: torch.Tensor, exponent, limit: int = ACT_MAX) -> torch.Tensor:
    """clamp(round(x * 2^exponent)) as int64: scaling by a power of two and rounding are exact."""
    scale = torch.pow(torch.tensor(2.0, dtype=torch.float64), torch.as_tensor(exponent, dtype=torch.float64))
    return torch.round(x.double() * scale).clamp(-limit, limit).to(torch.int64)


def _unfold_linear(name: str, w: torch.Tensor, b: torch.Tensor, cfg: ModelConfig):
    """The inverse of network.folded_linear (float64)."""
    if name == "embed":
        return w * TOKEN_INPUT_SCALE, b
    if name == "head":
        scale, offset = N.head_row_affine(cfg, w.device)
        return w / scale[:, None], (b - offset) / scale
    return w, b


# ---------------------------------------------------------------------- arithmetics


class IntOps:
    """Exact integer arithmetic for the network (int64 tensors; float64 only for matrix
    products of integers, which are exact): the reference the coding arithmetic is tested
    against bit for bit."""

    exact = True

    def __init__(self, model: ExactEntropyModel, rate=None):
        """rate: a variable-rate model's rate.ExactRate of the windows (batch rows) it runs."""
        if bool(model.cfg.rate_lambdas) != (rate is not None):
            raise ValueError("a variable-rate model needs its windows' qualities (rate.ExactRate), "
                             "a fixed-rate one none")
        self.m, self.cfg, self.layout, self.rate = model, model.cfg, model.layout, rate

    def _rate_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """A variable-rate model's tokens on the input grid (int64): y_hat 2^(4 - v/256)."""
        return self.rate.tokens_in(tokens, INPUT_EXP, TOKEN_CLAMP << INPUT_EXP)

    def linear(self, name: str, x: torch.Tensor, limit: int | None = ACT_MAX) -> torch.Tensor:
        lin = self.m.linears[name]
        acc = torch.matmul(x.to(torch.float64), lin.weight_f64()).to(torch.int64) + lin.bias  # exact
        out = intmath.round_shift(acc, lin.shift)
        return out if limit is None else out.clamp(-limit, limit)

    def embed(self, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        if self.rate is None:
            u = tokens.to(torch.int64).clamp(-TOKEN_CLAMP, TOKEN_CLAMP) << INPUT_EXP
        else:
            u = self._rate_tokens(tokens)
        x = torch.where(masked[..., None], self.m.mask_embed, self.linear("embed", u, RESIDUAL_MAX))
        return x if self.rate is None else (x + self.rate.embed.to(x.device)).clamp(-RESIDUAL_MAX, RESIDUAL_MAX)

    def pos(self, which: str, idx: torch.Tensor) -> torch.Tensor:
        table = self.m.pos_target if which == "target" else self.m.pos_input
        return torch.where((idx >= 0)[:, None], table[idx.clamp(min=0)], 0)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a + b).clamp(-RESIDUAL_MAX, RESIDUAL_MAX)

    def layer_norm(self, name: str, r: torch.Tensor) -> torch.Tensor:
        D = r.shape[-1]
        e_r = self.m.exp("residual")
        e_n = N.ln_exponent(self.cfg.d_model)
        mu = intmath.round_div(r.sum(-1, keepdim=True), torch.tensor(D, device=r.device))
        d = r - mu  # |d| < 2^18
        q = (d * d).sum(-1, keepdim=True)  # < D * 2^36
        var = torch.div(q << (2 * LN_EXTRA_BITS), D, rounding_mode="floor") + _ln_eps_int(e_r)
        sigma = intmath.isqrt(var)  # std in units of 2^-(e_r + LN_EXTRA_BITS), >= 1
        n = intmath.round_div(d << (e_n + LN_EXTRA_BITS), sigma).clamp(-ACT_MAX, ACT_MAX)
        nrm = self.m.norms[name]
        out = intmath.round_shift(n * nrm.gamma.to(torch.int64) + nrm.beta, int(nrm.shift))
        return out.clamp(-ACT_MAX, ACT_MAX)

    def _score_shift(self, layer: int) -> int:
        return self.m.exp(f"b{layer}_q") + self.m.exp(f"b{layer}_k") + N.ATTN_SCALE_BITS - N.SCORE_EXP

    def attention(self, layer: int, q, k, v, valid: torch.Tensor | None) -> torch.Tensor:
        raw = torch.matmul(q.to(torch.float64), k.to(torch.float64).transpose(-1, -2)).to(torch.int64)  # exact
        scores = intmath.round_shift(raw * N.attn_multiplier(q.shape[-1]), self._score_shift(layer))
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
        return head_to_int_params(self.linear("head", x, limit=None), self.cfg.C, self.cfg.n_mixtures, self.rate)

    def cache_store(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.int16)

    def cache_load(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.int64)


def _floor_div_f64(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """floor(a / b) for an integer-valued float64 tensor a, |a| < 2^50, and b (a tensor or a
    Python float) integer-valued, 0 < b < 2^50, exactly, as floor((a + 1/2) / b).

    Why exact: with a = k b + m, 0 <= m < b, the quotient (a + 1/2) / b lies in
    [k + 1/(2b), k + 1 - 1/(2b)], at least 1/(2b) from either integer. A correctly rounded
    division, or a product by a rounded reciprocal (torch's route for a scalar divisor),
    errs by at most 2^-52 (1 + 2^-52) |a + 1/2| / b, below 1/(2b) while |a| < 2^50; a + 1/2 is
    exact below 2^52. So the floor is k on every CPU and GPU. Every caller's bound is stated
    where it calls (all below 2^45)."""
    return torch.add(a, 0.5).div_(b).floor_()


class Float64Ops(IntOps):
    """IntOps with the integers carried in float64 tensors instead of int64: the same
    integers (every value and intermediate is an integer below 2^53, where float64 addition,
    multiplication by an integer or a power of two, and floor are exact), without converting
    between int64 and float64 around every product. `tests/test_exact.py` checks it against
    the int64 reference (IntOps) bit for bit."""

    def __init__(self, model: ExactEntropyModel, rate=None):
        super().__init__(model, rate)
        self._req: dict[str, tuple] = {}
        self._lib = cpu_kernels.library()  # the fused C kernels (CPU tensors only), looked up once

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
        if self._lib is not None and x.device.type == "cpu":  # the same integers on the int8 units, where exact
            fast = self.m.linears[name].int8()
            out = None if fast is None else fast(x, limit)
            if out is not None:
                return out
        bias_half, scale = self._requant(name, x.device)
        acc = torch.matmul(x, self.m.linears[name].weight_f64())  # exact: integers below 2^53
        out = acc.add_(bias_half).mul_(scale).floor_()  # in place: the product is this call's own
        return out if limit is None else out.clamp_(-limit, limit)

    def embed(self, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        if self.rate is None:
            u = tokens.to(torch.float64).clamp(-TOKEN_CLAMP, TOKEN_CLAMP) * (1 << INPUT_EXP)
        else:
            u = self._rate_tokens(tokens).to(torch.float64)
        x = torch.where(masked[..., None], self.m.mask_embed.to(torch.float64), self.linear("embed", u, RESIDUAL_MAX))
        if self.rate is None:
            return x
        return x.add_(self.rate.embed.to(x.device, torch.float64)).clamp_(-RESIDUAL_MAX, RESIDUAL_MAX)

    def pos(self, which: str, idx: torch.Tensor) -> torch.Tensor:
        return super().pos(which, idx).to(torch.float64)

    def layer_norm(self, name: str, r: torch.Tensor) -> torch.Tensor:
        """IntOps.layer_norm step for step on float64 integers. Every value stays an integer
        below 2^52 (|d| <= 2^18, sum d^2 < D 2^36, var < 2^52), where float64 sums, products and
        powers of two are exact and _floor_div_f64 divides exactly; floor(q 2^16 / D) is split
        as q = D t + u, so no product reaches 2^53."""
        D = r.shape[-1]
        e_n = N.ln_exponent(self.cfg.d_model)
        lib = self._lib if r.device.type == "cpu" and e_n + LN_EXTRA_BITS <= 30 else None
        if lib is not None:  # IntOps.layer_norm, one pass per row (csrc/exact_kernels.c; bound 2^(19 + 30) < 2^50)
            nrm, x = self.m.norms[name], r.contiguous()
            gamma, beta = nrm.gamma.contiguous(), nrm.beta.contiguous()  # held while the kernel reads them
            out = torch.empty_like(x)
            lib.layer_norm(x.data_ptr(), x.numel() // D, D, _ln_eps_int(self.m.exp("residual")), e_n + LN_EXTRA_BITS,
                           gamma.data_ptr(), beta.data_ptr(), int(nrm.shift), ACT_MAX, out.data_ptr())
            return out
        mu = _floor_div_f64(2 * r.sum(-1, keepdim=True) + D, 2.0 * D)
        d = r - mu
        q = (d * d).sum(-1, keepdim=True)
        t = _floor_div_f64(q, float(D))
        extra = float(1 << (2 * LN_EXTRA_BITS))
        var = t * extra + _floor_div_f64((q - t * D) * extra, float(D)) + _ln_eps_int(self.m.exp("residual"))
        sigma = torch.floor(torch.sqrt(var))  # within one of floor(sqrt(var)); then exact:
        sigma = sigma - (sigma * sigma > var).to(r.dtype)
        sigma = sigma + ((sigma + 1) * (sigma + 1) <= var).to(r.dtype)
        n = _floor_div_f64(d * float(1 << (e_n + LN_EXTRA_BITS + 1)) + sigma, 2 * sigma).clamp_(-ACT_MAX, ACT_MAX)
        nrm = self.m.norms[name]
        gamma, beta = self._norm_params(name, r.device)
        shift = int(nrm.shift)
        out = n.mul_(gamma).add_(beta)
        if shift > 0:
            out = out.add_(2.0 ** (shift - 1)).mul_(2.0 ** -shift).floor_()
        else:
            out = out.mul_(2.0 ** -shift)
        return out.clamp_(-ACT_MAX, ACT_MAX)

    def _norm_params(self, name: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("norm", name, device)
        if key not in self._req:
            nrm = self.m.norms[name]
            self._req[key] = (nrm.gamma.to(device, torch.float64), nrm.beta.to(device, torch.float64))
        return self._req[key]

    def attention(self, layer: int, q, k, v, valid: torch.Tensor | None) -> torch.Tensor:
        shift = self._score_shift(layer)
        multiplier = N.attn_multiplier(q.shape[-1]) * 2.0 ** -shift  # m 2^-shift: 15 significant bits
        # In place on the fresh product (the teacher-forced encoder's (B, h, 256, 256) score
        # tensors are ~13 MB each: every extra pass and allocation shows).
        scores = torch.matmul(q, k.transpose(-1, -2))  # exact, < 2^36
        lib = self._lib if q.device.type == "cpu" else None
        if lib is not None and (valid is None or valid.dim() == 2):
            return self._attention_fused(lib, multiplier, scores, v, valid)
        # floor((s m + 2^(shift-1)) / 2^shift) as floor(s (m 2^-shift) + 1/2): m 2^-shift has 15
        # significant bits, so s (m 2^-shift) = s m 2^-shift exactly (< 2^51 significant), and so is + 1/2.
        scores.mul_(multiplier).add_(0.5).floor_()
        if valid is not None:
            scores.masked_fill_(~valid, -2.0 ** 40)
        gap = torch.sub(scores.amax(dim=-1, keepdim=True), scores, out=scores).clamp_(max=intmath.EXP_SIZE - 1)
        table = self._table("exp", q.device)
        # A masked score's gap is clamped to the table's last entry, which is 0 (checked in _table):
        # IntOps' zeroing of masked weights is already done, as every row keeps one valid slot (its own).
        e = table.index_select(0, gap.flatten().to(torch.int32)).view(gap.shape)  # (B, h, T, Tk), <= 2^15
        num = torch.matmul(e, v)  # exact, < 2^40
        den = e.sum(-1, keepdim=True)
        return _floor_div_f64(2 * num + den, 2 * den)  # round(num / den), halves up

    def _attention_fused(self, lib, multiplier: float, scores: torch.Tensor, v: torch.Tensor,
                         valid: torch.Tensor | None) -> torch.Tensor:
        """attention's steps after the scores in two C passes (csrc/exact_kernels.c): the same
        rounding, masking and table lookup row by row, then round(num / den) in int64.
        scores (B, h, T, Tk) float64 from this call; valid None or (T, Tk)."""
        B, h, T, Tk = scores.shape
        scores = scores.contiguous()
        mask = None if valid is None else valid.to(torch.uint8).contiguous()  # (T, Tk), held through the call
        table = self._table("exp", scores.device)
        den = torch.empty(B * h * T, dtype=torch.float64)
        lib.softmax_weights(scores.data_ptr(), B * h * T, T, Tk, multiplier, None if mask is None else mask.data_ptr(),
                            table.data_ptr(), intmath.EXP_SIZE - 1, den.data_ptr())
        num = torch.matmul(scores, v).contiguous()  # (B, h, T, dh): exact, < 2^40
        out = torch.empty_like(num)
        lib.round_div_rows(num.data_ptr(), B * h * T, num.shape[-1], den.data_ptr(), out.data_ptr())
        return out

    def gelu(self, g: torch.Tensor) -> torch.Tensor:
        # IntOps.gelu in fewer passes: the table's first entry is 0 (GELU below -8 is 0 in
        # 1/256; checked in _table), so below the table the lookup already gives IntOps' 0.
        lib = self._lib if g.device.type == "cpu" else None
        if lib is not None:  # the same steps in one pass (csrc/exact_kernels.c)
            x, table = g.contiguous(), self._table("gelu", g.device)
            out = torch.empty_like(x)
            lib.gelu(x.data_ptr(), x.numel(), table.data_ptr(), intmath.GELU_HALF, out.data_ptr())
            return out
        index = torch.add(g, intmath.GELU_HALF).clamp_(0, 2 * intmath.GELU_HALF)
        inside = self._table("gelu", g.device).index_select(0, index.flatten().to(torch.int32)).view(g.shape)
        return torch.where(g > intmath.GELU_HALF, g, inside)

    def _table(self, name: str, device) -> torch.Tensor:
        key = (name, device)
        if key not in self._req:
            table = self.m.tables(device)[name].to(torch.float64)
            if name == "gelu" and table[0] != 0:
                raise ValueError("the GELU table must start at 0 (gelu relies on it)")
            if name == "exp" and table[-1] != 0:
                raise ValueError("the exp table must end at 0 (attention's masking relies on it)")
            self._req[key] = table
        return self._req[key]

    def head(self, x: torch.Tensor) -> IntParams:
        return head_to_int_params(self.linear("head", x, limit=None).to(torch.int64), self.cfg.C, self.cfg.n_mixtures,
                                  self.rate)

    def cache_store(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.int16)

    def cache_load(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64)


# The arithmetic the codec codes with; IntOps (int64 carriers) is the reference it is tested
# against bit for bit (tests/test_exact.py).
CodingOps = Float64Ops
