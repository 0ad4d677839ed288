"""Hand-built snapshots for testing a policy without a host or a simulator.

Plugin authors may use these too: a policy is pure, so a unit test is a few snapshots,
one ``decide`` call and an assert on the targets. Sizes are KiB; ``GIB``/``MIB`` help.
"""

from __future__ import annotations

from overcommitd.model import BalloonFeatures, GuestSnapshot, GuestStats, HostSnapshot, PsiMemory

MIB = 1024
GIB = 1024 * 1024


def host(
    *,
    at_s: float = 0.0,
    total_kib: int = 64 * GIB,
    available_kib: int = 32 * GIB,
    psi_some_avg10: float | None = None,
) -> HostSnapshot:
    """A host with ``available_kib`` of MemAvailable; PSI only if ``psi_some_avg10`` is given."""
    psi = None if psi_some_avg10 is None else PsiMemory(some_avg10=psi_some_avg10, some_avg60=psi_some_avg10)
    return HostSnapshot(taken_at_s=at_s, mem_total_kib=total_kib, mem_available_kib=available_kib, psi=psi)


def guest(
    name: str = "vm",
    *,
    at_s: float = 0.0,
    max_kib: int = 8 * GIB,
    actual_kib: int | None = None,
    available_kib: int | None = 4 * GIB,
    free_kib: int | None = None,
    caches_kib: int | None = None,
    swap_in_kib: int = 0,
    last_target_kib: int | None = None,
    floor_kib: int = 0,
    weight: float = 1.0,
    features: BalloonFeatures | None = None,
    stats: bool = True,
) -> GuestSnapshot:
    """A running guest whose stats were taken at ``at_s``.

    ``available_kib`` is MemAvailable; ``free_kib`` (MemFree) defaults to half of it and
    ``caches_kib`` to the rest, so MemFree + caches = MemAvailable. MemTotal is ``max_kib``
    for a DEFLATE_ON_OOM guest (the balloon does not shrink it) and ``actual_kib`` otherwise.
    """
    actual = max_kib if actual_kib is None else actual_kib
    feats = features or BalloonFeatures()
    guest_stats = None
    if stats:
        free = free_kib if free_kib is not None else (available_kib or 0) // 2
        caches = caches_kib if caches_kib is not None else max(0, (available_kib or 0) - free)
        guest_stats = GuestStats(
            last_update_s=at_s,
            swap_in_kib=swap_in_kib,
            swap_out_kib=0,
            major_faults=0,
            mem_free_kib=free,
            mem_total_kib=max_kib if feats.deflate_on_oom else actual,
            mem_available_kib=available_kib,
            disk_caches_kib=caches,
        )
    return GuestSnapshot(
        uuid=f"uuid-{name}",
        name=name,
        max_kib=max_kib,
        actual_kib=actual,
        current_kib=actual,
        last_target_kib=last_target_kib,
        features=feats,
        stats=guest_stats,
        stats_period_s=10.0,
        floor_kib=floor_kib,
        weight=weight,
    )
