"""Size on disk and CPU cost of ``overcommitd record``: 100 simulated guests (the bundled
Bitbrains traces through the simulator's SimHypervisor, the Hypervisor protocol the
recorder reads on a host) for a simulated day at a 10 s interval, on an injected clock.

    .venv/bin/python benchmarks/bench_record.py [--guests 100] [--hours 24] [--interval-s 10] [--out DIR]

Prints the bytes on disk (total, per guest-day, against the uncompressed CSV) and the CPU
seconds the recorder spent (its ``sample()`` and ``close()``: reading the snapshots,
deriving rows, writing and fsyncing every interval, compressing every hour), per sample
and per recorded day, with the part spent building the snapshots shown apart. The
simulator's own time advancing the guests is measured apart and left out.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from overcommitd.config import GuardConfig
from overcommitd.model import GuestSnapshot
from overcommitd.record import ReadOnlyGuests, Recorder
from sim.evaluation.replay import ReplaySpec, build_guests, load_traces
from sim.memory import traces
from sim.memory.hypervisor import SimHypervisor

BLOCK = 1024  # samples of demand computed at once


class TimedSource:
    """The simulator's snapshot(), with the CPU it takes (on a host: libvirt's instead)."""

    def __init__(self, hv: SimHypervisor) -> None:
        self.guests = ReadOnlyGuests(hv)
        self.cpu_s = 0.0

    def snapshot(self) -> Sequence[GuestSnapshot]:
        c0 = time.process_time()
        out = self.guests.snapshot()
        self.cpu_s += time.process_time() - c0
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--guests", type=int, default=100)
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--interval-s", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=None, help="keep the recording here (default: a temporary directory)")
    args = p.parse_args()
    if args.out is not None:
        run(args, args.out)
        return
    with tempfile.TemporaryDirectory(prefix="bench-record-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, out: Path) -> None:
    spec = ReplaySpec(traces=(traces.BUNDLED_DIR / "bitbrains-rnd",), guests=args.guests, hours=args.hours)
    specs, workload = build_guests(spec, load_traces(spec))
    demand, reads = workload.block(np.zeros(1))
    ram_kib = sum(s.ram_kib for s in specs)
    hv = SimHypervisor(
        specs, host_mem_kib=int(ram_kib / spec.overcommit), initial_demand_kib=demand[0], initial_read_kib_s=reads[0]
    )
    # The recorder's clock is the simulator's: the stats' last_update is simulated time.
    source = TimedSource(hv)
    rec = Recorder(source, hv, out, rules=GuardConfig(), interval_s=args.interval_s, clock=lambda: hv.now_s)
    n = int(args.hours * 3600 / args.interval_s)
    record_cpu_s = sim_cpu_s = record_wall_s = 0.0
    for start in range(0, n, BLOCK):
        times = (start + 1 + np.arange(min(BLOCK, n - start))) * args.interval_s
        demand, reads = workload.block(times)
        for k, now_s in enumerate(times):
            c0 = time.process_time()
            hv.advance(float(now_s), demand[k], reads[k])
            c1, w1 = time.process_time(), time.perf_counter()
            rec.sample()
            record_cpu_s += time.process_time() - c1
            record_wall_s += time.perf_counter() - w1
            sim_cpu_s += c1 - c0
    c1, w1 = time.process_time(), time.perf_counter()
    rec.close()  # compresses the last hour
    record_cpu_s += time.process_time() - c1
    record_wall_s += time.perf_counter() - w1
    report(args, out, n, rec, Costs(record_cpu_s, source.cpu_s, record_wall_s, sim_cpu_s))


@dataclass(frozen=True, slots=True)
class Costs:
    record_cpu_s: float  # all of sample() and close(), the snapshots included
    snapshot_cpu_s: float  # of which the simulator building the snapshots
    record_wall_s: float  # sample() and close() in wall time: fsync waits included
    sim_cpu_s: float  # the simulator advancing the guests, not counted


def report(args: argparse.Namespace, out: Path, n: int, rec: Recorder, c: Costs) -> None:
    files = sorted(out.glob("*.csv.gz"))
    on_disk = sum(f.stat().st_size for f in files)
    guest_bytes = sum(f.stat().st_size for f in files if f.name.startswith("guests-"))
    raw = sum(len(gzip.decompress(f.read_bytes())) for f in files)
    days = args.hours / 24
    guest_days = args.guests * days
    print(f"recorded {args.guests} simulated guests for {args.hours:g} h at {args.interval_s:g} s: {n} samples")
    print(
        f"  rows: {rec.rows_written} guest, {rec.host_rows_written} host; skipped samples: {sum(rec.skipped.values())}"
    )
    print(f"  files: {len(files)} ({len(files) // 2} hours x guests + host) in {out}")
    print(f"  bytes on disk: {on_disk} total ({on_disk / 2**20:.2f} MiB); uncompressed CSV {raw / 2**20:.1f} MiB")
    print(
        f"  per guest-day: {guest_bytes / guest_days / 1024:.1f} KiB of guest rows, {on_disk / guest_days / 1024:.1f} KiB"
    )
    print(f"  a week of 200 guests at this rate: {on_disk / guest_days * 200 * 7 / 2**20:.0f} MiB")
    own_s = c.record_cpu_s - c.snapshot_cpu_s
    print(f"  recorder CPU: {c.record_cpu_s:.2f} s total, {c.record_cpu_s / n * 1000:.2f} ms per sample,")
    print(
        f"                {c.record_cpu_s / days:.1f} s per recorded day ({c.record_cpu_s / days / 864:.3f} % of a core)"
    )
    print(f"    of which building the snapshots (the simulator here, libvirt on a host): {c.snapshot_cpu_s:.2f} s;")
    print(f"    the recorder's own (rows, CSV, writes, hourly gzip): {own_s / n * 1000:.2f} ms per sample")
    print(f"  wall time in sample()+close(), fsync waits included: {c.record_wall_s / n * 1000:.1f} ms per sample")
    print(f"  (the simulator advancing the guests: {c.sim_cpu_s:.1f} s CPU, not counted)")


if __name__ == "__main__":
    main()
