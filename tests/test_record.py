"""``overcommitd record``: what it writes (rows, hourly gzip files, the manifest), how it
derives used_kib under a balloon, what it skips, and that it never sets a target. On the
simulator's SimHypervisor (the Hypervisor protocol), libvirt's test:///default driver and
real files in tmp dirs; the real guests are in tests/realguest/test_record_realguest.py."""

from __future__ import annotations

import configparser
import csv
import gzip
import io
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from overcommitd import traceformat as tf
from overcommitd.cli import build_parser, cmd_record
from overcommitd.config import GuardConfig, LibvirtConfig
from overcommitd.hourly import HourlyCsv
from overcommitd.hypervisor import HypervisorError
from overcommitd.hypervisor.libvirt import LibvirtHypervisor
from overcommitd.model import BalloonFeatures, GuestSnapshot, GuestStats
from overcommitd.record import GUEST_HEADER, MANIFEST, ReadOnlyGuests, Recorder, demand_kib
from sim.memory.guest import GuestSpec
from sim.memory.hypervisor import SimHypervisor
from tests.conftest import need_binaries

GIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]
HOUR_S = 3600.0
T0 = 1_796_083_200.0  # 2026-12-01T00:00Z, a whole UTC hour


class NoTargets(SimHypervisor):
    """A simulated host on which setting a target is a test failure."""

    def set_target(self, uuid: str, target_kib: int) -> None:
        raise AssertionError(f"the recorder set a target on {uuid}")


def sim(*deflate_on_oom: bool, demand_gib: float = 1.0, cls: type[SimHypervisor] = SimHypervisor) -> SimHypervisor:
    specs = [
        GuestSpec(uuid=f"uuid-{i}", name=f"g{i}", ram_kib=4 * GIB, deflate_on_oom=d)
        for i, d in enumerate(deflate_on_oom)
    ]
    return cls(specs, host_mem_kib=16 * GIB, initial_demand_kib=np.full(len(specs), demand_gib * GIB))


def advance(hv: SimHypervisor, seconds: float, demand_gib: float = 1.0) -> None:
    n = len(hv.specs)
    for _ in range(int(seconds / 5)):
        hv.advance(hv.now_s + 5, np.full(n, demand_gib * GIB), np.zeros(n))


def recorder(hv: SimHypervisor, out: Path, clock: object = None) -> Recorder:
    """A recorder on the simulator's own clock (its stats' last_update is sim time)."""
    return Recorder(
        ReadOnlyGuests(hv), hv, out, rules=GuardConfig(), interval_s=10.0, clock=clock or (lambda: hv.now_s)
    )


def read_rows(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt") as f:
        return list(csv.DictReader(f))


def guest_rows(out: Path) -> list[dict[str, str]]:
    return [row for p in sorted(out.glob("guests-*.csv.gz")) for row in read_rows(p)]


# -- used_kib -------------------------------------------------------------------------


def test_used_kib_is_the_workload_with_and_without_deflate_on_oom_under_a_balloon(tmp_path: Path) -> None:
    hv = sim(False, True)
    rec = recorder(hv, tmp_path)
    advance(hv, 60)
    rec.sample()
    for spec in hv.specs:  # the test balloons both guests; the recorder never could
        SimHypervisor.set_target(hv, spec.uuid, 2 * GIB)
    advance(hv, 60)
    naive = {g.name: g.stats.mem_total_kib - g.stats.mem_available_kib for g in hv.snapshot() if g.stats}
    rec.sample()
    rec.close()
    before, after = guest_rows(tmp_path)[:2], guest_rows(tmp_path)[2:]
    used_before = {r[tf.GUEST]: int(r[tf.USED_KIB]) for r in before}
    used_after = {r[tf.GUEST]: int(r[tf.USED_KIB]) for r in after}
    assert {r[tf.GUEST]: int(r[tf.ACTUAL_KIB]) for r in after} == {"g0": 2 * GIB, "g1": 2 * GIB}
    assert {r[tf.GUEST]: r[tf.DEFLATE_ON_OOM] for r in after} == {"g0": "0", "g1": "1"}
    # The balloon took 2 GiB from each; the workload's 1 GiB (plus the guest kernel) stayed.
    for name in ("g0", "g1"):
        assert abs(used_after[name] - used_before[name]) < 0.02 * used_before[name]
        assert GIB <= used_after[name] < 1.3 * GIB
    # What total - available would have said: the DEFLATE_ON_OOM guest's balloon as "used".
    assert naive["g1"] - used_after["g1"] == 2 * GIB
    assert naive["g0"] == used_after["g0"]


def snapshot(
    *, max_kib: int, actual_kib: int, total: int | None, available: int | None, doo: bool, **stats: int | None
) -> GuestSnapshot:
    s = GuestStats(last_update_s=100.0, mem_total_kib=total, mem_available_kib=available, **stats)
    return GuestSnapshot(
        uuid="u",
        name="g",
        max_kib=max_kib,
        actual_kib=actual_kib,
        current_kib=actual_kib,
        features=BalloonFeatures(deflate_on_oom=doo),
        stats=s,
        stats_period_s=5,
    )


def test_demand_from_the_kernels_accounting() -> None:
    # A 4 GiB guest (MemTotal 3.9 GiB), workload 1 GiB, balloon 1 GiB (virtio-balloon.md §3.5):
    # without DEFLATE_ON_OOM MemTotal shrinks by the balloon; with it, it does not.
    mem_total, workload, balloon = 3900 * 1024, GIB, GIB
    plain = snapshot(
        max_kib=4 * GIB,
        actual_kib=3 * GIB,
        total=mem_total - balloon,
        available=mem_total - balloon - workload,
        doo=False,
    )
    doo = snapshot(
        max_kib=4 * GIB, actual_kib=3 * GIB, total=mem_total, available=mem_total - balloon - workload, doo=True
    )
    assert demand_kib(plain) == demand_kib(doo) == workload
    # An old guest without MemAvailable: MemFree plus caches (GuestStats.available_kib).
    old = {"max_kib": 4 * GIB, "actual_kib": 4 * GIB, "available": None, "mem_free_kib": GIB, "disk_caches_kib": GIB}
    assert demand_kib(snapshot(total=mem_total, doo=False, **old)) == mem_total - 2 * GIB
    assert demand_kib(snapshot(total=None, doo=False, **old)) is None


@given(
    max_kib=st.integers(1, 2**50),
    actual_frac=st.floats(0, 1),
    total=st.one_of(st.none(), st.integers(0, 2**62)),
    available=st.one_of(st.none(), st.integers(0, 2**62)),
    doo=st.booleans(),
)
def test_demand_is_within_the_guest_whatever_it_reports(
    max_kib: int, actual_frac: float, total: int | None, available: int | None, doo: bool
) -> None:
    g = snapshot(max_kib=max_kib, actual_kib=int(max_kib * actual_frac), total=total, available=available, doo=doo)
    used = demand_kib(g)
    assert used is None or 0 <= used <= max_kib
    assert (used is None) == (total is None or available is None)


# -- files ------------------------------------------------------------------------------


def test_rows_rotate_every_utc_hour_with_one_header_each(tmp_path: Path) -> None:
    base = snapshot(max_kib=4 * GIB, actual_kib=4 * GIB, total=3 * GIB, available=2 * GIB, doo=False)
    a, b = replace(base, uuid="a", name="a"), replace(base, uuid="b", name="b")
    times = [T0 - 25.0 + 10 * k for k in range(5)]  # 23:59:35 ... 00:00:15
    calls: list[Sequence[GuestSnapshot]] = [[fresh(a, t), fresh(b, t)] for t in times]
    now = iter(times)
    rec = Recorder(Scripted(calls), hv_host(), tmp_path, rules=GuardConfig(), interval_s=10, clock=lambda: next(now))
    for _ in times:
        rec.sample()
    rec.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "guests-2026-11-30T23Z.csv.gz",
        "guests-2026-12-01T00Z.csv.gz",
        "host-2026-11-30T23Z.csv.gz",
        "host-2026-12-01T00Z.csv.gz",
        MANIFEST,
    ]
    first, second = (read_rows(tmp_path / n) for n in names[:2])
    assert [float(r[tf.TIME_S]) - T0 for r in first] == [-25, -25, -15, -15, -5, -5]
    assert [float(r[tf.TIME_S]) - T0 for r in second] == [5, 5, 15, 15]
    with gzip.open(tmp_path / names[0], "rt") as f:
        assert f.readline().strip().split(",") == list(GUEST_HEADER)
        assert "time_s" not in f.read()  # one header per file, however many intervals
    host = read_rows(tmp_path / names[3])
    assert [float(r[tf.TIME_S]) - T0 for r in host] == [5, 15]
    assert set(host[0]) == set(tf.HOST_COLUMNS) and int(host[0]["mem_total_kib"]) > 0
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["guest_rows"] == 10 and manifest["host_rows"] == 5 and manifest["skipped_samples"] == {}
    assert manifest["format_version"] == tf.FORMAT_VERSION


def crash(w: HourlyCsv) -> None:
    """Stop a writer the way a killed process does: its file closed, nothing compressed."""
    assert w._file is not None
    w._file.close()
    w._file = None


def test_a_crash_loses_at_most_the_interval_being_written(tmp_path: Path) -> None:
    w = HourlyCsv(tmp_path, "guests", ["a", "b"])
    w.append(T0, [[1, 2]])
    w.append(T0 + 10, [[3, None]])
    crash(w)
    plain = tmp_path / "guests-2026-12-01T00Z.csv"
    assert plain.read_bytes() == b"a,b\r\n1,2\r\n3,\r\n"  # readable while it grows, every interval on disk
    with plain.open("ab") as f:
        f.write(b"5,6\r")  # a write torn by power loss
    w = HourlyCsv(tmp_path, "guests", ["a", "b"])  # restarted within the hour
    w.append(T0 + 20, [[7, 8]])
    w.finish()
    assert not plain.exists()
    assert gzip.decompress((tmp_path / "guests-2026-12-01T00Z.csv.gz").read_bytes()) == b"a,b\r\n1,2\r\n3,\r\n7,8\r\n"


def test_a_restart_continues_the_hour_and_compresses_what_a_crash_left(tmp_path: Path) -> None:
    w = HourlyCsv(tmp_path, "host", ["a"])
    w.append(T0 - 10, [[1]])  # hour 23: crashed before it was compressed
    crash(w)
    w = HourlyCsv(tmp_path, "host", ["a"])
    assert [p.name for p in w.recover()] == ["host-2026-11-30T23Z.csv.gz"]
    w.append(T0, [[2]])
    w.finish()  # a clean stop within hour 00
    w = HourlyCsv(tmp_path, "host", ["a"])
    w.append(T0 + 10, [[3]])  # and a restart within it
    w.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host-2026-11-30T23Z.csv.gz", "host-2026-12-01T00Z.csv.gz"]
    assert gzip.decompress((tmp_path / "host-2026-11-30T23Z.csv.gz").read_bytes()) == b"a\r\n1\r\n"
    assert gzip.decompress((tmp_path / "host-2026-12-01T00Z.csv.gz").read_bytes()) == b"a\r\n2\r\n3\r\n"


def test_a_failed_write_leaves_the_file_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = HourlyCsv(tmp_path, "host", ["a"])
    f.append(T0, [[1]])
    path = tmp_path / "host-2026-12-01T00Z.csv"
    size = path.stat().st_size

    def full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        f.append(T0 + 10, [[2]])
    monkeypatch.undo()
    assert path.stat().st_size == size
    f.append(T0 + 20, [[3]])
    f.finish()
    assert gzip.decompress((tmp_path / "host-2026-12-01T00Z.csv.gz").read_bytes()) == b"a\r\n1\r\n3\r\n"


# -- skipped samples, guests coming and going --------------------------------------------


class Scripted:
    """A GuestSource that returns prepared snapshots, one list per call."""

    def __init__(self, calls: list[Sequence[GuestSnapshot]]) -> None:
        self.calls = calls

    def snapshot(self) -> Sequence[GuestSnapshot]:
        if not self.calls:
            raise HypervisorError("libvirt at test is unreachable")
        return self.calls.pop(0)


def fresh(g: GuestSnapshot, at_s: float, **stats: int) -> GuestSnapshot:
    assert g.stats is not None
    return replace(g, stats=replace(g.stats, last_update_s=at_s, **stats))


def test_missing_stale_and_unreadable_samples_are_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = snapshot(max_kib=4 * GIB, actual_kib=4 * GIB, total=3 * GIB, available=2 * GIB, doo=False)
    a, b = replace(base, uuid="a", name="a"), replace(base, uuid="b", name="b")
    no_stats = replace(b, stats=None)
    now = [T0]
    calls: list[Sequence[GuestSnapshot]] = [
        [fresh(a, T0)],  # b not there yet
        [fresh(a, T0 + 10), no_stats],  # b appears, without stats
        [fresh(a, T0 + 10), fresh(b, T0 + 20)],
        [fresh(a, T0 - 1000)],  # a's stats are stale; b is gone
    ]
    rec = Recorder(Scripted(calls), hv_host(), tmp_path, rules=GuardConfig(), interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="overcommitd.record"):
        for _ in range(5):  # the fifth call finds libvirt unreachable
            rec.sample()
            now[0] += 10
        rec.close()
    rows = [(float(r[tf.TIME_S]) - T0, r[tf.GUEST]) for r in guest_rows(tmp_path)]
    assert rows == [(0, "a"), (10, "a"), (20, "a"), (20, "b")]
    skipped = json.loads((tmp_path / MANIFEST).read_text())["skipped_samples"]
    assert skipped == {"*": {"hypervisor-unreachable": 1}, "a": {"stale-stats": 1}, "b": {"missing-stats": 1}}
    text = caplog.text
    assert "guest b: sample skipped (missing-stats)" in text and "guest a: sample skipped (stale-stats)" in text
    assert "3 samples skipped" in text


def hv_host() -> SimHypervisor:
    return sim(False)


def test_swap_rates_come_from_the_guests_cumulative_counters(tmp_path: Path) -> None:
    g = snapshot(max_kib=4 * GIB, actual_kib=4 * GIB, total=3 * GIB, available=2 * GIB, doo=False)
    calls: list[Sequence[GuestSnapshot]] = [
        [fresh(g, T0, swap_in_kib=100, swap_out_kib=0)],
        [fresh(g, T0 + 10, swap_in_kib=600, swap_out_kib=200)],
        [fresh(g, T0 + 10, swap_in_kib=600, swap_out_kib=200)],  # no newer stats sample yet
        [fresh(g, T0 + 20, swap_in_kib=0, swap_out_kib=0)],  # the guest rebooted
    ]
    now = [T0]
    rec = Recorder(Scripted(calls), hv_host(), tmp_path, rules=GuardConfig(), interval_s=10, clock=lambda: now[0])
    for _ in range(4):
        rec.sample()
        now[0] += 10
    rec.close()
    rates = [(r[tf.SWAP_IN_KIB_S], r[tf.SWAP_OUT_KIB_S]) for r in guest_rows(tmp_path)]
    assert rates == [("", ""), ("50.0", "20.0"), ("50.0", "20.0"), ("", "")]
    assert guest_rows(tmp_path)[1]["stat_swap_in_kib"] == "600"


# -- read-only --------------------------------------------------------------------------


def test_the_recorder_never_sets_a_target(tmp_path: Path) -> None:
    hv = sim(False, True, cls=NoTargets)
    guests = ReadOnlyGuests(hv)
    assert not hasattr(guests, "set_target") and not hasattr(guests, "__dict__")
    rec = recorder(hv, tmp_path)
    for demand in (1.0, 3.5, 0.5, 3.9):  # bursts a controller would act on
        advance(hv, 30, demand)
        rec.sample()
    rec.close()
    assert hv.targets_set == 0 and hv.last_target_kib == [None, None]
    assert len(guest_rows(tmp_path)) == 8


def test_the_cli_opens_libvirt_read_only_so_libvirt_refuses_targets() -> None:
    hv = LibvirtHypervisor(LibvirtConfig(uri="test:///default", enable_stats_period_s=5), read_only=True)
    hv.connect()
    try:
        (guest,) = hv.snapshot()
        with pytest.raises(HypervisorError, match="read only"):
            hv.set_target(guest.uuid, guest.max_kib // 2)
        assert hv.calls["setMemoryStatsPeriod"] == 0  # not even the stats period is changed
    finally:
        hv.close()


# -- the command ------------------------------------------------------------------------


def record_command(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[libvirt]\nuri = "test:///default"\n[runner]\nlog_format = "text"\n')
    return subprocess.Popen(
        [sys.executable, "-m", "overcommitd", "record", "--config", str(cfg), "--out", str(tmp_path / "out"), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_closes_the_recording_cleanly(tmp_path: Path) -> None:
    proc = record_command(tmp_path, "--interval-s", "0.2")
    out = tmp_path / "out"
    deadline = time.monotonic() + 60
    while not list(out.glob("host-*.csv")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "recording stopped" in err
    assert not list(out.glob("*.csv"))  # every hour compressed on the way out
    (host,) = out.glob("host-*.csv.gz")
    rows = read_rows(host)  # a valid gzip file, read to the end
    manifest = json.loads((out / MANIFEST).read_text())
    assert len(rows) == manifest["host_rows"] >= 2
    # test:/// guests send no balloon stats: every sample of "test" is skipped, and said so.
    assert manifest["skipped_samples"]["test"]["missing-stats"] >= 2
    assert "guest test: sample skipped (missing-stats)" in err


def test_hours_ends_the_recording_by_itself(tmp_path: Path) -> None:
    proc = record_command(tmp_path, "--interval-s", "0.25", "--hours", str(1.0 / 3600))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    # Samples at 0, 0.25, 0.5, 0.75 and 1.0 s on the monotonic schedule; the next would be past the hour's end.
    assert manifest["host_rows"] == 5
    assert manifest["last_sample_s"] - manifest["started_s"] >= 0.9  # it kept the interval, not a burst


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    proc = record_command(tmp_path, "--interval-s", "0")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "--interval-s" in err and "must be > 0" in err
    assert not (tmp_path / "out").exists()


def test_csv_cells_round_trip(tmp_path: Path) -> None:
    f = HourlyCsv(tmp_path, "guests", ["guest", "x"])
    f.append(T0, [['we"ird,name', 1.5]])
    f.finish()
    with gzip.open(tmp_path / "guests-2026-12-01T00Z.csv.gz", "rt") as fh:
        assert list(csv.reader(io.StringIO(fh.read()))) == [["guest", "x"], ['we"ird,name', "1.5"]]


def test_the_unit_is_a_sandboxed_simple_service_that_writes_only_its_state_directory() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "overcommitd" / "systemd" / "overcommitd-record.service")
    svc = unit["Service"]
    assert svc["Type"] == "simple" and svc["ProtectSystem"] == "strict" and svc["KillSignal"] == "SIGTERM"
    assert svc["StateDirectory"] == "overcommitd/recordings" and "ReadWritePaths" not in svc
    assert svc["CapabilityBoundingSet"] == "" and svc["NoNewPrivileges"] == "true"
    # The command line systemd runs is one the CLI accepts, with the args from the environment.
    argv = shlex.split(
        svc["ExecStart"]
        .replace("${STATE_DIRECTORY}", "/var/lib/overcommitd/recordings")
        .replace("$OVERCOMMITD_RECORD_ARGS", "--interval-s 30 --hours 168")
    )
    assert argv[0].endswith("/overcommitd")
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_record and args.out == Path("/var/lib/overcommitd/recordings")
    assert (args.interval_s, args.hours) == (30.0, 168.0)


def test_run_keeps_recording_through_failed_writes_and_counts_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hv = sim(False)
    advance(hv, 30)
    rec = recorder(hv, tmp_path)
    rec.interval_s = 0.05
    real_fsync, failures = os.fsync, [2]

    def flaky(fd: int) -> None:  # the disk is full for the first two writes
        if failures[0] > 0:
            failures[0] -= 1
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky)
    rec.run(threading.Event(), hours=0.5 / 3600)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["skipped_samples"] == {"*": {"write-failed": 2}}
    assert manifest["guest_rows"] == len(guest_rows(tmp_path)) >= 5


def test_guests_excluded_from_ballooning_are_still_recorded() -> None:
    import libvirt

    from overcommitd.hypervisor import libvirt_xml as lx

    conn = libvirt.open("test:///default")  # the test driver's state is shared within the process
    dom = conn.lookupByName("test")

    def exclude(yes: bool) -> None:
        element = lx.metadata_element(lx.GuestMetadata(0, 1.0, yes))
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, element, lx.PREFIX, lx.NAMESPACE, 1)

    exclude(True)
    try:
        seen = {}
        for include in (False, True):
            hv = LibvirtHypervisor(LibvirtConfig(uri="test:///default"), read_only=True, include_excluded=include)
            hv.connect()
            seen[include] = [g.name for g in hv.snapshot()]
            hv.close()
        assert seen == {False: [], True: ["test"]}
    finally:
        exclude(False)
        conn.close()


cells = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20),
)


@given(st.lists(st.lists(cells, min_size=3, max_size=3), max_size=20))
def test_whatever_the_cells_hold_the_hours_file_reads_back_the_same(rows: list[list[object]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        w = HourlyCsv(Path(tmp), "guests", ["a", "b", "c"])
        for i, row in enumerate(rows):
            w.append(T0 + i, [row])  # type: ignore[list-item]
        w.finish()
        packed = list(Path(tmp).glob("*.csv.gz"))
        text = gzip.decompress(packed[0].read_bytes()).decode() if packed else ""
    expected = [["a", "b", "c"]] * bool(rows) + [["" if c is None else str(c) for c in row] for row in rows]
    assert list(csv.reader(io.StringIO(text, newline=""))) == expected


def test_the_kept_recording_of_real_guests_follows_their_schedule() -> None:
    """The recording tests/realguest/test_record_realguest.py made and the repo keeps for
    replays: the same checks, on the committed files (no guests needed); and today's
    demand_kib, fed the real kernels' raw stats from those rows, still gives their used_kib."""
    from tests.realguest.recording import check_guest, load_steps, recording_dir, rows_of

    directory = recording_dir()
    work, balloon = load_steps(directory)
    rows = rows_of(directory)
    assert set(rows) == set(work) == {"rec-plain", "rec-doo"}
    for name, guest_rows_ in rows.items():
        check_guest(name, guest_rows_, work[name], balloon)
    assert {r[tf.DEFLATE_ON_OOM] for r in rows["rec-doo"]} == {"1"}
    for r in rows["rec-plain"] + rows["rec-doo"]:
        g = snapshot(
            max_kib=int(r[tf.PROVISIONED_KIB]),
            actual_kib=int(r[tf.ACTUAL_KIB]),
            total=int(r["stat_total_memory_kib"]),
            available=int(r["stat_available_memory_kib"]),
            doo=r[tf.DEFLATE_ON_OOM] == "1",
        )
        assert demand_kib(g) == int(r[tf.USED_KIB]), r


def test_record_reads_qmp_guests_and_never_sets_their_balloon(tmp_path: Path) -> None:
    """Proxmox and plain QEMU hosts: the QMP backend's snapshot, nothing else. Two scripted
    QEMU monitors (tests/qmp_server.py), one with DEFLATE_ON_OOM and a balloon of 200 MiB."""
    from tests.qmp_server import MIB as QMP_MIB
    from tests.qmp_server import FakeQemuHost, stats_reply

    def stats(available_mib: int) -> object:
        return stats_reply(
            int(time.time()) + 60,
            free_memory=available_mib * QMP_MIB,
            total_memory=1000 * QMP_MIB,
            available_memory=available_mib * QMP_MIB,
        )

    sock_dir = Path(tempfile.mkdtemp(prefix="recq", dir="/tmp"))  # unix socket paths must stay short
    qemu = FakeQemuHost(sock_dir)
    try:
        qemu.add("101", name="web", uuid="aaaaaaaa-0000-0000-0000-000000000001", guest_stats=stats(850))
        # DEFLATE_ON_OOM: the balloon's 200 MiB stay in MemTotal as used memory.
        db = qemu.add("102", name="db", uuid="aaaaaaaa-0000-0000-0000-000000000002", guest_stats=stats(600))
        db.actual = 824 * QMP_MIB
        db.props["deflate-on-oom"] = True
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[hypervisor]\nbackend = "qmp"\n[qmp]\nsocket_glob = "{sock_dir}/*.qmp"\n')
        out = tmp_path / "out"
        argv = ["record", "--config", str(cfg), "--out", str(out), "--interval-s", "0.5", "--hours", "0.0008"]
        assert cmd_record(build_parser().parse_args(argv)) == 0
        commands = [c for g in qemu.guests.values() for c in g.log]
    finally:
        qemu.close()
    assert "balloon" not in commands and "query-balloon" in commands
    rows = []
    for p in sorted(out.glob("guests-*")):
        with gzip.open(p, "rt") if p.suffix == ".gz" else p.open() as f:
            rows += list(csv.DictReader(f))
    assert {row[tf.GUEST]: int(row[tf.USED_KIB]) for row in rows} == {"web": 150 * 1024, "db": 200 * 1024}
    assert len(rows) >= 4  # at least two samples of each guest


def test_systemd_analyze_verifies_the_unit_and_rates_it_ok(tmp_path: Path) -> None:
    """Both offline, no running systemd needed; verify wants ExecStart's binary to exist."""
    need_binaries("systemd-analyze")
    unit = REPO / "overcommitd" / "systemd" / "overcommitd-record.service"
    copy = tmp_path / unit.name
    copy.write_text(
        unit.read_text().replace("/usr/local/bin/overcommitd", str(Path(sys.executable).parent / "overcommitd"))
    )
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    found = re.search(r"Overall exposure level for overcommitd-record.service: (\d+\.\d+)", security.stdout)
    assert found and float(found.group(1)) < 2.5, security.stdout + security.stderr


def test_a_replay_of_the_real_recording_follows_what_the_guests_did() -> None:
    """Issue 14's end to end: the real guests' recording, replayed through the simulator
    (the trace reader, the workload, the simulated guests), holds each guest's workload as
    the guest did: baseline plus the scheduled MiB in every settled phase, under a policy
    that never balloons, so what the replayed guests hold is the recording alone. The
    replay reads a sample's demand one tick late (issue 16 item 4): SETTLE_S covers it."""
    from overcommitd.config import DaemonConfig
    from sim.evaluation.compare import NoBalloon
    from sim.evaluation.replay import ReplaySpec, replay
    from tests.realguest.recording import MIB as REC_MIB
    from tests.realguest.recording import TOLERANCE_KIB, load_steps, recording_dir, rows_of, work_at

    directory = recording_dir()
    work, balloon = load_steps(directory)
    rows = rows_of(directory)
    interval_s = 2.0
    spec = ReplaySpec(traces=(directory,), hours=None, warmup_h=0.0, interval_s=interval_s, reporting_share=0.0)
    result = replay(spec, NoBalloon(), DaemonConfig(interval_s=interval_s))
    demand = np.vstack(result.timeline.demand_kib)  # ticks x guests, in the order of the names
    for g, name in enumerate(result.guest_names):
        guest = name.split("-", 1)[1]  # g000-rec-doo: the recorded guest
        first_s = min(float(r[tf.TIME_S]) for r in rows[guest])
        times = [first_s + t for t in result.timeline.t_s]
        idle = [d for t, d in zip(times, demand[:, g], strict=True) if work_at(work[guest], t) == 0]
        baseline = float(np.median(idle))
        phases = set()
        for t, d in zip(times, demand[:, g], strict=True):
            mib = work_at(work[guest], t)
            # As the recording's own check: not while the workload or the balloon moves (a
            # DEFLATE_ON_OOM guest's stats and balloon size may come from two moments then).
            moving = work_at(balloon, t) is None and t >= balloon[0].begins_s
            if mib is None or moving or t > max(float(r[tf.TIME_S]) for r in rows[guest]):
                continue
            assert abs(d - baseline - mib * REC_MIB) <= TOLERANCE_KIB, (guest, t - first_s, d, baseline, mib)
            phases.add(mib)
        assert phases == {0, 150, 60, 200}, (guest, phases)  # every phase the guest went through was replayed
    assert result.scorecard.oom_kills == 0
