"""Builders for hand-made snapshots, tiny policies and protocol-model worlds used
across the tests.

``FixedPolicy`` asks for fixed targets, so a test can make a policy want something the
guard must refuse (below a floor, faster than a step); configs name it as
``tests.helpers:FixedPolicy``. ``protocol_hypervisor`` and ``play`` build and drive the
protocol model the way the tests that compare two runs of it (a shortcut against its
reference) both need."""

from __future__ import annotations

import dataclasses
import gzip
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from overcommitd.model import BalloonFeatures, GuestSnapshot, GuestStats, HostSnapshot, RunState
from policies import testing
from policies.api import PolicyResult
from policies.testing import GIB, MIB  # noqa: F401 - re-exported for the tests
from sim.memory.balloon_fleet import ProtocolBalloons
from sim.memory.guest import GuestSpec
from sim.memory.hypervisor import SimHypervisor
from sim.virtio.world import World

if TYPE_CHECKING:
    from overcommitd.runner import Daemon

NOW_S = 100.0


def host(now_s: float = NOW_S, *, total_kib: int = 64 * GIB, available_kib: int = 32 * GIB) -> HostSnapshot:
    return testing.host(at_s=now_s, total_kib=total_kib, available_kib=available_kib)


def stats(last_update_s: float = NOW_S - 5, *, available_kib: int = 2 * GIB, free_kib: int = 1 * GIB) -> GuestStats:
    return GuestStats(
        last_update_s=last_update_s,
        mem_available_kib=available_kib,
        mem_free_kib=free_kib,
        mem_total_kib=4 * GIB,
        disk_caches_kib=available_kib - free_kib,
    )


def guest(
    name: str = "vm1",
    *,
    max_kib: int = 4 * GIB,
    stats_: GuestStats | None = None,
    deflate_on_oom: bool = False,
    reporting: bool = False,
    run_state: RunState = RunState.RUNNING,
    **kw: Any,
) -> GuestSnapshot:
    """``policies.testing.guest`` with these tests' defaults: a 4 GiB guest whose stats
    (``stats()``, 5 s old at ``NOW_S``) leave it 2 GiB available."""
    g = testing.guest(
        name, max_kib=max_kib, features=BalloonFeatures(deflate_on_oom=deflate_on_oom, reporting=reporting), **kw
    )
    return dataclasses.replace(g, stats=stats_ or stats(), stats_period_s=5.0, run_state=run_state)


class Noop:
    """Asks for nothing: every guest is held (the no-ballooning reference)."""

    name = "noop"

    def initial_state(self) -> None:
        return None

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: None) -> PolicyResult[None]:
        return PolicyResult({}, None)


class FixedParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    target_kib: int | None = None  # for every guest; None: no wish
    by_name: dict[str, int] = {}  # per guest name, wins over target_kib


class FixedPolicy:
    name: ClassVar[str] = "fixed"
    Params = FixedParams

    def __init__(self, params: FixedParams | None = None) -> None:
        self.params = params or FixedParams()

    def initial_state(self) -> int:
        return 0

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: int) -> PolicyResult[int]:
        targets = {}
        for g in guests:
            t = self.params.by_name.get(g.name, self.params.target_kib)
            if t is not None:
                targets[g.uuid] = t
        return PolicyResult(targets, state + 1)


def use_fixed_policy(daemon: Daemon, target_kib: int) -> None:
    """Switch a running daemon to ``FixedPolicy`` as a config reload would (by module path,
    which only the config may name)."""
    spec, params = "tests.helpers:FixedPolicy", {"target_kib": target_kib}
    daemon._use_policy(FixedPolicy(FixedParams(**params)), spec, params)


class Raising:
    """A policy with a bug."""

    name = "raising"

    def initial_state(self) -> None:
        return None

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: None) -> Mapping[str, int]:
        raise ZeroDivisionError("division by zero")


BB_HEADER = (
    "Timestamp [ms];\tCPU cores;\tCPU capacity provisioned [MHZ];\tCPU usage [MHZ];\tCPU usage [%];\t"
    "Memory capacity provisioned [KB];\tMemory usage [KB];\tDisk read throughput [KB/s];\t"
    "Disk write throughput [KB/s];\tNetwork received throughput [KB/s];\tNetwork transmitted throughput [KB/s]"
)


def bitbrains(tmp_path: Path, rows: list[tuple[float, float, float]], name: str = "7.csv.gz") -> Path:
    """rows of (epoch seconds, capacity KB, usage KB)."""
    lines = [BB_HEADER] + [f"{t};\t1;\t2600;\t26;\t1.0;\t{cap};\t{use};\t4.0;\t0.0;\t0.0;\t0.0" for t, cap, use in rows]
    path = tmp_path / name
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return path


def numbered_guest(i: int, ram_kib: int, **settings: Any) -> GuestSpec:
    """Guest ``i`` of a test fleet, its uuid and name numbered, with ``settings``."""
    return GuestSpec(uuid=f"00000000-0000-0000-0000-{i:012d}", name=f"g{i}", ram_kib=ram_kib, **settings)


def protocol_hypervisor(
    specs: list[GuestSpec], demand_kib: npt.NDArray[np.float64], stats_period_s: float, *, jumps: bool = True
) -> tuple[SimHypervisor, ProtocolBalloons]:
    """The protocol model on a 64 GiB host and its own World (``jumps=False``: the
    reference without the clock shortcut), and its balloons."""
    hv = SimHypervisor(
        specs,
        host_mem_kib=64 * GIB,
        initial_demand_kib=demand_kib,
        stats_period_s=stats_period_s,
        model="protocol",
        world=World(jumps=jumps),
    )
    balloons = hv.device
    assert isinstance(balloons, ProtocolBalloons)
    return hv, balloons


def play(
    hv: SimHypervisor,
    demand_kib: npt.NDArray[np.float64],
    targets: Iterable[tuple[float, int, int]],
    tick_s: float,
    ticks_until_s: float,
    end_s: float,
    *,
    one_order: bool = False,
) -> None:
    """``targets`` (time, guest index, target KiB) set and a daemon-like tick every
    ``tick_s`` up to ``ticks_until_s``, in time order (at one instant the targets first,
    the lower target first, then the tick), each after the World has run to its time;
    then the World runs to ``end_s``. ``one_order``: the World steps every event, the
    guests' own included, in one global order (``World.step``) instead of running each
    guest's clock on its own between two of its events (``World.run``)."""
    run = hv.world.run
    if one_order:

        def run(until_s: float) -> None:
            while hv.world.peek() <= until_s:
                hv.world.step(until_s)
            hv.world.run(until_s)

    events = [(at_s, 0, i, kib) for at_s, i, kib in targets]
    events += [(k * tick_s, 1, 0, 0) for k in range(1, int(ticks_until_s / tick_s) + 1)]
    for at_s, kind, i, kib in sorted(events):
        run(at_s)
        if kind == 0:
            hv.set_target(hv.specs[i].uuid, kib)
        else:
            hv.advance(at_s, demand_kib, np.zeros(len(hv.specs)))
    run(end_s)
