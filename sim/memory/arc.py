"""ZFS's ARC on the simulated host: a cache in host RAM that the kernel counts as used
(not page cache, so not in MemAvailable), grown by the guests' disk reads and given back
under pressure by ZFS's own reap thread, a step at a time, not at once as page cache is.

The law follows OpenZFS module/zfs/arc.c (read, not copied):

* the target ``c`` grows by what is read while the ARC is near it (``arc_adapt``), up to
  ``c_max``; data read enters the ARC, and beyond ``c`` old data is evicted to make room;
* ``arc_available_memory`` is host free memory minus ``arc_sys_free``; below 0 the reap
  thread (``arc_reap_cb``), after waiting ``arc_kmem_cache_reap_retry_ms`` (1000 ms),
  lowers ``c`` by ``(c - c_min) >> arc_shrink_shift`` (7) plus the deficit, never below
  ``c_min``, and growth stops for ``arc_grow_retry`` (5 s);
* with less than ``c >> arc_no_grow_shift`` (5) free, ``c`` does not grow either;
* eviction toward ``c`` is asynchronous (the arc_evict thread): here at most
  ``evict_kib_s`` per second, the model's assumption, not a measured figure.

So under a sudden demand the host runs short for a reap period or more while the ARC
comes down; page cache in the guests is dropped the instant the guest needs it.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

GIB_KIB = 1024 * 1024


class ArcModelParams(BaseModel):
    """The simulated ARC; off by default, so replays without it are unchanged."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: bool = False
    c_min_kib: int = Field(1 * GIB_KIB, ge=0, description="zfs_arc_min: the ARC never shrinks below this")
    c_max_kib: int = Field(16 * GIB_KIB, gt=0, description="zfs_arc_max")
    initial_kib: int = Field(1 * GIB_KIB, ge=0, description="ARC size (and c) at the start")
    sys_free_kib: int = Field(512 * 1024, ge=0, description="arc_sys_free: free memory the ARC leaves the host")
    reap_period_s: float = Field(1.0, gt=0, description="arc_kmem_cache_reap_retry_ms: one reap pass per period")
    shrink_shift: int = Field(7, ge=0, le=30, description="arc_shrink_shift: a reap also takes (c - c_min) >> this")
    no_grow_shift: int = Field(5, ge=0, le=30, description="arc_no_grow_shift: no growth with < c >> this free")
    grow_retry_s: float = Field(5.0, ge=0, description="arc_grow_retry: no growth this long after a reap")
    evict_kib_s: float = Field(512 * 1024, gt=0, description="eviction throughput toward c (model assumption)")

    @model_validator(mode="after")
    def _ordered(self) -> ArcModelParams:
        if not self.c_min_kib <= self.initial_kib <= self.c_max_kib:
            raise ValueError(
                f"need c_min_kib(={self.c_min_kib}) <= initial_kib(={self.initial_kib}) <= c_max_kib(={self.c_max_kib})"
            )
        return self


class SimArc:
    """ARC size and target, advanced in reap periods."""

    def __init__(self, params: ArcModelParams) -> None:
        self.params = params
        self.size_kib = float(params.initial_kib)
        self.c_kib = float(params.initial_kib)
        self.no_grow_until_s = 0.0
        self.now_s = 0.0
        self.reaps = 0  # reap passes that lowered c: how often the host ran short

    @property
    def reclaimable_kib(self) -> int:
        """What the host can take back: the ARC above c_min (as ``overcommitd.host`` reads it)."""
        return max(0, int(self.size_kib - self.params.c_min_kib))

    def advance(self, dt_s: float, read_kib_s: float, other_used_kib: float, total_kib: float) -> None:
        """Run ``dt_s`` of reads at ``read_kib_s`` on a host whose RAM outside the ARC is
        ``other_used_kib`` of ``total_kib``, one reap period at a time."""
        steps = max(1, math.ceil(dt_s / self.params.reap_period_s - 1e-9))
        h = dt_s / steps
        for _ in range(steps):
            self._period(h, read_kib_s * h, other_used_kib, total_kib)

    def _period(self, h_s: float, read_kib: float, other_used_kib: float, total_kib: float) -> None:
        p = self.params
        self.now_s += h_s
        available = total_kib - other_used_kib - self.size_kib - p.sys_free_kib  # arc_available_memory
        if available < 0:
            to_free = (self.c_kib - p.c_min_kib) / 2**p.shrink_shift - available
            self.c_kib = max(float(p.c_min_kib), self.c_kib - max(0.0, to_free))
            self.no_grow_until_s = self.now_s + p.grow_retry_s
            self.reaps += 1
        elif self.now_s >= self.no_grow_until_s and available >= self.c_kib / 2**p.no_grow_shift:
            self.c_kib = min(float(p.c_max_kib), self.c_kib + read_kib)
        self.size_kib = min(self.size_kib + read_kib, max(self.size_kib, self.c_kib))  # reads fill up to c
        if self.size_kib > self.c_kib:
            self.size_kib -= min(self.size_kib - self.c_kib, p.evict_kib_s * h_s)
