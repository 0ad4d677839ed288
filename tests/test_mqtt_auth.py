"""MQTT over TLS with username and password, against a real mosquitto configured so."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from overcommitd.config import MqttConfig
from overcommitd.telemetry.messages import Reply, StatusMessage
from overcommitd.telemetry.mqtt import MqttLink
from tests.conftest import need_binaries
from tests.mqtt_probe import Probe
from tests.realguest.harness import Mosquitto, free_port


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mosquitto, Path]]:
    need_binaries("mosquitto", "mosquitto_passwd", "openssl")
    d = tmp_path_factory.mktemp("tls")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
        cwd=d,
    )
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(d / "passwd"), "oc", "s3cret"], check=True, capture_output=True)
    port = free_port()
    m = Mosquitto(d, port=port)
    m.extra_conf = (
        f"cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n"
        f"password_file {d}/passwd\nallow_anonymous false\n"
    )
    m.start()
    yield m, d
    m.stop()


def link_for(port: int, ca: Path, password: str) -> MqttLink:
    cfg = MqttConfig(
        enabled=True,
        commands=True,
        port=port,
        tls=True,
        ca_file=ca,
        username="oc",
        password=password,
        host_id="tls",
        reconnect_min_s=0.2,
        reconnect_max_s=0.5,
    )

    async def handler(cmd):  # type: ignore[no-untyped-def]
        return Reply(id=cmd.id, ok=True, message="handled")

    return MqttLink(cfg, handler, lambda: StatusMessage(online=True))


def test_tls_and_password_carry_telemetry_and_commands(tls_broker: tuple[Mosquitto, Path]) -> None:
    broker, d = tls_broker
    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))

    async def scenario() -> None:
        link = link_for(broker.port, d / "ca.pem", "s3cret")
        link.start()
        try:
            async with Probe(
                broker.port, "overcommitd/tls/#", username="oc", password="s3cret", tls_context=ctx
            ) as probe:
                await probe.wait_for(
                    lambda t, b: t.endswith("/status") and b.get("online") is True, what="status over TLS"
                )
                await probe.send("overcommitd/tls/command", '{"id": "t", "command": "dry-run", "enabled": true}')
                reply = await probe.wait_for(lambda t, b: t.endswith("/command/reply"), what="reply")
                assert reply == {"id": "t", "ok": True, "error": None, "message": "handled"}
        finally:
            await link.stop()

    asyncio.run(scenario())


def test_wrong_password_is_retried_not_fatal(tls_broker: tuple[Mosquitto, Path]) -> None:
    broker, d = tls_broker

    async def scenario() -> None:
        link = link_for(broker.port, d / "ca.pem", "wrong")
        link.start()
        try:
            await asyncio.sleep(1.5)  # several attempts
            assert not link.connected and link._task is not None and not link._task.done()
            link.offer("x", StatusMessage(online=True))
            assert len(link.buffer) == 1
        finally:
            await link.stop()

    asyncio.run(scenario())
