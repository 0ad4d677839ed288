"""Builders for hand-made snapshots and tiny policies used across the tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from overcommitd.model import BalloonFeatures, GuestSnapshot, GuestStats, HostSnapshot
from policies.api import PolicyResult

MIB = 1024
GIB = 1024 * 1024


def host(now_s: float = 100.0, *, total_kib: int = 64 * GIB, available_kib: int = 32 * GIB) -> HostSnapshot:
    return HostSnapshot(taken_at_s=now_s, mem_total_kib=total_kib, mem_available_kib=available_kib)


def stats(last_update_s: float = 95.0, *, available_kib: int = 2 * GIB, free_kib: int = 1 * GIB) -> GuestStats:
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
    actual_kib: int | None = None,
    last_target_kib: int | None = None,
    stats_: GuestStats | None = None,
    deflate_on_oom: bool = False,
    reporting: bool = False,
    floor_kib: int = 0,
    weight: float = 1.0,
    **kw: Any,
) -> GuestSnapshot:
    actual = max_kib if actual_kib is None else actual_kib
    return GuestSnapshot(
        uuid=f"uuid-{name}",
        name=name,
        max_kib=max_kib,
        actual_kib=actual,
        current_kib=actual,
        last_target_kib=last_target_kib,
        features=BalloonFeatures(deflate_on_oom=deflate_on_oom, reporting=reporting),
        stats=stats_ if stats_ is not None else stats(),
        stats_period_s=5.0,
        floor_kib=floor_kib,
        weight=weight,
        **kw,
    )


class Noop:
    """Asks for nothing: every guest is held (the no-ballooning reference)."""

    name = "noop"

    def initial_state(self) -> None:
        return None

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: None) -> PolicyResult[None]:
        return PolicyResult({}, None)


class Fixed:
    """Asks every guest for the same target, whatever happens."""

    name = "fixed"

    def __init__(self, target_kib: int) -> None:
        self.target_kib = target_kib

    def initial_state(self) -> int:
        return 0

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: int) -> PolicyResult[int]:
        return PolicyResult({g.uuid: self.target_kib for g in guests}, state + 1)


class Raising:
    """A policy with a bug."""

    name = "raising"

    def initial_state(self) -> None:
        return None

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: None) -> Mapping[str, int]:
        raise ZeroDivisionError("division by zero")
