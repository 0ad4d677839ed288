"""Hostile commands against a real daemon process on a real mosquitto (libvirt's test
driver): a fixed corpus of the payloads that once broke it, plus hypothesis-generated
commands. Every payload is answered with a named error or ``ok``; afterwards a valid
command is answered within one tick, the daemon still ticks, nothing was imported, and
it exits cleanly, saying ``online: false``. Also here: SIGHUP on a daemon with a long
interval is served at once, and a bad file on SIGHUP keeps the daemon running."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from overcommitd import package_version
from overcommitd.telemetry.messages import ERROR_NAMES
from tests.mqtt_probe import Probe
from tests.realguest.harness import Mosquitto, wait_for

REPO = Path(__file__).resolve().parents[1]
NODE = Path(__file__).parent / "data" / "testnode.xml"
INTERVAL_S = 0.5
COMMANDS = ["set-floor", "pause", "resume", "prepare-migration", "cancel-migration", "set-policy", "dry-run"]
FIELDS = ["guest", "floor_kib", "name", "params", "enabled", "within_s"]
MODULE_PATHS = [
    "this:X",
    "unittest.__main__:X",
    "sideeffect_policy:X",
    "os:system",
    ":x",
    "a:",
    "tests.helpers:Raising",
]


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log: Path
    cfg: Path
    base: str
    marker: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out


def config(broker_port: int, host_id: str, *, interval_s: float = INTERVAL_S, extra: str = "") -> str:
    return f"""interval_s = {interval_s}
[policy]
name = "tests.helpers:FixedPolicy"
params = {{ target_kib = 4194304 }}
[libvirt]
uri = "test://{NODE}"
[mqtt]
enabled = true
commands = true
allow_unauthenticated_commands = true
port = {broker_port}
host_id = "{host_id}"
keepalive_s = 5
[runner]
dry_run = true
log_format = "json"
{extra}"""


def start(tmp_path: Path, text: str, host_id: str) -> Daemon:
    """The daemon, with a module on its path that leaves a marker file if ever imported."""
    marker = tmp_path / "imported"
    (tmp_path / "sideeffect_policy.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass X: pass\n")
    cfg = tmp_path / "overcommitd.toml"
    cfg.write_text(text)
    log = tmp_path / "daemon.log"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "overcommitd", "run", "--config", str(cfg)],
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return Daemon(proc, log, cfg, f"overcommitd/{host_id}", marker)


@pytest.fixture
def daemon(tmp_path: Path, broker: Mosquitto) -> Iterator[Daemon]:
    host_id = f"fz{tmp_path.name[-8:]}".replace("_", "")
    d = start(tmp_path, config(broker.port, host_id), host_id)
    yield d
    if d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait(10)


# -- the payloads ----------------------------------------------------------------------------


def fixed_corpus() -> list[bytes | dict[str, Any]]:
    """What broke the daemon before, and its neighbours. Dicts get an ``id`` when sent."""
    huge = "9" * 400
    corpus: list[bytes | dict[str, Any]] = [
        b"",
        b"{",
        b"{not json",
        b"null",
        b"[]",
        b'"set-floor"',
        b"\xff\xfe\x00",
        b"{'command': 'pause'}",
        b"[" * 100_000,  # RecursionError once; now above the size limit
        b"[" * 60_000,  # under the limit: pydantic's parser bounds nesting
        b'{"a":' * 10_000,
        b"9" * 5000,
        b"x" * 1_000_000,
        json.dumps({"command": "pause", "guest": "g" * 1_000_000}).encode(),
        json.dumps({"command": "set-policy", "name": "trim", "params": {"p": "v" * 70_000}}).encode(),
        b'{"command": "set-floor", "guest": "plain", "floor_kib": ' + b"9" * 4400 + b"}",
        b'{"command": "prepare-migration", "guest": "plain", "within_s": Infinity}',
        b'{"command": "set-policy", "name": "trim", "params": {"warmup_s": NaN}}',
        b'{"command": "dry-run", "enabled": true, "id": "dup", "id": "dup2"}',
    ]
    nested: Any = 1
    for _ in range(150):
        nested = {"n": nested}
    corpus.append({"command": "set-policy", "name": "trim", "params": {"deep": nested}})  # bad-policy
    corpus.append(json.dumps({"command": "set-policy", "name": "trim", "params": [nested, nested]}).encode())
    corpus.append(json.dumps({"id": "deep", "params": {"n": [nested] * 3}}).encode())  # past the parser's depth
    corpus += [
        {"command": "set-floor", "guest": "plain", "floor_kib": "3GiB"},  # above its 2 GiB maximum
        {"command": "set-floor", "guest": "autodeflate", "floor_kib": "1048576GiB"},
        {"command": "set-floor", "guest": "plain", "floor_kib": "1GiB"},  # ok
        {"command": "set-floor", "guest": "plain", "floor_kib": 0},  # ok: no floor
        {"command": "set-policy", "name": "trim", "params": {"warmup_s": -1}},  # bad-policy
        {"command": "pause", "guest": "plain"},  # ok
        {"command": "resume", "guest": "11111111-1111-1111-1111-111111111111"},  # ok, by UUID
    ]
    for floor in (huge + "GiB", huge, 2**64, 2**64 * 1024, -1, "-5GiB", 1e300, "1e400", 1.5, True, None, [], {}):
        corpus.append({"command": "set-floor", "guest": "plain", "floor_kib": floor})
    for guest in ("nosuch", "a\x00b", "\x00", "web\n1", "\x1b[31mred", "../../etc", "+/#", "x" * 2000, "", 7):
        for command in ("set-floor", "pause", "resume", "prepare-migration", "cancel-migration"):
            corpus.append(
                {"command": command, "guest": guest, "floor_kib": "1GiB"}
                if command == "set-floor"
                else {"command": command, "guest": guest}
            )
    for name in MODULE_PATHS + ["nope", "", "\x00", "trim\n", "TRIM", "trim" * 100]:
        corpus.append({"command": "set-policy", "name": name})
    for enabled in ("yes", "true", 1, 0, None, [True]):
        corpus.append({"command": "dry-run", "enabled": enabled})
    for within in (-5, 0, 1e9, "5", True, None):
        corpus.append({"command": "prepare-migration", "guest": "plain", "within_s": within})
    corpus += [{"command": c} for c in COMMANDS] + [{"command": c, "extra": 1} for c in COMMANDS]
    corpus += [{"command": "reboot"}, {"command": None}, {"command": ["pause"]}, {"id": 5, "command": "pause"}]
    return corpus


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=5),
    st.sampled_from(["plain", "autodeflate", "1GiB", "512MiB", "9" * 50 + "GiB", "-1", "trim", *MODULE_PATHS]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@st.composite
def commands(draw: st.DrawFn) -> dict[str, Any]:
    """A command name and a random subset of fields with values of any type."""
    body: dict[str, Any] = {"command": draw(st.sampled_from(COMMANDS + ["nope"]))}
    for key in draw(st.lists(st.sampled_from(FIELDS + ["zzz"]), max_size=4, unique=True)):
        body[key] = draw(VALUES)
    return body


SIZES = st.one_of(
    st.integers(min_value=-(2**66), max_value=2**66),
    st.builds(
        lambda n, u: f"{n}{u}",
        st.integers(min_value=-5, max_value=10**30),
        st.sampled_from(["", "KiB", "MiB", "GiB", "TiB", "PiB", "x"]),
    ),
)
GUESTS = st.one_of(
    st.sampled_from(["plain", "autodeflate", "11111111-1111-1111-1111-111111111111", "nosuch"]),
    st.text(max_size=12),
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=12),
)


@st.composite
def well_typed(draw: st.DrawFn) -> dict[str, Any]:
    """Commands of the right shape with hostile values: huge, negative, unknown, control characters."""
    command = draw(st.sampled_from(COMMANDS))
    body: dict[str, Any] = {"command": command}
    if command == "set-policy":
        body["name"] = draw(
            st.sampled_from(["trim", "pid", "headroom", "sla-floor", *MODULE_PATHS]) | st.text(max_size=10)
        )
        body["params"] = draw(
            st.dictionaries(st.sampled_from(["warmup_s", "min_gain_kib", "nope"]), VALUES, max_size=2)
        )
    elif command == "dry-run":
        body["enabled"] = draw(st.booleans() | VALUES)
    else:
        body["guest"] = draw(GUESTS)
        if command == "set-floor":
            body["floor_kib"] = draw(SIZES)
        if command == "prepare-migration":
            body["within_s"] = draw(st.floats(allow_nan=False, allow_infinity=False) | st.integers())
    return body


def generated(n: int) -> list[dict[str, Any]]:
    """``n`` hypothesis examples, reproducibly (derandomized), used as a corpus."""
    out: list[dict[str, Any]] = []

    @settings(max_examples=n, derandomize=True, database=None, phases=[Phase.generate])
    @given(commands() | well_typed())
    def collect(body: dict[str, Any]) -> None:
        out.append(body)

    collect()
    return out


def encode(i: int, item: bytes | dict[str, Any]) -> tuple[bytes, str | None]:
    if isinstance(item, bytes):
        return item, None
    body = {"id": f"f{i}"} | item if "id" not in item else item
    return json.dumps(body).encode(), body["id"] if isinstance(body["id"], str) else None


# -- the test --------------------------------------------------------------------------------


def test_hostile_payloads_are_all_answered_by_name_and_the_daemon_keeps_ticking(
    daemon: Daemon, broker: Mosquitto
) -> None:
    corpus = fixed_corpus()
    corpus += generated(max(420, 520 - len(corpus)))
    payloads = [encode(i, item) for i, item in enumerate(corpus)]
    assert len(payloads) >= 500
    base = daemon.base

    async def scenario() -> tuple[list[dict[str, Any]], float, int]:
        async with Probe(broker.port, f"{base}/#") as probe:
            status = await probe.wait_for(lambda t, b: t == f"{base}/status" and b.get("online"), what="online")
            assert status["version"] == package_version()
            await probe.wait_for(lambda t, b: t == f"{base}/host", what="a first tick")
            started = time.monotonic()
            for payload, _ in payloads:
                await probe.send(f"{base}/command", payload)

            def replies() -> list[dict[str, Any]]:
                return [b for t, b, _ in probe.messages if t == f"{base}/command/reply"]

            while len(replies()) < len(payloads):
                assert daemon.proc.poll() is None, daemon.text()[-3000:]
                assert time.monotonic() - started < 120, f"{len(replies())} of {len(payloads)} replies"
                await asyncio.sleep(0.1)
            elapsed_s = time.monotonic() - started
            answered = replies()

            # A valid command now is answered before the daemon's next tick is over...
            mark = len(probe.messages)
            await probe.send(f"{base}/command", json.dumps({"id": "final", "command": "dry-run", "enabled": True}))
            final = await probe.wait_for(lambda t, b: t.endswith("/command/reply") and b.get("id") == "final")
            assert final["ok"] is True, final
            after = probe.messages[mark:]
            reply_at = next(i for i, (t, b, _) in enumerate(after) if t.endswith("/reply") and b.get("id") == "final")
            ticks_before_reply = sum(t == f"{base}/host" for t, _, _ in after[:reply_at])
            # ... and it still ticks: two more host snapshots, later ones.
            seen = len(probe.messages)
            await probe.wait_for(
                lambda t, b: sum(tt == f"{base}/host" for tt, _, _ in probe.messages[seen:]) >= 2, what="two ticks"
            )
            daemon.proc.send_signal(signal.SIGTERM)
            await probe.wait_for(lambda t, b: t == f"{base}/status" and b.get("online") is False, what="goodbye")
            return answered, elapsed_s, ticks_before_reply

    got, elapsed_s, ticks_before_reply = asyncio.run(scenario())
    assert daemon.proc.wait(30) == 0, daemon.text()[-3000:]

    by_error = Counter("ok" if r["ok"] else r["error"] for r in got)
    print(f"\nfuzz: {len(payloads)} payloads, {len(got)} replies in {elapsed_s:.1f} s: {dict(by_error.most_common())}")
    assert len(got) == len(payloads)  # one reply per payload, none lost, none doubled
    assert all(r["ok"] or r["error"] in ERROR_NAMES for r in got)
    assert by_error["internal-error"] == 0, [r for r in got if r["error"] == "internal-error"][:3]
    sent_ids = [i for _, i in payloads if i is not None]
    answered_ids = Counter(r["id"] for r in got if isinstance(r["id"], str) and r["id"].startswith("f"))
    assert answered_ids == Counter(sent_ids)  # each command's error reply carries its id
    for name in ("payload-too-large", "bad-json", "invalid-command", "bad-guest-name", "no-such-guest"):
        assert by_error[name] > 0, name
    for name in ("policy-path-refused", "unknown-policy", "floor-above-max"):
        assert by_error[name] > 0, name
    assert ticks_before_reply <= 1

    text = daemon.text()
    assert not daemon.marker.exists(), "a module named over MQTT was imported"
    assert "Beautiful is better than ugly" not in text and "Traceback" not in text
    assert "x" * 1000 not in text and "[" * 1000 not in text  # big payloads never logged whole
    assert any(e.get("event") == "stopped" for e in daemon.events())


def test_sighup_is_served_at_once_and_a_bad_file_keeps_the_daemon(tmp_path: Path, broker: Mosquitto) -> None:
    """An hour between ticks: a reload must not wait for the next one."""
    d = start(tmp_path, config(broker.port, "hup", interval_s=3600), "hup")
    try:
        wait_for(lambda: '"event": "target"' in d.text(), 60, "the first tick")
        d.cfg.write_text(
            config(broker.port, "hup", interval_s=3600, extra=f'[guests.plain]\nfloor_kib = "{"9" * 400}GiB"\n')
        )
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: '"event": "reload-failed"' in d.text(), 20, "the failed reload")
        assert d.proc.poll() is None and "guests.plain.floor_kib" in d.text()
        d.cfg.write_text(config(broker.port, "hup", interval_s=3600, extra="[guests.plain]\nweight = 2.0\n"))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: '"event": "reloaded"' in d.text(), 20, "the reload")
        (reloaded,) = [e for e in d.events() if e.get("event") == "reloaded"]
        assert reloaded["changes"] == ["guests.plain: added"]
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)
