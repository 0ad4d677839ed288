"""What one control tick costs the daemon for 1, 100 and 1,000 guests, without libvirt.

The guests come from a tiny in-benchmark fake Hypervisor that hands out plain
GuestSnapshot values (the simulator's SimHypervisor can replace it once sim/ is merged),
so this measures overcommitd's own work per tick: the policy (headroom), the guard, the
decisions, Prometheus metrics and the asyncio plumbing of ``Daemon.tick`` (thread hops
for the blocking calls). libvirt's share is one bulk RPC per tick whatever the number of
guests, plus one call per target set; see tests/realguest for those counts on real guests.

    .venv/bin/python benchmarks/bench_tick.py [--repeat 50]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence

from overcommitd.config import DaemonConfig
from overcommitd.loop import LoopState, step
from overcommitd.model import BalloonFeatures, GuestSnapshot, GuestStats, HostSnapshot, PsiMemory
from overcommitd.runner import Daemon
from policies import registry

GIB = 1024**2
NOW_S = 1_800_000_000.0


def make_guests(n: int, seed: int = 1) -> list[GuestSnapshot]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        max_kib = rng.choice([2, 4, 8, 16]) * GIB
        actual = int(max_kib * rng.uniform(0.5, 1.0))
        stats = GuestStats(
            last_update_s=NOW_S - rng.uniform(0, 10),
            mem_total_kib=actual - 40_000,
            mem_available_kib=int(actual * rng.uniform(0.05, 0.8)),
            mem_free_kib=int(actual * 0.1),
            disk_caches_kib=100_000,
        )
        out.append(
            GuestSnapshot(
                uuid=f"00000000-0000-0000-0000-{i:012d}",
                name=f"g{i}",
                max_kib=max_kib,
                actual_kib=actual,
                current_kib=actual,
                features=BalloonFeatures(deflate_on_oom=bool(i % 2)),
                stats=stats,
                stats_period_s=5.0,
            )
        )
    return out


HOST = HostSnapshot(
    taken_at_s=NOW_S, mem_total_kib=512 * GIB, mem_available_kib=64 * GIB, psi=PsiMemory(some_avg10=2.0)
)


class FakeHypervisor:
    """The Hypervisor protocol over fixed values; set_target only counts."""

    def __init__(self, guests: Sequence[GuestSnapshot]) -> None:
        self.guests = list(guests)
        self.sets = 0
        self.errors: Counter[str] = Counter()

    def snapshot(self) -> Sequence[GuestSnapshot]:
        return self.guests

    def set_target(self, uuid: str, target_kib: int) -> None:
        self.sets += 1

    def connect(self) -> None: ...
    def close(self) -> None: ...
    def set_floor(self, name_or_uuid: str, floor_kib: int) -> str:
        return name_or_uuid

    def return_to_max(self) -> int:
        return 0


class FixedHost:
    def read(self) -> HostSnapshot:
        return HOST


def bench(n: int, repeat: int) -> tuple[float, float, int]:
    """Median seconds of step() alone and of a whole Daemon.tick(), and targets set per tick."""
    cfg = DaemonConfig()
    guests = make_guests(n)
    policy = registry.create("headroom")
    state = LoopState.initial(policy)
    step_s = []
    for _ in range(repeat):
        t = time.perf_counter()
        step(NOW_S, HOST, guests, policy, state, cfg)
        step_s.append(time.perf_counter() - t)
    hv = FakeHypervisor(guests)
    d = Daemon(cfg, hv, FixedHost())

    async def ticks() -> list[float]:
        out = []
        for _ in range(repeat):
            report = await d.tick()
            out.append(report.duration_s)
        return out

    tick_s = asyncio.run(ticks())
    return statistics.median(step_s), statistics.median(tick_s), hv.sets // repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    print(f"{'guests':>7} {'step() ms':>10} {'tick ms':>9} {'us/guest':>9} {'sets/tick':>9}")
    for n in (1, 100, 1000):
        step_s, tick_s, sets = bench(n, args.repeat)
        print(f"{n:>7} {step_s * 1e3:>10.3f} {tick_s * 1e3:>9.3f} {tick_s / n * 1e6:>9.1f} {sets:>9}")


if __name__ == "__main__":
    main()
