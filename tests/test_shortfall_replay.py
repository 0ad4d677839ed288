"""The replay reports when the host is short beyond any balloon (``overcommitd.shortfall``
on the replay's own snapshots), and ``plan`` names it when it is why a ratio fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from overcommitd.config import DaemonConfig
from sim.cli import format_scorecard
from sim.evaluation.compare import Comparison, format_table
from sim.evaluation.metrics import violations
from sim.evaluation.plan import Plan, PlanJob, format_plan, search, to_json
from sim.evaluation.replay import ReplaySpec, replay
from sim.memory import traces
from tests.helpers import Noop
from tests.test_honest_scorecard import FixedTarget

GIB = 1024 * 1024
HEADER = (
    "Timestamp [ms];\tCPU cores;\tMemory capacity provisioned [KB];\tMemory usage [KB];\tDisk read throughput [KB/s]"
)
GUESTS = 2
HOURS = 1.0


def write_trace(path: Path, usage_kib: int, *, first_hour_kib: int | None = None) -> Path:
    """A Bitbrains-format 4 GiB VM whose workload uses ``usage_kib`` (in the first hour
    ``first_hour_kib`` if given)."""
    rows = [HEADER] + [
        f"{1_372_629_804 + int(t)};\t1;\t{4 * GIB}.0;\t{usage_kib if t >= 3600 or first_hour_kib is None else first_hour_kib}.0;\t0.0"
        for t in np.arange(0.0, 3 * 3600.0, 300.0)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def heavy_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ...]:
    d = tmp_path_factory.mktemp("heavy")
    return tuple(write_trace(d / f"{i}.csv", 3 * GIB) for i in range(GUESTS))


@pytest.fixture(scope="module")
def heavy(heavy_paths: tuple[Path, ...]) -> list[traces.Trace]:
    return [traces.load(p) for p in heavy_paths]


def spec(**kw: object) -> ReplaySpec:
    fields: dict[str, object] = {
        "traces": (Path("unused"),),
        "hours": HOURS,
        "warmup_h": 0.0,
        "deflate_on_oom_share": 0.0,
        "reporting_share": 0.0,
    }
    return ReplaySpec.model_validate(fields | kw)


def test_working_sets_beyond_the_host_report_a_shortfall_of_their_size(heavy: list[traces.Trace]) -> None:
    s = spec(overcommit=4.0)  # 8 GiB of guests on 2 GiB + the 2 GiB base; they use 6 GiB
    card = replay(s, Noop(), DaemonConfig(), loaded=heavy).scorecard
    host_kib = card.host_gib * GIB
    hm = s.host_model
    beyond_kib = GUESTS * 3 * GIB + hm.base_kib + GUESTS * hm.qemu_overhead_kib - host_kib  # the workloads alone
    assert beyond_kib / GIB <= card.host_short_peak_gib <= (beyond_kib + GUESTS * GIB) / GIB  # + each guest's kernel
    assert card.host_short_s == pytest.approx(HOURS * 3600.0)
    assert card.host_short_gib_h == pytest.approx(card.host_short_peak_gib * HOURS, rel=0.02)
    assert "host-over-100" in violations(card)
    text = format_scorecard(card)
    assert f"at worst host short by {card.host_short_peak_gib:.1f} GiB: no policy can hold here" in text
    assert "host short beyond any balloon" in text


def test_a_host_with_room_reports_no_shortfall(heavy: list[traces.Trace]) -> None:
    card = replay(spec(overcommit=1.0), Noop(), DaemonConfig(), loaded=heavy).scorecard
    assert card.host_short_s == 0 and card.host_short_peak_gib == 0 and card.host_short_gib_h == 0
    assert not violations(card)
    assert "no policy can hold" not in format_scorecard(card)


@pytest.fixture(scope="module")
def growing_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ...]:
    """1 GiB used in the first hour, 3 GiB after: a balloon set in the first hour is in the way."""
    d = tmp_path_factory.mktemp("growing")
    return tuple(write_trace(d / f"{i}.csv", 3 * GIB, first_hour_kib=GIB) for i in range(GUESTS))


@pytest.fixture(scope="module")
def growing(growing_paths: tuple[Path, ...]) -> list[traces.Trace]:
    return [traces.load(p) for p in growing_paths]


def squeezer() -> FixedTarget:
    """Holds every guest at 1.5 GiB, where the workloads need 3 GiB in their second hour."""
    return FixedTarget("squeeze", int(1.5 * GIB))


def test_a_squeezed_guest_is_no_shortfall(growing: list[traces.Trace]) -> None:
    """A policy that takes what the workloads need fails on its own: the host has room."""
    card = replay(spec(overcommit=1.0, hours=2.0), squeezer(), DaemonConfig(), loaded=growing).scorecard
    assert card.oom_kills > 0 and "host-over-100" not in violations(card)
    assert card.host_short_s == 0


def test_the_comparison_table_shows_the_shortfall(heavy: list[traces.Trace]) -> None:
    s = spec(overcommit=4.0)
    result = replay(s, Noop(), DaemonConfig(), loaded=heavy)
    card = result.scorecard
    table = format_table(Comparison(s, {"noop": result}, None))
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert f"{card.host_short_peak_gib:.1f}" in rows["host short beyond any balloon, peak GiB"]
    assert "3600" in rows["host short beyond any balloon, s"]
    assert card.as_dict()["host_short_gib_h"] == card.host_short_gib_h


def test_plan_names_the_shortfall_when_it_is_why_a_ratio_fails(heavy_paths: tuple[Path, ...]) -> None:
    job = PlanJob(spec(traces=heavy_paths), Noop(), DaemonConfig(), tolerance=0.5, max_ratio=4.0)
    p = search(job)
    assert p.safe_overcommit == 1.0 and p.next_up is not None
    short = p.next_up.card.host_short_peak_gib
    assert short > 1 and p.host_short_gib == short
    assert p.binding_note == f"host short by {short:.1f} GiB: no policy can hold here"
    table = format_plan(Plan((p,), GUESTS, HOURS))
    assert f"host-over-100+guest-slo (at {p.next_up.overcommit:g}); {p.binding_note}" in table
    out = to_json(Plan((p,), GUESTS, HOURS))[0]
    assert out["binding_note"] == p.binding_note and out["host_short_gib"] == short


def test_plan_says_nothing_of_a_shortfall_when_the_policy_is_to_blame(growing_paths: tuple[Path, ...]) -> None:
    job = PlanJob(spec(traces=growing_paths, hours=2.0), squeezer(), DaemonConfig(), tolerance=0.5, max_ratio=2.0)
    p = search(job)
    assert p.safe is None and p.next_up is not None and p.binding.startswith("oom-kills")
    assert p.host_short_gib is None and p.binding_note == ""
    assert "host short" not in format_plan(Plan((p,), GUESTS, HOURS))
