"""How the runner (pipeline/jobs/runner.py) runs a job's items: in this process, on a pool of
Ray actors, or as Ray tasks; with one retry policy for all three (docs/runner.md).

  * run_in_process: one item after the other in this process.
  * ActorPool: Ray actors, each holding one worker of the job (a model), that
    survive lost nodes: retries, replacement from the capacity the cluster has now, a
    placement timeout, and `recover` (an item committed by an actor that died before
    answering counts as done).
  * run_task_pool: one Ray task per item, with per-item resources (evaluate: CPU-only classic
    codecs beside GPU model units), driver-side retries, a placement timeout.
  * Retries: the retry policy of all three.
  * plan_actors / plan_pool: how many actors, on what, from the cluster's resources.

Failures are told apart by their type (Ray's exception classes and their attributes), never by
their text: `failure_reason` only picks what to show.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from m2t_core.config import ConfigError

from pipeline.errors import JobError

log = logging.getLogger(__name__)

MAX_AUTO_ACTORS_PER_GPU = 4


# ====================================================================== workers and failures


@dataclass(frozen=True)
class Placement:
    """Where a job's worker runs: on a Ray actor or task, or in the driver's process."""

    ray: bool = False
    device: str = "cpu"  # "cpu" or "cuda[:N]"
    cpus: float = 0.0  # CPUs reserved for it on Ray (0 in process: the machine's)
    node_id: str | None = None  # its Ray node


def ray_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


class WorkerHost:
    """A Ray actor holding one worker of a job: `worker_cls(settings, placement)`, built once,
    then fed items through `process`. `ready()` is the pool's placement probe."""

    def __init__(self, worker_cls, settings, placement: Placement):
        logging.basicConfig(level=logging.INFO)
        self.placement = dataclasses.replace(placement, node_id=ray_node_id())
        self.worker = worker_cls(settings, self.placement)

    def ready(self) -> dict[str, Any]:
        return {"node_id": self.placement.node_id, "worker": f"{socket.gethostname()}:{os.getpid()}"}

    def process(self, payload):
        return self.worker.process(payload)


def run_task(shared: tuple, payload, gpus: float):
    """One Ray task: a worker of the job built here (`shared` is (worker class, settings))
    does one item."""
    worker_cls, settings = shared
    logging.basicConfig(level=logging.INFO)
    placement = Placement(ray=True, device="cuda" if gpus else "cpu", node_id=ray_node_id())
    return worker_cls(settings, placement).process(payload)


def actor_runtime_env() -> dict[str, Any]:
    """The environment of the job's actors. glibc gives every new thread its own malloc arena
    and keeps the freed memory; with a reader thread per shard an actor's resident memory rose
    18% over its first 14 shards before levelling off (bench/pipeline_speed.py). Two arenas
    keep it flat at no measured cost. $MALLOC_ARENA_MAX on the driver overrides the 2."""
    return {"env_vars": {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}}


def cause_line(err: str | BaseException) -> str:
    """The most telling line of an error, to show (a Ray error's text is a whole traceback):
    the last line that names an exception. An exception's `cause` (RayTaskError) is preferred."""
    if isinstance(err, BaseException):
        fallback = type(err).__name__
        text = str(getattr(err, "cause", None) or err)
    else:
        fallback, text = "", err
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
    return (named or lines or [fallback])[-1]


def _ray_exceptions():
    """ray.exceptions if Ray is loaded (a failure can only be Ray's then), else None."""
    return sys.modules.get("ray.exceptions")


def actor_lost(exc: BaseException) -> bool:
    """Whether a failed call means its actor is gone (its process or node died, or it cannot be
    reached), so the actor is replaced and its queued items go to the others."""
    rex = _ray_exceptions()
    return rex is not None and isinstance(exc, rex.RayActorError)


def actor_init_failed(exc: BaseException) -> bool:
    """Whether an actor died because its constructor raised: every replacement would too."""
    return actor_lost(exc) and bool(exc.actor_init_failed)


def failure_reason(exc: BaseException) -> str:
    """What to show for a failed attempt: the exception's type and first line (a Ray task's
    error: its cause's); a lost actor says so. For the report only: nothing decides on it."""
    rex = _ray_exceptions()
    if rex is not None and isinstance(exc, rex.RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    elif actor_lost(exc):
        return f"worker died: {cause_line(exc) or type(exc).__name__}"
    elif rex is not None and isinstance(exc, rex.RayError):  # object lost, owner died, node died, ...
        return f"{type(exc).__name__}: {cause_line(exc)}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class Retries:
    """The retry policy of every way to run items: an attempt that failed is tried again up to
    `retries` more times (logged, and listed in `events` for the report), then the item fails
    with the last reason (`on_failed(key, reason)`)."""

    def __init__(self, retries: int, what: str, on_failed: Callable[[str, str], None]):
        self.retries, self.what, self.on_failed = retries, what, on_failed
        self.events: list[dict[str, Any]] = []

    def again(self, key: str, attempt: int, reason: str) -> bool:
        """After attempt number `attempt` (0-based) of `key` failed: True to try it again."""
        if attempt < self.retries:
            log.warning("%s %s failed (attempt %d of %d), retrying: %s", self.what, key, attempt + 1,
                        self.retries + 1, reason)
            self.events.append({self.what: key, "attempt": attempt + 1, "reason": reason})
            return True
        log.error("%s %s failed after %d attempt(s): %s", self.what, key, attempt + 1, reason)
        self.on_failed(key, reason)
        return False


# ====================================================================== in this process


def run_in_process(items: Iterable[tuple[str, Any]], process: Callable[[Any], Any],
                   on_result: Callable[[str, Any], None], on_failed: Callable[[str, str], None], *,
                   retries: int, what: str = "shard") -> dict[str, Any]:
    """Run `process(payload)` for each (key, payload) in this process, one after the other; an
    item that raises (an Exception: KeyboardInterrupt stops the run) is retried by the policy
    (Retries), then `on_failed(key, reason)`. `on_result(key, result)` gets each success.
    Returns {"retries": [{what: key, attempt, reason}, ...]} like the Ray pools' faults."""
    policy = Retries(retries, what, on_failed)
    for key, payload in items:
        attempt = 0
        while True:
            try:
                result = process(payload)
            except Exception as exc:
                if policy.again(key, attempt, failure_reason(exc)):
                    attempt += 1
                    continue
                break
            on_result(key, result)
            break
    return {"retries": policy.events}


# ====================================================================== planning actors


class ActorOptions(Protocol):
    """What plan_actors reads (compress's RayOptions and the runner's RunOptions have it)."""

    actors: int
    cpus_per_actor: float
    use_gpu: Any
    actors_per_gpu: int


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    use_gpu: bool
    gpu_per_actor: float  # the fraction of one GPU each actor asks Ray for (0 without GPUs)

    @property
    def description(self) -> str:
        if not self.use_gpu:
            return "CPU only"
        share = round(1 / self.gpu_per_actor)
        return "1 GPU each" if share == 1 else f"{share} actors per GPU"


def use_gpus(wanted: bool | None, gpus: int) -> bool:
    """Whether workers use GPUs: `wanted` (None: iff the cluster has some); never asked of a
    cluster without them (a worker waiting for a GPU nobody has would wait forever)."""
    use_gpu = gpus >= 1 if wanted is None else bool(wanted)
    if use_gpu and gpus < 1:
        raise ConfigError("ray.use_gpu is true but the cluster has no GPUs")
    return use_gpu


def plan_actors(options: ActorOptions, gpus: int, cpus: float, n_shards: int) -> ActorPlan:
    """How many actors, on what, from what the cluster has: an actor asking for a resource
    the cluster lacks would wait forever, so ask only for what exists."""
    use_gpu = use_gpus(options.use_gpu, gpus)
    per = options.cpus_per_actor
    per_gpu = 1
    if use_gpu:
        cpus_per_gpu = cpus / gpus
        per_gpu = options.actors_per_gpu or max(1, min(MAX_AUTO_ACTORS_PER_GPU,
                                                       int(cpus_per_gpu // per) if per > 0 else 1))
    if options.actors:
        actors = options.actors
        if use_gpu and actors > gpus * per_gpu:
            raise ConfigError(f"ray.actors={actors} GPU actors requested, the cluster has {gpus} GPU(s) "
                              f"x ray.actors_per_gpu={per_gpu}")
        if actors * per > cpus:
            raise ConfigError(f"ray.actors={actors} x ray.cpus_per_actor={per:g} CPUs requested, "
                              f"the cluster has {cpus:g} CPUs")
    elif use_gpu:
        actors = gpus * per_gpu
        if actors * per > cpus:
            raise ConfigError(f"{gpus} GPU(s) x ray.actors_per_gpu={per_gpu} actors need {actors * per:g} CPUs "
                              f"(ray.cpus_per_actor={per:g}), the cluster has {cpus:g}")
    else:
        actors = max(1, int(cpus // per) if per > 0 else int(cpus))
    return ActorPlan(max(1, min(actors, n_shards)), use_gpu, 1.0 / per_gpu if use_gpu else 0.0)


def plan_pool(options: ActorOptions, n_items: int) -> ActorPlan:
    """plan_actors from the connected cluster's resources (ray.cluster_resources())."""
    import ray

    resources = ray.cluster_resources()
    return plan_actors(options, int(resources.get("GPU", 0)), resources.get("CPU", 0), n_items)


def actor_class(options: ActorOptions, plan: ActorPlan):
    """WorkerHost as a Ray actor class with the pool's resources (no restarts: the pool
    replaces lost actors itself) and actor_runtime_env()."""
    import ray

    return ray.remote(WorkerHost).options(num_cpus=options.cpus_per_actor, num_gpus=plan.gpu_per_actor,
                                          max_restarts=0, runtime_env=actor_runtime_env())


# ====================================================================== the actor pool


def _free(resources: Mapping[str, float], cpus: float, gpus: float) -> bool:
    return resources.get("CPU", 0.0) + 1e-9 >= cpus and resources.get("GPU", 0.0) + 1e-9 >= gpus


class _Slot:
    """One actor of the pool: starting (its `ready` probe pending), ready, or gone."""

    def __init__(self, index: int, actor, ready_ref, started: float):
        self.index, self.actor, self.ready_ref, self.started = index, actor, ready_ref, started
        self.ready = False
        self.gone = False
        self.node_id: str | None = None
        self.load = 0


class ActorPool:
    """Items ((key, payload) pairs) on a pool of up to `target` Ray actors (`actor_cls`, built
    with `init_args`; `actor.process.remote(payload)` does one item) that survives the loss of
    actors and nodes.

    * An actor gets work only once its `ready()` probe answered (it was placed and built);
      one that is not placed within `placement_timeout_s` is killed and counted as
      unplaceable, so the job never waits on capacity that is gone.
    * An actor that dies (its node was removed, out of memory) takes its queued items with it:
      each is retried on the actors left (Retries); `recover(key)` may first find that the
      dead actor committed the item before its answer came back.
    * The pool re-plans from what the cluster has *now*: a lost actor is replaced only when
      `ray.available_resources()` shows room for one (`cpus`, `gpus`); every
      `replan_interval_s` it also starts actors up to `target` if capacity came back.
    * With no actor alive and none placeable, the remaining items fail with the reason.
    * An actor whose constructor raised is a JobError: every replacement would fail the same way.

    `on_result(key, result)` (once per key: a second answer is only counted, in
    "duplicate_results") and `on_failed(key, reason)` receive the outcomes; `run()` returns
    what happened, for the report."""

    def __init__(self, actor_cls, init_args: tuple, target: int, items: Sequence[tuple[str, Any]],
                 on_result, on_failed, *, retries: int, in_flight: int, cpus: float, gpus: float,
                 placement_timeout_s: float, recover=None, what: str = "shard", replan_interval_s: float = 5.0):
        import ray

        self.ray, self.actor_cls, self.init_args, self.target = ray, actor_cls, init_args, target
        self.on_result, self.recover, self.what = on_result, recover, what
        self.in_flight, self.cpus, self.gpus = in_flight, cpus, gpus
        self.placement_timeout_s, self.replan_interval_s = placement_timeout_s, replan_interval_s
        self.policy = Retries(retries, what, on_failed)
        self.max_starts = target * (retries + 2)  # replacements are bounded: never a restart loop
        self.t0 = time.monotonic()
        self.slots: list[_Slot] = []
        self.pending = deque((key, payload, 0) for key, payload in items)
        self.inflight: dict[Any, tuple[_Slot, str, Any, int]] = {}
        self.answered: set[str] = set()
        self.events: dict[str, Any] = {"actors_started": 0, "actors_lost": [], "actors_unplaceable": 0,
                                       "retries": self.policy.events, "recovered": [], "nodes": {},
                                       "duplicate_results": []}

    # -------------------------------------------------------------- the loop

    def run(self) -> dict[str, Any]:
        for _ in range(self.target):
            self._start()
        self.last_replan = time.monotonic()
        try:
            while self.pending or self.inflight:
                self._dispatch()
                starting = [s for s in self._live() if not s.ready]
                if not self.inflight and not starting:
                    if self.pending and self.events["actors_started"] < self.max_starts and self._room():
                        log.info("no actor left: starting one on the capacity that is free")
                        self._start()
                        continue
                    self._fail_the_rest()
                    break
                self._wait(starting)
                self._give_up_unplaced()
                self._replan()
        finally:
            for slot in self.slots:
                self._kill(slot)
            self.events["actors_final"] = len([s for s in self.slots if s.ready and not s.gone])
            self.events["nodes"] = {k: v for k, v in self.events["nodes"].items() if k}
        return self.events

    def _dispatch(self) -> None:
        """Queue pending items on the ready actors, least loaded first: a fair share per live
        actor (starting ones included), so that the first actor up does not take every item of
        a small job; never below 1, so no ready actor idles."""
        share = -(-(len(self.pending) + len(self.inflight)) // max(1, len(self._live())))
        cap = min(self.in_flight, max(1, share))
        for slot in sorted((s for s in self.slots if s.ready and not s.gone), key=lambda s: s.load):
            while self.pending and slot.load < cap:
                key, payload, attempt = self.pending.popleft()
                self.inflight[slot.actor.process.remote(payload)] = (slot, key, payload, attempt)
                slot.load += 1

    def _wait(self, starting: list[_Slot]) -> None:
        """Wait for one answer (or a ready probe), at most until the next placement deadline or
        re-plan, and take it."""
        now = time.monotonic()
        deadlines = [s.started + self.placement_timeout_s for s in starting]
        timeout = max(0.05, min([self.replan_interval_s] + [d - now for d in deadlines]))
        probes = {s.ready_ref: s for s in starting}
        done, _ = self.ray.wait(list(self.inflight) + list(probes), num_returns=1, timeout=timeout)
        for ref in done:
            if ref in probes:
                self._on_ready(probes[ref], ref)
            else:
                self._on_answer(ref)

    def _on_ready(self, slot: _Slot, ref) -> None:
        try:
            info = self.ray.get(ref)
        except Exception as exc:
            if actor_init_failed(exc):
                raise JobError(f"a worker failed to start: {cause_line(exc)}") from None
            self._lose(slot, f"died while starting: {failure_reason(exc)}")
            return
        slot.ready, slot.node_id = True, info.get("node_id")
        self.events["nodes"].setdefault(slot.node_id, 0)
        log.info("actor %d ready on node %s after %.1f s", slot.index, slot.node_id, time.monotonic() - slot.started)

    def _on_answer(self, ref) -> None:
        slot, key, payload, attempt = self.inflight.pop(ref)
        slot.load -= 1
        try:
            result = self.ray.get(ref)
        except Exception as exc:  # the item raised (RayTaskError), its actor died, its object was lost, ...
            if actor_init_failed(exc):
                raise JobError(f"a worker failed to start: {cause_line(exc)}") from None
            if actor_lost(exc):
                self._lose(slot, cause_line(exc) or type(exc).__name__, key)
            self._retry_or_fail(key, payload, attempt, failure_reason(exc))
            return
        self.events["nodes"][slot.node_id] = self.events["nodes"].get(slot.node_id, 0) + 1
        self._deliver(key, result)

    # -------------------------------------------------------------- items

    def _deliver(self, key: str, result) -> None:
        if key in self.answered:  # never expected: an item is only re-sent after its attempt failed
            self.events["duplicate_results"].append(key)
            log.error("%s %s came back twice", self.what, key)
            return
        self.answered.add(key)
        self.on_result(key, result)

    def _retry_or_fail(self, key: str, payload, attempt: int, reason: str) -> None:
        if self.recover is not None:
            got = self.recover(key)
            if got is not None:  # the dead actor finished it before its answer was lost
                self.events["recovered"].append(key)
                self._deliver(key, got)
                return
        if self.policy.again(key, attempt, reason):
            self.pending.append((key, payload, attempt + 1))

    def _fail_the_rest(self) -> None:
        """Nobody is left to do the work and no actor can be placed: the items left fail."""
        free = self.ray.available_resources()
        reason = (f"no worker can be placed: every actor was lost ({self.events['actors_started']} started) "
                  f"and the cluster has {free.get('CPU', 0):g} CPU / {free.get('GPU', 0):g} GPU free "
                  f"(an actor needs {self.cpus:g} CPU" + (f", {self.gpus:g} GPU" if self.gpus else "") + ")")
        log.error("%s; %d %s(s) left undone (rerun to resume)", reason, len(self.pending), self.what)
        while self.pending:
            key, _, _ = self.pending.popleft()
            self.policy.on_failed(key, reason)

    # -------------------------------------------------------------- actors

    def _live(self) -> list[_Slot]:
        return [s for s in self.slots if not s.gone]

    def _room(self) -> bool:
        try:
            return _free(self.ray.available_resources(), self.cpus, self.gpus)
        except Exception:
            return False

    def _start(self) -> None:
        actor = self.actor_cls.remote(*self.init_args)
        self.slots.append(_Slot(len(self.slots), actor, actor.ready.remote(), time.monotonic()))
        self.events["actors_started"] += 1

    def _kill(self, slot: _Slot) -> None:
        try:
            self.ray.kill(slot.actor)
        except Exception:  # already gone with its node
            pass

    def _lose(self, slot: _Slot, reason: str, holding: str | None = None) -> None:
        if slot.gone:
            return
        slot.gone = True
        queued = sorted([key for s, key, _, _ in self.inflight.values() if s is slot] + [holding] * bool(holding))
        self.events["actors_lost"].append({"actor": slot.index, "node_id": slot.node_id, "reason": reason,
                                           "lost_" + self.what + "s": queued,
                                           "at_s": round(time.monotonic() - self.t0, 2)})
        log.warning("actor %d on node %s lost (%s); %d %s(s) in its queue go back to the others", slot.index,
                    (slot.node_id or "?")[:12], reason, len(queued), self.what)
        self._kill(slot)

    def _give_up_unplaced(self) -> None:
        now = time.monotonic()
        for slot in [s for s in self._live() if not s.ready]:
            if now - slot.started > self.placement_timeout_s:
                self.events["actors_unplaceable"] += 1
                slot.gone = True
                log.warning("actor %d was not placed within %.0f s (the cluster lacks %g CPU%s free): "
                            "going on without it", slot.index, self.placement_timeout_s, self.cpus,
                            f" / {self.gpus:g} GPU" if self.gpus else "")
                self._kill(slot)

    def _replan(self) -> None:
        """Start one actor (up to `target`) when the cluster has room again and work is waiting
        that the live actors' queues cannot take."""
        now = time.monotonic()
        if not (now - self.last_replan >= self.replan_interval_s
                or (self.events["actors_lost"] and now - self.last_replan >= 0.5)):
            return
        self.last_replan = now
        alive = self._live()
        if (len(alive) < self.target and self.pending and not any(not s.ready for s in alive)
                and self.events["actors_started"] < self.max_starts
                and len(self.pending) > sum(self.in_flight - s.load for s in alive if s.ready) and self._room()):
            log.info("re-plan: %d actor(s) alive of %d planned, and the cluster has room: starting one",
                     len(alive), self.target)
            self._start()


# ====================================================================== the task pool


def placeable(demand: tuple[float, float]) -> bool:
    """Whether some live node of the cluster has (CPUs, GPUs) at all (free or not)."""
    import ray

    cpus, gpus = demand
    for node in ray.nodes():
        if node.get("Alive"):
            have = node.get("Resources", {})
            if have.get("CPU", 0) + 1e-9 >= cpus and have.get("GPU", 0) + 1e-9 >= gpus:
                return True
    return False


def run_task_pool(shared: tuple, items: Sequence[tuple[str, Any, tuple[float, float]]], on_result, on_failed, *,
                  retries: int, in_flight: int, placement_timeout_s: float, what: str = "unit") -> dict[str, Any]:
    """Run each (key, payload, (cpus, gpus)) item as one Ray task (run_task: a worker built from
    `shared` = (worker class, settings), put in the object store once), each with its own
    resources (items that need a GPU and items that do not mix in one job), at most `in_flight`
    at once.

    Retries are the driver's (Retries, not Ray's), so that the report counts them: an item
    whose task raised or whose worker or node died is resubmitted and lands on whatever nodes
    are left. A task that no live node could ever run (its GPU node is gone) is not waited for
    beyond `placement_timeout_s`: it fails. `on_result(key, result)` and `on_failed(key,
    reason)` receive the outcomes. Returns {"retries": [...], "unplaceable": [...]}."""
    import ray

    task = ray.remote(run_task)
    shared_ref = ray.put(shared)
    policy = Retries(retries, what, on_failed)
    pending = deque((key, payload, demand, 0) for key, payload, demand in items)
    inflight: dict[Any, tuple[str, Any, tuple[float, float], int]] = {}
    stuck_since: dict[Any, float] = {}
    faults: dict[str, Any] = {"retries": policy.events, "unplaceable": []}
    try:
        while pending or inflight:
            while pending and len(inflight) < in_flight:
                key, payload, demand, attempt = pending.popleft()
                options = {"num_cpus": demand[0], "num_gpus": demand[1], "max_retries": 0}
                ref = task.options(**options).remote(shared_ref, payload, demand[1])
                inflight[ref] = (key, payload, demand, attempt)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0)
            for ref in ready:
                key, payload, demand, attempt = inflight.pop(ref)
                stuck_since.pop(ref, None)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the task raised, or its worker or node died
                    if policy.again(key, attempt, failure_reason(exc)):
                        pending.append((key, payload, demand, attempt + 1))
                    continue
                on_result(key, result)
            if not ready:  # nothing finished for a while: is some task asking for what no node has?
                _fail_unplaceable(inflight, stuck_since, faults, policy, placement_timeout_s, what)
    except BaseException:
        for ref in inflight:
            ray.cancel(ref, force=True)
        raise
    return faults


def _fail_unplaceable(inflight: dict, stuck_since: dict, faults: dict, policy: Retries, timeout_s: float,
                      what: str) -> None:
    """Fail the tasks that no live node could run for `timeout_s` (cancelled; not retried)."""
    import ray

    now = time.monotonic()
    for ref, (key, _payload, demand, _attempt) in list(inflight.items()):
        if placeable(demand):
            stuck_since.pop(ref, None)
            continue
        since = stuck_since.setdefault(ref, now)
        if now - since >= timeout_s:
            ray.cancel(ref, force=True)
            inflight.pop(ref)
            stuck_since.pop(ref)
            reason = (f"cannot be placed: no live node has {demand[0]:g} CPU"
                      + (f" and {demand[1]:g} GPU" if demand[1] else "") + f" (waited {timeout_s:g} s)")
            log.error("%s %s %s; rerun when the cluster has the capacity", what, key, reason)
            faults["unplaceable"].append(key)
            policy.on_failed(key, reason)
