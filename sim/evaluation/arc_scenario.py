"""The ``zfs-arc`` scenario: a ZFS host whose ARC fills with the guests' disk reads, run
under a host-driven policy that does or does not count the ARC as memory the host can
drop (``count_arc``), then a burst that needs the memory back.

A 32 GiB host (2 GiB for itself) with ``zfs_arc_max`` 16 GiB (half of RAM, OpenZFS's
default on Linux before 2.3) and ``zfs_arc_min`` 1 GiB runs four 6 GiB guests. Each uses
2.5 GiB and reads 2 MiB/s from disk, which fills its own page cache and the host's ARC.
At 40 min the guests' use jumps to 4.5 GiB for the last 20 min. The daemon's own step
(policy, guard) runs every 10 s on the bulk model; one run per policy variant.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from overcommitd.config import DaemonConfig
from overcommitd.loop import LoopState, apply, step
from policies.api import Policy, PolicyFactory
from sim.evaluation.scenario_result import ScenarioResult
from sim.memory.arc import ArcModelParams
from sim.memory.guest import GuestSpec
from sim.memory.host import HostModelParams
from sim.memory.hypervisor import SimHypervisor

MIB_KIB = 1024
GIB_KIB = 1024 * 1024
HOST_KIB = 32 * GIB_KIB
GUESTS = 4
GUEST_RAM_KIB = 6 * GIB_KIB
READ_KIB_S = 2 * MIB_KIB
INTERVAL_S = 10.0
BURST_S = 40 * 60.0
END_S = 60 * 60.0
ARC = ArcModelParams(enabled=True, c_min_kib=1 * GIB_KIB, c_max_kib=16 * GIB_KIB, initial_kib=1 * GIB_KIB)


def demand_kib(t_s: float) -> float:
    return (4.5 if t_s >= BURST_S else 2.5) * GIB_KIB


@dataclass(frozen=True, slots=True)
class ArcRun:
    """One policy variant's run: series every tick and the key numbers."""

    label: str
    times_s: tuple[float, ...]
    guests_mib: tuple[float, ...]  # sum of the guests' actual
    arc_mib: tuple[float, ...]
    available_mib: tuple[float, ...]  # host MemAvailable (the ARC counted as used, as Linux does)
    refault_mib: tuple[float, ...]  # guests' page cache read again after eviction, cumulative
    swap_in_mib: float
    oom_kills: int
    arc_reaps: int
    host_over_ram_mib: float  # most host use above RAM (swap or OOM on a real host)

    def at(self, series: tuple[float, ...], t_s: float) -> float:
        return series[self.times_s.index(t_s)]

    @property
    def squeezed_mib(self) -> float:
        """Guest memory taken by the policy just before the burst."""
        return GUESTS * GUEST_RAM_KIB / MIB_KIB - self.at(self.guests_mib, BURST_S)


def _specs() -> list[GuestSpec]:
    return [
        GuestSpec(
            uuid=f"00000000-0000-0000-0000-{zlib.crc32(f'zfs{i}'.encode()):012d}", name=f"zfs{i}", ram_kib=GUEST_RAM_KIB
        )
        for i in range(GUESTS)
    ]


def run(label: str, policy: Policy[Any]) -> ArcRun:
    reads = np.full(GUESTS, float(READ_KIB_S))
    hv = SimHypervisor(
        _specs(),
        host_mem_kib=HOST_KIB,
        initial_demand_kib=np.full(GUESTS, demand_kib(0.0)),
        initial_read_kib_s=reads,
        host_params=HostModelParams(arc=ARC),
    )
    cfg = DaemonConfig.model_validate({"interval_s": INTERVAL_S})
    state = LoopState.initial(policy)
    series: dict[str, list[float]] = {k: [] for k in ("t", "guests", "arc", "avail", "refault")}
    over_kib = 0.0
    for k in range(1, int(END_S / INTERVAL_S) + 1):
        t = k * INTERVAL_S
        hv.advance(t, np.full(GUESTS, demand_kib(t)), reads)
        host = hv.read()
        outcome = step(t, host, hv.snapshot(), policy, state, cfg)
        state = outcome.state
        apply(hv, outcome.decisions)
        over_kib = max(over_kib, hv.host_used_kib() - HOST_KIB)
        assert hv.host.arc is not None
        for key, value in (
            ("t", t),
            ("guests", hv.fleet.actual().sum() / MIB_KIB),
            ("arc", hv.host.arc.size_kib / MIB_KIB),
            ("avail", host.mem_available_kib / MIB_KIB),
            ("refault", hv.fleet.refault_kib.sum() / MIB_KIB),
        ):
            series[key].append(float(value))
    assert hv.host.arc is not None
    return ArcRun(
        label,
        tuple(series["t"]),
        tuple(series["guests"]),
        tuple(series["arc"]),
        tuple(series["avail"]),
        tuple(series["refault"]),
        swap_in_mib=float(hv.fleet.swap_in.sum() / MIB_KIB),
        oom_kills=int(hv.fleet.oom_kills.sum()),
        arc_reaps=hv.host.arc.reaps,
        host_over_ram_mib=max(0.0, over_kib / MIB_KIB),
    )


def runs(make_policy: PolicyFactory) -> dict[str, ArcRun]:
    """The four variants: headroom and Proxmox's algorithm, each with and without the ARC."""
    done = [
        run("headroom, ARC-aware", make_policy("headroom")),
        run("headroom, ARC as used", make_policy("headroom", {"count_arc": False})),
        run("proxmox, upstream (ARC as used)", make_policy("proxmox")),
        run("proxmox + count_arc", make_policy("proxmox", {"count_arc": True})),
    ]
    return {r.label: r for r in done}


def summary(r: ArcRun) -> str:
    return (
        f"{r.label}: squeezed {r.squeezed_mib:.0f} MiB of guest memory by 40 min "
        f"(ARC then {r.at(r.arc_mib, BURST_S):.0f} MiB, MemAvailable {r.at(r.available_mib, BURST_S):.0f} MiB); "
        f"guest cache re-read {r.refault_mib[-1]:.0f} MiB, swap-in {r.swap_in_mib:.0f} MiB, "
        f"OOM kills {r.oom_kills}; ARC reaps {r.arc_reaps}, host over RAM at most {r.host_over_ram_mib:.0f} MiB"
    )


def scenario(make_policy: PolicyFactory) -> ScenarioResult:
    """A ZFS host's ARC fills with the guests' reads; headroom and Proxmox's algorithm,
    each with and without counting the ARC above c_min as free; then a burst. The
    ``overcommitd sim scenario zfs-arc`` timeline, one row a minute."""
    rs = list(runs(make_policy).values())
    keep = [j for j, t in enumerate(rs[0].times_s) if t % 60 == 0]
    short = ("headroom aware", "headroom blind", "proxmox upstream", "proxmox count_arc")
    series: dict[str, tuple[float, ...]] = {}
    for tag, r in zip(short, rs, strict=True):
        series[f"{tag}: guests MiB"] = tuple(r.guests_mib[j] for j in keep)
        series[f"{tag}: ARC MiB"] = tuple(r.arc_mib[j] for j in keep)
    return ScenarioResult(
        "zfs-arc",
        "A ZFS host's ARC fills: host-driven ballooning with and without counting it as free",
        tuple(rs[0].times_s[j] for j in keep),
        series,
        tuple(summary(r) for r in rs),
    )
