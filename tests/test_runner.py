"""The daemon's tick, dry-run, commands and reload, on libvirt's test driver (plumbing
only: the driver has no balloon stats, so only deflation and holds are decided here)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from overcommitd.config import DaemonConfig
from overcommitd.host import HostPaths, ProcHostReader
from overcommitd.hypervisor.libvirt import LibvirtHypervisor
from overcommitd.model import ClampReason
from overcommitd.runner import Daemon, TickReport
from overcommitd.telemetry import messages as msg
from policies import registry

NODE = Path(__file__).parent / "data" / "testnode.xml"
AUTO = "22222222-2222-2222-2222-222222222222"
GIB = 1024**2


def config_text(*, target_kib: int = 4 * GIB, dry_run: bool = False, extra: str = "") -> str:
    return f"""interval_s = 0.5
[policy]
name = "tests.helpers:FixedPolicy"
params = {{ target_kib = {target_kib} }}
[libvirt]
uri = "test://{NODE}"
[runner]
dry_run = {str(dry_run).lower()}
log_format = "text"
{extra}"""


def make_daemon(tmp_path: Path, **kw: object) -> Daemon:
    path = tmp_path / "overcommitd.toml"
    path.write_text(config_text(**kw))  # type: ignore[arg-type]
    cfg = DaemonConfig.load(path)
    hv = LibvirtHypervisor(cfg.libvirt)
    hv.connect()
    return Daemon(cfg, hv, ProcHostReader(HostPaths()), config_path=path, make_policy=registry.create)


def actual_of(d: Daemon, uuid: str) -> int:
    return next(g.actual_kib for g in d.hv.snapshot() if g.uuid == uuid)


def test_tick_applies_a_deflation_and_records_it(tmp_path: Path) -> None:
    d = make_daemon(tmp_path)
    report = asyncio.run(d.tick())
    decision = next(x for x in report.outcome.decisions if x.uuid == AUTO)  # type: ignore[union-attr]
    assert decision.target_kib == 4 * GIB and AUTO in report.applied
    assert actual_of(d, AUTO) == 4 * GIB


def test_dry_run_decides_but_sets_nothing(tmp_path: Path) -> None:
    d = make_daemon(tmp_path, dry_run=True)
    report = asyncio.run(d.tick())
    decision = next(x for x in report.outcome.decisions if x.uuid == AUTO)  # type: ignore[union-attr]
    assert decision.target_kib == 4 * GIB and report.applied == frozenset()
    assert actual_of(d, AUTO) == 3 * GIB


def test_inflation_without_stats_is_refused_by_the_guard(tmp_path: Path) -> None:
    d = make_daemon(tmp_path, target_kib=1 * GIB)
    report = asyncio.run(d.tick())
    decision = next(x for x in report.outcome.decisions if x.uuid == AUTO)  # type: ignore[union-attr]
    assert decision.held and decision.clamped_by(ClampReason.MISSING_STATS)
    assert actual_of(d, AUTO) == 3 * GIB


def test_commands_pause_floor_policy_and_dry_run(tmp_path: Path) -> None:
    d = make_daemon(tmp_path)

    async def scenario() -> list[msg.Reply]:
        await d.tick()
        replies = [
            await d.handle_command(msg.PauseGuest(command="pause", guest="autodeflate", id="1")),
            await d.handle_command(msg.SetFloor(command="set-floor", guest="plain", floor_kib=GIB, id="2")),
            await d.handle_command(msg.SetDryRun(command="dry-run", enabled=True, id="3")),
        ]
        for bad in (
            msg.PauseGuest(command="pause", guest="nope", id="4"),
            msg.SwitchPolicy(command="set-policy", name="nope", id="5"),
        ):
            with pytest.raises(msg.CommandError) as e:
                await d.handle_command(bad)
            replies.append(msg.Reply(id=e.value.id, ok=False, error=e.value.name))
        return replies

    replies = asyncio.run(scenario())
    assert [(r.id, r.ok, r.error) for r in replies] == [
        ("1", True, None),
        ("2", True, None),
        ("3", True, None),
        ("4", False, "no-such-guest"),
        ("5", False, "unknown-policy"),
    ]
    assert d.dry_run
    report = asyncio.run(d.tick())
    auto = next(x for x in report.outcome.decisions if x.uuid == AUTO)  # type: ignore[union-attr]
    assert auto.held and auto.clamped_by(ClampReason.EXCLUDED)
    assert next(g for g in report.guests if g.name == "plain").floor_kib == GIB


def test_an_announced_migration_reaches_the_policy_until_cancelled_or_lapsed(tmp_path: Path) -> None:
    d = make_daemon(tmp_path)

    def pending(report: TickReport) -> set[str]:
        return {g.name for g in report.guests if g.migration_pending}

    async def scenario() -> list[set[str]]:
        await d.tick()
        seen = []
        await d.handle_command(msg.PrepareMigration(command="prepare-migration", guest="plain"))
        await d.handle_command(msg.PrepareMigration(command="prepare-migration", guest=AUTO, within_s=0.05))
        seen.append(pending(await d.tick()))
        await asyncio.sleep(0.1)
        seen.append(pending(await d.tick()))
        reply = await d.handle_command(msg.CancelMigration(command="cancel-migration", guest="plain", id="c"))
        assert reply.ok and "cancelled" in reply.message
        seen.append(pending(await d.tick()))
        with pytest.raises(msg.CommandError) as e:
            await d.handle_command(msg.PrepareMigration(command="prepare-migration", guest="nope"))
        assert e.value.name == "no-such-guest"
        return seen

    assert asyncio.run(scenario()) == [{"plain", "autodeflate"}, {"plain"}, set()]


def test_a_migration_announcement_is_validated() -> None:
    with pytest.raises(msg.CommandError) as e:
        msg.parse_command(b'{"command": "prepare-migration", "guest": "web1", "within_s": -5}', "t/command")
    assert e.value.name == "invalid-command" and "within_s" in str(e.value)


def test_sighup_reload_switches_policy_and_keeps_guest_state(tmp_path: Path) -> None:
    d = make_daemon(tmp_path, target_kib=4 * GIB)
    asyncio.run(d.tick())
    (tmp_path / "overcommitd.toml").write_text(config_text(target_kib=3 * GIB))
    d.reload()
    assert d.policy.params.target_kib == 3 * GIB  # type: ignore[attr-defined]
    assert d.hv.target_kib(AUTO) == 4 * GIB  # type: ignore[attr-defined]


def test_bad_reload_keeps_the_running_config(tmp_path: Path) -> None:
    d = make_daemon(tmp_path)
    (tmp_path / "overcommitd.toml").write_text("interval_s = -1\n")
    d.reload()
    assert d.cfg.interval_s == 0.5


def test_unreachable_libvirt_skips_the_tick_and_holds(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[libvirt]\nuri = "qemu:///system?socket={tmp_path}/none"\n')
    cfg = DaemonConfig.load(path)
    d = Daemon(cfg, LibvirtHypervisor(cfg.libvirt), ProcHostReader(), make_policy=registry.create)
    report = asyncio.run(d.tick())
    assert report.error and "Is libvirtd running" in report.error and report.outcome is None


def test_stop_returns_every_balloon_to_its_maximum_when_configured(tmp_path: Path) -> None:
    """On test:///default, which keeps its state while any connection to it is open: ours,
    opened first, reads the result after the daemon has closed its own."""
    import libvirt

    conn = libvirt.open("test:///default")
    path = tmp_path / "c.toml"
    path.write_text('[libvirt]\nuri = "test:///default"\n[runner]\nreturn_to_max_on_exit = true\n')
    cfg = DaemonConfig.load(path)
    d = Daemon(cfg, LibvirtHypervisor(cfg.libvirt), ProcHostReader(), make_policy=registry.create)

    def after_tick(report) -> None:  # type: ignore[no-untyped-def]
        (guest,) = report.guests
        d.hv.set_target(guest.uuid, GIB)  # as if the daemon had ballooned it earlier
        d.stopping.set()  # what SIGTERM does

    asyncio.run(d.run(on_tick=after_tick))
    try:
        dom = conn.lookupByName("test")
        assert dom.info()[2] == dom.maxMemory() == 8 * GIB
    finally:
        conn.close()


def test_broker_outage_does_not_stop_the_control_loop(tmp_path: Path) -> None:
    from tests.realguest.harness import free_port

    dead_port = free_port()  # nothing listens here
    d = make_daemon(
        tmp_path, extra=f"[mqtt]\nenabled = true\nport = {dead_port}\nbuffer_size = 5\nreconnect_min_s = 0.1\n"
    )
    d.cfg = d.cfg.model_copy(update={"interval_s": 0.05})
    reports = []

    def count(report) -> None:  # type: ignore[no-untyped-def]
        reports.append(report)
        if len(reports) == 6:
            d.stopping.set()

    asyncio.run(asyncio.wait_for(d.run(on_tick=count), 60))
    assert len(reports) == 6 and all(r.error is None for r in reports)
    assert d.mqtt is not None and not d.mqtt.connected and d.mqtt.dropped_total > 0 and len(d.mqtt.buffer) == 5
    assert AUTO in reports[0].applied  # balloons were still set while the broker was away
