"""The vectorized built-ins (headroom, mom, trim, proxmox) decide as their per-guest versions did (kept as oracles in
``*_reference.py``), step after step, for arbitrary fleets; and a plugin with only
``decide`` runs through the adapter with the same result as called directly."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from overcommitd.model import BalloonFeatures, GuestSnapshot, GuestStats, HostSnapshot
from overcommitd.table import GuestTable
from policies.api import RowReasons, decide_batch, result_of
from policies.headroom import HeadroomPolicy
from policies.mom import MomPolicy
from policies.proxmox import ProxmoxPolicy
from policies.trim import ENDED, SQUEEZING, STARTED, WARMUP_MIN, TrimGuestState, TrimPolicy
from tests import headroom_reference, mom_reference, proxmox_reference, trim_reference

GIB, MIB = 1024 * 1024, 1024


@st.composite
def fleets(draw: st.DrawFn) -> tuple[HostSnapshot, list[GuestSnapshot]]:
    n = draw(st.integers(min_value=0, max_value=8))
    guests = []
    for i in range(n):
        max_kib = draw(st.integers(min_value=256 * MIB, max_value=16 * GIB))
        actual = draw(st.integers(min_value=1, max_value=max_kib))
        size = st.none() | st.integers(min_value=0, max_value=max_kib)
        stats = draw(
            st.none()
            | st.builds(GuestStats, st.just(0.0), mem_free_kib=size, mem_available_kib=size, disk_caches_kib=size)
        )
        guests.append(
            GuestSnapshot(
                uuid=f"u{draw(st.integers(min_value=0, max_value=9))}-{i}",
                name=f"g{i}",
                max_kib=max_kib,
                actual_kib=actual,
                current_kib=actual,
                stats=stats,
                floor_kib=draw(st.integers(min_value=0, max_value=max_kib)),
                weight=draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])),
            )
        )
    total = draw(st.integers(min_value=GIB, max_value=256 * GIB))
    host = HostSnapshot(
        0.0, total, draw(st.integers(min_value=0, max_value=total)), arc_reclaimable_kib=draw(st.integers(0, GIB))
    )
    return host, guests


def _targets(result: Any) -> dict[str, int]:
    return {u: int(t) for u, t in result.targets_kib.items()}


@given(steps=st.lists(fleets(), min_size=1, max_size=6), count_arc=st.booleans())
@settings(max_examples=300, deadline=None)
def test_headroom_over_columns_decides_as_per_guest(
    steps: list[tuple[HostSnapshot, list[GuestSnapshot]]], count_arc: bool
) -> None:
    new = HeadroomPolicy(HeadroomPolicy.Params(count_arc=count_arc))
    old = headroom_reference.HeadroomPolicy(headroom_reference.HeadroomParams(count_arc=count_arc))
    for host, guests in steps:
        assert _targets(new.decide(host, guests, None)) == _targets(old.decide(host, guests, None))


@given(steps=st.lists(fleets(), min_size=1, max_size=8), history_len=st.sampled_from([1, 3, 10]))
@settings(max_examples=300, deadline=None)
def test_mom_over_columns_decides_as_per_guest_step_after_step(
    steps: list[tuple[HostSnapshot, list[GuestSnapshot]]], history_len: int
) -> None:
    """Guests come, go, miss a sample: the histories follow as upstream MOM's do."""
    new = MomPolicy(MomPolicy.Params(history_len=history_len))
    old = mom_reference.MomPolicy(mom_reference.MomParams(history_len=history_len))
    new_state, old_state = new.initial_state(), old.initial_state()
    for host, guests in steps:
        guests = list({g.uuid: g for g in guests}.values())
        a, b = new.decide(host, guests, new_state), old.decide(host, guests, old_state)
        assert _targets(a) == _targets(b)
        histories = {u: (h.balloon_cur_kib, h.mem_unused_kib) for u, h in a.state.guests.items()}
        assert histories == {u: (h.balloon_cur_kib, h.mem_unused_kib) for u, h in b.state.guests.items()}
        new_state, old_state = a.state, b.state


@given(fleet=fleets())
@settings(max_examples=100, deadline=None)
def test_a_plugin_with_only_decide_is_adapted_to_columns(fleet: tuple[HostSnapshot, list[GuestSnapshot]]) -> None:
    host, guests = fleet
    guests = list({g.uuid: g for g in guests}.values())
    plugin = headroom_reference.HeadroomPolicy()  # has decide only
    assert not hasattr(plugin, "decide_batch")
    table = GuestTable.of(guests)
    batch = decide_batch(plugin, host, table, None)
    direct = plugin.decide(host, guests, None).targets_kib
    adapted = {table.uuid[i]: int(t) for i, t in enumerate(batch.targets_kib.tolist()) if not math.isnan(t)}
    assert adapted == direct


@st.composite
def _trim_guest(draw: st.DrawFn, uuid: str, max_kib: int, at_s: float, counters: dict[str, int]) -> GuestSnapshot:
    """One guest's sample, near the thresholds trim decides on; its counters rise (or
    restart) from the last sample's."""
    actual = int(max_kib * draw(st.sampled_from([1.0, 0.75, 0.5, 0.2])))
    stats = None
    if draw(st.integers(0, 9)) > 0:
        for name, steps in (
            ("swap_in_kib", [0, 0, 1024]),
            ("major_faults", [0, 100, 100_000]),
            ("oom_kills", [0, 0, 1]),
        ):
            counters[name] = (
                0 if draw(st.integers(0, 19)) == 0 else counters.get(name, 0) + draw(st.sampled_from(steps))
            )
        available = draw(st.sampled_from([0, 10 * MIB, 60 * MIB, 96 * MIB, actual * 3 // 10, actual * 9 // 10]))
        caches = draw(st.sampled_from([None, 0, available // 2, 2 * GIB]))
        stats = GuestStats(
            at_s,
            mem_available_kib=available if draw(st.integers(0, 9)) else None,
            mem_free_kib=available - min(available, caches or 0),
            disk_caches_kib=caches,
            swap_in_kib=counters["swap_in_kib"] if draw(st.integers(0, 9)) else None,
            major_faults=counters["major_faults"] if draw(st.integers(0, 9)) else None,
            oom_kills=counters["oom_kills"] if draw(st.booleans()) else None,
        )
    last = draw(st.sampled_from([None, actual, actual - 4 * MIB]))
    return GuestSnapshot(
        uuid=uuid,
        name=uuid,
        max_kib=max_kib,
        actual_kib=actual,
        current_kib=actual,
        last_target_kib=last,
        features=BalloonFeatures(deflate_on_oom=uuid.endswith("d")),
        stats=stats,
        floor_kib=draw(st.sampled_from([0, 0, max_kib // 2])),
    )


@st.composite
def trim_steps(draw: st.DrawFn) -> list[tuple[HostSnapshot, list[GuestSnapshot]]]:
    """Hosts at rising times, each with guests of a small pool: guests stay, come, go and
    miss samples; counters rise, stall and go back (a reboot)."""
    pool = [
        (f"u{i}{'d' if draw(st.booleans()) else ''}", draw(st.sampled_from([512 * MIB, 4 * GIB, 16 * GIB])))
        for i in range(draw(st.integers(1, 4)))
    ]
    counters: dict[str, dict[str, int]] = {uuid: {} for uuid, _ in pool}
    at_s, steps = 0.0, []
    for _ in range(draw(st.integers(min_value=1, max_value=14))):
        at_s += draw(st.sampled_from([10.0, 10.0, 600.0, 4000.0, 22000.0]))
        present = [(u, m) for u, m in pool if draw(st.integers(0, 9)) > 0]
        guests = [draw(_trim_guest(u, m, at_s, counters[u])) for u, m in present]
        host = HostSnapshot(at_s, 64 * GIB, draw(st.sampled_from([2 * GIB, 32 * GIB])))
        steps.append((host, guests))
    return steps


@given(
    steps=trim_steps(),
    warmup_s=st.sampled_from([0.0, 10.0, 3600.0]),
    interval_s=st.sampled_from([1.0, 600.0, 6 * 3600.0]),
    hold_deflate_on_oom=st.booleans(),
    burst_factor=st.sampled_from([0.0, 1.25, 3.3]),
)
@settings(max_examples=400, deadline=None)
def test_trim_over_columns_decides_as_per_guest_step_after_step(
    steps: list[tuple[HostSnapshot, list[GuestSnapshot]]],
    warmup_s: float,
    interval_s: float,
    hold_deflate_on_oom: bool,
    burst_factor: float,
) -> None:
    """Targets, reasons and every guest's state, tick after tick, as the per-guest trim."""
    knobs = {
        "warmup_s": warmup_s,
        "trim_interval_s": interval_s,
        "hold_deflate_on_oom": hold_deflate_on_oom,
        "burst_factor": burst_factor,
    }
    new = TrimPolicy(TrimPolicy.Params(**knobs))
    old = trim_reference.TrimPolicy(trim_reference.TrimParams(**knobs))
    new_state, old_state = new.initial_state(), old.initial_state()
    for host, guests in steps:
        a, b = new.decide(host, guests, new_state), old.decide(host, guests, old_state)
        assert _targets(a) == _targets(b)
        assert dict(a.reasons) == dict(b.reasons)
        assert a.state.guests == {u: _as_new(s) for u, s in b.state.items()}
        new_state, old_state = a.state, b.state


def _as_new(s: trim_reference.TrimGuestState) -> TrimGuestState:
    return TrimGuestState(**{f: getattr(s, f) for f in TrimGuestState.__dataclass_fields__})


@given(steps=trim_steps())
@settings(max_examples=100, deadline=None)
def test_trim_reasons_are_worded_only_when_read_and_one_kind_differs_only_in_numbers(
    steps: list[tuple[HostSnapshot, list[GuestSnapshot]]],
) -> None:
    """``RowReasons``: the kinds the daemon logs by are exactly the wordings' shapes."""
    policy = TrimPolicy(TrimPolicy.Params(warmup_s=10.0, trim_interval_s=600.0))
    state = policy.initial_state()
    shapes: dict[int, str] = {}
    for host, guests in steps:
        out = policy.decide_batch(host, GuestTable.of(guests), state)
        assert isinstance(out.reasons, RowReasons)
        for i, text in out.reasons.items():
            shape = re.sub(r"[-+]?\d[\d.]*", "#", text)
            assert shapes.setdefault(int(out.reasons.kind[i]), shape) == shape
        state = out.state
    assert len(set(shapes.values())) == len(shapes)


def test_trim_over_columns_decides_as_per_guest_in_closed_loop_on_real_traces() -> None:
    """40 simulated guests on the bundled traces, a day at one-minute ticks, the guard
    pacing what trim asks: every tick the columns and the per-guest oracle agree on the
    same snapshots, through many squeezes, releases, refaults and bursts."""
    from overcommitd.config import DaemonConfig
    from overcommitd.loop import LoopState, step_table
    from sim.evaluation.replay import ReplaySpec, build_guests, load_traces
    from sim.memory.hypervisor import SimHypervisor

    ticks, interval_s = 1440, 60.0
    spec = ReplaySpec(guests=40)
    specs, workload = build_guests(spec, load_traces(spec))
    demand, reads = workload.block(np.arange(ticks + 1, dtype=np.float64) * interval_s)
    ram = sum(s.ram_kib for s in specs)
    hv = SimHypervisor(specs, host_mem_kib=int(ram / spec.overcommit), initial_demand_kib=demand[0])
    knobs = {"warmup_s": 600.0, "trim_interval_s": 3600.0}
    new = TrimPolicy(TrimPolicy.Params(**knobs))
    old = trim_reference.TrimPolicy(trim_reference.TrimParams(**knobs))
    cfg = DaemonConfig(interval_s=interval_s)
    state, old_state = LoopState.initial(new), old.initial_state()
    kinds: set[int] = set()
    for k in range(1, ticks + 1):
        hv.advance(k * interval_s, demand[k - 1], reads[k - 1])
        host, table = hv.read(), hv.table()
        a = new.decide_batch(host, table, state.policy_state)
        b = old.decide(host, table.snapshots(), old_state)
        assert result_of(table, a).targets_kib == b.targets_kib, f"tick {k}"
        assert dict(result_of(table, a).reasons) == dict(b.reasons), f"tick {k}"
        assert a.state.guests == {u: _as_new(s) for u, s in b.state.items()}, f"tick {k}"
        assert isinstance(a.reasons, RowReasons)
        kinds.update(a.reasons.kind.tolist())
        outcome = step_table(host.taken_at_s, host, table, new, state, cfg)
        rows = np.flatnonzero(outcome.has_target)
        hv.set_targets(rows, outcome.target_kib[rows])
        state, old_state = outcome.state, b.state
    assert {WARMUP_MIN, STARTED, SQUEEZING} <= kinds and any(k >= ENDED for k in kinds)  # the cycle ran


@given(steps=st.lists(fleets(), min_size=1, max_size=4), target_pct=st.sampled_from([0.0, 50.0, 80.0, 100.0]))
@settings(max_examples=300, deadline=None)
def test_proxmox_over_columns_decides_as_per_vm(
    steps: list[tuple[HostSnapshot, list[GuestSnapshot]]], target_pct: float
) -> None:
    new = ProxmoxPolicy(ProxmoxPolicy.Params(target_pct=target_pct))
    old = proxmox_reference.ProxmoxPolicy(proxmox_reference.ProxmoxParams(target_pct=target_pct))
    for host, guests in steps:
        guests = list({g.uuid: g for g in guests}.values())  # AutoBalloon.pm keys VMs by vmid
        assert _targets(new.decide(host, guests, None)) == _targets(old.decide(host, guests, None))


B_MIB = 1024 * 1024


@st.composite
def pve_vms(draw: st.DrawFn) -> list[proxmox_reference.PveVm]:
    vms = []
    for i in range(draw(st.integers(min_value=0, max_value=12))):
        maxmem = draw(st.integers(min_value=64, max_value=64 * 1024)) * B_MIB
        low = draw(st.integers(min_value=0, max_value=maxmem // B_MIB)) * B_MIB
        balloon = draw(st.integers(min_value=1, max_value=maxmem))
        shares = draw(st.sampled_from([1, 500, 1000, 1000, 3000, 50000]))
        free = draw(st.none() | st.just(0) | st.integers(min_value=0, max_value=maxmem))
        vms.append(proxmox_reference.PveVm(f"vm{i}", balloon, low, maxmem, shares, free))
    return vms


@given(
    vms=pve_vms(),
    goal_mib=st.integers(min_value=-(2**20), max_value=2**20) | st.sampled_from([-11, -10, 0, 10, 11]),
    maxchange_mib=st.sampled_from([1, 100, 4096]),
)
@settings(max_examples=500, deadline=None)
def test_compute_alg1_over_columns_places_as_autoballoon_per_vm(
    vms: list[proxmox_reference.PveVm], goal_mib: int, maxchange_mib: int
) -> None:
    """The water-filling rounds, byte for byte, on arbitrary VMs and goals."""
    from policies.proxmox import PveVm, compute_alg1

    as_new = [PveVm(vm.vmid, vm.balloon_b, vm.balloon_min_b, vm.maxmem_b, vm.shares, vm.freemem_b) for vm in vms]
    goal_b, maxchange_b = goal_mib * B_MIB + 12345, maxchange_mib * B_MIB
    assert compute_alg1(as_new, goal_b, maxchange_b) == proxmox_reference.compute_alg1(vms, goal_b, maxchange_b)
