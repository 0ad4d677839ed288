"""The KSM controller on a fake sysfs tree under tmp_path (real files), through the
daemon's tick, and on this host's /sys/kernel/mm/ksm where it is writable."""

from __future__ import annotations

import asyncio
import logging
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overcommitd.config import DaemonConfig, KsmConfig, MqttConfig
from overcommitd.host import HostPaths, ProcHostReader
from overcommitd.hypervisor.libvirt import LibvirtHypervisor
from overcommitd.ksm import KsmController, KsmError, KsmReading, KsmState, KsmSysfs, decide, sleep_ms
from overcommitd.model import HostSnapshot
from overcommitd.runner import Daemon
from overcommitd.telemetry.messages import HostMessage, KsmMessage
from policies import registry
from policies.testing import GIB, MIB
from tests.mqtt_probe import Probe
from tests.realguest.harness import Mosquitto
from tests.test_runner import AUTO, config_text

TOTAL_KIB = 64 * GIB
PRESSED = HostSnapshot(taken_at_s=0, mem_total_kib=TOTAL_KIB, mem_available_kib=4 * GIB)  # < 20 % free
EASY = HostSnapshot(taken_at_s=0, mem_total_kib=TOTAL_KIB, mem_available_kib=40 * GIB)
FEW_GUESTS_KIB = 8 * GIB  # + 12.8 GiB threshold fits in RAM: nothing to gain
MANY_GUESTS_KIB = 60 * GIB  # committed near RAM: ksmtuned keeps KSM running


def fake_sysfs(root: Path, **values: int) -> Path:
    defaults = {
        "run": 0,
        "pages_to_scan": 100,
        "sleep_millisecs": 20,
        "pages_shared": 0,
        "pages_sharing": 0,
        "full_scans": 0,
    }
    root.mkdir(exist_ok=True)
    for name, value in (defaults | values).items():
        (root / name).write_text(f"{value}\n")
    (root / "advisor_mode").write_text("[none] scan-time\n")
    return root


def sysfs_values(root: Path) -> dict[str, int]:
    return {n: int((root / n).read_text()) for n in ("run", "pages_to_scan", "sleep_millisecs")}


@pytest.fixture
def ksm_dir(tmp_path: Path) -> Path:
    return fake_sysfs(tmp_path / "ksm")


def controller(ksm_dir: Path, **cfg: object) -> KsmController:
    return KsmController(KsmConfig.model_validate({"enabled": True, "sysfs_dir": ksm_dir} | cfg), page_kib=4)


def test_pressure_starts_ksm_at_ksmtuneds_first_boost(ksm_dir: Path) -> None:
    status = controller(ksm_dir).tick(0.0, PRESSED, FEW_GUESTS_KIB)
    assert status.decision is not None and status.decision.action == "start"
    # 0 + KSM_NPAGES_BOOST; KSM_SLEEP_MSEC 10 x 16 GiB / 64 GiB = 2 ms, raised to sleep_ms_min 10
    assert sysfs_values(ksm_dir) == {"run": 1, "pages_to_scan": 300, "sleep_millisecs": 10}


def test_sleep_scales_with_ram_inside_its_bounds() -> None:
    cfg = KsmConfig()
    assert [sleep_ms(cfg, gib * GIB) for gib in (4, 8, 16, 64)] == [40, 20, 10, 10]
    assert sleep_ms(cfg.model_copy(update={"sleep_ms_max": 30}), 1 * GIB) == 30


def test_boost_every_interval_up_to_the_maximum(ksm_dir: Path) -> None:
    c = controller(ksm_dir)
    seen = []
    for i in range(7):
        c.tick(60.0 * i, PRESSED, MANY_GUESTS_KIB)
        c.tick(60.0 * i + 10, PRESSED, MANY_GUESTS_KIB)  # within adjust_interval_s: waits
        seen.append(sysfs_values(ksm_dir)["pages_to_scan"])
    assert seen == [300, 600, 900, 1200, 1250, 1250, 1250]
    assert c.last is not None and c.last.decision is not None and c.last.decision.action == "wait"


def test_decay_without_pressure_down_to_the_minimum(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path / "ksm", run=1, pages_to_scan=200, sleep_millisecs=10)
    c = controller(root)
    seen, actions = [], []
    for i in range(5):
        status = c.tick(60.0 * i, EASY, MANY_GUESTS_KIB)  # free, but the guests fill RAM: keep running
        assert status.decision is not None
        actions.append(status.decision.action)
        seen.append(sysfs_values(root)["pages_to_scan"])
    assert seen == [150, 100, 64, 64, 64] and set(actions) == {"decay"}
    assert sysfs_values(root)["run"] == 1


def test_stop_when_free_and_the_guests_fit(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path / "ksm", run=1, pages_to_scan=700)
    status = controller(root).tick(0.0, EASY, FEW_GUESTS_KIB)
    assert status.decision is not None and status.decision.action == "stop"
    assert sysfs_values(root) == {"run": 0, "pages_to_scan": 700, "sleep_millisecs": 20}  # only run written


def test_little_sharing_after_full_scans_backs_off_then_retries(ksm_dir: Path) -> None:
    c = controller(ksm_dir, min_saved_kib="64MiB", judge_after_full_scans=2, backoff_s=600)
    c.tick(0.0, PRESSED, MANY_GUESTS_KIB)
    (ksm_dir / "full_scans").write_text("1\n")
    (ksm_dir / "pages_sharing").write_text("100\n")  # 400 KiB
    assert c.tick(60.0, PRESSED, MANY_GUESTS_KIB).decision.action == "boost"  # type: ignore[union-attr]
    (ksm_dir / "full_scans").write_text("2\n")
    status = c.tick(120.0, PRESSED, MANY_GUESTS_KIB)
    assert status.decision is not None and status.decision.action == "backoff"
    assert "2 full scans shared 400 KiB" in status.decision.reason and sysfs_values(ksm_dir)["run"] == 0
    assert c.tick(600.0, PRESSED, MANY_GUESTS_KIB).decision.action == "backoff"  # type: ignore[union-attr]
    assert sysfs_values(ksm_dir)["run"] == 0  # pressure or not, stopped until the back-off ends
    assert c.tick(720.0, PRESSED, MANY_GUESTS_KIB).decision.action == "start"  # type: ignore[union-attr]
    assert sysfs_values(ksm_dir)["run"] == 1


def test_good_sharing_keeps_running(ksm_dir: Path) -> None:
    c = controller(ksm_dir, min_saved_kib="64MiB")
    c.tick(0.0, PRESSED, MANY_GUESTS_KIB)
    (ksm_dir / "full_scans").write_text("5\n")
    (ksm_dir / "pages_sharing").write_text(f"{512 * MIB // 4}\n")  # 512 MiB saved
    assert c.tick(60.0, PRESSED, MANY_GUESTS_KIB).decision.action == "boost"  # type: ignore[union-attr]


def test_dry_run_logs_and_writes_nothing(ksm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in ksm_dir.iterdir()}
    with caplog.at_level(logging.INFO, logger="overcommitd.ksm"):
        status = controller(ksm_dir, dry_run=True).tick(0.0, PRESSED, FEW_GUESTS_KIB)
    assert status.decision is not None and status.decision.action == "start" and status.dry_run
    assert {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in ksm_dir.iterdir()} == before
    assert any("dry-run" in r.getMessage() and "pages_to_scan=300" in r.getMessage() for r in caplog.records)


def test_advisor_in_scan_time_mode_owns_pages_to_scan(ksm_dir: Path) -> None:
    (ksm_dir / "advisor_mode").write_text("none [scan-time]\n")
    controller(ksm_dir).tick(0.0, PRESSED, FEW_GUESTS_KIB)
    assert sysfs_values(ksm_dir) == {"run": 1, "pages_to_scan": 100, "sleep_millisecs": 10}


def test_unmerging_is_left_alone(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path / "ksm", run=2)
    status = controller(root).tick(0.0, PRESSED, MANY_GUESTS_KIB)
    assert status.decision is not None and status.decision.action == "hold"
    assert sysfs_values(root)["run"] == 2


def test_an_unwritable_file_is_logged_counted_and_retried(ksm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A read-only sysctl holding an integer: writing it fails with EACCES even as root.
    (ksm_dir / "pages_to_scan").unlink()
    (ksm_dir / "pages_to_scan").symlink_to("/proc/sys/kernel/ngroups_max")
    c = controller(ksm_dir)
    with caplog.at_level(logging.ERROR, logger="overcommitd.ksm"):
        first = c.tick(0.0, PRESSED, FEW_GUESTS_KIB)
        second = c.tick(1.0, PRESSED, FEW_GUESTS_KIB)  # not "wait": the failed adjustment is retried
    assert first.error and "cannot write 300 to" in first.error and "pages_to_scan" in first.error
    assert second.error and c.errors["write"] == 2
    assert sysfs_values(ksm_dir)["run"] == 0  # speed first, run last: nothing half-started
    # Counted every time, logged as an error once: the same failure does not flood the journal.
    assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 1


def test_garbage_in_sysfs_is_a_read_error(ksm_dir: Path) -> None:
    (ksm_dir / "full_scans").write_text("lots\n")
    status = controller(ksm_dir).tick(0.0, PRESSED, FEW_GUESTS_KIB)
    assert status.decision is None and status.error and "full_scans: 'lots' is not an integer" in status.error


def test_status_as_mqtt_message(ksm_dir: Path) -> None:
    c = controller(ksm_dir)
    c.tick(0.0, PRESSED, FEW_GUESTS_KIB)
    m = KsmMessage.model_validate_json(KsmMessage.of(c.tick(60.0, PRESSED, FEW_GUESTS_KIB)).model_dump_json())
    assert (m.run, m.pages_to_scan, m.action, m.threshold_kib) == (1, 300, "boost", int(TOTAL_KIB * 0.2))


def test_bad_bounds_are_a_config_error() -> None:
    with pytest.raises(ValueError, match="npages_min"):
        KsmConfig(npages_min=2000)


@given(
    run=st.integers(0, 1),
    npages=st.integers(0, 10**6),
    avail_pct=st.integers(0, 100),
    guests_gib=st.integers(0, 200),
    sharing=st.integers(0, 2**40),
    scans=st.integers(0, 2**40),
)
def test_writes_stay_inside_the_bounds(
    run: int, npages: int, avail_pct: int, guests_gib: int, sharing: int, scans: int
) -> None:
    cfg = KsmConfig(enabled=True)
    host = HostSnapshot(taken_at_s=0, mem_total_kib=TOTAL_KIB, mem_available_kib=TOTAL_KIB * avail_pct // 100)
    reading = KsmReading(run, npages, 20, sharing // 2, sharing, scans)
    d = decide(cfg, 0.0, host, guests_gib * GIB, reading, KsmState(scans_at_start_total=0))
    assert d.writes.run in (None, 0, 1)
    assert d.writes.pages_to_scan is None or cfg.npages_min <= d.writes.pages_to_scan <= cfg.npages_max
    assert d.writes.sleep_millisecs is None or cfg.sleep_ms_min <= d.writes.sleep_millisecs <= cfg.sleep_ms_max


# -- in the daemon ------------------------------------------------------------------------


def ksm_daemon(tmp_path: Path, ksm_dir: Path, *, daemon_dry_run: bool = False, **ksm: object) -> Daemon:
    keys = "\n".join(f"{k} = {str(v).lower()}" for k, v in ksm.items())
    path = tmp_path / "overcommitd.toml"
    extra = f'[ksm]\nenabled = true\nsysfs_dir = "{ksm_dir}"\n{keys}\n'
    path.write_text(config_text(dry_run=daemon_dry_run, extra=extra))
    cfg = DaemonConfig.load(path)
    hv = LibvirtHypervisor(cfg.libvirt)
    hv.connect()
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {TOTAL_KIB} kB\nMemAvailable: {2 * GIB} kB\n")  # under pressure
    return Daemon(
        cfg,
        hv,
        ProcHostReader(HostPaths(meminfo, tmp_path / "psi", ksm_dir, tmp_path / "arc")),
        make_policy=registry.create,
    )


def test_the_daemon_starts_ksm_and_exports_it(tmp_path: Path, ksm_dir: Path) -> None:
    d = ksm_daemon(tmp_path, ksm_dir)
    report = asyncio.run(d.tick())
    assert AUTO in report.applied and sysfs_values(ksm_dir)["run"] == 1
    sample = d.metrics.registry.get_sample_value
    assert sample("overcommitd_ksm", {"file": "pages_to_scan"}) == 100  # as read before the write
    assert sample("overcommitd_ksm_last_action", {"action": "start"}) == 1
    assert sample("overcommitd_ksm_writes_total", {"file": "run"}) == 1


def test_ksm_errors_never_stop_the_balloon_loop(tmp_path: Path, ksm_dir: Path) -> None:
    (ksm_dir / "full_scans").unlink()  # a read error every tick
    d = ksm_daemon(tmp_path, ksm_dir)
    reports = [asyncio.run(d.tick()) for _ in range(3)]
    assert AUTO in reports[0].applied and all(r.error is None and r.outcome is not None for r in reports)
    assert d.ksm is not None and d.ksm.errors["read"] == 3
    assert d.metrics.registry.get_sample_value("overcommitd_ksm_errors_total", {"op": "read"}) == 3

    def broken(*_: object) -> None:
        raise RuntimeError("a bug in the controller")

    d.ksm.tick = broken  # type: ignore[method-assign,assignment]
    report = asyncio.run(d.tick())
    assert report.error is None and report.outcome is not None and d.ksm_failures == 1


@pytest.mark.parametrize("where", ["[ksm] dry_run", "[runner] dry_run"])
def test_dry_run_daemon_leaves_sysfs_alone(tmp_path: Path, ksm_dir: Path, where: str) -> None:
    if where == "[ksm] dry_run":
        d = ksm_daemon(tmp_path, ksm_dir, dry_run=True)
    else:
        d = ksm_daemon(tmp_path, ksm_dir, daemon_dry_run=True)
    asyncio.run(d.tick())
    assert d.ksm is not None and d.ksm.last is not None and d.ksm.last.dry_run
    assert d.ksm.last.decision is not None and d.ksm.last.decision.action == "start"
    assert sysfs_values(ksm_dir) == {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20}


# -- this host ----------------------------------------------------------------------------

REAL = Path("/sys/kernel/mm/ksm")


def _writable_reason() -> str | None:
    if not (REAL / "run").exists():
        return f"{REAL} is absent: kernel without CONFIG_KSM"
    if not os.access(REAL / "run", os.W_OK):
        return f"{REAL}/run is not writable here (not root, or /sys mounted read-only)"
    return None


@pytest.fixture
def real_ksm() -> Iterator[Path]:
    reason = _writable_reason()
    if reason is not None:
        pytest.skip(reason)
    names = ("pages_to_scan", "sleep_millisecs", "run")
    saved = {n: (REAL / n).read_text().strip() for n in names}
    try:
        (REAL / "sleep_millisecs").write_text(saved["sleep_millisecs"] + "\n")
    except OSError as e:
        pytest.skip(f"{REAL} refuses writes here: {e.strerror}")
    yield REAL
    for n in names:  # restore in this order: run last, to its original state
        (REAL / n).write_text(saved[n] + "\n")


def test_on_this_hosts_ksm(real_ksm: Path) -> None:
    before = KsmSysfs(real_ksm).read()
    if before.run not in (0, 1):
        pytest.skip(f"{real_ksm}/run is {before.run}: someone is unmerging")
    total = 24 * GIB
    host = HostSnapshot(taken_at_s=0, mem_total_kib=total, mem_available_kib=total // 10)
    c = KsmController(KsmConfig(enabled=True, sysfs_dir=real_ksm, npages_boost=137, sleep_ms_min=0))
    status = c.tick(0.0, host, total)
    assert status.error is None and status.decision is not None
    after = KsmSysfs(real_ksm).read()
    assert after.run == 1 and after.sleep_millisecs == 10 * 16 // 24  # KSM_SLEEP_MSEC x 16 GiB / 24 GiB
    base = before.pages_to_scan if before.run == 1 else 0  # a start counts from 0, as ksmtuned does
    expected = before.pages_to_scan if before.advisor_scan_time else min(1250, max(64, base + 137))
    assert after.pages_to_scan == expected


def test_ksm_and_the_arc_on_mqtt(tmp_path: Path, ksm_dir: Path, broker: Mosquitto) -> None:
    """A real mosquitto: the retained ``ksm`` topic and the host message's ARC field."""
    (tmp_path / "arc").write_text((Path(__file__).parent / "data" / "arcstats-at-max").read_text())
    d = ksm_daemon(tmp_path, ksm_dir)
    mqtt = f'enabled = true\nport = {broker.port}\nhost_id = "ksm{tmp_path.name[-6:]}"\n'
    d.cfg = d.cfg.model_copy(update={"interval_s": 0.1, "mqtt": MqttConfig.model_validate(tomllib.loads(mqtt))})
    base = f"overcommitd/{d.cfg.mqtt.host_id}"

    async def scenario() -> tuple[KsmMessage, HostMessage]:
        async with Probe(broker.port, f"{base}/#") as probe:
            task = asyncio.create_task(d.run())
            ksm = await probe.wait_for(lambda t, b: t == f"{base}/ksm", what="ksm message")
            host = await probe.wait_for(lambda t, b: t == f"{base}/host", what="host message")
            d.stopping.set()
            await asyncio.wait_for(task, 30)
        return KsmMessage.model_validate(ksm), HostMessage.model_validate(host)

    ksm, host = asyncio.run(asyncio.wait_for(scenario(), 60))
    # MemAvailable is 2 GiB of 64, but 30 GiB of ARC can go: not pressed, so KSM stays stopped.
    assert (ksm.action, ksm.run, ksm.dry_run) == ("stop", 0, False)
    assert ksm.free_kib == 2 * GIB + 31_498_240
    assert host.arc_reclaimable_kib == 31_498_240


@given(st.text(max_size=60))
def test_any_sysfs_content_reads_or_is_a_ksm_error(text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = fake_sysfs(Path(tmp) / "ksm")
        (root / "pages_sharing").write_text(text)
        try:
            reading = KsmSysfs(root).read()
        except KsmError as e:
            assert "pages_sharing" in str(e)
            return
        assert reading.pages_sharing == int(text.strip())


def test_between_adjustments_the_message_keeps_the_last_action(ksm_dir: Path) -> None:
    c = controller(ksm_dir)
    c.tick(0.0, PRESSED, FEW_GUESTS_KIB)
    status = c.tick(10.0, PRESSED, FEW_GUESTS_KIB)
    assert status.decision is not None and status.decision.action == "wait"
    m = KsmMessage.of(status)
    assert (m.action, m.run, m.pages_to_scan) == ("start", 1, 300)  # sysfs as read now, after the start
