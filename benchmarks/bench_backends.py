"""What reading and setting 100 guests costs through each hypervisor backend.

QMP: ``QmpHypervisor`` against N scripted QMP servers (tests/qmp_server.py: real QMP over
unix sockets, answered as QEMU 7.2 does) running in a separate process, so the servers'
CPU is not billed to the daemon; both session modes (``keep_connected`` true: held
sessions, false: one session per operation, the default). libvirt: ``LibvirtHypervisor``
on libvirt's test driver with N defined, running domains (a generated
``test:///<node.xml>``). The test driver runs inside the process, with no RPC, and has
no bulk balloon stats, so the libvirt backend pays one ``info`` call per guest there;
on a real host it is one ``getAllDomainStats`` RPC to libvirtd, and libvirtd in turn
talks QMP to every QEMU (``query-balloon`` and ``qom-get guest-stats`` per guest). The
figures are medians over ``--ticks`` ticks after a warm-up tick (which probes every
guest): a snapshot of every guest, and one target set on every guest.

    .venv/bin/python benchmarks/bench_backends.py [--guests 100] [--ticks 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from overcommitd.config import LibvirtConfig, QmpConfig
from overcommitd.hypervisor.libvirt import LibvirtHypervisor
from overcommitd.hypervisor.qmp import QmpHypervisor

REPO = Path(__file__).resolve().parents[1]

MIB_KIB = 1024


def serve(directory: Path, n: int) -> None:
    """Child process: N fake QEMU monitors in ``directory`` until stdin closes."""
    sys.path.insert(0, str(REPO))  # the scripted servers live with the tests
    from tests.qmp_server import MIB, FakeQemuHost

    host = FakeQemuHost(directory)
    for i in range(n):
        host.add(f"{100 + i}", name=f"bench-{i}", uuid=f"{i:08x}-0000-4000-8000-000000000000", base_memory=2048 * MIB)
    print("ready", flush=True)
    sys.stdin.read()
    host.close()


def node_xml(n: int) -> str:
    domains = "".join(
        f"""<domain type='test'><name>bench-{i}</name><uuid>{i:08x}-0000-4000-8000-000000000000</uuid>
<memory unit='MiB'>2048</memory><currentMemory unit='MiB'>2048</currentMemory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os><devices><memballoon model='virtio'><stats period='5'/></memballoon></devices>
</domain>"""
        for i in range(n)
    )
    return f"<node>{domains}</node>"


def measure(hv: Any, n: int, ticks: int) -> tuple[float, float, float]:
    """Median seconds of a snapshot and of setting every guest's target; commands per tick."""
    guests = hv.snapshot()  # warm-up: connects and probes every guest
    assert len(guests) == n, f"expected {n} guests, saw {len(guests)}"
    snap_s, set_s = [], []
    before = sum(hv.calls.values())
    for t in range(ticks):
        started = time.perf_counter()
        guests = hv.snapshot()
        snap_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        for g in guests:
            hv.set_target(g.uuid, (1536 if t % 2 else 1600) * MIB_KIB)
        set_s.append(time.perf_counter() - started)
    per_tick = (sum(hv.calls.values()) - before) / ticks
    return statistics.median(snap_s), statistics.median(set_s), per_tick


def row(name: str, hv: Any, n: int, ticks: int) -> None:
    snap_s, set_s, calls = measure(hv, n, ticks)
    print(f"{name:<34} {snap_s * 1000:>10.1f} {set_s * 1000:>12.1f} {calls:>16.0f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guests", type=int, default=100)
    p.add_argument("--ticks", type=int, default=20)
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.guests)
        return 0
    n, ticks = args.guests, args.ticks
    print(f"{n} guests, median of {ticks} ticks")
    print(f"{'backend':<34} {'snapshot ms':>10} {'set all ms':>12} {'calls (read+set)':>16}")
    with tempfile.TemporaryDirectory(prefix="qmpb", dir="/tmp") as tmp:
        directory = Path(tmp)
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(directory), "--guests", str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            for keep in (True, False):
                cfg = QmpConfig(socket_glob=str(directory / "*.qmp"), keep_connected=keep, call_timeout_s=10)
                hv = QmpHypervisor(cfg)
                try:
                    row(f"qmp, {'held' if keep else 'brief'} sessions", hv, n, ticks)
                finally:
                    hv.close()
        finally:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(30)
        node = directory / "node.xml"
        node.write_text(node_xml(n))
        lv = LibvirtHypervisor(LibvirtConfig(uri=f"test://{node}"))
        lv.connect()
        try:
            row("libvirt, test driver (in-process)", lv, n, ticks)
        finally:
            lv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
