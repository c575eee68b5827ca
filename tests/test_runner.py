"""The job skeleton (pipeline/jobs/runner.py, pools.py, pipeline/errors.py): a toy job run in
this process, on the shared Ray cluster's actor pool and as Ray tasks — retries, an item that
fails after its retries, workers that cannot start, Ctrl-C, items with issues — and the exit
code of every error type through the one `main` wrapper. The real jobs run on the same
skeleton in test_compress, test_verify, test_evaluate, test_resume_lease and test_multinode.

The toy worker fails on purpose through flag files (one file = one failed attempt of a key), so
that a failure planned for a key happens once whichever process (actor, task) takes it."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import errors
from pipeline.jobs import runner as R
from pipeline.jobs.runner import Item, Job, Report, RunOptions, run_job


# ====================================================================== a toy job


@dataclass(frozen=True)
class ToySettings:
    flags: str  # folder of flag files: `<key>.<n>` makes one attempt at `key` fail
    issues: frozenset = frozenset()  # keys whose result counts one issue
    interrupt: str | None = None  # the worker raises KeyboardInterrupt at this key (in process)
    fail_init: bool = False  # the worker's constructor raises


class ToyWorker:
    def __init__(self, settings: ToySettings, placement: R.Placement):
        if settings.fail_init:
            raise RuntimeError("no model here")
        self.settings, self.placement = settings, placement

    def process(self, key: str) -> dict:
        if key == self.settings.interrupt:
            raise KeyboardInterrupt
        for flag in sorted(Path(self.settings.flags).glob(f"{key}.*")):
            try:
                flag.unlink()  # taken by this attempt (never by two)
            except FileNotFoundError:
                continue
            raise OSError(f"transient failure of {key}")
        return {"images": 2, "issues": int(key in self.settings.issues), "pid": os.getpid(),
                "ray": self.placement.ray, "device": self.placement.device}


class ToyJob(Job):
    name, what = "toy", "item"
    worker = ToyWorker

    def __init__(self, keys, settings: ToySettings, *, pool: str = "actors", interrupt_at: int | None = None):
        super().__init__()
        self.keys, self.settings, self.pool, self.interrupt_at = list(keys), settings, pool, interrupt_at
        self.results: dict[str, dict] = {}
        self.saved: dict | None = None

    def plan(self):
        return [Item(k, k, images=2, gpu=True) for k in self.keys]

    def fold(self, key, result):
        if self.interrupt_at is not None and len(self.results) == self.interrupt_at:
            raise KeyboardInterrupt  # Ctrl-C while the driver takes a result
        self.results[key] = result
        return result["images"], result["issues"]

    def report(self, run):
        body = {"done": sorted(self.results), "failed": dict(run.failed), "interrupted": run.interrupted,
                "runner": run.runner, "faults": run.faults, "seconds": run.seconds}
        return Report(body, complete=len(self.results) == len(self.keys),
                      issues=sum(r["issues"] for r in self.results.values()))

    def save(self, report):
        self.saved = report


def flags(tmp_path: Path, **counts: int) -> str:
    folder = tmp_path / "flags"
    folder.mkdir(exist_ok=True)
    for key, n in counts.items():
        for i in range(n):
            (folder / f"{key}.{i}").touch()
    return str(folder)


def toy(tmp_path, keys="abc", *, fails=None, issues=(), pool="actors", interrupt=None, interrupt_at=None,
        fail_init=False) -> ToyJob:
    settings = ToySettings(flags(tmp_path, **(fails or {})), frozenset(issues), interrupt, fail_init)
    return ToyJob(keys, settings, pool=pool, interrupt_at=interrupt_at)


IN_PROCESS = RunOptions(ray=False, device="cpu", progress=False)


def on_ray(**changes) -> RunOptions:
    return RunOptions(**{"ray": True, "actors": 2, "progress": False, "placement_timeout_s": 60, **changes})


@pytest.fixture(scope="module")
def ray_toy(ray_cluster):
    """The shared cluster, with this module's classes sent by value (Ray's workers cannot import
    a test module)."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray_cluster
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


# ====================================================================== in this process


def test_in_process_retries_an_item_then_it_succeeds(tmp_path, caplog):
    job = toy(tmp_path, fails={"b": 1})
    report, code = run_job(job, IN_PROCESS)
    assert code == errors.EXIT_OK and report["done"] == ["a", "b", "c"] and report["failed"] == {}
    assert report["runner"] == {"ray": False, "device": "cpu"} and not job.results["a"]["ray"]
    assert job.saved is report and report["exit_code"] == 0 and report["wall_s"] > 0
    assert "item b failed (attempt 1 of 3), retrying: OSError: transient failure of b" in caplog.text


def test_in_process_item_failing_after_its_retries_is_incomplete(tmp_path):
    job = toy(tmp_path, fails={"b": 5})
    report, code = run_job(job, RunOptions(ray=False, retries=1, progress=False))
    assert code == errors.EXIT_INCOMPLETE and report["exit_code"] == 3
    assert report["done"] == ["a", "c"]  # the others still ran
    assert report["failed"] == {"b": "OSError: transient failure of b"}
    assert len(list(Path(job.settings.flags).iterdir())) == 3  # 1 + 1 retry attempts took a flag each


def test_in_process_items_with_issues_exit_1(tmp_path):
    report, code = run_job(toy(tmp_path, issues={"c"}), IN_PROCESS)
    assert code == errors.EXIT_ISSUES and report["done"] == ["a", "b", "c"]


def test_ctrl_c_in_a_fold_keeps_what_was_done(tmp_path, caplog):
    job = toy(tmp_path, keys="abcd", interrupt_at=2)
    report, code = run_job(job, IN_PROCESS)
    assert code == errors.EXIT_INCOMPLETE and report["interrupted"]
    assert report["done"] == ["a", "b"] and job.saved["exit_code"] == 3  # the report is still written
    assert "interrupted: completed items are kept" in caplog.text


def test_ctrl_c_in_a_worker_is_not_retried(tmp_path):
    job = toy(tmp_path, interrupt="b")
    report, code = run_job(job, RunOptions(ray=False, retries=3, progress=False))
    assert code == errors.EXIT_INCOMPLETE and report["interrupted"]
    assert report["done"] == ["a"] and report["failed"] == {}


def test_nothing_to_do_is_complete_without_starting_anything(tmp_path):
    report, code = run_job(toy(tmp_path, keys=""), RunOptions(ray=True, progress=False))  # no cluster joined
    assert code == errors.EXIT_OK and report["runner"] == {"ray": True} and report["faults"] is None


def test_in_process_loop_alone(tmp_path):
    done, failed = {}, {}
    calls = []

    def process(key):
        calls.append(key)
        if calls.count(key) == 1 and key == "b":
            raise ConnectionResetError("reset by peer")
        return key.upper()

    events = R.run_in_process([(k, k) for k in "abc"], process, done.__setitem__, failed.__setitem__, retries=2)
    assert done == {"a": "A", "b": "B", "c": "C"} and failed == {} and calls == ["a", "b", "b", "c"]
    assert events["retries"] == [{"shard": "b", "attempt": 1, "reason": "ConnectionResetError: reset by peer"}]


# ====================================================================== on Ray


def test_actor_pool_retries_an_item_then_it_succeeds(tmp_path, ray_toy):
    job = toy(tmp_path, keys="abcd", fails={"c": 1}, issues={"a"})
    report, code = run_job(job, on_ray())
    assert code == errors.EXIT_ISSUES and report["done"] == ["a", "b", "c", "d"] and report["failed"] == {}
    runner = report["runner"]
    assert runner["ray"] and runner["actors"] == 2 and runner["use_gpu"] is False and runner["nodes"] == 1
    assert all(r["ray"] and r["pid"] != os.getpid() for r in job.results.values())
    faults = report["faults"]
    assert [(r["item"], r["attempt"]) for r in faults["retries"]] == [("c", 1)]
    assert "OSError: transient failure of c" in faults["retries"][0]["reason"]
    assert faults["actors_lost"] == [] and faults["duplicate_results"] == [] and faults["actors_started"] == 2


def test_actor_pool_item_failing_after_its_retries_is_incomplete(tmp_path, ray_toy):
    report, code = run_job(toy(tmp_path, fails={"b": 9}), on_ray(retries=1))
    assert code == errors.EXIT_INCOMPLETE and report["done"] == ["a", "c"]
    assert list(report["failed"]) == ["b"] and "transient failure of b" in report["failed"]["b"]
    assert len(report["faults"]["retries"]) == 1


def test_workers_that_cannot_start_fail_the_items_left(tmp_path, ray_toy):
    report, code = run_job(toy(tmp_path, fail_init=True), on_ray())
    assert code == errors.EXIT_INCOMPLETE and report["done"] == []
    assert sorted(report["failed"]) == ["a", "b", "c"]
    assert all("a worker failed to start" in r and "no model here" in r for r in report["failed"].values())


def test_ctrl_c_on_ray_keeps_what_was_done(tmp_path, ray_toy):
    job = toy(tmp_path, keys="abcdef", interrupt_at=1)
    report, code = run_job(job, on_ray())
    assert code == errors.EXIT_INCOMPLETE and report["interrupted"] and len(report["done"]) == 1
    assert report["faults"]["actors_final"] >= 0  # the pool's faults are reported after an interrupt too


def test_task_pool_retries_and_counts_issues(tmp_path, ray_toy):
    job = toy(tmp_path, keys="abc", fails={"a": 1}, issues={"b"}, pool="tasks")
    report, code = run_job(job, on_ray(in_flight=0))
    assert code == errors.EXIT_ISSUES and report["done"] == ["a", "b", "c"]
    runner = report["runner"]
    assert runner["cpus"] == 2 and runner["gpus"] == 0 and runner["cpus_per_task"] == 1.0
    assert [(r["item"], r["attempt"]) for r in report["faults"]["retries"]] == [("a", 1)]
    assert report["faults"]["unplaceable"] == []
    assert {r["device"] for r in job.results.values()} == {"cpu"}  # no GPU in the cluster: none asked for


def test_task_pool_item_failing_after_its_retries_is_incomplete(tmp_path, ray_toy):
    report, code = run_job(toy(tmp_path, fails={"c": 9}, pool="tasks"), on_ray(retries=0))
    assert code == errors.EXIT_INCOMPLETE and report["done"] == ["a", "b"]
    assert "transient failure of c" in report["failed"]["c"]


# ====================================================================== failures by type


def test_actor_failures_are_told_apart_by_type():
    from ray import exceptions as rex

    from pipeline.jobs import pools

    started = rex.RayActorError(error_msg="The actor died because of an error raised in its creation task",
                                actor_init_failed=True)
    died = rex.ActorDiedError()  # a system-level death (no cause): the node or process went away
    says_creation = rex.RayActorError(error_msg="... its creation task ... (but it never raised)")
    assert pools.actor_init_failed(started) and pools.actor_lost(started)
    assert not pools.actor_init_failed(died) and pools.actor_lost(died)
    assert not pools.actor_init_failed(says_creation)  # the text decides nothing
    assert not pools.actor_lost(OSError("its node died"))
    assert pools.failure_reason(died).startswith("worker died: ")
    assert pools.failure_reason(OSError("disk full\nmore")) == "OSError: disk full"
    assert pools.failure_reason(RuntimeError()) == "RuntimeError"


# ====================================================================== exit codes by type


def _raises(exc):
    def body():
        raise exc
    return body


@pytest.mark.parametrize("make, code", [
    (lambda: errors.UsageError("bad flag"), 2),
    (lambda: errors.IncompleteError("stopped early"), 3),
    (lambda: errors.JobError("a worker failed to start"), 3),
    (lambda: __import__("pipeline.storage.archive").storage.archive.ArchiveError("the archive is incomplete"), 2),
    (lambda: __import__("pipeline.storage.archive").storage.archive.ArchiveIncompleteError("no manifest"), 3),
    (lambda: __import__("m2t_core.config").config.ConfigError("unknown key"), 2),
    (lambda: __import__("pipeline.storage.sources").storage.sources.SourceError("input not found"), 2),
    (lambda: __import__("pipeline.storage.lease").storage.lease.LeaseHeldError("in use"), 2),
    (lambda: __import__("pipeline.storage.lease").storage.lease.LeaseLostError("lost"), 3),
    (lambda: __import__("pipeline.storage.lease").storage.lease.LeaseError("unreadable"), 2),
    (lambda: __import__("m2t_core.registry").registry.ModelNotFoundError("no model"), 2),
    (lambda: FileNotFoundError("gone"), 2),
    (lambda: ValueError("a bug, or an error of no known type"), 2),
])
def test_each_error_type_has_its_exit_code(make, code, capsys, monkeypatch):
    monkeypatch.delenv("M2T_DEBUG", raising=False)
    exc = make()
    assert errors.exit_code_of(exc) == code
    assert errors.run_main("m2t toy", _raises(exc)) == code
    err = capsys.readouterr().err
    assert err.startswith("m2t toy: error: ") and err.count("\n") == 1 and str(exc) in err


def test_the_main_wrapper_names_unknown_types_adds_hints_and_handles_ctrl_c(capsys, monkeypatch):
    from pipeline.storage.lease import LeaseLostError

    monkeypatch.delenv("M2T_DEBUG", raising=False)
    assert errors.run_main("m2t toy", _raises(ValueError("odd"))) == 2
    assert capsys.readouterr().err == "m2t toy: error: ValueError: odd\n"
    assert errors.run_main("m2t toy", _raises(LeaseLostError("taken over"))) == 3
    assert "taken over (this job stopped writing" in capsys.readouterr().err
    assert errors.run_main("m2t toy", _raises(KeyboardInterrupt())) == errors.EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "m2t toy: interrupted\n"
    assert errors.run_main("m2t toy", lambda: 1) == 1
    monkeypatch.setenv("M2T_DEBUG", "1")
    with pytest.raises(errors.UsageError):
        errors.run_main("m2t toy", _raises(errors.UsageError("traceback wanted")))


def test_every_job_keeps_its_exit_codes():
    from pipeline.evaluation import evaluate as E
    from pipeline.jobs import compress as C
    from pipeline.jobs import verify as V

    assert (C.EXIT_OK, C.EXIT_FAILED_IMAGES, C.EXIT_USAGE, C.EXIT_INCOMPLETE) == (0, 1, 2, 3)
    assert (V.EXIT_OK, V.EXIT_ISSUES, V.EXIT_USAGE, V.EXIT_INCOMPLETE) == (0, 1, 2, 3)
    assert (E.EXIT_OK, E.EXIT_FAILED_ROWS, E.EXIT_USAGE, E.EXIT_INCOMPLETE) == (0, 1, 2, 3)


# ====================================================================== the pieces


def test_eta_from_images_when_the_total_is_known_else_from_items():
    # 100 of 400 images in 50 s: 2 images/s, 300 left -> 150 s (the item rate would say 50 s).
    assert R.eta_seconds(100, 400, 1, 2, 50.0) == pytest.approx(150.0)
    # Unknown image total (tar shards): 1 of 4 items in 30 s -> 90 s.
    assert R.eta_seconds(100, None, 1, 4, 30.0) == pytest.approx(90.0)
    assert R.eta_seconds(0, 400, 0, 4, 10.0) is None  # nothing done yet
    assert R.eta_seconds(500, 400, 4, 4, 10.0) == 0  # more images than planned: done


def test_progress_postfix_shows_rate_and_eta():
    p = R.Progress(4, enabled=False, desc="compress", total_images=400)
    assert p.postfix(now=p.t0 + 1)["eta"] == "?"
    p.update(100, 3)
    post = p.postfix(now=p.t0 + 50)
    assert post == {"images": 100, "failed": 3, "img_s": "2.00", "eta": "0:02:30"}
    p = R.Progress(4, enabled=False, desc="verify", failures="issues")  # image total unknown
    p.update(10, 1)
    assert p.postfix(now=p.t0 + 3600)["eta"] == "3:00:00" and p.postfix(now=p.t0 + 1)["issues"] == 1
    p = R.Progress(2, enabled=False, desc="eval", unit="unit", count="rows", total_images=10)
    p.update(5)
    assert p.postfix(now=p.t0 + 5) == {"rows": 5, "failed": 0, "rows_s": "1.00", "eta": "0:00:05"}


def test_progress_bar_goes_to_stderr(capsys):
    p = R.Progress(2, enabled=True, desc="compress", total_images=4)
    p.update(2)
    p.update(2)
    p.close()
    captured = capsys.readouterr()
    assert captured.out == "" and "compress" in captured.err and "2/2" in captured.err


def test_the_run_shows_a_progress_bar_with_the_items_image_total(tmp_path, capsys):
    run_job(toy(tmp_path), RunOptions(ray=False, progress=True))
    err = capsys.readouterr().err
    assert "toy" in err and "3/3" in err and "images=6" in err


@pytest.mark.parametrize("kwargs, code", [
    ({"complete": True}, 0),
    ({"complete": True, "issues": 2}, 1),
    ({"complete": False}, 3),
    ({"complete": False, "issues": 2}, 3),
    ({"complete": True, "interrupted": True}, 3),
    ({"complete": True, "failed_items": 1, "issues": 5}, 3),
])
def test_exit_code_policy(kwargs, code):
    complete = kwargs.pop("complete")
    assert R.exit_code(complete, **kwargs) == code


def test_cause_line_picks_the_named_exception():
    text = "Traceback (most recent call last):\n  File x\nValueError: bad\n\nsome trailer"
    assert R.cause_line(text) == "ValueError: bad"
    assert R.cause_line("") == ""
    assert R.cause_line(RuntimeError()) == "RuntimeError"
    assert R.cause_line(OSError("disk full")) == "disk full"


def test_plan_actors_from_run_options():
    plan = R.plan_actors(RunOptions(actors=2, cpus_per_actor=1.0), gpus=0, cpus=4, n_shards=10)
    assert (plan.actors, plan.use_gpu, plan.gpu_per_actor) == (2, False, 0.0)
