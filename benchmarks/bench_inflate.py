"""Cost of a 1 GiB inflate (262,144 PFNs in 1,024 requests of 256) through the full
protocol model: config interrupt, work item, allocation, PFN arrays in guest memory,
split-ring exchange, QEMU's discard, ``actual`` after every request, Fleet accounting.

    .venv/bin/python benchmarks/bench_inflate.py

Wall time and this process's CPU time are both printed: on a shared machine the CPU
time is the figure that does not move with the neighbours' load.
"""

from __future__ import annotations

import time

import numpy as np

from sim.memory.balloon_fleet import ProtocolBalloons
from sim.memory.guest import GuestSpec
from sim.memory.hypervisor import SimHypervisor

GIB_KIB = 1 << 20


def one_inflate() -> tuple[float, float, int, float]:
    spec = GuestSpec(uuid="00000000-0000-0000-0000-000000000001", name="bench", ram_kib=4 * GIB_KIB)
    hv = SimHypervisor([spec], host_mem_kib=64 * GIB_KIB, initial_demand_kib=np.array([512.0 * 1024]), model="protocol")
    balloons = hv.device
    assert isinstance(balloons, ProtocolBalloons)
    guest = balloons.guests[0]
    wall, cpu = time.perf_counter(), time.process_time()
    hv.set_target(spec.uuid, 3 * GIB_KIB)
    start_s = hv.world.now_s
    while guest.device.actual != 262_144:
        hv.world.step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, hv.world.now_s - start_s, len(guest.device.actual_log), cpu


def deflate() -> tuple[float, float]:
    """Wall and CPU time of the 1 GiB deflate back."""
    spec = GuestSpec(uuid="00000000-0000-0000-0000-000000000002", name="bench", ram_kib=4 * GIB_KIB)
    hv = SimHypervisor([spec], host_mem_kib=64 * GIB_KIB, initial_demand_kib=np.array([512.0 * 1024]), model="protocol")
    balloons = hv.device
    assert isinstance(balloons, ProtocolBalloons)
    guest = balloons.guests[0]
    hv.set_target(spec.uuid, 3 * GIB_KIB)
    while guest.device.actual != 262_144:
        hv.world.step()
    wall, cpu = time.perf_counter(), time.process_time()
    hv.set_target(spec.uuid, 4 * GIB_KIB)
    while guest.device.actual != 0:
        hv.world.step()
    return time.perf_counter() - wall, time.process_time() - cpu


def stats_exchange(*, at_once: bool) -> tuple[float, float]:
    """Wall and CPU time of one stats exchange (timer, push, interrupt, work item, 16
    entries gathered, pop), averaged over 1,000 as a replay runs them: every 5 s on the
    guest's clock between 10 s ticks. ``at_once``: a tick's exchanges set in one step
    (``sim.memory.stats_runs``); else one exchange at a time."""
    spec = GuestSpec(uuid="00000000-0000-0000-0000-000000000003", name="bench", ram_kib=4 * GIB_KIB)
    hv = SimHypervisor([spec], host_mem_kib=64 * GIB_KIB, initial_demand_kib=np.array([512.0 * 1024]), model="protocol")
    balloons = hv.device
    assert isinstance(balloons, ProtocolBalloons)
    device = balloons.guests[0].device
    if not at_once:
        device.stats_run = None
    device.set_stats_poll_interval(5)
    updates = device.stats_updates
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(500):
        hv.world.run(hv.world.now_s + 10.0)
    n = device.stats_updates - updates
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def main() -> None:
    runs = [one_inflate() for _ in range(5)]
    walls = sorted(r[0] for r in runs)
    cpus = sorted(r[3] for r in runs)
    _, sim_s, updates, _ = runs[0]
    print("1 GiB inflate through the full protocol model (262,144 PFNs, 1,024 requests)")
    print(
        f"  wall time: median {walls[2] * 1e3:.1f} ms, best {walls[0] * 1e3:.1f} ms "
        f"({walls[2] / 1024 * 1e6:.0f} us per 256-PFN request)"
    )
    print(f"  CPU time: median {cpus[2] * 1e3:.1f} ms, best {cpus[0] * 1e3:.1f} ms")
    print(f"  simulated time: {sim_s:.3f} s ({1024 / sim_s:.0f} MiB/s; real-guest.md: 128 MiB in 0.11-0.19 s)")
    print(f"  actual updates seen by the host: {updates}")
    deflate_s, deflate_cpu_s = sorted(deflate() for _ in range(3))[1]
    print(f"1 GiB deflate: {deflate_s * 1e3:.1f} ms wall, {deflate_cpu_s * 1e3:.1f} ms CPU")
    for at_once, how in ((True, "a tick's exchanges at once"), (False, "one at a time")):
        wall_s, cpu_s = sorted(stats_exchange(at_once=at_once) for _ in range(3))[1]
        print(f"one stats exchange, {how}: {wall_s * 1e6:.1f} us wall, {cpu_s * 1e6:.1f} us CPU")


if __name__ == "__main__":
    main()
