"""The virtio-balloon device's numbers and byte layouts, under the spec's names.

Sources: virtio spec 1.x device-types/balloon (§5.5), Linux
include/uapi/linux/virtio_balloon.h and drivers/virtio/virtio_balloon.c, QEMU
hw/virtio/virtio-balloon.c and include/hw/virtio/virtio-balloon.h. Balloon pages are
4 KiB whatever the guest or host page size (``VIRTIO_BALLOON_PFN_SHIFT``); that unit
never leaves ``sim/``.
"""

from __future__ import annotations

import functools
import struct

VIRTIO_ID_BALLOON = 5

# Feature bits (uapi virtio_balloon.h; spec §5.5.3).
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_PAGE_POISON = 4
VIRTIO_BALLOON_F_REPORTING = 5
# Transport bits (spec §6, "Reserved Feature Bits").
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33

# Device status bits (spec §2.1).
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 64
VIRTIO_CONFIG_S_FAILED = 128

# struct virtio_balloon_config: four le32 at offsets 0, 4, 8, 12 (spec §5.5.4).
CONFIG = struct.Struct("<IIII")
CONFIG_NUM_PAGES = 0
CONFIG_ACTUAL = 4
CONFIG_FREE_PAGE_HINT_CMD_ID = 8
CONFIG_POISON_VAL = 12

# struct virtio_balloon_stat { le16 tag; le64 val; } __packed - 10 bytes (the spec's
# "multiple of 6 bytes" is an erratum; Linux and QEMU use 10).
STAT = struct.Struct("<HQ")


@functools.lru_cache(maxsize=64)
def stats_array(n: int) -> struct.Struct:
    """``n`` packed ``virtio_balloon_stat`` entries back to back: one buffer in one
    call (``STAT`` ``n`` times, no padding between entries). The cache is bounded: ``n``
    comes from the guest's buffer length, and a guest that varied it must not grow it."""
    return struct.Struct("<" + "HQ" * n)


VIRTIO_BALLOON_S_SWAP_IN = 0
VIRTIO_BALLOON_S_SWAP_OUT = 1
VIRTIO_BALLOON_S_MAJFLT = 2
VIRTIO_BALLOON_S_MINFLT = 3
VIRTIO_BALLOON_S_MEMFREE = 4
VIRTIO_BALLOON_S_MEMTOT = 5
VIRTIO_BALLOON_S_AVAIL = 6
VIRTIO_BALLOON_S_CACHES = 7
VIRTIO_BALLOON_S_HTLB_PGALLOC = 8
VIRTIO_BALLOON_S_HTLB_PGFAIL = 9
VIRTIO_BALLOON_S_OOM_KILL = 10
VIRTIO_BALLOON_S_ALLOC_STALL = 11
VIRTIO_BALLOON_S_ASYNC_SCAN = 12
VIRTIO_BALLOON_S_DIRECT_SCAN = 13
VIRTIO_BALLOON_S_ASYNC_RECLAIM = 14
VIRTIO_BALLOON_S_DIRECT_RECLAIM = 15
VIRTIO_BALLOON_S_NR = 16
STAT_NOT_SUPPLIED = 2**64 - 1  # QEMU resets every stat to "-1" before each buffer

# Linux driver constants (drivers/virtio/virtio_balloon.c).
VIRTIO_BALLOON_PFN_SHIFT = 12
BALLOON_PAGE_BYTES = 1 << VIRTIO_BALLOON_PFN_SHIFT
BALLOON_PAGE_KIB = BALLOON_PAGE_BYTES // 1024
VIRTIO_BALLOON_ARRAY_PFNS_MAX = 256
VIRTIO_BALLOON_OOM_NR_PAGES = 256
OUT_OF_PUFF_SLEEP_S = 0.2  # msleep(200) after "Out of puff!"
VIRTIO_BALLOON_HINT_BLOCK_ORDER = 10  # MAX_PAGE_ORDER on x86-64: 4 MiB hint blocks
PAGE_POISON = 0xAA  # include/linux/poison.h

# Free page hinting command ids (uapi; QEMU virtio-balloon.h).
VIRTIO_BALLOON_CMD_ID_STOP = 0
VIRTIO_BALLOON_CMD_ID_DONE = 1
VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN = 0x80000000

# Free page reporting (Linux mm/page_reporting.{c,h}).
PAGE_REPORTING_CAPACITY = 32  # scatter-gather entries per report() call
PAGE_REPORTING_DELAY_S = 2.0  # 2 * HZ between a trigger and a pass
PAGEBLOCK_ORDER = 9  # x86-64: reported blocks are 2 MiB

# Queue sizes QEMU creates (virtio-balloon.c realize).
QUEUE_SIZES = {"inflateq": 128, "deflateq": 128, "statsq": 128, "free_page_vq": 1024, "reporting_vq": 32}


def queue_names(features: int) -> list[str]:
    """The queues that exist for a negotiated feature word, in transport-index order.

    Linux leaves a NULL name in the slot of a queue whose feature is absent and the PCI
    transport skips NULL slots without using an index, so indices are positions among
    the present queues: STATS_VQ + REPORTING without FREE_PAGE_HINT puts reporting_vq at
    index 3, not 4 (virtio-balloon.md §1.3)."""
    names = ["inflateq", "deflateq"]
    if features >> VIRTIO_BALLOON_F_STATS_VQ & 1:
        names.append("statsq")
    if features >> VIRTIO_BALLOON_F_FREE_PAGE_HINT & 1:
        names.append("free_page_vq")
    if features >> VIRTIO_BALLOON_F_REPORTING & 1:
        names.append("reporting_vq")
    return names


def has(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)
