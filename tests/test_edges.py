"""The daemon's edges (issue 12): what comes over MQTT and from the config file can
neither import code nor stop the daemon, every size and duration has a range, floors stay
within a guest's maximum, a reload makes the running state match the file, commands need
authentication, and the broker hears ``online: false`` however the daemon leaves."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import libvirt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from overcommitd import package_version
from overcommitd.cli import main
from overcommitd.config import ConfigError, DaemonConfig, MqttConfig
from overcommitd.host import ProcHostReader
from overcommitd.hypervisor import libvirt_xml as lx
from overcommitd.hypervisor.libvirt import LibvirtHypervisor
from overcommitd.model import MAX_KIB, parse_kib
from overcommitd.runner import Daemon
from overcommitd.telemetry import messages as msg
from overcommitd.telemetry.mqtt import MqttLink
from policies import registry
from policies.api import PolicyLoadError
from tests.mqtt_probe import Probe
from tests.realguest.harness import Mosquitto
from tests.test_runner import AUTO, GIB, config_text, make_daemon

REPO = Path(__file__).resolve().parents[1]
HUGE = "9" * 400


def write(tmp_path: Path, text: str, name: str = "overcommitd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o640)
    return path


def parse(payload: dict[str, Any] | bytes) -> msg.Command:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return msg.parse_command(raw, "t/command")


def refused(payload: dict[str, Any] | bytes) -> msg.CommandError:
    with pytest.raises(msg.CommandError) as e:
        parse(payload)
    return e.value


# -- what a command payload can be ---------------------------------------------------------


@given(st.binary(max_size=300))
def test_no_payload_raises_anything_but_a_named_command_error(payload: bytes) -> None:
    try:
        msg.parse_command(payload, "t/command")
    except msg.CommandError as e:
        assert e.name in msg.ERROR_NAMES and e.name != "internal-error"


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=30,
    ),
    st.sampled_from(["set-floor", "pause", "set-policy", "dry-run", "prepare-migration"]),
)
def test_any_json_under_any_key_is_answered_by_name(value: object, command: str) -> None:
    for key in ("guest", "floor_kib", "name", "params", "enabled", "within_s", "id"):
        try:
            parse({"command": command, key: value})
        except msg.CommandError as e:
            assert e.name in ("invalid-command", "bad-guest-name", "policy-path-refused")


def test_the_payloads_that_killed_the_mqtt_task_get_named_errors() -> None:
    overflow = refused({"id": "o", "command": "set-floor", "guest": "plain", "floor_kib": HUGE + "GiB"})
    assert (overflow.name, overflow.id) == ("invalid-command", "o") and "floor_kib" in str(overflow)
    with pytest.raises(msg.CommandError) as e:
        msg.parse_command(b"[" * 100_000, "t/command", max_bytes=1 << 20)
    assert e.value.name == "bad-json" and "recursion" in str(e.value)
    assert refused(b"[" * 100_000).name == "payload-too-large"  # the default 64 KiB limit comes first


def test_sizes_have_a_range_on_the_wire() -> None:
    for floor in (2**64, -1, HUGE, "1e400", 1.5, True, "16PiB", f"{MAX_KIB + 1}"):
        e = refused({"command": "set-floor", "guest": "plain", "floor_kib": floor})
        assert e.name == "invalid-command" and "floor_kib" in str(e), floor
    assert parse({"command": "set-floor", "guest": "plain", "floor_kib": "1048576GiB"}).floor_kib == MAX_KIB  # type: ignore[union-attr]


def test_strict_types_on_the_wire() -> None:
    for enabled in ("yes", "true", 1, 0, None):
        assert refused({"command": "dry-run", "enabled": enabled}).name == "invalid-command"
    assert parse({"command": "dry-run", "enabled": False}).enabled is False  # type: ignore[union-attr]
    for within in ("5", "Infinity", True):
        assert refused({"command": "prepare-migration", "guest": "a", "within_s": within}).name == "invalid-command"
    assert refused(b'{"command": "prepare-migration", "guest": "a", "within_s": Infinity}').name == "invalid-command"


def test_control_characters_in_a_guest_name_and_module_paths_have_their_own_names() -> None:
    for name in ("a\x00b", "web\n1", "\x7f"):
        assert refused({"id": "n", "command": "pause", "guest": name}).name == "bad-guest-name"
    for spec in (":x", "this:X", "unittest.__main__:X", "os:system"):
        e = refused({"id": "p", "command": "set-policy", "name": spec})
        assert (e.name, e.id) == ("policy-path-refused", "p")


def test_every_error_name_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for name in msg.ERROR_NAMES:
        assert f"`{name}`" in readme, name


# -- nothing received imports code -----------------------------------------------------------


def test_registered_only_policy_creation_imports_nothing(tmp_path: Path) -> None:
    """In a fresh interpreter: neither ``this`` (which prints the Zen on import) nor
    ``unittest.__main__`` (which exits) is imported, and a module with a side effect is not run."""
    (tmp_path / "sideeffect_policy.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').write('yes')\nclass X: pass\n"
    )
    code = """
import sys
from policies import registry
from policies.api import ModulePathRefused
for spec in ("this:X", "unittest.__main__:X", "sideeffect_policy:X", ":x"):
    try:
        registry.create(spec, {}, allow_module_path=False)
    except ModulePathRefused as e:
        print("refused", spec)
print("loaded", sorted(m for m in ("this", "unittest.__main__", "sideeffect_policy") if m in sys.modules))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.count("refused") == 4 and "loaded []" in out.stdout, out.stdout + out.stderr
    assert "Beautiful is better than ugly" not in out.stdout
    assert not (tmp_path / "imported").exists()


def test_set_policy_over_mqtt_names_unknown_and_refused_policies(tmp_path: Path) -> None:
    d = make_daemon(tmp_path)

    async def answer(name: str, params: dict[str, object] | None = None) -> msg.Reply:
        try:
            cmd = msg.SwitchPolicy.model_construct(command="set-policy", name=name, params=params or {}, id="s")
            return await d.handle_command(cmd)
        except msg.CommandError as e:
            return msg.Reply(id=e.id, ok=False, error=e.name, message=str(e))

    async def scenario() -> list[msg.Reply]:
        await d.tick()
        return [
            await answer("this:X"),  # past the model's check (model_construct): the handler refuses too
            await answer("nope"),
            await answer("trim", {"warmup_s": -1}),
            await answer("trim", {"warmup_s": 60}),
        ]

    replies = asyncio.run(scenario())
    assert [r.error for r in replies] == ["policy-path-refused", "unknown-policy", "bad-policy", None]
    assert "this" not in sys.modules
    assert d.policy.name == "trim"


@pytest.mark.parametrize(
    "params",
    [{"warmup_s": float("nan")}, {"warmup_s": float("inf")}, {"trim_interval_s": 1e12}, {"x": {"y": float("-inf")}}],
)
def test_policy_params_are_finite_and_durations_within_a_year(params: dict[str, Any]) -> None:
    with pytest.raises(PolicyLoadError, match="bad parameters"):
        registry.create("trim", params)


def test_nan_policy_params_over_mqtt_are_a_bad_policy(tmp_path: Path) -> None:
    d = make_daemon(tmp_path)
    cmd = parse(b'{"command": "set-policy", "name": "pid", "params": {"warmup_s": NaN}}')
    with pytest.raises(msg.CommandError) as e:
        asyncio.run(d.handle_command(cmd))
    assert e.value.name == "bad-policy" and "finite" in str(e.value)
    d.hv.close()


@given(st.text(max_size=80))
def test_parse_kib_returns_an_int_or_raises_value_error(text: str) -> None:
    try:
        kib = parse_kib(text)
    except ValueError:
        return
    assert isinstance(kib, int) and kib >= 0


def test_a_config_file_may_still_name_module_class_and_a_bad_one_is_a_policy_error(tmp_path: Path) -> None:
    assert registry.create("tests.helpers:FixedPolicy").name == "fixed"
    with pytest.raises(PolicyLoadError, match="cannot load policy ':x'"):
        registry.create(":x")
    path = write(tmp_path, '[policy]\nname = ":x"\n')
    assert main(["check-config", str(path)]) == 2


# -- bounds in the config ------------------------------------------------------------------


def test_check_config_on_a_400_digit_size_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for text in (f'[guard]\nmin_guest_kib = "{HUGE}GiB"\n', f"[guard]\nmin_guest_kib = {HUGE}\n"):
        path = write(tmp_path, text)
        assert main(["check-config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "guard.min_guest_kib" in err and "Traceback" not in err, err


@pytest.mark.parametrize("value", ["inf", "nan", "1e-9", "0", "-1", "3601", "1e400"])
def test_interval_s_is_bounded(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        DaemonConfig.load(write(tmp_path, f"interval_s = {value}\n"))
    assert [key for key, _ in e.value.problems] == ["interval_s"]


def test_deep_nesting_in_the_config_is_a_syntax_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        DaemonConfig.load(write(tmp_path, "x = " + "[" * 100_000 + "\n"))
    assert e.value.problems[0][0] == "(syntax)"


@pytest.mark.parametrize(
    "text",
    [
        "[guard]\nsettle_s = inf\n",
        "[guard]\nauto_deflate_cooldown_s = 1e12\n",
        "[libvirt]\nreconnect_max_s = nan\n",
        "[mqtt]\nkeepalive_s = 70000\n",
        "[mqtt]\nmax_payload_bytes = 10\n",
        '[guests.x]\nfloor_kib = "2000PiB"\n',
        "[guests.x]\nweight = inf\n",
    ],
)
def test_durations_and_sizes_out_of_range_are_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        DaemonConfig.load(write(tmp_path, text))


def test_a_bad_reload_logs_and_keeps_the_running_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = make_daemon(tmp_path)
    path = tmp_path / "overcommitd.toml"
    for text in (f'[guard]\nmin_guest_kib = "{HUGE}GiB"\n', "interval_s = inf\n", "[policy]\nname = ':x'\n"):
        path.write_text(text)
        with caplog.at_level(logging.ERROR):
            d.reload()
        assert "reload failed, keeping the running config" in caplog.text
        caplog.clear()
        assert d.cfg.interval_s == 0.5 and d.policy.name == "fixed"


# -- floors ---------------------------------------------------------------------------------


def test_a_floor_above_the_maximum_is_refused_over_mqtt_and_nothing_is_written(tmp_path: Path) -> None:
    d = make_daemon(tmp_path)

    async def scenario() -> tuple[msg.CommandError, msg.Reply]:
        await d.tick()
        with pytest.raises(msg.CommandError) as e:
            await d.handle_command(msg.SetFloor(command="set-floor", guest="plain", floor_kib=2 * GIB + 1, id="f"))
        ok = await d.handle_command(msg.SetFloor(command="set-floor", guest="plain", floor_kib=2 * GIB, id="g"))
        return e.value, ok

    err, ok = asyncio.run(scenario())
    assert (err.name, err.id) == ("floor-above-max", "f") and "2097152" in str(err)
    assert ok.ok  # at the maximum is allowed
    d.hv.close()


def test_guest_set_floor_refuses_above_the_maximum_and_huge_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    conn = libvirt.open("test:///default")  # keeps the driver's state for the command's own connection

    def metadata() -> str | None:
        try:
            return str(conn.lookupByName("test").metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, lx.NAMESPACE))
        except libvirt.libvirtError:
            return None

    try:
        before = metadata()
        assert main(["guest", "set-floor", "test", "9GiB", "--uri", "test:///default"]) == 2
        assert "above the guest's maximum of 8388608 KiB" in capsys.readouterr().err
        assert main(["guest", "set-floor", "test", str(2**64), "--uri", "test:///default"]) == 2
        assert "SIZE:" in capsys.readouterr().err
        assert main(["guest", "set-floor", "test", HUGE + "GiB", "--uri", "test:///default"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not a size" in err
        assert metadata() == before  # nothing was written
        assert main(["guest", "set-floor", "test", "8GiB", "--uri", "test:///default"]) == 0  # the maximum itself
        assert '<floor unit="KiB">8388608</floor>' in (metadata() or "")
    finally:
        conn.close()


def test_a_config_floor_above_the_maximum_is_capped_and_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = make_daemon(tmp_path, target_kib=GIB, extra='[guests.autodeflate]\nfloor_kib = "64GiB"\n')

    async def ticks() -> list[Any]:
        return [await d.tick() for _ in range(3)]

    with caplog.at_level(logging.WARNING):
        reports = asyncio.run(ticks())
    warnings = [r for r in caplog.records if getattr(r, "event", None) == "floor-above-max"]
    assert len(warnings) == 1 and "autodeflate" in warnings[0].getMessage()
    for report in reports:
        decision = next(x for x in report.outcome.decisions if x.uuid == AUTO)
        assert decision.target_kib is None or decision.target_kib <= 4 * GIB


# -- reload makes the running state match the file ----------------------------------------


def test_reload_replaces_a_policy_set_over_mqtt_and_says_what_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = make_daemon(tmp_path)

    async def scenario() -> None:
        await d.tick()
        await d.handle_command(msg.SwitchPolicy(command="set-policy", name="trim"))
        await d.handle_command(msg.SetDryRun(command="dry-run", enabled=True))
        await d.handle_command(msg.PauseGuest(command="pause", guest="plain"))

    asyncio.run(scenario())
    assert d.policy.name == "trim" and d.dry_run
    with caplog.at_level(logging.INFO):
        d.reload()  # the file did not change: the running state did
    assert d.policy.name == "fixed" and not d.dry_run and not d.paused
    (line,) = [r for r in caplog.records if getattr(r, "event", None) == "reloaded"]
    changed = line.changes  # type: ignore[attr-defined]
    assert "policy.name: 'trim' -> 'tests.helpers:FixedPolicy'" in changed
    assert "runner.dry_run: True -> False" in changed
    assert any(c.startswith("policy.params:") for c in changed)
    assert "guests paused by command resumed: 1" in changed

    (tmp_path / "overcommitd.toml").write_text(config_text(extra="[guests.plain]\nweight = 2.0\n"))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        d.reload()
    (line,) = [r for r in caplog.records if getattr(r, "event", None) == "reloaded"]
    assert line.changes == ["guests.plain: added"]  # type: ignore[attr-defined]


# -- security by default ---------------------------------------------------------------------


def test_commands_are_off_by_default_and_need_authentication() -> None:
    assert MqttConfig().commands is False
    with pytest.raises(ValueError, match="allow_unauthenticated_commands"):
        MqttConfig(commands=True)
    with pytest.raises(ValueError, match="allow_unauthenticated_commands"):
        MqttConfig(commands=True, username="oc")  # a username alone authenticates nothing
    assert MqttConfig(commands=True, username="oc", password="x").authenticated
    assert MqttConfig(commands=True, cert_file=Path("c"), key_file=Path("k")).authenticated
    assert MqttConfig(commands=True, allow_unauthenticated_commands=True).commands


def test_unauthenticated_commands_are_warned_at_every_start(caplog: pytest.LogCaptureFixture) -> None:
    cfg = MqttConfig(enabled=True, commands=True, allow_unauthenticated_commands=True, port=9)

    async def start_stop() -> None:
        link = MqttLink(cfg, lambda c: None, lambda: msg.StatusMessage(online=True))  # type: ignore[arg-type,return-value]
        link.start()
        await link.stop()

    for _ in range(2):
        with caplog.at_level(logging.WARNING):
            asyncio.run(start_stop())
    assert sum(getattr(r, "event", None) == "unauthenticated-commands" for r in caplog.records) == 2


def test_password_file_is_read_at_load_and_its_errors_name_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    cfg = DaemonConfig.load(write(tmp_path, f'[mqtt]\nusername = "oc"\npassword_file = "{secret}"\n'))
    assert cfg.mqtt.password == "s3cret"
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as e:
        DaemonConfig.load(write(tmp_path, f'[mqtt]\nusername = "oc"\npassword_file = "{missing}"\n'))
    assert e.value.problems[0][0] == "mqtt.password_file" and str(missing) in e.value.problems[0][1]
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="world-readable"):
        DaemonConfig.load(write(tmp_path, f'[mqtt]\nusername = "oc"\npassword_file = "{secret}"\n'))


def test_a_world_readable_config_holding_a_password_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[mqtt]\nusername = "oc"\npassword = "s3cret"\n')
    assert DaemonConfig.load(path).mqtt.password == "s3cret"  # 0640
    path.chmod(0o644)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "world-readable (mode 0644)" in err and "chmod 0640" in err and "s3cret" not in err
    assert main(["run", "--once", "--config", str(path)]) == 2


# -- offline on every exit -------------------------------------------------------------------


class BrokenHypervisor(LibvirtHypervisor):
    """The test driver, until ``broken``: then a snapshot fails in a way the daemon does not expect."""

    broken = False

    def snapshot(self):  # type: ignore[no-untyped-def]
        if self.broken:
            raise RuntimeError("a bug in a backend")
        return super().snapshot()


def test_an_error_exit_leaves_the_status_offline_with_a_version(tmp_path: Path, broker: Mosquitto) -> None:
    path = write(
        tmp_path,
        config_text(extra=f'[mqtt]\nenabled = true\nport = {broker.port}\nhost_id = "err"\nreconnect_min_s = 0.1\n'),
    )
    cfg = DaemonConfig.load(path)
    hv = BrokenHypervisor(cfg.libvirt)
    d = Daemon(cfg, hv, ProcHostReader(), config_path=path, make_policy=registry.create)

    async def scenario() -> list[dict[str, Any]]:
        async with Probe(broker.port, "overcommitd/err/status") as probe:
            d_task = asyncio.create_task(d.run())
            await probe.wait_for(lambda t, b: b.get("online") is True, what="online")
            hv.broken = True
            with pytest.raises(RuntimeError, match="a bug in a backend"):
                await asyncio.wait_for(d_task, 30)
            await probe.wait_for(lambda t, b: b.get("online") is False, what="offline after the error")
            return [b for _, b, _ in probe.messages]

    seen = asyncio.run(scenario())
    assert seen[-1] == {"online": False, "dry_run": None, "policy": None, "version": package_version()}


def test_a_failed_mqtt_session_says_offline_restarts_and_answers_again(
    broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = MqttConfig(
        enabled=True,
        commands=True,
        allow_unauthenticated_commands=True,
        port=broker.port,
        host_id="crash",
        reconnect_min_s=0.1,
        reconnect_max_s=0.2,
    )

    async def handler(cmd: msg.Command) -> msg.Reply:
        return msg.Reply(id=cmd.id, ok=True, message="handled")

    link = MqttLink(cfg, handler, lambda: msg.StatusMessage(online=True, version=package_version()))
    real = link._publish_forever
    failures = [RuntimeError("injected fault in the publishing task")]

    async def flaky(client: Any) -> None:
        if failures:
            await asyncio.sleep(0.3)
            raise failures.pop()
        await real(client)

    link._publish_forever = flaky  # type: ignore[method-assign]

    async def scenario() -> list[bool]:
        async with Probe(broker.port, "overcommitd/crash/#") as probe:
            link.start()
            try:
                await probe.wait_for(lambda t, b: t.endswith("/status") and b["online"] is False, what="offline")
                await probe.wait_for(
                    lambda t, b: t.endswith("/status") and b["online"] is True and not failures, what="online again"
                )
                await asyncio.sleep(0.3)
                await probe.send("overcommitd/crash/command", '{"id": "after", "command": "dry-run", "enabled": true}')
                reply = await probe.wait_for(lambda t, b: t.endswith("/reply") and b["id"] == "after")
                assert reply["ok"] is True
                await probe.send("overcommitd/crash/command", b"x" * 70_000)
                big = await probe.wait_for(lambda t, b: t.endswith("/reply") and b.get("error") == "payload-too-large")
                assert "70000 bytes" in big["message"]
            finally:
                await link.stop()
            return [b["online"] for t, b, _ in probe.messages if t.endswith("/status")]

    with caplog.at_level(logging.WARNING):
        statuses = asyncio.run(scenario())
    assert statuses[-1] is False and False in statuses[:-1] and True in statuses
    assert any(getattr(r, "event", None) == "mqtt-session-failed" for r in caplog.records)
    assert not any("x" * 100 in r.getMessage() for r in caplog.records)  # never logged whole


def test_with_commands_off_a_command_is_never_handled(broker: Mosquitto) -> None:
    cfg = MqttConfig(enabled=True, port=broker.port, host_id="nocmd", reconnect_min_s=0.1)
    handled: list[msg.Command] = []

    async def handler(cmd: msg.Command) -> msg.Reply:
        handled.append(cmd)
        return msg.Reply(id=cmd.id, ok=True)

    async def scenario() -> list[str]:
        link = MqttLink(cfg, handler, lambda: msg.StatusMessage(online=True))
        async with Probe(broker.port, "overcommitd/nocmd/#") as probe:
            link.start()
            try:
                await probe.wait_for(lambda t, b: t.endswith("/status") and b["online"], what="online")
                await probe.send("overcommitd/nocmd/command", '{"id": "x", "command": "dry-run", "enabled": true}')
                link.offer("overcommitd/nocmd/after", msg.StatusMessage(online=True))  # sent after the command
                await probe.wait_for(lambda t, b: t.endswith("/after"), what="the message sent after")
                await asyncio.sleep(0.5)  # a reply would have come long before (replies take ~ms here)
            finally:
                await link.stop()
            return [t for t, _, _ in probe.messages]

    topics = asyncio.run(scenario())
    assert handled == [] and not any(t.endswith("/reply") for t in topics)
