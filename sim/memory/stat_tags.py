"""Which virtio-balloon stat tags a guest kernel sends, by Linux version.

Why: a simulated guest that reports more than its kernel does lets a policy see what
the real daemon never sees. Issue 16: the simulated 6.1 guest reported an OOM-kill
count (tag 10, Linux >= 6.12), so the replayed policy knew of a kill the real daemon
did not, and the two runs parted. The guest model masks its stats to its kernel's tags.

Each tag's first mainline release, from the commit that added it to
``include/uapi/linux/virtio_balloon.h`` and ``update_balloon_stats()`` in
``drivers/virtio/virtio_balloon.c``:
- 0-5 SWAP_IN..MEMTOT: "virtio: Add memory statistics reporting to the balloon driver"
  (Adam Litke), Linux 2.6.34.
- 6 AVAIL: "virtio_balloon: export 'available' memory to balloon statistics" (Igor
  Redko), Linux 4.6.
- 7 CACHES: "virtio_balloon: include disk/file caches memory statistics" (Tomas
  Golembiovsky, v3 posted 2017-11-12), Linux 4.16.
- 8-9 HTLB_PGALLOC, HTLB_PGFAIL: "virtio_balloon: export hugetlb page allocation counts"
  (Jonathan Helman, posted 2018-03-19), Linux 4.18; sent only with CONFIG_HUGETLB_PAGE
  (Debian's kernels have it).
- 10-15 OOM_KILL..DIRECT_RECLAIM: the series by zhenwei pi ("virtio_balloon: introduce
  oom-kill invocations", "... memory allocation stall counter", "... memory scan/reclaim
  info"), Linux 6.12.
The 4.16 and 4.18 releases follow from the posting dates and the merge windows after
them; the 6.1 test image's set (tags 0-9) was read from its own driver (issue 16).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from overcommitd.model import GuestStats

# tag -> (GuestStats field, first Linux (major, minor) that sends it)
TAGS: dict[int, tuple[str, tuple[int, int]]] = {
    0: ("swap_in_kib", (2, 6)),
    1: ("swap_out_kib", (2, 6)),
    2: ("major_faults", (2, 6)),
    3: ("minor_faults", (2, 6)),
    4: ("mem_free_kib", (2, 6)),
    5: ("mem_total_kib", (2, 6)),
    6: ("mem_available_kib", (4, 6)),
    7: ("disk_caches_kib", (4, 16)),
    8: ("hugetlb_allocs", (4, 18)),
    9: ("hugetlb_failures", (4, 18)),
    10: ("oom_kills", (6, 12)),
    11: ("alloc_stalls", (6, 12)),
    12: ("async_scan_kib", (6, 12)),
    13: ("direct_scan_kib", (6, 12)),
    14: ("async_reclaim_kib", (6, 12)),
    15: ("direct_reclaim_kib", (6, 12)),
}

DEFAULT_VERSION = "6.1"  # the test image: Debian's 6.1 cloud kernel


def parse_version(version: str) -> tuple[int, int]:
    """``"6.1"`` or ``"6.1.192"`` -> (6, 1); a clear error for anything else."""
    parts = version.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ValueError(f"kernel version {version!r} is not MAJOR.MINOR[.PATCH], e.g. '6.1'")
    return int(parts[0]), int(parts[1])


def tags_sent(version: str) -> frozenset[int]:
    """The stat tags a guest running Linux ``version`` sends."""
    v = parse_version(version)
    return frozenset(tag for tag, (_, since) in TAGS.items() if v >= since)


def unsent_fields(version: str) -> tuple[str, ...]:
    """The GuestStats fields a guest running Linux ``version`` never fills."""
    sent = tags_sent(version)
    return tuple(name for tag, (name, _) in TAGS.items() if tag not in sent)


def mask_stats(stats: GuestStats, version: str) -> GuestStats:
    """``stats`` as a guest running Linux ``version`` would send them: the tags its
    kernel does not know are None."""
    unsent: dict[str, Any] = dict.fromkeys(unsent_fields(version))
    return dataclasses.replace(stats, **unsent)
