"""What one control tick costs the daemon for 1, 100 and 1,000 guests on the simulated
host, without libvirt.

The guests are the simulator's (``SimHypervisor`` over the bundled real traces, reused
with offsets past 53 guests), advanced 10 s between ticks, so their stats, balloons and
the policy's wishes move as they would on a host. Measured: ``step()`` alone (policy +
guard) and a whole ``Daemon.tick()`` (host read, one bulk snapshot as a table, step,
apply, Prometheus metrics, the reasons log, the shortfall and the asyncio thread hops for
the blocking calls); the simulator's
own advance between ticks is not counted. libvirt's share is one bulk RPC per tick
whatever the number of guests, plus one call per target set; see tests/realguest for
those counts on real guests.

    .venv/bin/python benchmarks/bench_tick.py [--ticks 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter
from typing import Any

import numpy as np

from overcommitd.config import DaemonConfig
from overcommitd.loop import LoopState, step
from overcommitd.runner import Daemon
from policies import registry
from sim.evaluation.replay import ReplaySpec, build_guests, load_traces
from sim.memory.hypervisor import SimHypervisor
from sim.memory.traces import Trace

INTERVAL_S = 10.0


class SimHost(SimHypervisor):
    """The simulated host with the few extra calls the daemon makes of a hypervisor."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors: Counter[str] = Counter()

    def connect(self) -> None: ...
    def close(self) -> None: ...
    def set_floor(self, name_or_uuid: str, floor_kib: int) -> str:
        return name_or_uuid

    def return_to_max(self) -> int:
        return 0


def bench(n: int, ticks: int, loaded: list[Trace]) -> tuple[float, float, float]:
    """Median seconds of step() and of Daemon.tick(), and targets set per tick."""
    spec = ReplaySpec(guests=n)
    specs, workload = build_guests(spec, loaded)
    ram = sum(s.ram_kib for s in specs)
    demand, reads = workload.block(np.arange(ticks + 1, dtype=np.float64) * INTERVAL_S)
    hv = SimHost(
        specs, host_mem_kib=int(ram / spec.overcommit) + spec.host_model.base_kib, initial_demand_kib=demand[0]
    )
    cfg = DaemonConfig(interval_s=INTERVAL_S)
    daemon = Daemon(cfg, hv, hv, make_policy=registry.create)
    policy = registry.create(cfg.policy.name, cfg.policy.params)
    state = LoopState.initial(policy)
    step_s, tick_s = [], []

    async def run() -> None:
        nonlocal state
        for k in range(1, ticks + 1):
            hv.advance(k * INTERVAL_S, demand[k - 1], reads[k - 1])
            host, guests = hv.read(), hv.snapshot()
            started = time.perf_counter()
            state = step(host.taken_at_s, host, guests, policy, state, cfg).state
            step_s.append(time.perf_counter() - started)
            tick_s.append((await daemon.tick()).duration_s)

    asyncio.run(run())
    return statistics.median(step_s), statistics.median(tick_s), hv.targets_set / ticks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ticks", type=int, default=30)
    args = ap.parse_args()
    loaded = load_traces(ReplaySpec())
    print(f"{'guests':>7} {'step() ms':>10} {'tick ms':>9} {'us/guest':>9} {'sets/tick':>9}")
    for n in (1, 100, 1000):
        step_s, tick_s, sets = bench(n, args.ticks, loaded)
        print(f"{n:>7} {step_s * 1e3:>10.3f} {tick_s * 1e3:>9.3f} {tick_s / n * 1e6:>9.1f} {sets:>9.1f}")


if __name__ == "__main__":
    main()
