"""The guest kernel's own memory rules: zone watermarks, the reserve MemAvailable
subtracts, and what a guest of a given RAM size has left after boot.

Why: a policy that holds MemAvailable at a set-point moves the balloon by every KiB
the model gets wrong between MemFree and MemAvailable. The real Debian 6.1 guest keeps
that gap at ~65 MiB because THP is on and khugepaged raises ``min_free_kbytes`` to
45056 (issue 16); a flat 1 % guess gives ~10 MiB. So the constants are computed the way
the kernel computes them, per guest size, and checked against a real guest's
``/proc/zoneinfo`` (tests/test_kernel.py).

Every rule cites the Linux 6.1 source (mm/page_alloc.c, mm/khugepaged.c,
mm/huge_memory.c). Units: pages are 4 KiB (x86-64), ``_pages`` in names; KiB elsewhere.

Boot order the model follows (6.1 initcalls):
1. ``init_per_zone_wmark_min`` (postcore): ``min_free_kbytes = clamp(int_sqrt(lowmem_kbytes
   * 16), 128, 262144)``, watermarks, lowmem_reserve, totalreserve_pages.
2. ``hugepage_init`` (subsys): THP off on guests under 512 MiB; else khugepaged's
   ``set_recommended_min_free_kbytes`` raises ``min_free_kbytes`` and resets watermarks.
3. Later the kernel frees its init sections and the initrd (``late_freed_kib``): MemTotal
   grows, but nothing recomputes the watermarks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

PAGE_KIB = 4
# x86-64: pageblock_order = HPAGE_PMD_ORDER = 9 (include/linux/pageblock-flags.h).
PAGEBLOCK_PAGES = 512
# include/linux/mmzone.h: MIGRATE_PCPTYPES = MIGRATE_RECLAIMABLE + 1 = 3.
MIGRATE_PCPTYPES = 3
# mm/page_alloc.c calculate_min_free_kbytes(): clamp(new_min_free_kbytes, 128, 262144)
# (the upper bound was 65536 before 5.7).
MIN_FREE_KBYTES_FLOOR = 128
MIN_FREE_KBYTES_CEIL = 262144
# mm/page_alloc.c: int sysctl_lowmem_reserve_ratio[] = {DMA 256, DMA32 256, NORMAL 32, ...}.
LOWMEM_RESERVE_RATIO = {"DMA": 256, "DMA32": 256, "Normal": 32}
# mm/huge_memory.c hugepage_init(): "By default disable transparent hugepages on smaller
# systems": totalram_pages() < (512 << (20 - PAGE_SHIFT)) clears the THP flags.
THP_MIN_TOTALRAM_KIB = 512 * 1024
# QEMU hw/i386/pc_piix.c (machine 'pc'): RAM of 3.5 GiB (0xe0000000) or more is split,
# 3 GiB below the 4 GiB hole and the rest above it, in ZONE_NORMAL.
PC_LOWMEM_SPLIT_KIB = 0xE0000000 // 1024
PC_LOWMEM_KIB = 0xC0000000 // 1024

ThpMode = Literal["always", "madvise", "never"]


class GuestKernel(BaseModel):
    """What the simulated guest runs: the kernel version (which stat tags it sends,
    ``sim.memory.stat_tags``) and the sysctls that set its watermarks.

    Defaults are the test image's: Debian's 6.1 cloud kernel, whose config has
    CONFIG_TRANSPARENT_HUGEPAGE_ALWAYS=y (read from
    linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb, /boot/config-*)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: str = Field("6.1", pattern=r"^\d+\.\d+(\.\d+)?$", description="guest Linux version, e.g. 6.1")
    thp: ThpMode = Field("always", description="/sys/kernel/mm/transparent_hugepage/enabled")
    watermark_scale_factor: int = Field(10, ge=1, le=3000, description="vm.watermark_scale_factor (1/10000)")
    cpus: int = Field(1, ge=1, description="online vCPUs: each has its own per-CPU free page lists")
    percpu_pagelist_high_fraction: int = Field(
        0, ge=0, description="vm.percpu_pagelist_high_fraction (0: pcp->high from the low watermark; else >= 8)"
    )


@dataclass(frozen=True, slots=True)
class BootMeasurement:
    """Constants of one kernel build on one machine type that no rule gives, measured.

    Debian 6.1.0-57-cloud-amd64 on QEMU 'pc' under TCG, busybox initramfs, read by
    ``tests/realguest/init`` with ``rgdump=1`` (command in tests/test_kernel.py):
    - DMA zone managed 3840 pages at 512 and 1024 MiB;
    - MemTotal 481296 / 996624 KiB at 512 / 1024 MiB: reserved = 34032 KiB + 1.709 %;
    - MemTotal - MemFree - Cached - AnonPages right after boot 27036 / 35888 KiB:
      kernel = 18184 KiB + 1.688 % (large system hashes scale with RAM);
    - init sections and initrd freed after the watermarks were set: 2504..2564 pages,
      the only range that gives both guests' min_free_kbytes, watermarks and
      lowmem_reserve protection at once (10160 KiB = 2540 pages taken)."""

    dma_managed_kib: int = 3840 * PAGE_KIB
    reserved_fixed_kib: int = 34032
    reserved_pct: float = 1.709
    kernel_fixed_kib: int = 18184
    kernel_pct: float = 1.688
    late_freed_kib: int = 2540 * PAGE_KIB

    def mem_total_kib(self, ram_kib: int) -> int:
        """MemTotal (managed pages) of a guest with ``ram_kib`` of RAM, after boot."""
        return ram_kib - self.reserved_fixed_kib - round(ram_kib * self.reserved_pct / 100)

    def kernel_kib(self, ram_kib: int) -> int:
        """Kernel memory (slab, stacks, page tables, hashes) right after boot."""
        return self.kernel_fixed_kib + round(ram_kib * self.kernel_pct / 100)


DEBIAN_6_1_PC = BootMeasurement()


@dataclass(frozen=True, slots=True)
class Zone:
    name: str
    managed_pages: int


@dataclass(frozen=True, slots=True)
class ZoneWatermarks:
    """One zone's ``_watermark[WMARK_MIN/LOW/HIGH]`` and ``lowmem_reserve`` maximum."""

    name: str
    min_pages: int
    low_pages: int
    high_pages: int
    reserve_pages: int  # max over lowmem_reserve[], what allocations for higher zones leave
    pcp_high_pages: int  # per_cpu_pages.high of each CPU (``zone_highsize``)
    pcp_batch_pages: int  # per_cpu_pages.batch (``zone_batchsize``)


@dataclass(frozen=True, slots=True)
class KernelMemory:
    """What the guest kernel set at boot and keeps: everything in KiB except per-zone pages."""

    min_free_kbytes: int
    thp_active: bool
    zones: tuple[ZoneWatermarks, ...]
    totalreserve_kib: int  # calculate_totalreserve_pages(): high watermarks + lowmem_reserve
    oom_floor_kib: int  # min watermarks + lowmem_reserve: free pages no allocation gets (``oom_floor_pages``)
    wmark_low_kib: int  # sum of low watermarks, si_mem_available()'s cap on cache credit
    mem_total_kib: int
    kernel_kib: int
    pcp_cap_kib: int  # free pages the per-CPU lists hold at most, all CPUs (``pcp_cap_pages``)

    def high_pages(self, zone: str) -> int:
        return next(z.high_pages for z in self.zones if z.name == zone)


def zones_for(mem_total_kib: int, ram_kib: int, dma_managed_kib: int) -> tuple[Zone, ...]:
    """Managed pages per zone of an x86-64 guest on QEMU 'pc': ZONE_DMA is the first
    16 MiB, ZONE_DMA32 the rest below 4 GiB, ZONE_NORMAL what QEMU maps above it."""
    dma = dma_managed_kib // PAGE_KIB
    rest = mem_total_kib // PAGE_KIB - dma
    if rest <= 0:
        raise ValueError(f"mem_total_kib(={mem_total_kib}) must exceed the DMA zone (={dma_managed_kib} KiB)")
    high_ram_kib = ram_kib - PC_LOWMEM_KIB if ram_kib >= PC_LOWMEM_SPLIT_KIB else 0
    normal = rest * high_ram_kib // ram_kib
    zones = [Zone("DMA", dma), Zone("DMA32", rest - normal)]
    if normal > 0:
        zones.append(Zone("Normal", normal))
    return tuple(zones)


def nr_free_buffer_pages(zones: tuple[Zone, ...], high_pages: tuple[int, ...]) -> int:
    """mm/page_alloc.c nr_free_zone_pages(gfp_zone(GFP_USER)): managed pages above each
    zone's high watermark, over the zones a GFP_USER allocation may use."""
    return sum(max(z.managed_pages - h, 0) for z, h in zip(zones, high_pages, strict=True))


def default_min_free_kbytes(lowmem_kib: int) -> int:
    """mm/page_alloc.c calculate_min_free_kbytes(): int_sqrt(lowmem_kbytes * 16), clamped."""
    return min(max(math.isqrt(lowmem_kib * 16), MIN_FREE_KBYTES_FLOOR), MIN_FREE_KBYTES_CEIL)


def thp_recommended_min_free_kbytes(zones: tuple[Zone, ...], free_buffer_pages: int) -> int:
    """mm/khugepaged.c set_recommended_min_free_kbytes(): two free pageblocks per zone up
    to ZONE_NORMAL, plus MIGRATE_PCPTYPES^2 pageblocks per zone for fallbacks, never more
    than 5 % of nr_free_buffer_pages()."""
    nr_zones = sum(1 for z in zones if z.managed_pages > 0)
    pages = PAGEBLOCK_PAGES * nr_zones * 2 + PAGEBLOCK_PAGES * nr_zones * MIGRATE_PCPTYPES * MIGRATE_PCPTYPES
    return min(pages, free_buffer_pages // 20) * PAGE_KIB


def setup_per_zone_wmarks(zones: tuple[Zone, ...], min_free_kbytes: int, wsf: int) -> tuple[tuple[int, int, int], ...]:
    """mm/page_alloc.c __setup_per_zone_wmarks(): min_free_kbytes split over the zones by
    managed pages; low = min + gap, high = low + gap, gap = max(min / 4,
    managed * watermark_scale_factor / 10000). (min, low, high) per zone, in pages."""
    pages_min = min_free_kbytes // PAGE_KIB
    lowmem_pages = sum(z.managed_pages for z in zones)
    marks = []
    for z in zones:
        wmin = pages_min * z.managed_pages // lowmem_pages
        gap = max(wmin >> 2, z.managed_pages * wsf // 10000)
        marks.append((wmin, wmin + gap, wmin + 2 * gap))
    return tuple(marks)


def lowmem_reserve_pages(zones: tuple[Zone, ...]) -> tuple[int, ...]:
    """mm/page_alloc.c setup_per_zone_lowmem_reserve(): zone i keeps back, from
    allocations that could use a higher zone j, the managed pages of zones i+1..j over
    sysctl_lowmem_reserve_ratio[i]; the largest of those (what calculate_totalreserve_pages()
    takes) is the one for the highest zone."""
    out = []
    for i, z in enumerate(zones):
        upper = sum(u.managed_pages for u in zones[i + 1 :])
        out.append(upper // LOWMEM_RESERVE_RATIO[z.name] if z.managed_pages else 0)
    return tuple(out)


def totalreserve_pages(zones: tuple[Zone, ...], high_pages: tuple[int, ...], reserve: tuple[int, ...]) -> int:
    """mm/page_alloc.c calculate_totalreserve_pages(): per zone, its largest lowmem_reserve
    plus its high watermark, at most its managed pages."""
    return sum(min(r + h, z.managed_pages) for z, h, r in zip(zones, high_pages, reserve, strict=True))


def oom_floor_pages(zones: tuple[Zone, ...], min_pages: tuple[int, ...], reserve: tuple[int, ...]) -> int:
    """The free pages an order-0 movable allocation leaves when nothing is left to
    reclaim: mm/page_alloc.c __zone_watermark_ok() lets the slow path (ALLOC_WMARK_MIN)
    take a zone's pages while they exceed its min watermark plus its lowmem_reserve for
    the highest zone the allocation may use (the largest, ``reserve``); below that in
    every zone, direct reclaim fails and out_of_memory() runs (the balloon's OOM notifier
    first). So a guest with nothing to reclaim runs out with this much free, not at
    totalreserve_pages, which only kswapd aims at: the real 1024 MiB test guests of the
    kept fidelity runs, exhausted, showed 47.6 MiB free at the least (this rule: 47.7;
    totalreserve 69.7). At most each zone's managed pages, as totalreserve."""
    return sum(min(r + m, z.managed_pages) for z, m, r in zip(zones, min_pages, reserve, strict=True))


def zone_batchsize(managed_pages: int) -> int:
    """mm/page_alloc.c zone_batchsize() (6.1, CONFIG_MMU): a 1/1024th of the zone up to
    1 MiB of pages, a quarter of that, rounded to (2^n - 1); at least 1 as
    zone_set_pageset_high_and_batch() takes ``max(1, zone_batchsize(zone))``."""
    batch = min(managed_pages >> 10, 1024 // PAGE_KIB) // 4  # SZ_1M / PAGE_SIZE
    batch = max(batch, 1)
    batch = (1 << ((batch + batch // 2).bit_length() - 1)) - 1  # rounddown_pow_of_two(...) - 1
    return max(batch, 1)


def zone_highsize(managed_pages: int, low_pages: int, batch: int, kernel: GuestKernel) -> int:
    """mm/page_alloc.c zone_highsize() (6.1): with vm.percpu_pagelist_high_fraction 0 (the
    default), the zone's low watermark split over the node's CPUs ("so that if they are
    full then background reclaim will not be started prematurely"), else managed pages
    over the fraction; never under four batches. setup_per_zone_wmarks() recomputes it
    whenever the watermarks change (zone_pcp_update()), so it follows khugepaged's."""
    fraction = kernel.percpu_pagelist_high_fraction
    total = low_pages if fraction == 0 else managed_pages // fraction
    return max(total // kernel.cpus, batch << 2)


def pcp_cap_pages(high: int, batch: int, cpus: int) -> int:
    """Free pages one zone's per-CPU lists hold after a long run of frees, all CPUs.
    mm/page_alloc.c free_unref_page_commit(): a list that reaches ``high`` gives pages
    back to the buddy lists (free_pcppages_bulk()) down to no fewer than ``batch``
    (nr_pcp_free(): between ``batch`` and ``high - batch`` at a time, doubling while only
    frees come), so a list refilled by frees sits between ``batch`` and ``high``: half-way,
    ``(high + batch) / 2``, on average."""
    return cpus * (high + batch) // 2


def thp_active(kernel: GuestKernel, totalram_kib: int) -> bool:
    """khugepaged runs, and raises min_free_kbytes, when THP is 'always' or 'madvise'
    (mm/khugepaged.c hugepage_flags_enabled() in 6.1), unless hugepage_init() turned THP
    off on a guest under 512 MiB (mm/huge_memory.c)."""
    return kernel.thp != "never" and totalram_kib >= THP_MIN_TOTALRAM_KIB


def boot(ram_kib: int, kernel: GuestKernel | None = None, machine: BootMeasurement = DEBIAN_6_1_PC) -> KernelMemory:
    """The watermarks and reserves a guest of ``ram_kib`` sets at boot (module docstring
    for the order), and its MemTotal and kernel memory once booted."""
    kernel = kernel or GuestKernel()
    mem_total_kib = machine.mem_total_kib(ram_kib)
    at_setup_kib = mem_total_kib - machine.late_freed_kib
    zones = zones_for(at_setup_kib, ram_kib, machine.dma_managed_kib)
    no_marks = tuple(0 for _ in zones)
    min_free = default_min_free_kbytes(nr_free_buffer_pages(zones, no_marks) * PAGE_KIB)
    marks = setup_per_zone_wmarks(zones, min_free, kernel.watermark_scale_factor)
    active = thp_active(kernel, at_setup_kib)
    if active:
        highs = tuple(m[2] for m in marks)
        min_free = max(min_free, thp_recommended_min_free_kbytes(zones, nr_free_buffer_pages(zones, highs)))
        marks = setup_per_zone_wmarks(zones, min_free, kernel.watermark_scale_factor)
    reserve = lowmem_reserve_pages(zones)
    highs = tuple(m[2] for m in marks)
    batches = tuple(zone_batchsize(z.managed_pages) for z in zones)
    pcp_highs = tuple(
        zone_highsize(z.managed_pages, m[1], b, kernel) for z, m, b in zip(zones, marks, batches, strict=True)
    )
    rows = zip(zones, marks, reserve, pcp_highs, batches, strict=True)
    return KernelMemory(
        min_free_kbytes=min_free,
        thp_active=active,
        zones=tuple(ZoneWatermarks(z.name, lo, mid, hi, r, ph, b) for z, (lo, mid, hi), r, ph, b in rows),
        totalreserve_kib=totalreserve_pages(zones, highs, reserve) * PAGE_KIB,
        oom_floor_kib=oom_floor_pages(zones, tuple(m[0] for m in marks), reserve) * PAGE_KIB,
        wmark_low_kib=sum(m[1] for m in marks) * PAGE_KIB,
        mem_total_kib=mem_total_kib,
        kernel_kib=machine.kernel_kib(ram_kib),
        pcp_cap_kib=_pcp_cap_kib(zones, pcp_highs, batches, kernel.cpus),
    )


def _pcp_cap_kib(zones: tuple[Zone, ...], highs: tuple[int, ...], batches: tuple[int, ...], cpus: int) -> int:
    """``pcp_cap_pages`` over the zones a workload's pages come from: not ZONE_DMA, which
    lowmem_reserve keeps from GFP_HIGHUSER allocations while DMA32 has pages (948 pages
    of protection for 3840 managed on the test guest), so its lists stay near empty."""
    pages = sum(pcp_cap_pages(h, b, cpus) for z, h, b in zip(zones, highs, batches, strict=True) if z.name != "DMA")
    return pages * PAGE_KIB


def mem_available_kib(km: KernelMemory, *, mem_free_kib: int, file_kib: int, slab_reclaimable_kib: int) -> int:
    """mm/page_alloc.c si_mem_available() (6.1): free pages less totalreserve_pages, plus
    the page cache and reclaimable slab, each less min(half of it, the low watermarks)."""
    wlow = km.wmark_low_kib
    cache = file_kib - min(file_kib // 2, wlow)
    slab = slab_reclaimable_kib - min(slab_reclaimable_kib // 2, wlow)
    return max(mem_free_kib - km.totalreserve_kib + cache + slab, 0)


def reserve_pct(ram_kib: int, kernel: GuestKernel | None = None, machine: BootMeasurement = DEBIAN_6_1_PC) -> float:
    """The kernel's own gap between MemFree and MemAvailable at low cache
    (totalreserve_pages; the model has no reclaimable slab), in % of ``ram_kib``: 6.8 % for
    the 1024 MiB test guest, 2.9 % at 4 GiB. One flat share cannot fit a fleet of mixed
    sizes, so replays take each guest's from ``guest_reserve`` unless
    GuestModelParams.min_free_pct sets one."""
    return 100 * boot(ram_kib, kernel, machine).totalreserve_kib / ram_kib


@dataclass(frozen=True, slots=True)
class GuestReserve:
    """Per guest (arrays, KiB): what si_mem_available() takes off MemFree
    (``totalreserve_kib``, which the model also keeps free while there is something to
    reclaim: kswapd reclaims up to the high watermarks it is made of), the free memory
    below which the guest runs out when there is not (``oom_floor_kib``), its cap on the
    page-cache credit (``wmark_low_kib``) and what its per-CPU free lists hold at most
    (``pcp_cap_kib``, ``pcp_cap_pages``)."""

    totalreserve_kib: npt.NDArray[np.float64]
    oom_floor_kib: npt.NDArray[np.float64]
    wmark_low_kib: npt.NDArray[np.float64]
    pcp_cap_kib: npt.NDArray[np.float64]


@functools.lru_cache(maxsize=256)
def _boot_cached(ram_kib: int, kernel: GuestKernel, machine: BootMeasurement) -> KernelMemory:
    return boot(ram_kib, kernel, machine)


def guest_reserve(
    ram_kib: Sequence[int], kernel: GuestKernel | None = None, machine: BootMeasurement = DEBIAN_6_1_PC
) -> GuestReserve:
    """The kernel's own reserve for each guest's size (``boot``; a fleet has few sizes, so
    each is computed once)."""
    kernel = kernel or GuestKernel()
    booted = [_boot_cached(int(r), kernel, machine) for r in ram_kib]
    return GuestReserve(
        np.array([b.totalreserve_kib for b in booted], dtype=np.float64),
        np.array([b.oom_floor_kib for b in booted], dtype=np.float64),
        np.array([b.wmark_low_kib for b in booted], dtype=np.float64),
        np.array([b.pcp_cap_kib for b in booted], dtype=np.float64),
    )
