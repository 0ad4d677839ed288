"""The daemon says "host short by N GiB" (log, Prometheus, MQTT, status) on a simulated
host whose guests' working sets exceed its RAM, and says when it has room again."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from overcommitd import status as status_doc
from overcommitd.config import DaemonConfig
from overcommitd.hypervisor import HypervisorError
from overcommitd.runner import Daemon
from overcommitd.telemetry import messages as msg
from policies import registry
from sim.memory.guest import GuestSpec
from sim.memory.hypervisor import SimHypervisor
from tests.mqtt_probe import Probe
from tests.realguest.harness import Mosquitto

GIB = 1024**2
GUESTS = 3
RAM_KIB = 8 * GIB
HOST_KIB = 18 * GIB  # 2 GiB for the simulated host's base, 16 for 24 GiB of guests


class ManagedSim(SimHypervisor):
    """The simulator behind the daemon: what ``ManagedHypervisor`` asks beyond the loop's
    Hypervisor, as plumbing (no libvirt connection, no floors to write)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.errors: Counter[str] = Counter()

    def connect(self) -> None:
        pass

    def close(self) -> None:
        pass

    def set_floor(self, name_or_uuid: str, floor_kib: int) -> str:
        raise HypervisorError("the simulator keeps no floors")

    def return_to_max(self) -> int:
        return 0


def said(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The shortfall's own log lines (other loggers may log too, as another test set them)."""
    return [r for r in caplog.records if r.name == "overcommitd.shortfall"]


def demand(gib: float) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.full(GUESTS, gib * GIB)


def sim(demand_gib: float) -> ManagedSim:
    specs = [GuestSpec(uuid=f"u{i}", name=f"short{i}", ram_kib=RAM_KIB) for i in range(GUESTS)]
    hv = ManagedSim(specs, host_mem_kib=HOST_KIB, initial_demand_kib=demand(demand_gib), stats_period_s=5.0)
    hv.advance(30.0, demand(demand_gib), np.zeros(GUESTS))
    return hv


def daemon(tmp_path: Path, hv: ManagedSim, extra: str = "") -> Daemon:
    path = tmp_path / "overcommitd.toml"
    path.write_text(
        f'interval_s = 0.5\n[policy]\nname = "tests.helpers:Noop"\n[runner]\nlog_format = "text"\n'
        f'status_socket = ""\n{extra}'
    )
    return Daemon(DaemonConfig.load(path), hv, hv, config_path=path, make_policy=registry.create)


def expected_short_kib(hv: ManagedSim, d: Daemon) -> int:
    """From the simulator's own state: the guests' memory in use (what MemAvailable does not
    cover) and the configured least host own use, beyond host RAM."""
    f = hv.fleet
    used_by_guests = float((f.actual() - f.mem_available()).sum())
    return max(int(used_by_guests + d.cfg.host.own_min_kib(GUESTS) - HOST_KIB), 0)


def test_the_daemon_says_how_short_the_host_is_once_and_when_it_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hv = sim(7.0)  # 21 GiB of working sets on 16 GiB for guests
    d = daemon(tmp_path, hv)
    caplog.set_level(logging.INFO, logger="overcommitd.shortfall")
    reports = []
    for k in range(3):
        hv.advance(40.0 + 10 * k, demand(7.0), np.zeros(GUESTS))
        reports.append(asyncio.run(d.tick()))
    s = reports[-1].shortfall
    assert s is not None
    # at least the workloads beyond the host (21 GiB + its own on 18), at most that plus each guest's kernel
    workloads_kib = 21 * GIB + d.cfg.host.own_min_kib(GUESTS) - HOST_KIB
    assert workloads_kib <= s.short_kib <= workloads_kib + GUESTS * GIB
    assert abs(s.short_kib - expected_short_kib(hv, d)) <= GUESTS  # KiB rounding of the stats
    events = [r.__dict__["event"] for r in said(caplog)]
    assert events == ["host-short"]  # said once, not per tick
    first = reports[0].shortfall
    assert first is not None and said(caplog)[0].getMessage().startswith(f"{first.text()}: no balloon can help")

    sample = d.metrics.registry.get_sample_value("overcommitd_host_short_bytes")
    assert sample == s.short_kib * 1024
    assert b"overcommitd_host_short_bytes" in generate_latest(d.metrics.registry)
    assert d.last_status is not None and d.last_status.host_short_kib == s.short_kib
    table = status_doc.table(d.last_status)
    assert f"host short by {s.short_gib:.1f} GiB: no balloon can help" in table.splitlines()[1]
    again = status_doc.DaemonStatus.model_validate_json(d.status_document())
    assert again.host_short_kib == s.short_kib

    for k in range(3):  # the workloads shrink to 3 GiB each: room again
        hv.advance(100.0 + 10 * k, demand(3.0), np.zeros(GUESTS))
        report = asyncio.run(d.tick())
    assert report.shortfall is not None and report.shortfall.short_kib == 0
    assert [r.__dict__["event"] for r in said(caplog)] == ["host-short", "host-short-recovered"]
    assert d.metrics.registry.get_sample_value("overcommitd_host_short_bytes") == 0
    assert d.last_status is not None and "host short" not in status_doc.table(d.last_status)


def test_a_host_with_room_is_never_short(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hv = sim(4.0)  # 12 GiB of working sets on 16
    d = daemon(tmp_path, hv)
    caplog.set_level(logging.INFO, logger="overcommitd.shortfall")
    report = asyncio.run(d.tick())
    assert report.shortfall is not None and report.shortfall.short_kib == 0
    assert report.shortfall.need_kib >= 12 * GIB
    assert not said(caplog)


def test_excluded_guests_count_at_their_size(tmp_path: Path) -> None:
    hv = sim(4.0)
    overrides = "".join(f"[guests.short{i}]\nexclude = true\n" for i in range(GUESTS))
    d = daemon(tmp_path, hv, overrides)
    report = asyncio.run(d.tick())
    assert report.shortfall is not None
    assert report.shortfall.need_kib == GUESTS * RAM_KIB and report.shortfall.guests_at_size == GUESTS
    assert report.shortfall.short_kib == GUESTS * RAM_KIB + d.cfg.host.own_min_kib(GUESTS) - HOST_KIB


def test_the_shortfall_goes_to_mqtt_as_a_retained_host_message(tmp_path: Path, broker: Mosquitto) -> None:
    hv = sim(7.0)
    extra = f'[mqtt]\nenabled = true\nport = {broker.port}\nhost_id = "shorthost"\nreconnect_min_s = 0.1\n'
    d = daemon(tmp_path, hv, extra)

    async def scenario() -> dict[str, Any]:
        async with Probe(broker.port, "overcommitd/shorthost/host/shortfall") as probe:
            task = asyncio.create_task(d.run())
            body = await probe.wait_for(lambda t, b: b.get("short") is True, what="a shortfall message")
            d.stopping.set()
            await asyncio.wait_for(task, 30)
        async with Probe(broker.port, "overcommitd/shorthost/host/shortfall") as late:  # retained
            await late.wait_for(lambda t, b: True, what="the retained shortfall")
            assert late.messages[0][2] is True
        return body  # type: ignore[no-any-return]

    body = asyncio.run(scenario())
    m = msg.ShortfallMessage.model_validate(body)  # strict: every field, nothing more
    assert m.short_kib > 3 * GIB and m.text == f"host short by {m.short_kib / GIB:.1f} GiB"
    assert m.mem_total_kib == HOST_KIB and m.need_kib > 21 * GIB
    with pytest.raises(ValueError):
        msg.ShortfallMessage.model_validate({**body, "extra": 1})


def test_a_reload_applies_a_new_host_reserve_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hv = sim(4.0)  # 12 GiB of working sets on 16 for guests: room
    d = daemon(tmp_path, hv)
    before = asyncio.run(d.tick()).shortfall
    assert before is not None and before.short_kib == 0
    assert d.config_path is not None
    d.config_path.write_text(d.config_path.read_text() + '[host]\nreserve_kib = "6GiB"\n')
    caplog.set_level(logging.INFO)
    d.reload()
    after = asyncio.run(d.tick()).shortfall
    assert after is not None and after.host_own_kib == 6 * GIB + d.cfg.host.guest_overhead_kib * GUESTS
    assert after.short_kib == after.host_own_kib + after.need_kib - HOST_KIB > 0
    assert not [r for r in caplog.records if "after a restart" in r.getMessage()]
    assert "reserve_kib" in " ".join(r.getMessage() for r in caplog.records if "reloaded" in r.getMessage())
