"""The daemon's CLI subcommands through the front door, and its structured logs."""

from __future__ import annotations

import json
import logging

import libvirt
import pytest

from overcommitd.cli import main
from overcommitd.logs import JsonFormatter

GIB = 1024**2


def test_guest_set_floor_writes_the_domain_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    """test:///default keeps its state while any connection to it is open, so ours, opened
    first, reads back what the command wrote on its own."""
    conn = libvirt.open("test:///default")
    try:
        assert main(["guest", "set-floor", "test", "1.5GiB", "--uri", "test:///default"]) == 0
        assert "floor 1572864 KiB" in capsys.readouterr().out
        xml = conn.lookupByName("test").metadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT, "https://overcommitd.dev/xmlns/guest/1"
        )
    finally:
        conn.close()
    assert '<floor unit="KiB">1572864</floor>' in xml


def test_guest_set_floor_names_a_bad_size_and_a_missing_guest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["guest", "set-floor", "test", "lots", "--uri", "test:///default"]) == 2
    assert "SIZE: 'lots' is not a size" in capsys.readouterr().err
    assert main(["guest", "set-floor", "nosuch", "1GiB", "--uri", "test:///default"]) == 2
    assert "no guest named or with UUID 'nosuch'" in capsys.readouterr().err


def test_json_logs_carry_extra_fields() -> None:
    record = logging.makeLogRecord(
        {
            "msg": "guest %s: target %d KiB",
            "args": ("web1", 42),
            "levelname": "INFO",
            "name": "overcommitd.runner",
            "guest": "web1",
            "target_kib": 42,
        }
    )
    out = json.loads(JsonFormatter().format(record))
    assert out["msg"] == "guest web1: target 42 KiB" and out["guest"] == "web1" and out["target_kib"] == 42
    assert out["level"] == "info" and out["ts"].endswith("Z")
