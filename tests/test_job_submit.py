"""`ray job submit` for real: a head node started with `ray start --head` on 127.0.0.1 (free
ports, its own temp dir; Ray's token authentication as configured on this machine: the CLI
and the Jobs SDK read the same token), the compression job submitted with `--working-dir`
(the checkout is uploaded, as on a real cluster), waited for through the Jobs SDK;
stopping it mid-run (the Jobs API call of `ray job stop`) leaves an archive that the next submission resumes. Marked `cluster`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.storage import archive as A
from pipeline.jobs import compress as C
from test_multinode import IMAGES, MID, SIZE, stats_files
from test_compress import build_model, png_bytes, random_image
from m2t_core import save_checkpoint

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
# What the upload leaves out (besides .gitignore'd paths such as .venv, which Ray skips).
EXCLUDES = [".git", "docs", "bench/results", "tests/data", "configs/train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A head node with 2 CPUs; `ray start --block` in the foreground, so that stopping it
    stops exactly the processes it started (never `ray stop`: it would stop every Ray on the
    machine)."""
    tmp = tempfile.mkdtemp(prefix="m2tj", dir="/tmp")
    port, dash = free_port(), free_port()
    # Ray 2.5x+ turns token authentication on for a new head when a token exists
    # (~/.ray/auth_token); clients then need RAY_AUTH_MODE=token to send it (README: Ray's auth).
    auth = {"RAY_AUTH_MODE": "token"} if _token_exists() else {}
    env = {**os.environ, **auth, "RAY_TMPDIR": tmp,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    pytest.importorskip("ray.job_submission")
    # The Jobs SDK in this process sends the token itself: Ray reads RAY_AUTH_MODE once per
    # process, and another test module may already have read it.
    headers = {"Authorization": f"Bearer {_token()}"} if auth else None
    log = open(Path(tmp) / "head.log", "w")
    proc = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", f"--temp-dir={tmp}", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    client, deadline = None, time.monotonic() + 90
    while client is None:
        try:
            client = JobSubmissionClient(address, headers=headers)
            client.list_jobs()
        except Exception as exc:
            client = None
            if proc.poll() is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
                text = (Path(tmp) / "head.log").read_text()[-1500:]
                shutil.rmtree(tmp, ignore_errors=True)
                pytest.fail(f"the head's Jobs API did not answer ({type(exc).__name__}: {exc}): "
                            f"{text}")
            time.sleep(1)
    yield {"address": address, "client": client, "env": {**env, "RAY_ADDRESS": address}}
    os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` takes its processes down with it
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _token_path() -> str:
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")


def _token_exists() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.exists(_token_path())


def _token() -> str:
    return os.environ.get("RAY_AUTH_TOKEN") or Path(_token_path()).read_text().strip()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("js")
    (root / "photos").mkdir()
    for i in range(IMAGES):
        (root / "photos" / f"img{i:02d}.png").write_bytes(png_bytes(random_image(*SIZE, seed=200 + i)))
    model = root / "mid-submit.safetensors"
    save_checkpoint(build_model(MID, model_id="mid-submit"), model)
    return root / "photos", model


def submit(head, entrypoint: list[str], submission_id: str) -> str:
    """`ray job submit --working-dir` the checkout, without waiting; returns the job id."""
    cmd = [RAY, "job", "submit", "--address", head["address"], "--submission-id", submission_id, "--no-wait",
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--", *entrypoint]
    deadline = time.monotonic() + 90
    while True:
        rc = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=120)
        # The head's job agent registers some seconds after its dashboard answers (longer on a
        # loaded machine); until then Ray answers 500 "No available agent ... try again later".
        if rc.returncode == 0 or "No available agent" not in rc.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert rc.returncode == 0, rc.stdout[-2000:] + rc.stderr[-2000:]
    return submission_id


def wait_status(client, job_id: str, wanted: set[str], timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        if status in wanted:
            return status
        if status in {"SUCCEEDED", "FAILED", "STOPPED"} or time.monotonic() > deadline:
            pytest.fail(f"job {job_id} is {status}, wanted {wanted}; logs:\n{client.get_job_logs(job_id)[-3000:]}")
        time.sleep(0.25)


def test_submitted_job_stopped_mid_run_resumes_on_resubmission(head, inputs, tmp_path):
    photos, model = inputs
    out = tmp_path / "submitted.m2t"
    entry = ["python", "jobs/compress.py", str(photos), str(out), "--model", str(model), "--no-progress",
             "--set", "shard_size=1"]
    client = head["client"]
    t0 = time.monotonic()
    first = submit(head, entry, f"m2t-first-{os.getpid()}")
    wait_status(client, first, {"RUNNING"})
    deadline = time.monotonic() + 240
    while len(stats_files(out)) < 2:
        assert time.monotonic() < deadline, client.get_job_logs(first)[-3000:]
        assert str(client.get_job_status(first)).rsplit(".", 1)[-1] == "RUNNING", client.get_job_logs(first)[-3000:]
        time.sleep(0.05)
    # What `ray job stop` calls (the CLI itself takes ~2 s to start: the job would finish first).
    assert client.stop_job(first)
    assert wait_status(client, first, {"STOPPED", "FAILED"}) == "STOPPED"
    seen, quiet = len(stats_files(out)), time.monotonic()
    while time.monotonic() - quiet < 3:  # `ray job stop` takes the actors down too
        time.sleep(0.2)
        if len(stats_files(out)) != seen:
            seen, quiet = len(stats_files(out)), time.monotonic()
    assert 2 <= seen < IMAGES and not (out / A.MANIFEST).exists()
    report = json.loads((out / A.REPORT).read_text()) if (out / A.REPORT).exists() else None
    assert report is None or not report["complete"]

    second = submit(head, entry, f"m2t-second-{os.getpid()}")
    assert wait_status(client, second, {"SUCCEEDED"}) == "SUCCEEDED", client.get_job_logs(second)[-3000:]
    logs = client.get_job_logs(second)
    assert f"{seen} already done" in logs, logs[-3000:]
    report = json.loads((out / A.REPORT).read_text())
    assert report["complete"] and report["exit_code"] == C.EXIT_OK
    assert report["shards"]["already_done"] == seen and report["shards"]["this_run"] == IMAGES - seen
    rows = [r for p in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["key"] for r in rows) == sorted(p.name for p in photos.iterdir())
    # Byte for byte what an in-process run writes.
    ref = tmp_path / "ref.m2t"
    cfg = C.load_config(None, ["shard_size=1", "ray.enabled=false", "torch_threads=1"])
    cfg = C.CompressConfig(**{**cfg.__dict__, "input": str(photos), "output": str(ref), "model": str(model)})
    _, code = C.compress_dataset(cfg, progress=False)
    assert code == C.EXIT_OK
    for p in sorted((ref / "shards").glob("*.bin")):
        assert (out / "shards" / p.name).read_bytes() == p.read_bytes(), p.name
    print(f"\nray job submit: stopped after {seen} of {IMAGES} shards, resubmitted, finished; "
          f"{time.monotonic() - t0:.1f} s for both submissions")
