"""Variable rate: one model codes at any quality Q in [1, K], its K trained rate levels.

A variable-rate model (ModelConfig.rate_lambdas, K >= 2 lambdas, low to high) learns per
level k a log2 gain per latent channel (`log2_gain`, (K, C)) and an embedding that tells the
entropy network the rate (`rate_embed`, (K, D)). Quality Q between two levels interpolates
both linearly (so the gains exponentially, as in Cui et al.'s gain units). Then:

* encoder: y_hat = round(g_a(x) * 2^v), v = the interpolated log2 gains (float: the stream
  carries y_hat, so only the decoder's side must be exact);
* entropy model: its tokens enter as y_hat * 2^-v (the latent at the scale the fixed-rate
  model saw, on the network's 1/16 input grid), the rate embedding is added to every slot,
  and the distribution it predicts is scaled back: mean * 2^v, log scale + v ln 2. So the
  network models the latent before quantisation and the gain only sets the quantiser's step;
* synthesis: g_s(y_hat * 2^-v).

Everything the decoder computes from Q is integer arithmetic on the stored integers
(ExactEntropyModel.rate_log2_gain in 1/2^LOG2_FRAC_BITS, rate_embed at the residual
exponent): Q is a 16-bit code (Q * 2^QUALITY_FRAC_BITS, in the stream's header, format 6),
the interpolation a floor division, 2^(v/256) a fixed-point table built with integer-only
code, and the log-scale offset a table of rounded rationals. Training runs the float forms
(`log2_gains`, `lambda_of`).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch

from . import intmath
from .bitstream import QUALITY_FRAC_BITS, QUALITY_ONE  # the header's scale: Q in steps of 1/256

LOG2_FRAC_BITS = 8  # log2 gains in 1/256 (a factor of 1.0027 a step)
LOG2_LIMIT = 8 << LOG2_FRAC_BITS  # |log2 gain| <= 8: gains within [1/256, 256]
POW2_BITS = 30  # 2^(j/256) in 30-bit fixed point


class QualityError(ValueError):
    """A quality outside the model's range, or a quality given to a fixed-rate model."""


def levels(cfg) -> int:
    """K, the trained rate levels of a model config (0: a fixed-rate model)."""
    return len(cfg.rate_lambdas)


def quality_code(quality: float, num_levels: int) -> int:
    """Q -> its 16-bit code round(Q * 256), checked against the range [1, K]."""
    if num_levels < 2:
        raise QualityError("this model has one rate: it takes no quality (choose another model for another rate)")
    if isinstance(quality, bool) or not isinstance(quality, (int, float)) or not math.isfinite(quality):
        raise QualityError(f"quality must be a number, got {quality!r}")
    if not 1 <= quality <= num_levels:
        raise QualityError(f"quality {quality} is outside this model's range [1, {num_levels}]")
    return int(round(quality * QUALITY_ONE))


def check_code(code: int, num_levels: int) -> int:
    """A quality code read from a stream: in [256, 256 K] or BitstreamError-worthy ValueError."""
    if not QUALITY_ONE <= code <= num_levels * QUALITY_ONE:
        raise QualityError(f"quality code {code} is outside the model's range "
                           f"[{QUALITY_ONE}, {num_levels * QUALITY_ONE}]")
    return code


def _split(codes: torch.Tensor, num_levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (n,) -> (level i in [0, K-2], weight t in [0, 256]) with Q = 1 + i + t/256."""
    offset = codes.to(torch.int64) - QUALITY_ONE
    i = torch.clamp(offset >> QUALITY_FRAC_BITS, 0, num_levels - 2)
    return i, offset - (i << QUALITY_FRAC_BITS)


def interpolate(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Integer rows (K, n) at quality codes (m,) -> (m, n) int64:
    floor((T[i] (256 - t) + T[i+1] t) / 256), exact."""
    i, t = _split(codes.to(table.device), table.shape[0])
    table = table.to(torch.int64)
    t = t[:, None]
    return (table[i] * (QUALITY_ONE - t) + table[i + 1] * t) >> QUALITY_FRAC_BITS


def interpolate_float(table: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """The float form for training: rows (K, n) at float qualities (m,) in [1, K] -> (m, n),
    differentiable in the table."""
    pos = (quality.to(table.dtype) - 1).clamp(0, table.shape[0] - 1)
    i = pos.floor().long().clamp(max=table.shape[0] - 2)
    t = (pos - i.to(pos.dtype))[:, None]
    return table[i] * (1 - t) + table[i + 1] * t


def lambda_of(quality: torch.Tensor, lambdas: Sequence[float]) -> torch.Tensor:
    """The rate-distortion weight of float qualities (m,): the lambdas interpolated
    exponentially between levels (training)."""
    logs = torch.log(torch.tensor(lambdas, dtype=torch.float64, device=quality.device))[:, None]  # (K, 1)
    return torch.exp(interpolate_float(logs, quality.double()))[:, 0].to(torch.float32)


# ---------------------------------------------------------------------- exact scaling


@functools.lru_cache(maxsize=None)
def pow2_table() -> np.ndarray:
    """floor(2^(j/256) * 2^30) for j = 0..255, by integer roots: the same table everywhere."""
    out = []
    for j in range(1 << LOG2_FRAC_BITS):
        target = 1 << (j + (POW2_BITS << LOG2_FRAC_BITS))  # (2^(j/256) 2^30)^256
        lo, hi = 1 << POW2_BITS, 1 << (POW2_BITS + 1)
        while hi - lo > 1:  # the largest r with r^256 <= target
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if mid ** (1 << LOG2_FRAC_BITS) <= target else (lo, mid)
        out.append(lo)
    return np.asarray(out, dtype=np.int64)


def scale_pow2(x: torch.Tensor, v: torch.Tensor, exponent: int) -> torch.Tensor:
    """round(x * 2^(v/256 + exponent)) for integer tensors x (|x| <= 2^21: latents, and the
    head's means in 1/64) and v (|v| <= LOG2_LIMIT, broadcastable), half up, in int64: exact
    (every product is below 2^52)."""
    if exponent > POW2_BITS - 1 - (LOG2_LIMIT >> LOG2_FRAC_BITS):
        raise ValueError(f"scale_pow2: exponent {exponent} leaves no rounding bit")
    v = v.to(torch.int64).clamp(-LOG2_LIMIT, LOG2_LIMIT)
    m = torch.from_numpy(pow2_table()).to(x.device)[v & ((1 << LOG2_FRAC_BITS) - 1)]
    shift = POW2_BITS - exponent - (v >> LOG2_FRAC_BITS)  # >= 1: checked above
    p = x.to(torch.int64) * m
    half = torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)
    return torch.bitwise_right_shift(p + half, shift)


def gain_float(v: torch.Tensor) -> torch.Tensor:
    """2^(v/256) as float64, from the same table (the encoder's gain; any value would decode)."""
    v = v.to(torch.int64)
    m = torch.from_numpy(pow2_table()).to(v.device)[v & ((1 << LOG2_FRAC_BITS) - 1)].double()
    return m * torch.pow(2.0, ((v >> LOG2_FRAC_BITS) - POW2_BITS).double())


@functools.lru_cache(maxsize=None)
def level_offsets() -> np.ndarray:
    """For v = -LOG2_LIMIT..LOG2_LIMIT: the coder's scale-level offset of a gain 2^(v/256),
    round(v/256 * ln 2 / level step), with the level step ln(SCALE_MAX / SCALE_MIN) / 63
    of entropy_coding, in integer-only arithmetic (intmath's fixed point)."""
    from .entropy_coding import SCALE_LEVELS, SCALE_MAX_FRACTION, SCALE_MIN_FRACTION

    ln2 = intmath._ln(Fraction(2))
    ln_ratio = intmath._ln(Fraction(SCALE_MAX_FRACTION) / Fraction(SCALE_MIN_FRACTION))
    num, den = ln2 * (SCALE_LEVELS - 1), ln_ratio << LOG2_FRAC_BITS
    out = []
    for v in range(-LOG2_LIMIT, LOG2_LIMIT + 1):
        n = v * num
        out.append((2 * n + den) // (2 * den))  # round half up
    return np.asarray(out, dtype=np.int64)


def level_offset(v: torch.Tensor) -> torch.Tensor:
    table = torch.from_numpy(level_offsets()).to(v.device)
    return table[v.to(torch.int64) + LOG2_LIMIT]


# ---------------------------------------------------------------------- per-window rates


class ExactRate:
    """What the exact entropy model needs of the rate of each of b windows: their log2 gains
    v (b, 1, C) and rate embeddings (b, 1, D), integers (`of`: from a model's tables)."""

    def __init__(self, v: torch.Tensor, embed: torch.Tensor):
        self.v, self.embed = v, embed

    @classmethod
    def of(cls, exact, codes) -> "ExactRate":
        """From the exact model's integer tables at the windows' quality codes (b,)."""
        codes = torch.as_tensor(codes, dtype=torch.int64)
        return cls(interpolate(exact.rate_log2_gain, codes)[:, None, :],  # (b, 1, C)
                   interpolate(exact.rate_embed, codes)[:, None, :])  # (b, 1, D)

    def rows(self, start: int, stop: int) -> "ExactRate":
        """The rate of windows start..stop-1 (a slice of the batch)."""
        return ExactRate(self.v[start:stop], self.embed[start:stop])

    def tokens_in(self, tokens: torch.Tensor, exponent: int, limit: int) -> torch.Tensor:
        """Tokens y_hat (b, T, C) -> round(y_hat 2^(exponent - v/256)) clamped to +-limit, int64."""
        from .entropy_coding import MAX_ABS_SYMBOL

        x = tokens.to(torch.int64).clamp(-MAX_ABS_SYMBOL, MAX_ABS_SYMBOL)
        return scale_pow2(x, -self.v.to(tokens.device), exponent).clamp(-limit, limit)

    def scale_params(self, mean_q: torch.Tensor, level: torch.Tensor, mean_max: int, levels_: int):
        """Head outputs in the network's (unscaled) units (b, T, C, K) -> the coder's:
        mean * 2^(v/256) rounded and clamped, level + offset clamped."""
        v = self.v.to(mean_q.device)[..., None]  # (b, 1, C, 1)
        mean = scale_pow2(mean_q.to(torch.int64).clamp(-mean_max, mean_max), v, 0).clamp(-mean_max, mean_max)
        lvl = (level.to(torch.int64) + level_offset(v)).clamp(0, levels_ - 1)
        return mean, lvl


class FloatRate:
    """The float form (training, calibration): log2 gains (b, C) and rate embeddings (b, D)
    of b windows, from the float tables at float qualities."""

    def __init__(self, log2_gain: torch.Tensor, embed: torch.Tensor):
        self.v = log2_gain[:, None, :]  # (b, 1, C)
        self.embed = embed[:, None, :]  # (b, 1, D)
