"""``overcommitd run`` through the front door: a real process with a config file, on
libvirt's test driver, publishing to a real mosquitto and serving /metrics; commands over
MQTT; SIGHUP, SIGTERM and SIGKILL (the last will)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from overcommitd.telemetry.messages import DecisionMessage, GuestMessage, HostMessage, Reply
from tests.mqtt_probe import Probe
from tests.realguest.harness import Mosquitto, free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
NODE = Path(__file__).parent / "data" / "testnode.xml"
GIB = 1024**2


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def write_config(
    path: Path, broker_port: int, metrics_port: int, *, target_kib: int, host_id: str, dry_run: bool = True
) -> None:
    path.write_text(f"""interval_s = 0.5
[policy]
name = "tests.helpers:FixedPolicy"
params = {{ target_kib = {target_kib} }}
[libvirt]
uri = "test://{NODE}"
[mqtt]
enabled = true
commands = true
allow_unauthenticated_commands = true
port = {broker_port}
host_id = "{host_id}"
keepalive_s = 5
[metrics]
enabled = true
port = {metrics_port}
[runner]
dry_run = {str(dry_run).lower()}
""")


class Proc:
    def __init__(self, cfg: Path, *args: str) -> None:
        self.log = cfg.with_suffix(".log")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "overcommitd", "run", "--config", str(cfg), *args],
            cwd=REPO,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def daemon_proc(tmp_path: Path, broker: Mosquitto) -> Iterator[tuple[Proc, Path, int, str]]:
    metrics_port = free_port()
    host_id = f"h{tmp_path.name[-8:]}".replace("_", "")
    cfg = tmp_path / "overcommitd.toml"
    write_config(cfg, broker.port, metrics_port, target_kib=4 * GIB, host_id=host_id)
    proc = Proc(cfg)
    yield proc, cfg, metrics_port, host_id
    if proc.p.poll() is None:
        proc.p.kill()
        proc.p.wait(10)


def test_telemetry_commands_metrics_reload_and_clean_exit(
    daemon_proc: tuple[Proc, Path, int, str], broker: Mosquitto
) -> None:
    proc, cfg, metrics_port, host_id = daemon_proc
    base = f"overcommitd/{host_id}"

    async def scenario() -> None:
        async with Probe(broker.port, f"{base}/#") as probe:
            status = await probe.wait_for(lambda t, b: t == f"{base}/status" and b.get("online"), what="online status")
            assert status["dry_run"] is True and status["policy"] == "fixed"
            HostMessage.model_validate(await probe.wait_for(lambda t, b: t == f"{base}/host"))
            GuestMessage.model_validate(await probe.wait_for(lambda t, b: t == f"{base}/guests/plain/snapshot"))
            decision = DecisionMessage.model_validate(
                await probe.wait_for(lambda t, b: t == f"{base}/guests/autodeflate/decision")
            )
            assert decision.target_kib == 4 * GIB and decision.applied is False  # dry-run

            await probe.send(f"{base}/command", json.dumps({"id": "a", "command": "dry-run", "enabled": False}))
            reply = Reply.model_validate(
                await probe.wait_for(lambda t, b: t.endswith("/command/reply") and b["id"] == "a")
            )
            assert reply.ok
            applied = await probe.wait_for(
                lambda t, b: t == f"{base}/guests/autodeflate/decision" and b["applied"], what="an applied decision"
            )
            assert applied["target_kib"] == 4 * GIB

            await probe.send(
                f"{base}/command",
                json.dumps({"id": "b", "command": "set-floor", "guest": "plain", "floor_kib": "lots"}),
            )
            bad = Reply.model_validate(
                await probe.wait_for(lambda t, b: t.endswith("/command/reply") and b["id"] == "b")
            )
            assert (bad.ok, bad.error) == (False, "invalid-command") and "floor_kib" in bad.message
            await probe.send(f"{base}/command", b"{not json")
            junk = await probe.wait_for(lambda t, b: t.endswith("/command/reply") and b.get("error") == "bad-json")
            assert junk["ok"] is False

            await probe.send(
                f"{base}/command",
                json.dumps({"id": "c", "command": "set-floor", "guest": "plain", "floor_kib": "1GiB"}),
            )
            ok = await probe.wait_for(lambda t, b: t.endswith("/command/reply") and b["id"] == "c")
            assert ok["ok"] is True
            await probe.wait_for(
                lambda t, b: t == f"{base}/guests/plain/snapshot" and b["floor_kib"] == GIB, what="the new floor"
            )
            await probe.send(
                f"{base}/command", json.dumps({"id": "m", "command": "prepare-migration", "guest": "plain"})
            )
            assert (await probe.wait_for(lambda t, b: t.endswith("/command/reply") and b["id"] == "m"))["ok"]
            await probe.wait_for(
                lambda t, b: t == f"{base}/guests/plain/snapshot" and b["migration_pending"], what="the announcement"
            )

            body = await asyncio.to_thread(scrape, f"http://127.0.0.1:{metrics_port}/metrics")
            for name in (
                "overcommitd_tick_duration_seconds_count",
                'overcommitd_guest_actual_bytes{guest="plain"',
                "overcommitd_decisions_total",
                "overcommitd_clamps_total",
                'overcommitd_guest_target_bytes{guest="autodeflate"',
            ):
                assert name in body, name

            # SIGHUP: the new policy params take effect, the process stays up.
            write_config(cfg, broker.port, metrics_port, target_kib=2 * GIB, host_id=host_id, dry_run=True)
            probe.messages.clear()
            proc.p.send_signal(signal.SIGHUP)
            await probe.wait_for(
                lambda t, b: t == f"{base}/status" and b.get("dry_run") is True, what="reloaded status"
            )
            reloaded = await probe.wait_for(
                lambda t, b: t == f"{base}/guests/autodeflate/decision" and b["wish_kib"] == 2 * GIB,
                what="the new params",
            )
            assert reloaded["applied"] is False  # dry-run again, from the reloaded file
            # Per-guest state survived the reload: the target set before it is still on record.
            snap = await probe.wait_for(lambda t, b: t == f"{base}/guests/autodeflate/snapshot")
            assert snap["last_target_kib"] == 4 * GIB

            proc.p.send_signal(signal.SIGTERM)
            await probe.wait_for(lambda t, b: t == f"{base}/status" and b.get("online") is False, what="goodbye")

    asyncio.run(scenario())
    assert proc.p.wait(30) == 0, proc.text()
    assert '"event": "stopped"' in proc.text()


def test_last_will_tells_consumers_the_daemon_died(daemon_proc: tuple[Proc, Path, int, str], broker: Mosquitto) -> None:
    proc, _cfg, _port, host_id = daemon_proc
    base = f"overcommitd/{host_id}"

    async def scenario() -> None:
        async with Probe(broker.port, f"{base}/status") as probe:
            await probe.wait_for(lambda t, b: b.get("online") is True, what="online")
            proc.p.send_signal(signal.SIGKILL)
            await probe.wait_for(lambda t, b: b.get("online") is False, what="the last will")

    asyncio.run(scenario())


def test_once_exits_after_one_tick(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[libvirt]\nuri = "test://{NODE}"\n[runner]\nlog_format = "json"\n')
    out = subprocess.run(
        [sys.executable, "-m", "overcommitd", "run", "--once", "--dry-run", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert any(json.loads(line).get("event") == "stopped" for line in out.stderr.splitlines())


def test_bad_config_names_the_key_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[mqtt]\nport = 99999\n")
    out = subprocess.run(
        [sys.executable, "-m", "overcommitd", "run", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2 and "mqtt.port" in out.stderr


def test_broker_outage_never_blocks_and_drops_are_counted(tmp_path: Path) -> None:
    from overcommitd.config import MqttConfig
    from overcommitd.telemetry.messages import StatusMessage
    from overcommitd.telemetry.mqtt import MqttLink

    port = free_port()
    m = Mosquitto(tmp_path / "late", port=port)

    async def scenario() -> None:
        cfg = MqttConfig(
            enabled=True, port=port, buffer_size=50, reconnect_min_s=0.2, reconnect_max_s=0.5, host_id="outage"
        )

        async def handler(cmd):  # type: ignore[no-untyped-def]
            raise AssertionError("no commands here")

        link = MqttLink(cfg, handler, lambda: StatusMessage(online=True))
        link.start()
        for i in range(500):  # the broker is down: offer() must return at once every time
            link.offer(f"x/{i}", StatusMessage(online=True))
        assert link.dropped_total == 450 and len(link.buffer) == 50 and not link.connected
        await asyncio.to_thread(m.start)  # the broker comes back: the link reconnects and drains
        try:
            await asyncio.to_thread(wait_for, lambda: link.connected and not link.buffer, 30, "reconnect and drain")
            assert link.published_total >= 50
        finally:
            await link.stop()
            m.stop()

    asyncio.run(scenario())
