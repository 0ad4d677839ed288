"""The daemon against real Linux guests (Debian's kernel and its virtio_balloon driver)
under real QEMU (TCG) managed by a real libvirtd. Slow by nature: every wait polls with
a generous timeout, nothing asserts on speed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from overcommitd.config import DaemonConfig
from overcommitd.host import ProcHostReader
from overcommitd.hypervisor.libvirt import SETTLE_S, LibvirtHypervisor
from overcommitd.model import ClampReason, Decision
from overcommitd.runner import Daemon, TickReport
from policies import registry
from tests.helpers import use_fixed_policy
from tests.mqtt_probe import Probe
from tests.realguest.conftest import Guests
from tests.realguest.harness import GuestSpec, Libvirtd, Mosquitto, wait_for

MIB = 1024
REPORT = Path(__file__).resolve().parents[2] / ".cache" / "realguest-figures.json"


def config(
    libvirtd: Libvirtd, *, target_kib: int | None = None, by_name: dict[str, int] | None = None, **extra: Any
) -> DaemonConfig:
    data: dict[str, Any] = {
        # 3 s: QEMU sends BALLOON_CHANGE at most once a second, so libvirt's view of a
        # 350 MiB inflate settles within ~2 s; a shorter tick would judge it mid-flight.
        "interval_s": 3.0,
        "policy": {"name": "tests.helpers:FixedPolicy", "params": {"target_kib": target_kib, "by_name": by_name or {}}},
        "guard": {
            "min_guest_kib": 64 * MIB,
            "max_inflate_step_kib": 512 * MIB,
            "max_deflate_step_kib": 512 * MIB,
            "dead_band_kib": 4 * MIB,
            "stale_after_min_s": 30,
        },
        "libvirt": {"uri": libvirtd.uri, "reconnect_min_s": 0.5, "reconnect_max_s": 2.0},
        "runner": {"log_format": "text"},
    }
    for section, values in extra.items():
        data[section] = {**data.get(section, {}), **values}
    return DaemonConfig.model_validate(data)


def daemon(cfg: DaemonConfig, hv: LibvirtHypervisor | None = None) -> Daemon:
    return Daemon(cfg, hv or LibvirtHypervisor(cfg.libvirt), ProcHostReader(), make_policy=registry.create)


async def tick_until(d: Daemon, pred: Callable[[TickReport], bool], timeout_s: float, what: str) -> TickReport:
    """Tick every interval until ``pred`` holds for a tick's report."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        report = await d.tick()
        if pred(report):
            return report
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}; last report: {report}")
        await asyncio.sleep(d.cfg.interval_s)


def decision_for(report: TickReport, name: str) -> Decision | None:
    if report.outcome is None:
        return None
    return next((x for x in report.outcome.decisions if x.name == name), None)


def record_figure(key: str, value: object) -> None:
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    figures = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    figures[key] = value
    REPORT.write_text(json.dumps(figures, indent=2))


def test_stats_are_read_in_one_bulk_call_for_one_and_three_guests(libvirtd: Libvirtd, guests: Guests) -> None:
    hv = LibvirtHypervisor(config(libvirtd).libvirt)
    hv.connect()
    try:
        per_tick: dict[int, dict[str, int]] = {}
        for n, specs in (
            (1, [GuestSpec("bulk1", memory_mib=256)]),
            (3, [GuestSpec("bulk2", memory_mib=256), GuestSpec("bulk3", memory_mib=256)]),
        ):
            guests.boot(*specs)
            hv.snapshot()  # first sight of a guest reads its XML once
            before = dict(hv.calls)
            snap = hv.snapshot()
            per_tick[n] = {k: v - before.get(k, 0) for k, v in hv.calls.items() if v != before.get(k, 0)}
            assert len(snap) == n
            for g in snap:
                assert g.stats is not None and g.stats.mem_available_kib and g.stats.mem_total_kib
                assert g.stats.mem_total_kib < g.max_kib  # MemTotal, not libvirt's misnamed "available" mixed up
                assert g.actual_kib == g.max_kib == 256 * MIB and g.stats_period_s == 2
        assert per_tick == {1: {"getAllDomainStats": 1}, 3: {"getAllDomainStats": 1}}
        record_figure("libvirt_calls_per_read", {str(k): v for k, v in per_tick.items()})

        # Whole ticks with 3 guests: setting targets costs one call per guest changed; once
        # the balloons have settled, a tick that changes nothing costs the one bulk read.
        d = daemon(config(libvirtd, target_kib=200 * MIB), hv)
        before = dict(hv.calls)
        report = asyncio.run(d.tick())
        setting = {k: v - before.get(k, 0) for k, v in hv.calls.items() if v != before.get(k, 0)}
        assert len(report.applied) == 3 and setting == {"getAllDomainStats": 1, "setMemoryFlags": 3}
        doms = [guests.conn.lookupByName(n) for n in ("bulk1", "bulk2", "bulk3")]
        wait_for(lambda: all(guests.actual_kib(x) == 200 * MIB for x in doms), 60, "all three at 200 MiB")
        time.sleep(SETTLE_S)  # past the window in which a moving balloon is double-checked
        before = dict(hv.calls)
        report = asyncio.run(d.tick())
        steady = {k: v - before.get(k, 0) for k, v in hv.calls.items() if v != before.get(k, 0)}
        assert report.applied == frozenset() and steady == {"getAllDomainStats": 1}
        record_figure("libvirt_calls_per_tick_3_guests", {"setting_targets": setting, "steady": steady})
    finally:
        hv.close()


def test_free_page_hint_set_through_qemu_override_is_negotiated_and_seen(libvirtd: Libvirtd, guests: Guests) -> None:
    """libvirt has no attribute for free-page-hint: the harness sets it with
    <qemu:override>, the guest's driver negotiates it (QEMU's own view, from
    x-query-virtio-status), and the daemon reads it from the live domain XML."""
    guests.boot(GuestSpec("hinted", memory_mib=256, free_page_hint=True), GuestSpec("unhinted", memory_mib=256))
    query = {"execute": "x-query-virtio-status", "arguments": {"path": "/machine/peripheral/balloon0/virtio-backend"}}
    status = json.loads(libvirtd.virsh("qemu-monitor-command", "hinted", json.dumps(query)))
    negotiated = status["return"]["guest-features"]["dev-features"]
    assert any(f.startswith("VIRTIO_BALLOON_F_FREE_PAGE_HINT") for f in negotiated), negotiated
    hv = LibvirtHypervisor(config(libvirtd).libvirt)
    hv.connect()
    try:
        hint = {g.name: g.features.free_page_hint for g in hv.snapshot()}
    finally:
        hv.close()
    assert hint == {"hinted": True, "unhinted": False}


def test_target_is_set_and_actual_converges(libvirtd: Libvirtd, guests: Guests) -> None:
    (dom,) = guests.boot(GuestSpec("conv"))
    d = daemon(config(libvirtd, target_kib=300 * MIB))
    report = asyncio.run(d.tick())
    decision = decision_for(report, "conv")
    assert decision is not None and decision.target_kib == 300 * MIB and decision.uuid in report.applied
    calls = dict(d.hv.calls)  # type: ignore[attr-defined]
    assert calls["getAllDomainStats"] == 1 and calls["setMemoryFlags"] == 1
    record_figure("libvirt_calls_first_tick_1_guest", calls)
    wait_for(lambda: guests.actual_kib(dom) == 300 * MIB, 60, "actual to reach the 300 MiB target")
    # The guest's own stats follow: MemTotal shrinks with the balloon (no deflate-on-oom).
    wait_for(lambda: dom.memoryStats()["available"] < 300 * MIB, 30, "the guest's MemTotal to shrink")
    # libvirt's bulk view catches up through BALLOON_CHANGE, and the daemon then holds.
    report = asyncio.run(
        tick_until(d, lambda r: r.guests and r.guests[0].actual_kib == 300 * MIB, 30, "libvirt's view")
    )
    held = decision_for(report, "conv")
    assert held is not None and held.held and held.clamped_by(ClampReason.DEAD_BAND)
    d.hv.close()


def test_floor_holds_while_the_policy_asks_for_less(libvirtd: Libvirtd, guests: Guests) -> None:
    (dom,) = guests.boot(GuestSpec("floored", floor_mib=400))
    d = daemon(config(libvirtd, target_kib=200 * MIB))

    async def scenario() -> list[int]:
        seen = []
        for _ in range(4):
            report = await d.tick()
            decision = decision_for(report, "floored")
            assert decision is not None and decision.wish_kib == 200 * MIB
            if decision.target_kib is not None:
                assert decision.target_kib == 400 * MIB and decision.clamped_by(ClampReason.FLOOR)
            for _ in range(10):
                seen.append(guests.actual_kib(dom))
                await asyncio.sleep(0.3)
        return seen

    seen = asyncio.run(scenario())
    assert min(seen) == 400 * MIB and seen[-1] == 400 * MIB
    d.hv.close()


def test_auto_deflating_guest_is_met_not_fought(libvirtd: Libvirtd, guests: Guests) -> None:
    # The workload asks for 300 MiB 35 s after boot; by then the daemon has inflated to 160 MiB
    # (well before, even on a loaded 2-core machine).
    (dom,) = guests.boot(GuestSpec("oom", autodeflate=True, work="0@0,300@35"))
    d = daemon(config(libvirtd, target_kib=160 * MIB))

    async def scenario() -> None:
        await tick_until(
            d,
            lambda r: "oom" in {g.name for g in r.guests} and d.hv.target_kib(r.guests[0].uuid) == 160 * MIB,
            30,
            "the 160 MiB target",
        )  # type: ignore[attr-defined]
        await asyncio.to_thread(wait_for, lambda: guests.actual_kib(dom) <= 161 * MIB, 60, "the inflate")
        # The spike: the guest deflates itself (deflate-on-oom); the daemon must back off:
        # refuse to inflate it again, and meet it where it is (target = actual) so the
        # driver is not left chasing the old, lower target.
        await tick_until(
            d,
            lambda r: (x := decision_for(r, "oom")) is not None and x.clamped_by(ClampReason.AUTO_DEFLATE),
            120,
            "the back-off",
        )
        await asyncio.to_thread(wait_for, lambda: "RG-WORK 300" in guests.console("oom"), 120, "the workload's 300 MiB")
        for _ in range(3):
            await asyncio.sleep(d.cfg.interval_s)
            report = await d.tick()
            guest, decision = report.guests[0], decision_for(report, "oom")
            assert decision is not None and decision.wish_kib == 160 * MIB
            assert decision.clamped_by(ClampReason.AUTO_DEFLATE), decision
            assert decision.target_kib is None or decision.target_kib >= guest.actual_kib  # never inflates
        assert guests.actual_kib(dom) > 250 * MIB  # still deflated: never forced back
        assert "Out of memory" not in guests.console("oom") and "Killed" not in guests.console("oom")

    asyncio.run(scenario())
    d.hv.close()


def test_telemetry_on_the_broker_and_a_command_taking_effect(
    libvirtd: Libvirtd, guests: Guests, broker: Mosquitto
) -> None:
    (dom,) = guests.boot(GuestSpec("mq"))
    cfg = config(
        libvirtd,
        target_kib=300 * MIB,
        mqtt={
            "enabled": True,
            "commands": True,
            "allow_unauthenticated_commands": True,
            "port": broker.port,
            "host_id": "real",
        },
    )
    d = daemon(cfg)
    base = "overcommitd/real"

    async def scenario() -> None:
        async with Probe(broker.port, f"{base}/#") as probe:
            task = asyncio.create_task(d.run())
            snap = await probe.wait_for(
                lambda t, b: t == f"{base}/guests/mq/snapshot" and b["mem_available_kib"] is not None,
                what="guest stats",
            )
            assert snap["max_kib"] == 512 * MIB
            await probe.wait_for(
                lambda t, b: t == f"{base}/guests/mq/decision" and b["target_kib"] == 300 * MIB and b["applied"]
            )
            await asyncio.to_thread(wait_for, lambda: guests.actual_kib(dom) == 300 * MIB, 60, "300 MiB")
            # libvirt's BALLOON_CHANGE events, bridged from its event thread into asyncio and on to MQTT.
            await probe.wait_for(
                lambda t, b: (
                    t == f"{base}/guests/mq/event" and b["kind"] == "balloon-change" and b["actual_kib"] == 300 * MIB
                ),
                what="the balloon-change event",
            )
            await probe.send(
                f"{base}/command", json.dumps({"id": "f", "command": "set-floor", "guest": "mq", "floor_kib": "450MiB"})
            )
            reply = await probe.wait_for(lambda t, b: t.endswith("/command/reply") and b["id"] == "f")
            assert reply["ok"], reply
            await asyncio.to_thread(wait_for, lambda: guests.actual_kib(dom) == 450 * MIB, 60, "the new floor")
            d.stopping.set()
            await asyncio.wait_for(task, 60)

    asyncio.run(scenario())
    assert 'overcommitd:floor unit="KiB">460800<' in dom.XMLDesc(0).replace("oc:", "overcommitd:")


def test_survives_a_libvirtd_restart_and_a_guest_destroyed_mid_tick(libvirtd: Libvirtd, guests: Guests) -> None:
    doomed, survivor = guests.boot(GuestSpec("doomed", memory_mib=384), GuestSpec("survivor", memory_mib=384))
    survivor_uuid = survivor.UUIDString()

    class DestroyAfterRead(LibvirtHypervisor):
        """The real backend, with a guest destroyed between the read and the apply."""

        victim: Any = None

        def snapshot(self):  # type: ignore[no-untyped-def]
            out = super().snapshot()
            if self.victim is not None:
                self.victim.destroy()
                self.victim = None
            return out

    cfg = config(libvirtd, target_kib=300 * MIB)
    hv = DestroyAfterRead(cfg.libvirt)
    d = daemon(cfg, hv)

    async def scenario() -> None:
        hv.victim = doomed
        report = await d.tick()
        assert {x.name for x in report.outcome.decisions if x.target_kib == 300 * MIB} == {"doomed", "survivor"}  # type: ignore[union-attr]
        assert report.applied == frozenset({survivor_uuid})  # the destroyed one failed alone
        assert hv.target_kib(survivor_uuid) == 300 * MIB

        await asyncio.to_thread(libvirtd.stop, destroy=False)  # QEMU keeps running without it
        report = await d.tick()
        assert report.error is not None and report.outcome is None  # nothing decided, nothing set
        await asyncio.to_thread(libvirtd.start)
        report = await tick_until(d, lambda r: r.error is None, 60, "the reconnect")
        assert [g.name for g in report.guests] == ["survivor"]
        # Per-guest state survived: the target record, so the guard judges progress from it.
        assert report.guests[0].last_target_kib == 300 * MIB
        use_fixed_policy(d, 320 * MIB)
        report = await d.tick()
        assert survivor_uuid in report.applied
        await asyncio.to_thread(
            wait_for, lambda: guests.actual_kib(survivor) == 320 * MIB, 60, "320 MiB after the restart"
        )

    asyncio.run(scenario())
    hv.close()


def test_stats_polling_is_turned_on_and_a_paused_guest_is_left_alone(libvirtd: Libvirtd, guests: Guests) -> None:
    (dom,) = guests.boot(GuestSpec("nopoll", memory_mib=256, stats_period_s=None))
    cfg = config(libvirtd, target_kib=160 * MIB, libvirt={"enable_stats_period_s": 2})
    d = daemon(cfg)

    async def scenario() -> None:
        dom.suspend()
        report = await d.tick()
        decision = decision_for(report, "nopoll")
        assert decision is not None and decision.held and decision.clamped_by(ClampReason.NOT_RUNNING)
        assert report.guests[0].stats_period_s == 2 and d.hv.calls["setMemoryStatsPeriod"] == 1  # type: ignore[attr-defined]
        assert "setMemoryFlags" not in d.hv.calls  # type: ignore[attr-defined]
        dom.resume()
        first = report.guests[0].stats
        later = await tick_until(
            d,
            lambda r: (
                r.guests[0].stats is not None
                and first is not None
                and r.guests[0].stats.last_update_s > first.last_update_s
            ),
            60,
            "fresh stats from the polling we turned on",
        )
        assert later.guests[0].stats is not None
        await tick_until(d, lambda r: d.hv.target_kib(r.guests[0].uuid) == 160 * MIB, 60, "the target once resumed")  # type: ignore[attr-defined]
        await asyncio.to_thread(wait_for, lambda: guests.actual_kib(dom) == 160 * MIB, 60, "160 MiB")

    asyncio.run(scenario())
    d.hv.close()


def test_overcommitd_run_process_sets_targets_and_returns_them_on_sigterm(
    libvirtd: Libvirtd, guests: Guests, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys

    (dom,) = guests.boot(GuestSpec("proc"))
    cfg_path = tmp_path / "overcommitd.toml"
    cfg_path.write_text(f"""interval_s = 3.0
[policy]
name = "tests.helpers:FixedPolicy"
params = {{ target_kib = {256 * MIB} }}
[guard]
min_guest_kib = "64MiB"
dead_band_kib = "4MiB"
[libvirt]
uri = "{libvirtd.uri}"
[runner]
return_to_max_on_exit = true
""")
    log_path = tmp_path / "daemon.log"
    repo = Path(__file__).resolve().parents[2]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "overcommitd", "run", "--config", str(cfg_path)],
            cwd=repo,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: guests.actual_kib(dom) == 256 * MIB, 90, "the daemon's 256 MiB target")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
        wait_for(lambda: guests.actual_kib(dom) == 512 * MIB, 60, "the balloon returned to the maximum")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any(e.get("event") == "target" and e.get("target_kib") == 256 * MIB for e in events)
    assert any(e.get("event") == "returned-to-max" for e in events)


def test_status_explains_a_real_guest_and_commands_find_the_default_config(
    libvirtd: Libvirtd, guests: Guests, tmp_path: Path
) -> None:
    """`overcommitd run` and `guest set-floor` without --config read the default file
    (moved here with $OVERCOMMITD_CONFIG) and its libvirt URI; `overcommitd status` reads
    the running daemon's socket and says why the guest waits (trim's warm-up)."""
    import os
    import signal
    import subprocess
    import sys

    guests.boot(GuestSpec("rg-status"))
    sock = tmp_path / "status.sock"
    cfg_path = tmp_path / "overcommitd.toml"
    cfg_path.write_text(f"""interval_s = 3.0
[libvirt]
uri = "{libvirtd.uri}"
[runner]
log_format = "text"
status_socket = "{sock}"
""")
    env = {**os.environ, "OVERCOMMITD_CONFIG": str(cfg_path)}
    repo = Path(__file__).resolve().parents[2]
    cli = [sys.executable, "-m", "overcommitd"]
    floor = subprocess.run(
        [*cli, "guest", "set-floor", "rg-status", "300MiB"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert floor.returncode == 0 and f"config {cfg_path} (default" in floor.stderr, floor.stderr
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*cli, "run"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:

        def row() -> str | None:
            out = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=60, check=False)
            lines = [x for x in out.stdout.splitlines() if x.startswith("rg-status ")]
            return lines[0] if out.returncode == 0 and lines else None

        line = wait_for(row, 90, "rg-status in `overcommitd status`")
        assert "warm-up: 60 min left" in line and "held" in line
        assert line.split()[1:6] == ["512M", "-", "300M", "512M", "512M"]  # actual, target, floor, max, wish
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
    text = log_path.read_text()
    assert f"config {cfg_path} (default" in text and "guest rg-status held: warm-up" in text
    assert not sock.exists()
