"""The vocabulary every part of overcommitd shares: what a host and a guest look like at
one instant, and what the control step decided for a guest.

Memory is an ``int`` in KiB everywhere (libvirt's unit) and every such name ends in
``_kib``. The virtio spec counts the balloon in 4 KiB pages and reports stats in bytes;
libvirt reports KiB under misleading names (``available`` is MemTotal, ``usable`` is
MemAvailable, ``unused`` is MemFree). Those units and names are translated once, at the
edge that reads them (``overcommitd.hypervisor.libvirt_stats`` for libvirt, ``sim`` for
the simulator); nothing past the edge sees them. Where a person writes a size (the
config, a policy's parameters, an MQTT command), ``Kib`` also takes ``"512MiB"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from fractions import Fraction
from typing import Annotated

from pydantic import BeforeValidator, Field

_UNITS_KIB = {"kib": 1, "k": 1, "mib": 1024, "m": 1024, "gib": 1024**2, "g": 1024**2, "tib": 1024**3, "t": 1024**3}
_SIZE = re.compile(r"^\s*(\d{1,20}(?:\.\d{1,20})?)\s*([a-zA-Z]{0,3})\s*$")

# The largest size anything in overcommitd takes: 1 PiB in KiB. No host or guest comes
# near it (libvirt's own limit is VIR_DOMAIN_MEMORY_PARAM_UNLIMITED, 2^53 - 1 KiB); it
# keeps a typo or a hostile command from becoming a floor no guest can ever meet.
MAX_KIB = 1024**4
_SIZE_TEXT_MAX = 64  # characters: "1.5 GiB" needs 7; longer is not a size


def parse_kib(value: object) -> object:
    """``"4GiB"`` -> 4194304; ints pass through (KiB); anything else is left to pydantic.

    Exact arithmetic (``Fraction``), no float: a 400-digit string is refused as too long,
    never turned into ``inf`` (whose ``int()`` raised ``OverflowError``, which pydantic
    does not turn into a validation error). Range checks belong to ``Kib``."""
    if isinstance(value, str):
        m = _SIZE.match(value) if len(value) <= _SIZE_TEXT_MAX else None
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS_KIB and unit != "":
            shown = value if len(value) <= _SIZE_TEXT_MAX else f"{value[:20]}... ({len(value)} characters)"
            raise ValueError(
                f"{shown!r} is not a size; use KiB as an integer or a string like '512MiB' or '4GiB'"
                f" (at most 20 digits)"
            )
        return int(Fraction(m.group(1)) * _UNITS_KIB.get(unit, 1))
    return value


Kib = Annotated[int, BeforeValidator(parse_kib), Field(ge=0, le=MAX_KIB)]


class OvercommitdError(Exception):
    """Base of every error a user can act on; the message says what was wrong, where,
    and what to do. Only ``overcommitd.cli`` turns one into an exit code."""


class Feature(IntEnum):
    """VIRTIO_BALLOON_F_* feature bit numbers (include/uapi/linux/virtio_balloon.h)."""

    MUST_TELL_HOST = 0
    STATS_VQ = 1
    DEFLATE_ON_OOM = 2
    FREE_PAGE_HINT = 3
    PAGE_POISON = 4
    REPORTING = 5


@dataclass(frozen=True, slots=True)
class BalloonFeatures:
    """The balloon features the guest driver negotiated, by meaning.

    ``deflate_on_oom`` changes how the guest behaves under pressure (it takes pages back
    from the balloon instead of OOM-killing, and its MemTotal does not shrink while
    inflated); ``reporting`` means free memory is already returned to the host.
    """

    must_tell_host: bool = False
    stats_vq: bool = True
    deflate_on_oom: bool = False
    free_page_hint: bool = False
    page_poison: bool = False
    reporting: bool = False

    @classmethod
    def from_bits(cls, bits: int) -> BalloonFeatures:
        """Decode a negotiated feature word (bit n = ``Feature(n)``); other bits are ignored."""
        if bits < 0:
            raise ValueError(f"feature bits(={bits}) must be >= 0")
        return cls(**{f.name.lower(): bool(bits >> f.value & 1) for f in Feature})

    def to_bits(self) -> int:
        return sum(1 << f.value for f in Feature if getattr(self, f.name.lower()))


@dataclass(frozen=True, slots=True)
class PsiMemory:
    """Host memory pressure from /proc/pressure/memory (Linux >= 4.20).

    ``avg*`` are percentages of wall time in which some (or all) non-idle tasks stalled on
    memory; ``*_total_us`` are cumulative stall microseconds, from which a policy takes
    deltas itself (a late tick then loses nothing).
    """

    some_avg10: float = 0.0
    some_avg60: float = 0.0
    some_avg300: float = 0.0
    some_total_us: int = 0
    full_avg10: float = 0.0
    full_avg60: float = 0.0
    full_avg300: float = 0.0
    full_total_us: int = 0


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    """The hypervisor host's memory at one instant (``/proc/meminfo``, PSI, KSM, ZFS ARC).

    ``arc_reclaimable_kib`` is kept apart from MemAvailable on purpose: the kernel counts
    ZFS's ARC as used (it is not page cache), yet the ARC shrinks to ``c_min`` when the
    host needs the memory. A policy that wants host headroom as the host could make it
    reads ``available_with_arc_kib``; a baseline that reproduces a tool which does not
    know the ARC keeps reading ``mem_available_kib``.
    """

    taken_at_s: float
    mem_total_kib: int
    mem_available_kib: int
    swap_total_kib: int = 0
    swap_free_kib: int = 0
    psi: PsiMemory | None = None  # None: the kernel has no PSI (older than 4.20 or CONFIG_PSI=n)
    ksm_sharing_kib: int = 0  # memory KSM saves: pages_sharing x page size
    arc_reclaimable_kib: int = 0  # ZFS ARC above its minimum (size - c_min); 0 without ZFS

    def __post_init__(self) -> None:
        if self.arc_reclaimable_kib < 0:
            raise ValueError(f"arc_reclaimable_kib(={self.arc_reclaimable_kib}) must be >= 0")
        if self.mem_total_kib <= 0:
            raise ValueError(f"mem_total_kib(={self.mem_total_kib}) must be > 0")
        if not 0 <= self.mem_available_kib <= self.mem_total_kib:
            raise ValueError(
                f"mem_available_kib(={self.mem_available_kib}) must be within 0..mem_total_kib(={self.mem_total_kib})"
            )

    @property
    def used_kib(self) -> int:
        return self.mem_total_kib - self.mem_available_kib

    @property
    def available_with_arc_kib(self) -> int:
        """MemAvailable plus the ARC the host could drop, at most MemTotal."""
        return min(self.mem_available_kib + self.arc_reclaimable_kib, self.mem_total_kib)

    def available_kib(self, *, count_arc: bool) -> int:
        """MemAvailable, with or without the reclaimable ARC: the one switch policies use."""
        return self.available_with_arc_kib if count_arc else self.mem_available_kib

    def used_kib_counting_arc(self, count_arc: bool) -> int:
        """MemTotal minus ``available_kib(count_arc=...)``."""
        return self.mem_total_kib - self.available_kib(count_arc=count_arc)


@dataclass(frozen=True, slots=True)
class GuestStats:
    """The guest's own memory statistics (virtio-balloon stats queue), by meaning.

    Each field is ``None`` when the guest did not supply it (QEMU reports those as
    u64 max; older kernels send fewer tags, and libvirt drops tags 10-15). Counters
    (``*_total``, ``swap_*``, faults) are cumulative since guest boot.
    ``last_update_s`` is when the host received this sample, on the same clock as
    ``HostSnapshot.taken_at_s``.
    """

    last_update_s: float
    swap_in_kib: int | None = None  # VIRTIO_BALLOON_S_SWAP_IN (tag 0), cumulative
    swap_out_kib: int | None = None  # tag 1, cumulative
    major_faults: int | None = None  # tag 2, cumulative count
    minor_faults: int | None = None  # tag 3, cumulative count (all faults)
    mem_free_kib: int | None = None  # tag 4, MemFree
    mem_total_kib: int | None = None  # tag 5, MemTotal (shrinks with the balloon unless DEFLATE_ON_OOM)
    mem_available_kib: int | None = None  # tag 6, MemAvailable
    disk_caches_kib: int | None = None  # tag 7, file pages (Buffers + Cached + SwapCached)
    hugetlb_allocs: int | None = None  # tag 8
    hugetlb_failures: int | None = None  # tag 9
    oom_kills: int | None = None  # tag 10 (Linux >= 6.12)
    alloc_stalls: int | None = None  # tag 11
    async_scan_kib: int | None = None  # tag 12, kswapd pages scanned
    direct_scan_kib: int | None = None  # tag 13
    async_reclaim_kib: int | None = None  # tag 14, kswapd pages reclaimed
    direct_reclaim_kib: int | None = None  # tag 15

    def available_kib(self) -> int | None:
        """What the guest could give up without swapping: MemAvailable, or, from guests
        too old to report it, MemFree plus disk caches (cache is reclaimable; MemFree
        alone over-counts use, which is MOM's and CloudVAMP's mistake)."""
        if self.mem_available_kib is not None:
            return self.mem_available_kib
        if self.mem_free_kib is not None:
            return self.mem_free_kib + (self.disk_caches_kib or 0)
        return None


class RunState(Enum):
    """What the hypervisor says the guest is doing; only RUNNING guests are ballooned."""

    RUNNING = "running"
    PAUSED = "paused"
    MIGRATING = "migrating"
    SHUTTING_DOWN = "shutting-down"
    UNRESPONSIVE = "unresponsive"  # the hypervisor cannot reach it now (a QMP socket that stopped answering)


@dataclass(frozen=True, slots=True)
class GuestSnapshot:
    """One guest at one instant, as the hypervisor and the guest's balloon driver see it.

    ``max_kib`` is the boot size (libvirt ``<memory>``); the balloon can only take memory
    away from it. ``actual_kib`` is the guest's memory now, ``max_kib`` minus the balloon,
    from the balloon's ``actual`` (what the driver achieved). ``current_kib`` is the
    hypervisor's idea of current memory (libvirt's live ``<currentMemory>``), which lags
    ``actual_kib`` until a BALLOON_CHANGE event. ``last_target_kib`` is the target this
    daemon last set (None if never): libvirt does not report it. ``last_target_age_s`` is
    how long ago it was set (None if unknown): a balloon still moving toward a fresh
    target has not stopped short of it. ``migration_pending`` says an operator announced a
    live migration of this guest (the daemon's ``prepare-migration`` command): a policy may
    get it ready; once libvirt reports it migrating, the guard holds it.
    """

    uuid: str
    name: str
    max_kib: int
    actual_kib: int
    current_kib: int
    last_target_kib: int | None = None
    last_target_age_s: float | None = None
    features: BalloonFeatures = field(default_factory=BalloonFeatures)
    stats: GuestStats | None = None
    stats_period_s: float = 0.0  # guest stats polling interval; 0 = polling is off
    floor_kib: int = 0  # SLA floor from the domain's metadata; config may raise it
    weight: float = 1.0  # share of memory relative to other guests
    run_state: RunState = RunState.RUNNING
    migration_pending: bool = False

    def __post_init__(self) -> None:
        if self.max_kib <= 0:
            raise ValueError(f"guest {self.name}: max_kib(={self.max_kib}) must be > 0")
        if not 0 <= self.actual_kib <= self.max_kib:
            raise ValueError(
                f"guest {self.name}: actual_kib(={self.actual_kib}) must be within 0..max_kib(={self.max_kib})"
            )

    @property
    def balloon_kib(self) -> int:
        """Memory held by the balloon now."""
        return self.max_kib - self.actual_kib


class ClampReason(Enum):
    """Why the guard changed or withheld a policy's wish."""

    NOT_RUNNING = "not-running"  # paused, migrating or shutting down: left alone
    EXCLUDED = "excluded"  # config excludes the guest from ballooning
    POLICY_ERROR = "policy-error"  # the policy raised for this guest: hold
    NO_WISH = "no-wish"  # the policy said nothing about this guest: hold
    FLOOR = "floor"  # raised to the SLA floor
    MAXIMUM = "maximum"  # lowered to the guest's maximum
    STALE_STATS = "stale-stats"  # no inflation: stats older than the staleness limit
    MISSING_STATS = "missing-stats"  # no inflation: the guest never sent stats
    IMPLAUSIBLE_STATS = "implausible-stats"  # no inflation: the stats contradict each other or the host
    AUTO_DEFLATE = "auto-deflate"  # DEFLATE_ON_OOM guest deflated itself: back off
    NO_PROGRESS = "no-progress"  # balloon stopped short of its target: the guest has nothing to give
    IN_FLIGHT = "in-flight"  # no further inflation while the balloon still moves to its last target
    INFLATE_STEP = "inflate-step"  # inflation bounded per tick
    DEFLATE_STEP = "deflate-step"  # deflation bounded per tick
    DEAD_BAND = "dead-band"  # change too small to be worth a balloon operation


@dataclass(frozen=True, slots=True)
class Clamp:
    """One rule the guard applied: the target before and after it, and why."""

    reason: ClampReason
    before_kib: int | None
    after_kib: int | None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """What the control step decided for one guest this tick.

    ``target_kib`` is the balloon target to set now, or None to leave the guest alone
    (hold). ``wish_kib`` is what the policy asked for before the guard, None when it
    asked nothing or raised. ``clamps`` lists every guard rule that fired, in order.
    ``policy_reason`` is the policy's own word on why it wished what it did (optional:
    see ``policies.api.PolicyResult.reasons``).
    """

    uuid: str
    name: str
    target_kib: int | None
    wish_kib: int | None
    clamps: tuple[Clamp, ...] = ()
    policy_reason: str | None = None

    @property
    def held(self) -> bool:
        return self.target_kib is None

    def clamped_by(self, reason: ClampReason) -> bool:
        return any(c.reason is reason for c in self.clamps)
