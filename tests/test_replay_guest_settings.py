"""Issue 16: each simulated guest keeps its own size's kernel reserve, and the guest
settings a comparison with real guests needs (stats period, swap, which guests have
DEFLATE_ON_OOM, reporting) are replay arguments, not only Python."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from overcommitd.cli import build_parser
from overcommitd.config import DaemonConfig
from sim.evaluation.compare import spec_from_args
from sim.evaluation.replay import ReplaySpec, build_guests, has_deflate_on_oom
from sim.memory.guest import Fleet, GuestModelParams, GuestSpec
from sim.memory.hypervisor import SimHypervisor
from sim.memory.kernel import GuestKernel, boot
from sim.memory.trace_loader import load_all

MIB = 1024
GIB = 1024 * MIB


def test_each_guest_keeps_its_own_sizes_reserve_between_memfree_and_memavailable() -> None:
    """1 and 4 GiB guests side by side, little cache: MemFree - MemAvailable is each one's
    totalreserve_pages less the half of its cache MemAvailable credits (si_mem_available()),
    from sim.memory.kernel.boot()."""
    specs = [GuestSpec(uuid=str(i), name=str(i), ram_kib=r) for i, r in enumerate((GIB, 4 * GIB))]
    hv = SimHypervisor(specs, host_mem_kib=16 * GIB, initial_demand_kib=np.array([100.0 * MIB, 100.0 * MIB]))
    f = hv.fleet
    gap = f.free() - f.mem_available()
    expected = np.array([boot(r).totalreserve_kib for r in (GIB, 4 * GIB)]) - f.cache / 2
    assert np.allclose(gap, expected)
    assert 60 * MIB < gap[0] < 75 * MIB  # the real 1 GiB guest: 66852 KiB (tests/data/realguest)
    assert gap[1] / (4 * GIB) < gap[0] / GIB / 2  # one flat share could not fit both


def test_thp_off_and_a_flat_share_change_the_reserve() -> None:
    spec = [GuestSpec(uuid="u", name="g", ram_kib=GIB)]
    demand = np.array([100.0 * MIB])
    off = SimHypervisor(spec, host_mem_kib=4 * GIB, initial_demand_kib=demand, guest_kernel=GuestKernel(thp="never"))
    assert off.fleet.min_free[0] == boot(GIB, GuestKernel(thp="never")).totalreserve_kib < 20 * MIB
    flat = Fleet(spec, GuestModelParams(min_free_pct=2.0), demand)
    assert flat.min_free[0] == flat.wmark_low[0] == pytest.approx(GIB * 0.02)
    own = boot(GIB)  # the floor keeps the kernel's own proportion to the reserve
    assert flat.oom_floor[0] == pytest.approx(GIB * 0.02 * own.oom_floor_kib / own.totalreserve_kib)


@pytest.mark.parametrize("deflate_on_oom", [False, True])
def test_with_nothing_to_reclaim_a_guest_allocates_down_to_its_floor_before_it_runs_out(deflate_on_oom: bool) -> None:
    """kswapd keeps free memory at the high watermarks (totalreserve) while it can
    reclaim; with no cache left and no swap, allocations go on down to the min watermarks
    (``oom_floor``) and only below them does the guest deflate itself or kill: MemAvailable
    reads 0 on the way, as the real test guest's did with 47.6 MiB free."""
    spec = [GuestSpec(uuid="u", name="g", ram_kib=GIB, swap_kib=0, deflate_on_oom=deflate_on_oom)]
    f = Fleet(spec, GuestModelParams(), np.array([100.0 * MIB]))
    f.driver.balloon_kib[0] = 300 * MIB  # what DEFLATE_ON_OOM can take back
    f.cache[0] = f.cache_min[0]
    f.anon[0] += f.free()[0] - f.oom_floor[0] - MIB  # a MiB above the floor
    assert not f._relieve_pressure().any() and f.oom_deflates[0] == 0
    assert f.free()[0] == pytest.approx(f.oom_floor[0] + MIB) and f.free()[0] < f.min_free[0] - 20 * MIB
    assert f.mem_available()[0] == 0
    f.anon[0] += 2 * MIB  # a MiB below it
    killed = f._relieve_pressure()
    assert killed[0] != deflate_on_oom
    assert f.oom_deflates[0] == (1 if deflate_on_oom else 0)


def test_the_replay_arguments_set_the_guests(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    rows = ["time_s,guest,provisioned_kib,used_kib"]
    rows += [f"{t},{name},{GIB},{100 * MIB}" for t in range(0, 120, 10) for name in ("web-1", "web-2", "db")]
    trace.write_text("\n".join(rows) + "\n")
    argv = ["replay", "--trace", str(trace), "--stats-period-s", "2", "--guest-swap-mib", "0"]
    argv += ["--deflate-on-oom", "web-*", "--reporting-share", "0"]
    spec = spec_from_args(build_parser().parse_args(argv), DaemonConfig())
    assert (spec.stats_period_s, spec.guest_swap_kib, spec.reporting_share) == (2.0, 0, 0.0)
    assert spec.deflate_on_oom_guests == ("web-*",)
    specs, _ = build_guests(spec, load_all([trace]))
    assert {s.name.split("-", 1)[1]: s.deflate_on_oom for s in specs} == {"web-1": True, "web-2": True, "db": False}
    assert all(s.swap_kib == 0 and not s.reporting for s in specs)
    none = spec_from_args(build_parser().parse_args([*argv[:7], "--deflate-on-oom", "-"]), DaemonConfig())
    assert none.deflate_on_oom_guests == ()
    phased = spec_from_args(
        build_parser().parse_args([*argv, "--stats-phase-s", "db=1.25", "web-*=0.5"]), DaemonConfig()
    )
    specs, _ = build_guests(phased, load_all([trace]))
    assert {s.name.split("-", 1)[1]: s.stats_phase_s for s in specs} == {"web-1": 0.5, "web-2": 0.5, "db": 1.25}
    assert {s.stats_phase_s for s in build_guests(spec, load_all([trace]))[0]} == {0.0}


@pytest.mark.parametrize("bad", ["db", "=1", "db=-1", "db=x", "db=nan"])
def test_a_stats_phase_is_guest_equals_seconds(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["replay", "--stats-phase-s", bad])
    assert "expected GUEST=SECONDS" in capsys.readouterr().err


@given(pattern=st.text(max_size=200), name=st.text(max_size=200), draw=st.floats(0, 1))
def test_any_pattern_names_guests_as_fnmatch_does_and_never_raises(pattern: str, name: str, draw: float) -> None:
    named = ReplaySpec(deflate_on_oom_guests=(pattern,), deflate_on_oom_share=1.0)
    assert has_deflate_on_oom(named, name, draw) == fnmatch.fnmatchcase(name, pattern)
    drawn = ReplaySpec(deflate_on_oom_share=0.5)
    assert has_deflate_on_oom(drawn, name, draw) == (draw < 0.5)
