"""overcommitd's own trace format: the columns, their units and what each one means.

One row per guest per sample, a header row first. CSV (optionally gzip-compressed,
``.csv.gz``) or Parquet; the names below are the header. Units are in the names:
``_kib`` is KiB, ``_s`` seconds, ``_kib_s`` KiB per second; a name without a unit is a
count. ``overcommitd record`` writes it (``overcommitd.record``) and the replay reads it
(``sim``); ``docs/trace-format.md`` is the page for users. Defined here, in the daemon's
package, because the daemon writes it and must not import the simulator.

Required::

    time_s           sample time, seconds (any origin; a recording uses the Unix epoch)
    guest            guest id (a name or a UUID); one guest's rows may span many files
    provisioned_kib  the guest's RAM at boot (libvirt <memory>, QEMU -m), > 0
    used_kib         memory the guest's workload holds (what it would need with no
                     balloon): not page cache, not free memory, not the balloon

Optional (a missing column is absent data, never zero)::

    cache_kib        page cache (file pages) in the guest
    disk_read_kib_s, disk_write_kib_s    file I/O rates over the sample period
    swap_in_kib_s, swap_out_kib_s        guest swap rates over the sample period
    actual_kib       the guest's memory at the sample (provisioned less the balloon)
    deflate_on_oom   1 if the balloon had VIRTIO_BALLOON_F_DEFLATE_ON_OOM, else 0
    stat_*           the raw balloon stats, named as QEMU names them (``stat-swap-in`` ->
                     ``stat_swap_in_kib``): byte-valued stats in KiB, counts as counts,
                     cumulative counters as the guest sent them

The host beside its guests (``overcommitd record`` writes it to ``host-*`` files): one
row per sample with the ``HOST_COLUMNS``.
"""

from __future__ import annotations

from typing import Final

FORMAT_VERSION: Final = 1

TIME_S: Final = "time_s"
GUEST: Final = "guest"
PROVISIONED_KIB: Final = "provisioned_kib"
USED_KIB: Final = "used_kib"
REQUIRED_COLUMNS: Final = (TIME_S, GUEST, PROVISIONED_KIB, USED_KIB)

CACHE_KIB: Final = "cache_kib"
DISK_READ_KIB_S: Final = "disk_read_kib_s"
DISK_WRITE_KIB_S: Final = "disk_write_kib_s"
SWAP_IN_KIB_S: Final = "swap_in_kib_s"
SWAP_OUT_KIB_S: Final = "swap_out_kib_s"
ACTUAL_KIB: Final = "actual_kib"
DEFLATE_ON_OOM: Final = "deflate_on_oom"

# The virtio-balloon stat tags 0-15 (virtio spec 5.5.6.3, Linux
# include/uapi/linux/virtio_balloon.h), by QEMU's QOM key ``stat-<name>``, as the
# ``GuestStats`` field each one fills. Byte-valued tags are written in KiB.
STAT_COLUMNS: Final = {
    "stat_swap_in_kib": "swap_in_kib",  # tag 0
    "stat_swap_out_kib": "swap_out_kib",  # tag 1
    "stat_major_faults": "major_faults",  # tag 2
    "stat_minor_faults": "minor_faults",  # tag 3
    "stat_free_memory_kib": "mem_free_kib",  # tag 4
    "stat_total_memory_kib": "mem_total_kib",  # tag 5
    "stat_available_memory_kib": "mem_available_kib",  # tag 6
    "stat_disk_caches_kib": "disk_caches_kib",  # tag 7
    "stat_htlb_pgalloc": "hugetlb_allocs",  # tag 8
    "stat_htlb_pgfail": "hugetlb_failures",  # tag 9
    "stat_oom_kills": "oom_kills",  # tag 10 (Linux >= 6.12)
    "stat_alloc_stalls": "alloc_stalls",  # tag 11
    "stat_async_scans_kib": "async_scan_kib",  # tag 12
    "stat_direct_scans_kib": "direct_scan_kib",  # tag 13
    "stat_async_reclaims_kib": "async_reclaim_kib",  # tag 14
    "stat_direct_reclaims_kib": "direct_reclaim_kib",  # tag 15
}

OPTIONAL_COLUMNS: Final = (
    CACHE_KIB,
    DISK_READ_KIB_S,
    DISK_WRITE_KIB_S,
    SWAP_IN_KIB_S,
    SWAP_OUT_KIB_S,
    ACTUAL_KIB,
    DEFLATE_ON_OOM,
    *STAT_COLUMNS,
)
GUEST_COLUMNS: Final = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

HOST_COLUMNS: Final = (
    TIME_S,
    "mem_total_kib",
    "mem_available_kib",
    "swap_total_kib",
    "swap_free_kib",
    "psi_some_total_us",
    "psi_full_total_us",
    "ksm_sharing_kib",
    "arc_reclaimable_kib",  # ZFS ARC above c_min (HostSnapshot.arc_reclaimable_kib); 0 without ZFS
)
