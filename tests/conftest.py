"""Fixtures shared by the test files.

* ray_cluster: ONE local Ray cluster for the whole session (starting one takes ~5 s and
  ~1 GB), started lazily by the first test that needs it; skipped where Ray is absent.
* shared_datasets: the real photographs in ../shared/datasets (read, never copied).
* s3_server / s3_bucket: a real S3 endpoint on loopback (moto) and a fresh bucket on it.
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


# ---------------------------------------------------------------- loopback S3 (moto)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on 127.0.0.1 (moto's threaded server, as s3fs's own tests use),
    for the whole session. Yields the fsspec storage options that reach it: pass them as
    `storage_options={"s3": ...}` (no region_name in client_kwargs: moto rejects it)."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the loopback server: (bucket name, s3fs options)."""
    import re

    import s3fs

    name = "t-" + re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    fs = s3fs.S3FileSystem(**s3_server)
    if fs.exists(name):
        fs.rm(name, recursive=True)
    fs.mkdir(name)
    fs.invalidate_cache()
    return name, s3_server
