"""The daemon's tick from columns tells an operator what the per-guest tick did: clamps
counted over the guard's columns equal those of the Decisions, a reason's kind changes
exactly when its wording does (numbers aside), the Prometheus guest gauges keep a
guest's last value as labelled gauges did and drop a guest that left, and a whole
simulated host's tick logs, counts and serves what the Decisions say."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from overcommitd import status
from overcommitd.config import DaemonConfig, GuardConfig
from overcommitd.guard import clamp_counts, decisions, guard_table
from overcommitd.model import Decision, GuestSnapshot, RunState
from overcommitd.runner import Daemon
from overcommitd.table import GuestTable
from overcommitd.telemetry.metrics import Metrics
from policies import registry
from policies.testing import GIB, guest, host
from tests.test_guard_columns import NOW, cases, rules

Case = tuple[GuestSnapshot, int | None, float, bool, str | None]
REASONS = st.sampled_from([None, "", "warm-up: 4 min left", "warm-up: 50 s left", "gain 3 MiB below min_gain 9 MiB"])


def _guarded(cases: list[Case], rules: GuardConfig, reasons: list[str | None]) -> tuple[Any, ...]:
    table = GuestTable.of([c[0] for c in cases], auto_deflate_tolerance_kib=rules.auto_deflate_tolerance_kib)
    wish = np.array([np.nan if c[1] is None else c[1] for c in cases], dtype=np.float64)
    v = guard_table(
        NOW,
        table,
        wish,
        rules=rules,
        backoff_until_s=np.array([c[2] for c in cases], dtype=np.float64),
        excluded=np.array([c[3] for c in cases], dtype=bool),
        failed=np.array([c[4] is not None for c in cases], dtype=bool),
    )
    errors = {i: c[4] for i, c in enumerate(cases) if c[4] is not None}
    why = {i: r for i, r in enumerate(reasons) if r is not None}
    return table, v, errors, why, decisions(table, v, errors, why)


@given(st.lists(cases(), max_size=12), rules)
@settings(max_examples=300, deadline=None)
def test_clamps_counted_over_columns_are_the_decisions_clamps(cs: list[Case], r: GuardConfig) -> None:
    _table, v, _errors, _why, ds = _guarded(cs, r, [None] * len(cs))
    assert clamp_counts(v) == dict(Counter(c.reason for d in ds for c in d.clamps))


def _shape(g: GuestSnapshot, d: Decision, applied: bool, floor: int) -> str:
    s = status.guest_status(g, d, applied, floor)
    return f"{s.state}|{status.ReasonLog._shape(s.why)}"


@st.composite
def case_pairs(draw: st.DrawFn) -> tuple[Case, Case]:
    """Two ticks of one guest that differ in a little (its wish, exactly what it has or
    was last asked - a dead band of no change, which ``explain`` leaves out - or just
    beside it; its error; its run state), or two unrelated guests."""
    a = draw(cases())
    if draw(st.integers(0, 4)) == 0:
        return a, draw(cases())
    g, wish, backoff, excluded, error = a
    if draw(st.booleans()):
        g = dataclasses.replace(g, run_state=RunState.RUNNING)
    reference = g.last_target_kib if g.last_target_kib is not None else g.actual_kib
    near = st.sampled_from([reference, reference, reference + 1, reference - 1])
    b = (
        g,
        draw(st.just(wish) | near),
        backoff,
        draw(st.just(excluded) | st.booleans()),
        draw(st.just(error) | st.none()),
    )
    a = (g, draw(st.just(wish) | near), backoff, excluded, error)
    return a, b


_STILL = guest("still", max_kib=8 * GIB, actual_kib=4 * GIB, available_kib=GIB)


@given(case_pairs(), rules, REASONS, REASONS | st.just("same"), st.booleans(), st.booleans())
@example(  # a wish of no change at all (left out) against one of +1 KiB (a dead band shown)
    ((_STILL, 4 * GIB, -np.inf, False, None), (_STILL, 4 * GIB + 1, -np.inf, False, None)),
    GuardConfig(),
    None,
    None,
    False,
    False,
)
@settings(max_examples=800, deadline=None)
def test_a_reason_kind_changes_exactly_when_its_wording_does(
    pair: tuple[Case, Case], r: GuardConfig, why_a: str | None, why_b: str | None, set_a: bool, set_b: bool
) -> None:
    a, b = pair
    why_b = why_a if why_b == "same" else why_b
    kinds = status.ReasonKinds()
    shapes, found = [], []
    for case, why, applied in ((a, why_a, set_a), (b, why_b, set_b)):
        table, v, errors, reasons, (d,) = _guarded([case], r, [why])
        applied &= d.target_kib is not None
        found.append(kinds.kinds(table, v, np.array([applied]), errors, reasons)[0])
        shapes.append(_shape(table.snapshot(0), d, applied, int(v.floor_kib[0])))
    assert bool((found[0] == found[1]).all()) == (shapes[0] == shapes[1])


def test_reason_kinds_log_a_guest_when_its_kind_changes_and_forget_one_that_left(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kinds = status.ReasonKinds()
    caplog.set_level(logging.INFO, logger="overcommitd.status")

    def row(i: int) -> status.GuestStatus:
        return status.GuestStatus(
            name=f"g{i}", uuid=f"u{i}", actual_kib=1, target_kib=None, floor_kib=0, max_kib=1, wish_kib=None,
            state="held", why=f"kind {i}",
        )  # fmt: skip

    one = np.array([[1, 2, -1], [3, 4, -1]], dtype=np.int64)
    assert [g.uuid for g in kinds.update(("u0", "u1"), one, row)] == ["u0", "u1"]
    assert kinds.update(("u0", "u1"), one.copy(), row) == []
    assert [g.uuid for g in kinds.update(("u1", "u0"), one[::-1].copy(), row)] == []
    moved = np.array([[3, 5, -1], [1, 2, -1]], dtype=np.int64)
    assert [g.uuid for g in kinds.update(("u1", "u2"), moved, row)] == ["u0", "u1"]  # rows 0 (u1), 1 (u2: new)
    assert len(caplog.records) == 4 and caplog.records[0].__dict__["event"] == "reason"


def test_guest_gauges_keep_a_guest_last_value_and_drop_a_guest_that_left() -> None:
    m = Metrics()
    sample = m.registry.get_sample_value
    a = guest("a", max_kib=8 * GIB, actual_kib=6 * GIB, available_kib=GIB, last_target_kib=6 * GIB)
    b = guest("b", max_kib=4 * GIB, stats=False)
    m.observe(host(), [a, b], [Decision(b.uuid, "b", 3 * GIB, 3 * GIB)], {b.uuid})
    labels = {"guest": "a", "uuid": a.uuid}
    assert sample("overcommitd_guest_available_bytes", labels) == GIB * 1024
    assert sample("overcommitd_guest_target_bytes", labels) == 6 * GIB * 1024
    assert sample("overcommitd_guest_target_bytes", {"guest": "b", "uuid": b.uuid}) == 3 * GIB * 1024
    assert sample("overcommitd_guest_available_bytes", {"guest": "b", "uuid": b.uuid}) is None  # never sent
    blind = guest("a", max_kib=8 * GIB, actual_kib=7 * GIB, stats=False)  # no stats, no target this tick
    m.observe(host(), [blind], [], set())
    assert sample("overcommitd_guest_actual_bytes", labels) == 7 * GIB * 1024
    assert sample("overcommitd_guest_available_bytes", labels) == GIB * 1024  # its last value
    assert sample("overcommitd_guest_target_bytes", labels) == 6 * GIB * 1024
    assert sample("overcommitd_guest_max_bytes", {"guest": "b", "uuid": b.uuid}) is None  # b left
    assert sample("overcommitd_decisions_total", {"outcome": "set"}) == 1
    assert sample("overcommitd_decisions_total", {"outcome": "held"}) is None


def test_a_simulated_hosts_tick_publishes_what_its_decisions_say(caplog: pytest.LogCaptureFixture) -> None:
    """60 simulated guests, trim with a short warm-up: the targets logged, the counters,
    the gauges and the status document are those of the step's Decisions."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tick.py"
    found = importlib.util.spec_from_file_location("bench_tick", path)
    assert found is not None and found.loader is not None
    bench = importlib.util.module_from_spec(found)
    found.loader.exec_module(bench)  # the benchmark's host, reused
    SimHost, INTERVAL_S = bench.SimHost, bench.INTERVAL_S

    from sim.evaluation.replay import ReplaySpec, build_guests, load_traces

    spec = ReplaySpec(guests=60)
    specs, workload = build_guests(spec, load_traces(spec))
    ticks = 40
    demand, reads = workload.block(np.arange(ticks + 1, dtype=np.float64) * INTERVAL_S)
    ram = sum(s.ram_kib for s in specs)
    hv = SimHost(specs, host_mem_kib=int(ram / spec.overcommit), initial_demand_kib=demand[0])
    cfg = DaemonConfig.model_validate({"interval_s": INTERVAL_S, "policy": {"params": {"warmup_s": 60.0}}})
    daemon = Daemon(cfg, hv, hv, make_policy=registry.create)
    caplog.set_level(logging.INFO)
    held = applied = 0
    clamps: Counter[str] = Counter()

    async def run() -> None:
        nonlocal held, applied
        for k in range(1, ticks + 1):
            hv.advance(k * INTERVAL_S, demand[k - 1], reads[k - 1])
            report = await daemon.tick()
            assert report.outcome is not None
            ds = report.outcome.decisions
            applied += len(report.applied)
            held += len(ds) - len(report.applied)
            clamps.update(c.reason.value for d in ds for c in d.clamps)
            moved = {d.name: d.target_kib for d in ds if d.target_kib is not None}
            logged = {
                r.__dict__["guest"]: r.__dict__["target_kib"]
                for r in caplog.records
                if r.__dict__.get("event") == "target"
            }
            assert logged == moved
            caplog.clear()
            doc = daemon.last_status
            assert doc is not None and [g.uuid for g in doc.guests] == [d.uuid for d in ds]
            assert [g.why for g in doc.guests] == [
                status.explain(d, report.outcome.table.snapshot(i)) for i, d in enumerate(ds)
            ]

    asyncio.run(run())
    sample = daemon.metrics.registry.get_sample_value
    assert applied > 0 and sample("overcommitd_decisions_total", {"outcome": "set"}) == applied
    assert sample("overcommitd_decisions_total", {"outcome": "held"}) == held
    assert {k: sample("overcommitd_clamps_total", {"reason": k}) for k in clamps} == dict(clamps)
    table = hv.table()
    for i in range(len(table)):
        labels = {"guest": table.name[i], "uuid": table.uuid[i]}
        assert sample("overcommitd_guest_max_bytes", labels) == table.max_kib[i] * 1024
        if table.has_last_target[i]:
            assert sample("overcommitd_guest_target_bytes", labels) == table.last_target_kib[i] * 1024
