"""The QMP backend against real Linux guests under QEMU started directly with
``-qmp unix:...`` (no libvirt): stats, a target converging, a DEFLATE_ON_OOM guest met,
a guest killed mid-tick, a guest that stops answering, a paused guest left alone, and the
QMP commands a tick costs. Slow by nature: every wait polls with a generous timeout,
nothing asserts on speed. Under CI=true a machine that cannot boot guests fails these
tests; it never skips them."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overcommitd.config import DaemonConfig
from overcommitd.host import ProcHostReader
from overcommitd.hypervisor.qmp import QmpHypervisor
from overcommitd.model import ClampReason, RunState
from overcommitd.runner import Daemon
from policies import registry
from tests.conftest import UNDER_CI, need_binaries
from tests.helpers import use_fixed_policy
from tests.realguest.harness import IMAGE_DIR, GuestSpec, QemuGuest, wait_for
from tests.realguest.test_realguests import decision_for, record_figure, tick_until

MIB = 1024
BOOT_TIMEOUT_S = 120


class QemuGuests:
    """Boots ``qmp-*`` guests with plain QEMU and kills them at the end of a test. Guest
    sockets go to ``sock_dir/<group>/`` so a glob can take one group or all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ctl_dir = root / "ctl"
        self.ctl_dir.mkdir()
        self.guests: list[QemuGuest] = []

    def glob(self, group: str = "*") -> str:
        return str(self.root / "sock" / group / "*.qmp")

    def boot(self, *specs: GuestSpec, group: str = "main") -> list[QemuGuest]:
        sock_dir = self.root / "sock" / group
        sock_dir.mkdir(parents=True, exist_ok=True)
        started = [QemuGuest(s, sock_dir, self.ctl_dir, self.root) for s in specs]
        for g in started:
            g.start()
            self.guests.append(g)
        for g in started:
            wait_for(
                lambda g=g: "RG-READY" in g.console() or (g.proc is not None and g.proc.poll() is not None),
                BOOT_TIMEOUT_S,
                f"{g.spec.name} to boot",
            )
            if g.proc is not None and g.proc.poll() is not None:
                raise RuntimeError(
                    f"QEMU for {g.spec.name} exited: {(self.root / (g.spec.name + '.qemu.log')).read_text()}"
                )
            wait_for(lambda g=g: g.qmp_path.exists() and g.ctl_path.exists(), 30, f"{g.spec.name}'s QMP sockets")
        return started

    def close(self) -> None:
        for g in self.guests:
            g.stop()


@pytest.fixture
def qemu_guests() -> Iterator[QemuGuests]:
    need_binaries("qemu-system-x86_64")
    if not (IMAGE_DIR / "vmlinuz").exists() or not (IMAGE_DIR / "initrd.img").exists():
        message = f"no guest image in {IMAGE_DIR}: run tests/realguest/build.sh"
        if UNDER_CI:
            pytest.fail(message)
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="qmprg", dir="/tmp"))  # unix socket paths must stay short
    g = QemuGuests(root)
    yield g
    g.close()
    shutil.rmtree(root, ignore_errors=True)


def qmp_config(glob: str, *, target_kib: int | None = None, **qmp: Any) -> DaemonConfig:
    return DaemonConfig.model_validate(
        {
            "interval_s": 3.0,
            "policy": {"name": "tests.helpers:FixedPolicy", "params": {"target_kib": target_kib}},
            "guard": {
                "min_guest_kib": 64 * MIB,
                "max_inflate_step_kib": 512 * MIB,
                "max_deflate_step_kib": 512 * MIB,
                "dead_band_kib": 4 * MIB,
                "stale_after_min_s": 30,
            },
            "hypervisor": {"backend": "qmp"},
            "qmp": {"socket_glob": glob, "call_timeout_s": 2.0, "reconnect_min_s": 0.5, "reconnect_max_s": 2.0, **qmp},
            "runner": {"log_format": "text"},
        }
    )


def daemon(cfg: DaemonConfig, hv: QmpHypervisor | None = None) -> Daemon:
    return Daemon(cfg, hv or QmpHypervisor(cfg.qmp), ProcHostReader(), make_policy=registry.create)


def commands_per_tick(glob: str, *, keep_connected: bool) -> int:
    """QMP commands one steady-state tick sends (after the first, which also probes)."""
    hv = QmpHypervisor(qmp_config(glob, keep_connected=keep_connected).qmp)
    try:
        wait_for(lambda: all(g.stats is not None for g in hv.snapshot()), 60, "stats from every guest")
        before = sum(hv.calls.values())
        guests = hv.snapshot()
        assert all(g.run_state is RunState.RUNNING for g in guests)
        return sum(hv.calls.values()) - before
    finally:
        hv.close()


def test_qmp_stats_read_and_commands_per_tick_for_one_and_three_guests(qemu_guests: QemuGuests) -> None:
    (one,) = qemu_guests.boot(GuestSpec("qmp-one", memory_mib=256), group="one")
    qemu_guests.boot(*(GuestSpec(f"qmp-three-{i}", memory_mib=256) for i in range(2)), group="two")
    hv = QmpHypervisor(qmp_config(qemu_guests.glob("one")).qmp)
    try:
        (g,) = wait_for(lambda: [g for g in hv.snapshot() if g.stats is not None], 60, "qmp-one's stats")
    finally:
        hv.close()
    assert (g.name, g.uuid, g.max_kib, g.actual_kib) == ("qmp-one", one.uuid, 256 * MIB, 256 * MIB)
    assert g.stats is not None and g.stats.mem_total_kib is not None and g.stats.mem_available_kib is not None
    assert 150 * MIB < g.stats.mem_total_kib < 256 * MIB  # MemTotal: RAM less the kernel's reserve
    assert 0 < g.stats.mem_available_kib <= g.stats.mem_total_kib
    assert g.stats_period_s == 2 and one.ctl("qom-get", path="/machine/peripheral/balloon0",
                                               property="guest-stats-polling-interval") == 2  # fmt: skip
    figures = {}
    for keep in (True, False):
        mode = "held" if keep else "brief"
        figures[f"{mode}_1"] = commands_per_tick(qemu_guests.glob("one"), keep_connected=keep)
        figures[f"{mode}_3"] = commands_per_tick(qemu_guests.glob(), keep_connected=keep)
    record_figure("qmp_commands_per_tick", figures)
    assert figures == {"held_1": 2, "held_3": 6, "brief_1": 4, "brief_3": 12}


def test_qmp_target_is_set_and_actual_converges(qemu_guests: QemuGuests) -> None:
    (guest,) = qemu_guests.boot(GuestSpec("qmp-conv", memory_mib=256))
    d = daemon(qmp_config(qemu_guests.glob(), target_kib=160 * MIB))

    async def scenario() -> None:
        await tick_until(
            d,
            lambda r: (x := decision_for(r, "qmp-conv")) is not None and x.target_kib == 160 * MIB and bool(r.applied),
            60,
            "the 160 MiB target",
        )
        await asyncio.to_thread(wait_for, lambda: guest.actual_kib() == 160 * MIB, 60, "actual at 160 MiB")
        report = await d.tick()
        assert report.guests[0].actual_kib == 160 * MIB and report.guests[0].last_target_kib == 160 * MIB
        decision = decision_for(report, "qmp-conv")
        assert decision is not None and decision.target_kib is None  # reached: nothing more to do

    try:
        asyncio.run(scenario())
    finally:
        d.hv.close()


def test_qmp_auto_deflating_guest_is_met_not_fought(qemu_guests: QemuGuests) -> None:
    # The workload asks for 300 MiB 35 s after boot; by then the daemon has inflated to 160 MiB.
    (guest,) = qemu_guests.boot(GuestSpec("qmp-oom", autodeflate=True, work="0@0,300@35"))
    d = daemon(qmp_config(qemu_guests.glob(), target_kib=160 * MIB))

    async def scenario() -> None:
        report = await tick_until(d, lambda r: bool(r.applied), 30, "the 160 MiB target")
        assert report.guests[0].features.deflate_on_oom
        await asyncio.to_thread(wait_for, lambda: guest.actual_kib() <= 161 * MIB, 60, "the inflate")
        # The spike: the guest deflates itself; the guard backs off and meets it.
        await tick_until(
            d,
            lambda r: (x := decision_for(r, "qmp-oom")) is not None and x.clamped_by(ClampReason.AUTO_DEFLATE),
            120,
            "the back-off",
        )
        await asyncio.to_thread(wait_for, lambda: "RG-WORK 300" in guest.console(), 120, "the workload's 300 MiB")
        for _ in range(3):
            await asyncio.sleep(d.cfg.interval_s)
            report = await d.tick()
            g, decision = report.guests[0], decision_for(report, "qmp-oom")
            assert decision is not None and decision.wish_kib == 160 * MIB
            assert decision.clamped_by(ClampReason.AUTO_DEFLATE), decision
            assert decision.target_kib is None or decision.target_kib >= g.actual_kib  # never inflates
        assert guest.actual_kib() > 250 * MIB  # still deflated: never forced back
        assert "Out of memory" not in guest.console() and "Killed" not in guest.console()

    try:
        asyncio.run(scenario())
    finally:
        d.hv.close()


def test_qmp_guest_killed_mid_tick_and_one_that_stops_answering(qemu_guests: QemuGuests) -> None:
    doomed, survivor, frozen = qemu_guests.boot(
        *(GuestSpec(f"qmp-{n}", memory_mib=256) for n in ("doomed", "survivor", "frozen"))
    )

    class KillAfterRead(QmpHypervisor):
        """The real backend, with a guest's QEMU killed between the read and the apply."""

        victim: QemuGuest | None = None

        def snapshot(self):  # type: ignore[no-untyped-def]
            out = super().snapshot()
            if self.victim is not None:
                self.victim.kill()
                self.victim = None
            return out

    cfg = qmp_config(qemu_guests.glob(), keep_connected=True)  # no wish until every guest is read
    hv = KillAfterRead(cfg.qmp)
    d = daemon(cfg, hv)

    async def scenario() -> None:
        await tick_until(d, lambda r: len(r.guests) == 3 and all(g.stats for g in r.guests), 60, "three guests")
        use_fixed_policy(d, 200 * MIB)
        hv.victim = doomed
        report = await d.tick()
        assert {x.name for x in report.outcome.decisions if x.target_kib == 200 * MIB} == {  # type: ignore[union-attr]
            "qmp-doomed",
            "qmp-survivor",
            "qmp-frozen",
        }
        assert report.applied == frozenset({survivor.uuid, frozen.uuid})  # the killed one failed alone
        await asyncio.to_thread(wait_for, lambda: survivor.actual_kib() == 200 * MIB, 60, "the survivor's target")
        # A guest that stops answering (its QEMU stopped by SIGSTOP) is held, the others not.
        assert frozen.proc is not None
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        try:
            use_fixed_policy(d, 220 * MIB)
            report = await tick_until(
                d, lambda r: "qmp-doomed" not in {g.name for g in r.guests}, 30, "the killed guest to be gone"
            )
            states = {g.name: g.run_state for g in report.guests}
            assert states == {"qmp-survivor": RunState.RUNNING, "qmp-frozen": RunState.UNRESPONSIVE}
            frozen_decision = decision_for(report, "qmp-frozen")
            assert frozen_decision is not None and frozen_decision.clamped_by(ClampReason.NOT_RUNNING)
            assert frozen.uuid not in report.applied and hv.target_kib(survivor.uuid) == 220 * MIB
        finally:
            os.kill(frozen.proc.pid, signal.SIGCONT)
        await tick_until(d, lambda r: frozen.uuid in r.applied, 60, "the thawed guest reconnected and given its target")
        await asyncio.to_thread(wait_for, lambda: frozen.actual_kib() == 220 * MIB, 60, "the thawed guest's target")

    try:
        asyncio.run(scenario())
    finally:
        hv.close()


def test_qmp_paused_guest_is_left_alone(qemu_guests: QemuGuests) -> None:
    (guest,) = qemu_guests.boot(GuestSpec("qmp-paused", memory_mib=256))
    d = daemon(qmp_config(qemu_guests.glob(), target_kib=160 * MIB))

    async def scenario() -> None:
        guest.ctl("stop")
        report = await d.tick()
        decision = decision_for(report, "qmp-paused")
        assert report.guests[0].run_state is RunState.PAUSED
        assert decision is not None and decision.held and decision.clamped_by(ClampReason.NOT_RUNNING)
        assert "balloon" not in d.hv.calls  # type: ignore[attr-defined]
        assert guest.actual_kib() == 256 * MIB
        guest.ctl("cont")
        await tick_until(d, lambda r: bool(r.applied), 60, "the target once resumed")
        await asyncio.to_thread(wait_for, lambda: guest.actual_kib() == 160 * MIB, 60, "160 MiB")

    try:
        asyncio.run(scenario())
    finally:
        d.hv.close()
