"""`overcommitd status`: the daemon's read-only status socket, each guest's reason, the
reason logged only when it changes, and the dry-run --once table."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overcommitd import status
from overcommitd.cli import _load, main
from overcommitd.config import DaemonConfig, GuardConfig
from overcommitd.model import Clamp, ClampReason, Decision
from policies.testing import GIB, MIB, guest
from tests.test_runner import NODE, make_daemon

REPO = Path(__file__).resolve().parents[1]


def test_explain_puts_the_policy_first_then_the_guard_and_skips_a_no_change_dead_band() -> None:
    g = guest("a", max_kib=2 * GIB, last_target_kib=2 * GIB)
    still = Decision(
        g.uuid, g.name, None, 2 * GIB, (Clamp(ClampReason.DEAD_BAND, 2 * GIB, None, "+0 KiB"),), "warm-up: 5 min left"
    )
    assert status.explain(still, g) == "warm-up: 5 min left"
    small = Decision(
        g.uuid,
        g.name,
        None,
        2 * GIB - 8 * MIB,
        (Clamp(ClampReason.DEAD_BAND, 2 * GIB - 8 * MIB, None, "-8192 KiB from 2097152"),),
    )
    assert status.explain(small, g) == "dead-band: -8192 KiB from 2097152"
    stale = Decision(
        g.uuid,
        g.name,
        None,
        GIB,
        (Clamp(ClampReason.STALE_STATS, GIB, 2 * GIB, "stats are 90 s old, limit 30 s"),),
        "squeezing to keep 1024 MiB",
    )
    assert status.explain(stale, g) == "squeezing to keep 1024 MiB; stale-stats: stats are 90 s old, limit 30 s"
    assert status.explain(Decision(g.uuid, g.name, None, None), g) == "at the policy's wish"


def test_a_reason_is_logged_when_its_wording_changes_not_when_a_number_does(caplog: pytest.LogCaptureFixture) -> None:
    g = guest("web1", max_kib=2 * GIB)

    def doc(why: str) -> status.DaemonStatus:
        d = Decision(g.uuid, g.name, None, 2 * GIB, (), why)
        return status.build([g], [d], frozenset(), GuardConfig(), policy="trim", dry_run=False, ticks=1, interval_s=10)

    log = status.ReasonLog()
    caplog.set_level(logging.INFO, logger="overcommitd.status")
    assert [x.name for x in log.update(doc("warm-up: 42 min left"))] == ["web1"]
    assert log.update(doc("warm-up: 41 min left")) == []
    assert [x.why for x in log.update(doc("next squeeze in 360 min"))] == ["next squeeze in 360 min"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["guest web1 held: warm-up: 42 min left", "guest web1 held: next squeeze in 360 min"]
    assert caplog.records[0].__dict__["event"] == "reason"


def test_status_socket_serves_every_guest_read_only_and_goes_away_on_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "run" / "status.sock"
    d = make_daemon(tmp_path, target_kib=1 * GIB, extra=f'status_socket = "{sock}"')

    async def scenario() -> tuple[status.DaemonStatus, int, str]:
        runner = asyncio.create_task(d.run())
        while d.last_status is None or not sock.exists():
            await asyncio.sleep(0.05)
        doc = await asyncio.to_thread(status.read, sock)
        code = await asyncio.to_thread(main, ["status", "--config", str(tmp_path / "overcommitd.toml")])
        mode = stat.S_IMODE(sock.stat().st_mode)
        d.stopping.set()
        await runner
        return doc, code, oct(mode)

    doc, code, mode = asyncio.run(scenario())
    assert mode == oct(status.SOCKET_MODE) and not sock.exists()
    rows = {g.name: g for g in doc.guests}
    assert set(rows) == {"plain", "autodeflate"} and doc.policy == "fixed"
    auto = rows["autodeflate"]  # 3 GiB of 4 GiB, floor 768 MiB from its metadata, asked to go to 1 GiB
    assert (auto.actual_kib, auto.max_kib, auto.floor_kib, auto.wish_kib) == (3 * GIB, 4 * GIB, 768 * MIB, GIB)
    assert auto.state == "held" and auto.why.startswith("missing-stats: ")
    out = capsys.readouterr().out
    assert code == 0 and "autodeflate" in out and "missing-stats" in out and "GUEST" in out


def test_status_without_a_daemon_names_the_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--socket", str(tmp_path / "none.sock")]) == 2
    err = capsys.readouterr().err
    assert "none.sock: no status socket: is the daemon running" in err


def test_before_the_first_tick_the_status_says_the_daemon_is_starting(tmp_path: Path) -> None:
    d = make_daemon(tmp_path)
    doc = status.DaemonStatus.model_validate_json(d.status_document())
    assert doc.ticks == 0 and doc.guests == () and doc.policy == "fixed"
    assert status.table(doc).splitlines()[-1] == "(no tick yet: the daemon is starting)"


def test_a_socket_another_daemon_serves_is_left_alone(tmp_path: Path) -> None:
    sock = tmp_path / "status.sock"

    async def scenario() -> tuple[bool, bool, bytes]:
        first = status.StatusServer(sock, lambda: b'"first"')
        second = status.StatusServer(sock, lambda: b'"second"')
        started = await first.start(), await second.start()
        reader, writer = await asyncio.open_unix_connection(str(sock))
        got = await reader.read()
        writer.close()
        await first.stop()
        await second.stop()
        return started[0], started[1], got

    first_ok, second_ok, got = asyncio.run(scenario())
    assert first_ok and not second_ok and got == b'"first"'


def test_dry_run_once_prints_a_decision_per_guest_and_names_its_config(tmp_path: Path) -> None:
    cfg = tmp_path / "oc.toml"
    cfg.write_text(f'[libvirt]\nuri = "test://{NODE}"\n[runner]\nstatus_socket = "{tmp_path / "s.sock"}"\n')
    env = {"PATH": os.environ["PATH"], "OVERCOMMITD_CONFIG": str(cfg)}
    out = subprocess.run(
        [sys.executable, "-m", "overcommitd", "run", "--dry-run", "--once", "--log-format", "text"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert f"config {cfg} (default" in out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("policy trim (dry-run), tick 1")
    assert lines[1].split()[:7] == ["GUEST", "ACTUAL", "TARGET", "FLOOR", "MAX", "WISH", "STATE"]
    plain = next(x for x in lines if x.startswith("plain "))
    assert plain.split()[1:3] == ["2048M", "-"] and "no stats from the guest yet" in plain


def test_without_a_config_the_default_path_is_used_or_defaults_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import libvirt

    cfg = tmp_path / "oc.toml"
    cfg.write_text('[libvirt]\nuri = "test:///default"\n')
    monkeypatch.setenv("OVERCOMMITD_CONFIG", str(cfg))
    conn = libvirt.open("test:///default")  # keeps the driver's state for the read-back
    try:
        assert main(["guest", "set-floor", "test", "768MiB"]) == 0  # the URI comes from the default file
        xml = conn.lookupByName("test").metadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT, "https://overcommitd.dev/xmlns/guest/1"
        )
    finally:
        conn.close()
    assert '<floor unit="KiB">786432</floor>' in xml
    assert f"config {cfg} (default" in capsys.readouterr().err
    missing = tmp_path / "absent.toml"
    monkeypatch.setenv("OVERCOMMITD_CONFIG", str(missing))
    cfg_used, _which = _load(argparse.Namespace(config=None))  # what run, set-floor and status call
    err = capsys.readouterr().err
    assert f"no config at {missing}" in err and "using defaults" in err
    assert cfg_used == DaemonConfig() and cfg_used.runner.status_socket == "/run/overcommitd/status.sock"


def test_the_mqtt_decision_carries_the_policys_reason() -> None:
    from overcommitd.telemetry.messages import DecisionMessage

    d = Decision("u", "web1", None, 2 * GIB, (), "warm-up: 5 min left")
    m = DecisionMessage.of(d, applied=False)
    assert DecisionMessage.model_validate_json(m.model_dump_json()).policy_reason == "warm-up: 5 min left"


@settings(max_examples=60, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=2000),
        st.integers(1, 200_000).map(lambda n: b"[" * n),
        st.integers(1, 200_000).map(lambda n: b'{"policy":' * n),
        st.just(b'{"policy": "trim", "dry_run": "yes", "ticks": 1e400}'),
    )
)
def test_a_garbled_status_document_is_a_named_error_never_a_traceback(payload: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        sock = Path(d) / "s.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(sock))
            server.listen()

            def serve() -> None:
                conn, _ = server.accept()
                with conn:
                    conn.sendall(payload)

            t = threading.Thread(target=serve)
            t.start()
            with pytest.raises(status.StatusError, match="not a status document"):
                status.read(sock)
            t.join()


@pytest.mark.parametrize("bad", ["relative.sock", "/" + "x" * 200, "/run/a\0b"])
def test_a_bad_status_socket_path_is_refused_with_its_key(bad: str) -> None:
    from overcommitd.config import ConfigError

    with pytest.raises(ConfigError, match=r"runner.status_socket: Value error, must be an absolute path"):
        DaemonConfig.load(None, runner={"status_socket": bad})
