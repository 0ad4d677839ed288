"""ZFS's ARC in the host snapshot: recorded arcstats files (tests/data/arcstats-*, a 64 GiB
host with zfs_arc_max 32 GiB and c_min 2 GiB), the reader, and the policies that count it."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overcommitd.host import HostError, HostPaths, ProcHostReader, parse_arcstats
from overcommitd.model import HostSnapshot
from overcommitd.telemetry.messages import HostMessage
from overcommitd.telemetry.metrics import Metrics
from policies.headroom import HeadroomParams, HeadroomPolicy
from policies.mom import MomParams, MomPolicy
from policies.pid import PidParams, PidPolicy
from policies.proxmox import ProxmoxParams, ProxmoxPolicy
from policies.testing import GIB, MIB, guest
from policies.trim import TrimParams, TrimPolicy

DATA = Path(__file__).parent / "data"
MEMINFO = "MemTotal:       65966752 kB\nMemFree:         3145728 kB\nMemAvailable:    6291456 kB\n"
AT_MAX_RECLAIMABLE_KIB = (34_401_681_408 - 2_147_483_648) // 1024  # size - c_min of arcstats-at-max


def reader(tmp_path: Path, arcstats: Path) -> ProcHostReader:
    (tmp_path / "meminfo").write_text(MEMINFO)
    (tmp_path / "psi").write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    return ProcHostReader(HostPaths(tmp_path / "meminfo", tmp_path / "psi", tmp_path / "ksm", arcstats))


def test_arc_at_its_maximum_counts_size_above_c_min(tmp_path: Path) -> None:
    arc = parse_arcstats((DATA / "arcstats-at-max").read_text())
    assert (arc.size_kib, arc.c_kib, arc.c_min_kib, arc.c_max_kib) == (33_595_392, 32 * GIB, 2 * GIB, 32 * GIB)
    host = reader(tmp_path, DATA / "arcstats-at-max").read()
    assert host.arc_reclaimable_kib == AT_MAX_RECLAIMABLE_KIB == 31_498_240
    assert host.mem_available_kib == 6_291_456  # MemAvailable itself is untouched
    assert host.available_with_arc_kib == 6_291_456 + AT_MAX_RECLAIMABLE_KIB


def test_arc_at_c_min_has_nothing_to_give(tmp_path: Path) -> None:
    host = reader(tmp_path, DATA / "arcstats-at-cmin").read()
    assert host.arc_reclaimable_kib == 0  # size is just below c_min: never negative
    assert host.available_with_arc_kib == host.mem_available_kib


def test_no_arcstats_means_no_zfs_silently(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="overcommitd.host"):
        host = reader(tmp_path, tmp_path / "no-zfs" / "arcstats").read()
    assert host.arc_reclaimable_kib == 0
    assert caplog.records == []


def test_a_malformed_row_names_the_file_and_line(tmp_path: Path) -> None:
    lines = (DATA / "arcstats-at-max").read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("c_min "))
    lines[row] = "c_min                           4    2GiB"
    bad = tmp_path / "arcstats"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(HostError, match=rf"{bad}:{row + 1}: c_min: '2GiB' is not an integer"):
        reader(tmp_path, bad).read()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hits 4 1\nsize 4 1\n", "no 'name type data' header"),
        ("13 1 0x01 2 544 1 2\nname type data\nsize 4 1\nc 4 1\n", "no c_min, c_max row"),
        ("13 1 0x01 1 272 1 2\nname type data\nsize 4\n", r"arcstats:3: expected '<name> <type> <value>'"),
    ],
)
def test_malformed_arcstats_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(HostError, match=message):
        parse_arcstats(text)


def test_an_unreadable_arcstats_is_an_error_not_no_zfs(tmp_path: Path) -> None:
    (tmp_path / "arcstats").mkdir()  # reading a directory: EISDIR, not ENOENT
    with pytest.raises(HostError, match="cannot read"):
        reader(tmp_path, tmp_path / "arcstats").read()


@given(st.text(max_size=400))
def test_any_text_parses_or_raises_host_error(text: str) -> None:
    try:
        arc = parse_arcstats(text)
    except HostError:
        return
    assert arc.reclaimable_kib >= 0


@given(
    st.integers(min_value=-(2**63), max_value=2**70), st.integers(min_value=-(2**63), max_value=2**70), st.booleans()
)
def test_huge_and_negative_values_never_make_negative_reclaim(size_b: int, c_min_b: int, signed: bool) -> None:
    kind = 3 if signed else 4
    text = f"13 1 0x01 4 1088 1 2\nname type data\nsize {kind} {size_b}\nc 4 0\nc_min {kind} {c_min_b}\nc_max 4 0\n"
    arc = parse_arcstats(text)
    assert arc.reclaimable_kib == max(0, max(0, size_b) // 1024 - max(0, c_min_b) // 1024)


def test_snapshot_caps_available_with_arc_at_mem_total() -> None:
    h = HostSnapshot(taken_at_s=0, mem_total_kib=100, mem_available_kib=60, arc_reclaimable_kib=80)
    assert (h.available_with_arc_kib, h.available_kib(count_arc=False), h.used_kib_counting_arc(True)) == (100, 60, 0)
    with pytest.raises(ValueError, match="arc_reclaimable_kib"):
        HostSnapshot(taken_at_s=0, mem_total_kib=100, mem_available_kib=60, arc_reclaimable_kib=-1)


def test_published_on_mqtt_and_prometheus() -> None:
    h = HostSnapshot(taken_at_s=1.0, mem_total_kib=64 * GIB, mem_available_kib=6 * GIB, arc_reclaimable_kib=30 * GIB)
    assert HostMessage.of(h).arc_reclaimable_kib == 30 * GIB
    m = Metrics()
    m.observe(h, [], [], set())
    assert m.registry.get_sample_value("overcommitd_host_zfs_arc_reclaimable_bytes") == 30 * GIB * 1024


# -- policies ---------------------------------------------------------------------------

# A 64 GiB ZFS host: 90 % used by MemAvailable's count, of which 20 GiB is ARC above c_min.
ZFS_HOST = HostSnapshot(
    taken_at_s=0.0, mem_total_kib=64 * GIB, mem_available_kib=64 * GIB // 10, arc_reclaimable_kib=20 * GIB
)
NO_ARC = dataclasses.replace(ZFS_HOST, arc_reclaimable_kib=0)
GUESTS = [guest(f"vm{i}", max_kib=8 * GIB, available_kib=6 * GIB, free_kib=5 * GIB) for i in range(4)]


def test_headroom_leaves_guests_alone_when_the_arc_covers_the_excess() -> None:
    aware, blind = HeadroomPolicy(), HeadroomPolicy(HeadroomParams(count_arc=False))
    assert aware.decide(ZFS_HOST, GUESTS, None).targets_kib == {}
    squeezed = blind.decide(ZFS_HOST, GUESTS, None).targets_kib
    assert set(squeezed) == {g.uuid for g in GUESTS} and all(t < 8 * GIB for t in squeezed.values())
    assert blind.decide(ZFS_HOST, GUESTS, None).targets_kib == aware.decide(NO_ARC, GUESTS, None).targets_kib


def test_proxmox_baseline_ignores_the_arc_unless_asked() -> None:
    upstream = ProxmoxPolicy()
    assert upstream.decide(ZFS_HOST, GUESTS, None).targets_kib == upstream.decide(NO_ARC, GUESTS, None).targets_kib
    assert all(t == 8 * GIB - 100 * MIB for t in upstream.decide(ZFS_HOST, GUESTS, None).targets_kib.values())
    aware = ProxmoxPolicy(ProxmoxParams(count_arc=True))
    # 64 GiB x 80 % - (6.4 GiB used - 20 GiB ARC) is a positive goal: nobody shrinks.
    assert aware.decide(ZFS_HOST, GUESTS, None).targets_kib == {}


def test_mom_baseline_ignores_the_arc_unless_asked() -> None:
    upstream, aware = MomPolicy(), MomPolicy(MomParams(count_arc=True))
    shrink = upstream.decide(ZFS_HOST, GUESTS, upstream.initial_state()).targets_kib
    assert shrink and all(t < 8 * GIB for t in shrink.values())
    assert aware.decide(ZFS_HOST, GUESTS, aware.initial_state()).targets_kib == {}  # grow: already at max


def test_pid_and_trim_count_the_arc_as_headroom() -> None:
    pid = PidPolicy()
    assert pid.host_pressure(NO_ARC) > 0 and pid.host_pressure(ZFS_HOST) == 0
    assert PidPolicy(PidParams(count_arc=False)).host_pressure(ZFS_HOST) == pid.host_pressure(NO_ARC)
    low = dataclasses.replace(NO_ARC, mem_available_kib=5 * GIB)
    trim = TrimPolicy()
    assert trim.host_pressed(low) and not trim.host_pressed(dataclasses.replace(low, arc_reclaimable_kib=2 * GIB))
    assert TrimPolicy(TrimParams(count_arc=False)).host_pressed(dataclasses.replace(low, arc_reclaimable_kib=2 * GIB))
