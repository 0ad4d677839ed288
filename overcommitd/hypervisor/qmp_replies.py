"""QEMU's QMP replies about a balloon, translated once into our vocabulary.

QMP speaks bytes where we speak KiB: ``query-balloon``'s ``actual``,
``query-memory-size-summary``'s ``base-memory``, the ``balloon`` command's ``value`` and
every memory figure in the balloon device's ``guest-stats`` property (virtio-balloon.md
§2.2: MEMFREE, MEMTOT, AVAIL, CACHES, SWAP_IN/OUT and the scan/reclaim tags are bytes;
faults, hugetlb and OOM/stall tags are counts). :func:`bytes_to_kib` and
:func:`kib_to_bytes` are the only crossings. This module is pure: a reply (whatever a
guest or a broken QEMU put in it) in, typed values or None out; it never raises on a
value, only on a reply whose shape says it is not the answer to our question.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from overcommitd.model import GuestStats, RunState

KIB = 1024
# QEMU's guest-stats reports a stat the guest did not send as -1 cast to u64
# (hw/virtio/virtio-balloon.c, balloon_stats_get_all: "stats[i] = -1" then visit_type_uint64).
_U64_MAX = 2**64 - 1
# Nothing real exceeds this: 2**53 bytes is 8 PiB, 2**53 faults is ~3000 years at 100k/s.
# Larger values (u64 max, a lying guest) are read as "not supplied", and floats lose
# precision above it anyway.
_PLAUSIBLE_MAX = 2**53


class QmpReplyError(ValueError):
    """A QMP reply lacks what the command always returns (not a guest's bad value)."""


def bytes_to_kib(n_bytes: int) -> int:
    """Bytes from QMP to our KiB (rounded down: never report memory a guest lacks)."""
    return n_bytes // KIB


def kib_to_bytes(kib: int) -> int:
    """Our KiB to the bytes QMP's ``balloon`` command takes."""
    return kib * KIB


def _uint(value: object) -> int | None:
    """A plausible non-negative int, or None for absent, unsupplied or nonsense values."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _PLAUSIBLE_MAX:
        return None
    return value


def _kib(value: object) -> int | None:
    n = _uint(value)
    return None if n is None else bytes_to_kib(n)


# GuestStats field <- (QOM key, True when the value is bytes). virtio-balloon.md §2.2.
_STAT_KEYS: dict[str, tuple[str, bool]] = {
    "swap_in_kib": ("stat-swap-in", True),
    "swap_out_kib": ("stat-swap-out", True),
    "major_faults": ("stat-major-faults", False),
    "minor_faults": ("stat-minor-faults", False),
    "mem_free_kib": ("stat-free-memory", True),
    "mem_total_kib": ("stat-total-memory", True),
    "mem_available_kib": ("stat-available-memory", True),
    "disk_caches_kib": ("stat-disk-caches", True),
    "hugetlb_allocs": ("stat-htlb-pgalloc", False),
    "hugetlb_failures": ("stat-htlb-pgfail", False),
    "oom_kills": ("stat-oom-kills", False),
    "alloc_stalls": ("stat-alloc-stalls", False),
    "async_scan_kib": ("stat-async-scans", True),
    "direct_scan_kib": ("stat-direct-scans", True),
    "async_reclaim_kib": ("stat-async-reclaims", True),
    "direct_reclaim_kib": ("stat-direct-reclaims", True),
}


def guest_stats(reply: object) -> GuestStats | None:
    """From ``qom-get <balloon> guest-stats``: ``{"stats": {...}, "last-update": epoch_s}``.

    None when the guest never sent a sample (``last-update`` 0) or sent nothing usable;
    each value that is missing, negative, not an int or implausibly large is None, so the
    guard sees a stat it cannot use rather than a number it must not trust.
    """
    if not isinstance(reply, Mapping):
        return None
    stats = reply.get("stats")
    if not isinstance(stats, Mapping):
        return None
    last_update_s = _uint(reply.get("last-update"))
    fields = {ours: (_kib if is_bytes else _uint)(stats.get(key)) for ours, (key, is_bytes) in _STAT_KEYS.items()}
    if not last_update_s or all(v is None for v in fields.values()):
        return None
    return GuestStats(last_update_s=float(last_update_s), **fields)


def _field(reply: object, key: str, command: str) -> object:
    if not isinstance(reply, Mapping) or key not in reply:
        raise QmpReplyError(f"{command}: reply has no {key!r}: {str(reply)[:200]}")
    return reply[key]


def memory_size_kib(reply: object) -> int:
    """The guest's memory with an empty balloon, the balloon's maximum, from
    ``query-memory-size-summary``: base memory plus hotplugged DIMMs. QEMU's balloon
    measures ``actual`` and a target against that sum (``get_current_ram_size()`` in
    hw/virtio/virtio-balloon.c); Proxmox boots hotplug guests with a small base."""
    kib = _kib(_field(reply, "base-memory", "query-memory-size-summary"))
    if not kib:
        raise QmpReplyError(f"query-memory-size-summary: no positive base-memory in {str(reply)[:200]}")
    plugged = reply.get("plugged-memory", 0) if isinstance(reply, Mapping) else 0
    plugged_kib = _kib(plugged)
    if plugged_kib is None:
        raise QmpReplyError(f"query-memory-size-summary: plugged-memory is not a byte count: {str(reply)[:200]}")
    return kib + plugged_kib


def actual_kib(reply: object, max_kib: int) -> int:
    """The guest's memory now (``query-balloon``'s ``actual``). Above ``max_kib`` the size
    we know is stale (memory was hotplugged since the probe): an error, so the guest is
    held and probed again, never ballooned against the old size."""
    kib = _kib(_field(reply, "actual", "query-balloon"))
    if kib is None:
        raise QmpReplyError(f"query-balloon: actual is not a byte count: {str(reply)[:200]}")
    if kib > max_kib:
        raise QmpReplyError(f"query-balloon: actual {kib} KiB is above the size probed, {max_kib} KiB: probing again")
    return kib


def guest_name(reply: object) -> str | None:
    """``query-name``'s ``name``; None when QEMU was started without ``-name``."""
    name = reply.get("name") if isinstance(reply, Mapping) else None
    return name if isinstance(name, str) and name else None


_NIL_UUID = "00000000-0000-0000-0000-000000000000"


def guest_uuid(reply: object) -> str | None:
    """``query-uuid``'s ``UUID``; None for QEMU's all-zero default (no ``-uuid``)."""
    uuid = reply.get("UUID") if isinstance(reply, Mapping) else None
    return uuid.lower() if isinstance(uuid, str) and uuid and uuid != _NIL_UUID else None


# QEMU's RunState (qapi/run-state.json) -> ours; None: not running at all.
_RUN_STATES: dict[str, RunState | None] = {
    "running": RunState.RUNNING,
    "inmigrate": RunState.MIGRATING,
    "postmigrate": RunState.MIGRATING,
    "finish-migrate": RunState.MIGRATING,
    "colo": RunState.MIGRATING,
    "shutdown": RunState.SHUTTING_DOWN,
    "guest-panicked": None,
    "internal-error": None,
}


def run_state(reply: object) -> RunState | None:
    """Our RunState from ``query-status``; every other QEMU state (paused, prelaunch,
    suspended, io-error, watchdog, debug, save-vm, restore-vm) is PAUSED: left alone."""
    status = _field(reply, "status", "query-status")
    if not isinstance(status, str):
        raise QmpReplyError(f"query-status: status is not a string: {status!r}")
    return _RUN_STATES.get(status, RunState.PAUSED)


@dataclass(frozen=True, slots=True)
class BalloonDevice:
    """Where the balloon is in QEMU's object tree and what it was configured with."""

    qom_path: str
    deflate_on_oom: bool = False
    free_page_reporting: bool = False
    free_page_hint: bool = False


# QOM types of a virtio-balloon frontend (hw/virtio/virtio-balloon-pci.c, hw/s390x/virtio-ccw-balloon.c).
BALLOON_TYPES = (
    "virtio-balloon-pci",
    "virtio-balloon-pci-transitional",
    "virtio-balloon-pci-non-transitional",
    "virtio-balloon-ccw",
    "virtio-balloon-device",
)


def balloon_children(reply: object, parent: str) -> list[str]:
    """QOM paths of balloon devices among ``qom-list``'s children of ``parent``."""
    if not isinstance(reply, list):
        return []
    out = []
    for prop in reply:
        if not isinstance(prop, Mapping):
            continue
        name, typ = prop.get("name"), prop.get("type")
        if isinstance(name, str) and isinstance(typ, str) and typ.removeprefix("child<").rstrip(">") in BALLOON_TYPES:
            out.append(f"{parent}/{name}")
    return out
