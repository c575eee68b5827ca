"""docs/deploy.md followed as a new user would, as far as one machine allows (marked `cluster`):

* a head started with `ray start --head` (the stand-in for `ray up`'s head or the KubeRay head
  pod; its own HOME, so its own ~/.ray), with token authentication ON (the guide's default:
  `ray get-auth-token --generate` on the head, then `ray start --head`) and OFF (no token);
* "your machine": another HOME, `RAY_ADDRESS` and, with auth on, the token exported as the guide
  says (`RAY_AUTH_TOKEN` + `RAY_AUTH_MODE=token`); without them a submission is refused;
* S3 on loopback (moto) as the bucket, reached by the head through the environment variables
  the pods/instances would have (AWS_ENDPOINT_URL and keys here; an instance role in a cloud);
* the guide's commands: `ray job submit --submission-id photos-q3-1 -- m2t compress ...
  --no-progress` with the shipped model, `ray job status`, `ray job logs`, a rerun under a new
  submission id (reusing the old one is refused by Ray), and `m2t verify ... --report
  s3://.../verify.json`, whose report must land in the bucket.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_compress import png_bytes, random_image

pytestmark = pytest.mark.cluster
RAY = str(Path(sys.executable).parent / "ray")
ARCHIVE = "s3://archives/photos-q3"  # the guide's names: s3://bucket/photos -> archives/photos-q3


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """A `ray ...` command as the guide writes it; retried while the head's job agent is not up
    yet (Ray answers "No available agent ... try again later" for some seconds after start)."""
    deadline = time.monotonic() + 90
    while True:
        done = subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


@pytest.fixture
def bucket(s3_server):
    """The corpus (3 small photographs) in s3://photos/in, an empty s3://archives."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    for name in ("photos", "archives"):
        if fs.exists(name):
            fs.rm(name, recursive=True)
        fs.mkdir(name)
    for i in range(3):
        fs.pipe(f"photos/in/img{i}.png", png_bytes(random_image(96, 128, seed=40 + i)))
    fs.invalidate_cache()
    return fs, s3_server["client_kwargs"]["endpoint_url"]


@contextlib.contextmanager
def head_node(tmp: Path, endpoint: str, token_auth: bool):
    """`ray start --head` on 127.0.0.1 with its own HOME (and so its own ~/.ray/auth_token);
    yields the dashboard address. `--block` in the foreground, so that stopping it stops only
    the processes it started (never `ray stop`: it would stop every Ray on the machine)."""
    home = tmp / "head-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1", RAY_TMPDIR=str(tmp / "ray"))
    token = None
    if token_auth:  # the guide: a token on the head turns authentication on for `ray start --head`
        done = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        token = (home / ".ray" / "auth_token").read_text().strip()
        assert token and done.stdout.strip() == token
    dash = _port()
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={_port()}",
                             "--num-cpus=2", "--num-gpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{dash}", token, proc
    finally:  # SIGTERM: `ray start --block` takes its processes down with it; SIGKILL if it hangs
        for sig in (signal.SIGTERM, signal.SIGKILL):
            os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
                break
        log.close()


def client_env(tmp: Path, address: str, token: str | None) -> dict:
    """"Your machine": no ~/.ray of its own; RAY_ADDRESS and (auth on) the token, as the guide says."""
    home = tmp / "client-home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(HOME=str(home), RAY_ADDRESS=address)
    if token:
        env.update(RAY_AUTH_TOKEN=token, RAY_AUTH_MODE="token")
    return env


def wait_for_jobs_api(env: dict, proc, tmp: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run([RAY, "job", "list"], env=env, capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the head's Jobs API did not answer: {done.stderr[-800:]}\n"
                        f"{(tmp / 'head.log').read_text()[-1500:]}")
        time.sleep(1)


@pytest.mark.parametrize("token_auth", [True, False], ids=["token-auth-on", "token-auth-off"])
def test_the_deploy_guide_on_one_machine(bucket, token_auth):
    fs, endpoint = bucket
    tmp = Path("/tmp") / f"m2tdg{os.getpid()}{int(token_auth)}"  # a short path: Ray's socket paths
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.monotonic()
    try:
        with head_node(tmp, endpoint, token_auth) as (address, token, proc):
            env = client_env(tmp, address, token)
            wait_for_jobs_api(env, proc, tmp)
            if token_auth:  # without the token (what the old guide led to): refused
                bare = client_env(tmp, address, None)
                refused = subprocess.run([RAY, "job", "list"], env=bare, capture_output=True, text=True, timeout=120)
                assert refused.returncode != 0, refused.stdout[-500:]
                assert "auth" in (refused.stdout + refused.stderr).lower(), refused.stderr[-800:]
            compress = ["--", "m2t", "compress", "s3://photos/in", ARCHIVE, "--model", "m2t-small-q3", "--no-progress"]
            first = _ray(["job", "submit", "--submission-id", "photos-q3-1", *compress], env)
            assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
            status = _ray(["job", "status", "photos-q3-1"], env)
            assert "Job 'photos-q3-1' succeeded" in status.stdout, status.stdout + status.stderr
            logs = _ray(["job", "logs", "photos-q3-1"], env)  # the report is at the end of the log
            assert re.search(r"images\s+3\s+ok 3\s+error 0", logs.stdout), logs.stdout[-2000:]
            fs.invalidate_cache()
            report = json.loads(fs.cat(f"{ARCHIVE[5:]}/report.json"))
            assert report["complete"] and report["exit_code"] == 0, report
            # "Run the same command again" with the same id: Ray refuses it; the guide uses a new one.
            same_id = _ray(["job", "submit", "--submission-id", "photos-q3-1", *compress], env)
            assert same_id.returncode != 0 and "already exists" in same_id.stdout + same_id.stderr
            rerun = _ray(["job", "submit", "--submission-id", "photos-q3-2", *compress], env)
            assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-2000:]
            assert "already done" in rerun.stdout, rerun.stdout[-3000:]
            # Verify, with the report written to the bucket (the head's disk is not kept).
            verify = _ray(["job", "submit", "--submission-id", "photos-q3-verify-1", "--", "m2t", "verify", ARCHIVE,
                           "--no-progress", "--report", f"{ARCHIVE}/verify.json"], env)
            assert verify.returncode == 0 and "CLEAN" in verify.stdout, verify.stdout[-3000:] + verify.stderr[-1000:]
            fs.invalidate_cache()
            verified = json.loads(fs.cat(f"{ARCHIVE[5:]}/verify.json"))
            assert verified["exit_code"] == 0 and verified["verified"] == verified["images"] == 3, verified
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ndeploy guide, token auth {'on' if token_auth else 'off'}: {time.monotonic() - t0:.1f} s")
