"""Replays of real bundled traces through the control step: invariants hold, memory is
actually reclaimed, and the front door (``overcommitd replay``) reports it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from overcommitd.cli import main
from overcommitd.config import DaemonConfig
from policies import registry
from sim.evaluation.replay import ReplaySpec, replay
from sim.memory import traces
from sim.memory.guest import GuestModelParams
from sim.memory.workload import Workload
from tests.helpers import Noop

SLICE = tuple(traces.bundled()[:12])
# 2.5x: with no invented page cache the host-driven headroom policy has nothing to do at 1.5x.
SPEC = ReplaySpec(traces=SLICE, hours=12.0, floor_pct=30.0, overcommit=2.5)


@pytest.fixture(scope="module")
def loaded() -> list[traces.Trace]:
    return [traces.load(p) for p in SLICE]


def test_headroom_reclaims_memory_and_keeps_every_floor(loaded: list[traces.Trace]) -> None:
    cfg = DaemonConfig()
    ours = replay(SPEC, registry.create("headroom"), cfg, loaded=loaded).scorecard
    reference = replay(SPEC, Noop(), cfg, loaded=loaded).scorecard
    assert ours.below_floor_guest_s == 0
    assert ours.balloon_ops > 0
    assert ours.saved_gib_h > reference.saved_gib_h * 1.1, "ballooning must save memory over not ballooning"
    assert ours.host_p95_pct < reference.host_p95_pct
    assert reference.balloon_ops == 0 and reference.swap_in_mib_per_guest_h == 0 and reference.oom_kills == 0


def test_a_replay_gives_the_same_answer_twice(loaded: list[traces.Trace]) -> None:
    spec = SPEC.model_copy(update={"hours": 3.0})
    first = replay(spec, registry.create("headroom"), DaemonConfig(), loaded=loaded).scorecard
    second = replay(spec, registry.create("headroom"), DaemonConfig(), loaded=loaded).scorecard
    assert first == second


def test_replay_command_prints_the_scorecard_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "card.json"
    argv = [
        "replay",
        "--trace",
        *map(str, SLICE[:3]),
        "--guests",
        "5",
        "--hours",
        "2",
        "--no-progress",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "scorecard: policy trim" in printed and "guest-seconds below floor" in printed
    card = json.loads(out.read_text())
    assert card["guests"] == 5 and card["hours"] == 2.0 and card["below_floor_guest_s"] == 0


def test_replay_of_an_unknown_policy_lists_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "--policy", "nope", "--hours", "1", "--no-progress"]) == 2
    assert "known policies: " in capsys.readouterr().err


def test_replay_of_a_malformed_trace_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("time,max_memory_usage,memory_limit\n300000000,0.1,0.2\n600000000,oops,0.2\n")
    assert main(["replay", "--trace", str(bad), "--hours", "1", "--no-progress"]) == 2
    assert f"{bad}:3: max_memory_usage is not a number: 'oops'" in capsys.readouterr().err


def test_a_replay_can_start_days_into_the_traces(loaded: list[traces.Trace]) -> None:
    """Tune on one stretch, judge on another: ``start_h`` shifts every guest's trace."""
    params = GuestModelParams()
    day_s = 86400.0
    later = Workload.assign(loaded, 12, params, start_s=2 * day_s)
    shifted, _ = later.block(np.array([0.0, 3600.0]))
    direct, _ = Workload.assign(loaded, 12, params).block(np.array([2 * day_s, 2 * day_s + 3600.0]))
    assert np.array_equal(shifted, direct)
    assert not np.array_equal(shifted, Workload.assign(loaded, 12, params).block(np.array([0.0, 3600.0]))[0])
    card = replay(SPEC.model_copy(update={"hours": 1.0, "start_h": 48.0}), Noop(), DaemonConfig(), loaded=loaded)
    assert card.scorecard.hours == 1.0
