"""The entropy network, written once: its layers, its parameters and its forward pass.

Tokens: one token is the C-vector of the latent at one position of a w x w window; windows
are folded into the batch dimension: (B, L, C) with L = w*w, positions in raster order.

MT (mode "mt", MaskGIT-like): every position is one input slot holding its token (divided
by 5) or the learned mask vector, plus a positional embedding; full attention. Decoding
runs S full passes; after step i the tokens of group i are unmasked.

M2T (mode "m2t"): slots are laid out group by group. Slot group i has
m_i = max(n_i, n_{i-1}) slots: its first n_{i-1} slots hold the tokens of group i-1
(with the embedding of the position they came from), the rest hold the mask vector;
its first n_i slots predict the tokens of group i (they carry the embedding of the
position they predict). Attention is block lower-triangular across slot groups, so a
slot sees only tokens of earlier groups. Training is one teacher-forced pass; decoding
feeds one slot group per step and caches keys/values, so every token passes through the
network about once instead of S times.

One network, several arithmetics. `layer_spec` names every layer; `EntropyParameters`
holds their float weights (it has no forward of its own); the functions at the bottom
(`m2t_teacher_forced`, `step`, `mt_forward`) are the network, written against an
arithmetic `ops`: `FloatOps` (float32, for training and calibration; with quant=True it
rounds where the integer path rounds, for quantisation-aware training) or the exact
integer arithmetic of exact.py (`IntOps`, `Float64Ops`), which codes. A change to the
network is one edit here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import intmath
from .config import ModelConfig
from .entropy_coding import LOG_SCALE_MAX, LOG_SCALE_MIN, LOG_SCALE_STEP, LOGIT_STEPS, MEAN_STEPS, SCALE_LEVELS
from .schedules import Schedule, schedule

TOKEN_INPUT_SCALE = 5  # tokens enter the network divided by 5, as in the paper
LIKELIHOOD_FLOOR = 1e-9

# The integer grid every arithmetic shares (exact.py codes on it; FloatOps(quant=True) trains on it).
ACT_MAX = (1 << 15) - 1  # activations and weights are int16
RESIDUAL_MAX = (1 << 17) - 1  # the residual stream may be 4x wider (int64 storage)
INPUT_EXP = 4  # tokens enter as y * 2^4
TOKEN_CLAMP = ACT_MAX >> INPUT_EXP  # |y| seen by the network is capped at 2047
SCORE_EXP = intmath.EXP_FRAC_BITS  # attention scores in 1/256
PROB_EXP = intmath.EXP_OUT_BITS  # unnormalised attention weights in 1/2^15
GELU_EXP = intmath.GELU_FRAC_BITS  # GELU in and out in 1/256
ATTN_SCALE_BITS = 15  # 1/sqrt(d_head) as a 15-bit fixed-point multiplier


def ln_exponent(d_model: int) -> int:
    """Exponent of LayerNorm's normalised output: the largest e with sqrt(D) * 2^e <= ACT_MAX
    (a normalised vector has |n_i| < sqrt(D))."""
    e = 0
    while d_model * 4 ** (e + 1) <= ACT_MAX * ACT_MAX:
        e += 1
    return e


def attn_multiplier(d_head: int) -> int:
    """floor(2^15 / sqrt(d_head)), exactly."""
    return math.isqrt((1 << (2 * ATTN_SCALE_BITS)) // d_head)


# ---------------------------------------------------------------------- the layers


@dataclass(frozen=True)
class Layer:
    """One layer of the network. `act_in` / `act_out` name the exponents of its input and
    output on the integer grid (exact.ExactEntropyModel.exp resolves them); `act_out` splits
    the output rows into equal parts (qkv: q, k, v). `observe` marks outputs whose maxima
    calibrate their exponents here (the residual and LayerNorm outputs are observed where
    they are formed)."""

    name: str
    kind: str  # "linear" or "norm"
    d_in: int
    d_out: int
    act_in: str
    act_out: tuple[str, ...]
    observe: bool = False


def layer_spec(cfg: ModelConfig) -> list[Layer]:
    """Every layer of the network, in the order a forward pass meets them."""
    D, C, K = cfg.d_model, cfg.C, cfg.n_mixtures
    layers = [Layer("embed", "linear", C, D, "input", ("residual",))]
    for i in range(cfg.n_layers):
        b = f"b{i}_"
        layers += [
            Layer(b + "norm1", "norm", D, D, "layer_norm", (b + "norm1",)),
            Layer(b + "qkv", "linear", D, 3 * D, b + "norm1", (b + "q", b + "k", b + "v"), observe=True),
            Layer(b + "proj", "linear", D, D, b + "v", ("residual",)),
            Layer(b + "norm2", "norm", D, D, "layer_norm", (b + "norm2",)),
            Layer(b + "fc1", "linear", D, cfg.d_mlp, b + "norm2", ("gelu",)),
            Layer(b + "fc2", "linear", cfg.d_mlp, D, "gelu", ("residual",)),
        ]
    return layers + [Layer("norm", "norm", D, D, "layer_norm", ("norm",)),
                     Layer("head", "linear", D, 3 * C * K, "norm", ("unit",))]


def calibrated_activations(cfg: ModelConfig) -> list[str]:
    """The activation exponents chosen by calibration, in their stored order (the others are
    the fixed constants above)."""
    names = ["residual"]
    for i in range(cfg.n_layers):
        names += [f"b{i}_norm1", f"b{i}_norm2", f"b{i}_q", f"b{i}_k", f"b{i}_v"]
    return names + ["norm"]


class EntropyParameters(nn.Module):
    """The float parameters of the entropy network, one module per layer of `layer_spec`,
    plus the mask token and the positional embeddings. No forward: the network functions
    below run them through an arithmetic. The exact model (exact.py) is exported from these
    (training) or they are rebuilt from it (a shipped checkpoint holds only the integers)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        L, C, D = cfg.tokens_per_window, cfg.C, cfg.d_model
        spec = layer_spec(cfg)
        self.mask_token = nn.Parameter(torch.zeros(C))
        self.linears = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        # Created in the order the random initialisation has always drawn them.
        self.linears["embed"] = nn.Linear(C, D)
        self.pos_target = nn.Parameter(torch.randn(L, D) * 0.02)  # position predicted / held (MT)
        self.pos_input = nn.Parameter(torch.randn(L, D) * 0.02)  # M2T: position of the input token
        for layer in spec[1:]:
            if layer.kind == "linear":
                self.linears[layer.name] = nn.Linear(layer.d_in, layer.d_out)
            else:
                self.norms[layer.name] = nn.LayerNorm(layer.d_in)
        K = len(cfg.rate_lambdas)
        if K:  # a variable-rate model (rate.py): per level, log2 gains per channel and a rate embedding
            lam = torch.tensor(cfg.rate_lambdas, dtype=torch.float64)
            # Start from the quantiser step a lambda asks for at high rate (step ~ lambda^-1/2),
            # relative to the middle level; training moves them.
            start = 0.5 * torch.log2(lam / lam[(K - 1) // 2])
            self.log2_gain = nn.Parameter(start.float()[:, None].repeat(1, C))  # (K, C)
            self.rate_embed = nn.Parameter(torch.zeros(K, D))  # (K, D)


class SlotLayout:
    """The schedule and M2T's slot layout of one model: pure functions of its config,
    computed once; tensors are cached per device."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.sched: Schedule = schedule(cfg.window, cfg.num_steps, cfg.alpha, cfg.group_sizes,
                                        cfg.location_order, cfg.order_seed)
        sizes, groups = self.sched.sizes, self.sched.groups
        target_pos, input_pos, slot_group, starts = [], [], [], []
        for i, n_i in enumerate(sizes):
            n_prev = sizes[i - 1] if i > 0 else 0
            starts.append(len(target_pos))
            for j in range(max(n_i, n_prev)):
                target_pos.append(groups[i][j] if j < n_i else -1)
                input_pos.append(groups[i - 1][j] if j < n_prev else -1)
                slot_group.append(i)
        starts.append(len(target_pos))
        self.slot_starts = starts  # slot group i is slots[starts[i]:starts[i+1]]
        self.num_slots = len(target_pos)
        predicting = [0] * cfg.tokens_per_window  # predicting[p]: the slot whose output predicts position p
        for s, p in enumerate(target_pos):
            if p >= 0:
                predicting[p] = s
        sg = torch.tensor(slot_group)
        self._cpu = {
            # Block lower-triangular: slot a may attend to slot b iff group(b) <= group(a).
            "slot_attn_mask": sg[None, :] <= sg[:, None],  # (T, T)
            "slot_target_pos": torch.tensor(target_pos),  # (T,)
            "slot_input_pos": torch.tensor(input_pos),  # (T,)
            "predicting_slot": torch.tensor(predicting),  # (L,)
            "position_step": torch.tensor(self.sched.step_of_position()),  # (L,) MT: step of each position
        }
        self._on: dict = {}

    def tensor(self, name: str, device) -> torch.Tensor:
        key = (name, torch.device(device))
        if key not in self._on:
            self._on[key] = self._cpu[name].to(device)
        return self._on[key]

    def groups(self, device) -> list[torch.Tensor]:
        key = ("groups", torch.device(device))
        if key not in self._on:
            self._on[key] = [torch.as_tensor(g, device=device) for g in self.sched.groups]
        return self._on[key]


# ---------------------------------------------------------------------- float arithmetic


@dataclass(frozen=True)
class MixtureParams:
    """Per-token, per-channel mixture parameters in natural units, each (..., C, K)."""

    means: torch.Tensor
    log_scales: torch.Tensor
    logits: torch.Tensor

    def index(self, idx) -> "MixtureParams":
        return MixtureParams(self.means[idx], self.log_scales[idx], self.logits[idx])


def mixture_likelihood(y: torch.Tensor, p: MixtureParams) -> torch.Tensor:
    """Mass of the mixture on [y - 1/2, y + 1/2]; y is (..., C), params (..., C, K)."""
    y = y.unsqueeze(-1)
    scales = torch.exp(p.log_scales.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX))
    # Evaluate on the side of the mean where the normal CDF is small, for precision.
    centered = y - p.means
    sign = -torch.sign(centered).detach()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    upper = torch.special.ndtr(sign * (centered + 0.5) / scales)
    lower = torch.special.ndtr(sign * (centered - 0.5) / scales)
    component = (upper - lower).abs()
    weights = torch.softmax(p.logits, dim=-1)
    return (weights * component).sum(-1).clamp_min(LIKELIHOOD_FLOOR)


def head_row_affine(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row of the head: (scale, offset) taking natural units to the coder's
    integer units: mean * 64, (log_scale - LOG_SCALE_MIN) / STEP, logit * 8."""
    K = cfg.n_mixtures
    scale = torch.tensor([float(MEAN_STEPS)] * K + [1.0 / LOG_SCALE_STEP] * K + [float(LOGIT_STEPS)] * K,
                         dtype=torch.float64, device=device)
    offset = torch.tensor([0.0] * K + [-LOG_SCALE_MIN / LOG_SCALE_STEP] * K + [0.0] * K,
                          dtype=torch.float64, device=device)
    return scale.repeat(cfg.C), offset.repeat(cfg.C)  # rows ordered (C, 3, K)


def folded_linear(name: str, w: torch.Tensor, b: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights a layer applies on the integer grid, with its fixed scalings folded in
    (the tokens' 1/5 into the embedding, the coder's units into the head), in the dtype of
    `w` (float64 for export: elementwise and exact in the sense of IEEE, the same on every
    machine) and differentiable."""
    if name == "embed":
        return w / TOKEN_INPUT_SCALE, b
    if name == "head":
        scale, offset = head_row_affine(cfg, w.device)
        return w * scale.to(w.dtype)[:, None], b * scale.to(b.dtype) + offset.to(b.dtype)
    return w, b


def _fq(x: torch.Tensor, exponent: int, limit: int, quant: bool) -> torch.Tensor:
    """Fake quantisation: round to the grid 2^-exponent and clamp, straight-through."""
    if not quant:
        return x
    scale = float(2 ** exponent)
    q = torch.round(x * scale).clamp(-limit, limit) / scale
    return x + (q - x).detach()


class FloatOps:
    """The network's arithmetic in float32, for training and calibration.

    quant=False: plain float (training before QAT). quant=True: every weight and activation
    is rounded where the integer path rounds, on the exact model's exponents (straight-
    through gradients), so quantisation-aware training sees the integer model's numbers.
    `observe` collects activation maxima by exponent name (calibration)."""

    exact = False

    def __init__(self, params: EntropyParameters, cfg: ModelConfig, layout: SlotLayout, exact_model=None,
                 quant: bool = False, observe: dict | None = None, rate=None):
        if quant and exact_model is None:
            raise ValueError("quantisation-aware arithmetic needs the exact model's exponents")
        if bool(cfg.rate_lambdas) != (rate is not None):
            raise ValueError("a variable-rate model needs the windows' rates (rate.FloatRate), a fixed-rate one none")
        self.p, self.cfg, self.layout, self.m = params, cfg, layout, exact_model
        self.quant, self.observe, self.rate = quant, observe, rate
        self.spec = {layer.name: layer for layer in layer_spec(cfg)}

    def _watch(self, name: str, x: torch.Tensor) -> None:
        if self.observe is not None:
            self.observe[name] = max(self.observe.get(name, 0.0), float(x.detach().abs().max()))

    def _exp(self, name: str) -> int:
        return self.m.exp(name)

    def _weights(self, name: str):
        module = self.p.linears[name]
        w, b = folded_linear(name, module.weight, module.bias, self.cfg)
        if self.quant:
            lin = self.m.linears[name]
            e_in = self._exp(self.spec[name].act_in)
            w_scale = torch.pow(2.0, lin.w_exp.to(w.device, torch.float32))[:, None]
            b_scale = torch.pow(2.0, (e_in + lin.w_exp).to(w.device, torch.float32))
            w = w + (torch.round(w * w_scale).clamp(-ACT_MAX, ACT_MAX) / w_scale - w).detach()
            b = b + (torch.round(b * b_scale) / b_scale - b).detach()
        return w, b

    def linear(self, name: str, x: torch.Tensor, limit: int | None = ACT_MAX) -> torch.Tensor:
        w, b = self._weights(name)
        out = F.linear(x, w, b)
        layer = self.spec[name]
        if not self.quant and not (layer.observe and self.observe is not None):
            return out
        if name == "head":
            return _fq(out, 0, 1 << 30, self.quant)
        parts = out.chunk(len(layer.act_out), dim=-1)
        rounded = []
        for act, part in zip(layer.act_out, parts):
            if layer.observe:
                self._watch(act, part)
            rounded.append(_fq(part, self._exp(act) if self.quant else 0, limit or (1 << 30), self.quant))
        return rounded[0] if len(rounded) == 1 else torch.cat(rounded, dim=-1)

    def embed(self, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        if self.rate is not None:  # the latent at the fixed-rate scale, on the 1/16 input grid
            tokens = _fq(tokens * torch.exp2(-self.rate.v).to(tokens.dtype), INPUT_EXP, 1 << 30, self.quant)
        held = self.linear("embed", tokens.clamp(-TOKEN_CLAMP, TOKEN_CLAMP), RESIDUAL_MAX)
        mask = self.linear("embed", (self.p.mask_token * TOKEN_INPUT_SCALE).to(tokens.dtype), RESIDUAL_MAX)
        x = torch.where(masked[..., None], mask, held)
        if self.rate is not None:
            emb = self.rate.embed
            x = x + (_fq(emb, self._exp("residual"), RESIDUAL_MAX, True) if self.quant else emb).to(x.dtype)
        self._watch("residual", x)
        return x

    def pos(self, which: str, idx: torch.Tensor) -> torch.Tensor:
        table = self.p.pos_target if which == "target" else self.p.pos_input
        if self.quant:
            table = _fq(table, self._exp("residual"), RESIDUAL_MAX, True)
        return torch.where((idx >= 0)[:, None], table[idx.clamp(min=0)], 0.0)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = a + b
        self._watch("residual", out)
        if not self.quant:
            return out
        limit = RESIDUAL_MAX / 2 ** self._exp("residual")
        return out + (out.clamp(-limit, limit) - out).detach()

    def layer_norm(self, name: str, r: torch.Tensor) -> torch.Tensor:
        module = self.p.norms[name]
        n = F.layer_norm(r, r.shape[-1:], eps=module.eps)
        gamma, beta = module.weight, module.bias
        if self.quant:
            e_n = ln_exponent(self.cfg.d_model)
            n = _fq(n, e_n, ACT_MAX, True)
            g_exp = float(self.m.norms[name].g_exp)
            gq = torch.round(gamma * 2 ** g_exp).clamp(-ACT_MAX, ACT_MAX) / 2 ** g_exp
            bq = torch.round(beta * 2 ** (e_n + g_exp)) / 2 ** (e_n + g_exp)
            gamma, beta = gamma + (gq - gamma).detach(), beta + (bq - beta).detach()
        out = n * gamma + beta
        self._watch(name, out)
        return _fq(out, self._exp(name), ACT_MAX, True) if self.quant else out

    def attention(self, layer: int, q, k, v, valid: torch.Tensor | None) -> torch.Tensor:
        if not self.quant:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=valid)
        mult = attn_multiplier(q.shape[-1]) / 2 ** ATTN_SCALE_BITS
        scores = _fq(torch.matmul(q, k.transpose(-1, -2)) * mult, SCORE_EXP, 1 << 30, True)
        if valid is not None:
            scores = scores.masked_fill(~valid, -1e9)
        gap = (scores.amax(dim=-1, keepdim=True).detach() - scores).clamp(max=intmath.EXP_SIZE / 2 ** SCORE_EXP)
        e = _fq(torch.exp(-gap), PROB_EXP, 1 << PROB_EXP, True)
        if valid is not None:
            e = e.masked_fill(~valid, 0.0)
        out = torch.matmul(e, v) / e.sum(-1, keepdim=True)
        return _fq(out, self._exp(f"b{layer}_v"), ACT_MAX, True)

    def gelu(self, g: torch.Tensor) -> torch.Tensor:
        return _fq(F.gelu(g), GELU_EXP, ACT_MAX, self.quant)

    def head(self, x: torch.Tensor) -> MixtureParams:
        """Natural-unit mixture parameters (B, T, C, K), from the head's integer units."""
        out = self.linear("head", x)
        B, T, _ = out.shape
        out = out.view(B, T, self.cfg.C, 3, self.cfg.n_mixtures)  # (B, T, C, 3, K)
        level = out[..., 1, :]
        if self.quant:
            level = level + (level.clamp(0, SCALE_LEVELS - 1) - level).detach()
        means, log_scales = out[..., 0, :] / MEAN_STEPS, LOG_SCALE_MIN + level * LOG_SCALE_STEP
        if self.rate is not None:  # back to the gained latent's scale (rate.py)
            v = self.rate.v[..., None].to(out.dtype)  # (b, 1, C, 1)
            means, log_scales = means * torch.exp2(v), log_scales + v * math.log(2)
        return MixtureParams(means, log_scales, out[..., 2, :] / LOGIT_STEPS)

    def cache_store(self, t):
        return t

    def cache_load(self, t):
        return t


# ---------------------------------------------------------------------- the network


@dataclass
class KVCache:
    """Keys and values of earlier slot groups, one entry per layer (B, h, T, dh)."""

    k: list = field(default_factory=list)
    v: list = field(default_factory=list)


@dataclass
class DecodeState:
    """Where incremental decoding of one batch of windows stands."""

    step: int = 0
    cache: KVCache | None = None


def _split_heads(qkv: torch.Tensor, n_heads: int):
    B, T, D3 = qkv.shape
    D = D3 // 3
    t = qkv.view(B, T, 3, n_heads, D // n_heads).permute(2, 0, 3, 1, 4)  # (3, B, h, T, dh)
    return t[0], t[1], t[2]


def _blocks(ops, x: torch.Tensor, valid: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
    """The pre-norm transformer blocks: x (B, T, D) -> (B, T, D)."""
    for i in range(ops.cfg.n_layers):
        a = ops.layer_norm(f"b{i}_norm1", x)
        q, k, v = _split_heads(ops.linear(f"b{i}_qkv", a), ops.cfg.n_heads)  # (B, h, T, dh) each
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


def _output(ops, h: torch.Tensor):
    return ops.head(ops.layer_norm("norm", h))


def _m2t_slot_inputs(ops, tokens: torch.Tensor, slots: slice) -> torch.Tensor:
    """Embedded inputs of slots[slots] for windows `tokens` (B, L, C) -> (B, T_s, D)."""
    input_pos = ops.layout.tensor("slot_input_pos", tokens.device)[slots]
    target_pos = ops.layout.tensor("slot_target_pos", tokens.device)[slots]
    held = tokens[:, input_pos.clamp(min=0)]  # (B, T_s, C)
    masked = (input_pos < 0)[None, :].expand(tokens.shape[0], -1)
    x = ops.embed(held, masked)
    x = ops.add(x, ops.pos("input", input_pos))
    return ops.add(x, ops.pos("target", target_pos))


def m2t_teacher_forced(ops, tokens: torch.Tensor):
    """One pass over all slots: tokens (B, L, C) -> the parameters of every position
    (B, L, C, K) in position order: MixtureParams (FloatOps) or IntParams (exact)."""
    layout = ops.layout
    x = _m2t_slot_inputs(ops, tokens, slice(None))  # (B, T, D)
    h = _blocks(ops, x, layout.tensor("slot_attn_mask", tokens.device), None)
    return _output(ops, h[:, layout.tensor("predicting_slot", tokens.device)])  # (B, L, D) in position order


def mt_forward(ops, tokens: torch.Tensor, masked: torch.Tensor, positions: torch.Tensor | None = None):
    """One full MT pass: tokens (B, L, C), masked (B, L) bool -> parameters (B, L, C, K), or
    only those of `positions` (n,) (B, n, C, K): the final norm and the head work per position,
    so a decoding step skips the head for the positions it does not code."""
    x = ops.embed(tokens, masked)
    x = ops.add(x, ops.pos("target", torch.arange(tokens.shape[1], device=tokens.device)))
    h = _blocks(ops, x, None, None)  # (B, L, D)
    return _output(ops, h if positions is None else h[:, positions])  # (B, n, D) -> (B, n, C, K)


def step(ops, tokens: torch.Tensor, state: DecodeState, use_cache: bool = True):
    """The parameters of the tokens of group `state.step` (B, n_i, C, K), in group order.
    `tokens` (B, L, C) holds the true values of all earlier groups. M2T runs the new slot
    group against the cached keys/values (use_cache=False recomputes all slots so far:
    exact arithmetic gives the same integers); MT runs a full pass with later groups masked."""
    layout, i = ops.layout, state.step
    state.step += 1
    mode = ops.cfg.mode
    if mode == "mt":
        masked = (layout.tensor("position_step", tokens.device) >= i)[None, :].expand(tokens.shape[0], -1)
        return mt_forward(ops, tokens, masked, layout.groups(tokens.device)[i])
    if mode != "m2t":
        raise ValueError(f"unknown mode {mode!r}")
    n_i, start, end = layout.sched.sizes[i], layout.slot_starts[i], layout.slot_starts[i + 1]
    if use_cache:
        if state.cache is None:
            state.cache = KVCache()
        x = _m2t_slot_inputs(ops, tokens, slice(start, end))
        out = _output(ops, _blocks(ops, x, None, state.cache))  # a slot group sees the cache and itself: no mask
        return out.index((slice(None), slice(0, n_i)))
    x = _m2t_slot_inputs(ops, tokens, slice(0, end))
    out = _output(ops, _blocks(ops, x, layout.tensor("slot_attn_mask", tokens.device)[:end, :end], None))
    return out.index((slice(None), slice(start, start + n_i)))
