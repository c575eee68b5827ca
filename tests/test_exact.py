"""The exact entropy model: its integer outputs do not depend on how they are computed.

For the shipped models and random-init ones, the coding parameters of a window (integers)
are compared bit for bit: alone, batched with windows of 1..64 other images, M2T's
teacher-forced pass against the incremental loop with and without the key/value cache,
with 1 and 2 torch threads. Also: the exactness bound of every layer, the integer tables'
digests, the integer helpers against Python's integers, and the quantisation-aware float
forward against the integer path.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from m2t_core import entropy_coding as ec
from m2t_core import exact as X
from m2t_core import intmath
from m2t_core import network as N
from m2t_core.registry import PACKAGE_WEIGHTS, load_checkpoint

from _models import build_model, small_config, tiny_config, torch_threads

INTMATH_DIGEST = "a3e35bd53bd8cda7"  # exp, GELU and Phi tables (integer-only code)


def _shipped():
    return sorted(p.stem for p in PACKAGE_WEIGHTS.glob("*.safetensors"))


def _model(name: str):
    if name == "tiny-m2t":
        return build_model(tiny_config("m2t"), seed=3)
    if name == "tiny-mt":
        return build_model(tiny_config("mt"), seed=3)
    if name == "small-m2t":
        return build_model(small_config("m2t"), seed=3)
    return load_checkpoint(PACKAGE_WEIGHTS / f"{name}.safetensors")


MODELS = ["tiny-m2t", "tiny-mt", "small-m2t"] + _shipped()


def _windows(model, n: int, seed: int) -> torch.Tensor:
    """n windows of plausible latents (B, L, C) int64: mostly small values, some large."""
    gen = torch.Generator().manual_seed(seed)
    L, C = model.cfg.tokens_per_window, model.cfg.C
    base = torch.randint(-3, 4, (n, L, C), generator=gen)
    spikes = torch.randint(-300, 301, (n, L, C), generator=gen) * (torch.rand(n, L, C, generator=gen) < 0.01)
    return base + spikes


def _all_steps(model, tokens: torch.Tensor, use_cache: bool = True) -> list[X.IntParams]:
    """The decoder's loop: parameters of every step for windows `tokens` (B, L, C)."""
    ops = X.CodingOps(model.exact)
    state = N.DecodeState()
    known = torch.zeros_like(tokens)
    out = []
    for group in model.layout.sched.groups:
        out.append(N.step(ops, known, state, use_cache))
        g = torch.as_tensor(group)
        known[:, g] = tokens[:, g]
    return out


def _assert_same(a: X.IntParams, b: X.IntParams, what: str) -> None:
    for f in ("mean_q", "level", "logit_q"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype == torch.int64, what
        assert torch.equal(x, y), f"{what}: {f} differs in {(x != y).sum()} of {x.numel()} entries"


@pytest.mark.parametrize("name", MODELS)
def test_parameters_do_not_depend_on_batching_threads_or_cache(name):
    model = _model(name)
    target = _windows(model, 1, seed=1)
    with torch_threads(1):
        alone = _all_steps(model, target)
    # Batched with windows of other images: 1 other, and 64 others with the target in the middle.
    for others, pos, threads in ((1, 0, 2), (64, 37, 1)):
        batch = _windows(model, others + 1, seed=2 + others)
        batch[pos] = target[0]
        with torch_threads(threads):
            batched = _all_steps(model, batch)
        for i, (a, b) in enumerate(zip(alone, batched)):
            _assert_same(a, b.index(slice(pos, pos + 1)), f"{name} step {i}, batch of {others + 1}, {threads} threads")
    if model.cfg.mode == "m2t":
        with torch_threads(2):
            uncached = _all_steps(model, target, use_cache=False)
            teacher = N.m2t_teacher_forced(X.CodingOps(model.exact), target)
        for i, group in enumerate(model.layout.sched.groups):
            _assert_same(alone[i], uncached[i], f"{name} step {i}, without cache")
            _assert_same(alone[i], teacher.index((slice(None), torch.as_tensor(group))),
                         f"{name} step {i}, teacher-forced pass")


@pytest.mark.parametrize("name", MODELS)
def test_every_product_is_provably_exact(name):
    """The largest possible |partial sum| of every float64 product, from the integer weights
    and the activation bounds, stays below 2^53 (then any summation order is exact)."""
    model = _model(name)
    margin = model.exact.exactness_margin_bits()
    assert margin > 0, f"{name}: partial sums may reach 2^{53 - margin:.1f}"
    # The integer tensors really are in their ranges (the bound assumes it).
    for lin in model.exact.linears.values():
        assert lin.weight.dtype == torch.int16 and int(lin.weight.abs().max()) <= X.ACT_MAX
        assert int(lin.bias.abs().max()) < 2 ** 52
    print(f"{name}: exactness margin {margin:.1f} bits")


@pytest.mark.parametrize("name", ["tiny-m2t", "small-m2t"] + [n for n in _shipped() if n.endswith("q1")])
def test_the_eight_bit_model_rounds_each_row_to_int8_at_the_same_output_exponent(name):
    """Format 7's entropy model (X.eight_bit_weights): every weight row within +-127, each
    the 16-bit row divided by 2^k and rounded (halves up) at the smallest k that fits, its bias
    alike, w_exp and shift lowered by k (the output exponent stays); all else the same
    integers, its products provably exact; derived once and again only when `exact` changes."""
    model = _model(name)
    e8 = model.exact_model(7)
    assert model.exact_model(5) is model.exact and model.exact_model(7) is e8  # cached
    for key, lin in model.exact.linears.items():
        w, lin8 = lin.weight.long(), e8.linears[key]
        k = lin.shift - lin8.shift
        assert torch.equal(lin.w_exp - lin8.w_exp, k) and bool((k >= 0).all()), key
        half = torch.where(k > 0, 1 << (k - 1).clamp(min=0), 0)
        assert torch.equal(lin8.weight.long(), torch.div(w + half[:, None], (1 << k)[:, None], rounding_mode="floor"))
        assert torch.equal(lin8.bias, torch.div(lin.bias + half, 1 << k, rounding_mode="floor"))
        assert int(lin8.weight.abs().max()) <= X.WEIGHT8_MAX
        tighter = torch.div(w + (half[:, None] >> 1), (1 << (k - 1).clamp(min=0))[:, None], rounding_mode="floor")
        assert bool(((tighter.abs().amax(dim=1) > X.WEIGHT8_MAX) | (k == 0)).all()), f"{key}: k is not the smallest"
    rest = {k: v for k, v in e8.state_dict().items() if not k.startswith("linears.")}
    assert all(torch.equal(v, model.exact.state_dict()[k]) for k, v in rest.items())
    assert e8.exactness_margin_bits() > 0
    if name in _shipped():
        return  # below, a built model's integers change (a loaded one may be shared)
    head = model.exact.linears["head"]
    k = head.shift - e8.linears["head"].shift
    with torch.no_grad():
        head.bias.add_(1 << 12)  # the exact model changes (an export would): the 8-bit one follows
    half = torch.where(k > 0, 1 << (k - 1).clamp(min=0), 0)
    again = model.exact_model(7)
    assert again is not e8 and torch.equal(again.linears["head"].bias,
                                           torch.div(head.bias + half, 1 << k, rounding_mode="floor"))


def test_large_products_stay_exact_in_any_order():
    """The float64 products the model relies on, at the bound: summed forwards, backwards
    and blocked, the result is the same integer (a float32 product would not be)."""
    rng = np.random.default_rng(0)
    x = rng.integers(-X.ACT_MAX, X.ACT_MAX + 1, size=(4, 3072)).astype(np.float64)
    w = rng.integers(-X.ACT_MAX, X.ACT_MAX + 1, size=(3072, 8)).astype(np.float64)
    exact = (x.astype(object) @ w.astype(object)).astype(np.int64)
    for order in (slice(None), slice(None, None, -1)):
        got = torch.from_numpy(np.ascontiguousarray(x[:, order])) @ torch.from_numpy(np.ascontiguousarray(w[order]))
        assert (got.numpy().astype(np.int64) == exact).all()
    blocked = sum(torch.from_numpy(x[:, s:s + 100]) @ torch.from_numpy(w[s:s + 100]) for s in range(0, 3072, 100))
    assert (blocked.numpy().astype(np.int64) == exact).all()


def test_integer_tables_are_pinned_and_right():
    assert intmath.tables_digest() == INTMATH_DIGEST
    exp = intmath.exp_table()
    ref = np.round(2 ** 15 * np.exp(-np.arange(exp.size) / 256))
    assert np.abs(exp - ref).max() <= 1
    gelu = intmath.gelu_table()
    xs = np.arange(-intmath.GELU_HALF, intmath.GELU_HALF + 1) / 256
    ref = np.round(256 * xs * 0.5 * (1 + np.vectorize(math.erf)(xs / math.sqrt(2))))
    assert np.abs(gelu - ref).max() <= 1
    phi = intmath.phi_table() / 2.0 ** 40
    ref = np.array([0.5 * (1 + math.erf(i / 1024 / math.sqrt(2))) for i in range(phi.size)])
    assert np.abs(phi - ref).max() < 1e-11


def test_integer_helpers_match_python_integers():
    rng = random.Random(0)
    n = [rng.randrange(0, 2 ** 62) for _ in range(2000)] + [0, 1, 2, 3, 4, 2 ** 62 - 1, (2 ** 31 - 1) ** 2]
    got = intmath.isqrt(torch.tensor(n, dtype=torch.int64)).tolist()
    assert got == [math.isqrt(v) for v in n]
    a = [rng.randrange(-2 ** 50, 2 ** 50) for _ in range(2000)]
    s = [rng.randrange(-3, 30) for _ in range(2000)]
    got = intmath.round_shift(torch.tensor(a), torch.tensor(s)).tolist()
    want = [(v << -k) if k <= 0 else (v + (1 << (k - 1))) >> k for v, k in zip(a, s)]
    assert got == want
    d = [rng.randrange(1, 2 ** 30) for _ in range(2000)]
    got = intmath.round_div(torch.tensor(a), torch.tensor(d)).tolist()
    assert got == [(2 * v + q) // (2 * q) for v, q in zip(a, d)]


@pytest.mark.parametrize("name", ["tiny-m2t", "tiny-mt"])
def test_quantisation_aware_forward_matches_the_integer_path(name):
    """Training's fake-quantised float forward sees (almost) the integer model's numbers:
    mean and logit within a few units (of 1/64 and 1/8), scale levels within one."""
    model = _model(name)
    tokens = _windows(model, 4, seed=9)
    masked = torch.rand(tokens.shape[:2], generator=torch.Generator().manual_seed(0)) < 0.5
    ints = X.IntOps(model.exact)
    fq = N.FloatOps(model.entropy_model, model.cfg, model.layout, model.exact, quant=True)
    with torch.no_grad():
        if model.cfg.mode == "m2t":
            a, p = N.m2t_teacher_forced(ints, tokens), N.m2t_teacher_forced(fq, tokens.float())
        else:
            a, p = N.mt_forward(ints, tokens, masked), N.mt_forward(fq, tokens.float(), masked)
    m, ls, lg = p.means, p.log_scales, p.logits
    mean_units = (m * 64 - a.mean_q).abs()
    assert float(mean_units.max()) <= 3 and float(mean_units.mean()) < 0.5
    level = torch.round((ls - ec.LOG_SCALE_MIN) / ec.LOG_SCALE_STEP)
    assert float((level - a.level).abs().max()) <= 1 and float((level != a.level).float().mean()) < 0.05
    assert float((lg * 8 - a.logit_q).abs().mean()) < 0.5


def test_export_is_stable_and_load_into_round_trips():
    """export(load_into(ints)) gives the same integers: a checkpoint's float entropy weights,
    rebuilt from its integers, re-export to exactly those integers."""
    model = _model("tiny-m2t")
    before = {k: v.clone() for k, v in model.exact.state_dict().items()}
    model.exact.load_into(model.entropy_model)
    model.exact.export_from(model.entropy_model)
    for k, v in model.exact.state_dict().items():
        assert torch.equal(v, before[k]), k


def _qat_bits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Bits of M2T windows `tokens` (B, L, C) under the network on the exact grid (QAT)."""
    ops = N.FloatOps(model.entropy_model, model.cfg, model.layout, model.exact, quant=True)
    return -torch.log2(N.mixture_likelihood(tokens, N.m2t_teacher_forced(ops, tokens))).sum()


def _coder_bits(model, tokens: torch.Tensor) -> float:
    """What the range coder pays for `tokens` (B, L, C) over the decoder's steps, from the
    exact model's integer parameters (entropy_coding.estimate_bits)."""
    ops, state = X.CodingOps(model.exact), N.DecodeState()
    known, total = torch.zeros_like(tokens, dtype=torch.int64), 0.0
    for group in model.layout.sched.groups:
        g = torch.as_tensor(group)
        flat = N.step(ops, known, state).flat(torch.ones(tokens.shape[0], len(group), dtype=torch.bool))
        total += ec.estimate_bits(tokens[:, g].to(torch.int64).reshape(-1).numpy(),
                                  ec.snap_integer(flat.mean_q, flat.level, flat.logit_q))
        known[:, g] = tokens[:, g].to(torch.int64)
    return total


def test_quantisation_aware_training_lowers_the_rate():
    """A few steps of QAT on fixed latents lower their rate under the exact grid, and the
    coder pays what the grid promises."""
    model = _model("tiny-m2t")
    tokens = _windows(model, 8, seed=4).float()
    model.calibrate_exact(tokens)
    with torch.no_grad():
        before = float(_qat_bits(model, tokens))
    opt = torch.optim.Adam(model.entropy_model.parameters(), lr=1e-3)
    model.entropy_model.train()
    for _ in range(15):
        loss = _qat_bits(model, tokens) / tokens.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.entropy_model.eval()
    with torch.no_grad():
        after = float(_qat_bits(model, tokens))
    assert after < 0.97 * before, (before, after)
    # The coder pays what the exact grid promises.
    model.sync_exact()
    assert abs(_coder_bits(model, tokens) / after - 1) < 0.02


@pytest.mark.parametrize("name", ["tiny-m2t", "tiny-mt", "small-m2t"] + [n for n in _shipped() if n.endswith("q3") or n.startswith("mt")])
@pytest.mark.parametrize("version", [5, 7])
def test_float64_carrier_equals_the_int64_reference(name, version):
    """The codec's arithmetic (Float64Ops: integers carried in float64; where this CPU's int8
    units are exact, its linears on them, one weight plane for format 7's 8-bit weights) gives
    exactly the integers of the int64 reference (IntOps), in every pass the codec runs."""
    model = _model(name)
    tokens = _windows(model, 3, seed=21)
    masked = torch.rand(tokens.shape[:2], generator=torch.Generator().manual_seed(2)) < 0.4
    exact = model.exact_model(version)
    ref, fast = X.IntOps(exact), X.CodingOps(exact)
    _assert_same(N.mt_forward(ref, tokens, masked), N.mt_forward(fast, tokens, masked), f"{name} MT pass")
    if model.cfg.mode == "m2t":
        _assert_same(N.m2t_teacher_forced(ref, tokens), N.m2t_teacher_forced(fast, tokens), f"{name} teacher-forced")
    s_ref, s_fast = N.DecodeState(), N.DecodeState()
    known = torch.zeros_like(tokens)
    for i, group in enumerate(model.layout.sched.groups):
        _assert_same(N.step(ref, known, s_ref), N.step(fast, known, s_fast), f"{name} step {i}")
        known[:, torch.as_tensor(group)] = tokens[:, torch.as_tensor(group)]


def test_float64_elementwise_steps_equal_the_int64_reference_at_their_limits():
    """Float64Ops' GELU and LayerNorm (rewritten in float64 for speed) against IntOps on the
    inputs whole passes rarely reach: GELU far beyond its table on both sides, and LayerNorm
    rows at +-RESIDUAL_MAX, constant rows (the variance is eps alone), rows with one spike,
    rows whose normalised values are exact halves (rounding ties), and random rows of every
    magnitude."""
    model = _model("m2t-small-q3")
    ref, fast = X.IntOps(model.exact), X.CodingOps(model.exact)
    half = intmath.GELU_HALF
    g = torch.cat([torch.arange(-3 * half, 3 * half + 1), torch.tensor([-N.RESIDUAL_MAX, N.RESIDUAL_MAX])])
    assert torch.equal(fast.gelu(g.double()).to(torch.int64), ref.gelu(g))
    D, gen = model.cfg.d_model, torch.Generator().manual_seed(5)
    # Ties: +-8192 with one pair moved to 8194 / 8190 keeps the mean 0 and puts the variance
    # in [2^42, (2^21 + 1)^2), so sigma = 2^21 and d 2^19 / sigma = d / 4 ends in .5 there.
    side = [8192] * (D // 2 - 2) + [8194, 8190]
    tie = torch.tensor(side + [-v for v in side])
    q = sum(v * v for v in tie.tolist())
    var = (q << 16) // D + X._ln_eps_int(model.exact.exp("residual"))
    assert math.isqrt(var) == 1 << 21 and N.ln_exponent(D) + X.LN_EXTRA_BITS == 19
    rows = [torch.full((D,), N.RESIDUAL_MAX), torch.full((D,), -N.RESIDUAL_MAX), torch.full((D,), 7), tie,
            torch.where(torch.arange(D) % 2 == 0, N.RESIDUAL_MAX, -N.RESIDUAL_MAX),
            torch.zeros(D).index_fill_(0, torch.tensor([3]), N.RESIDUAL_MAX)]
    rows += [torch.randint(-(1 << b), (1 << b) + 1, (D,), generator=gen) for b in range(0, 18) for _ in range(4)]
    r = torch.stack(rows).to(torch.int64)[None]  # (1, rows, D)
    for name in ("b0_norm1", "norm"):
        assert torch.equal(fast.layer_norm(name, r.double()).to(torch.int64), ref.layer_norm(name, r)), name


def test_float64_floor_division_is_exact_up_to_its_bound():
    """_floor_div_f64 (floor((a + 1/2) / b) in float64) against Python integers where a
    division is most likely to round across an integer: exact multiples and their
    neighbours, odd divisors whose reciprocals round, both signs, up to |a| < 2^50; with a
    Python float divisor (torch may multiply by its reciprocal) and with a tensor of them."""
    gen = random.Random(11)
    divisors = [1, 2, 3, 7, 192, 255, 3 * 2**20 + 1, 2**26 - 5, 2**49 - 1]
    divisors += [gen.randrange(1, 1 << gen.randrange(2, 50)) for _ in range(40)]
    for b in divisors:
        a = []
        for _ in range(12):
            k = gen.randrange(-((1 << 50) - 1) // b, ((1 << 50) - 1) // b + 1)
            a += [v for v in (k * b - 1, k * b, k * b + 1, k * b + b - 1) if abs(v) < 1 << 50]
        a += [(1 << 50) - 1, -((1 << 50) - 1), 0, -1, 1]
        want = torch.tensor([v // b for v in a], dtype=torch.float64)
        x = torch.tensor(a, dtype=torch.float64)
        assert torch.equal(X._floor_div_f64(x, float(b)), want), b
        assert torch.equal(X._floor_div_f64(x, torch.full_like(x, float(b))), want), b


@pytest.mark.parametrize("name", ["tiny-mt", "mt-small-q2"])
def test_mt_step_equals_the_full_pass_at_its_positions(name):
    """An MT decoding step runs the head on its own group's positions only; the parameters
    must be those of the full pass (every position) at those positions."""
    model = _model(name)
    tokens = _windows(model, 2, seed=8)
    ops, state = X.CodingOps(model.exact), N.DecodeState()
    known = torch.zeros_like(tokens)
    step_of = model.layout.tensor("position_step", tokens.device)
    for i, group in enumerate(model.layout.groups(tokens.device)):
        masked = (step_of >= i)[None, :].expand(tokens.shape[0], -1)
        full = N.mt_forward(ops, known, masked).index((slice(None), group))
        _assert_same(N.step(ops, known, state), full, f"{name} step {i}")
        known[:, group] = tokens[:, group]
