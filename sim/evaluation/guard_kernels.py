"""The guard's column kernels (``overcommitd.guard_kernels``) compiled, for the replay.

At 50 guests the daemon's numpy guard is ~100 numpy calls of a few microseconds each on
50-element arrays: dispatch, not arithmetic (issue 13 profile: 114 us of a 372 us tick).
These loops do the same arithmetic row by row in one compiled call per kernel. Each
expression follows the numpy reference's operands and order; the rules are integer
arithmetic and comparisons, so the columns are identical, not merely close
(``tests/test_guard_kernels.py`` holds them so on arbitrary tables).

The daemon never imports this module: numba is in the simulator's extra only. Without
numba, or with ``OVERCOMMITD_SIM_COMPILED=0``, ``KERNELS`` is the numpy reference.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from overcommitd.guard_kernels import NUMPY, WISH_LIMIT_KIB, GuardKernels, RuleColumns
from sim.compiled import AVAILABLE, jit, nan_max, nan_min

_LIMIT = float(WISH_LIMIT_KIB)


@jit
def implausible(max_kib: Any, total: Any, available: Any, free: Any, caches: Any) -> Any:
    """``numpy_implausible``, row by row."""
    n = len(max_kib)
    code = np.zeros(n, dtype=np.int64)
    for i in range(n):
        t = total[i]
        if t > max_kib[i]:
            code[i] = 1
        elif available[i] < 0 or available[i] > t:
            code[i] = 2
        elif free[i] < 0 or free[i] > t:
            code[i] = 3
        elif caches[i] < 0 or caches[i] > t:
            code[i] = 4
    return code


@jit
def problem(
    now_s: float,
    last_update_s: Any,
    stats_period_s: Any,
    stale_after_periods: float,
    stale_after_min_s: float,
    max_kib: Any,
    total: Any,
    available: Any,
    free: Any,
    caches: Any,
) -> Any:
    """``numpy_problem``, row by row."""
    bad = implausible(max_kib, total, available, free, caches)
    n = len(last_update_s)
    code = np.empty(n, dtype=np.int64)
    for i in range(n):
        last = last_update_s[i]
        if math.isnan(last):
            code[i] = 1
            continue
        limit = nan_max(stale_after_periods * stats_period_s[i], stale_after_min_s)
        if now_s - last > limit:
            code[i] = 2
        elif bad[i] > 0:
            code[i] = 3
        else:
            code[i] = 0
    return code


@jit
def _rules(
    now_s: float,
    wish_kib: Any,
    actual: Any,
    last: Any,
    has_last: Any,
    max_kib: Any,
    sla_floor_kib: Any,
    last_target_age_s: Any,
    running: Any,
    deflate_on_oom: Any,
    excluded: Any,
    failed: Any,
    backoff_until_s: Any,
    previous_actual_kib: Any,
    problem: Any,
    tolerance_kib: int,
    min_guest_kib: int,
    settle_s: float,
    cooldown_s: float,
    max_inflate_kib: int,
    max_deflate_kib: int,
    dead_band_kib: int,
) -> Any:
    """``numpy_rules``, row by row, into three blocks (``rules`` splits them): numba
    boxes each array it returns, and sixteen cost more than the rules at 50 guests."""
    n = len(actual)
    i64 = np.int64
    # One allocation per kind, a row per output column (rows of a C array are contiguous).
    ints, flags, backoff_out = np.empty((8, n), dtype=i64), np.empty((7, n), dtype=np.bool_), np.empty(n)
    target, wish_out, floor_out, hold_out, ranged_out, block_out, stepped_out, reference_out = ints
    has_target, has_wish_out, restored_out, maxed_out, floored_out, deflate_out, dead_out = flags
    for i in range(n):
        has_wish = not math.isnan(wish_kib[i])
        w = wish_kib[i] if has_wish else 0.0
        w = nan_min(nan_max(w, -_LIMIT), _LIMIT)
        wish = i64(w)  # truncates toward zero, as astype
        a, lt, hl = actual[i], last[i], has_last[i]
        floor = min(max(sla_floor_kib[i], min_guest_kib), max_kib[i])
        if not running[i]:
            hold = 1
        elif excluded[i]:
            hold = 2
        elif failed[i]:
            hold = 3
        elif has_wish:
            hold = 0
        else:
            hold = 4
        held = hold > 0
        reference = lt if hl else a
        restored = held and hold >= 3 and min(reference, a) < floor
        maxed = wish > max_kib[i]
        ranged = max_kib[i] if maxed else wish
        floored = ranged < floor
        if floored:
            ranged = floor
        short = (not held) and hl and a > lt + tolerance_kib
        settling = last_target_age_s[i] < settle_s
        deflated_itself = deflate_on_oom[i] and a > previous_actual_kib[i]  # NaN compares false
        in_flight = short and now_s >= backoff_until_s[i] and settling and not deflated_itself
        backoff = now_s + cooldown_s if (short and not in_flight) else backoff_until_s[i]
        inflating = ranged < a
        block = 0
        if inflating and not held:
            if problem[i] > 0:
                block = problem[i]
            elif now_s < backoff:
                block = 4 if deflate_on_oom[i] else 5
            elif in_flight and hl and ranged < lt:
                block = 6
            elif a - ranged > max_inflate_kib:
                block = 7
        if 0 < block <= 5:
            inflated = a
        elif block == 6:
            inflated = lt
        elif block == 7:
            inflated = a - max_inflate_kib
        else:
            inflated = ranged
        deflate_stepped = (not held) and (not inflating) and ranged > a + max_deflate_kib
        if deflate_stepped:
            stepped = max(a + max_deflate_kib, floor)
        elif inflating:
            stepped = inflated
        else:
            stepped = ranged
        dead = (not held) and abs(stepped - reference) < dead_band_kib and not (reference < floor)
        target[i] = max(floor, a) if held else stepped
        has_target[i] = ((not held) and not dead) or restored
        backoff_out[i] = backoff_until_s[i] if held else backoff
        wish_out[i], has_wish_out[i], floor_out[i], hold_out[i] = wish, has_wish, floor, hold
        restored_out[i], maxed_out[i] = restored, maxed and not held
        floored_out[i], ranged_out[i], block_out[i] = floored and not held, ranged, block
        deflate_out[i], stepped_out[i], dead_out[i], reference_out[i] = deflate_stepped, stepped, dead, reference
    return ints, flags, backoff_out


def rules(*args: Any) -> RuleColumns:
    """``numpy_rules``, row by row: the same columns in the same order."""
    ints, flags, backoff = _rules(*args)
    target, wish, floor, hold, ranged, block, stepped, reference = ints
    has_target, has_wish, restored, maxed, floored, deflate_stepped, dead = flags
    return RuleColumns(
        target,
        has_target,
        backoff,
        wish,
        has_wish,
        floor,
        hold,
        restored,
        maxed,
        floored,
        ranged,
        block,
        deflate_stepped,
        stepped,
        dead,
        reference,
    )


@jit
def needs(actual_kib: Any, available_kib: Any, floor_kib: Any, held: Any, running: Any, problem: Any) -> Any:
    """``numpy_needs``, row by row."""
    n = len(actual_kib)
    need = np.empty(n, dtype=np.int64)
    at_size = np.empty(n, dtype=np.bool_)
    for i in range(n):
        available = available_kib[i]
        at_size[i] = held[i] or not running[i] or problem[i] != 0 or math.isnan(available)
        if at_size[i]:
            need[i] = actual_kib[i]
        else:  # as numpy: int - float is float, the floor compares as float, astype truncates
            need[i] = np.int64(nan_max(nan_max(actual_kib[i] - available, float(floor_kib[i])), 0.0))
    return need, at_size


@jit
def _need_totals(actual_kib: Any, available_kib: Any, floor_kib: Any, held: Any, running: Any, problem: Any) -> Any:
    need, at_size = needs(actual_kib, available_kib, floor_kib, held, running, problem)
    return need.sum(), actual_kib.sum(), at_size.sum()


def need_totals(*args: Any) -> tuple[int, int, int]:
    """``numpy_need_totals``: ``needs`` summed in the same compiled call (no column boxed)."""
    need_kib, actual_kib, at_size = _need_totals(*args)
    return int(need_kib), int(actual_kib), int(at_size)


COMPILED = GuardKernels("compiled", implausible, problem, rules, needs, need_totals)
KERNELS = COMPILED if AVAILABLE else NUMPY

__all__ = ["COMPILED", "KERNELS", "RuleColumns"]
