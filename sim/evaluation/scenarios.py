"""Built-in scenarios for ``overcommitd sim scenario NAME``: one or two guests through
the protocol-level model, printed as a timeline and optionally drawn.

Each scenario scripts a target and a workload on a small fleet (``OneHost``), steps it
at ``step_s`` (fine enough to see a 200 ms retry or a 2 s reporting delay) and records
what the host would see: ``actual``, MemTotal and MemFree from the stats queue, host
RAM the guest costs, and the counters of the behaviour being shown.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from overcommitd.config import DaemonConfig
from overcommitd.loop import LoopState, apply, step
from policies.api import PolicyFactory
from sim.evaluation.arc_scenario import scenario as zfs_arc
from sim.evaluation.scenario_result import ScenarioResult
from sim.memory.balloon_fleet import ProtocolBalloons
from sim.memory.guest import GuestSpec
from sim.memory.hypervisor import SimHypervisor
from sim.virtio.backing import RamBacking

MIB_KIB = 1024


@dataclass(slots=True)
class OneHost:
    """A few guests with scripted demand, through the protocol model, stepped finely."""

    specs: list[GuestSpec]
    demand_mib: Callable[[float], list[float]]
    step_s: float = 0.1
    stats_period_s: int = 2
    hv: SimHypervisor = field(init=False)

    def __post_init__(self) -> None:
        demand = np.array(self.demand_mib(0.0)) * MIB_KIB
        self.hv = SimHypervisor(
            self.specs,
            host_mem_kib=64 << 20,
            initial_demand_kib=demand,
            stats_period_s=self.stats_period_s,
            model="protocol",
        )
        f = self.hv.fleet
        f.touched -= f.cache - f.cache_min  # start with little page cache (never touched): easier to read
        f.cache[:] = f.cache_min
        f.hot_cache[:] = np.minimum(f.hot_cache, f.cache)  # hot cache is part of the cache

    @property
    def balloons(self) -> ProtocolBalloons:
        assert isinstance(self.hv.device, ProtocolBalloons)
        return self.hv.device

    def set_target_mib(self, i: int, target_mib: float) -> None:
        self.hv.set_target(self.specs[i].uuid, int(target_mib * MIB_KIB))

    def set_targets_mib(self, target_mib: float) -> None:
        for i in range(len(self.specs)):
            self.set_target_mib(i, target_mib)

    def run(self, until_s: float, record: Callable[[float], None], events: dict[float, Callable[[], None]]) -> None:
        pending = sorted(events.items())
        t = self.hv.now_s
        while t < until_s - 1e-9:
            t = round(t + self.step_s, 6)
            while pending and pending[0][0] <= t - self.step_s + 1e-9:
                pending.pop(0)[1]()
            demand = np.array(self.demand_mib(t)) * MIB_KIB
            self.hv.advance(t, demand, np.zeros(len(self.specs)))
            record(t)


def _guest(name: str, ram_mib: int, **kw: Any) -> GuestSpec:
    """A guest whose uuid is derived from its name (crc32: stable across runs)."""
    return GuestSpec(
        uuid=f"00000000-0000-0000-0000-{zlib.crc32(name.encode()):012d}", name=name, ram_kib=ram_mib * MIB_KIB, **kw
    )


class _Recorder:
    def __init__(self, host: OneHost) -> None:
        self.host = host
        self.times: list[float] = []
        self.series: dict[str, list[float]] = {}

    def add(self, label: str, value: float) -> None:
        self.series.setdefault(label, []).append(float(value))

    def result(self, name: str, title: str, notes: list[str]) -> ScenarioResult:
        return ScenarioResult(
            name, title, tuple(self.times), {k: tuple(v) for k, v in self.series.items()}, tuple(notes)
        )


def _guest_row(rec: _Recorder, i: int, tag: str) -> None:
    hv = rec.host.hv
    f, d = hv.fleet, rec.host.balloons
    rec.add(f"{tag} actual MiB", f.actual()[i] / MIB_KIB)
    rec.add(f"{tag} MemTotal MiB (stats)", d.stats.mem_total_kib[i] / MIB_KIB)
    rec.add(f"{tag} MemFree MiB (stats)", d.stats.mem_free_kib[i] / MIB_KIB)
    rec.add(f"{tag} host RAM used MiB", f.touched[i] / MIB_KIB)


def deflate_on_oom() -> ScenarioResult:
    """Inflate to 1 GiB, then the workload needs 1.7 GiB: with DEFLATE_ON_OOM the guest
    takes the balloon back 1 MiB per OOM event and keeps it; without, it OOM-kills."""
    specs = [_guest("doo-on", 2048, deflate_on_oom=True, swap_kib=0), _guest("doo-off", 2048, swap_kib=0)]
    host = OneHost(specs, lambda t: [300.0 if t < 10 else 1700.0] * 2)
    rec = _Recorder(host)

    def record(t: float) -> None:
        rec.times.append(t)
        for i, tag in enumerate(("on", "off")):
            _guest_row(rec, i, tag)
            rec.add(f"{tag} OOM kills", host.hv.fleet.oom_kills[i])
        rec.add("on auto-deflate events", host.balloons.guests[0].driver.oom_deflates)

    host.run(30.0, record, {1.0: lambda: host.set_targets_mib(1024)})
    g0 = host.balloons.guests[0]
    notes = [
        (
            f"target 1024 MiB; with DEFLATE_ON_OOM actual ends at {rec.series['on actual MiB'][-1]:.0f} MiB "
            f"after {g0.driver.oom_deflates} OOM notifications of 256 pages; no re-inflation without a new target"
        ),
        (
            f"MemTotal with DEFLATE_ON_OOM stays {rec.series['on MemTotal MiB (stats)'][50]:.0f} MiB while inflated; "
            f"without it {rec.series['off MemTotal MiB (stats)'][50]:.0f} MiB"
        ),
        f"OOM kills: with {rec.series['on OOM kills'][-1]:.0f}, without {rec.series['off OOM kills'][-1]:.0f}",
    ]
    return rec.result("deflate-on-oom", "Inflate, then a demand spike, with and without DEFLATE_ON_OOM", notes)


def out_of_puff() -> ScenarioResult:
    """A target the guest cannot reach: each failed allocation logs "Out of puff!",
    sleeps 200 ms and the work re-queues, for as long as the target stands."""
    host = OneHost([_guest("puff", 1024)], lambda t: [700.0])
    rec = _Recorder(host)
    drv = host.balloons.guests[0].driver

    def record(t: float) -> None:
        rec.times.append(t)
        _guest_row(rec, 0, "guest")
        rec.add("Out of puff messages", drv.puff_count)
        rec.add("guest time in msleep(200) s", drv.puff_sleep_s)
        rec.add("driver CPU ms", drv.cpu_s * 1e3)

    host.run(10.0, record, {1.0: lambda: host.set_target_mib(0, 256)})
    notes = [
        (
            f"{drv.puff_count} 'Out of puff!' retries in 9 s (~5/s), {drv.cpu_s * 1e3:.2f} ms of driver CPU; balloon stuck at "
            f"{1024 - rec.series['guest actual MiB'][-1]:.0f} MiB of the 768 MiB asked"
        )
    ]
    return rec.result("out-of-puff", "Out-of-puff storm against an unreachable target", notes)


def free_page_reporting() -> ScenarioResult:
    """The workload frees 1 GiB at t=5: 2 s later, report passes of 32 x 2 MiB blocks give
    it back to the host, one pass every 2 s."""
    host = OneHost([_guest("reporting", 2048, reporting=True)], lambda t: [1500.0 if t < 5 else 500.0])
    rec = _Recorder(host)
    drv = host.balloons.guests[0].driver

    def record(t: float) -> None:
        rec.times.append(t)
        _guest_row(rec, 0, "guest")
        rec.add("reported order-9 blocks", drv.reported_blocks)

    host.run(30.0, record, {})
    first = next((t for t, v in zip(rec.times, rec.series["reported order-9 blocks"]) if v > 0), float("nan"))
    notes = [
        (
            f"first report {first - 5:.1f} s after the free; {drv.reported_blocks} blocks "
            f"({drv.reported_blocks * 2} MiB) reported by t=30 s"
        )
    ]
    return rec.result("reporting", "Free page reporting returns memory after a workload frees it", notes)


def migration_hints() -> ScenarioResult:
    """A live migration: QEMU asks for hints (new command id), the guest hands over free
    4 MiB blocks and holds them; STOP at each bitmap sync, DONE at the end frees them."""
    host = OneHost([_guest("migrating", 4096, free_page_hint=True)], lambda t: [1024.0])
    rec = _Recorder(host)
    g = host.balloons.guests[0]

    def record(t: float) -> None:
        rec.times.append(t)
        _guest_row(rec, 0, "guest")
        rec.add("hinted MiB (skipped by migration)", g.device.hinted_bytes / 2**20)
        rec.add("guest blocks held MiB", host.balloons.held_kib[0] / MIB_KIB)

    dev = g.device
    host.run(
        12.0,
        record,
        {
            2.0: dev.free_page_start,
            6.0: dev.free_page_stop,
            6.5: dev.free_page_start,
            8.0: dev.free_page_stop,
            10.0: dev.free_page_done,
        },
    )
    notes = [
        (
            f"{dev.hinted_bytes / 2**20:.0f} MiB hinted over two rounds (cmd ids from 0x80000000); "
            f"held blocks released at DONE: {host.balloons.held_kib[0] / MIB_KIB:.0f} MiB still held"
        )
    ]
    return rec.result("migration", "Live migration with free page hints", notes)


def migration_prep(make_policy: PolicyFactory) -> ScenarioResult:
    """An announced migration under the ``free-page`` policy: a guest with FREE_PAGE_HINT
    keeps its free memory for the hint pass to skip; one without has it ballooned."""
    specs = [_guest("hint", 4096, free_page_hint=True), _guest("plain", 4096)]
    host = OneHost(specs, lambda t: [3072.0 if 1 <= t < 3 else 1024.0] * 2)  # a burst, then freed
    rec = _Recorder(host)
    policy = make_policy("free-page", {"warmup_s": 0.0})  # seconds, not hours: no warm-up
    cfg = DaemonConfig.model_validate({"interval_s": 1.0})
    loop_state = LoopState.initial(policy)
    announced_s, migration_s = 5.0, 30.0
    dev = host.balloons.guests[0].device

    def control(t: float) -> None:
        """The daemon's step once a second, the guests marked as ``prepare-migration`` marks them."""
        nonlocal loop_state
        guests = [dataclasses.replace(g, migration_pending=True) for g in host.hv.snapshot()]
        outcome = step(t, host.hv.read(), guests, policy, loop_state, cfg)
        loop_state = outcome.state
        apply(host.hv, outcome.decisions)

    def record(t: float) -> None:
        rec.times.append(t)
        for i, tag in enumerate(("hint", "plain")):
            _guest_row(rec, i, tag)
        rec.add("hint MiB handed to the migration", dev.hinted_bytes / 2**20)

    controls = {float(t): functools.partial(control, float(t)) for t in range(int(announced_s), int(migration_s))}
    host.run(
        40.0,
        record,
        controls
        | {migration_s: dev.free_page_start, migration_s + 4: dev.free_page_stop, migration_s + 6: dev.free_page_done},
    )
    at_migration = rec.times.index(migration_s)
    notes = [
        (
            f"announced at {announced_s:.0f} s; when the migration starts at {migration_s:.0f} s the hint guest "
            f"holds {rec.series['hint actual MiB'][at_migration]:.0f} MiB and the plain guest "
            f"{rec.series['plain actual MiB'][at_migration]:.0f} MiB (ballooned)"
        ),
        f"the hint round hands over {dev.hinted_bytes / 2**20:.0f} MiB of free memory, which the migration skips",
    ]
    return rec.result("migration-prep", "An announced migration: hint pass or balloon, by feature", notes)


def shared_anon() -> ScenarioResult:
    """Shared anonymous RAM: madvise(DONTNEED) (old QEMU) frees nothing, MADV_REMOVE
    (ram_block_discard_range) frees the ballooned pages."""
    specs = [
        _guest("dontneed", 2048, backing=RamBacking("shared-anon", discard="madvise")),
        _guest("remove", 2048, backing=RamBacking("shared-anon")),
    ]
    host = OneHost(specs, lambda t: [1200.0, 1200.0])
    host.hv.fleet.touched[:] = host.hv.fleet.ram  # a guest that has touched all its RAM
    rec = _Recorder(host)

    def record(t: float) -> None:
        rec.times.append(t)
        _guest_row(rec, 0, "DONTNEED")
        _guest_row(rec, 1, "MADV_REMOVE")

    host.run(5.0, record, {1.0: lambda: host.set_targets_mib(1536)})
    notes = [
        (
            f"host RAM used after a 512 MiB inflate: DONTNEED {rec.series['DONTNEED host RAM used MiB'][-1]:.0f} MiB, "
            f"MADV_REMOVE {rec.series['MADV_REMOVE host RAM used MiB'][-1]:.0f} MiB"
        )
    ]
    return rec.result("shared-anon", "Shared-anonymous backing: DONTNEED frees nothing", notes)


def huge_pages() -> ScenarioResult:
    """2 MiB hugetlbfs backing: a 256-PFN request covers half a huge page, QEMU's
    partial-page tracker dies with each request, so nothing is freed; 64 KiB pages are."""
    specs = [
        _guest("hugetlbfs-2M", 2048, backing=RamBacking("hugetlbfs", page_bytes=2 << 20)),
        _guest("file-64K", 2048, backing=RamBacking("file", page_bytes=64 << 10)),
    ]
    host = OneHost(specs, lambda t: [1200.0, 1200.0])
    host.hv.fleet.touched[:] = host.hv.fleet.ram
    rec = _Recorder(host)

    def record(t: float) -> None:
        rec.times.append(t)
        _guest_row(rec, 0, "2M")
        _guest_row(rec, 1, "64K")
        rec.add("2M partial huge pages dropped", host.balloons.guests[0].host.partial_dropped)

    host.run(5.0, record, {1.0: lambda: host.set_targets_mib(1536)})
    g0 = host.balloons.guests[0].host
    notes = [
        (
            f"2 MiB pages: {g0.released_bytes >> 20} MiB released, {g0.partial_dropped} partial huge pages dropped; "
            f"64 KiB pages: {host.balloons.guests[1].host.released_bytes >> 20} MiB released"
        )
    ]
    return rec.result("hugepages", "2 MiB host pages with partial inflation", notes)


SCENARIOS: dict[str, Callable[[], ScenarioResult]] = {
    "deflate-on-oom": deflate_on_oom,
    "out-of-puff": out_of_puff,
    "reporting": free_page_reporting,
    "migration": migration_hints,
    "shared-anon": shared_anon,
    "hugepages": huge_pages,
}
# Scenarios that drive the daemon's step with a policy: the CLI hands the factory, since
# the simulator never names a concrete policy itself.
POLICY_SCENARIOS: dict[str, Callable[[PolicyFactory], ScenarioResult]] = {
    "migration-prep": migration_prep,
    "zfs-arc": zfs_arc,
}


def format_timeline(result: ScenarioResult, every_s: float = 1.0) -> str:
    """The result as a fixed-width table, one row per ``every_s``, then the notes."""
    labels = list(result.series)
    lines = [
        f"{result.name}: {result.title}",
        "  " + "  ".join(["t_s".rjust(6)] + [f"[{k}] {lab}" for k, lab in enumerate(labels)]),
    ]
    header = "  " + "t_s".rjust(6) + "".join(f"{f'[{k}]':>10}" for k in range(len(labels)))
    lines[1:] = ["  legend: " + "; ".join(f"[{k}] {lab}" for k, lab in enumerate(labels)), header]
    next_t = 0.0
    for j, t in enumerate(result.times_s):
        if t + 1e-9 >= next_t:
            lines.append("  " + f"{t:6.1f}" + "".join(f"{result.series[lab][j]:10.1f}" for lab in labels))
            next_t += every_s
    lines += [f"  * {n}" for n in result.notes]
    return "\n".join(lines)


def plot(result: ScenarioResult, path: Path) -> None:
    """MiB series on one axis, counters on a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mib, ax_count) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=(3, 1))
    for label, values in result.series.items():
        (ax_mib if "MiB" in label else ax_count).plot(result.times_s, values, label=label)
    ax_mib.set_ylabel("MiB")
    ax_count.set_ylabel("count / s")
    ax_count.set_xlabel("simulated time (s)")
    for ax in (ax_mib, ax_count):
        if ax.lines:
            ax.legend(fontsize="small", loc="best")
    fig.suptitle(f"{result.name}: {result.title}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def scenario_command(
    name: str | None,
    *,
    make_policy: PolicyFactory,
    list_only: bool = False,
    plot_path: Path | None = None,
    every_s: float = 1.0,
) -> int:
    """``overcommitd sim scenario``: list, or run one, print it, optionally draw it."""
    if list_only or not name:
        for key, fn in (SCENARIOS | POLICY_SCENARIOS).items():
            print(f"{key:16} {' '.join((fn.__doc__ or '').split())}")
        return 0
    if name in POLICY_SCENARIOS:
        result = POLICY_SCENARIOS[name](make_policy)
    elif name in SCENARIOS:
        result = SCENARIOS[name]()
    else:
        print(f"overcommitd: no scenario {name!r}; known: {', '.join(SCENARIOS | POLICY_SCENARIOS)}", file=sys.stderr)
        return 2
    print(format_timeline(result, every_s))
    if plot_path is not None:
        plot(result, plot_path)
        print(f"plot written to {plot_path}")
    return 0
