"""The fused integer passes of the exact arithmetic on the CPU: a small C library built from
csrc/exact_kernels.c when the package is installed (pyproject.toml: an optional extension,
loaded here with ctypes; it has no Python API).

Every function computes integers exactly (int32/int64 arithmetic, or float steps whose every
result is an exactly representable integer, in the order the torch passes they replace take
them), so results do not depend on the compiler, vectorisation or CPU kind. Callers use them
where `library()` is not None and keep their torch passes otherwise: the same integers either
way (tests/test_int8_linear.py, tests/test_int8_conv.py compare both)."""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path
from types import SimpleNamespace

NAME = "_exact_kernels"  # m2t_core/_exact_kernels<EXT_SUFFIX>
ENV = "M2T_CPU_KERNELS"  # "0": none of these kernels (benchmarks, debugging): the torch passes


def library() -> SimpleNamespace | None:
    """The library's functions with their C signatures, or None where it was not built (no C
    compiler at install), cannot be loaded, or M2T_CPU_KERNELS=0."""
    return None if os.environ.get(ENV, "1") == "0" else _load()


@functools.lru_cache(maxsize=None)
def _load() -> SimpleNamespace | None:
    here = Path(__file__).resolve().parent
    path = next((here / (NAME + s) for s in importlib.machinery.EXTENSION_SUFFIXES if (here / (NAME + s)).is_file()),
                None)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
        functions = {name: getattr(lib, "m2t_" + name) for name in SIGNATURES}
    except (OSError, AttributeError):
        return None
    for name, (restype, argtypes) in SIGNATURES.items():
        functions[name].restype, functions[name].argtypes = restype, argtypes
    return SimpleNamespace(**functions)


def missing_reason() -> str:
    """Why library() is None."""
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    return "the kernel library m2t_core/_exact_kernels was not built (no C compiler at install)"


_P, _I, _F, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double
SIGNATURES = {
    # int8_linear: activation planes, then the four products recombined and requantised
    "split_planes": (ctypes.c_int, [_P, _I, _I, _P, _P]),
    "combine": (None, [_P, _I, _I, _P, _P, _P, _D, _P, _I]),
    # int8_conv / int_synthesis: activation byte planes, and the products' rescaling
    "plane_pack": (None, [_P, _I, _I, _I, _P, _I, _P]),
    "rescale_planes": (None, [_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _F, _F, _P, _I]),
    "gate": (None, [_P, _P, _P, _I, _P, _I, _I, _F, _P]),
    # exact.Float64Ops: LayerNorm and GELU; entropy_coding: a mixture's probabilities per symbol
    "layer_norm": (None, [_P, _I, _I, _I, _I, _P, _P, _I, _I, _P]),
    "gelu": (None, [_P, _I, _P, _I, _P]),
    "mixture_pmf": (None, [_P, _P, _P, _I, _I, _I, _I, _I, _P]),
    # exact.Float64Ops.attention: the weights from the scores, and the weighted mean
    "softmax_weights": (None, [_P, _I, _I, _I, _D, _P, _P, _I, _P]),
    "round_div_rows": (None, [_P, _I, _I, _P, _P]),
}
