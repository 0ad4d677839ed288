"""Every built-in policy replayed side by side on the bundled real traces: the
invariants that must hold whatever the policy, the table, the report and tuning."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from overcommitd.config import DaemonConfig
from policies import registry
from sim.evaluation.compare import REFERENCE, Comparison, compare, format_table
from sim.evaluation.replay import ReplaySpec
from sim.evaluation.report import write_report
from sim.evaluation.tune import SPACES, Constraints, objective, to_toml, tune

POLICIES = ("pid", "sla-floor", "free-page", "mom", "proxmox", "headroom", "trim")
# 2.5x: guests boot with no invented page cache, so at 1.5-2x the bundled traces leave the
# host idle and the host-driven policies (mom, headroom) never act. The baselines run
# guarded here: these are the guard's invariants (unguarded, as upstream, MOM takes
# guests below the guard's 256 MiB minimum: test_honest_scorecard).
SPEC = ReplaySpec(guests=16, hours=8.0, seed=3, overcommit=2.5, guard_baselines=True)


@pytest.fixture(scope="module")
def comparison() -> Comparison:
    cfg = DaemonConfig()
    return compare(SPEC, [registry.create(n) for n in POLICIES], cfg)


@pytest.mark.parametrize("name", POLICIES)
def test_invariants_hold_for_every_policy(comparison: Comparison, name: str) -> None:
    run = comparison.results[name]
    card, tl = run.scorecard, run.timeline
    assert card.below_floor_guest_s == 0  # the guard keeps every guest at or above its floor
    actual = np.vstack(tl.actual_kib)
    target = np.vstack(tl.target_kib)
    ram = np.vstack(comparison.reference.timeline.actual_kib).max(axis=0)  # type: ignore[union-attr]
    min_kib = DaemonConfig().guard.min_guest_kib  # SPEC sets no SLA floor: the guard's minimum applies
    assert (actual <= ram + 1).all() and (target <= ram + 1).all()
    assert (target >= min_kib - 1).all()
    assert card.balloon_ops > 0  # every policy does something on a 2.5x overcommitted host
    # ballooning never makes the host back more than running without it
    assert card.saved_gib_h >= comparison.reference.scorecard.saved_gib_h * 0.99  # type: ignore[union-attr]


def test_the_reference_never_balloons(comparison: Comparison) -> None:
    assert comparison.reference is not None and comparison.reference.scorecard.balloon_ops == 0


def test_the_table_has_a_column_per_policy_and_marks_the_best(comparison: Comparison) -> None:
    table = format_table(comparison)
    header = next(line for line in table.splitlines() if line.startswith("| metric"))
    assert [c.strip() for c in header.split("|")[2:-1]] == [REFERENCE, *POLICIES]
    reclaimed_row = next(line for line in table.splitlines() if line.startswith("| reclaimed by ballooning, GiB·h"))
    best = max(POLICIES, key=lambda n: comparison.results[n].scorecard.reclaimed_gib_h)
    cells = [c.strip() for c in reclaimed_row.split("|")[2:-1]]
    assert cells[[REFERENCE, *POLICIES].index(best)].endswith("*")


def test_refaults_are_scored_next_to_swap_in_in_the_table_the_page_and_the_json(
    comparison: Comparison, tmp_path: Path
) -> None:
    labels = [line.split("|")[1].strip() for line in format_table(comparison).splitlines() if line.startswith("| ")]
    swap_row = labels.index("swap-in, MiB per guest-hour")
    assert labels[swap_row + 1] == "page-cache refaults, MiB per guest-hour"
    assert "<th>page-cache refaults, MiB per guest-hour</th>" in write_report(comparison, tmp_path).read_text()
    card = comparison.results["pid"].scorecard.as_dict()
    assert isinstance(card["refault_mib_per_guest_h"], float) and card["refault_mib_per_guest_h"] >= 0


def test_a_replay_is_deterministic() -> None:
    spec = ReplaySpec(guests=4, hours=2.0)
    a = compare(spec, [registry.create("pid")], DaemonConfig(), reference=False)
    b = compare(spec, [registry.create("pid")], DaemonConfig(), reference=False)
    assert a.results["pid"].scorecard == b.results["pid"].scorecard


def test_the_report_writes_plots_and_one_page_embedding_them(comparison: Comparison, tmp_path: Path) -> None:
    page = write_report(comparison, tmp_path / "report")
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == ["distributions.png", "guest.png", "host_use.png"]
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 3
    assert all(f"<th>{n}</th>" in text for n in POLICIES)
    assert "<th>guests over the paging SLO</th>" in text and "better baseline" in text and "disk I/O" in text


def test_tuning_writes_params_the_config_accepts_and_never_loses_to_its_start(tmp_path: Path) -> None:
    spec = ReplaySpec(guests=4, hours=2.0)
    result = tune(
        "pid",
        spec,
        DaemonConfig(),
        dims=[d for d in SPACES["pid"] if d.name in ("headroom_pct", "min_headroom_kib")],
        max_evals=4,
        make_policy=registry.create,
    )
    assert 1 < len(result.evaluations) <= 4
    assert result.best.objective <= result.start.objective
    path = tmp_path / "tuned.toml"
    path.write_text(to_toml(result))
    cfg = DaemonConfig.load(path)
    assert cfg.policy.name == "pid"
    policy = registry.create(cfg.policy.name, cfg.policy.params)
    assert policy.params.headroom_pct == pytest.approx(result.best.params["headroom_pct"], rel=1e-5)  # type: ignore[attr-defined]
    assert (
        tomllib.loads(path.read_text())["policy"]["params"]["min_headroom_kib"]
        == result.best.params["min_headroom_kib"]
    )


def test_the_tuner_holds_every_guest_to_the_slo_not_the_fleet_mean(comparison: Comparison) -> None:
    card = comparison.results["pid"].scorecard
    quiet = replace(
        card,
        oom_kills=0,
        below_floor_guest_s=0.0,
        host_over_100_s=0.0,
        guests_over_slo=0,
        worst_guest_paging_pct_per_min=0.1,
        swap_in_mib_per_guest_h=1.0,
        refault_mib_per_guest_h=0.0,
    )
    bound = Constraints(slo_pct_per_min=0.2)
    assert objective(quiet, bound) == (-quiet.saved_pct, True)
    # one guest at 0.3 %/min: infeasible, by one guest plus its excess over the SLO, however
    # quiet the fleet's mean swap-in and refaults are
    one_guest = replace(quiet, guests_over_slo=1, worst_guest_paging_pct_per_min=0.3)
    value, feasible = objective(one_guest, bound)
    assert not feasible and value == pytest.approx(100.0 + 1 + 0.5)
    # the host above 100 % for a minute is a violation too
    assert objective(replace(quiet, host_over_100_s=60.0), bound) == (pytest.approx(101.0), False)
