"""systemd integration: the unit file, and the daemon's notify protocol over a real
NOTIFY_SOCKET datagram socket."""

from __future__ import annotations

import configparser
import socket
import subprocess
import sys
from pathlib import Path

from overcommitd.sdnotify import Notifier

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "overcommitd" / "systemd" / "overcommitd.service"
NODE = Path(__file__).parent / "data" / "testnode.xml"


def test_unit_is_notify_with_watchdog_and_restart() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(UNIT)
    svc = unit["Service"]
    assert svc["Type"] == "notify" and svc["Restart"] == "on-failure"
    assert int(svc["WatchdogSec"]) > 10 and "overcommitd run" in svc["ExecStart"]
    assert svc["ExecReload"].endswith("-HUP $MAINPID")


def test_notifier_is_silent_without_systemd() -> None:
    n = Notifier({})
    assert not n.enabled
    n.ready()  # no socket: nothing happens, nothing raises


def test_daemon_sends_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[libvirt]\nuri = "test://{NODE}"\n')
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000", "PATH": "/usr/bin:/bin"}
        out = subprocess.run(
            [sys.executable, "-m", "overcommitd", "run", "--once", "--config", str(cfg)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        got = []
        sock.settimeout(1)
        try:
            while True:
                got.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
    assert got[0].startswith("READY=1") and "WATCHDOG=1" in got and got[-1] == "STOPPING=1"
