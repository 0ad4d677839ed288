"""The QMP backend against scripted QMP servers (tests/qmp_server.py): identity, stats in
KiB, targets in bytes, events, errors, a server that stops answering, a socket that
disappears or is replaced, reconnects, Proxmox floors, and the daemon's tick through it."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overcommitd.config import DaemonConfig, QmpConfig
from overcommitd.host import HostPaths, ProcHostReader
from overcommitd.hypervisor import FloorAboveMaximum, GuestEvent, NoSuchGuest
from overcommitd.hypervisor.qmp import QmpHypervisor
from overcommitd.model import RunState
from overcommitd.runner import Daemon
from policies import registry
from tests.qmp_server import MIB, FakeQemuHost, stats_reply

UUID_A = "aaaaaaaa-0000-0000-0000-00000000000a"
UUID_B = "bbbbbbbb-0000-0000-0000-00000000000b"


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="qmpt", dir="/tmp"))  # unix socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def qemu(sock_dir: Path) -> Iterator[FakeQemuHost]:
    host = FakeQemuHost(sock_dir)
    yield host
    host.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def events() -> list[GuestEvent]:
    return []


def make_hv(sock_dir: Path, clock: Clock, events: list[GuestEvent], *, keep_connected: bool) -> QmpHypervisor:
    cfg = QmpConfig(
        socket_glob=str(sock_dir / "*.qmp"),
        pve_conf_dir=sock_dir / "pve",
        call_timeout_s=1.5,  # generous: a loaded CI machine must not time out a guest that answers
        keep_connected=keep_connected,
    )
    h = QmpHypervisor(cfg, on_event=events.append, clock=clock)
    h.connect()
    return h


@pytest.fixture(params=[True, False], ids=["held-sessions", "brief-sessions"])
def hv(
    request: pytest.FixtureRequest, sock_dir: Path, clock: Clock, events: list[GuestEvent]
) -> Iterator[QmpHypervisor]:
    """Both session modes: every test using this fixture holds for each."""
    h = make_hv(sock_dir, clock, events, keep_connected=request.param)
    yield h
    h.close()


@pytest.fixture
def held(sock_dir: Path, clock: Clock, events: list[GuestEvent]) -> Iterator[QmpHypervisor]:
    """keep_connected = true: sessions stay open and events arrive between ticks."""
    h = make_hv(sock_dir, clock, events, keep_connected=True)
    yield h
    h.close()


@pytest.fixture
def brief(sock_dir: Path, clock: Clock, events: list[GuestEvent]) -> Iterator[QmpHypervisor]:
    """keep_connected = false (the default): one session per operation."""
    h = make_hv(sock_dir, clock, events, keep_connected=False)
    yield h
    h.close()


def by_name(hv: QmpHypervisor) -> dict[str, Any]:
    return {g.name: g for g in hv.snapshot()}


def wait_until(pred: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- reading ----------------------------------------------------------------------------------


def test_snapshot_translates_bytes_to_kib_and_switches_polling_on(qemu: FakeQemuHost, hv: QmpHypervisor) -> None:
    fake = qemu.add("101", name="web", uuid=UUID_A.upper(), base_memory=2048 * MIB, actual=1536 * MIB)
    fake.props["deflate-on-oom"] = True
    fake.guest_stats = stats_reply(
        1_700_000_123, free_memory=300 * MIB, available_memory=700 * MIB, total_memory=1400 * MIB, major_faults=7
    )
    g = by_name(hv)["web"]
    assert (g.uuid, g.max_kib, g.actual_kib) == (UUID_A, 2048 * 1024, 1536 * 1024)
    assert g.stats.mem_available_kib == 700 * 1024 and g.stats.mem_free_kib == 300 * 1024
    assert g.stats.major_faults == 7 and g.stats.last_update_s == 1_700_000_123.0
    assert g.features.deflate_on_oom and not g.features.reporting
    assert g.run_state is RunState.RUNNING and g.stats_period_s == 2.0
    assert fake.props["guest-stats-polling-interval"] == 2 and "qom-set" in fake.log


def test_balloon_is_found_among_anonymous_devices_and_missing_one_means_no_guest(
    qemu: FakeQemuHost, hv: QmpHypervisor
) -> None:
    qemu.add("anon", name="anon", balloon_parent="/machine/peripheral-anon", balloon_id="device[3]")
    qemu.add("none", name="noballoon", balloon_parent=None)
    guests = by_name(hv)
    assert set(guests) == {"anon"}
    assert qemu.guests["anon"].props["guest-stats-polling-interval"] == 2


def test_identity_falls_back_to_the_socket_name(qemu: FakeQemuHost, hv: QmpHypervisor) -> None:
    qemu.add("205", name=None)  # no -name, default all-zero UUID
    (g,) = hv.snapshot()
    assert (g.name, g.uuid) == ("205", "205")


def _tick_commands(qemu: FakeQemuHost, hv: QmpHypervisor) -> tuple[int, dict[str, list[str]]]:
    for i in range(3):
        qemu.add(f"g{i}", name=f"g{i}", uuid=f"{i:08d}-0000-0000-0000-000000000001")
    hv.snapshot()  # connects and probes
    before = sum(hv.calls.values())
    logs_before = {k: len(g.log) for k, g in qemu.guests.items()}
    assert len(hv.snapshot()) == 3
    return sum(hv.calls.values()) - before, {k: g.log[logs_before[k] :] for k, g in qemu.guests.items()}


def test_a_tick_costs_two_commands_per_guest_with_held_sessions(qemu: FakeQemuHost, held: QmpHypervisor) -> None:
    sent, received = _tick_commands(qemu, held)
    assert sent == 6
    assert all(sorted(cmds) == ["qom-get", "query-balloon"] for cmds in received.values())


def test_brief_sessions_cost_four_commands_and_leave_the_socket_free(qemu: FakeQemuHost, brief: QmpHypervisor) -> None:
    sent, received = _tick_commands(qemu, brief)
    assert sent == 12
    for cmds in received.values():
        assert cmds[:2] == ["qmp_capabilities", "query-status"]
        assert sorted(cmds[2:]) == ["qom-get", "query-balloon"]
    wait_until(lambda: all(not g._writers for g in qemu.guests.values()))  # nobody connected between ticks
    brief.set_target("00000000-0000-0000-0000-000000000001", 700 * 1024)
    assert qemu.guests["g0"].actual == 700 * MIB and qemu.guests["g0"].log[-1] == "balloon"
    wait_until(lambda: not qemu.guests["g0"]._writers)


def test_brief_sessions_see_a_pause_without_events(qemu: FakeQemuHost, brief: QmpHypervisor) -> None:
    fake = qemu.add("101", name="web", uuid=UUID_A)
    assert by_name(brief)["web"].run_state is RunState.RUNNING
    qemu.call(lambda: setattr(fake, "status", "paused"))  # no STOP event reaches a closed session
    assert by_name(brief)["web"].run_state is RunState.PAUSED


# -- targets and events -----------------------------------------------------------------------


def test_set_target_sends_bytes_and_is_remembered(
    qemu: FakeQemuHost, held: QmpHypervisor, events: list[GuestEvent]
) -> None:
    hv = held
    fake = qemu.add("101", name="web", uuid=UUID_A)
    hv.snapshot()
    hv.set_target(UUID_A, 512 * 1024)
    assert fake.actual == 512 * MIB
    g = by_name(hv)["web"]
    assert g.actual_kib == 512 * 1024 and g.last_target_kib == 512 * 1024 and g.last_target_age_s == 0.0
    wait_until(lambda: any(e.kind == "balloon-change" for e in events))
    assert [e.actual_kib for e in events if e.kind == "balloon-change"] == [512 * 1024]
    with pytest.raises(NoSuchGuest):
        hv.set_target("no-such-uuid", 1024)


def test_stop_resume_and_shutdown_events_set_the_run_state(
    qemu: FakeQemuHost, held: QmpHypervisor, events: list[GuestEvent]
) -> None:
    hv = held
    fake = qemu.add("101", name="web", uuid=UUID_A)
    hv.snapshot()
    qemu.call(lambda: setattr(fake, "status", "paused"))
    qemu.emit("101", "STOP")
    wait_until(lambda: any(e.detail == "stop" for e in events))
    assert by_name(hv)["web"].run_state is RunState.PAUSED
    assert fake.log.count("query-status") == 2  # the probe, and the confirmation after STOP
    qemu.call(lambda: setattr(fake, "status", "postmigrate"))
    qemu.emit("101", "RESUME")  # QEMU's word wins over the event's on the next tick
    wait_until(lambda: any(e.detail == "resume" for e in events))
    assert by_name(hv)["web"].run_state is RunState.MIGRATING
    qemu.call(lambda: setattr(fake, "status", "shutdown"))
    qemu.emit("101", "SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
    wait_until(lambda: any(e.detail == "shutdown" for e in events))
    assert by_name(hv)["web"].run_state is RunState.SHUTTING_DOWN


def test_return_to_max_deflates_every_guest(qemu: FakeQemuHost, hv: QmpHypervisor) -> None:
    a = qemu.add("a", name="a", uuid=UUID_A, actual=300 * MIB)
    b = qemu.add("b", name="b", uuid=UUID_B, actual=400 * MIB)
    hv.snapshot()
    assert hv.return_to_max() == 2
    assert a.actual == a.base_memory and b.actual == b.base_memory


# -- failures ---------------------------------------------------------------------------------


def test_an_error_reply_holds_only_that_guest(qemu: FakeQemuHost, held: QmpHypervisor) -> None:
    hv = held
    bad = qemu.add("a", name="a", uuid=UUID_A)
    qemu.add("b", name="b", uuid=UUID_B)
    hv.snapshot()
    bad.fail["query-balloon"] = ("GenericError", "boom")
    guests = by_name(hv)
    assert guests["a"].run_state is RunState.UNRESPONSIVE and guests["b"].run_state is RunState.RUNNING
    assert hv.errors["query-balloon"] == 1
    del bad.fail["query-balloon"]
    assert by_name(hv)["a"].run_state is RunState.RUNNING  # same session, no reconnect needed
    assert bad.log.count("qmp_capabilities") == 1


def test_a_server_that_stops_answering_is_held_then_reconnected_with_backoff(
    qemu: FakeQemuHost, hv: QmpHypervisor, clock: Clock
) -> None:
    slow = qemu.add("a", name="a", uuid=UUID_A)
    qemu.add("b", name="b", uuid=UUID_B)
    hv.snapshot()
    slow.hang = True
    guests = by_name(hv)  # returns: the silent guest's call timed out
    assert guests["a"].run_state is RunState.UNRESPONSIVE and guests["a"].max_kib == 1024 * 1024
    assert guests["b"].run_state is RunState.RUNNING
    slow.hang = False
    connects = slow.log.count("qmp_capabilities")
    assert by_name(hv)["a"].run_state is RunState.UNRESPONSIVE  # within the backoff: no attempt
    assert slow.log.count("qmp_capabilities") == connects
    clock.now_s += 1.0  # reconnect_min_s
    assert by_name(hv)["a"].run_state is RunState.RUNNING
    assert slow.log.count("qmp_capabilities") == connects + 1


def test_backoff_doubles_while_the_guest_stays_silent(qemu: FakeQemuHost, hv: QmpHypervisor, clock: Clock) -> None:
    slow = qemu.add("a", name="a", uuid=UUID_A)
    hv.snapshot()
    slow.hang = True
    attempts = []
    for _ in range(12):
        hv.snapshot()
        attempts.append(hv.calls["qmp_capabilities"])
        clock.now_s += 1.0
    # retries after 1, 2, 4 s of backoff: attempts at t=1, 3 (1+2), 7 (3+4) and 15 (7+8 > 12: not yet)
    assert attempts[-1] - attempts[0] == 3


def test_a_vanished_socket_is_a_guest_that_left(qemu: FakeQemuHost, hv: QmpHypervisor) -> None:
    qemu.add("a", name="a", uuid=UUID_A)
    qemu.add("b", name="b", uuid=UUID_B)
    hv.snapshot()
    hv.set_target(UUID_A, 600 * 1024)
    qemu.remove("a")
    assert set(by_name(hv)) == {"b"}
    assert hv.target_kib(UUID_A) is None


def test_a_socket_nobody_listens_on_is_a_guest_that_left(qemu: FakeQemuHost, hv: QmpHypervisor, clock: Clock) -> None:
    qemu.add("a", name="a", uuid=UUID_A)
    qemu.add("b", name="b", uuid=UUID_B)
    hv.snapshot()
    hv.set_target(UUID_A, 600 * 1024)
    qemu.run(qemu.guests["a"].stop(unlink=False))  # a killed QEMU leaves its socket file behind
    # A held session that broke is held for one backoff (it may be a hiccup); then the
    # refused reconnect says the guest left.
    guests = by_name(hv)
    assert "a" not in guests or guests["a"].run_state is RunState.UNRESPONSIVE
    clock.now_s += 1.0
    assert set(by_name(hv)) == {"b"}
    assert hv.target_kib(UUID_A) is None
    assert hv.errors["qmp_capabilities"] >= 1


def test_a_replaced_socket_is_a_new_guest(qemu: FakeQemuHost, hv: QmpHypervisor) -> None:
    qemu.add("a", name="a", uuid=UUID_A)
    hv.snapshot()
    hv.set_target(UUID_A, 600 * 1024)
    qemu.remove("a")
    qemu.add("a", name="a", uuid=UUID_A)  # QEMU restarted on the same path before our next tick
    g = by_name(hv)["a"]
    assert g.last_target_kib is None and g.actual_kib == 1024 * 1024


def test_a_target_is_never_sent_to_the_qemu_that_replaced_the_one_decided_for(
    qemu: FakeQemuHost, hv: QmpHypervisor
) -> None:
    qemu.add("a", name="a", uuid=UUID_A)
    hv.snapshot()  # the tick decides for this QEMU...
    qemu.remove("a")
    fresh = qemu.add("a", name="a", uuid=UUID_A)  # ...which is replaced before the target goes out
    with pytest.raises(NoSuchGuest, match="replaced"):
        hv.set_target(UUID_A, 600 * 1024)
    assert "balloon" not in fresh.log


def test_hotplugged_memory_counts_in_the_guests_size(qemu: FakeQemuHost, hv: QmpHypervisor) -> None:
    """Proxmox's memory hotplug: a 1 GiB base and DIMMs; the balloon's maximum is the sum."""
    fake = qemu.add("a", name="a", uuid=UUID_A, base_memory=1024 * MIB, actual=3072 * MIB)
    fake.plugged_memory = 2048 * MIB
    g = by_name(hv)["a"]
    assert (g.max_kib, g.actual_kib) == (3 * 1024 * 1024, 3 * 1024 * 1024)


def test_a_guest_that_refuses_its_probe_is_retried(qemu: FakeQemuHost, hv: QmpHypervisor, clock: Clock) -> None:
    fake = qemu.add("a", name="a", uuid=UUID_A)
    fake.fail["query-memory-size-summary"] = ("GenericError", "not yet")
    assert hv.snapshot() == []
    del fake.fail["query-memory-size-summary"]
    clock.now_s += 1.0
    assert [g.name for g in hv.snapshot()] == ["a"]


# -- floors -----------------------------------------------------------------------------------


def test_proxmox_balloon_minimum_is_the_floor_and_set_floor_overrides_it(
    qemu: FakeQemuHost, hv: QmpHypervisor, sock_dir: Path
) -> None:
    pve = sock_dir / "pve"
    pve.mkdir()
    (pve / "101.conf").write_text("memory: 1024\nballoon: 512\n\n[snap1]\nballoon: 64\n")
    (pve / "102.conf").write_text("memory: 1024\nballoon: 0\n")
    qemu.add("101", name="web", uuid=UUID_A)
    qemu.add("102", name="db", uuid=UUID_B)
    qemu.add("103", name="plain", uuid="cccccccc-0000-0000-0000-00000000000c")
    guests = by_name(hv)
    assert set(guests) == {"web", "plain"}  # balloon: 0 turns ballooning off
    assert guests["web"].floor_kib == 512 * 1024 and guests["plain"].floor_kib == 0
    assert hv.set_floor("web", 700 * 1024) == UUID_A
    assert by_name(hv)["web"].floor_kib == 700 * 1024
    with pytest.raises(NoSuchGuest):
        hv.set_floor("nobody", 1)
    with pytest.raises(FloorAboveMaximum, match="above the guest's maximum"):
        hv.set_floor("web", 1024 * 1024 + 1)
    assert by_name(hv)["web"].floor_kib == 700 * 1024  # the refused floor was never kept


# -- a guest that lies ------------------------------------------------------------------------

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=5),
)
_stat_keys = st.sampled_from(
    ["stat-free-memory", "stat-available-memory", "stat-total-memory", "stat-swap-in", "stat-major-faults", "x"]
)
_json = st.recursive(
    _json_leaf,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
    max_leaves=6,
)
lying_stats = st.one_of(
    _json,
    st.fixed_dictionaries({"stats": st.dictionaries(_stat_keys, _json_leaf), "last-update": _json_leaf}),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reply=lying_stats, actual=_json_leaf)
def test_a_lying_guest_never_crashes_the_backend(
    qemu: FakeQemuHost, hv: QmpHypervisor, clock: Clock, reply: object, actual: object
) -> None:
    fake = qemu.guests.get("liar") or qemu.add("liar", name="liar", uuid=UUID_A)
    fake.guest_stats, fake.actual = reply, actual  # type: ignore[assignment]
    clock.now_s += 120.0  # past any backoff a bad actual caused
    for g in hv.snapshot():
        assert 0 <= g.actual_kib <= g.max_kib
        if g.stats is not None:
            for name in ("mem_free_kib", "mem_available_kib", "mem_total_kib", "swap_in_kib", "major_faults"):
                v = getattr(g.stats, name)
                assert v is None or (isinstance(v, int) and 0 <= v < 2**53)


# -- the daemon's tick through QMP ------------------------------------------------------------


def test_the_daemon_ticks_through_the_qmp_backend(qemu: FakeQemuHost, sock_dir: Path) -> None:
    fake = qemu.add("101", name="web", uuid=UUID_A, actual=512 * MIB)
    cfg_path = sock_dir / "overcommitd.toml"
    cfg_path.write_text(
        f"""interval_s = 0.5
[policy]
name = "tests.helpers:FixedPolicy"
params = {{ target_kib = {768 * 1024} }}
[hypervisor]
backend = "qmp"
[qmp]
socket_glob = "{sock_dir}/*.qmp"
[runner]
log_format = "text"
"""
    )
    cfg = DaemonConfig.load(cfg_path)
    hv = QmpHypervisor(cfg.qmp)
    d = Daemon(cfg, hv, ProcHostReader(HostPaths()), config_path=cfg_path, make_policy=registry.create)
    try:
        asyncio.run(d.run(once=True))
    finally:
        hv.close()
    assert fake.actual == 768 * MIB  # a deflation: the guard lets it through without stats checks
    sample = d.metrics.registry.get_sample_value
    assert sample("overcommitd_hypervisor_calls_total", {"call": "query-balloon"}) == 1
    assert sample("overcommitd_hypervisor_calls_total", {"call": "balloon"}) == 1


def test_cli_set_floor_on_a_qmp_host_says_where_floors_go(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from overcommitd.cli import main

    cfg = sock_dir / "c.toml"
    cfg.write_text('[hypervisor]\nbackend = "qmp"\n')
    assert main(["guest", "set-floor", "web", "1GiB", "--config", str(cfg)]) == 2
    assert "[guests.<name>] floor_kib" in capsys.readouterr().err


def test_cli_run_once_on_a_qmp_host(qemu: FakeQemuHost, sock_dir: Path) -> None:
    from overcommitd.cli import main

    fake = qemu.add("101", name="web", uuid=UUID_A, actual=512 * MIB)
    cfg = sock_dir / "c.toml"
    cfg.write_text(
        f'[policy]\nname = "tests.helpers:FixedPolicy"\nparams = {{ target_kib = {640 * 1024} }}\n'
        f'[hypervisor]\nbackend = "qmp"\n[qmp]\nsocket_glob = "{sock_dir}/*.qmp"\n'
    )
    assert main(["run", "--config", str(cfg), "--once", "--log-format", "text"]) == 0
    assert fake.actual == 640 * MIB
