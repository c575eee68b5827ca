"""Fixtures shared by the test files.

* ray_cluster: ONE local Ray cluster for the whole session (starting one takes ~5 s and
  ~1 GB), started lazily by the first test that needs it; skipped where Ray is absent.
* shared_datasets: the real photographs in ../shared/datasets (read, never copied).
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    path = (REPO / ".." / "shared" / "datasets").resolve()
    if not path.is_dir():
        pytest.skip(f"shared datasets not found at {path}")
    return path
