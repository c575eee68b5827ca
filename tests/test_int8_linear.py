"""The exact entropy model's int8 route for its linears (m2t_core/int8_linear.py) gives the
integers of the int64 reference, wherever it runs; where the CPU's int8 products are not
exact, it is refused and the float64 route gives them.

The fused C kernels (plane split, recombination) are checked against Python integers with
products that do not depend on the CPU (int64 matmul); the whole route, on whatever this
machine runs, against the int64 reference (exact.IntOps's arithmetic)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from m2t_core import exact as X
from m2t_core import cpu_kernels, int8_linear, intmath

REPO = Path(__file__).resolve().parent.parent


def _operands(M: int, K: int, N: int, seed: int, weight_bits: int = 16):
    """x (M, K) int64 within int16, w (N, K) within int16 or int8 (`weight_bits`; extremes
    included), bias (N,), shift (N,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-32768, 32768, (M, K), generator=g)
    top = 1 << (weight_bits - 1)
    w = torch.randint(-top, top, (N, K), generator=g)
    if M:
        x[0] = -32768
        x[-1, ::2] = 32767
    w[0] = top - 1
    w[-1] = -top
    bias = torch.randint(-(1 << 40), 1 << 40, (N,), generator=g)
    shift = torch.randint(-3, 31, (N,), generator=g)
    return x, w, bias, shift


def _reference(x, w, bias, shift, limit):
    """The int64 reference (exact.IntOps.linear's arithmetic)."""
    out = intmath.round_shift(x @ w.t() + bias, shift)
    return out if limit is None else out.clamp(-limit, limit)


def _linear(w, bias, shift) -> X.IntLinear:
    lin = X.IntLinear(w.shape[1], w.shape[0])
    lin.weight.copy_(w.to(torch.int16))
    lin.bias.copy_(bias)
    lin.shift.copy_(shift)
    return lin


class _OneLinear:
    """Just enough of an ExactEntropyModel for Float64Ops.linear."""

    def __init__(self, lin: X.IntLinear):
        self.linears = {"lin": lin}
        self.cfg = type("Config", (), {"rate_lambdas": ()})()
        self.layout = None


def test_kernel_library_is_built():
    assert cpu_kernels.library() is not None, (
        "m2t_core/_exact_kernels was not built: install a C compiler (gcc) and reinstall (make install)")


@pytest.mark.parametrize("M,K,N", [(1, 5, 3), (7, 192, 576), (300, 192, 40), (3, 768, 192)])
def test_fused_kernels_equal_python_integers(M, K, N):
    """split and combine, with CPU-independent products (int64 matmul of the planes)."""
    split, combine = cpu_kernels.library().split_planes, cpu_kernels.library().combine
    x, w, bias, shift = _operands(M, K, N, seed=M + K + N)
    planes = torch.empty((2 * M, K), dtype=torch.int8)
    row_term = torch.empty(M, dtype=torch.int64)
    xf = x.double().contiguous()
    assert split(xf.data_ptr(), M, K, planes.data_ptr(), row_term.data_ptr()) == 1
    a, b = planes[:M].long(), planes[M:].long()
    assert torch.equal(256 * a + b + 128, x)
    assert torch.equal(row_term, 32768 * a.sum(1) + 128 * b.sum(1))
    packed = int8_linear.PackedLinear(w, bias, shift)
    products = (planes.long() @ packed.planes.long()).to(torch.int32)  # (2M, 2N): the four products
    for kernel, dtype in ((combine, torch.int32), (cpu_kernels.library().combine_f32, torch.float32)):
        out = torch.empty((M, N), dtype=torch.float64)
        given = products.to(dtype)  # float32: the same integers (|P| <= 128 * 128 * K < 2^24), as oneDNN's
        kernel(given.data_ptr(), M, N, row_term.data_ptr(), packed.offset.data_ptr(), packed.scale.data_ptr(),
               32767.0, out.data_ptr(), N)
        assert torch.equal(out.long(), _reference(x, w, bias, shift, 32767)), dtype


@pytest.mark.parametrize("M,K,N", [(1, 5, 3), (7, 192, 576), (3, 768, 192)])
def test_one_weight_plane_kernels_equal_python_integers(M, K, N):
    """Weights within int8 (format 7's entropy model) are one plane: the products [a; b] W^T,
    recombined as 256 P_a + P_b + 128 sum_k w_k, give the reference's integers."""
    lib = cpu_kernels.library()
    x, w, bias, shift = _operands(M, K, N, seed=M + K + N, weight_bits=8)
    planes = torch.empty((2 * M, K), dtype=torch.int8)
    xf = x.double().contiguous()
    assert lib.split_planes(xf.data_ptr(), M, K, planes.data_ptr(), torch.empty(M, dtype=torch.int64).data_ptr()) == 1
    packed = int8_linear.PackedLinear(w, bias, shift)
    assert packed.weight_planes == 1 and packed.planes.shape == (K, N)
    assert int8_linear.PackedLinear(w * 2, bias, shift).weight_planes == 2  # 254 and -256 leave int8
    products = (planes.long() @ packed.planes.long()).to(torch.int32)  # (2M, N)
    for kernel, dtype in ((lib.combine_one, torch.int32), (lib.combine_one_f32, torch.float32)):
        out = torch.empty((M, N), dtype=torch.float64)
        given = products.to(dtype)
        kernel(given.data_ptr(), M, N, packed.offset.data_ptr(), packed.scale.data_ptr(), 32767.0, out.data_ptr(), N)
        assert torch.equal(out.long(), _reference(x, w, bias, shift, 32767)), dtype


def test_split_refuses_activations_outside_int16():
    split = cpu_kernels.library().split_planes
    for bad in (32768.0, -32769.0, 1e300, float("nan")):
        x = torch.zeros(3, 4, dtype=torch.float64)
        x[1, 2] = bad
        planes = torch.empty((6, 4), dtype=torch.int8)
        assert split(x.data_ptr(), 3, 4, planes.data_ptr(), torch.empty(3, dtype=torch.int64).data_ptr()) == 0


@pytest.mark.parametrize("route", ["default", "off"])
@pytest.mark.parametrize("M,K,N", [(0, 8, 4), (1, 192, 576), (37, 768, 192), (600, 192, 64)])
@pytest.mark.parametrize("limit", [32767, None])
@pytest.mark.parametrize("weight_bits", [16, 8])
def test_float64_ops_linear_equals_the_int64_reference(monkeypatch, route, M, K, N, limit, weight_bits):
    """Whichever route this machine takes (the int8 one where the probe accepts it, with one
    weight plane for weights within int8; 600 rows span several row blocks), the integers are
    the reference's."""
    if route == "off":
        monkeypatch.setenv(int8_linear.ENV, "0")
    x, w, bias, shift = _operands(M, K, N, seed=3 * M + N, weight_bits=weight_bits)
    lin = _linear(w, bias, shift)
    if lin.int8() is not None:
        assert lin.int8().weight_planes == (1 if weight_bits == 8 else 2)
    got = X.Float64Ops(_OneLinear(lin)).linear("lin", x.double().view(1, M, K), limit)  # (1, M, N)
    assert got.dtype == torch.float64 and got.shape == (1, M, N)
    assert torch.equal(got[0].long(), _reference(x, w, bias, shift, limit))
    if route == "off":
        assert lin.int8() is None and int8_linear.status() == f"off ({int8_linear.ENV}=0)"


def test_an_activation_outside_int16_takes_the_float64_route():
    x, w, bias, shift = _operands(4, 16, 8, seed=5)
    x[2, 3] = 40000  # no caller produces it; the route must not wrap it into the planes
    lin = _linear(w, bias, shift)
    packed = int8_linear.PackedLinear(w, bias, shift)
    assert packed(x.double(), None) is None
    got = X.Float64Ops(_OneLinear(lin)).linear("lin", x.double(), None)
    assert torch.equal(got.long(), _reference(x, w, bias, shift, None))


def test_probe_refuses_products_that_saturate(monkeypatch):
    """A kernel that adds adjacent products in saturating 16-bit pairs (oneDNN's int8 path on
    CPUs without VNNI) is found by the probe; the route is then off for that shape."""
    real = torch._int_mm

    def saturating(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        u = a.long() + 128  # oneDNN's s8 -> u8 shift, compensated afterwards
        pairs = (u[:, :, None] * b.long()[None]).view(a.shape[0], -1, 2, b.shape[1]).sum(2).clamp(-32768, 32767)
        return (pairs.sum(1) - 128 * b.long().sum(0)).to(torch.int32)

    monkeypatch.setattr(torch, "_int_mm", saturating)
    assert int8_linear.probe.__wrapped__(16, 8) is False
    monkeypatch.setattr(torch, "_int_mm", real)


def test_product_shapes_do_not_follow_the_row_count(monkeypatch):
    """oneDNN compiles a kernel for every shape: the products run on blocks whose rows are
    rounded up to ROW_BUCKET (the padding rows' products never read), so 2 B + 1 to 3 B rows
    share one shape (B = ROW_BUCKET), and the integers stay the reference's."""
    shapes = set()
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: shapes.add(tuple(a.shape)) or real(a, b))
    K, N, B = 64, 48, int8_linear.ROW_BUCKET
    x, w, bias, shift = _operands(3 * B, K, N, seed=3)
    route = int8_linear.PackedLinear(w, bias, shift)  # the _int_mm route
    for M in (3 * B, 2 * B + 1, 2 * B + 5, 1):
        x[M - 1, 1::2] = -32768  # each block's last row at the extremes
        assert torch.equal(route(x[:M].double(), 32767).long(), _reference(x[:M], w, bias, shift, 32767)), M
    assert shapes == {(2 * 3 * B, K), (2 * B, K)}


def test_status_names_the_route():
    assert int8_linear.status() in ("on", "on, larger products on AMX (oneDNN matmul)",
                                    "off (this CPU's int8 products are not exact: the float64 route runs)")


@pytest.mark.parametrize("M,K,N", [(1, 192, 576), (37, 768, 192), (300, 192, 64)])
@pytest.mark.parametrize("weight_bits", [16, 8])
def test_onednn_route_gives_the_reference_wherever_its_probe_accepts_it(monkeypatch, M, K, N, weight_bits):
    """The AMX route (oneDNN's matmul, float32 products) taken on any CPU, as if it had AMX:
    its probe runs the real kernel here; where it accepts it, every block takes that kernel and
    the integers are the reference's; where it refuses, prepare leaves it out."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert int8_linear.onednn_enabled() == hasattr(torch.ops.onednn, "qlinear_pointwise")
    x, w, bias, shift = _operands(M, K, N, seed=7 * M + K, weight_bits=weight_bits)
    planes = 2 if weight_bits == 16 else 1
    assert int8_linear.probe.__wrapped__(int8_linear.FP32_INNER, N, True, planes) is False  # float32 sums inexact
    if not int8_linear.probe.__wrapped__(K, N, True, planes):
        int8_linear.probe.cache_clear()  # prepare's probes below see the AMX stand-in
        packed = int8_linear.prepare(w, bias, shift)
        int8_linear.probe.cache_clear()
        assert packed is None or packed.onednn is None
        return
    route = int8_linear.PackedLinear(w, bias, shift, onednn=True)
    route.min_macs = 0  # every block on oneDNN's matmul
    got = route(x.double(), 32767)
    assert route.onednn is not None and got is not None
    assert torch.equal(got.long(), _reference(x, w, bias, shift, 32767))


def test_onednn_probe_refuses_products_that_are_not_exact(monkeypatch):
    """oneDNN products off by one anywhere (a kernel that rounds, or saturates) turn the AMX
    route off; the _int_mm route is probed apart and stays."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    real = int8_linear.PackedLinear._onednn_products

    def off_by_one(self, planes):
        out = real(self, planes)
        out[0, -1] += 1  # a product the combination reads (rows past a block's 2m are padding)
        return out

    monkeypatch.setattr(int8_linear.PackedLinear, "_onednn_products", off_by_one)
    assert int8_linear.probe.__wrapped__(16, 8, True) is False
    assert int8_linear.probe.__wrapped__(16, 8, True, 1) is False  # one weight plane alike
    assert int8_linear.probe.__wrapped__(16, 8) == int8_linear.probe(192, 576)


def test_integers_hold_where_onednn_saturates():
    """With oneDNN held to AVX2 (no VNNI: its int8 products saturate in 16-bit pairs, a real
    kernel, not a stand-in), the route's probe refuses the kernel and the linears still give
    the reference's integers. Run in a subprocess: the ISA cap is read once per process."""
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "tests")
        from test_int8_linear import _OneLinear, _linear, _operands, _reference
        from m2t_core import exact as X, int8_linear
        for M, K, N, bits in ((5, 192, 576, 16), (40, 768, 192, 16), (5, 192, 576, 8), (40, 768, 192, 8)):
            x, w, bias, shift = _operands(M, K, N, seed=M, weight_bits=bits)
            x[1] = torch.where(torch.arange(K) % 2 == 0, 32639, -32768)  # planes at their extremes
            got = X.Float64Ops(_OneLinear(_linear(w, bias, shift))).linear("lin", x.double(), 32767)
            assert torch.equal(got.long(), _reference(x, w, bias, shift, 32767)), (M, K, N, bits)
        print("route:", int8_linear.status())
    """)
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    print(run.stdout.strip())
