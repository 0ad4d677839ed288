"""The simulator's two speeds are one model (design.md): short replays through the bulk
path and through the protocol path (byte-level device and driver per guest) must give
the same results."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from overcommitd.config import DaemonConfig
from overcommitd.loop import LoopState, apply, step
from policies import registry
from sim.evaluation.replay import ReplaySpec, build_guests, load_traces, replay
from sim.memory.guest import GuestSpec
from sim.memory.hypervisor import SimHypervisor
from sim.virtio.world import World

FLEET_ARRAYS = (
    "anon",
    "cache",
    "swap",
    "touched",
    "balloon_resident",
    "oom_kills",
    "oom_deflates",
    "swap_in",
    "hot_cache",
    "refault_debt",
    "refault_kib",
    "major_faults",
    "deflated_free",
    "older_touched",
)


def lockstep(spec: ReplaySpec, ticks: int, policy_name: str = "headroom") -> list[tuple[int, str, float]]:
    """Drive both speeds with the same targets (the policy reads the bulk snapshots) and
    list every tick where a snapshot or a guest's state differs. The policy is named, not
    the config's default: the tolerances below were measured under its targets, and a
    change of default must not move them."""
    cfg = DaemonConfig()
    specs, workload = build_guests(spec, load_traces(spec))
    ram = np.array([s.ram_kib for s in specs], dtype=np.float64)
    host_kib = int(ram.sum() / spec.overcommit) + spec.host_model.base_kib
    first, first_reads = workload.block(np.zeros(1))
    world = World()
    common: dict[str, Any] = {
        "host_mem_kib": host_kib,
        "initial_demand_kib": first[0],
        "initial_read_kib_s": first_reads[0],
        "stats_period_s": spec.stats_period_s,
    }
    bulk = SimHypervisor(specs, **common)
    proto = SimHypervisor(specs, **common, model="protocol", world=world)
    policy = registry.create(policy_name)
    state: LoopState[Any] = LoopState.initial(policy)
    times = np.arange(1, ticks + 1) * spec.interval_s
    demand, reads = workload.block(times - spec.interval_s)
    diffs: list[tuple[int, str, float]] = []
    for k, now_s in enumerate(times):
        world.run(now_s)
        bulk.advance(now_s, demand[k], reads[k])
        proto.advance(now_s, demand[k], reads[k])
        for name in FLEET_ARRAYS:
            gap = float(np.abs(getattr(bulk.fleet, name) - getattr(proto.fleet, name)).max())
            if gap > 1.0:  # KiB (or counts)
                diffs.append((k, name, gap))
        snap_b, snap_p = bulk.snapshot(), proto.snapshot()
        diffs += [(k, f"snapshot {b.name}", 0.0) for b, p in zip(snap_b, snap_p) if b != p]
        outcome = step(now_s, bulk.read(), snap_b, policy, state, cfg)
        state = outcome.state
        apply(bulk, outcome.decisions)
        apply(proto, outcome.decisions)
    return diffs


def test_same_targets_give_the_same_guests_and_snapshots_at_both_speeds() -> None:
    """Inflation, deflation, OOM deflates, swapping and the stats the policy reads: equal,
    tick by tick, for 40 minutes of 10 guests on an overcommitted host."""
    spec = ReplaySpec(guests=10, hours=1, overcommit=2.5, deflate_on_oom_share=0.5, reporting_share=0.0, seed=3)
    assert lockstep(spec, ticks=240) == []


def test_guests_polled_each_in_its_own_phase_alike_at_both_speeds() -> None:
    """Each guest's stats timer first fires at its own phase (``ReplaySpec.stats_phase_s``,
    as real guests' do): the snapshots, their stats' ages included, agree at both speeds."""
    phases = (("*0", 0.0), ("*1", 0.7), ("*2", 1.3), ("*", 1.9))
    spec = ReplaySpec(guests=6, hours=1, overcommit=2.5, stats_period_s=2, reporting_share=0.0, seed=4)
    spec = spec.model_copy(update={"stats_phase_s": phases})
    specs, _ = build_guests(spec, load_traces(spec))
    assert len({s.stats_phase_s for s in specs}) > 1
    assert lockstep(spec, ticks=60) == []


def test_free_page_reporting_paces_alike_at_both_speeds() -> None:
    """Reporting differs only in when a pass falls (the protocol's passes drift by the
    time each takes): host memory agrees within 32 MiB per guest."""
    spec = ReplaySpec(guests=10, hours=1, reporting_share=1.0, seed=1)
    diffs = lockstep(spec, ticks=120)
    assert [d for d in diffs if d[1] != "touched"] == []
    assert max((gap for _, _, gap in diffs), default=0.0) <= 32 * 1024


@pytest.mark.parametrize("seed", [0, 5])
def test_closed_loop_replays_score_alike(seed: int) -> None:
    """The whole replay, each speed feeding its own policy: the scorecards agree."""
    cfg = DaemonConfig()
    spec = ReplaySpec(guests=8, hours=0.5, seed=seed, deflate_on_oom_share=0.5)
    loaded = load_traces(spec)
    cards = [
        replay(
            spec.model_copy(update={"model": m}),
            registry.create(cfg.policy.name, cfg.policy.params),
            cfg,
            loaded=loaded,
        ).scorecard
        for m in ("bulk", "protocol")
    ]
    bulk, proto = cards
    assert proto.saved_gib_h == pytest.approx(bulk.saved_gib_h, rel=0.01)
    assert proto.host_peak_pct == pytest.approx(bulk.host_peak_pct, rel=0.01)
    # one target apart at most beyond 2 %: the protocol's stats timers run on their own clock and
    # may see a tick's landed demand one poll apart from the bulk path (docs/guest-model.md)
    assert proto.balloon_ops == pytest.approx(bulk.balloon_ops, rel=0.02, abs=1)
    assert (proto.oom_kills, proto.below_floor_guest_s) == (bulk.oom_kills, bulk.below_floor_guest_s)
    assert proto.auto_deflate_events == pytest.approx(bulk.auto_deflate_events, abs=2)


def scripted_lockstep(
    specs: list[GuestSpec],
    demand_mib: list[list[float]],
    targets_mib: dict[int, float],
    interval_s: float = 10.0,
    read_mib_s: float = 0.0,
) -> tuple[list[tuple[int, str, float]], SimHypervisor, SimHypervisor]:
    """Both speeds under scripted demand and targets (tick -> target for every guest),
    every guest reading files at ``read_mib_s`` throughout (and at boot: its minimum cache is hot)."""
    world = World()
    first = np.array(demand_mib[0]) * 1024
    reads = np.full(len(specs), read_mib_s * 1024)
    common: dict[str, Any] = {"host_mem_kib": 64 << 20, "initial_demand_kib": first, "initial_read_kib_s": reads}
    bulk = SimHypervisor(specs, **common)
    proto = SimHypervisor(specs, **common, model="protocol", world=world)
    diffs: list[tuple[int, str, float]] = []
    for k, row in enumerate(demand_mib):
        now_s = (k + 1) * interval_s
        world.run(now_s)
        for hv in (bulk, proto):
            hv.advance(now_s, np.array(row) * 1024, reads)
        for name in (*FLEET_ARRAYS, "balloon"):
            gap = float(np.abs(getattr(bulk.fleet, name) - getattr(proto.fleet, name)).max())
            if gap > 1.0:
                diffs.append((k, name, gap))
        gap = float(np.abs(bulk.fleet.driver.puff_retries - proto.fleet.driver.puff_retries).max())
        if gap > 1.0:  # the 200 ms retries' phase against the tick may differ by one
            diffs.append((k, "puff_retries", gap))
        for b, p in zip(bulk.snapshot(), proto.snapshot()):
            if b != p:
                fields = [f for f in ("actual_kib", "stats") if getattr(b, f) != getattr(p, f)]
                diffs.append((k, f"snapshot {b.name} {fields} {b.stats} {p.stats}", 0.0))
        if k in targets_mib:
            for s in specs:
                bulk.set_target(s.uuid, int(targets_mib[k] * 1024))
                proto.set_target(s.uuid, int(targets_mib[k] * 1024))
    return diffs, bulk, proto


def test_oom_deflation_and_out_of_puff_alike_at_both_speeds() -> None:
    """Inflate to 1 GiB; the workload then needs 1.7 GiB (OOM deflates with
    DEFLATE_ON_OOM, an OOM kill or swap without); the host re-sends the target while the
    memory is in use (an Out-of-puff storm) and the workload later shrinks."""
    specs = [
        GuestSpec("00000000-0000-0000-0000-000000000001", "doo", 2 << 20, swap_kib=0, deflate_on_oom=True),
        GuestSpec("00000000-0000-0000-0000-000000000002", "swap", 2 << 20, deflate_on_oom=False),
        GuestSpec("00000000-0000-0000-0000-000000000003", "kill", 2 << 20, swap_kib=0),
    ]
    demand = [[300.0] * 3] * 3 + [[1700.0] * 3] * 6 + [[400.0] * 3] * 6
    diffs, bulk, _proto = scripted_lockstep(specs, demand, {0: 1024, 5: 1024, 11: 1536})
    assert diffs == []
    assert (
        bulk.fleet.oom_deflates[0] > 600 and bulk.fleet.oom_kills[2] == 6
    )  # exercised; the restarted workload is killed each of its 6 intervals
    assert bulk.fleet.driver.puff_retries.sum() > 50


def test_page_cache_refaults_alike_at_both_speeds() -> None:
    """Reading guests fill their page cache (guests boot with none to speak of), are
    squeezed into it for a minute, then given the memory back: what each speed evicts
    (request by request in the protocol model), owes and reads again agrees."""
    specs = [
        GuestSpec("00000000-0000-0000-0000-000000000001", "plain", 2 << 20),
        GuestSpec("00000000-0000-0000-0000-000000000002", "doo", 2 << 20, deflate_on_oom=True),
    ]
    demand = [[500.0] * 2] * 30
    diffs, bulk, _proto = scripted_lockstep(specs, demand, {8: 800, 14: 2048}, read_mib_s=20.0)
    assert diffs == []
    assert (bulk.fleet.refault_kib > 64 * 1024).all()  # the script did exercise them
