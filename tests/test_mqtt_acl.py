"""The README's mosquitto ACL, as written there, on a real mosquitto: the daemon gets its
own topics, an operator may command it, and any other authenticated user cannot."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import aiomqtt
import pytest

from overcommitd.config import MqttConfig
from overcommitd.telemetry.messages import Command, Reply, StatusMessage
from overcommitd.telemetry.mqtt import MqttLink
from tests.conftest import need_binaries
from tests.mqtt_probe import Probe
from tests.realguest.harness import Mosquitto

REPO = Path(__file__).resolve().parents[1]


def readme_mosquitto_files() -> tuple[str, str]:
    """(broker settings, ACL file) from the README's block that defines them."""
    readme = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"^```\w*\n(.*?)^```", readme, re.DOTALL | re.MULTILINE) if "acl_file" in b)
    conf, acl = block.split("# /etc/mosquitto/acl\n")
    return conf, acl


def test_the_readme_acl_lets_operators_command_the_daemon_and_nobody_else(tmp_path: Path) -> None:
    need_binaries("mosquitto", "mosquitto_passwd")
    conf, acl = readme_mosquitto_files()
    passwd, acl_file = tmp_path / "passwd", tmp_path / "acl"
    for i, (user, password) in enumerate((("overcommitd-hv01", "d"), ("operator", "o"), ("intruder", "i"))):
        flags = ["-b", "-c"] if i == 0 else ["-b"]
        subprocess.run(["mosquitto_passwd", *flags, str(passwd), user, password], check=True, capture_output=True)
    acl_file.write_text(acl)
    broker = Mosquitto(tmp_path / "broker")
    broker.extra_conf = conf.replace("/etc/mosquitto/passwd", str(passwd)).replace("/etc/mosquitto/acl", str(acl_file))
    broker.start()
    handled: list[str | None] = []

    async def handler(cmd: Command) -> Reply:
        handled.append(cmd.id)
        return Reply(id=cmd.id, ok=True, message="handled")

    cfg = MqttConfig(
        enabled=True,
        commands=True,
        port=broker.port,
        host_id="hv01",
        username="overcommitd-hv01",
        password="d",
        reconnect_min_s=0.2,
        reconnect_max_s=0.5,
    )

    async def scenario() -> None:
        link = MqttLink(cfg, handler, lambda: StatusMessage(online=True))
        link.start()
        try:
            async with Probe(broker.port, "overcommitd/#", username="operator", password="o") as operator:
                await operator.wait_for(lambda t, b: t == "overcommitd/hv01/status" and b["online"], what="status")
                async with aiomqtt.Client("127.0.0.1", broker.port, username="intruder", password="i") as intruder:
                    await intruder.publish(
                        "overcommitd/hv01/command", '{"id": "evil", "command": "pause", "guest": "x"}', qos=1
                    )
                    await intruder.publish("overcommitd/hv01/status", '{"online": false}', qos=1, retain=True)
                await operator.send("overcommitd/hv01/command", '{"id": "op", "command": "pause", "guest": "x"}')
                reply = await operator.wait_for(lambda t, b: t.endswith("/command/reply"), what="the operator's reply")
                assert reply["id"] == "op"
                assert not any(t.endswith("/status") and b == {"online": False} for t, b, _ in operator.messages)
        finally:
            await link.stop()
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", broker.port):  # anonymous
                pass

    try:
        asyncio.run(scenario())
    finally:
        broker.stop()
    assert handled == ["op"]  # the intruder's command never reached the daemon
