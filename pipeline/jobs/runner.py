"""The shard-job runner: what compress, verify and evaluate share (docs/runner.md).

A job is a list of items ((key, payload) pairs: a shard, or an evaluation unit), a per-item
function, and a typed config. This module runs the items and reports what happened; the job
commits each item's output itself (the stats marker written last) and decides what a failed
item means. Its pieces:

  * run_actor_pool: a pool of Ray actors (each holds a model) that survives lost nodes:
    retries, replacement from the capacity the cluster has now, a placement timeout, and
    `recover` (an item committed by an actor that died before answering counts as done).
  * run_task_pool: Ray tasks with per-task resources and driver-side retries, for work whose
    items need different resources (evaluate: CPU-only classic codecs and GPU model units).
  * run_in_process: the same loop in this process, with the same retries.
  * Progress: one tqdm bar (stderr) with images done, failures, images/s and an ETA.
  * plan_actors / plan_pool: how many actors, on what, from the cluster's resources.
  * exit_code: the exit-code policy of every job.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from m2t_core.config import ConfigError

log = logging.getLogger(__name__)

# ====================================================================== exit codes

# Every job: 0 clean; 1 complete, but some inputs are not (compress: images not archived,
# verify: issues found, evaluate: rows failed); 2 usage or configuration error; 3 incomplete
# (an item failed after its retries, the run was interrupted or stopped early): rerun to resume.
EXIT_OK, EXIT_ISSUES, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3


def exit_code(complete: bool, *, interrupted: bool = False, failed_items: int = 0, issues: int = 0) -> int:
    """The exit code of a run: incomplete (3) when it was interrupted, did not complete, or an
    item failed after its retries; else 1 when some inputs have issues; else 0. Usage errors
    (2) are raised before a run and mapped by each job's main()."""
    if interrupted or not complete or failed_items:
        return EXIT_INCOMPLETE
    return EXIT_ISSUES if issues else EXIT_OK


# ====================================================================== small helpers


class JobError(RuntimeError):
    """The job cannot go on (e.g. its workers cannot start); completed shards are kept."""


def cause_line(err: str | BaseException) -> str:
    """The most telling line of an error (a Ray error's text is a whole traceback): the last
    line that names an exception. An exception's `cause` (RayTaskError) is preferred."""
    if isinstance(err, BaseException):
        fallback = type(err).__name__
        text = str(getattr(err, "cause", None) or err)
    else:
        fallback, text = "", err
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
    return (named or lines or [fallback])[-1]


def ray_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, MiB (the worker that did a shard), or None."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def connect_ray(address: str | None = None) -> None:
    """Join `address`, else $RAY_ADDRESS, else start a local cluster (once per process)."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, **({} if address else {"include_dashboard": False}))


def actor_runtime_env() -> dict[str, Any]:
    """The environment of the job's actors. glibc gives every new thread its own malloc arena
    and keeps the freed memory; with a reader thread per shard an actor's resident memory rose
    18% over its first 14 shards before levelling off (bench/pipeline_speed.py). Two arenas
    keep it flat at no measured cost. $MALLOC_ARENA_MAX on the driver overrides the 2."""
    return {"env_vars": {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}}


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ====================================================================== progress


def eta_seconds(images: int, total_images: int | None, items: int, total_items: int,
                elapsed_s: float) -> float | None:
    """Seconds left: from the images/s rate when the total image count is known, else from
    the items/s rate; None before anything is done."""
    if elapsed_s <= 0:
        return None
    if total_images and images > 0:
        return max(0, total_images - images) / (images / elapsed_s)
    if items > 0:
        return max(0, total_items - items) / (items / elapsed_s)
    return None


class Progress:
    """The progress bar of a job (tqdm on stderr, one tick per item), with a postfix of the
    images done, the failures, images/s and an ETA. `count` names what is counted ("images";
    evaluate counts "rows"), `failures` what failed ("failed", "issues")."""

    def __init__(self, total: int, enabled: bool, desc: str, *, unit: str = "shard",
                 total_images: int | None = None, count: str = "images", failures: str = "failed"):
        self.total, self.total_images = total, total_images
        self.count, self.failures = count, failures
        self.bar = None
        self.items = self.images = self.failed = 0
        self.t0 = time.perf_counter()
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def postfix(self, now: float | None = None) -> dict[str, Any]:
        elapsed = (time.perf_counter() if now is None else now) - self.t0
        rate = self.images / max(elapsed, 1e-9)
        eta = eta_seconds(self.images, self.total_images, self.items, self.total, elapsed)
        return {self.count: self.images, self.failures: self.failed,
                ("img_s" if self.count == "images" else f"{self.count}_s"): f"{rate:.2f}",
                "eta": "?" if eta is None else hms(eta)}

    def update(self, images: int, failed: int = 0) -> None:
        """One item done, with its image count and its failures."""
        self.items += 1
        self.images += images
        self.failed += failed
        if self.bar is not None:
            self.bar.set_postfix(self.postfix(), refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ====================================================================== in-process runner


def run_in_process(items: Iterable[tuple[str, Any]], process: Callable[[Any], Any],
                   on_result: Callable[[str, Any], None], on_failed: Callable[[str, str], None], *,
                   retries: int, what: str = "shard") -> dict[str, Any]:
    """Run `process(payload)` for each (key, payload) in this process, one after the other; an
    item that raises (an Exception: KeyboardInterrupt stops the run) is tried `retries` more
    times, then `on_failed(key, reason)`. `on_result(key, result)` gets each success. Returns
    {"retries": [{what: key, attempt, reason}, ...]} like the Ray runners' faults."""
    events: dict[str, Any] = {"retries": []}
    for key, payload in items:
        for attempt in range(retries + 1):
            try:
                result = process(payload)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if attempt < retries:
                    log.warning("%s %s failed (attempt %d of %d), retrying: %s", what, key, attempt + 1,
                                retries + 1, reason)
                    events["retries"].append({what: key, "attempt": attempt + 1, "reason": reason})
                    continue
                log.error("%s %s failed after %d attempt(s): %s", what, key, attempt + 1, reason)
                on_failed(key, reason)
                break
            on_result(key, result)
            break
    return events


# ====================================================================== planning actors


MAX_AUTO_ACTORS_PER_GPU = 4


class ActorOptions(Protocol):
    """What plan_actors reads (compress's RayOptions and PoolOptions have it)."""

    actors: int
    cpus_per_actor: float
    use_gpu: Any
    actors_per_gpu: int


@dataclass(frozen=True)
class PoolOptions:
    """An actor pool's settings (compress builds it from its `ray:` config, verify from its
    command line)."""

    address: str | None = None  # cluster to join; None: $RAY_ADDRESS if set, else start a local one
    actors: int = 0  # 0: from the cluster's resources (plan_actors)
    cpus_per_actor: float = 1.0
    use_gpu: bool | None = None  # None: GPUs iff the cluster has some
    actors_per_gpu: int = 0  # 0: as many as the CPUs allow, at most MAX_AUTO_ACTORS_PER_GPU
    in_flight: int = 2  # items queued per actor
    retries: int = 2  # more attempts of an item whose worker failed
    placement_timeout_s: float = 120.0  # an actor not placed within this is given up


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


def plan_actors(options: ActorOptions, gpus: int, cpus: float, n_shards: int) -> ActorPlan:
    """How many actors, on what, from what the cluster has: an actor asking for a resource
    the cluster lacks would wait forever, so ask only for what exists."""
    use_gpu = gpus >= 1 if options.use_gpu is None else bool(options.use_gpu)
    if use_gpu and gpus < 1:
        raise ConfigError("ray.use_gpu is true but the cluster has no GPUs")
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


def actor_class(worker_cls, options: PoolOptions, plan: ActorPlan):
    """`worker_cls` as a Ray actor class with the pool's resources (no restarts: the pool
    replaces lost actors itself) and actor_runtime_env()."""
    import ray

    return ray.remote(worker_cls).options(num_cpus=options.cpus_per_actor, num_gpus=plan.gpu_per_actor,
                                          max_restarts=0, runtime_env=actor_runtime_env())


# ---------------------------------------------------------------------- the actor pool


def _node_died(text: str) -> bool:
    """Whether a RayActorError says the actor's node (or its process) went away, not that its
    constructor raised."""
    markers = ("node was terminated", "node has died", "node died", "node is dead", "its node",
               "preempted", "worker process has died", "process has died", "out of memory", "OOM", "SIGKILL")
    return any(m.lower() in text.lower() for m in markers)


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


def run_actor_pool(actor_cls, init_args: tuple, target: int, items: Sequence[tuple[str, Any]], submit,
                   on_result, on_failed, *, retries: int, in_flight: int, cpus: float, gpus: float,
                   placement_timeout_s: float, recover=None, what: str = "shard",
                   replan_interval_s: float = 5.0) -> dict[str, Any]:
    """Run `items` ((id, payload) pairs) on a pool of up to `target` Ray actors that survives
    the loss of actors and nodes.

    * An actor gets work only once its `ready()` probe answered (it was placed and built);
      one that is not placed within `placement_timeout_s` is killed and counted as
      unplaceable, so the job never waits on capacity that is gone.
    * An actor that dies (its node was removed, out of memory) takes its queued items with it:
      each is retried on the actors left (`retries` more attempts per item); `recover(id)` may
      first find that the dead actor committed the item before its answer came back.
    * The pool re-plans from what the cluster has *now*: a lost actor is replaced only when
      `ray.available_resources()` shows room for one (`cpus`, `gpus`); every
      `replan_interval_s` it also starts actors up to `target` if capacity came back.
    * With no actor alive and none placeable, the remaining items fail with the reason.

    `submit(actor, payload)` returns an ObjectRef; `on_result(id, result, node_id)` (once per
    id: a second answer is only counted, in "duplicate_results") and `on_failed(id, reason)`
    receive the outcomes. The constructor raising is a JobError (every
    replacement would fail the same way). Returns what happened, for the report."""
    import ray

    t0 = time.monotonic()
    slots: list[_Slot] = []
    pending = deque((key, payload, 0) for key, payload in items)
    inflight: dict[Any, tuple[_Slot, str, Any, int]] = {}
    events: dict[str, Any] = {"actors_started": 0, "actors_lost": [], "actors_unplaceable": 0, "retries": [],
                              "recovered": [], "nodes": {}, "duplicate_results": []}
    answered: set[str] = set()

    def deliver(key: str, result, node_id) -> None:
        if key in answered:  # never expected: an item is only re-sent after its attempt failed
            events["duplicate_results"].append(key)
            log.error("%s %s came back twice", what, key)
            return
        answered.add(key)
        on_result(key, result, node_id)

    def worker_died(exc) -> str:
        """Why an actor died; a constructor that raised is a JobError (any replacement would too)."""
        text = str(exc)
        if "creation task" in text and not _node_died(text):
            raise JobError(f"a worker failed to start: {cause_line(text)}") from None
        return cause_line(text) or type(exc).__name__

    max_starts = target * (retries + 2)  # replacements are bounded: never a restart loop

    def start() -> None:
        actor = actor_cls.remote(*init_args)
        slots.append(_Slot(len(slots), actor, actor.ready.remote(), time.monotonic()))
        events["actors_started"] += 1

    def live() -> list[_Slot]:
        return [s for s in slots if not s.gone]

    def lose(slot: _Slot, reason: str, holding: str | None = None) -> None:
        if slot.gone:
            return
        slot.gone = True
        queued = sorted([key for s, key, _, _ in inflight.values() if s is slot] + [holding] * bool(holding))
        events["actors_lost"].append({"actor": slot.index, "node_id": slot.node_id, "reason": reason,
                                      "lost_" + what + "s": queued, "at_s": round(time.monotonic() - t0, 2)})
        log.warning("actor %d on node %s lost (%s); %d %s(s) in its queue go back to the others", slot.index,
                    (slot.node_id or "?")[:12], reason, len(queued), what)
        try:
            ray.kill(slot.actor)
        except Exception:  # already gone with its node
            pass

    def retry_or_fail(key: str, payload, attempt: int, reason: str) -> None:
        if recover is not None:
            got = recover(key)
            if got is not None:  # the dead actor finished it before its answer was lost
                events["recovered"].append(key)
                deliver(key, got, None)
                return
        if attempt < retries:
            log.warning("%s %s failed (attempt %d of %d), retrying: %s", what, key, attempt + 1, retries + 1, reason)
            events["retries"].append({what: key, "attempt": attempt + 1, "reason": reason})
            pending.append((key, payload, attempt + 1))
        else:
            log.error("%s %s failed after %d attempts: %s", what, key, attempt + 1, reason)
            on_failed(key, reason)

    def room() -> bool:
        try:
            return _free(ray.available_resources(), cpus, gpus)
        except Exception:
            return False

    for _ in range(target):
        start()
    last_replan = time.monotonic()
    try:
        while pending or inflight:
            # A fair share per live actor (starting ones included), so that the first actor up
            # does not take every item of a small job; never below 1, so no ready actor idles.
            share = -(-(len(pending) + len(inflight)) // max(1, len(live())))
            cap = min(in_flight, max(1, share))
            for slot in sorted((s for s in slots if s.ready and not s.gone), key=lambda s: s.load):
                while pending and slot.load < cap:
                    key, payload, attempt = pending.popleft()
                    inflight[submit(slot.actor, payload)] = (slot, key, payload, attempt)
                    slot.load += 1
            starting = [s for s in live() if not s.ready]
            if not inflight and not starting:
                # Nobody is left to do the work: start one if it can be placed, else give up.
                if pending and events["actors_started"] < max_starts and room():
                    log.info("no actor left: starting one on the capacity that is free")
                    start()
                    continue
                free = ray.available_resources()
                reason = (f"no worker can be placed: every actor was lost ({events['actors_started']} started) "
                          f"and the cluster has "
                          f"{free.get('CPU', 0):g} CPU / {free.get('GPU', 0):g} GPU free "
                          f"(an actor needs {cpus:g} CPU" + (f", {gpus:g} GPU" if gpus else "") + ")")
                log.error("%s; %d %s(s) left undone (rerun to resume)", reason, len(pending), what)
                while pending:
                    key, _, _ = pending.popleft()
                    on_failed(key, reason)
                break
            now = time.monotonic()
            deadlines = [s.started + placement_timeout_s for s in starting]
            timeout = max(0.05, min([replan_interval_s] + [d - now for d in deadlines]))
            ready_refs = {s.ready_ref: s for s in starting}
            done, _ = ray.wait(list(inflight) + list(ready_refs), num_returns=1, timeout=timeout)
            for ref in done:
                if ref in ready_refs:
                    slot = ready_refs[ref]
                    try:
                        info = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        lose(slot, f"died while starting: {worker_died(exc)}")
                        continue
                    slot.ready, slot.node_id = True, info.get("node_id")
                    events["nodes"].setdefault(slot.node_id, 0)
                    log.info("actor %d ready on node %s after %.1f s", slot.index, slot.node_id,
                             time.monotonic() - slot.started)
                    continue
                slot, key, payload, attempt = inflight.pop(ref)
                slot.load -= 1
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    reason = worker_died(exc)
                    lose(slot, reason, key)
                    retry_or_fail(key, payload, attempt, f"worker died: {reason}")
                    continue
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    first = str(cause).splitlines()[0] if str(cause) else ""
                    retry_or_fail(key, payload, attempt, f"{type(cause).__name__}: {first}")
                    continue
                except ray.exceptions.RayError as exc:  # object lost, owner died, ...
                    retry_or_fail(key, payload, attempt, f"{type(exc).__name__}: {cause_line(str(exc))}")
                    continue
                events["nodes"][slot.node_id] = events["nodes"].get(slot.node_id, 0) + 1
                deliver(key, result, slot.node_id)
            now = time.monotonic()
            for slot in [s for s in live() if not s.ready]:
                if now - slot.started > placement_timeout_s:
                    events["actors_unplaceable"] += 1
                    slot.gone = True
                    log.warning("actor %d was not placed within %.0f s (the cluster lacks %g CPU%s free): "
                                "going on without it", slot.index, placement_timeout_s, cpus,
                                f" / {gpus:g} GPU" if gpus else "")
                    ray.kill(slot.actor)
            if now - last_replan >= replan_interval_s or (events["actors_lost"] and now - last_replan >= 0.5):
                last_replan = now
                alive = live()
                if (len(alive) < target and pending and not any(not s.ready for s in alive)
                        and events["actors_started"] < max_starts
                        and len(pending) > sum(in_flight - s.load for s in alive if s.ready) and room()):
                    log.info("re-plan: %d actor(s) alive of %d planned, and the cluster has room: starting one",
                             len(alive), target)
                    start()
    finally:
        for slot in slots:
            try:
                ray.kill(slot.actor)
            except Exception:
                pass
    events["actors_final"] = len([s for s in slots if s.ready and not s.gone])
    events["nodes"] = {k: v for k, v in events["nodes"].items() if k}
    return events




# ---------------------------------------------------------------------- the task pool


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


def run_task_pool(fn, items: Sequence[tuple[str, Any, tuple[float, float]]], on_result, on_failed, *,
                  shared: Any = None, retries: int, in_flight: int, placement_timeout_s: float,
                  what: str = "unit") -> dict[str, Any]:
    """Run `fn(payload, shared)` as one Ray task per (key, payload, (cpus, gpus)) item, each with
    its own resources (items that need a GPU and items that do not mix in one job), at most
    `in_flight` at once. `shared` is put in the object store once.

    Retries are the driver's (not Ray's), so that the report counts them: an item whose task
    raised or whose worker or node died is resubmitted up to `retries` times and lands on
    whatever nodes are left. A task that no live node could ever run (its GPU node is gone) is
    not waited for beyond `placement_timeout_s`: it fails. `on_result(key, result)` and
    `on_failed(key, reason)` receive the outcomes. Returns {"retries": [...], "unplaceable": [...]}."""
    import ray

    task = ray.remote(fn)
    shared_ref = ray.put(shared)
    pending = deque((key, payload, demand, 0) for key, payload, demand in items)
    inflight: dict[Any, tuple[str, Any, tuple[float, float], int]] = {}
    stuck_since: dict[Any, float] = {}
    faults: dict[str, Any] = {"retries": [], "unplaceable": []}

    def retry_or_fail(key: str, payload, demand, attempt: int, reason: str) -> None:
        if attempt < retries:
            log.warning("%s %s failed (attempt %d of %d), retrying: %s", what, key, attempt + 1, retries + 1, reason)
            faults["retries"].append({what: key, "attempt": attempt + 1, "reason": reason})
            pending.append((key, payload, demand, attempt + 1))
        else:
            log.error("%s %s failed after %d attempt(s): %s", what, key, attempt + 1, reason)
            on_failed(key, reason)

    try:
        while pending or inflight:
            while pending and len(inflight) < in_flight:
                key, payload, demand, attempt = pending.popleft()
                options = {"num_cpus": demand[0], "num_gpus": demand[1], "max_retries": 0}
                inflight[task.options(**options).remote(payload, shared_ref)] = (key, payload, demand, attempt)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0)
            for ref in ready:
                key, payload, demand, attempt = inflight.pop(ref)
                stuck_since.pop(ref, None)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the task raised, or its worker or node died
                    retry_or_fail(key, payload, demand, attempt, cause_line(exc))
                    continue
                on_result(key, result)
            if ready:
                continue
            # Nothing finished for a while: is some task asking for what no live node has?
            now = time.monotonic()
            for ref, (key, payload, demand, attempt) in list(inflight.items()):
                if placeable(demand):
                    stuck_since.pop(ref, None)
                    continue
                since = stuck_since.setdefault(ref, now)
                if now - since >= placement_timeout_s:
                    ray.cancel(ref, force=True)
                    inflight.pop(ref)
                    stuck_since.pop(ref)
                    reason = (f"cannot be placed: no live node has {demand[0]:g} CPU"
                              + (f" and {demand[1]:g} GPU" if demand[1] else "")
                              + f" (waited {placement_timeout_s:g} s)")
                    log.error("%s %s %s; rerun when the cluster has the capacity", what, key, reason)
                    faults["unplaceable"].append(key)
                    on_failed(key, reason)
    except BaseException:
        for ref in inflight:
            ray.cancel(ref, force=True)
        raise
    return faults
