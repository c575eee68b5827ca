"""Entropy coding of latent symbols with constriction, from integer-snapped mixture parameters.

Why integers: constriction decodes garbage (silently) if a probability differs by one ulp
between encoder and decoder. The exact entropy model (exact.py) gives every parameter as an
integer, and everything after that is integer arithmetic on fixed tables built by
integer-only code (intmath.py): every machine builds identical probability tables.

Model of one symbol (one latent channel at one position): a mixture of K Gaussians,
integrated over unit bins. Integer parameters per component k:
  mean_q[k]  = the mean in 1/MEAN_STEPS units
  level[k]   = the scale's index among SCALE_LEVELS log-spaced levels
  weight[k]  = WEIGHT_TABLE[max_logit_q - logit_q[k]], logits in 1/LOGIT_STEPS
Support: the 2R+1 integers around the mixture mean plus an escape bin on each side; the
size of R is picked per symbol from R_CLASSES by the spread of its distribution. A value
outside the support codes its escape bin, then its distance with an Elias-gamma code,
so any value up to MAX_ABS_SYMBOL round-trips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import constriction
import numpy as np
import torch

from . import cpu_kernels

MEAN_STEPS = 64
SCALE_MIN = 0.11
SCALE_MAX = 64.0
SCALE_LEVELS = 64
LOG_SCALE_MIN = math.log(SCALE_MIN)
LOG_SCALE_MAX = math.log(SCALE_MAX)
LOG_SCALE_STEP = (LOG_SCALE_MAX - LOG_SCALE_MIN) / (SCALE_LEVELS - 1)
LOGIT_STEPS = 8
MAX_LOGIT_GAP = 64  # in 1/LOGIT_STEPS units: weights below exp(-8) of the top one are zero
CDF_BITS = 16
WEIGHT_BITS = 8
TAIL_SIGMAS = 5.0  # Phi beyond 5 sigma rounds to 0 or 1 at CDF_BITS precision
R_CLASSES = (3, 8, 20, 48, 128, 320)
MAX_ABS_SYMBOL = 1 << 15  # the encoder clamps y_hat to [-MAX_ABS_SYMBOL, MAX_ABS_SYMBOL]
ESCAPE_LENGTH_ALPHABET = 20  # Elias-gamma length prefix alphabet (lengths 1..20)
CODER_PRECISION = 24  # constriction's default range coder quantises probabilities to 24 bits
# The same constants as exact rationals, for the integer-built tables.
SCALE_MIN_FRACTION = "11/100"
SCALE_MAX_FRACTION = "64"
TAIL_SIGMAS_FRACTION = "5"

_FAMILY = constriction.stream.model.Categorical(perfect=False)
_UNIFORM = constriction.stream.model.Uniform()


# --------------------------------------------------------------------------------------
# Fixed integer tables (built once per process; their checksum is pinned in the tests).
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tables:
    cdf: np.ndarray  # (SCALE_LEVELS, 2*J+1) int64: round(2^CDF_BITS * Phi(j / (MEAN_STEPS*scale)))
    half_width: int  # J
    weight: np.ndarray  # (MAX_LOGIT_GAP+1,) int64: round(2^WEIGHT_BITS * exp(-gap/LOGIT_STEPS))
    support_radius: np.ndarray  # (SCALE_LEVELS,) int64: ceil(TAIL_SIGMAS * scale)
    # cdf extended by `margin` saturated entries on both sides and split by phase:
    # cdf_by_phase[l, i % MEAN_STEPS, i // MEAN_STEPS] = cdf_ext[l, i]. A symbol's bin edges
    # are MEAN_STEPS apart, so they become one contiguous run of this array.
    cdf_by_phase: np.ndarray
    margin: int


_TABLES: list[Tables] = []


def tables() -> Tables:
    """The coding tables (built once per process, from integer-only code)."""
    if not _TABLES:
        _TABLES.append(_integer_tables())
    return _TABLES[0]


def _assemble(cdf: np.ndarray, weight: np.ndarray, radius: np.ndarray) -> Tables:
    """The derived, phase-split layout of a cdf table (see Tables.cdf_by_phase)."""
    J = (cdf.shape[1] - 1) // 2
    margin = MEAN_STEPS * (2 * max(R_CLASSES) + 2)
    length = 2 * J + 1 + 2 * margin
    length += (-length) % MEAN_STEPS
    ext = np.full((SCALE_LEVELS, length), 1 << CDF_BITS, dtype=np.int32)
    ext[:, :margin] = 0
    ext[:, margin:margin + 2 * J + 1] = cdf
    by_phase = np.ascontiguousarray(
        ext.reshape(SCALE_LEVELS, length // MEAN_STEPS, MEAN_STEPS).transpose(0, 2, 1)
    )
    return Tables(cdf, J, weight, radius, by_phase, margin)


def _integer_tables() -> Tables:
    """The tables, from integer-only code (intmath): the scale of level l is
    SCALE_MIN * (SCALE_MAX / SCALE_MIN)^(l / 63) in 24-bit fixed point, the CDF is
    round(2^16 * Phi(j / (64 * scale))), the weights round(2^8 * exp(-gap / 8))."""
    from fractions import Fraction

    from . import intmath

    J = int(math.ceil(TAIL_SIGMAS * SCALE_MAX * MEAN_STEPS))
    scale24 = intmath.scale_table(Fraction(SCALE_MIN_FRACTION), Fraction(SCALE_MAX_FRACTION), SCALE_LEVELS)
    cdf = np.empty((SCALE_LEVELS, 2 * J + 1), dtype=np.int64)
    for level, s24 in enumerate(scale24.tolist()):
        # z = j / (64 * scale) = (j * 2^18) / scale24. Only j >= 0 up to the end of Phi's table
        # (|z| < 8, so j < scale24 / 2^15) is computed: beyond it Phi is 2^CDF_BITS, and
        # normal_cdf_fixed's negative side is exactly 2^CDF_BITS minus the positive one. Half
        # of the 2.6M entries or fewer, so a process's first coding call is ~0.2 s quicker.
        live = min(J, -(-s24 >> 15) + 1)
        j = np.arange(live + 1, dtype=np.int64)
        half = np.full(J + 1, 1 << CDF_BITS, dtype=np.int64)
        half[:live + 1] = intmath.normal_cdf_fixed(j << 18, np.int64(s24), CDF_BITS)
        cdf[level, J:] = half
        cdf[level, :J] = (1 << CDF_BITS) - half[:0:-1]  # Phi(-z) = 1 - Phi(z), j = -J..-1
    weight = intmath.weight_table(LOGIT_STEPS, MAX_LOGIT_GAP, WEIGHT_BITS)
    tail = Fraction(TAIL_SIGMAS_FRACTION)
    radius = -((-scale24 * tail.numerator) // (tail.denominator << 24))  # ceil(5 * scale)
    return _assemble(cdf, weight, radius.astype(np.int64))


def tables_checksum() -> str:
    """A digest of the integer tables; pinned in tests so a platform that builds them
    differently is caught before it writes incompatible bitstreams."""
    import hashlib

    t = tables()
    h = hashlib.sha256()
    for arr in (t.cdf, t.weight, t.support_radius):
        h.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# A symbol's integer parameters.
# --------------------------------------------------------------------------------------


@dataclass
class SnappedParams:
    """Integer mixture parameters for n symbols, K components each (numpy int64, (n, K)):
    the mean in 1/MEAN_STEPS, the scale level and the component's weight."""

    mean_q: np.ndarray
    level: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return self.mean_q.shape[0]


def snap_integer(mean_q: torch.Tensor, level: torch.Tensor, logit_q: torch.Tensor) -> SnappedParams:
    """Integer parameters from the exact entropy model, (n, K) int64 each, on any device ->
    SnappedParams (weights from the logits' gaps). Integer operations only."""
    t = tables()
    gap = (logit_q.max(dim=-1, keepdim=True).values - logit_q).clamp(max=MAX_LOGIT_GAP)
    mean_q, level, gap = (a.to("cpu", torch.int64).numpy() for a in (mean_q, level, gap))
    return SnappedParams(mean_q=mean_q, level=level, weight=t.weight[gap])


def mixture_mean_q(mean_q: torch.Tensor, logit_q: torch.Tensor) -> torch.Tensor:
    """The mixture's mean in 1/MEAN_STEPS units, rounded half up, from integer parameters
    (..., K) int64 -> (...) int64: the coder's own weights, integer operations only, so
    every device gives the same value (previews fill undecoded tokens with it)."""
    t = tables()
    gap = (logit_q.max(dim=-1, keepdim=True).values - logit_q).clamp(max=MAX_LOGIT_GAP)
    weight = torch.as_tensor(t.weight, device=gap.device)[gap]  # (..., K)
    num, den = (weight * mean_q).sum(-1), weight.sum(-1)  # den >= 2^WEIGHT_BITS
    return torch.div(2 * num + den, 2 * den, rounding_mode="floor")


# --------------------------------------------------------------------------------------
# Probability tables per symbol.
# --------------------------------------------------------------------------------------


@dataclass
class _Plan:
    center: np.ndarray  # (n,) int64
    radius_class: np.ndarray  # (n,) index into R_CLASSES


def _plan(p: SnappedParams) -> _Plan:
    """Each symbol's support: the rounded mixture mean and the radius class that covers the
    reach of every component with weight. (Explicit loops over the K components: numpy's
    reductions over a short last axis are several times slower.)"""
    t = tables()
    K = p.weight.shape[1]
    total_w = p.weight[:, 0].copy()  # > 0: the top component always has weight 2^WEIGHT_BITS
    num = p.weight[:, 0] * p.mean_q[:, 0]
    for k in range(1, K):
        total_w += p.weight[:, k]
        num += p.weight[:, k] * p.mean_q[:, k]
    den = total_w * MEAN_STEPS
    center = np.floor_divide(2 * num + den, 2 * den)  # round(num / den), exact
    # Spread: how far a component with weight reaches from the center, in integers.
    center_q = center * MEAN_STEPS
    reach = np.zeros_like(center)
    for k in range(K):
        reach_k = t.support_radius[p.level[:, k]] + np.abs(np.floor_divide(p.mean_q[:, k] - center_q, MEAN_STEPS))
        np.maximum(reach, np.where(p.weight[:, k] > 0, reach_k, 0), out=reach)
    radius_class = np.searchsorted(np.asarray(R_CLASSES), reach, side="left")
    radius_class = np.minimum(radius_class, len(R_CLASSES) - 1)
    return _Plan(center=center, radius_class=radius_class)


_RUNS: dict[int, torch.Tensor] = {}


def _runs(num_edges: int) -> torch.Tensor:
    """Every run of `num_edges` consecutive entries of the flattened cdf_by_phase, as the
    rows of a strided view (no copy). Gathering whole rows with torch's index_select is 2 to
    3x faster than numpy's fancy indexing (measured on one CPU thread)."""
    runs = _RUNS.get(num_edges)
    if runs is None:
        flat = torch.from_numpy(tables().cdf_by_phase.reshape(-1))
        runs = _RUNS[num_edges] = flat.as_strided((flat.numel() - num_edges + 1, num_edges), (1, 1))
    return runs


def _coding_batches(p: SnappedParams) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """The symbols of `p` by support radius, in coding order: for each class of R_CLASSES
    that occurs, (radius, idx, center, probs) with idx the symbols' ascending indices,
    center (n_c,) and probs (n_c, 2R+3) float64 unnormalised probabilities of
    [escape below, c-R .. c+R, escape above]."""
    t = tables()
    lib = cpu_kernels.library()
    if lib is not None:
        yield from _kernel_batches(p, lib, t)
        return
    J = t.half_width
    row_len = t.cdf_by_phase.shape[2]
    plan = _plan(p)
    radius = np.asarray(R_CLASSES)[plan.radius_class]  # (n,)
    # Bin edges v - 1/2 for v = c-R .. c+R+1, in 1/MEAN_STEPS units. Edge e of component k
    # sits at rel0 + e*MEAN_STEPS in the extended table; clipping rel0 to [-J - margin, J]
    # keeps every edge inside the saturated margins with unchanged values.
    first_edge = (plan.center - radius) * MEAN_STEPS - MEAN_STEPS // 2  # (n,)
    rel0 = np.clip(first_edge[:, None] - p.mean_q, -J - t.margin, J) + J + t.margin  # (n, K)
    # Where the run of component k starts: row (level, phase) of cdf_by_phase, offset in it,
    # as one index into the flattened table.
    start = (p.level * MEAN_STEPS + rel0 % MEAN_STEPS) * row_len + rel0 // MEAN_STEPS  # (n, K)
    weight = p.weight.astype(np.int32)
    for cls, r in enumerate(R_CLASSES):
        idx = np.nonzero(plan.radius_class == cls)[0]
        if idx.size:
            yield r, idx, plan.center[idx], _probabilities(start[idx], weight[idx], r)


_CLASSES = np.asarray(R_CLASSES, dtype=np.int64)


def _kernel_batches(p: SnappedParams, lib, t: Tables) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """_coding_batches in one C pass (csrc/exact_kernels.c, m2t_coding_plan: the same integer
    steps as _plan and the starts above), the symbols already grouped by class, so each
    class's rows are contiguous slices: no fancy indexing per class."""
    mean_q, level, weight = (np.ascontiguousarray(a, dtype=np.int64) for a in (p.mean_q, p.level, p.weight))
    n, K = mean_q.shape
    counts = np.empty(len(R_CLASSES), dtype=np.int64)
    order, center, scratch = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64), np.empty(2 * n, dtype=np.int64)
    start, grouped_weight = np.empty((n, K), dtype=np.int64), np.empty((n, K), dtype=np.int32)
    if lib.coding_plan(mean_q.ctypes.data, level.ctypes.data, weight.ctypes.data, n, K, t.support_radius.ctypes.data,
                       len(t.support_radius), _CLASSES.ctypes.data, len(R_CLASSES), MEAN_STEPS, t.half_width,
                       t.margin, t.cdf_by_phase.shape[2], scratch.ctypes.data, counts.ctypes.data, order.ctypes.data,
                       center.ctypes.data, start.ctypes.data, grouped_weight.ctypes.data):
        raise ValueError(f"scale levels outside [0, {len(t.support_radius)}): not the exact entropy model's parameters")
    a = 0
    for r, count in zip(R_CLASSES, counts.tolist()):
        if count:
            b = a + count
            yield r, order[a:b], center[a:b], _probabilities(start[a:b], grouped_weight[a:b], r)
            a = b


def _probabilities(start: np.ndarray, weight: np.ndarray, radius: int) -> np.ndarray:
    """start, weight (n, K) -> (n, 2R+3) float64 unnormalised probabilities.

    Integer arithmetic (int32 suffices: CDF_BITS + WEIGHT_BITS + log2(K) < 31), so the
    result does not depend on the library or the thread count; the float64 result holds
    small integers exactly.
    """
    num_edges = 2 * radius + 2
    n, K = weight.shape
    lib, table = cpu_kernels.library(), tables().cdf_by_phase
    if lib is not None and table.dtype == np.int32 and table.flags.c_contiguous:  # one pass (csrc/exact_kernels.c)
        start, weight = np.ascontiguousarray(start, dtype=np.int64), np.ascontiguousarray(weight, dtype=np.int32)
        out = np.empty((n, num_edges + 1), dtype=np.float64)
        lib.mixture_pmf(table.ctypes.data, start.ctypes.data, weight.ctypes.data, n, K, num_edges, CDF_BITS,
                        CODER_PRECISION, out.ctypes.data)
        return out
    runs = _runs(num_edges)
    start_t = torch.from_numpy(np.ascontiguousarray(start.T))  # (K, n) int64
    weight_t = torch.from_numpy(np.ascontiguousarray(weight.T))  # (K, n) int32
    # cdf[:, 1:-1] = sum_k weight_k * CDF_k(edges); cdf[:, 0] = 0; cdf[:, -1] = total weight.
    cdf = torch.zeros((n, num_edges + 2), dtype=torch.int32)
    inner = cdf[:, 1:-1]
    for k in range(K):
        run = runs.index_select(0, start_t[k])  # (n, E) int32
        run.mul_(weight_t[k, :, None])
        inner.add_(run)
    total = weight_t.sum(dim=0, dtype=torch.int32) << CDF_BITS  # (n,)
    cdf[:, -1] = total
    pmf = (cdf[:, 1:] - cdf[:, :-1]).to(torch.float64)  # (n, 2R+3)
    # Floor every bin at 2^-CODER_PRECISION of the total: every bin stays codable, and no
    # bin relies on the coder's own rounding floor, so estimate_bits matches the real size.
    pmf.add_(((total >> CODER_PRECISION) + 1)[:, None])
    return pmf.numpy()


def _escape_parts(distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Elias-gamma split of distance >= 0: (length-1, low bits) with u = distance + 1."""
    u = distance + 1
    length = np.floor(np.log2(u.astype(np.float64))).astype(np.int64) + 1
    # Exact correction for float log2 at powers of two.
    length = np.where((1 << length) <= u, length + 1, length)
    length = np.where((1 << (length - 1)) > u, length - 1, length)
    return length - 1, u - (1 << (length - 1))


def estimate_bits(symbols: np.ndarray, p: SnappedParams) -> float:
    """Ideal code length in bits of `symbols` under the snapped model, escapes included
    (the range coder adds a few bytes of overhead on top)."""
    bits = 0.0
    for radius, idx, center, probs in _coding_batches(p):
        values = symbols[idx]
        index = _symbol_index(values, center, radius)
        chosen = probs[np.arange(idx.size), index]
        bits += float(-np.log2(chosen / probs.sum(axis=1)).sum())
        # An escaped value also pays for its Elias-gamma distance: a uniform length prefix
        # and (length - 1) uniform low bits.
        distance = np.where(index == 0, center - radius - 1 - values, values - (center + radius + 1))
        escaped = (index == 0) | (index == 2 * radius + 2)
        if escaped.any():
            length_minus_1, _ = _escape_parts(distance[escaped])
            bits += float(escaped.sum() * np.log2(ESCAPE_LENGTH_ALPHABET) + length_minus_1.sum())
    return bits


def _symbol_index(values: np.ndarray, center: np.ndarray, radius: int) -> np.ndarray:
    return np.clip(values - center + radius + 1, 0, 2 * radius + 2)


class SymbolEncoder:
    """Appends symbols to one range-coded stream; mirror of SymbolDecoder."""

    def __init__(self) -> None:
        self._coder = constriction.stream.queue.RangeEncoder()

    def encode(self, values: np.ndarray, params: SnappedParams) -> None:
        values = np.asarray(values, dtype=np.int64)
        if values.shape != (len(params),):
            raise ValueError(f"expected {len(params)} symbols, got shape {values.shape}")
        if values.size == 0:
            return
        if np.abs(values).max() > MAX_ABS_SYMBOL:
            raise ValueError(f"symbol magnitude exceeds {MAX_ABS_SYMBOL}; clamp y_hat first")
        escapes = []
        for radius, idx, center, probs in _coding_batches(params):
            vals = values[idx]
            index = _symbol_index(vals, center, radius)
            self._coder.encode(index.astype(np.int32), _FAMILY, probs)
            below = center - radius - 1 - vals  # >= 0 where index == 0
            above = vals - (center + radius + 1)  # >= 0 where index == 2R+2
            escapes.append(np.where(index == 0, below, np.where(index == 2 * radius + 2, above, -1)))
        distance = np.concatenate(escapes)
        distance = distance[distance >= 0]
        if distance.size:
            length_minus_1, low = _escape_parts(distance)
            self._coder.encode(
                length_minus_1.astype(np.int32), _UNIFORM,
                np.full(distance.size, ESCAPE_LENGTH_ALPHABET, dtype=np.int32),
            )
            has_low = length_minus_1 > 0
            if has_low.any():
                self._coder.encode(
                    low[has_low].astype(np.int32), _UNIFORM,
                    (1 << length_minus_1[has_low]).astype(np.int32),
                )

    def num_words(self) -> int:
        """Words the stream would have if it ended here (what is written plus the words
        that seal the coder's state)."""
        return self._coder.num_words()

    def finish(self) -> bytes:
        words = self._coder.get_compressed()
        return words.astype("<u4").tobytes()


class SymbolDecoder:
    """Reads symbols back in the order SymbolEncoder wrote them."""

    def __init__(self, payload: bytes) -> None:
        if len(payload) % 4:
            raise ValueError("entropy-coded payload length is not a multiple of 4 bytes")
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        self._coder = constriction.stream.queue.RangeDecoder(words)

    def decode(self, params: SnappedParams) -> np.ndarray:
        n = len(params)
        values = np.zeros(n, dtype=np.int64)
        if n == 0:
            return values
        escape_slots = []
        for radius, idx, center, probs in _coding_batches(params):
            index = np.asarray(self._coder.decode(_FAMILY, probs), dtype=np.int64)
            values[idx] = center - radius - 1 + index
            # Escapes: sign -1 below, +1 above; base value is the first value outside the support.
            esc_below, esc_above = index == 0, index == 2 * radius + 2
            sign = np.where(esc_below, -1, np.where(esc_above, 1, 0))
            base = np.where(esc_below, center - radius - 1, center + radius + 1)
            escape_slots.append((idx, sign, base))
        slots = np.concatenate([s[0] for s in escape_slots])
        signs = np.concatenate([s[1] for s in escape_slots])
        bases = np.concatenate([s[2] for s in escape_slots])
        keep = signs != 0
        slots, signs, bases = slots[keep], signs[keep], bases[keep]
        if slots.size:
            length_minus_1 = np.asarray(
                self._coder.decode(_UNIFORM, np.full(slots.size, ESCAPE_LENGTH_ALPHABET, dtype=np.int32)),
                dtype=np.int64,
            )
            low = np.zeros(slots.size, dtype=np.int64)
            has_low = length_minus_1 > 0
            if has_low.any():
                low[has_low] = self._coder.decode(_UNIFORM, (1 << length_minus_1[has_low]).astype(np.int32))
            distance = (1 << length_minus_1) + low - 1
            values[slots] = bases + signs * distance
        return values
