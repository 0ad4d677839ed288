"""libvirt's balloon statistics, translated once into our vocabulary.

libvirt reports KiB, but under misleading names (virtio-balloon.md §7.1; libvirt's
``virDomainMemoryStatTags``): ``available`` is the guest's MemTotal, ``usable`` its
MemAvailable, ``unused`` its MemFree, and ``actual``/``balloon.current`` the guest's
memory size, not the balloon's. This module is pure: typed parameters in (from the bulk
``domainListGetStats(..., VIR_DOMAIN_STATS_BALLOON)`` call, or a ``memoryStats()`` dict),
a :class:`BalloonReading` out. Nothing past it sees a libvirt name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from overcommitd.model import GuestStats, RunState

# GuestStats field <- libvirt name (memoryStats() key; the bulk call's is "balloon." + key,
# with "last_update" spelled "last-update"). Every one is KiB or a count, never bytes.
_STAT_NAMES: dict[str, str] = {
    "swap_in_kib": "swap_in",
    "swap_out_kib": "swap_out",
    "major_faults": "major_fault",
    "minor_faults": "minor_fault",
    "mem_free_kib": "unused",  # VIR_DOMAIN_MEMORY_STAT_UNUSED = virtio MEMFREE
    "mem_total_kib": "available",  # VIR_DOMAIN_MEMORY_STAT_AVAILABLE = virtio MEMTOT
    "mem_available_kib": "usable",  # VIR_DOMAIN_MEMORY_STAT_USABLE = virtio AVAIL
    "disk_caches_kib": "disk_caches",
    "hugetlb_allocs": "hugetlb_pgalloc",
    "hugetlb_failures": "hugetlb_pgfail",
}
BULK_PREFIX = "balloon."


@dataclass(frozen=True, slots=True)
class BalloonReading:
    """One guest's balloon as libvirt reports it.

    ``current_kib`` is the guest's memory now as libvirt knows it (``balloon.current``,
    the live ``<currentMemory>``; it follows the guest's ``actual`` through BALLOON_CHANGE
    events, so it lags by up to ~1 s: QEMU throttles that event to one per second).
    ``stats`` is None when the guest never sent any (no driver yet, or no stats queue).
    """

    current_kib: int
    maximum_kib: int
    stats: GuestStats | None
    rss_kib: int | None = None  # host RSS of the QEMU process


def _count(params: Mapping[str, object], key: str) -> int | None:
    """A non-negative int, or None for absent or nonsense values (bools included)."""
    v = params.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return None
    return v


def _stats(params: Mapping[str, object], prefix: str, last_update_key: str) -> GuestStats | None:
    fields = {ours: _count(params, prefix + theirs) for ours, theirs in _STAT_NAMES.items()}
    last_update_s = _count(params, prefix + last_update_key)
    # QEMU reports last-update 0 until the guest's first sample; without any stat and a
    # real timestamp there is nothing the guard may trust.
    if not last_update_s or all(v is None for v in fields.values()):
        return None
    return GuestStats(last_update_s=float(last_update_s), **fields)


def _reading(
    current: int | None, maximum: int | None, stats: GuestStats | None, rss: int | None, where: str
) -> BalloonReading:
    if not maximum:
        raise ValueError(f"{where}: no positive balloon maximum in the libvirt stats")
    if current is None:
        current = maximum
    # libvirt rounds the event's byte count up to KiB; never let it pass the maximum.
    return BalloonReading(min(current, maximum), maximum, stats, rss)


def from_bulk(params: Mapping[str, object], *, where: str = "guest") -> BalloonReading:
    """From one domain's typed parameters of ``domainListGetStats(VIR_DOMAIN_STATS_BALLOON)``."""
    return _reading(
        _count(params, "balloon.current"),
        _count(params, "balloon.maximum"),
        _stats(params, BULK_PREFIX, "last-update"),
        _count(params, "balloon.rss"),
        where,
    )


def from_memory_stats(stats: Mapping[str, object], maximum_kib: int, *, where: str = "guest") -> BalloonReading:
    """From ``dom.memoryStats()`` (one RPC per guest; only for tools, never the tick)."""
    return _reading(_count(stats, "actual"), maximum_kib, _stats(stats, "", "last_update"), _count(stats, "rss"), where)


# virDomainState and the reasons that mean a migration (libvirt-domain.h; virtio-balloon.md §7.5).
STATE_RUNNING, STATE_BLOCKED, STATE_PAUSED, STATE_SHUTDOWN, STATE_PMSUSPENDED = 1, 2, 3, 4, 7
_PAUSED_MIGRATION, _PAUSED_POSTCOPY, _PAUSED_POSTCOPY_FAILED = 2, 12, 13


def run_state(state: int, reason: int, *, migrating: bool = False) -> RunState | None:
    """Our RunState from the bulk call's ``state.state``/``state.reason``; ``migrating``
    is what migration events told us (a live migration's source keeps running until its
    final pause). None for a domain that is not running at all (shut off, crashed)."""
    if migrating or (
        state == STATE_PAUSED and reason in (_PAUSED_MIGRATION, _PAUSED_POSTCOPY, _PAUSED_POSTCOPY_FAILED)
    ):
        return RunState.MIGRATING if state in (STATE_RUNNING, STATE_BLOCKED, STATE_PAUSED) else None
    if state in (STATE_RUNNING, STATE_BLOCKED):
        return RunState.RUNNING
    if state in (STATE_PAUSED, STATE_PMSUSPENDED):
        return RunState.PAUSED
    if state == STATE_SHUTDOWN:
        return RunState.SHUTTING_DOWN
    return None
