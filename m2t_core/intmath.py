"""Integer-only mathematics: the fixed tables of the exact entropy model (format version 2).

Every number here is computed with Python integers (arbitrary precision, exact, the same on
every machine) and rounded once at the end. No float, no libm: `math.exp` or `np.exp` may
differ by an ulp between libraries, which after rounding can flip a table entry, and one
flipped entry is enough to make another machine decode garbage.

The tables (their digest is pinned in tests/test_exact.py):
- `exp_table()`:   round(2^15 * exp(-i / 2^8)), i = 0..4095   (softmax in attention)
- `gelu_table()`:  round(2^8 * GELU(i / 2^8)), i = -2048..2048 (GELU(x) = x * Phi(x))
- `phi_table()`:   round(2^40 * Phi(i / 2^10)), i = 0..8 * 2^10 (standard normal CDF)
- `scale_table()`: round(2^24 * s_l), s_l = SCALE_MIN * (SCALE_MAX/SCALE_MIN)^(l/(L-1))
- `weight_table()`: round(2^8 * exp(-g / 8)), g = 0..64 (mixture weights from logit gaps)

Also the elementwise integer helpers shared by the exact network (torch int64 tensors).
"""

from __future__ import annotations

import functools
import hashlib
from fractions import Fraction

import numpy as np
import torch

PREC = 112  # fixed-point bits of the intermediate Python integers
ONE = 1 << PREC

EXP_FRAC_BITS = 8  # softmax input resolution: scores in units of 2^-8
EXP_OUT_BITS = 15
EXP_SIZE = 4096  # exp(-16) * 2^15 < 0.5: entries beyond ~2840 are already 0
GELU_FRAC_BITS = 8
GELU_HALF = 2048  # the table covers [-8, 8]; GELU(x) = 0 below (to 2^-8), x above
PHI_FRAC_BITS = 10  # grid step of the standard normal CDF table
PHI_OUT_BITS = 40
PHI_LAST = 8 << PHI_FRAC_BITS  # z up to 8 (the GELU table needs it; Phi(8) = 1 - 6e-16)


# ------------------------------------------------------------------ fixed-point scalars


def _fixed(q: Fraction) -> int:
    """round(q * 2^PREC) for a rational q."""
    n = q.numerator << PREC
    return (2 * n + q.denominator) // (2 * q.denominator)


def _mul(a: int, b: int) -> int:
    return (a * b + (ONE >> 1)) >> PREC


def _div(a: int, b: int) -> int:
    return ((a << (PREC + 1)) + b) // (2 * b)


def _exp_fixed(x: int) -> int:
    """exp(x) for fixed-point x with |x| <= 1 (Taylor series, exact integer arithmetic)."""
    total, term, n = ONE, ONE, 1
    while term:
        term = _div(_mul(term, x), n << PREC)
        total += term
        n += 1
    return total


def _exp(x: Fraction) -> int:
    """exp(x) in fixed point for any rational x: exp(x) = exp(x / 2^k)^(2^k)."""
    k = 0
    while abs(x) > 1:
        x /= 2
        k += 1
    r = _exp_fixed(_fixed(x))
    for _ in range(k):
        r = _mul(r, r)
    return r


def _ln(q: Fraction) -> int:
    """ln(q) in fixed point for rational q > 0: k*ln 2 + 2*atanh((m-1)/(m+1)), m in [1, 2)."""
    if q <= 0:
        raise ValueError("ln of a non-positive number")
    k = 0
    while q >= 2:
        q /= 2
        k += 1
    while q < 1:
        q *= 2
        k -= 1

    def atanh2(t: Fraction) -> int:  # 2 * atanh(t), |t| < 1/3
        t_fixed, t2 = _fixed(t), _fixed(t * t)
        total, power, n = 0, t_fixed, 1
        while power:
            total += _div(power, n << PREC)
            power = _mul(power, t2)
            n += 2
        return 2 * total

    return k * atanh2(Fraction(1, 3)) + atanh2((q - 1) / (q + 1))


@functools.lru_cache(maxsize=None)
def _pi() -> int:
    """pi in fixed point (Machin: 16 atan(1/5) - 4 atan(1/239))."""

    def atan_inv(n: int) -> int:
        total, power, k, sign = 0, _div(ONE, n << PREC), 1, 1
        n2 = n * n
        while power:
            total += sign * (power // k)
            power //= n2
            k += 2
            sign = -sign
        return total

    return 16 * atan_inv(5) - 4 * atan_inv(239)


def _isqrt_fixed(x: int) -> int:
    """sqrt of a fixed-point number, in fixed point."""
    from math import isqrt

    return isqrt(x << PREC)


def _round_to(x: int, bits: int) -> int:
    """round(x * 2^bits / 2^PREC), half away from zero."""
    shift = PREC - bits
    if x >= 0:
        return (x + (1 << (shift - 1))) >> shift
    return -((-x + (1 << (shift - 1))) >> shift)


# ------------------------------------------------------------------ tables


@functools.lru_cache(maxsize=None)
def exp_table() -> np.ndarray:
    step = _exp(Fraction(-1, 1 << EXP_FRAC_BITS))
    out, value = [], ONE
    for _ in range(EXP_SIZE):
        out.append(_round_to(value, EXP_OUT_BITS))
        value = _mul(value, step)
    return np.asarray(out, dtype=np.int64)


@functools.lru_cache(maxsize=None)
def _phi_fixed() -> list[int]:
    """Phi(i * h) in fixed point for i = 0..PHI_LAST, h = 2^-PHI_FRAC_BITS.

    phi is evaluated on the half-step grid by the exact recurrence
    phi(x_{k+1}) = phi(x_k) * exp(-(2k+1) d^2 / 2), d = h/2, and integrated with Simpson's
    rule (error < 1e-14, far below the 2^-40 the table keeps).
    """
    d = Fraction(1, 2 << PHI_FRAC_BITS)
    r = _exp(-d * d / 2)  # exp(-d^2/2)
    q = _exp(-d * d)  # exp(-d^2)
    inv_sqrt_2pi = _div(ONE, _isqrt_fixed(2 * _pi()))
    phi = [inv_sqrt_2pi]
    factor = r  # exp(-(2k+1) d^2 / 2) = r * q^k
    for _ in range(2 * PHI_LAST):
        phi.append(_mul(phi[-1], factor))
        factor = _mul(factor, q)
    h_over_6 = _fixed(Fraction(1, 6 << PHI_FRAC_BITS))
    out, total = [], ONE // 2
    for i in range(PHI_LAST + 1):
        out.append(total)
        if i < PHI_LAST:
            total += _mul(h_over_6, phi[2 * i] + 4 * phi[2 * i + 1] + phi[2 * i + 2])
    return out


@functools.lru_cache(maxsize=None)
def phi_table() -> np.ndarray:
    return np.asarray([_round_to(v, PHI_OUT_BITS) for v in _phi_fixed()], dtype=np.int64)


@functools.lru_cache(maxsize=None)
def gelu_table() -> np.ndarray:
    """round(2^8 * x * Phi(x)) at x = i / 2^8, i = -GELU_HALF..GELU_HALF."""
    phi = _phi_fixed()
    ratio = 1 << (PHI_FRAC_BITS - GELU_FRAC_BITS)
    out = []
    for i in range(-GELU_HALF, GELU_HALF + 1):
        p = phi[abs(i) * ratio]
        if i < 0:
            p = ONE - p
        out.append(_round_to(i * p, 0))  # x * 2^8 * Phi(x) = i * Phi
    return np.asarray(out, dtype=np.int64)


@functools.lru_cache(maxsize=None)
def sigmoid_table(in_exp: int, half: int, out_bits: int) -> np.ndarray:
    """round(2^out_bits * sigmoid(i / 2^in_exp)), i = -half..half, in integer-only arithmetic
    (this module's fixed point): the same table on every machine (the integer g_s's gate)."""
    step = _exp(Fraction(-1, 1 << in_exp))  # exp(-1 / 2^in_exp)
    neg = [ONE]  # exp(-i / 2^in_exp), i = 0..half
    for _ in range(half):
        neg.append(_mul(neg[-1], step))
    out = []
    for i in range(-half, half + 1):
        # sigmoid(x) = 1 / (1 + exp(-x)); for x < 0 use exp(x) / (1 + exp(x)).
        e = neg[abs(i)]
        value = _div(ONE, ONE + e) if i >= 0 else _div(e, ONE + e)
        out.append(_round_to(value, out_bits))
    return np.asarray(out, dtype=np.int64)


def scale_table(scale_min: Fraction, scale_max: Fraction, levels: int) -> np.ndarray:
    """round(2^24 * scale_min * (scale_max / scale_min)^(l / (levels - 1)))."""
    log_ratio = _ln(scale_max / scale_min)
    base = _fixed(scale_min)
    out = []
    for level in range(levels):
        exponent = Fraction(log_ratio * level, (levels - 1) << PREC)
        out.append(_round_to(_mul(base, _exp(exponent)), 24))
    return np.asarray(out, dtype=np.int64)


def weight_table(steps: int, max_gap: int, bits: int) -> np.ndarray:
    """round(2^bits * exp(-g / steps)), g = 0..max_gap."""
    step = _exp(Fraction(-1, steps))
    out, value = [], ONE
    for _ in range(max_gap + 1):
        out.append(_round_to(value, bits))
        value = _mul(value, step)
    return np.asarray(out, dtype=np.int64)


def normal_cdf_fixed(z_num: np.ndarray, z_den: np.ndarray, out_bits: int) -> np.ndarray:
    """round(2^out_bits * Phi(z_num / z_den)) elementwise, int64 numpy, in integers only.

    |z| is located on the Phi table's grid with an exact integer division, linearly
    interpolated (error < 4e-8, below the 2^-16 resolution of the coding tables), and the
    negative side uses Phi(-z) = 1 - Phi(z). Requires |z_num| < 2^(62 - 26).
    """
    table = phi_table()
    z_num = np.asarray(z_num, dtype=np.int64)
    z_den = np.asarray(z_den, dtype=np.int64)
    frac_bits = 16
    t = (np.abs(z_num) << (PHI_FRAC_BITS + frac_bits)) // z_den  # |z| in grid units, 16 fraction bits
    idx = t >> frac_bits
    beyond = idx >= PHI_LAST
    idx = np.minimum(idx, PHI_LAST - 1)
    frac = np.where(beyond, 0, t & ((1 << frac_bits) - 1))
    low, high = table[idx], table[idx + 1]
    value = np.where(beyond, 1 << PHI_OUT_BITS, low + (((high - low) * frac) >> frac_bits))
    shift = PHI_OUT_BITS - out_bits
    rounded = (value + (1 << (shift - 1))) >> shift
    return np.where(z_num < 0, (1 << out_bits) - rounded, rounded)


def tables_digest() -> str:
    h = hashlib.sha256()
    for arr in (exp_table(), gelu_table(), phi_table()):
        h.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ integer tensor helpers


def round_shift(a: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """round(a / 2^shift), halves up, for int64 `a`; a negative shift multiplies.
    `shift` is an int or an int64 tensor broadcastable to `a`."""
    if isinstance(shift, int):
        if shift <= 0:
            return a << (-shift)
        return (a + (1 << (shift - 1))) >> shift
    right = shift.clamp(min=0)
    left = (-shift).clamp(min=0)
    half = torch.where(right > 0, torch.ones_like(right) << (right - 1).clamp(min=0), torch.zeros_like(right))
    return ((a << left) + half) >> right


def round_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """round(num / den), halves up, for int64 tensors with den > 0."""
    return torch.div(2 * num + den, 2 * den, rounding_mode="floor")


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(n)) for int64 n >= 0, exact: a float64 estimate, then integer corrections.

    IEEE sqrt is correctly rounded, so the estimate is within one of the answer for n < 2^62;
    the corrections make the result exact even where it is not."""
    r = torch.sqrt(n.double()).long()
    for _ in range(2):
        r = torch.where(r * r > n, r - 1, r)
        r = torch.where((r + 1) * (r + 1) <= n, r + 1, r)
    return r
