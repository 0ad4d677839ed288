"""Sweeps on Dask: the same replays on a LocalCluster of 2 worker processes and in this
process give identical scorecards, in input order."""

from __future__ import annotations

import pytest

from overcommitd.config import DaemonConfig
from policies import registry
from sim.evaluation.compare import compare
from sim.evaluation.replay import ReplaySpec
from sim.evaluation.sweep import ReplayJob, Sweep, SweepError, cached_traces, run_replays, sweep_from_args

SPEC = ReplaySpec(guests=6, hours=3.0, seed=5, warmup_h=1.0)


def _jobs() -> list[ReplayJob]:
    cfg = DaemonConfig()
    # Different policies and overcommits: a swapped result would show.
    return [
        ReplayJob(SPEC.model_copy(update={"overcommit": oc}), registry.create(name), cfg, timeline=False)
        for name, oc in (("trim", 1.6), ("mom", 1.3), ("pid", 1.8), ("proxmox", 1.5))
    ]


def test_local_cluster_and_one_process_give_identical_scorecards_in_order() -> None:
    jobs = _jobs()
    done_local: list[int] = []
    local = run_replays(jobs, Sweep(workers=1), on_done=lambda i, _: done_local.append(i))
    done_dask: list[int] = []
    dask = run_replays(jobs, Sweep(workers=2), on_done=lambda i, r: done_dask.append(i) if r.scorecard else None)
    assert [r.scorecard.as_dict() for r in dask] == [r.scorecard.as_dict() for r in local]
    assert [r.scorecard.policy for r in dask] == ["trim", "mom", "pid", "proxmox"]
    assert len({r.scorecard.saved_gib_h for r in local}) == len(jobs)  # the jobs do differ
    assert done_local == [0, 1, 2, 3] and sorted(done_dask) == [0, 1, 2, 3]
    assert all(not r.timeline.t_s for r in dask)  # timeline=False: only the scorecard travels back


def test_side_by_side_on_dask_equals_in_process() -> None:
    cfg = DaemonConfig()
    policies = [registry.create(n) for n in ("trim", "headroom")]
    a = compare(SPEC, policies, cfg)
    b = compare(SPEC, policies, cfg, sweep=Sweep(workers=2))
    assert [c.as_dict() for c in b.cards()] == [c.as_dict() for c in a.cards()]
    assert list(b.results) == ["trim", "headroom"] and b.reference is not None
    assert b.results["trim"].timeline.t_s == a.results["trim"].timeline.t_s


def test_traces_are_parsed_once_per_process() -> None:
    cached_traces.cache_clear()
    run_replays(_jobs()[:2], Sweep(workers=1))
    info = cached_traces.cache_info()
    assert info.misses == 1 and info.hits == 1


def test_bad_worker_counts_are_refused() -> None:
    class Args:
        workers = 0
        scheduler = None

    with pytest.raises(SweepError, match="--workers 0"):
        sweep_from_args(Args())
    with pytest.raises(ValueError, match="workers"):
        Sweep(workers=-1)


def test_a_recording_of_many_guests_per_file_sweeps_like_one_replay() -> None:
    """A sweep's workers load traces with the replay's own loader: a recording (many
    guests in one file, tests/data/recordings/realguest) gives the same guests and cards."""
    from tests.realguest.recording import recording_dir

    spec = ReplaySpec(traces=(recording_dir(),), hours=0.04, warmup_h=0.0, interval_s=2.0)
    cfg = DaemonConfig(interval_s=2.0)
    policies = [registry.create(n) for n in ("trim", "mom")]
    a = compare(spec, policies, cfg)
    b = compare(spec, policies, cfg, sweep=Sweep(workers=2))
    assert [c.as_dict() for c in b.cards()] == [c.as_dict() for c in a.cards()]
    assert b.results["mom"].scorecard.guests == 2 and b.results["mom"].scorecard.balloon_ops > 0
