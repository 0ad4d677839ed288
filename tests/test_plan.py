"""``overcommitd plan``: the search's invariants on real traces (the safe ratio and every
ratio tried below it hold, the next step up fails for the constraint it names, within the
tolerance), a policy that fails in a window of host sizes (the check below the bisection
finds it), the JSON shape and the command line."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from overcommitd import cli
from overcommitd.config import DaemonConfig
from overcommitd.model import GuestSnapshot, HostSnapshot
from policies import registry
from policies.api import PolicyResult
from sim.evaluation.compare import REFERENCE, NoBalloon
from sim.evaluation.plan import (
    CONSTRAINTS,
    MIN_RATIO,
    START_RATIO,
    Plan,
    PlanError,
    PlanJob,
    format_plan,
    plan,
    search,
    to_json,
    try_ratio,
)
from sim.evaluation.replay import ReplaySpec
from sim.evaluation.sweep import Sweep
from sim.memory.host import HostModelParams

TOLERANCE = 0.05
CHECK_STEP = 0.25


@pytest.fixture(scope="module")
def small_plan() -> Plan:
    spec = ReplaySpec(guests=4, hours=2.0, seed=1, warmup_h=1.0)
    trim = registry.create("trim")
    return plan(spec, [trim], DaemonConfig(), Sweep(workers=1), tolerance=TOLERANCE, check_step=CHECK_STEP)


def test_none_is_planned_first_and_holds_at_the_start(small_plan: Plan) -> None:
    assert [p.policy for p in small_plan.plans] == [REFERENCE, "trim"]
    none = small_plan.plans[0]
    assert none.steps[0].overcommit == START_RATIO and none.steps[0].holds


@pytest.mark.parametrize("index", [0, 1])
def test_safe_ratio_holds_and_the_next_step_up_fails_for_its_binding_constraint(small_plan: Plan, index: int) -> None:
    p = small_plan.plans[index]
    assert p.safe is not None and p.next_up is not None
    assert 0 < p.next_up.overcommit - p.safe.overcommit <= TOLERANCE
    assert p.binding and set(p.binding.split("+")) <= set(CONSTRAINTS)
    policy = NoBalloon() if p.policy == REFERENCE else registry.create(p.policy)
    job = PlanJob(ReplaySpec(guests=4, hours=2.0, seed=1, warmup_h=1.0), policy, DaemonConfig())
    again_safe = try_ratio(job, p.safe.overcommit)
    again_next = try_ratio(job, p.next_up.overcommit)
    assert again_safe.holds  # replayed afresh: deterministic, and it really holds
    assert set(again_next.violations) == set(p.binding.split("+"))
    # Every ratio tried up to the safe one held, and the check grid below it was replayed.
    assert all(s.holds for s in p.steps if s.overcommit <= p.safe.overcommit)
    tried = {round(s.overcommit, 6) for s in p.steps}
    grid = np.arange(START_RATIO + CHECK_STEP, p.safe.overcommit, CHECK_STEP)
    assert {round(float(r), 6) for r in grid} <= tried
    assert p.safe.card.host_gib > p.next_up.card.host_gib  # a higher ratio is a smaller host


def test_json_has_one_object_per_policy_with_every_ratio_tried(small_plan: Plan) -> None:
    out = json.loads(json.dumps(to_json(small_plan)))
    assert [o["policy"] for o in out] == [REFERENCE, "trim"]
    for o, p in zip(out, small_plan.plans):
        assert o["safe_overcommit"] == p.safe_overcommit
        assert o["binding"] == p.binding
        base_gib = HostModelParams().base_kib / 2**20  # the host's own use is not for guests
        assert o["host_gib"] - base_gib == pytest.approx(o["provisioned_gib"] / o["safe_overcommit"], rel=1e-3)
        assert len(o["tried"]) == len(p.steps)
        ratios = [t["overcommit"] for t in o["tried"]]
        assert ratios == sorted(ratios)
        assert all(t["holds"] == (not t["violations"]) for t in o["tried"])
        assert all("oom_kills" in t["scorecard"] for t in o["tried"])


class Squeeze:
    """Asks every guest down to nothing (the guard raises it to its minimum) whenever the
    overcommit it sees (guests' RAM / host RAM for guests) lies in ``[low, high)``, and
    leaves the balloons alone otherwise: guests page far beyond the SLO in that window
    of host sizes whatever else, and behave as with ``none`` outside it."""

    name = "squeeze"

    def __init__(self, low: float = 0.0, high: float = math.inf) -> None:
        self.low, self.high = low, high

    def initial_state(self) -> None:
        return None

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: None) -> PolicyResult[None]:
        ratio = sum(g.max_kib for g in guests) / (host.mem_total_kib - HostModelParams().base_kib)
        squeeze = self.low <= ratio < self.high
        return PolicyResult({g.uuid: 0 for g in guests} if squeeze else {}, None)


def test_a_policy_that_fails_at_every_host_size_has_no_safe_ratio() -> None:
    spec = ReplaySpec(guests=3, hours=1.0, seed=2, warmup_h=1.0)
    result = plan(spec, [Squeeze()], DaemonConfig(), Sweep(workers=1), tolerance=0.1, max_ratio=2.0)
    none, squeeze = result.plans
    assert none.safe_overcommit is not None
    assert squeeze.safe is None and squeeze.safe_overcommit is None
    assert [s.overcommit for s in squeeze.steps] == [START_RATIO, MIN_RATIO]
    lowest = squeeze.steps[1]
    assert squeeze.next_up is lowest and "guest-slo" in lowest.violations
    assert squeeze.binding == "+".join(c for c in CONSTRAINTS if c in lowest.violations)
    assert to_json(result)[1]["safe_overcommit"] is None
    row = next(line for line in format_plan(result).splitlines() if line.startswith("| squeeze"))
    assert f"fails at every ratio tried, down to {MIN_RATIO:g}: {squeeze.binding}" in row


def test_a_policy_failing_only_at_1_is_searched_below_it() -> None:
    spec = ReplaySpec(guests=3, hours=1.0, seed=2, warmup_h=1.0)
    result = plan(spec, [Squeeze(0.8, 1.2)], DaemonConfig(), Sweep(workers=1), tolerance=0.05, max_ratio=2.0)
    squeeze = result.plans[1]
    assert squeeze.safe_overcommit is not None and MIN_RATIO <= squeeze.safe_overcommit < 0.8
    assert squeeze.next_up is not None and 0.8 <= squeeze.next_up.overcommit <= 0.8 + 0.05
    assert "guest-slo" in squeeze.next_up.violations


def test_a_failure_the_bisection_skips_is_found_by_the_check_below() -> None:
    spec = ReplaySpec(guests=3, hours=1.0, seed=2, warmup_h=1.0)
    # A window the bisection (1, 2, 1.5, ...) jumps over, below none's safe ratio.
    window = Squeeze(1.2, 1.3)
    none, checked = plan(spec, [window], DaemonConfig(), Sweep(workers=1), tolerance=0.05).plans
    assert none.safe_overcommit is not None and none.safe_overcommit > 1.4
    trusting = search(PlanJob(spec, window, DaemonConfig(), tolerance=0.05, check_step=0))
    assert trusting.safe_overcommit is not None and trusting.safe_overcommit > 1.3  # the flattering reading
    assert checked.safe_overcommit is not None and 1.2 - 0.05 <= checked.safe_overcommit < 1.2
    assert checked.next_up is not None and "guest-slo" in checked.next_up.violations
    assert checked.held_above and min(checked.held_above) >= 1.3
    assert all(s.holds for s in checked.steps if s.overcommit <= checked.safe_overcommit)
    row = next(line for line in format_plan(Plan((none, checked), 3, 1.0)).splitlines() if "| squeeze" in line)
    assert "held again at" in row and "not counted" in row


def test_bad_search_settings_are_refused() -> None:
    with pytest.raises(PlanError, match="--max-overcommit"):
        plan(ReplaySpec(guests=1, hours=0.1), [], DaemonConfig(), Sweep(), max_ratio=1.0)
    with pytest.raises(PlanError, match="--tolerance"):
        plan(ReplaySpec(guests=1, hours=0.1), [], DaemonConfig(), Sweep(), tolerance=0.0)
    with pytest.raises(PlanError, match="--check-step"):
        plan(ReplaySpec(guests=1, hours=0.1), [], DaemonConfig(), Sweep(), check_step=-0.1)


def test_cli_prints_the_table_and_writes_json_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    rc = cli.main(
        [
            "plan", "--guests", "3", "--hours", "1", "--policy", "mom,trim", "--workers", "1",
            "--tolerance", "0.1", "--max-overcommit", "2", "--no-progress", "--warmup-hours", "1",
            "--json", str(out), "--report", str(tmp_path / "rep"),
        ]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["none", "mom", "trim"]
    assert "vs better baseline" in rows[0] and "binding" in rows[0]
    mom_row = rows[2].split("|")
    assert mom_row[3].strip() in ("1.00x", "-")  # mom is the only baseline: its own yardstick
    data = json.loads(out.read_text())
    assert [d["policy"] for d in data] == ["none", "mom", "trim"]
    assert {"policy", "safe_overcommit", "host_gib", "provisioned_gib", "binding", "tried"} <= set(data[0])
    assert (tmp_path / "rep" / "frontier.png").stat().st_size > 1000
    assert "frontier" in (tmp_path / "rep" / "index.html").read_text()


def test_cli_refuses_bad_tolerance(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["plan", "--guests", "1", "--hours", "0.1", "--tolerance", "-1", "--workers", "1", "--no-progress"])
    assert rc == cli.EXIT_BAD_INPUT
    assert "--tolerance" in capsys.readouterr().err
