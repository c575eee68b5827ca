"""The shard-job runner (pipeline/runner.py): the in-process runner's retries, the progress
bar's ETA, the exit-code policy. The Ray pools are exercised by the jobs' own tests
(test_compress, test_verify, test_evaluate, test_resume_lease) and by test_multinode."""

from __future__ import annotations

import pytest

from pipeline.jobs import compress as C
from pipeline.evaluation import evaluate as E
from pipeline.jobs import runner as R
from pipeline.jobs import verify as V


class Flaky:
    """process(payload): raises for the first `fails[payload]` calls with that payload."""

    def __init__(self, fails: dict[str, int], exc=OSError("transient: connection reset")):
        self.fails, self.exc, self.calls = dict(fails), exc, []

    def __call__(self, payload: str) -> str:
        self.calls.append(payload)
        if self.fails.get(payload, 0) > 0:
            self.fails[payload] -= 1
            raise self.exc
        return payload.upper()


def run(items, process, retries):
    done, failed = {}, {}
    events = R.run_in_process([(k, k) for k in items], process, done.__setitem__, failed.__setitem__,
                              retries=retries)
    return done, failed, events


def test_in_process_retries_an_item_that_fails_once(caplog):
    process = Flaky({"b": 1})
    done, failed, events = run(["a", "b", "c"], process, retries=2)
    assert done == {"a": "A", "b": "B", "c": "C"} and failed == {}
    assert process.calls == ["a", "b", "b", "c"]  # b: tried again at once, then the next item
    assert events["retries"] == [{"shard": "b", "attempt": 1, "reason": "OSError: transient: connection reset"}]
    assert "shard b failed (attempt 1 of 3), retrying" in caplog.text


def test_in_process_fails_an_item_after_its_retries():
    process = Flaky({"b": 5})
    done, failed, events = run(["a", "b", "c"], process, retries=1)
    assert done == {"a": "A", "c": "C"}  # the others still run
    assert failed == {"b": "OSError: transient: connection reset"}
    assert process.calls.count("b") == 2 and len(events["retries"]) == 1


def test_in_process_without_retries_tries_once():
    process = Flaky({"a": 1})
    done, failed, _ = run(["a"], process, retries=0)
    assert done == {} and list(failed) == ["a"] and process.calls == ["a"]


def test_in_process_interrupt_is_not_retried():
    process = Flaky({"a": 1}, exc=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run(["a", "b"], process, retries=3)
    assert process.calls == ["a"]


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


def test_every_job_keeps_its_exit_codes():
    assert (C.EXIT_OK, C.EXIT_FAILED_IMAGES, C.EXIT_USAGE, C.EXIT_INCOMPLETE) == (0, 1, 2, 3)
    assert (V.EXIT_OK, V.EXIT_ISSUES, V.EXIT_USAGE, V.EXIT_INCOMPLETE) == (0, 1, 2, 3)
    assert (E.EXIT_OK, E.EXIT_FAILED_ROWS, E.EXIT_USAGE, E.EXIT_INCOMPLETE) == (0, 1, 2, 3)


def test_cause_line_picks_the_named_exception():
    text = "Traceback (most recent call last):\n  File x\nValueError: bad\n\nsome trailer"
    assert R.cause_line(text) == "ValueError: bad"
    assert R.cause_line("") == ""
    assert R.cause_line(RuntimeError()) == "RuntimeError"
    assert R.cause_line(OSError("disk full")) == "disk full"


def test_plan_pool_options_are_typed():
    opts = R.PoolOptions(actors=2, cpus_per_actor=1.0)
    plan = R.plan_actors(opts, gpus=0, cpus=4, n_shards=10)
    assert (plan.actors, plan.use_gpu, plan.gpu_per_actor) == (2, False, 0.0)
