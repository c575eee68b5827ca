"""Entropy coding of latent symbols: integer parameters, range coding round trips, code length."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (must be set before torch is imported; a
# value set by the user wins). On a shared 2-core machine a spinning 2-thread torch runs
# the codec's many small ops up to ~30x slower; how work is split between threads, and so
# every number computed, is unchanged (checked: identical bitstreams either way).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import math

import numpy as np
import pytest
import torch

from m2t_core import entropy_coding as ec
from m2t_core.entropy_coding import (MAX_ABS_SYMBOL, SnappedParams, SymbolDecoder, SymbolEncoder,
                                     estimate_bits, snap_integer)

# Pinned: a platform that builds different integer tables writes bitstreams no other
# platform can read. Change only together with a bitstream format version bump.
TABLES_CHECKSUM = "dcad8e90b1065e84"  # integer-only tables (since format version 2; every machine)


def test_tables_checksum_is_pinned():
    """The tables come from integer-only code: the same digest on every machine."""
    assert ec.tables_checksum() == TABLES_CHECKSUM


def test_tables_are_sane():
    t = ec.tables()
    assert t.cdf.dtype == np.int64 and t.cdf.shape == (ec.SCALE_LEVELS, 2 * t.half_width + 1)
    assert (np.diff(t.cdf, axis=1) >= 0).all()  # CDFs are monotone
    assert (t.cdf[:, 0] == 0).all() and (t.cdf[:, -1] == 1 << ec.CDF_BITS).all()
    assert t.weight[0] == 1 << ec.WEIGHT_BITS and (np.diff(t.weight) <= 0).all()
    assert (np.diff(t.support_radius) >= 0).all()


# ----------------------------------------------------------------------------- helpers


def _random_params(rng, n, K=3, mean_sd=4.0, log_scale=(-3.0, 4.5), logit_sd=2.0):
    means = torch.from_numpy(rng.normal(0, mean_sd, (n, K)).astype(np.float32))
    log_scales = torch.from_numpy(rng.uniform(*log_scale, (n, K)).astype(np.float32))
    logits = torch.from_numpy(rng.normal(0, logit_sd, (n, K)).astype(np.float32))
    return means, log_scales, logits


def _integer(means, log_scales, logits) -> SnappedParams:
    """Mixture parameters in natural units -> the coder's integer parameters (the units the
    exact entropy model outputs: mean in 1/64, scale level, logit in 1/8), via snap_integer."""
    clean = lambda x: torch.nan_to_num(x.double(), nan=0.0, posinf=1e30, neginf=-1e30)  # noqa: E731
    mean_q = torch.round(clean(means).clamp(-MAX_ABS_SYMBOL, MAX_ABS_SYMBOL) * ec.MEAN_STEPS)
    level = torch.round((clean(log_scales) - ec.LOG_SCALE_MIN) / ec.LOG_SCALE_STEP).clamp(0, ec.SCALE_LEVELS - 1)
    logit_q = torch.round(clean(logits).clamp(-4096, 4096) * ec.LOGIT_STEPS)
    return snap_integer(*(x.to(torch.int64) for x in (mean_q, level, logit_q)))


def _sample(rng, means, log_scales, logits):
    """Integers drawn (approximately) from the mixtures: typical symbols, few escapes."""
    n, K = means.shape
    w = torch.softmax(logits.double(), -1).numpy()
    k = (w.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    mu = means.numpy()[np.arange(n), k]
    sd = np.exp(np.clip(log_scales.numpy()[np.arange(n), k], ec.LOG_SCALE_MIN, ec.LOG_SCALE_MAX))
    v = np.round(mu + sd * rng.normal(size=n)).astype(np.int64)
    return np.clip(v, -MAX_ABS_SYMBOL, MAX_ABS_SYMBOL)


def _roundtrip(chunks):
    """chunks: list of (values, SnappedParams), coded into one stream in order."""
    enc = SymbolEncoder()
    for values, params in chunks:
        enc.encode(values, params)
    data = enc.finish()
    assert isinstance(data, bytes) and len(data) % 4 == 0
    dec = SymbolDecoder(data)
    for values, params in chunks:
        out = dec.decode(params)
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, values)
    return data


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("K", [1, 3])
def test_roundtrip_random_params(seed, K):
    rng = np.random.default_rng(seed)
    chunks = []
    for n in (1, 7, 500, 3000):
        m, ls, lg = _random_params(rng, n, K, mean_sd=rng.choice([0.5, 5.0, 200.0]))
        vals = _sample(rng, m, ls, lg)
        # A few values far outside every support: they must escape and come back exactly.
        far = rng.choice(n, size=max(1, n // 50), replace=False)
        vals[far] = rng.integers(-MAX_ABS_SYMBOL, MAX_ABS_SYMBOL + 1, size=far.size)
        chunks.append((vals, _integer(m, ls, lg)))
    _roundtrip(chunks)


def test_roundtrip_extreme_params():
    rng = np.random.default_rng(11)
    n, K = 4000, 3
    big = float(MAX_ABS_SYMBOL)
    mean_choices = np.array([0.0, 0.49, -0.5, 1e6, -1e6, big, -big, big - 0.3, 1e30, -1e30,
                             np.nan, np.inf, -np.inf, 12345.678], dtype=np.float32)
    ls_choices = np.array([-50.0, -10.0, ec.LOG_SCALE_MIN, 0.0, ec.LOG_SCALE_MAX, 10.0, 50.0, 1e30,
                           np.nan, np.inf, -np.inf], dtype=np.float32)
    lg_choices = np.array([0.0, -1e30, 1e30, 50.0, -50.0, np.nan, np.inf, -np.inf, 4096.0, 1e-3],
                          dtype=np.float32)
    m = torch.from_numpy(rng.choice(mean_choices, (n, K)))
    ls = torch.from_numpy(rng.choice(ls_choices, (n, K)))
    lg = torch.from_numpy(rng.choice(lg_choices, (n, K)))
    params = _integer(m, ls, lg)
    for a in (params.mean_q, params.level, params.weight):
        assert a.dtype == np.int64 and a.shape == (n, K)
    assert np.abs(params.mean_q).max() <= MAX_ABS_SYMBOL * ec.MEAN_STEPS
    assert params.level.min() >= 0 and params.level.max() < ec.SCALE_LEVELS
    assert (params.weight.max(axis=1) == 1 << ec.WEIGHT_BITS).all()
    value_choices = np.array([0, 1, -1, MAX_ABS_SYMBOL, -MAX_ABS_SYMBOL, MAX_ABS_SYMBOL - 1,
                              -MAX_ABS_SYMBOL + 1, 12346, -12346, 4, -300], dtype=np.int64)
    vals = rng.choice(value_choices, n)
    _roundtrip([(vals, params)])


def test_extreme_values_escape_and_come_back():
    n = 64
    zeros = torch.zeros(n, 3)
    tight = torch.full((n, 3), -10.0)  # smallest scale: support of a few integers
    params = _integer(zeros, tight, zeros)
    vals = np.array([MAX_ABS_SYMBOL, -MAX_ABS_SYMBOL] * (n // 2), dtype=np.int64)
    data = _roundtrip([(vals, params)])
    # Each escaped value costs its escape bin plus an Elias-gamma code of ~15 bits.
    assert 8 * len(data) > n * 15
    # Means pinned at one extreme, values at the other: the longest possible escape.
    far = _integer(torch.full((n, 3), float(MAX_ABS_SYMBOL)), tight, zeros)
    _roundtrip([(-vals, far), (vals, far)])


def test_empty_arrays():
    empty = _integer(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3))
    assert len(empty) == 0
    enc = SymbolEncoder()
    enc.encode(np.zeros(0, dtype=np.int64), empty)
    one = _integer(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3))
    enc.encode(np.array([2]), one)
    enc.encode(np.zeros(0, dtype=np.int64), empty)
    dec = SymbolDecoder(enc.finish())
    assert dec.decode(empty).shape == (0,)
    assert dec.decode(one).tolist() == [2]
    assert dec.decode(empty).shape == (0,)
    # A stream with nothing in it at all.
    enc = SymbolEncoder()
    enc.encode(np.zeros(0, dtype=np.int64), empty)
    assert SymbolDecoder(enc.finish()).decode(empty).shape == (0,)


def test_values_beyond_max_abs_symbol_raise():
    params = _integer(torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3, 3))
    for bad in (MAX_ABS_SYMBOL + 1, -MAX_ABS_SYMBOL - 1, 2**40):
        with pytest.raises(ValueError):
            SymbolEncoder().encode(np.array([0, bad, 0], dtype=np.int64), params)


def test_wrong_symbol_count_raises():
    params = _integer(torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError):
        SymbolEncoder().encode(np.zeros(4, dtype=np.int64), params)
    with pytest.raises(ValueError):
        SymbolEncoder().encode(np.zeros((3, 1), dtype=np.int64), params)


def test_payload_length_must_be_whole_words():
    with pytest.raises(ValueError):
        SymbolDecoder(b"\x00\x01\x02")


# ----------------------------------------------------------------------------- code length


def _code_length_bits(values, params):
    enc = SymbolEncoder()
    enc.encode(values, params)
    return 8 * len(enc.finish())


@pytest.mark.parametrize("seed,mean_sd,log_scale", [
    (0, 4.0, (-3.0, 4.5)),  # mixed scales
    (1, 0.3, (-3.0, -1.0)),  # peaked: most mass on one integer
    (2, 50.0, (2.0, 4.2)),  # wide distributions, big supports
])
def test_code_length_matches_estimate(seed, mean_sd, log_scale):
    rng = np.random.default_rng(seed)
    m, ls, lg = _random_params(rng, 20000, 3, mean_sd, log_scale)
    params = _integer(m, ls, lg)
    vals = _sample(rng, m, ls, lg)
    est = estimate_bits(vals, params)
    actual = _code_length_bits(vals, params)
    assert est > 0
    assert abs(actual - est) <= 0.01 * est + 64, (actual, est)


def test_code_length_matches_estimate_with_escapes():
    """estimate_bits is documented as the exact ideal code length of the symbols under the
    snapped model; values outside the support are part of that code (escape bin + Elias-gamma
    distance), so they must be counted too."""
    rng = np.random.default_rng(5)
    n = 20000
    m, ls, lg = _random_params(rng, n, 3)
    params = _integer(m, ls, lg)
    vals = _sample(rng, m, ls, lg)
    vals[::10] = rng.integers(-MAX_ABS_SYMBOL, MAX_ABS_SYMBOL + 1, size=vals[::10].size)
    est = estimate_bits(vals, params)
    actual = _code_length_bits(vals, params)
    assert abs(actual - est) <= 0.01 * est + 64, (
        f"coded {actual} bits, estimate_bits says {est:.0f} ({actual / est - 1:+.1%})")


def test_estimate_matches_ideal_from_continuous_model():
    """Sanity of the integer model: close to the float mixture's own ideal code length."""
    from m2t_core.network import MixtureParams, mixture_likelihood

    rng = np.random.default_rng(3)
    m, ls, lg = _random_params(rng, 20000, 3, mean_sd=3.0, log_scale=(-1.0, 3.0))
    vals = _sample(rng, m, ls, lg)
    lik = mixture_likelihood(torch.from_numpy(vals.astype(np.float32))[:, None],
                             MixtureParams(m[:, None], ls[:, None], lg[:, None]))
    ideal = float(-torch.log2(lik.double()).sum())
    est = estimate_bits(vals, _integer(m, ls, lg))
    assert abs(est - ideal) <= 0.02 * ideal, (est, ideal)


# ----------------------------------------------------------------------------- integer parameters


def _assert_snapped_equal(a: SnappedParams, b: SnappedParams):
    np.testing.assert_array_equal(a.mean_q, b.mean_q)
    np.testing.assert_array_equal(a.level, b.level)
    np.testing.assert_array_equal(a.weight, b.weight)


def test_snap_integer_is_layout_invariant():
    rng = np.random.default_rng(7)
    n, K = 5000, 3
    mean_q = torch.from_numpy(rng.integers(-3000, 3000, (n, K)))
    level = torch.from_numpy(rng.integers(0, ec.SCALE_LEVELS, (n, K)))
    logit_q = torch.from_numpy(rng.integers(-900, 900, (n, K)))
    ref = snap_integer(mean_q, level, logit_q)
    # Permuted rows -> permuted parameters.
    perm = torch.from_numpy(rng.permutation(n))
    _assert_snapped_equal(snap_integer(mean_q[perm], level[perm], logit_q[perm]),
                          SnappedParams(ref.mean_q[perm], ref.level[perm], ref.weight[perm]))
    # Computed in pieces (as the codec does, step by step) -> the same.
    pieces = [snap_integer(mean_q[a:a + 777], level[a:a + 777], logit_q[a:a + 777]) for a in range(0, n, 777)]
    _assert_snapped_equal(SnappedParams(*(np.concatenate([getattr(q, f) for q in pieces])
                                          for f in ("mean_q", "level", "weight"))), ref)
    # Non-contiguous views of a bigger (B, T, C, K) tensor (the network's output layout).
    big = torch.zeros(3, K, n, 2, dtype=torch.int64)
    big[1, :, :, 1] = mean_q.T
    view = big[1, :, :, 1].T  # (n, K), strided
    assert not view.is_contiguous()
    _assert_snapped_equal(snap_integer(view, level.T.contiguous().T, logit_q), ref)
    # Component order: permuting the K components permutes them in the result.
    kperm = [2, 0, 1]
    _assert_snapped_equal(snap_integer(mean_q[:, kperm], level[:, kperm], logit_q[:, kperm]),
                          SnappedParams(ref.mean_q[:, kperm], ref.level[:, kperm], ref.weight[:, kperm]))


def test_snap_integer_weights_from_logit_gaps():
    mean_q = torch.tensor([[0, 64, -160], [0, 2, 6400]])
    level = torch.tensor([[0, ec.SCALE_LEVELS - 1, 0], [ec.SCALE_LEVELS - 1, 5, 0]])
    logit_q = torch.tensor([[0, 0, -800], [8, 0, 1]])
    p = snap_integer(mean_q, level, logit_q)
    assert p.mean_q.tolist() == mean_q.tolist() and p.level.tolist() == level.tolist()
    # The top logit weighs 2^WEIGHT_BITS; a gap of g (in 1/8) weighs round(256 exp(-g/8));
    # gaps beyond MAX_LOGIT_GAP weigh nothing.
    assert p.weight.tolist()[0] == [256, 256, 0]
    assert p.weight.tolist()[1] == [256, int(round(256 * math.exp(-1))), int(round(256 * math.exp(-7 / 8)))]
