"""Keep freed memory for the next image: glibc's malloc tuned for the codec's large, short-lived
tensors.

The integer g_s of a Kodak image allocates and frees about 20 activation tensors of 12-25 MB
each. glibc returns freed memory at the top of its heap to the system once more than 2x its
(dynamic) mmap threshold is free there, so the next tensors touch fresh pages: about 20,000
page faults and 35 ms of a 0.5 s decode on one thread (m2t-small-q3, kodim01, 2-core AMD EPYC
VM; bench/results/malloc_tuning.md). `keep_freed_memory()` raises glibc's mmap threshold to
its ceiling (32 MiB on 64-bit) and keeps up to TRIM_BYTES free on the heap: no faults in
steady state, at the price of a resident size that stays near the largest image's peak.

It changes the whole process's allocator, so the library never calls it on its own: the
`m2t` commands, the jobs' workers and the benchmarks do (M2T_MALLOC_TUNING=0 opts out). A
program that embeds the codec may call it once, or set glibc's environment variables before
start (MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456). Both settings are
needed: fixing either one turns glibc's dynamic threshold off, and the trim threshold alone
sends every block above 128 KiB to mmap (2-3x slower g_s, measured)."""

from __future__ import annotations

import ctypes
import os
import platform
import threading

ENV = "M2T_MALLOC_TUNING"  # "0": leave the allocator alone
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_BYTES = 256 << 20  # free heap kept for reuse: above a Kodak g_s's peak, far below an actor's memory
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

_lock = threading.Lock()
_state: str | None = None


def keep_freed_memory() -> str:
    """Tune glibc's malloc as the module docstring says (once per process; later calls return
    the first outcome). Returns what was done: "on (...)", or "off: <reason>" where it was
    not (opted out, not glibc, mallopt refused)."""
    global _state
    with _lock:
        if _state is None:
            _state = _tune()
        return _state


def state() -> str:
    """What keep_freed_memory() did in this process, or "off: not requested"."""
    return _state or "off: not requested"


def _tune() -> str:
    if os.environ.get(ENV, "1") == "0":
        return f"off: {ENV}=0"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "off: not glibc"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "off: no mallopt"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: while it is dynamic, the trim threshold follows it.
    if not mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) or not mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES):
        return "off: mallopt refused"
    return f"on (mmap threshold {MMAP_THRESHOLD_BYTES >> 20} MiB, trim threshold {TRIM_BYTES >> 20} MiB)"
