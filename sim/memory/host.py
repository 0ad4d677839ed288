"""The simulated hypervisor host's RAM: what each guest costs it, and the HostSnapshot
the control step reads.

A guest costs the host the guest pages it has touched (``Fleet.touched``: pages
discarded by balloon inflation or returned by free page reporting no longer count) plus
the QEMU process's own memory. The host uses its base (kernel, services) plus that sum.
When that exceeds the host's RAM the host swaps (``host_swap``): the model lets use run
past 100 %, the scorecard reports the time and GiB·h above it, and the guests whose
pages the host swapped out pay for them as major faults when they touch them again.

Whose pages: the coldest first. The host's reclaim (mm/vmscan.c) takes its inactive
LRU first, and a guest page the guest does not use - a touched free page, cold page
cache, a ballooned page the host did not release - is never referenced and ages onto
it; swapping those costs nobody anything. Only the excess beyond every guest's cold
pages comes out of working sets, in proportion to each guest's hot memory (kernel,
anonymous working set, hot page cache), since the host cannot tell one guest's hot page
from another's. A swapped hot page is touched again within the guest model's
``swap_touch_s`` on average and faulted back in, pushing another out while the host
stays over (the guest model's own thrashing rule). The host's base and QEMU's own
memory are taken to stay resident. The guest's own stats do not show these faults (to
the guest a host-swapped page is a stall it cannot see); the scorecard counts them in the
guest's major faults and paging (``Fleet.host_swap_in``).

With ``arc.enabled`` the host runs ZFS: its ARC (``sim.memory.arc``) is host RAM in use, out
of MemAvailable, reported apart as ``arc_reclaimable_kib`` as ``overcommitd.host`` reads it.

Host memory pressure (PSI ``some``) is modelled as zero below ``psi_knee_pct`` of RAM
in use and rising linearly to 100 % of time stalled at full use.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from overcommitd.model import HostSnapshot, PsiMemory
from sim.memory.arc import ArcModelParams, SimArc
from sim.memory.guest import Array


class HostModelParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    base_kib: int = Field(2 * 1024 * 1024, ge=0, description="host kernel and services")
    qemu_overhead_kib: int = Field(48 * 1024, ge=0, description="QEMU process memory beside guest RAM, per guest")
    psi_knee_pct: float = Field(90.0, gt=0, lt=100, description="host use where memory stalls begin")
    arc: ArcModelParams = Field(default_factory=ArcModelParams, description="ZFS ARC; off by default")


def host_swap(excess_kib: float, cold_kib: Array, hot_kib: Array, dt_s: float, touch_s: float) -> tuple[Array, Array]:
    """Hot guest memory the host holds in swap when its use is ``excess_kib`` over its
    RAM, per guest, and what each guest faults back in over ``dt_s`` (KiB)."""
    if excess_kib <= 0:
        return np.zeros_like(hot_kib), np.zeros_like(hot_kib)
    from_hot = max(excess_kib - float(cold_kib.sum()), 0.0)
    total_hot = float(hot_kib.sum())
    swapped = hot_kib * min(from_hot / total_hot, 1.0) if total_hot > 0 else np.zeros_like(hot_kib)
    return swapped, swapped * (1.0 - float(np.exp(-dt_s / touch_s)))


class SimHost:
    """Host RAM accounting and pressure, integrated over simulated time."""

    def __init__(self, mem_total_kib: int, params: HostModelParams) -> None:
        if mem_total_kib <= params.base_kib:
            raise ValueError(f"mem_total_kib(={mem_total_kib}) must exceed the host base (={params.base_kib})")
        self.mem_total_kib = mem_total_kib
        self.params = params
        self.psi_some_total_us = 0.0
        self._avg10 = 0.0
        self._avg60 = 0.0
        self._avg300 = 0.0
        self.arc = SimArc(params.arc) if params.arc.enabled else None
        self._refault_seen_kib = 0.0
        self._decay_cache: dict[float, tuple[float, float, float]] = {}

    def used_kib(self, touched_kib: Array) -> float:
        """The host's use: its base, every guest's touched pages, QEMU's own, the ARC.
        ``np.add.reduce`` is ``ndarray.sum`` (the same pairwise sum) without its Python
        wrapper: a replay asks this three times a tick (issue 13 profile)."""
        arc_kib = self.arc.size_kib if self.arc is not None else 0.0
        touched_total_kib = np.add.reduce(touched_kib)
        return float(
            self.params.base_kib + touched_total_kib + self.params.qemu_overhead_kib * len(touched_kib) + arc_kib
        )

    def advance_arc(self, dt_s: float, read_kib_s: Array, refault_total_kib: Array, touched_kib: Array) -> None:
        """The ARC takes the guests' disk reads, first reads and re-reads of evicted guest
        cache (``refault_total_kib``, cumulative) alike, and gives memory back when the
        host is short. Nothing without ``arc.enabled``."""
        if self.arc is None or dt_s <= 0:
            return
        refault_kib = float(refault_total_kib.sum())
        reads_kib_s = float(read_kib_s.sum()) + (refault_kib - self._refault_seen_kib) / dt_s
        self._refault_seen_kib = refault_kib
        self.arc.advance(dt_s, reads_kib_s, self.used_kib(touched_kib) - self.arc.size_kib, self.mem_total_kib)

    def advance(self, dt_s: float, used_kib: float) -> None:
        """Accumulate stall time for ``dt_s`` at ``used_kib`` and update the averages
        the way the kernel does: exponential decay over 10, 60 and 300 s windows."""
        knee = self.mem_total_kib * self.params.psi_knee_pct / 100
        # min/max of Python floats: np.clip on one scalar cost more than the rest of the step.
        stalled = min(max(float((used_kib - knee) / (self.mem_total_kib - knee)), 0.0), 1.0)
        self.psi_some_total_us += stalled * dt_s * 1e6
        d10, d60, d300 = self._decays(dt_s)
        self._avg10 = self._avg10 * d10 + 100 * stalled * (1 - d10)
        self._avg60 = self._avg60 * d60 + 100 * stalled * (1 - d60)
        self._avg300 = self._avg300 * d300 + 100 * stalled * (1 - d300)

    def _decays(self, dt_s: float) -> tuple[float, float, float]:
        """The 10, 60 and 300 s windows' decay over ``dt_s``, computed once per interval
        length (a replay has one or two: three ``np.exp`` calls a tick were a tenth of
        the host's cost)."""
        found = self._decay_cache.get(dt_s)
        if found is None:
            e10, e60, e300 = (np.exp(-dt_s / w) for w in (10.0, 60.0, 300.0))
            found = self._decay_cache[dt_s] = (e10, e60, e300)
            if len(self._decay_cache) > 64:  # irregular intervals: keep the cache small
                self._decay_cache.clear()
        return found

    def snapshot(self, now_s: float, used_kib: float) -> HostSnapshot:
        available = int(min(max(self.mem_total_kib - used_kib, 0.0), self.mem_total_kib))
        psi = PsiMemory(
            some_avg10=self._avg10,
            some_avg60=self._avg60,
            some_avg300=self._avg300,
            some_total_us=int(self.psi_some_total_us),
        )
        return HostSnapshot(
            taken_at_s=now_s,
            mem_total_kib=self.mem_total_kib,
            mem_available_kib=available,
            psi=psi,
            arc_reclaimable_kib=self.arc.reclaimable_kib if self.arc is not None else 0,
        )
