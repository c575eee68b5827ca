"""The job skeleton: what compress, verify / restore and evaluate share (docs/runner.md).

A job is a `Job`: it plans its items (`plan`: (key, payload) pairs, a shard or an evaluation
unit each), names the worker that does one item (`worker(settings, placement).process(payload)`,
its settings a frozen dataclass), folds each result into its own state (`fold`) and writes its
report (`report`). The job commits each item's output itself (the stats marker written last)
and decides what its results mean. `run_job` owns the rest, the same for every job:

  * Ray or this process, joining the cluster, planning the actors (pipeline/jobs/pools.py:
    an actor pool that survives lost nodes, or a task pool with per-item resources);
  * the progress bar (images done, failures, images/s, ETA);
  * Ctrl-C: the run stops, the items folded so far are kept, the report is written, exit 3;
  * retries (pools.Retries: one policy for the three ways to run);
  * workers that cannot start (JobError): the items left fail, exit 3;
  * the exit code (`exit_code`), written into the report.
"""

from __future__ import annotations

import abc
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from m2t_core.config import ConfigError

from pipeline.errors import EXIT_INCOMPLETE, EXIT_ISSUES, EXIT_OK, EXIT_USAGE, JobError  # noqa: F401 (re-exported)
from pipeline.jobs.pools import (ActorPool, Placement, actor_class, cause_line, plan_actors, plan_pool,  # noqa: F401
                                 run_in_process, run_task_pool, use_gpus)

log = logging.getLogger(__name__)

# ====================================================================== exit codes


def exit_code(complete: bool, *, interrupted: bool = False, failed_items: int = 0, issues: int = 0) -> int:
    """The exit code of a run: incomplete (3) when it was interrupted, did not complete, or an
    item failed after its retries; else 1 when some inputs have issues; else 0. Usage errors
    (2) are raised before a run and mapped by their type (pipeline/errors.py)."""
    if interrupted or not complete or failed_items:
        return EXIT_INCOMPLETE
    return EXIT_ISSUES if issues else EXIT_OK


# ====================================================================== small helpers


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


def resolve_device(device: str) -> str:
    """"auto": cuda if this machine has a GPU, else cpu; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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


# ====================================================================== the skeleton


@dataclass(frozen=True)
class Item:
    """One unit of work, retry and resume."""

    key: str  # unique in the job: a shard id, an evaluation unit's id
    payload: Any  # what the worker's process() gets (picklable: it travels to Ray workers)
    images: int | None = None  # images (or rows) it will count, if known before reading: the ETA
    gpu: bool = False  # task pool: this item's worker uses a GPU when the run has them


@dataclass(frozen=True)
class RunOptions:
    """How run_job runs a job's items (each job builds them from its config or command line)."""

    ray: bool = True  # False: in this process, one item after the other
    address: str | None = None  # cluster to join; None: $RAY_ADDRESS if set, else start a local one
    actors: int = 0  # actor pool: 0 from the cluster's resources (plan_actors)
    cpus_per_actor: float = 1.0  # CPUs per actor (task pool: per task)
    use_gpu: bool | None = None  # None: GPUs iff the cluster has some
    actors_per_gpu: int = 0  # 0: as many as the CPUs allow, at most pools.MAX_AUTO_ACTORS_PER_GPU
    in_flight: int = 2  # actor pool: items queued per actor; task pool: tasks at once (0: 2 x CPUs)
    retries: int = 2  # more attempts of an item whose worker failed (Ray and in process alike)
    placement_timeout_s: float = 120.0  # an actor (or task) not placeable within this is given up
    device: str = "auto"  # in process: auto (cuda if available), cpu, cuda[:N]
    progress: bool = True  # the progress bar on stderr


@dataclass
class Run:
    """What a run did, for the job's report."""

    items: list[Item]
    done: list[str] = field(default_factory=list)  # keys folded, in the order they came back
    failed: dict[str, str] = field(default_factory=dict)  # key -> why (after its retries)
    interrupted: bool = False
    seconds: float = 0.0  # the run itself (a cluster's start-up excluded)
    runner: dict[str, Any] = field(default_factory=dict)  # how it ran: {"ray": ..., "actors": ...}
    faults: dict[str, Any] | None = None  # Ray: actors lost, retries, unplaceable workers
    device: str = "cpu"  # the workers' device kind ("cuda" where they used GPUs)


@dataclass
class Report:
    body: dict[str, Any]  # what the job prints and saves; run_job adds exit_code and wall_s
    complete: bool  # every planned item is done (over all runs, for resumable jobs)
    issues: int = 0  # inputs with problems (exit 1 when complete)


class Job(abc.ABC):
    """A job on the skeleton. Subclasses set the class attributes, `settings` (in plan() at the
    latest) and implement plan, fold and report."""

    name = "job"  # the progress bar's label
    what = "shard"  # what an item is, in logs and reports
    count, failures = "images", "failed"  # what the progress bar counts, and calls failures
    pool = "actors"  # on Ray: "actors" (a worker per actor, kept) or "tasks" (per-item resources)
    worker: type  # worker(settings, placement), built on each actor, task or once in process
    settings: Any = None  # the worker's settings: a frozen dataclass
    local_output: str | None = None  # a local path the workers write to: warned about on clusters

    def __init__(self) -> None:
        self.started = time.perf_counter()  # the report's wall_s counts from here

    @abc.abstractmethod
    def plan(self) -> Sequence[Item]:
        """The items to run now (and everything the run needs, e.g. `settings`)."""

    @abc.abstractmethod
    def fold(self, key: str, result: Any) -> tuple[int, int]:
        """Take one item's result; returns (images, failures) for the progress bar."""

    def recover(self, key: str) -> Any | None:
        """After an actor holding `key` died: its result if it was committed anyway, else None."""
        return None

    @abc.abstractmethod
    def report(self, run: Run) -> Report:
        """The job's report of a run, and whether the job is complete."""

    def save(self, report: dict[str, Any]) -> None:
        """Store the final report (with its exit code), if the job keeps one."""


def run_job(job: Job, options: RunOptions) -> tuple[dict[str, Any], int]:
    """Plan the job's items, run them (on Ray or in this process, retried), fold the results,
    and return (report, exit code). Ctrl-C stops the run: what was folded is kept and reported
    (exit 3). Workers that cannot start (JobError): the items left fail (exit 3)."""
    items = list(job.plan())
    run = Run(items=items, runner={"ray": options.ray})
    planned = [i.images for i in items]
    progress = Progress(len(items), options.progress, job.name, unit=job.what, count=job.count,
                        failures=job.failures, total_images=sum(planned) if planned and None not in planned else None)

    def on_result(key: str, result: Any) -> None:
        images, failures = job.fold(key, result)
        run.done.append(key)
        progress.update(images, failures)

    if items and options.ray:
        connect_ray(options.address)  # before the clock starts: a local cluster takes seconds to start
    t0 = time.perf_counter()
    try:
        if items:
            way = _in_process if not options.ray else _as_tasks if job.pool == "tasks" else _on_actors
            way(job, options, run, on_result)
    except KeyboardInterrupt:
        run.interrupted = True
        log.warning("interrupted: completed %ss are kept; run the same command again to resume", job.what)
    except JobError as exc:
        log.error("%s: the %ss left fail (completed ones are kept; rerun to resume)", exc, job.what)
        for item in items:
            if item.key not in run.failed and item.key not in run.done:
                run.failed[item.key] = str(exc)
    finally:
        progress.close()
    run.seconds = time.perf_counter() - t0
    report = job.report(run)
    code = exit_code(report.complete, interrupted=run.interrupted, failed_items=len(run.failed),
                     issues=report.issues)
    report.body["exit_code"] = code
    report.body["wall_s"] = time.perf_counter() - job.started
    job.save(report.body)
    return report.body, code


def cluster_actors(options: RunOptions) -> int:
    """How many actors a run with `options` would start on its cluster (joined here)."""
    connect_ray(options.address)
    return plan_pool(options, 1 << 30).actors


def _in_process(job: Job, options: RunOptions, run: Run, on_result) -> None:
    import torch

    run.device = device = resolve_device(options.device)
    run.runner["device"] = device
    threads_before = torch.get_num_threads()
    try:
        worker = job.worker(job.settings, Placement(ray=False, device=device))
        run_in_process([(i.key, i.payload) for i in run.items], worker.process, on_result, run.failed.__setitem__,
                       retries=options.retries, what=job.what)
    finally:
        torch.set_num_threads(threads_before)  # the caller's process keeps its own setting


def _alive_nodes(job: Job) -> int:
    import ray

    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    if nodes > 1 and job.local_output:
        log.warning("the output %s is a local path but the cluster has %d nodes: each node writes its %ss "
                    "to its own disk unless that path is a shared filesystem", job.local_output, nodes, job.what)
    return nodes


def _on_actors(job: Job, options: RunOptions, run: Run, on_result) -> None:
    """The items on a pool of actors, each holding one worker (ActorPool: retries, lost nodes,
    placement timeout, `job.recover`)."""
    plan = plan_pool(options, len(run.items))
    nodes = _alive_nodes(job)
    log.info("%d %s(s) on %d actor(s) (%g CPU each, %s)", len(run.items), job.what, plan.actors,
             options.cpus_per_actor, plan.description)
    placement = Placement(ray=True, device="cuda" if plan.use_gpu else "cpu", cpus=options.cpus_per_actor)
    run.device = placement.device
    run.runner.update(actors=plan.actors, use_gpu=plan.use_gpu, cpus_per_actor=options.cpus_per_actor, nodes=nodes)
    pool = ActorPool(actor_class(options, plan), (job.worker, job.settings, placement), plan.actors,
                     [(i.key, i.payload) for i in run.items], on_result, run.failed.__setitem__,
                     retries=options.retries, in_flight=options.in_flight, cpus=options.cpus_per_actor,
                     gpus=plan.gpu_per_actor, placement_timeout_s=options.placement_timeout_s,
                     recover=job.recover, what=job.what)
    run.faults = pool.events  # filled in as it goes: an interrupted run reports its faults too
    pool.run()


def _as_tasks(job: Job, options: RunOptions, run: Run, on_result) -> None:
    """The items as Ray tasks, each with its own resources: an item that wants a GPU gets one
    where the run uses GPUs."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 0)
    use_gpu = use_gpus(options.use_gpu, gpus)
    if options.cpus_per_actor > cpus:
        raise ConfigError(f"{options.cpus_per_actor:g} CPUs per task requested, the cluster has {cpus:g} CPUs")
    nodes = _alive_nodes(job)
    log.info("%d %s(s) on Ray (%g CPUs, %d GPUs; %g CPU per task%s)", len(run.items), job.what, cpus, gpus,
             options.cpus_per_actor, f", GPU {job.what}s on 1 GPU each" if use_gpu else "")
    run.device = "cuda" if use_gpu else "cpu"
    run.runner.update(cpus=cpus, gpus=gpus, nodes=nodes, use_gpu=use_gpu, cpus_per_task=options.cpus_per_actor)
    items = [(i.key, i.payload, (options.cpus_per_actor, 1.0 if use_gpu and i.gpu else 0.0)) for i in run.items]
    run.faults = run_task_pool((job.worker, job.settings), items, on_result, run.failed.__setitem__,
                               retries=options.retries, in_flight=options.in_flight or max(2, int(2 * cpus)),
                               placement_timeout_s=options.placement_timeout_s, what=job.what)
