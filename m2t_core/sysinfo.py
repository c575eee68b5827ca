"""What machine this is, for the figures that benchmarks and model cards report."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo on Linux; empty elsewhere), read once: every
    encode asks (transforms.bf16_analysis), and the file is long on machines with many cores."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 dot products; without them bf16 is emulated


def native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products natively (AVX512-BF16 or AMX)."""
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
