"""The fused C kernels of the exact arithmetic (m2t_core/cpu_kernels.py, csrc/exact_kernels.c)
give exactly the integers of the torch passes they replace, at the limits of their inputs:
the exact entropy model's LayerNorm and GELU against the int64 reference (exact.IntOps), and
the entropy coder's per-symbol supports and probabilities against its numpy and torch passes. (int8_linear's and
the integer g_s's kernels: tests/test_int8_linear.py, tests/test_int8_conv.py.) Integer
arithmetic, so these hold on every CPU kind; nothing here depends on the machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2t_core import cpu_kernels
from m2t_core import entropy_coding as ec
from m2t_core import exact as X
from m2t_core import intmath
from m2t_core.network import RESIDUAL_MAX

from _models import build_model, tiny_config


@pytest.fixture(scope="module")
def exact_model():
    return build_model(tiny_config("m2t"), seed=3).exact


def _rows(D: int, seed: int) -> torch.Tensor:
    """Residual rows (n, D) int64 of every shape LayerNorm meets: random, constant (variance
    0: sigma from eps alone), one spike, both extremes, tiny spreads."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(-RESIDUAL_MAX, RESIDUAL_MAX + 1, (D,), generator=g),
            torch.full((D,), RESIDUAL_MAX), torch.full((D,), -RESIDUAL_MAX), torch.zeros(D, dtype=torch.int64),
            torch.where(torch.arange(D) % 2 == 0, RESIDUAL_MAX, -RESIDUAL_MAX),
            torch.randint(-3, 4, (D,), generator=g), torch.randint(-300, 301, (D,), generator=g)]
    spike = torch.zeros(D, dtype=torch.int64)
    spike[D // 3] = -RESIDUAL_MAX
    return torch.stack(rows + [spike, spike + 5])


def test_layer_norm_kernel_equals_the_int64_reference(exact_model, monkeypatch):
    assert cpu_kernels.library() is not None
    name = next(iter(exact_model.norms))
    nrm = exact_model.norms[name]
    D = nrm.gamma.shape[0]
    saved = {k: v.clone() for k, v in nrm.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    try:
        for gamma, beta, shift in [(None, None, None),  # the model's own
                                   (torch.full((D,), 32767), torch.full((D,), 1 << 40), 20),
                                   (torch.full((D,), -32768), torch.full((D,), -(1 << 40)), 3),
                                   (torch.randint(-32768, 32768, (D,), generator=g), torch.zeros(D), 0),
                                   (torch.randint(-9, 10, (D,), generator=g), torch.randint(-99, 99, (D,)), -2)]:
            if gamma is not None:
                nrm.gamma.copy_(gamma.to(torch.int16))
                nrm.beta.copy_(beta.to(torch.int64))
                nrm.shift.fill_(shift)
            r = _rows(D, seed=int(nrm.shift))
            want = X.IntOps(exact_model).layer_norm(name, r)
            got = X.Float64Ops(exact_model).layer_norm(name, r.double().view(3, 3, D))  # any leading shape
            assert torch.equal(got.reshape(-1, D).long(), want), (gamma is None, shift)
            monkeypatch.setenv(cpu_kernels.ENV, "0")  # the torch passes agree too
            assert torch.equal(X.Float64Ops(exact_model).layer_norm(name, r.double()).long(), want)
            monkeypatch.delenv(cpu_kernels.ENV)
    finally:
        nrm.load_state_dict(saved)


def test_gelu_kernel_equals_the_int64_reference(exact_model):
    H = intmath.GELU_HALF
    edges = torch.tensor([-RESIDUAL_MAX, -2 * H - 1, -H - 1, -H, -H + 1, -1, 0, 1, H - 1, H, H + 1, 2 * H,
                          RESIDUAL_MAX])
    g = torch.cat([torch.arange(-3 * H, 3 * H + 1), edges])
    want = X.IntOps(exact_model).gelu(g)
    got = X.Float64Ops(exact_model).gelu(g.double().view(1, -1))
    assert torch.equal(got.view(-1).long(), want)


@pytest.mark.parametrize("radius", ec.R_CLASSES)
def test_mixture_probabilities_kernel_equals_the_torch_passes(radius, monkeypatch):
    table = ec.tables().cdf_by_phase
    num_edges = 2 * radius + 2
    g = np.random.default_rng(radius)
    n, K = 500, 3
    start = g.integers(0, table.size - num_edges + 1, (n, K), dtype=np.int64)
    start[0] = 0
    start[1] = table.size - num_edges  # both ends of the table
    weight = g.integers(0, 1 << ec.WEIGHT_BITS, (n, K)).astype(np.int32)
    weight[:, 0] = 1 << ec.WEIGHT_BITS  # the top component, as snap_integer gives it
    weight[2] = 1 << ec.WEIGHT_BITS
    got = ec._probabilities(start, weight, radius)
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    want = ec._probabilities(start, weight, radius)
    assert got.dtype == want.dtype == np.float64
    assert np.array_equal(got, want)


def _snapped(n: int, K: int, seed: int) -> ec.SnappedParams:
    """Mixture parameters of every kind the plan meets: means anywhere up to the clamp (and
    beyond the table, so the starts clip), components without weight, both scale levels'
    ends, one component far from the others (the widest class), equal weights, negative
    rounding (centers at -x.5)."""
    g = np.random.default_rng(seed)
    span = ec.MAX_ABS_SYMBOL * ec.MEAN_STEPS
    mean_q = np.concatenate([g.integers(-400, 400, (n // 2, K)), g.integers(-span, span, (n - n // 2, K))])
    level = g.integers(0, ec.SCALE_LEVELS, (n, K))
    gap = g.integers(0, ec.MAX_LOGIT_GAP + 1, (n, K))
    gap[:, 0] = 0  # the top component
    weight = ec.tables().weight[gap]
    mean_q[0], level[0] = [-span] * K, [0] * K
    mean_q[1], level[1] = [span] * K, [ec.SCALE_LEVELS - 1] * K
    mean_q[2], weight[2] = [0] + [10_000] * (K - 1), [256] + [0] * (K - 1)  # weightless far components
    mean_q[3], weight[3] = [-96] + [-32] * (K - 1), [256] * K  # a mean of -1: halves round up
    mean_q[4], weight[4] = [0] + [5000] * (K - 1), [256] * K  # the widest class
    return ec.SnappedParams(mean_q=mean_q.astype(np.int64), level=level.astype(np.int64),
                            weight=weight.astype(np.int64))


@pytest.mark.parametrize("K", [3, 2])
def test_coding_plan_kernel_equals_the_numpy_passes(K, monkeypatch):
    """m2t_coding_plan (each symbol's support and its runs, grouped by radius class) and the
    probabilities after it give _coding_batches' numpy/torch passes exactly: the same classes
    in the same order, the same symbols ascending, centers and probabilities."""
    p = _snapped(3000, K, seed=K)
    got = [(r, idx.copy(), center.copy(), probs.copy()) for r, idx, center, probs in ec._coding_batches(p)]
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    want = list(ec._coding_batches(p))
    assert [g[0] for g in got] == [w[0] for w in want] and len(want) >= 4  # most classes occur
    for (r, idx, center, probs), (_, idx_w, center_w, probs_w) in zip(got, want):
        assert np.array_equal(idx, idx_w) and np.array_equal(center, center_w), r
        assert probs.dtype == np.float64 and np.array_equal(probs, probs_w), r
    monkeypatch.delenv(cpu_kernels.ENV)
    empty = ec.SnappedParams(*(np.zeros((0, K), dtype=np.int64) for _ in range(3)))
    assert list(ec._coding_batches(empty)) == []
    bad = ec.SnappedParams(p.mean_q[:2], p.level[:2] + ec.SCALE_LEVELS, p.weight[:2])
    with pytest.raises(ValueError, match="scale levels"):
        list(ec._coding_batches(bad))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("T", [9, 37])
def test_attention_kernels_equal_the_int64_reference(exact_model, masked, T, monkeypatch):
    """Scores' rounding, masking, the exp table and round(num / den), with activations at
    the int16 extremes, unmasked (M2T's cached steps, MT) and with a (T, Tk) mask (M2T's
    teacher-forced pass; every row keeps its own slot); rows of 8-value lanes and a tail."""
    g = torch.Generator().manual_seed(7)
    B, h, dh = 2, 2, 8
    q, k, v = (torch.randint(-32767, 32768, (B, h, T, dh), generator=g) for _ in range(3))
    q[0, 0, 0], k[0, 0, 0], v[0, 0] = 32767, -32767, 32767
    q[1, 1] = 0  # equal scores: ties at the row's maximum
    valid = None
    if masked:
        valid = torch.rand(T, T, generator=g) < 0.5
        valid.fill_diagonal_(True)
    want = X.IntOps(exact_model).attention(0, q, k, v, valid)
    got = X.Float64Ops(exact_model).attention(0, q.double(), k.double(), v.double(), valid)
    assert torch.equal(got.long(), want)
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    assert torch.equal(X.Float64Ops(exact_model).attention(0, q.double(), k.double(), v.double(), valid).long(), want)


def test_attention_rounding_division_equals_python_integers():
    """round(num / den), halves up, in float64 steps: at exact halves and their neighbours,
    negative and positive, at the bounds attention meets (|num| < 2^40, 0 < den < 2^24),
    against Python's integer floor division."""
    lib = cpu_kernels.library()
    rng = np.random.default_rng(11)
    dens = [1, 2, 3, 7, 255, 32768, (1 << 23) + 1, (1 << 24) - 1] + list(rng.integers(1, 1 << 24, 8))
    rows = []
    for d in dens:
        q = rng.integers(-(1 << 40) // d, (1 << 40) // d, 6)
        near = [int(x) * d + r for x in q for r in (d // 2 - 1, d // 2, (d + 1) // 2, d // 2 + 1, 0, -1, 1)]
        near += [(1 << 40) - 1, -(1 << 40) + 1, 0]
        rows.append([v for v in near if abs(v) < 1 << 40][:40])
    n = min(map(len, rows))
    num = np.array([r[:n] for r in rows], dtype=np.float64)
    den = np.array(dens, dtype=np.float64)
    out = np.empty_like(num)
    lib.round_div_rows(num.ctypes.data, len(dens), n, den.ctypes.data, out.ctypes.data)
    want = [[(2 * int(a) + int(d)) // (2 * int(d)) for a in row] for row, d in zip(num, den)]
    assert out.astype(np.int64).tolist() == want


def test_the_g_s_kernels_take_only_torchs_own_openmp_runtime(monkeypatch):
    """cpu_kernels hands the C library torch's OpenMP entry points, found loaded in this
    process under torch's folder, and nothing where torch's backend is not OpenMP (the
    kernels then run on the calling thread); with the kernels off, it says so."""
    found = cpu_kernels._torch_openmp()
    assert found is not None and len(found) == 4 and all(found[1:]), found
    assert "torch" in found[0] and cpu_kernels.threads() == f"torch's OpenMP threads ({found[0]})"
    monkeypatch.setattr(torch.__config__, "parallel_info", lambda: "ATen parallel backend: native thread pool")
    assert cpu_kernels._torch_openmp() is None
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    assert cpu_kernels.threads() == f"none ({cpu_kernels.ENV}=0)"


@pytest.mark.parametrize("dtype,shape", [(torch.float32, (64, 3, 3, 3)), (torch.float16, (5, 7)),
                                         (torch.int16, (3,)), (torch.int64, (0,)), (torch.bfloat16, (9, 2)),
                                         (torch.uint8, (1, 13))])
def test_weights_bit_sum_kernel_equals_its_numpy_form(dtype, shape, monkeypatch):
    """The fingerprints of the weights (model._bit_sum) in one C pass: the numpy form's integer
    (uint32 words where the byte count allows, else bytes), views at an offset included."""
    from m2t_core import model as M

    n_bytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(n_bytes)
    t = torch.randint(0, 256, (n_bytes,), generator=g, dtype=torch.uint8).view(dtype).reshape(shape)
    views = [t, torch.cat([t.reshape(-1), t.reshape(-1)])[t.numel():]]  # the second at an offset
    for v in views:
        fast = M._bit_sum(v)
        monkeypatch.setattr(cpu_kernels, "library", lambda: None)
        slow = M._bit_sum(v)
        monkeypatch.undo()
        assert fast == slow and isinstance(fast, int)
    big = torch.full((1 << 20,), -1, dtype=torch.int32)  # every word 2^32 - 1
    assert M._bit_sum(big) == (1 << 20) * (2**32 - 1)


def test_a_library_built_from_other_sources_is_not_used(monkeypatch):
    """The library's functions are called through signatures declared in Python: a library
    whose m2t_abi() differs (built from older or newer sources than this checkout) must be
    left unused, the torch passes running instead, and the reason must say to reinstall."""
    assert cpu_kernels.library() is not None  # built by the install, from these sources
    monkeypatch.setattr(cpu_kernels, "ABI", cpu_kernels.ABI + 1)
    cpu_kernels._load.cache_clear()
    try:
        assert cpu_kernels.library() is None
        assert "other sources" in cpu_kernels.missing_reason()
    finally:
        monkeypatch.undo()
        cpu_kernels._load.cache_clear()
    assert cpu_kernels.library() is not None
