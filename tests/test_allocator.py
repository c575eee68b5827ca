"""allocator.keep_freed_memory: glibc keeps freed tensors' memory, so the next image's
tensors touch no fresh pages. Each case runs in a process of its own (the tuning is for the
whole process and cannot be undone)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc is what allocator.py tunes")

# Six 24 MB arrays, filled and freed together, as the integer g_s's activations of one image
# are (numpy: its buffers come straight from malloc); then the minor page faults of three more
# rounds, once one has warmed up. Tuned, glibc keeps the freed heap; as it comes, it trims the
# heap and the next round faults its pages in again (fewer faults where the kernel backs them
# with huge pages, as numpy asks for arrays this large).
SCRIPT = r"""
import json, resource, sys
import numpy as np
from m2t_core import allocator

state = allocator.keep_freed_memory() if sys.argv[1] == "tune" else allocator.state()

def one_image():
    held = []
    for _ in range(6):
        a = np.empty(6 << 20, dtype=np.float32)
        a.fill(1.0)
        held.append(a)
    del a
    while held:
        held.pop()

one_image()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    one_image()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"state": state, "again": allocator.keep_freed_memory(), "faults": faults}))
"""


def _run(mode: str, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tuned_malloc_reuses_freed_tensors_without_page_faults():
    tuned = _run("tune")
    assert tuned["state"].startswith("on (mmap threshold 32 MiB") and tuned["again"] == tuned["state"]
    untuned = _run("leave")
    assert untuned["state"] == "off: not requested"
    # 3 rounds x 144 MB: ~110,000 fresh 4 KiB pages, or ~9,300 faults with huge pages.
    assert tuned["faults"] < 500, tuned
    assert untuned["faults"] > 5_000, untuned


def test_opting_out_leaves_the_allocator_alone():
    out = _run("tune", M2T_MALLOC_TUNING="0")
    assert out["state"] == "off: M2T_MALLOC_TUNING=0" and out["again"] == out["state"]
    assert out["faults"] > 5_000, out
