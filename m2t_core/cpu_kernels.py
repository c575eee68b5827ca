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
ABI = 4  # csrc/exact_kernels.c's m2t_abi(): the signatures below; a library built from other sources is not used


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
        lib.m2t_abi.restype, lib.m2t_abi.argtypes = ctypes.c_int64, []
        if lib.m2t_abi() != ABI:  # built from other sources (an install older than this checkout)
            return None
        functions = {name: getattr(lib, "m2t_" + name) for name in SIGNATURES}
    except (OSError, AttributeError):  # AttributeError: a library older than m2t_abi
        return None
    for name, (restype, argtypes) in SIGNATURES.items():
        functions[name].restype, functions[name].argtypes = restype, argtypes
    runtime = _torch_openmp()
    if runtime is not None:
        functions["use_openmp"](*runtime[1:])
    return SimpleNamespace(**functions, openmp=runtime[0] if runtime else None)  # openmp: the runtime's path


_OPENMP_ENTRY_POINTS = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")


def threads() -> str:
    """Where the g_s kernels run: on torch's OpenMP threads (as many as torch.get_num_threads()
    says, which the callers pass), or on the calling thread only."""
    lib = library()
    if lib is None:
        return f"none ({missing_reason()})"
    return f"torch's OpenMP threads ({lib.openmp})" if lib.openmp else "the calling thread only"


def _torch_openmp() -> tuple | None:
    """(path, GOMP_parallel, omp_get_thread_num, omp_get_num_threads) of
    the OpenMP runtime that torch's CPU passes run on, already loaded in this process, or None
    where torch's parallel backend is not OpenMP or its runtime cannot be told apart. Only
    that runtime: a second one would start a second pool of threads, competing for the cores
    with torch's (whose workers spin a while after each pass)."""
    import torch

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    torch_dir = Path(torch.__file__).resolve().parent
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:  # not Linux
        return None
    paths = {fields[-1] for fields in map(str.split, maps) if fields and fields[-1].startswith("/")}
    ours = sorted(p for p in paths if Path(p).name.startswith(("libgomp", "libiomp", "libomp"))
                  and (torch_dir in Path(p).parents or torch_dir.parent / "torch.libs" in Path(p).parents))
    if len(ours) != 1:
        return None
    try:  # RTLD_NOLOAD: the copy that is loaded already, never a new one
        lib = ctypes.CDLL(ours[0], mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
        return (ours[0],) + tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                                  for name in _OPENMP_ENTRY_POINTS)
    except (OSError, AttributeError):
        return None


def missing_reason() -> str:
    """Why library() is None."""
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    return ("the kernel library m2t_core/_exact_kernels was not built (no C compiler at install), or was built "
            "from other sources (reinstall: pip install -e .)")


_P, _I, _F, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double
SIGNATURES = {
    # int8_linear: activation planes, then the four products recombined and requantised
    "split_planes": (ctypes.c_int, [_P, _I, _I, _P, _P]),
    "combine": (None, [_P, _I, _I, _P, _P, _P, _D, _P, _I]),
    "combine_f32": (None, [_P, _I, _I, _P, _P, _P, _D, _P, _I]),  # the same from oneDNN's float32 products
    "combine_one": (None, [_P, _I, _I, _P, _P, _D, _P, _I]),  # weights within int8: one weight plane
    "combine_one_f32": (None, [_P, _I, _I, _P, _P, _D, _P, _I]),
    # int8_conv / int_synthesis: activation byte planes, and the products' rescaling
    # (each with its thread count last: torch.get_num_threads())
    # (blocks of channels-last pixels: image and row strides, int8_conv._pixel_block)
    "plane_pack": (None, [_P, _I, _I, _I, _I, _I, _I, _P, _P, _I, _I, _I]),
    "rescale_planes": (None, [_P, _I, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _F, _F, _P, _I, _I, _P, _I]),
    "gate": (None, [_P, _P, _P, _I, _P, _I, _I, _F, _P, _I]),
    "use_openmp": (None, [_P, _P, _P]),  # the g_s kernels' threads: torch's OpenMP entry points
    # exact.Float64Ops: LayerNorm and GELU; entropy_coding: a mixture's probabilities per symbol,
    # and the symbols' supports grouped by radius class
    "layer_norm": (None, [_P, _I, _I, _I, _I, _P, _P, _I, _I, _P]),
    "gelu": (None, [_P, _I, _P, _I, _P]),
    "mixture_pmf": (None, [_P, _P, _P, _I, _I, _I, _I, _I, _P]),
    "coding_plan": (ctypes.c_int, [_P, _P, _P, _I, _I, _P, _I, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P]),
    # exact.Float64Ops.attention: the weights from the scores, and the weighted mean
    "softmax_weights": (None, [_P, _I, _I, _I, _D, _P, _P, _I, _P]),
    "round_div_rows": (None, [_P, _I, _I, _P, _P]),
    # model._bit_sum: the weights' fingerprints, checked in every coding call
    "word_sum": (ctypes.c_uint64, [_P, _I]),
}
