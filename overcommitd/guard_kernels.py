"""The guard's arithmetic as pure functions of columns (``GuardKernels``): what
``overcommitd.guard`` decides, without the tables, configs and Decisions around it.

The daemon runs ``NUMPY``, a bounded number of numpy operations per tick. The replay runs
the same rules once a tick for a few dozen guests, where ~100 numpy calls of a few
microseconds each cost more than the arithmetic (issue 13 profile: the guard was a third
of a replay's step); it hands the step a compiled twin of these functions
(``sim.evaluation.guard_kernels``, numba, which the daemon's install does not carry).
``tests/test_guard_kernels.py`` holds the two to identical columns on arbitrary tables.

Rule codes are the indices of ``overcommitd.guard.HOLDS`` and ``INFLATE_BLOCKS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from overcommitd.table import BoolArray, FloatArray, IntArray

# A wish is clipped into this range before integer arithmetic: far beyond any memory
# size (``MAX_KIB`` is 2**40), so the clamps to [floor, maximum] decide as before, and
# ``actual - wish`` cannot overflow int64.
WISH_LIMIT_KIB = 2**62


class RuleColumns(NamedTuple):
    """What the rules kernel decides for every row (``overcommitd.guard.GuardOutcome``
    documents each column)."""

    target_kib: IntArray
    has_target: BoolArray
    backoff_until_s: FloatArray
    wish_kib: IntArray
    has_wish: BoolArray
    floor_kib: IntArray
    hold: IntArray
    restored: BoolArray
    maxed: BoolArray
    floored: BoolArray
    ranged_kib: IntArray
    inflate_block: IntArray
    deflate_stepped: BoolArray
    stepped_kib: IntArray
    dead_band: BoolArray
    reference_kib: IntArray


@dataclass(frozen=True, slots=True)
class GuardKernels:
    """One implementation of the guard's three column functions:

    * ``implausible(max_kib, total, available, free, caches) -> codes``: 0 nothing,
      1 MemTotal above the maximum, 2.. MemAvailable, MemFree, disk caches outside
      0..MemTotal (NaN, an unsent stat, is never implausible);
    * ``problem(now_s, last_update_s, stats_period_s, stale_after_periods,
      stale_after_min_s, max_kib, total, available, free, caches) -> codes``: 0 fine,
      1 missing, 2 stale, 3 implausible (``implausible`` of the last five, in the same
      call: the step needs only the codes);
    * ``rules(...) -> RuleColumns``: every rule of the guard (``numpy_rules``'s arguments);
    * ``needs(actual_kib, available_kib, floor_kib, held, running, problem) -> (need_kib,
      at_size)``: the shortfall estimate's need of each guest (``numpy_needs``);
    * ``need_totals(...) -> (need_kib, actual_kib, at_size)``: ``needs`` summed, with the
      guests' ``actual`` (``numpy_need_totals``): what the estimate reads of them.
    """

    name: str
    implausible: Callable[..., IntArray]
    problem: Callable[..., IntArray]
    rules: Callable[..., Any]  # returns RuleColumns' columns, in order
    needs: Callable[..., tuple[IntArray, BoolArray]]
    need_totals: Callable[..., tuple[int, int, int]]


def floor_rule(sla_floor_kib: Any, max_kib: Any, min_guest_kib: int) -> Any:
    """The lowest target a guest may get: its SLA floor or the global minimum, never
    above its maximum (on arrays or scalars)."""
    return np.minimum(np.maximum(sla_floor_kib, min_guest_kib), max_kib)


def numpy_implausible(
    max_kib: IntArray, total: FloatArray, available: FloatArray, free: FloatArray, caches: FloatArray
) -> IntArray:
    code = np.where(total > max_kib, 1, 0)
    for k, value in enumerate((available, free, caches), start=2):
        bad = (value < 0) | (value > total)
        code = np.where((code == 0) & bad, k, code)
    return np.asarray(code, dtype=np.int64)


def numpy_problem(
    now_s: float,
    last_update_s: FloatArray,
    stats_period_s: FloatArray,
    stale_after_periods: float,
    stale_after_min_s: float,
    max_kib: IntArray,
    total: FloatArray,
    available: FloatArray,
    free: FloatArray,
    caches: FloatArray,
) -> IntArray:
    implausible = numpy_implausible(max_kib, total, available, free, caches)
    present = ~np.isnan(last_update_s)
    stale = now_s - last_update_s > np.maximum(stale_after_periods * stats_period_s, stale_after_min_s)
    return np.asarray(np.where(present, np.where(stale, 2, np.where(implausible > 0, 3, 0)), 1), dtype=np.int64)


def numpy_rules(
    now_s: float,
    wish_kib: FloatArray,
    actual: IntArray,
    last: IntArray,
    has_last: BoolArray,
    max_kib: IntArray,
    sla_floor_kib: IntArray,
    last_target_age_s: FloatArray,
    running: BoolArray,
    deflate_on_oom: BoolArray,
    excluded: BoolArray,
    failed: BoolArray,
    backoff_until_s: FloatArray,
    previous_actual_kib: FloatArray,
    problem: IntArray,
    tolerance_kib: int,
    min_guest_kib: int,
    settle_s: float,
    cooldown_s: float,
    max_inflate_kib: int,
    max_deflate_kib: int,
    dead_band_kib: int,
) -> RuleColumns:
    """The rules of ``overcommitd.guard`` in their order, over columns."""
    has_wish = ~np.isnan(wish_kib)
    wish = np.minimum(np.maximum(np.where(has_wish, wish_kib, 0.0), -WISH_LIMIT_KIB), WISH_LIMIT_KIB)
    wish = wish.astype(np.int64)  # truncates toward zero, as int() did
    floor = np.asarray(floor_rule(sla_floor_kib, max_kib, min_guest_kib), dtype=np.int64)
    # np.where chains, not np.select: a tenth of the cost on a few hundred rows.
    hold = np.where(~running, 1, np.where(excluded, 2, np.where(failed, 3, np.where(has_wish, 0, 4))))
    held = hold > 0
    # Held, unless a running, included guest's balloon is set below its floor (someone ran
    # `virsh setmem` behind our back, or the floor was raised): then stop it at the floor,
    # or where it is if that is higher. Never inflates.
    reference = np.where(has_last, last, actual)
    restored = held & (hold >= 3) & (np.minimum(reference, actual) < floor)

    maxed = wish > max_kib
    ranged = np.where(maxed, max_kib, wish)
    floored = ranged < floor
    ranged = np.where(floored, floor, ranged)

    # Short of the last target: stopped (the guest deflated itself under DEFLATE_ON_OOM or
    # had nothing to give), or still moving to a target set within ``settle_s``. During a
    # back-off any shortfall is one more stop (a guest still deflating past the target
    # that met it a moment ago), never a balloon in flight. Nor is a DEFLATE_ON_OOM balloon
    # that rose since the last step (``previous_actual_kib``, NaN: not seen): it went away
    # from its lower target, the guest took pages back (otherwise a target set just before
    # the guest ran out, i.e. whether the last change cleared the dead band, decided the
    # back-off).
    short = ~held & has_last & (actual > last + tolerance_kib)  # GuestTable.short_of_target
    settling = last_target_age_s < settle_s  # NaN (unknown age): not settling
    deflated_itself = deflate_on_oom & (actual > previous_actual_kib)  # NaN compares false
    in_flight = short & (now_s >= backoff_until_s) & settling & ~deflated_itself
    backoff = np.where(short & ~in_flight, now_s + cooldown_s, backoff_until_s)

    inflating = ranged < actual
    backing_off = now_s < backoff
    flight_bound = in_flight & has_last & (ranged < last)
    step_bound = actual - ranged > max_inflate_kib
    block = np.where(
        problem > 0,
        problem,
        np.where(backing_off, np.where(deflate_on_oom, 4, 5), np.where(flight_bound, 6, np.where(step_bound, 7, 0))),
    )
    block = np.where(inflating & ~held, block, 0)
    inflated = np.where(
        (block > 0) & (block <= 5),
        actual,
        np.where(block == 6, last, np.where(block == 7, actual - max_inflate_kib, ranged)),
    )
    deflate_stepped = ~held & ~inflating & (ranged > actual + max_deflate_kib)
    stepped = np.where(
        deflate_stepped, np.maximum(actual + max_deflate_kib, floor), np.where(inflating, inflated, ranged)
    )
    dead = ~held & (np.abs(stepped - reference) < dead_band_kib) & ~(reference < floor)
    return RuleColumns(
        target_kib=np.where(held, np.maximum(floor, actual), stepped),
        has_target=(~held & ~dead) | restored,
        backoff_until_s=np.where(held, backoff_until_s, backoff),
        wish_kib=wish,
        has_wish=has_wish,
        floor_kib=floor,
        hold=hold,
        restored=restored,
        maxed=maxed & ~held,
        floored=floored & ~held,
        ranged_kib=ranged,
        inflate_block=block,
        deflate_stepped=deflate_stepped,
        stepped_kib=stepped,
        dead_band=dead,
        reference_kib=reference,
    )


def numpy_needs(
    actual_kib: IntArray,
    available_kib: FloatArray,
    floor_kib: IntArray,
    held: BoolArray,
    running: BoolArray,
    problem: IntArray,
) -> tuple[IntArray, BoolArray]:
    """What no balloon may take from each guest (``overcommitd.shortfall.needs_kib``):
    its use (``actual - available``) or its floor, the larger, never below 0; ``actual``
    where ``held``, not ``running``, its stats have a ``problem`` (a ``numpy_problem``
    code) or its use is unknown (``available`` NaN). Also returns where each guest
    counts at its size."""
    at_size = held | ~running | (problem != 0) | np.isnan(available_kib)
    need = np.maximum(np.maximum(actual_kib - available_kib, floor_kib), 0)
    return np.where(at_size, actual_kib, need).astype(np.int64), at_size


def numpy_need_totals(
    actual_kib: IntArray,
    available_kib: FloatArray,
    floor_kib: IntArray,
    held: BoolArray,
    running: BoolArray,
    problem: IntArray,
) -> tuple[int, int, int]:
    """``numpy_needs`` summed: every guest's need, every guest's ``actual`` and how many
    count at their size (integer sums: the same in any order)."""
    need, at_size = numpy_needs(actual_kib, available_kib, floor_kib, held, running, problem)
    return int(need.sum()), int(actual_kib.sum()), int(np.count_nonzero(at_size))


NUMPY = GuardKernels("numpy", numpy_implausible, numpy_problem, numpy_rules, numpy_needs, numpy_need_totals)

__all__ = ["NUMPY", "WISH_LIMIT_KIB", "GuardKernels", "RuleColumns", "floor_rule"]
