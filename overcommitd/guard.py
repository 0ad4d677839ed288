"""Safety rules applied to every policy's output; no policy, built-in or plugin, can
bypass them. When in doubt the guard holds: a guest is never harmed by a balloon that
stays where it is.

For each guest, in this order:

1. a guest that is not RUNNING (paused, migrating, shutting down) or that the config
   excludes is left alone; so is a guest whose policy raised, or about which the policy
   said nothing - except that a guest found below its SLA floor is raised to it;
2. the wish is clamped to ``[floor, maximum]``: the floor is the larger of the guest's
   SLA floor and ``min_guest_kib``;
3. inflation (a target below ``actual``) is refused when the guest's stats are missing,
   stale or impossible (a guest may lie), and during a cool-down after the balloon stopped short of its last target
   (a DEFLATE_ON_OOM guest that deflated itself is under pressure: meet it, never fight
   it; any other guest that cannot reach its target has no free memory to give - the
   "Out of puff" storm of arcbox#390). Outside a back-off, a balloon short of a target
   set less than ``settle_s`` ago has not stopped but is still moving: no back-off, and
   no deeper target until it arrives - unless it is a DEFLATE_ON_OOM balloon whose
   ``actual`` rose since the guard's last step (remembered per guest): a balloon moving to
   a lower target only falls, so that one is the guest deflating itself, however recent
   its target;
4. each step is bounded from what the guest has (``actual``), not from what was last
   asked: inflation by ``max_inflate_step_kib``, deflation by the larger
   ``max_deflate_step_kib`` (reclaim slowly, give back fast); the floor beats the
   deflate bound, since raising a guest to its floor is the safe direction;
5. a change smaller than ``dead_band_kib`` from the last target is not made.

Every rule that changes or withholds the wish is recorded in the Decision as a Clamp.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np

from overcommitd.config import GuardConfig
from overcommitd.guard_kernels import NUMPY, GuardKernels, floor_rule
from overcommitd.model import Clamp, ClampReason, Decision, GuestSnapshot
from overcommitd.table import BoolArray, FloatArray, GuestTable, IntArray

# The guard runs once over every guest's columns (``guard_table``); the per-guest
# ``guard`` is that same code on a one-row table, and the Decisions with their Clamps are
# read back from what each rule recorded (``GuardOutcome``). One implementation of each
# rule: the two speeds cannot drift.

# Rule codes, 0 = the rule did not fire; the index into each tuple is the code.
HOLDS = (None, ClampReason.NOT_RUNNING, ClampReason.EXCLUDED, ClampReason.POLICY_ERROR, ClampReason.NO_WISH)
INFLATE_BLOCKS = (
    None,
    ClampReason.MISSING_STATS,
    ClampReason.STALE_STATS,
    ClampReason.IMPLAUSIBLE_STATS,
    ClampReason.AUTO_DEFLATE,
    ClampReason.NO_PROGRESS,
    ClampReason.IN_FLIGHT,
    ClampReason.INFLATE_STEP,
)
# The stats checked against MemTotal, in the order of ``GuardKernels.implausible``'s
# arguments: codes 2.. (1: MemTotal itself).
_IMPLAUSIBLE_FIELDS = ("mem_available_kib", "mem_free_kib", "disk_caches_kib")
_implausible_stats = itemgetter(*_IMPLAUSIBLE_FIELDS)


@dataclass(frozen=True, slots=True)
class GuardMemory:
    """What the guard remembers of one guest between steps."""

    backoff_until_s: float = float("-inf")  # no inflation before this time
    actual_kib: int | None = None  # the balloon's ``actual`` at the last step (None: not seen)


FRESH = GuardMemory()


@dataclass(frozen=True, slots=True, eq=False)
class GuardMemories:
    """``GuardMemory`` of every guest, by column: the back-off ends and the ``actual``
    seen, row for row with ``uuids`` (the table they were decided for)."""

    uuids: tuple[str, ...] = ()
    backoff_until_s: FloatArray = field(default_factory=lambda: np.empty(0))
    actual_kib: FloatArray = field(default_factory=lambda: np.empty(0))

    def aligned(self, uuids: tuple[str, ...]) -> FloatArray:
        """The back-off ends for these guests, in this order (-inf for a guest not seen)."""
        return self._aligned(self.backoff_until_s, uuids, -np.inf)

    def aligned_actual(self, uuids: tuple[str, ...]) -> FloatArray:
        """The ``actual`` each of these guests had at the last step (NaN: not seen)."""
        return self._aligned(self.actual_kib, uuids, np.nan)

    def _aligned(self, column: FloatArray, uuids: tuple[str, ...], missing: float) -> FloatArray:
        if uuids == self.uuids:
            return column
        index = {u: i for i, u in enumerate(self.uuids)}
        values = column.tolist()
        return np.array([values[index[u]] if u in index else missing for u in uuids], dtype=np.float64)

    def get(self, uuid: str) -> GuardMemory:
        try:
            i = self.uuids.index(uuid)
        except ValueError:
            return FRESH
        actual = float(self.actual_kib[i])
        return GuardMemory(float(self.backoff_until_s[i]), None if np.isnan(actual) else int(actual))


def floors_kib(table: GuestTable, rules: GuardConfig) -> IntArray:
    """The lowest target each guest may get: its SLA floor or the global minimum, never
    above its maximum."""
    return np.asarray(floor_rule(table.floor_kib, table.max_kib, rules.min_guest_kib), dtype=np.int64)


def floor_kib(guest: GuestSnapshot, rules: GuardConfig) -> int:
    """``floors_kib`` of one guest (the same rule on scalars: status and metrics call it
    per guest, where a one-row table would cost more than the rule)."""
    return int(floor_rule(np.int64(guest.floor_kib), np.int64(guest.max_kib), rules.min_guest_kib))


def implausible_codes(table: GuestTable, kernels: GuardKernels = NUMPY) -> IntArray:
    """What is impossible about each guest's stats: 0 nothing, 1 MemTotal above the
    maximum, 2.. a value outside 0..MemTotal (``_IMPLAUSIBLE_FIELDS``). Stats come from
    an untrusted guest (Firecracker's ballooning docs say as much): a buggy or hostile
    driver must not talk the host into taking memory the guest needs. Unsent stats
    (NaN) compare false, so they are never implausible."""
    return kernels.implausible(*_implausible_columns(table))


def _implausible_columns(table: GuestTable) -> tuple[IntArray, FloatArray, FloatArray, FloatArray, FloatArray]:
    """``GuardKernels.implausible``'s arguments: the maximum, MemTotal, then ``_IMPLAUSIBLE_FIELDS``."""
    s = table.stats.columns
    return (table.max_kib, s["mem_total_kib"], *_implausible_stats(s))


def stats_problem_codes(now_s: float, table: GuestTable, rules: GuardConfig, kernels: GuardKernels = NUMPY) -> IntArray:
    """Why each guest's stats cannot justify inflation: an ``INFLATE_BLOCKS`` code
    (missing, stale, implausible: ``implausible_codes``, in the same kernel call) or 0
    if they can."""
    return kernels.problem(
        now_s,
        table.stats.last_update_s,
        table.stats_period_s,
        float(rules.stale_after_periods),
        float(rules.stale_after_min_s),
        *_implausible_columns(table),
    )


def implausible_detail(code: int, guest: GuestSnapshot) -> str | None:
    """The message for an ``implausible_codes`` code, with the guest's own values."""
    s = guest.stats
    if code == 0 or s is None:
        return None
    if code == 1:
        return f"MemTotal {s.mem_total_kib} KiB exceeds the guest's maximum {guest.max_kib} KiB"
    name = _IMPLAUSIBLE_FIELDS[code - 2]
    return f"{name} {getattr(s, name)} KiB is outside 0..MemTotal ({s.mem_total_kib} KiB)"


def implausible(guest: GuestSnapshot) -> str | None:
    """What is impossible about one guest's stats, or None (``implausible_codes``)."""
    assert guest.stats is not None
    return implausible_detail(int(implausible_codes(GuestTable.of([guest]))[0]), guest)


def _stats_detail(code: int, now_s: float, guest: GuestSnapshot, rules: GuardConfig) -> str:
    if code == 1:
        return "the guest has sent no stats"
    if code == 2:
        assert guest.stats is not None
        limit_s = max(rules.stale_after_periods * guest.stats_period_s, rules.stale_after_min_s)
        return f"stats are {now_s - guest.stats.last_update_s:.0f} s old, limit {limit_s:.0f} s"
    return implausible(guest) or ""


def stats_problem(now_s: float, guest: GuestSnapshot, rules: GuardConfig) -> Clamp | None:
    """Why one guest's stats cannot justify inflation, or None if they can."""
    code = int(stats_problem_codes(now_s, GuestTable.of([guest]), rules)[0])
    if code == 0:
        return None
    return Clamp(INFLATE_BLOCKS[code], None, None, _stats_detail(code, now_s, guest, rules))  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class GuardOutcome:
    """The guard's verdict on every row of a table, with what each rule did, so that
    each guest's Decision (``decision``) can be read back without deciding again."""

    now_s: float
    rules: GuardConfig
    actual_kib: FloatArray  # the ``actual`` each guest had at this step, as float (NaN: none)
    stats_problem: IntArray  # ``stats_problem_codes`` at ``now_s`` (the shortfall estimate reads them too)
    target_kib: IntArray  # the target to set, valid where has_target
    has_target: BoolArray
    backoff_until_s: FloatArray  # what to remember for the next step, with ``actual_kib``
    wish_kib: IntArray  # valid where has_wish
    has_wish: BoolArray
    floor_kib: IntArray
    hold: IntArray  # HOLDS code
    restored: BoolArray  # held, but raised to the floor (target_kib)
    maxed: BoolArray  # wish above the maximum
    floored: BoolArray  # ... then below the floor
    ranged_kib: IntArray  # the wish within [floor, maximum]
    inflate_block: IntArray  # INFLATE_BLOCKS code
    deflate_stepped: BoolArray
    stepped_kib: IntArray  # after the inflate/deflate rules
    dead_band: BoolArray
    reference_kib: IntArray  # the last target, or actual: what the dead band measures from


def guard_table(
    now_s: float,
    table: GuestTable,
    wish_kib: FloatArray,
    *,
    rules: GuardConfig,
    backoff_until_s: FloatArray,
    excluded: BoolArray,
    failed: BoolArray,
    previous_actual_kib: FloatArray | None = None,
    kernels: GuardKernels = NUMPY,
) -> GuardOutcome:
    """Check every guest's wish (NaN: none) at once. ``failed``: the policy raised for
    the guest; ``previous_actual_kib``: each one's ``actual`` at the last step (NaN or
    None: not seen). The rules and their order are the module docstring's; ``kernels``
    runs them (``overcommitd.guard_kernels``)."""
    actual = table.actual_kib.astype(np.float64)
    before = np.full(len(actual), np.nan) if previous_actual_kib is None else previous_actual_kib
    problem = stats_problem_codes(now_s, table, rules, kernels)
    columns = kernels.rules(
        now_s,
        wish_kib,
        table.actual_kib,
        table.last_target_kib,
        table.has_last_target,
        table.max_kib,
        table.floor_kib,
        table.last_target_age_s,
        table.running,
        table.deflate_on_oom,
        excluded,
        failed,
        backoff_until_s,
        before,
        problem,
        int(table.auto_deflate_tolerance_kib),
        int(rules.min_guest_kib),
        float(rules.settle_s),
        float(rules.auto_deflate_cooldown_s),
        int(rules.max_inflate_step_kib),
        int(rules.max_deflate_step_kib),
        int(rules.dead_band_kib),
    )
    return GuardOutcome(now_s, rules, actual, problem, *columns)


def decision(
    table: GuestTable, out: GuardOutcome, i: int, *, error: str | None = None, policy_reason: str | None = None
) -> Decision:
    """Row ``i``'s Decision with every Clamp that fired, read back from ``out``."""
    guest = table.snapshot(i)
    wish = int(out.wish_kib[i]) if out.has_wish[i] else None
    target = int(out.target_kib[i]) if out.has_target[i] else None
    hold = int(out.hold[i])
    if hold:
        return Decision(
            guest.uuid, guest.name, target, wish, _hold_clamps(guest, out, i, hold, wish, error), policy_reason
        )
    clamps: list[Clamp] = []
    assert wish is not None
    ranged, floor = int(out.ranged_kib[i]), int(out.floor_kib[i])
    if out.maxed[i]:
        clamps.append(Clamp(ClampReason.MAXIMUM, wish, guest.max_kib, f"maximum {guest.max_kib} KiB"))
    if out.floored[i]:
        clamps.append(Clamp(ClampReason.FLOOR, min(wish, guest.max_kib), floor, f"floor {floor} KiB"))
    stepped = int(out.stepped_kib[i])
    block = int(out.inflate_block[i])
    if block:
        clamps.append(Clamp(INFLATE_BLOCKS[block], ranged, stepped, _block_detail(guest, out, i, block)))  # type: ignore[arg-type]
    if out.deflate_stepped[i]:
        detail = f"at most +{out.rules.max_deflate_step_kib} KiB"
        clamps.append(Clamp(ClampReason.DEFLATE_STEP, ranged, stepped, detail))
    if out.dead_band[i]:
        reference = int(out.reference_kib[i])
        clamps.append(Clamp(ClampReason.DEAD_BAND, stepped, None, f"{stepped - reference:+d} KiB from {reference}"))
    return Decision(guest.uuid, guest.name, target, wish, tuple(clamps), policy_reason)


def _hold_clamps(
    guest: GuestSnapshot, out: GuardOutcome, i: int, hold: int, wish: int | None, error: str | None
) -> tuple[Clamp, ...]:
    reason = HOLDS[hold]
    assert reason is not None
    if reason is ClampReason.NOT_RUNNING:
        why = Clamp(reason, wish, None, guest.run_state.value)
    elif reason is ClampReason.EXCLUDED:
        why = Clamp(reason, wish, None, "excluded by config")
    elif reason is ClampReason.POLICY_ERROR:
        why = Clamp(reason, None, None, error or "the policy raised")
    else:
        why = Clamp(reason, None, None, "the policy gave no target")
    if not out.restored[i]:
        return (why,)
    floor = int(out.floor_kib[i])
    raised = Clamp(ClampReason.FLOOR, None, int(out.target_kib[i]), f"set below the floor of {floor} KiB")
    return why, raised


def _block_detail(guest: GuestSnapshot, out: GuardOutcome, i: int, block: int) -> str:
    now_s, rules = out.now_s, out.rules
    if block <= 3:
        return _stats_detail(block, now_s, guest, rules)
    if block <= 5:
        left_s = float(out.backoff_until_s[i]) - now_s
        return f"balloon stopped short of its target; no inflation for {left_s:.0f} s"
    if block == 6:
        return f"balloon still moving to {guest.last_target_kib} KiB, set {guest.last_target_age_s:.1f} s ago"
    return f"at most -{rules.max_inflate_step_kib} KiB"


def guard(
    now_s: float,
    guest: GuestSnapshot,
    wish_kib: int | None,
    *,
    rules: GuardConfig,
    memory: GuardMemory = FRESH,
    excluded: bool = False,
    error: str | None = None,
) -> tuple[Decision, GuardMemory]:
    """Check one guest's wish; returns the Decision and what to remember for next time.
    The one-row case of ``guard_table``."""
    table = GuestTable.of([guest], auto_deflate_tolerance_kib=rules.auto_deflate_tolerance_kib)
    out = guard_table(
        now_s,
        table,
        np.array([np.nan if wish_kib is None else wish_kib], dtype=np.float64),
        rules=rules,
        backoff_until_s=np.array([memory.backoff_until_s]),
        excluded=np.array([excluded]),
        failed=np.array([error is not None]),
        previous_actual_kib=np.array([np.nan if memory.actual_kib is None else memory.actual_kib], dtype=np.float64),
    )
    remembered = GuardMemory(float(out.backoff_until_s[0]), guest.actual_kib)
    return decision(table, out, 0, error=error), remembered


def decisions(
    table: GuestTable,
    out: GuardOutcome,
    errors: Mapping[int, str] | None = None,
    reasons: Mapping[int, str] | None = None,
) -> tuple[Decision, ...]:
    """Every row's Decision; ``errors`` and ``reasons`` by row."""
    errors, reasons = errors or {}, reasons or {}
    return tuple(decision(table, out, i, error=errors.get(i), policy_reason=reasons.get(i)) for i in range(len(table)))


def clamp_counts(out: GuardOutcome) -> dict[ClampReason, int]:
    """How many rows' Decisions carry each Clamp reason (what ``decision`` would list),
    counted over the columns: the daemon's metrics without a Decision per guest."""
    counts: dict[ClampReason, int] = {}

    def add(reason: ClampReason | None, n: int) -> None:
        if reason is not None and n:
            counts[reason] = counts.get(reason, 0) + n

    for code, n in enumerate(np.bincount(out.hold, minlength=len(HOLDS)).tolist()):
        add(HOLDS[code], n)
    add(ClampReason.FLOOR, int(np.count_nonzero(out.restored)) + int(np.count_nonzero(out.floored)))
    add(ClampReason.MAXIMUM, int(np.count_nonzero(out.maxed)))
    for code, n in enumerate(np.bincount(out.inflate_block, minlength=len(INFLATE_BLOCKS)).tolist()):
        add(INFLATE_BLOCKS[code], n)
    add(ClampReason.DEFLATE_STEP, int(np.count_nonzero(out.deflate_stepped)))
    add(ClampReason.DEAD_BAND, int(np.count_nonzero(out.dead_band)))
    return counts


__all__: Sequence[str] = (
    "FRESH",
    "GuardMemories",
    "GuardMemory",
    "GuardOutcome",
    "clamp_counts",
    "decision",
    "decisions",
    "floor_kib",
    "floors_kib",
    "guard",
    "guard_table",
    "implausible",
    "stats_problem",
)
