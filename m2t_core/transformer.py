"""The transformer entropy model, in both modes from one code base.

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .entropy_coding import LOG_SCALE_MAX, LOG_SCALE_MIN
from .schedules import Schedule, schedule

TOKEN_INPUT_SCALE = 5.0  # tokens enter the network divided by 5, as in the paper
LIKELIHOOD_FLOOR = 1e-9


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache: "LayerCache | None" = None) -> torch.Tensor:
        B, T, D = x.shape
        h = self.n_heads
        qkv = self.qkv(x).view(B, T, 3, h, D // h).permute(2, 0, 3, 1, 4)  # (3, B, h, T, dh)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if cache is not None:
            k, v = cache.append(k, v)  # (B, h, T_past + T, dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, T, dh)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer encoder block."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.GELU(), nn.Linear(d_mlp, d_model))

    def forward(self, x, attn_mask=None, cache=None):
        x = x + self.attn(self.norm1(x), attn_mask, cache)
        return x + self.mlp(self.norm2(x))


@dataclass
class LayerCache:
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


@dataclass
class DecodeState:
    """Incremental decoding state for one batch of windows."""

    step: int = 0
    caches: list[LayerCache] = field(default_factory=list)


@dataclass(frozen=True)
class MixtureParams:
    """Per-token, per-channel mixture parameters, each (..., C, K)."""

    means: torch.Tensor
    log_scales: torch.Tensor
    logits: torch.Tensor


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


class EntropyTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.sched: Schedule = schedule(
            cfg.window, cfg.num_steps, cfg.alpha, cfg.group_sizes, cfg.location_order, cfg.order_seed
        )
        L, C, D = cfg.tokens_per_window, cfg.C, cfg.d_model
        self.mask_token = nn.Parameter(torch.zeros(C))
        self.embed = nn.Linear(C, D)
        self.pos_target = nn.Parameter(torch.randn(L, D) * 0.02)  # position predicted / held (MT)
        self.pos_input = nn.Parameter(torch.randn(L, D) * 0.02)  # M2T: position of the input token
        self.blocks = nn.ModuleList(Block(D, cfg.n_heads, cfg.d_mlp) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, C * 3 * cfg.n_mixtures)
        self._build_slot_layout()

    # ---------------------------------------------------------------- slot layout (M2T)

    def _build_slot_layout(self) -> None:
        sizes, groups = self.sched.sizes, self.sched.groups
        target_pos, input_pos, slot_group, starts = [], [], [], []
        for i, n_i in enumerate(sizes):
            n_prev = sizes[i - 1] if i > 0 else 0
            m_i = max(n_i, n_prev)
            starts.append(len(target_pos))
            for j in range(m_i):
                target_pos.append(groups[i][j] if j < n_i else -1)
                input_pos.append(groups[i - 1][j] if j < n_prev else -1)
                slot_group.append(i)
        starts.append(len(target_pos))
        T = len(target_pos)
        sg = torch.tensor(slot_group)
        # Block lower-triangular: slot a may attend to slot b iff group(b) <= group(a).
        self.register_buffer("slot_attn_mask", sg[None, :] <= sg[:, None], persistent=False)  # (T, T)
        self.register_buffer("slot_target_pos", torch.tensor(target_pos), persistent=False)  # (T,)
        self.register_buffer("slot_input_pos", torch.tensor(input_pos), persistent=False)  # (T,)
        self.slot_starts = starts  # slot group i is slots[starts[i]:starts[i+1]]
        # predicting_slot[p]: the slot whose output predicts position p.
        predicting = torch.empty(self.cfg.tokens_per_window, dtype=torch.long)
        for s, p in enumerate(target_pos):
            if p >= 0:
                predicting[p] = s
        self.register_buffer("predicting_slot", predicting, persistent=False)
        self.num_slots = T
        # MT: step at which each position is coded, for masking during decoding.
        self.register_buffer(
            "position_step", torch.tensor(self.sched.step_of_position()), persistent=False
        )

    # ---------------------------------------------------------------- shared pieces

    def _params(self, h: torch.Tensor) -> MixtureParams:
        """(B, T, D) features -> mixture params (B, T, C, K)."""
        B, T, _ = h.shape
        K, C = self.cfg.n_mixtures, self.cfg.C
        out = self.head(self.norm(h)).view(B, T, C, 3, K)  # (B, T, C, 3, K)
        return MixtureParams(out[..., 0, :], out[..., 1, :], out[..., 2, :])

    def _embed_tokens(self, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, C), masked (B, T) bool -> (B, T, D)."""
        x = torch.where(masked[..., None], self.mask_token.to(tokens.dtype), tokens / TOKEN_INPUT_SCALE)
        return self.embed(x)

    def _run(self, x: torch.Tensor, attn_mask=None, caches=None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, caches[i] if caches is not None else None)
        return x

    # ---------------------------------------------------------------- M2T

    def _m2t_slot_inputs(self, tokens: torch.Tensor, slots: slice) -> torch.Tensor:
        """Embedded inputs of slots[slots] for windows tokens (B, L, C) -> (B, T_s, D)."""
        input_pos = self.slot_input_pos[slots]
        target_pos = self.slot_target_pos[slots]
        B = tokens.shape[0]
        held = tokens[:, input_pos.clamp(min=0)]  # (B, T_s, C)
        masked = (input_pos < 0)[None, :].expand(B, -1)
        x = self._embed_tokens(held, masked)
        x = x + torch.where((input_pos >= 0)[:, None], self.pos_input[input_pos.clamp(min=0)], 0.0)
        x = x + torch.where((target_pos >= 0)[:, None], self.pos_target[target_pos.clamp(min=0)], 0.0)
        return x

    def m2t_forward(self, tokens: torch.Tensor) -> MixtureParams:
        """Teacher-forced pass: tokens (B, L, C) -> params for every position (B, L, C, K)."""
        x = self._m2t_slot_inputs(tokens, slice(None))  # (B, T, D)
        h = self._run(x, attn_mask=self.slot_attn_mask)
        h = h[:, self.predicting_slot]  # (B, L, D), back in position order
        return self._params(h)

    def m2t_step(self, tokens: torch.Tensor, state: DecodeState, use_cache: bool = True) -> MixtureParams:
        """Params for the tokens of group `state.step` (B, n_i, C, K), in group order.

        `tokens` (B, L, C) must hold the true values of all groups before state.step.
        """
        i = state.step
        n_i = self.sched.sizes[i]
        if use_cache:
            if not state.caches:
                state.caches = [LayerCache() for _ in self.blocks]
            sl = slice(self.slot_starts[i], self.slot_starts[i + 1])
            x = self._m2t_slot_inputs(tokens, sl)  # (B, m_i, D)
            # No mask needed: the cache holds earlier groups only, and a slot group sees itself.
            h = self._run(x, caches=state.caches)
        else:
            end = self.slot_starts[i + 1]
            x = self._m2t_slot_inputs(tokens, slice(0, end))  # (B, T_<=i, D)
            h = self._run(x, attn_mask=self.slot_attn_mask[:end, :end])
            h = h[:, self.slot_starts[i]:]
        state.step += 1
        return self._params(h[:, :n_i])

    # ---------------------------------------------------------------- MT

    def mt_forward(self, tokens: torch.Tensor, masked: torch.Tensor) -> MixtureParams:
        """One full pass: tokens (B, L, C), masked (B, L) bool -> params (B, L, C, K)."""
        x = self._embed_tokens(tokens, masked) + self.pos_target  # (B, L, D)
        return self._params(self._run(x))

    def mt_step(self, tokens: torch.Tensor, state: DecodeState) -> MixtureParams:
        i = state.step
        B = tokens.shape[0]
        masked = (self.position_step >= i)[None, :].expand(B, -1)
        params = self.mt_forward(tokens, masked)
        group = torch.as_tensor(self.sched.groups[i], device=tokens.device)
        state.step += 1
        return MixtureParams(params.means[:, group], params.log_scales[:, group], params.logits[:, group])

    # ---------------------------------------------------------------- dispatch

    def step(self, tokens: torch.Tensor, state: DecodeState, use_cache: bool = True) -> MixtureParams:
        if self.cfg.mode == "m2t":
            return self.m2t_step(tokens, state, use_cache)
        if self.cfg.mode == "mt":
            return self.mt_step(tokens, state)
        raise ValueError(f"unknown mode {self.cfg.mode!r}")
