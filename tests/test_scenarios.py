"""Scenarios through the front door, and the real-guest figures they must reproduce."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from overcommitd.cli import main
from policies import registry
from sim.evaluation.scenarios import POLICY_SCENARIOS, SCENARIOS, OneHost, _guest


def test_sim_scenario_lists_when_name_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "scenario"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SCENARIOS)
    assert main(["sim", "scenario", "--list"]) == 0


def test_unknown_scenario_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "scenario", "no-such"]) == 2
    assert "no-such" in capsys.readouterr().err


def test_scenario_prints_a_timeline_and_draws_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "hugepages.png"
    assert main(["sim", "scenario", "hugepages", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "partial huge pages dropped" in out and "0 MiB released" in out
    assert png.stat().st_size > 10_000


def test_auto_deflate_leaves_actual_where_the_real_guest_left_it() -> None:
    """real-guest.md: 512 MiB guest, autodeflate on, target 160 MiB, workload asks
    300 MiB -> actual rises to about 377-380 MiB and stays there, no OOM kill."""
    host = OneHost(
        [_guest("rg", 512, deflate_on_oom=True, swap_kib=0)], lambda t: [60.0 if t < 5 else 300.0]
    )  # initramfs guest: no swap
    host.run(30.0, lambda t: None, {1.0: lambda: host.set_target_mib(0, 160)})
    actual_mib = host.hv.fleet.actual()[0] / 1024
    assert actual_mib == pytest.approx(378, abs=8)
    assert host.hv.fleet.oom_kills[0] == 0
    assert host.balloons.stats.mem_total_kib[0] / 1024 == pytest.approx(470, abs=5)  # MemTotal unchanged


def test_without_auto_deflate_memtotal_shrinks_like_the_real_guest() -> None:
    """real-guest.md: without deflate-on-oom, inflating 128 MiB took `available`
    (MemTotal) from 470 to 342 MiB."""
    host = OneHost([_guest("rg", 512)], lambda t: [60.0])
    host.run(6.0, lambda t: None, {1.0: lambda: host.set_target_mib(0, 384)})
    assert host.balloons.stats.mem_total_kib[0] / 1024 == pytest.approx(342, abs=5)


def test_reporting_starts_two_seconds_after_the_free_in_64_mib_requests() -> None:
    result = SCENARIOS["reporting"]()
    blocks = result.series["reported order-9 blocks"]
    first = next(t for t, b in zip(result.times_s, blocks) if b > 0)
    assert 7.0 <= first <= 7.3  # freed at the tick after t=5, reported 2 s later
    assert sorted({b2 - b1 for b1, b2 in itertools.pairwise(blocks)} - {0.0}) == [32.0]  # 32 x 2 MiB per request


def test_out_of_puff_storm_retries_five_times_a_second() -> None:
    result = SCENARIOS["out-of-puff"]()
    assert result.series["Out of puff messages"][-1] == pytest.approx(9 / 0.2, abs=2)


def test_shared_anonymous_dontneed_frees_nothing_remove_does() -> None:
    s = SCENARIOS["shared-anon"]().series
    assert s["DONTNEED host RAM used MiB"][-1] == s["DONTNEED host RAM used MiB"][0]
    assert s["MADV_REMOVE host RAM used MiB"][0] - s["MADV_REMOVE host RAM used MiB"][-1] == pytest.approx(512, abs=1)


def test_an_announced_migration_leaves_free_memory_to_the_hint_pass() -> None:
    """free-page, both guests announced: the FREE_PAGE_HINT guest keeps its 4 GiB and the
    hint round hands over the ~2.8 GiB it has free; the plain guest's balloon takes it."""
    s = POLICY_SCENARIOS["migration-prep"](registry.create).series
    assert min(s["hint actual MiB"]) == 4096
    assert s["hint MiB handed to the migration"][-1] >= 2048
    assert 4096 - s["plain actual MiB"][-1] >= 2048


def test_migration_hints_free_memory_and_gives_it_back_at_done() -> None:
    s = SCENARIOS["migration"]().series
    assert max(s["guest blocks held MiB"]) > 1024 and s["guest blocks held MiB"][-1] == 0
    assert s["hinted MiB (skipped by migration)"][-1] >= max(s["guest blocks held MiB"])


def test_memory_pressure_during_hinting_takes_the_held_blocks_back() -> None:
    """The hinting shrinker: a workload that grows mid-migration gets the held blocks
    back instead of swapping."""
    host = OneHost([_guest("mig", 4096, free_page_hint=True)], lambda t: [1024.0 if t < 4 else 3000.0])
    dev = host.balloons.guests[0].device
    host.run(8.0, lambda t: None, {1.0: dev.free_page_start})
    f = host.hv.fleet
    assert f.swap_out[0] == 0 and f.oom_kills[0] == 0
    assert 0 < host.balloons.held_kib[0] < 2048 * 1024  # some blocks still held, the rest given back
