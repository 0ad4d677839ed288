"""The honest scorecard (issue 11): harm is counted in full and never as savings, host
overload is charged to the guests, the warm-up is simulated but not scored, every guest
is held to its own paging SLO, floors are the ones the guard enforces, the baselines run
as upstream runs them and the yardstick is a baseline that holds. The headline is what
ballooning reclaimed, not memory the guests never touched."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overcommitd.config import DaemonConfig
from overcommitd.model import GuestSnapshot, GuestStats, HostSnapshot
from policies import registry
from policies.api import PolicyResult
from policies.mom import MomPolicy
from sim.cli import format_scorecard
from sim.evaluation.compare import Comparison, compare, format_table
from sim.evaluation.metrics import GuestTick, Recorder, RunCounters, RunFacts, Scorecard, Timeline, violations
from sim.evaluation.replay import ReplayResult, ReplaySpec, guard_floors, replay
from sim.memory import traces
from sim.memory.guest import GuestModelParams
from sim.memory.host import host_swap
from sim.memory.workload import io_columns
from tests.helpers import Noop

GIB = 1024 * 1024
MIB = 1024
HEADER = (
    "Timestamp [ms];\tCPU cores;\tMemory capacity provisioned [KB];\tMemory usage [KB];\t"
    "Disk read throughput [KB/s];\tDisk write throughput [KB/s]"
)
SPIKE_S = (3600.0, 7200.0)  # the workload needs 3 GiB in the trace's second hour, 1 GiB otherwise


def write_trace(path: Path, *, hours: float = 4.0, spike: bool = True, write_kib_s: float = 50.0) -> Path:
    """A Bitbrains-format 4 GiB VM sampled every 300 s, with reads and writes."""
    rows = [HEADER]
    for t in np.arange(0.0, hours * 3600.0, 300.0):
        usage = 3 * GIB if spike and SPIKE_S[0] <= t < SPIKE_S[1] else GIB
        rows.append(f"{1_372_629_804 + int(t)};\t1;\t{4 * GIB}.0;\t{usage}.0;\t20.0;\t{write_kib_s}")
    path.write_text("\n".join(rows) + "\n")
    return path


class FixedTarget:
    """Holds every guest at ``target_kib``; during ``spare`` (simulated seconds, the
    replay's own clock) gives the listed guests their whole RAM instead."""

    def __init__(self, name: str, target_kib: int, spare: tuple[float, float] | None = None) -> None:
        self.name, self.target_kib, self.spare = name, target_kib, spare

    def initial_state(self) -> None:
        return None

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: None) -> PolicyResult[None]:
        now = host.taken_at_s
        sparing = self.spare is not None and self.spare[0] <= now < self.spare[1]
        return PolicyResult({g.uuid: g.max_kib if sparing else self.target_kib for g in guests}, None)


@pytest.fixture(scope="module")
def spiky(tmp_path_factory: pytest.TempPathFactory) -> list[traces.Trace]:
    return [traces.load(write_trace(tmp_path_factory.mktemp("t") / "1.csv"))]


def spec_for(loaded: list[traces.Trace], **kw: object) -> ReplaySpec:
    fields: dict[str, object] = {
        "traces": (Path("unused"),),
        "hours": 3.0,
        "warmup_h": 0.0,
        "overcommit": 1.0,
        "deflate_on_oom_share": 0.0,
        "reporting_share": 0.0,
    }
    return ReplaySpec.model_validate(fields | kw)


def test_a_kill_never_makes_a_policy_look_thriftier(spiky: list[traces.Trace]) -> None:
    """Same trace, same targets outside the spike: the killer squeezes through it (the
    workload is killed each time it restarts), the other gives the guest room. What the
    killer's balloon took from the killed workload comes back as unserved demand."""
    spec = spec_for(spiky, warmup_h=0.5, hours=3.0, start_h=0.5)
    cfg = DaemonConfig()
    killer = replay(spec, FixedTarget("killer", int(1.5 * GIB)), cfg, loaded=spiky).scorecard
    # The replay's clock starts with the warm-up at trace hour 0: the spike is at 1-2 h on it.
    spare = (SPIKE_S[0] - 300.0, SPIKE_S[1] + 300.0)
    holder = replay(spec, FixedTarget("holder", int(1.5 * GIB), spare), cfg, loaded=spiky).scorecard
    assert holder.oom_kills == 0 and holder.unserved_gib_h == 0
    spike_intervals = (SPIKE_S[1] - SPIKE_S[0]) / cfg.interval_s
    assert killer.oom_kills >= 0.9 * spike_intervals, "every restart that does not fit is one more kill"
    assert killer.unserved_gib_h >= 0.9 * 3.0, "the killed workload wanted 3 GiB for the hour"
    assert killer.degraded_guest_s >= 0.9 * 3600
    assert killer.saved_gib_h - killer.unserved_gib_h < holder.saved_gib_h - holder.unserved_gib_h
    assert "oom-kills" in violations(killer) and "oom-kills" not in violations(holder)


def test_host_overload_is_charged_to_the_guests(tmp_path: Path) -> None:
    loaded = [traces.load(write_trace(tmp_path / f"{i}.csv", spike=False)) for i in range(2)]
    cfg = DaemonConfig()
    fits = replay(spec_for(loaded, overcommit=1.0, hours=1.0), Noop(), cfg, loaded=loaded).scorecard
    # 8 GiB of guests on 1 GiB + the 2 GiB base: the guests' 2.4 GiB touched do not fit.
    over = replay(spec_for(loaded, overcommit=8.0, hours=1.0), Noop(), cfg, loaded=loaded).scorecard
    assert fits.host_over_100_s == 0 and fits.host_swap_in_mib_per_guest_h == 0 and not violations(fits)
    assert over.host_over_100_s == pytest.approx(3600.0)
    assert over.host_over_100_gib_h > 0.5
    assert over.host_swap_in_mib_per_guest_h > 100
    assert over.major_faults_per_guest_h >= over.host_swap_in_mib_per_guest_h * 1024 / 4 * 0.99
    assert over.degraded_guest_s > 0 and over.guests_over_slo == 2
    assert set(violations(over)) == {"host-over-100", "guest-slo"}


def test_the_host_swaps_cold_guest_pages_first_and_charges_only_hot_ones() -> None:
    cold, hot = np.array([100.0, 300.0]), np.array([1000.0, 3000.0])
    swapped, faulted = host_swap(350.0, cold, hot, 10.0, 60.0)
    assert not swapped.any() and not faulted.any()
    swapped, faulted = host_swap(800.0, cold, hot, 10.0, 60.0)
    assert swapped == pytest.approx([100.0, 300.0])  # the 400 beyond the cold, by hot memory
    assert faulted == pytest.approx(swapped * (1 - np.exp(-10.0 / 60.0)))


def test_the_warm_up_is_simulated_but_not_scored(spiky: list[traces.Trace]) -> None:
    """The same simulated run (trace hours 0-3, the policy squeezing through the spike
    at 1-2 h), scored from 0 h or from 2 h: the kills of the warm-up are not scored."""
    cfg = DaemonConfig()
    policy = FixedTarget("squeeze-then-spare", int(1.5 * GIB), (SPIKE_S[1], 1e9))
    whole = replay(spec_for(spiky, warmup_h=0.0, hours=3.0), policy, cfg, loaded=spiky)
    tail = replay(spec_for(spiky, warmup_h=2.0, start_h=2.0, hours=1.0), policy, cfg, loaded=spiky)
    assert whole.scorecard.oom_kills > 0 and whole.scorecard.warmup_h == 0
    assert tail.scorecard.oom_kills == 0 and tail.scorecard.unserved_gib_h == 0
    assert tail.scorecard.warmup_h == 2.0 and tail.scorecard.hours == 1.0
    assert tail.timeline.t_s[0] == cfg.interval_s


def test_guests_start_without_invented_cache_and_fill_it_from_reads_and_writes(tmp_path: Path) -> None:
    """No assumed initial cache: a guest's page cache is what the trace's reads and
    writes put there, so a trace with more writes saves the host less."""
    light = [traces.load(write_trace(tmp_path / "1.csv", spike=False, write_kib_s=0.0))]
    heavy = [traces.load(write_trace(tmp_path / "2.csv", spike=False, write_kib_s=200.0))]
    assert "initial_cache_pct" not in GuestModelParams.model_fields
    cards = [replay(spec_for(t, hours=1.0), Noop(), DaemonConfig(), loaded=t).scorecard for t in (light, heavy)]
    assert cards[0].saved_gib_h > cards[1].saved_gib_h + 0.25  # 200 KiB/s for 1 h: 0.7 GiB of cache at the end
    assert cards[0].io_columns == "read+write"
    assert cards[0].saved_untouched_gib_h == pytest.approx(cards[0].saved_gib_h)  # no balloon, nothing reported


def test_a_trace_without_disk_columns_says_so() -> None:
    google = next(p for p in traces.bundled() if "google" in str(p))
    t = traces.load(google)
    assert t.disk_read_kib_s is None and t.disk_write_kib_s is None and io_columns(t) == "none"
    card = replay(spec_for([t], hours=0.5), Noop(), DaemonConfig(), loaded=[t]).scorecard
    assert card.io_columns == "none"
    assert "no disk I/O columns" in format_scorecard(card)


def test_a_bitbrains_file_without_a_write_column_says_so(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "1.csv", spike=False)
    lines = [line.rsplit(";\t", 1)[0] for line in path.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")
    t = traces.load(path)
    assert t.disk_write_kib_s is None and t.disk_read_kib_s is not None and io_columns(t) == "read"
    assert t.disk_read_kib_s.tolist() == [20.0] * len(t.t_s)


def test_the_reclaim_split_adds_up_to_the_saving(spiky: list[traces.Trace]) -> None:
    card = replay(spec_for(spiky, hours=1.0), FixedTarget("f", int(1.5 * GIB)), DaemonConfig(), loaded=spiky)
    c = card.scorecard
    parts = (c.saved_ballooned_gib_h, c.saved_unbacked_gib_h, c.saved_reported_gib_h, c.saved_untouched_gib_h)
    assert sum(parts) == pytest.approx(c.saved_gib_h)
    assert min(parts) >= 0 and c.saved_ballooned_gib_h > 1.5  # ~2.5 GiB ballooned for most of the hour


def test_what_ballooning_reclaimed_is_ballooned_plus_unbacked_not_reported(spiky: list[traces.Trace]) -> None:
    """Held 0.5 GiB under its RAM through the spike, the guest frees 2 GiB after it (free
    page reporting returns them) and is given its RAM back at 2.5 h (a deflate): all four
    parts of the not-backed memory occur, and only the balloon's two are reclaimed."""
    spare = (SPIKE_S[1] + 1800.0, 1e9)
    spec = spec_for(spiky, hours=3.0, reporting_share=1.0)
    c = replay(spec, FixedTarget("f", int(3.5 * GIB), spare), DaemonConfig(), loaded=spiky).scorecard
    assert min(c.saved_ballooned_gib_h, c.saved_unbacked_gib_h, c.saved_reported_gib_h, c.saved_untouched_gib_h) > 0.1
    assert c.reclaimed_gib_h == pytest.approx(c.saved_ballooned_gib_h + c.saved_unbacked_gib_h)
    assert c.reclaimed_pct == pytest.approx(100 * c.reclaimed_gib_h / (c.provisioned_gib * c.hours))
    assert c.reclaimed_gib_h < c.saved_gib_h - c.saved_reported_gib_h - 0.1  # never-touched is not reclaimed either
    assert c.as_dict()["reclaimed_gib_h"] == c.reclaimed_gib_h and c.as_dict()["reclaimed_pct"] == c.reclaimed_pct


@pytest.fixture(scope="module")
def unpressed() -> Comparison:
    """The headroom policy and no ballooning on 4 Bitbrains guests whose host has room
    for all of them (overcommit 1): headroom never needs to act."""
    bitbrains = tuple(p for p in traces.bundled() if "bitbrains" in str(p))[:4]
    spec = ReplaySpec(traces=bitbrains, hours=1.0, warmup_h=0.0, overcommit=1.0)
    return compare(spec, [registry.create("headroom")], DaemonConfig())


def test_a_policy_that_never_balloons_reclaims_nothing_whatever_the_host_did_not_back(
    unpressed: Comparison,
) -> None:
    card = unpressed.results["headroom"].scorecard
    assert card.host_peak_pct < 50 and card.balloon_ops == 0
    assert card.reclaimed_gib_h == 0 and card.reclaimed_pct == 0
    assert card.saved_pct > 50, "most of a guest's RAM is memory it never touched"
    assert card.saved_untouched_gib_h > 0.9 * card.saved_gib_h


def _saving_labels(labels: list[str]) -> list[str]:
    return [label for label in labels if any(w in label for w in ("reclaimed", "saved", "not backed"))]


def test_the_printed_scorecard_leads_with_what_ballooning_reclaimed(unpressed: Comparison) -> None:
    card = unpressed.results["headroom"].scorecard
    rows = format_scorecard(card).splitlines()[1:]
    saving = _saving_labels(rows)
    assert saving[0].split() == ["reclaimed", "by", "ballooning", "0.0", "GiB·h"]
    assert saving[1].split()[-2:] == ["0.0", "%"]
    total = next(row for row in saving if "not backed (incl. never touched)" in row)
    assert f"{card.saved_gib_h:.1f} GiB·h" in total and saving.index(total) == 2


def test_the_compare_table_leads_with_what_ballooning_reclaimed(unpressed: Comparison) -> None:
    table = format_table(unpressed)
    labels = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    saving = _saving_labels(labels)
    assert saving[:2] == ["reclaimed by ballooning, GiB·h", "reclaimed by ballooning, % of provisioned"]
    assert saving[2] == "host memory not backed (incl. never touched), GiB·h"
    reclaimed_row = next(line for line in table.splitlines() if line.startswith("| reclaimed by ballooning, GiB·h"))
    assert [c.strip().rstrip("*") for c in reclaimed_row.split("|")[2:-1]] == ["0", "0"]  # none, headroom


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 1.0),  # touched, share of RAM
            st.floats(0.0, 1.0),  # ballooned, share of the not-backed memory
            st.floats(0.0, 1.0),  # unbacked, share of what is left
            st.floats(0.0, 1.0),  # reported, share of what is left
        ),
        min_size=1,
        max_size=6,
    )
)
def test_reclaimed_is_never_more_than_not_backed_and_never_counts_reporting(
    ticks: list[tuple[float, float, float, float]],
) -> None:
    ram = np.array([4.0 * GIB])
    rec = Recorder(ram, np.zeros(1), len(ticks))
    z = np.zeros(1)
    balloon_kib_s = 0.0
    for k, (touched, b, u, r) in enumerate(ticks):
        free = ram * (1 - touched)
        ballooned = free * b
        unbacked = (free - ballooned) * u
        reported = (free - ballooned - unbacked) * r
        balloon_kib_s += float((ballooned + unbacked).sum()) * 10.0
        g = GuestTick(ram - free, ram, ram, z, ram, z, z, np.zeros(1, bool), ballooned, unbacked, reported)
        rec.record((k + 1) * 10.0, 10.0, host_used_kib=1.0, host_total_kib=2.0, g=g)
    facts = RunFacts(counters=RunCounters.zero(), paged_kib=z, balloon_ops=0, slo_pct_per_min=0.2)
    card = rec.scorecard("p", duration_s=10.0 * len(ticks), host_total_kib=2.0, facts=facts)
    assert card.reclaimed_gib_h == pytest.approx(balloon_kib_s / GIB / 3600, abs=1e-12)
    assert card.reclaimed_gib_h + card.saved_reported_gib_h <= card.saved_gib_h + 1e-9
    assert 0 <= card.reclaimed_pct <= card.saved_pct + 1e-9


def test_one_guest_over_its_slo_is_found_when_the_fleet_mean_is_fine() -> None:
    n, duration_s = 10, 3600.0
    ram = np.full(n, 4.0 * GIB)
    rec = Recorder(ram, np.zeros(n), 360)
    zeros, ones = np.zeros(n), np.full(n, float(GIB))
    for k in range(360):
        tick = GuestTick(ones, ram, ram, ones, ones, zeros, zeros, np.zeros(n, bool), zeros, zeros, zeros)
        rec.record((k + 1) * 10.0, 10.0, host_used_kib=1.0, host_total_kib=2.0, g=tick)
    paged = np.zeros(n)
    paged[3] = 0.01 * GIB * 60  # 1 % of its 1 GiB working set every minute for the hour
    counters = RunCounters.zero()
    facts = RunFacts(counters=counters, paged_kib=paged, balloon_ops=0, slo_pct_per_min=0.2)
    card = rec.scorecard("p", duration_s=duration_s, host_total_kib=2.0, facts=facts)
    fleet_mean_pct = float(paged.sum() / n) / 60 / GIB * 100
    assert fleet_mean_pct < 0.2, "the fleet mean looks fine"
    assert card.worst_guest_paging_pct_per_min == pytest.approx(1.0)
    assert card.guests_over_slo == 1 and violations(card) == {"guest-slo": 1.0}


def test_a_config_floor_is_never_crossed_and_a_guest_below_its_floor_is_counted(spiky: list[traces.Trace]) -> None:
    cfg = DaemonConfig.model_validate({"guests": {"g000-1": {"floor_kib": 3 * GIB}}})
    spec = spec_for(spiky, hours=0.5)
    guarded = replay(spec, FixedTarget("greedy", 0), cfg, loaded=spiky)
    actual = np.array([a[0] for a in guarded.timeline.actual_kib])
    assert guarded.guest_names == ["g000-1"]
    assert actual.min() >= 3 * GIB and actual[-1] == pytest.approx(3 * GIB, abs=MIB), "asked for 0, held at the floor"
    assert guarded.scorecard.below_floor_guest_s == 0
    # An upstream baseline runs with its own limits only (the yardstick mode): asked
    # below the floor, it gets there, and the replay counts it.
    upstream = replay(spec, FixedTarget("mom", 2 * GIB), cfg, loaded=spiky).scorecard
    assert upstream.below_floor_guest_s > 0.5 * 1800
    assert violations(upstream)["below-floor"] == upstream.below_floor_guest_s
    guarded_mom = replay(
        spec.model_copy(update={"guard_baselines": True}), FixedTarget("mom", 2 * GIB), cfg, loaded=spiky
    )
    assert guarded_mom.scorecard.below_floor_guest_s == 0


def test_the_replay_measures_the_floor_the_guard_enforces() -> None:
    from sim.memory.guest import GuestSpec
    from sim.memory.hypervisor import SimHypervisor

    specs = [GuestSpec("u0", "a", 4 * GIB, floor_kib=GIB), GuestSpec("u1", "b", 4 * GIB)]
    hv = SimHypervisor(specs, host_mem_kib=16 * GIB, initial_demand_kib=np.full(2, float(GIB)))
    cfg = DaemonConfig.model_validate({"guests": {"b": {"floor_kib": 2 * GIB}, "a": {"floor_kib": 512 * MIB}}})
    floors = guard_floors(hv.snapshot(), cfg)
    assert floors.tolist() == [GIB, 2 * GIB]  # the larger of SLA and config floors
    assert guard_floors(hv.snapshot(), DaemonConfig()).tolist() == [GIB, cfg.guard.min_guest_kib]


def test_mom_keeps_a_guests_history_when_one_sample_is_missing() -> None:
    """Upstream MOM's Monitor.collect returns before appending incomplete data
    (oVirt/mom mom/Monitor.py): the 10-sample history stays."""
    mom = MomPolicy()
    host = HostSnapshot(taken_at_s=0.0, mem_total_kib=64 * GIB, mem_available_kib=60 * GIB)

    def guest(free_kib: int | None) -> GuestSnapshot:
        stats = None if free_kib is None else GuestStats(0.0, mem_free_kib=free_kib)
        return GuestSnapshot(uuid="u", name="g", max_kib=4 * GIB, actual_kib=4 * GIB, current_kib=4 * GIB, stats=stats)

    state = mom.initial_state()
    for free in (GIB, 2 * GIB):
        state = mom.decide(host, [guest(free)], state).state
    missing = mom.decide(host, [guest(None)], state)
    assert "u" not in missing.targets_kib
    assert missing.state.guests["u"].mem_unused_kib == (GIB, 2 * GIB)
    gone = mom.decide(host, [], missing.state)
    assert "u" not in gone.state.guests


def _card(base: Scorecard, policy: str, saved: float, kills: int = 0) -> ReplayResult:
    return ReplayResult(replace(base, policy=policy, saved_gib_h=saved, oom_kills=kills), Timeline())


def test_the_better_baseline_is_the_thriftiest_one_that_holds(spiky: list[traces.Trace]) -> None:
    base = replay(spec_for(spiky, hours=0.5), Noop(), DaemonConfig(), loaded=spiky).scorecard
    assert not violations(base)
    spec = spec_for(spiky)
    ref = _card(base, "none", 10.0)
    results = {
        "ours": _card(base, "ours", 40.0),
        "mom": _card(base, "mom", 90.0, kills=389),
        "proxmox": _card(base, "proxmox", 20.0),
    }
    comp = Comparison(spec, results, ref)
    assert comp.better_baseline() == "proxmox"
    table = format_table(comp)
    assert "| saved beyond no ballooning / better baseline | - | 3.000x |" in table
    assert "better baseline: proxmox" in table
    both_kill = dict(results, proxmox=_card(base, "proxmox", 20.0, kills=1))
    none_holds = Comparison(spec, both_kill, ref)
    assert none_holds.better_baseline() is None
    assert "none of mom, proxmox holds" in format_table(none_holds)


def test_the_replay_command_takes_the_honest_scorecard_settings() -> None:
    from overcommitd.cli import build_parser
    from sim.evaluation.compare import spec_from_args

    argv = ["replay", "--warmup-hours", "6", "--slo", "0.5", "--floor-pct", "10", "--guard-baselines"]
    spec = spec_from_args(build_parser().parse_args(argv), DaemonConfig())
    assert (spec.warmup_h, spec.slo_pct_per_min, spec.floor_pct, spec.guard_baselines) == (6.0, 0.5, 10.0, True)
    default = spec_from_args(build_parser().parse_args(["replay"]), DaemonConfig())
    assert (default.warmup_h, default.slo_pct_per_min, default.guard_baselines) == (24.0, 0.2, False)


def test_a_guest_that_never_recovers_counts_in_the_recovery_figures() -> None:
    """A demand jump still unrecovered when the span ends waited that long at least: it is
    counted, never dropped (dropping it would make the slowest policy look fastest)."""
    import numpy as np

    from sim.evaluation.metrics import GuestTick, Recorder, RunFacts

    ram = np.array([4.0 * 1024 * 1024])
    rec = Recorder(ram, np.zeros(1), 10)

    def tick(now_s: float, demand_kib: float) -> None:
        z = np.zeros(1)
        g = GuestTick(
            touched_kib=ram / 2,
            actual_kib=ram,
            target_kib=ram,
            demand_kib=np.array([demand_kib]),
            available_kib=np.zeros(1),  # never again 5 % of its RAM: never recovered
            swap_in_kib=z,
            unserved_kib=z,
            degraded=np.zeros(1, dtype=bool),
            ballooned_kib=z,
            unbacked_kib=z,
            reported_kib=z,
        )
        rec.record(now_s, 100.0, host_used_kib=1.0, host_total_kib=10.0, g=g)

    tick(100.0, 0.0)
    tick(200.0, 2.0 * 1024 * 1024)  # a jump of half its RAM
    for now_s in (300.0, 400.0, 500.0, 600.0, 700.0):
        tick(now_s, 2.0 * 1024 * 1024)
    counters = RunCounters.zero()
    facts = RunFacts(counters=counters, paged_kib=np.zeros(1), balloon_ops=0, slo_pct_per_min=0.2)
    card = rec.scorecard("p", duration_s=700.0, host_total_kib=10.0, facts=facts)
    assert card.demand_jumps == 1 and card.recovery_p50_s == 500.0
