"""The daemon's own cost on a real host: RSS and CPU per tick of ``overcommitd run``
against three real guests (tests/realguest: a private libvirtd, tiny Linux guests under
TCG) for N minutes.

Samples ``/proc/<pid>/status`` VmRSS and ``/proc/<pid>/stat`` utime+stime of the daemon
every few seconds; the tick count comes from the daemon itself (its status socket). CPU
per tick is taken between the first and the last sample after the first tick, so start-up
(imports, libvirt's first connection) is reported apart. Also prints each guest's
reasons as the daemon logged them (``event: reason``), and the status table at the end.

Real guests share /run/libvirt with other private libvirtds: hold the lock, be nice::

    flock /tmp/overcommitd-realguest.lock nice -n 10 \\
        .venv/bin/python benchmarks/daemon_soak.py --minutes 20
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from overcommitd import status
from tests.realguest.harness import GuestSpec, Libvirtd, console_text, domain_xml, wait_for

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Three guests that do different things: idle with page cache, a burst that comes and
# goes, and a steady holder (MiB@seconds, see tests/realguest/workload.c).
GUESTS = (
    GuestSpec("soak-idle", memory_mib=512, work="32@0"),
    GuestSpec("soak-burst", memory_mib=512, work="64@0,256@240,64@420,200@840,64@960"),
    GuestSpec("soak-steady", memory_mib=768, work="300@0", autodeflate=True),
)


@dataclass(frozen=True, slots=True)
class Sample:
    at_s: float
    rss_kib: int
    cpu_s: float
    ticks: int


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_s(pid: int) -> float:
    # fields after the ")" of comm: state is field 3, utime 14, stime 15 (proc(5))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def ticks(sock: Path) -> int:
    try:
        return status.read(sock, timeout_s=2.0).ticks
    except status.StatusError:
        return 0


def boot(conn: libvirt.virConnect, console_dir: Path) -> None:
    doms = [conn.createXML(domain_xml(spec, console_dir), 0) for spec in GUESTS]
    for spec, dom in zip(GUESTS, doms, strict=True):
        wait_for(lambda s=spec: "RG-READY" in console_text(console_dir, s.name), 300, f"{spec.name} to boot")
        wait_for(lambda d=dom: d.memoryStats().get("last_update", 0) > 0, 300, f"{spec.name}'s first stats")


def config(uri: str, sock: Path, interval_s: float, warmup_s: float) -> str:
    return f"""interval_s = {interval_s}
[policy]
name = "trim"
[policy.params]
warmup_s = {warmup_s}
trim_interval_s = 300.0
[libvirt]
uri = "{uri}"
[runner]
log_format = "json"
status_socket = "{sock}"
return_to_max_on_exit = true
"""


def report(samples: list[Sample], log_path: Path, final: status.DaemonStatus | None) -> None:
    first = next((s for s in samples if s.ticks > 0), samples[0])
    last = samples[-1]
    mib = 1024
    print(f"samples: {len(samples)} over {last.at_s - samples[0].at_s:.0f} s; ticks: {last.ticks}")
    print(
        f"RSS MiB: start {first.rss_kib / mib:.1f} (after tick {first.ticks}), end {last.rss_kib / mib:.1f},"
        f" max {max(s.rss_kib for s in samples) / mib:.1f}"
    )
    print(f"CPU: start-up {first.cpu_s * 1000:.0f} ms (to tick {first.ticks})")
    if last.ticks > first.ticks:
        per_tick_ms = (last.cpu_s - first.cpu_s) * 1000 / (last.ticks - first.ticks)
        print(f"CPU per tick: {per_tick_ms:.1f} ms over ticks {first.ticks}..{last.ticks}")
    reasons: dict[str, list[str]] = {}
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") == "reason":
            reasons.setdefault(rec["guest"], []).append(f"{rec['state']}: {rec['reason']}")
    print("reasons as logged (on change):")
    for guest, seen in sorted(reasons.items()):
        for r in seen:
            print(f"  {guest}: {r}")
    if final is not None:
        print(status.table(final))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--interval-s", type=float, default=10.0, help="the daemon's interval_s")
    ap.add_argument("--warmup-s", type=float, default=120.0, help="trim's warmup_s, so it acts during the run")
    ap.add_argument("--sample-s", type=float, default=5.0)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="overcommitd-soak-"))
    daemon = Libvirtd(work / "libvirtd")
    daemon.start()
    proc = None
    try:
        conn = libvirt.open(daemon.uri)
        boot(conn, work)
        print(f"booted {', '.join(s.name for s in GUESTS)}; libvirtd {daemon.uri}", flush=True)
        sock = work / "status.sock"
        cfg = work / "overcommitd.toml"
        cfg.write_text(config(daemon.uri, sock, args.interval_s, args.warmup_s))
        log_path = work / "daemon.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "overcommitd", "run", "--config", str(cfg)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        samples: list[Sample] = []
        t0 = time.monotonic()
        end_s = t0 + args.minutes * 60
        while time.monotonic() < end_s and proc.poll() is None:
            samples.append(Sample(time.monotonic() - t0, rss_kib(proc.pid), cpu_s(proc.pid), ticks(sock)))
            time.sleep(args.sample_s)
        if proc.poll() is not None:
            print(f"the daemon exited early with {proc.returncode}; see {log_path}")
            return 1
        samples.append(Sample(time.monotonic() - t0, rss_kib(proc.pid), cpu_s(proc.pid), ticks(sock)))
        final = status.read(sock) if sock.exists() else None
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        report(samples, log_path, final)
        print(f"daemon log: {log_path}")
        conn.close()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
