"""Plumbing of the libvirt backend against libvirt's test driver (its stats are
synthetic, so nothing here is about balloons converging: see tests/realguest/)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from overcommitd.config import LibvirtConfig
from overcommitd.hypervisor import HypervisorError
from overcommitd.hypervisor.libvirt import GuestEvent, LibvirtHypervisor, NoSuchGuest
from overcommitd.model import RunState

NODE = Path(__file__).parent / "data" / "testnode.xml"
PLAIN, AUTO = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"


class Events:
    def __init__(self) -> None:
        self.seen: list[GuestEvent] = []
        self.cond = threading.Condition()

    def __call__(self, e: GuestEvent) -> None:
        with self.cond:
            self.seen.append(e)
            self.cond.notify_all()

    def wait_for(self, pred, timeout_s: float = 10) -> GuestEvent:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                hit = next((e for e in self.seen if pred(e)), None)
                if hit or time.monotonic() > deadline:
                    assert hit, f"no matching event in {self.seen}"
                    return hit
                self.cond.wait(0.1)


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def hv(events: Events) -> Iterator[LibvirtHypervisor]:
    h = LibvirtHypervisor(LibvirtConfig(uri=f"test://{NODE}", enable_stats_period_s=2), on_event=events)
    h.connect()
    yield h
    h.close()


def by_uuid(hv: LibvirtHypervisor):  # type: ignore[no-untyped-def]
    return {g.uuid: g for g in hv.snapshot()}


def test_snapshot_reads_sizes_features_and_metadata(hv: LibvirtHypervisor) -> None:
    guests = by_uuid(hv)
    plain, auto = guests[PLAIN], guests[AUTO]
    assert (plain.name, plain.max_kib, plain.actual_kib, plain.run_state) == (
        "plain",
        2 * 1024**2,
        2 * 1024**2,
        RunState.RUNNING,
    )
    assert not plain.features.deflate_on_oom and plain.floor_kib == 0 and plain.weight == 1.0
    assert (auto.max_kib, auto.actual_kib, auto.floor_kib, auto.weight) == (4 * 1024**2, 3 * 1024**2, 768 * 1024, 2.0)
    assert auto.features.deflate_on_oom and auto.features.reporting
    assert auto.stats_period_s == 5 and plain.stats_period_s == 2  # polling enabled where it was off
    assert plain.stats is None  # the test driver has no balloon stats in the bulk call


def test_stats_come_from_one_bulk_call_and_xml_is_read_once(hv: LibvirtHypervisor) -> None:
    hv.snapshot()
    first = dict(hv.calls)
    assert first["getAllDomainStats"] == 1 and first["XMLDesc"] == 2 and first["setMemoryStatsPeriod"] == 1
    hv.snapshot()
    delta = {k: v - first.get(k, 0) for k, v in hv.calls.items() if v != first.get(k, 0)}
    # The test driver lacks bulk balloon stats, so it alone costs one info() per guest.
    assert delta == {"getAllDomainStats": 1, "info": 2}


def test_set_target_is_recorded_and_applied(hv: LibvirtHypervisor) -> None:
    hv.snapshot()
    hv.set_target(PLAIN, 1024 * 1024)
    g = by_uuid(hv)[PLAIN]
    assert (g.last_target_kib, g.actual_kib) == (1024 * 1024, 1024 * 1024)


def test_target_above_maximum_is_refused_with_libvirts_reason(hv: LibvirtHypervisor) -> None:
    hv.snapshot()
    with pytest.raises(HypervisorError, match="max memory"):
        hv.set_target(PLAIN, 3 * 1024**2)
    assert hv.target_kib(PLAIN) is None and hv.errors["setMemoryFlags"] == 1


def test_set_floor_writes_our_metadata_and_keeps_the_weight(hv: LibvirtHypervisor, events: Events) -> None:
    hv.snapshot()
    assert hv.set_floor("autodeflate", 1024 * 1024) == AUTO
    g = by_uuid(hv)[AUTO]
    assert (g.floor_kib, g.weight) == (1024 * 1024, 2.0)
    with pytest.raises(NoSuchGuest, match="nope"):
        hv.set_floor("nope", 1)


def test_paused_guest_is_reported_paused_and_the_event_arrives(hv: LibvirtHypervisor, events: Events) -> None:
    hv.snapshot()
    hv._domains[PLAIN].suspend()
    events.wait_for(lambda e: e.kind == "lifecycle" and e.uuid == PLAIN and e.detail.startswith("suspended"))
    assert by_uuid(hv)[PLAIN].run_state is RunState.PAUSED
    hv._domains[PLAIN].resume()
    assert by_uuid(hv)[PLAIN].run_state is RunState.RUNNING


def test_destroyed_guest_disappears_and_its_target_fails_cleanly(hv: LibvirtHypervisor) -> None:
    hv.snapshot()
    hv.set_target(PLAIN, 1024 * 1024)
    hv._domains[PLAIN].destroy()
    with pytest.raises(HypervisorError):
        hv.set_target(PLAIN, 1024 * 1024)
    assert PLAIN not in by_uuid(hv) and hv.target_kib(PLAIN) is None


def test_return_to_max_deflates_every_guest(hv: LibvirtHypervisor) -> None:
    hv.snapshot()
    hv.set_target(PLAIN, 1024 * 1024)
    assert hv.return_to_max() == 2
    guests = by_uuid(hv)
    assert all(g.actual_kib == g.max_kib for g in guests.values())


def test_unreachable_libvirt_backs_off_between_attempts(tmp_path: Path) -> None:
    now = [100.0]
    hv = LibvirtHypervisor(
        LibvirtConfig(uri=f"qemu:///system?socket={tmp_path}/none", reconnect_min_s=5), clock=lambda: now[0]
    )
    with pytest.raises(HypervisorError, match="Is libvirtd running"):
        hv.snapshot()
    with pytest.raises(HypervisorError, match="next attempt in 5.0 s"):
        hv.snapshot()
    assert hv.calls["open"] == 1
    now[0] += 5
    with pytest.raises(HypervisorError, match="Is libvirtd running"):
        hv.snapshot()
    assert hv.calls["open"] == 2
    with pytest.raises(HypervisorError, match="next attempt in 10.0 s"):  # doubled
        hv.snapshot()


def test_libvirt_module_is_the_real_one() -> None:
    assert hasattr(libvirt, "virEventRegisterDefaultImpl")
