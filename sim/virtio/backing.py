"""How the host releases a ballooned page: by the guest RAM's backing, as QEMU does.

QEMU's balloon discards each inflated 4 KiB unit with ``ram_block_discard_range``
(system/physmem.c), whose effect depends on what backs guest RAM::

    private anonymous (plain -m)       MADV_DONTNEED              freed
    shared anonymous (share=on)        MADV_REMOVE                freed  (DONTNEED would not free it)
    file / memfd / shm                 FALLOC_FL_PUNCH_HOLE + DONTNEED   freed
    hugetlbfs                          FALLOC_FL_PUNCH_HOLE only  freed, whole huge pages only

QEMU before the balloon used ``ram_block_discard_range`` called ``madvise(DONTNEED)``
directly (``discard="madvise"`` here): that frees private anonymous memory only; shared
memory keeps its pages (they stay in shmem or the file) and hugetlbfs refuses it.

Backing pages larger than 4 KiB can only be discarded whole. QEMU keeps one
``PartiallyBalloonedPage`` (a bitmap over one host page) per popped element: a PFN in a
different host page drops the old partial state, and the tracker is freed when the
element ends. So a 2 MiB host page is freed only if all 512 of its PFNs arrive in one
inflate request - never with Linux's 256-PFN requests (virtio-balloon.md §4.3).

Discards can be inhibited (incoming postcopy, VFIO, background snapshot,
``virtio_balloon_inhibited``): requests are still acknowledged, nothing is released.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from sim.virtio.balloon_spec import BALLOON_PAGE_BYTES

BackingKind = Literal["private-anon", "shared-anon", "file", "hugetlbfs"]
DiscardPath = Literal["ram_block_discard_range", "madvise"]


@dataclass(frozen=True, slots=True)
class RamBacking:
    """What backs a guest's RAM on the host (libvirt ``<memoryBacking>``)."""

    kind: BackingKind = "private-anon"
    page_bytes: int = 4096  # host page size of the RAM block (2 MiB for hugetlbfs 2M)
    discard: DiscardPath = "ram_block_discard_range"

    def __post_init__(self) -> None:
        if self.page_bytes < BALLOON_PAGE_BYTES or self.page_bytes & (self.page_bytes - 1):
            raise ValueError(f"page_bytes(={self.page_bytes}) must be a power of 2 >= {BALLOON_PAGE_BYTES}")

    def frees(self) -> bool:
        """Whether one discard of a whole host page releases host memory."""
        if self.discard == "madvise":
            return self.kind == "private-anon" and self.page_bytes == BALLOON_PAGE_BYTES
        return True


@dataclass(slots=True)
class HostRam:
    """The host's side of one guest's RAM: what the balloon released, and how."""

    backing: RamBacking = field(default_factory=RamBacking)
    inhibited: bool = False
    released_bytes: int = 0  # cumulative host memory released by balloon discards
    reported_bytes: int = 0  # cumulative host memory released by free page reporting
    discard_calls: int = 0
    willneed_calls: int = 0
    partial_dropped: int = 0  # partially ballooned host pages given up (QEMU's pbp reset)
    warned_large_pages: bool = False

    def inflate_element(self, pfns: npt.NDArray[np.uint32]) -> int:
        """Discard the PFNs of one inflate request; returns bytes released."""
        if self.inhibited or len(pfns) == 0:
            return 0
        per_host = self.backing.page_bytes // BALLOON_PAGE_BYTES
        if per_host == 1:
            self.discard_calls += len(pfns)
            freed = len(pfns) * BALLOON_PAGE_BYTES if self.backing.frees() else 0
        else:
            self.warned_large_pages = True  # "Balloon used with backing page size > 4kiB..."
            freed = self._inflate_large(pfns, per_host)
        self.released_bytes += freed
        return freed

    def inflate_elements(self, count: int, pfns_each: int) -> int:
        """``inflate_element`` of ``count`` requests of ``pfns_each`` PFNs each, on 4 KiB
        backing (every PFN its own host page); returns bytes released by each."""
        if self.backing.page_bytes != BALLOON_PAGE_BYTES:
            raise ValueError(f"page_bytes(={self.backing.page_bytes}): only 4 KiB backing releases PFN by PFN")
        if self.inhibited or not pfns_each:
            return 0
        self.discard_calls += count * pfns_each
        freed = pfns_each * BALLOON_PAGE_BYTES if self.backing.frees() else 0
        self.released_bytes += count * freed
        return freed

    def _inflate_large(self, pfns: npt.NDArray[np.uint32], per_host: int) -> int:
        """One PartiallyBalloonedPage for the element, over arrays: a run of PFNs in one
        host page with no PFN twice fills the bitmap iff it covers the whole page; every
        other run is a tracker dropped. A run that repeats a PFN takes the loop."""
        pages = pfns.astype(np.int64) // per_host
        starts = np.flatnonzero(np.diff(pages, prepend=-1))
        lengths = np.diff(starts, append=len(pfns))
        run = np.repeat(np.arange(len(starts)), lengths)
        if len(np.unique(run * per_host + pfns % per_host)) != len(pfns):
            return self._inflate_large_loop(pfns, per_host)
        fills = int(np.count_nonzero(lengths == per_host))
        self.discard_calls += fills
        self.partial_dropped += len(lengths) - fills
        return fills * self.backing.page_bytes if self.backing.frees() else 0

    def _inflate_large_loop(self, pfns: npt.NDArray[np.uint32], per_host: int) -> int:
        """QEMU's per-PFN walk (virtio_balloon_pbp_*): bits for the current host page,
        reset whenever a PFN falls in another one; a full bitmap discards that page."""
        freed = 0
        base, bits = -1, 0
        full = (1 << per_host) - 1
        for pfn in pfns.tolist():
            host_page = pfn // per_host
            if host_page != base:
                if bits:
                    self.partial_dropped += 1
                base, bits = host_page, 0
            bits |= 1 << (pfn % per_host)
            if bits == full:
                self.discard_calls += 1
                freed += self.backing.page_bytes if self.backing.frees() else 0
                base, bits = -1, 0
        if bits:
            self.partial_dropped += 1  # the tracker dies with the element
        return freed

    def deflate_element(self, pfns: npt.NDArray[np.uint32]) -> None:
        """MADV_WILLNEED on each host page: a prefetch hint; the page faults in on use."""
        if not self.inhibited:
            self.willneed_calls += len(pfns)

    def deflate_elements(self, count: int, pfns_each: int) -> None:
        """``deflate_element`` of ``count`` requests of ``pfns_each`` PFNs each."""
        if not self.inhibited:
            self.willneed_calls += count * pfns_each

    def report(self, ranges: list[tuple[int, int]], poison_val: int) -> int:
        """Discard reported free blocks; skipped when inhibited or when ``poison_val`` is
        not 0 (a discarded page reads back as zeros, breaking the poison pattern)."""
        if self.inhibited or poison_val != 0:
            return 0
        freed = 0
        for addr, length in ranges:
            if addr % self.backing.page_bytes or length % self.backing.page_bytes:
                continue  # QEMU ignores entries not aligned to the RAM block's page size
            self.discard_calls += 1
            freed += length if self.backing.frees() else 0
        self.reported_bytes += freed
        return freed
