"""Independent replays fanned out over Dask: side by side, ``tune`` and ``plan``.

A sweep is a list of tasks (a module-level function and its argument, both picklable)
whose results come back **in input order**, whatever ran where. Where they run:

* ``workers=1`` and no scheduler: in this process, one after the other, without Dask
  (tests, debugging, a profiler);
* ``workers=N``: a ``distributed.LocalCluster`` of N single-threaded worker processes
  (the replay is pure Python and numpy: processes, not threads, give parallelism);
* ``scheduler=ADDRESS``: a running Dask distributed cluster (``dask scheduler`` and
  ``dask worker`` on other machines that see the same trace paths).

Replays are seeded and deterministic, so the results do not depend on the number of
workers. Traces are loaded once per worker process (``cached_traces``), not once per
task: a task carries trace *paths*, and the worker keeps what it parsed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from overcommitd.config import DaemonConfig
from overcommitd.model import OvercommitdError
from policies.api import Policy
from sim.evaluation.metrics import Timeline
from sim.evaluation.replay import ReplayResult, ReplaySpec, replay
from sim.memory import traces as trace_io
from sim.memory.trace_loader import load_all

T = TypeVar("T")
R = TypeVar("R")

# Distinct trace sets a worker keeps parsed (a plan or tune uses one or two: train, test).
TRACE_CACHE_SETS = 4


class SweepError(OvercommitdError):
    """Sweep arguments that cannot work (printed by the CLI, exit 2)."""


def default_workers() -> int:
    """The cores this process may use (``--workers`` default)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class Sweep:
    """Where a sweep's tasks run: ``workers`` local processes, or the cluster at ``scheduler``."""

    workers: int = 1
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers(={self.workers}) must be >= 1")

    @property
    def in_process(self) -> bool:
        return self.scheduler is None and self.workers == 1

    def map(
        self, fn: Callable[[T], R], items: Sequence[T], *, on_done: Callable[[int, R], object] | None = None
    ) -> list[R]:
        """``[fn(x) for x in items]``, run where this sweep says; ``on_done(i, result)`` as
        item ``i`` finishes (in completion order: partial results can be shown early)."""
        if self.in_process or len(items) == 0:
            out = []
            for i, item in enumerate(items):
                out.append(fn(item))
                if on_done is not None:
                    on_done(i, out[-1])
            return out
        with self._client() as client:
            return _dask_map(client, fn, items, on_done)

    @contextmanager
    def _client(self) -> Iterator[Any]:
        from distributed import Client, LocalCluster

        # distributed logs every connection at INFO on its own handler; a sweep's user
        # wants the results (and real errors), not the cluster's chatter.
        logging.getLogger("distributed").setLevel(logging.ERROR)
        if self.scheduler is not None:
            with Client(self.scheduler) as client:  # type: ignore[no-untyped-call]
                yield client
            return
        with (
            LocalCluster(  # type: ignore[no-untyped-call]
                n_workers=self.workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",  # no fixed port: a shared machine may run several sweeps
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,  # type: ignore[no-untyped-call]
        ):
            yield client


def _dask_map(
    client: Any, fn: Callable[[T], R], items: Sequence[T], on_done: Callable[[int, R], object] | None
) -> list[R]:
    from distributed import as_completed

    # pure=False: equal arguments are still separate tasks (no silent de-duplication).
    futures = client.map(fn, list(items), pure=False)
    index = {f.key: i for i, f in enumerate(futures)}
    for fut in as_completed(futures):  # type: ignore[no-untyped-call]
        result = fut.result()  # raises the task's exception here, with its traceback
        if on_done is not None:
            on_done(index[fut.key], result)
    results: list[R] = client.gather(futures)
    return results


@lru_cache(maxsize=TRACE_CACHE_SETS)
def cached_traces(paths: tuple[Path, ...], machine_kib: int) -> tuple[trace_io.Trace, ...]:
    """The parsed traces of ``paths`` (files or directories, recordings of many guests
    included), kept for later tasks of this process; the one loader the replay uses."""
    return tuple(load_all(list(paths), machine_kib=machine_kib))


def traces_for(spec: ReplaySpec) -> tuple[trace_io.Trace, ...]:
    return cached_traces(tuple(spec.traces), spec.machine_kib)


@dataclass(frozen=True, slots=True)
class ReplayJob:
    """One replay: a spec, a policy object (picklable) and the config its guard uses.
    ``timeline=False`` drops the sampled series from the result (a scorecard is all a
    bisection or a search needs; the series are most of what travels back)."""

    spec: ReplaySpec
    policy: Policy[Any]
    cfg: DaemonConfig
    timeline: bool = True


def run_job(job: ReplayJob) -> ReplayResult:
    """The task: one replay, on this worker's cached traces."""
    result = replay(job.spec, job.policy, job.cfg, loaded=traces_for(job.spec))
    if not job.timeline:
        result.timeline = Timeline()
    return result


def run_replays(
    jobs: Sequence[ReplayJob], sweep: Sweep, *, on_done: Callable[[int, ReplayResult], object] | None = None
) -> list[ReplayResult]:
    """Every job's result, in the order of ``jobs``."""
    return sweep.map(run_job, jobs, on_done=on_done)


def add_sweep_arguments(p: Any) -> None:
    """``--workers`` and ``--scheduler`` for the commands that sweep (replay side by side, tune, plan)."""
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local worker processes for independent replays (default: the number of cores; 1: in this process)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="run replays on this running Dask distributed scheduler (e.g. tcp://10.0.0.5:8786) instead",
    )


def sweep_from_args(args: Any) -> Sweep:
    workers = getattr(args, "workers", None)
    if workers is not None and workers < 1:
        raise SweepError(f"--workers {workers}: must be >= 1")
    return Sweep(workers=workers or default_workers(), scheduler=getattr(args, "scheduler", None))
