"""One scored tick of the replay's scorecard (``Recorder.record``) as one compiled call.

At 50 guests the numpy recording was ~15 reductions and elementwise calls of a few
microseconds each on 50-element arrays (issue 13 profile: ~55 us a tick with the recovery
tracking): dispatch, not arithmetic. ``record_tick`` does the same sums, counts and
recovery bookkeeping guest by guest in one loop that numba compiles.

``Recorder``'s numpy methods stay the reference (and the path without numba, or with
``OVERCOMMITD_SIM_COMPILED=0``); ``tests/test_score_kernel.py`` holds the two to
bit-identical scorecards on replays and on arbitrary tick arrays.

Bit-identity: a fleet total is numpy's ``sum``, which is not a running sum but a pairwise
one (numpy/_core/src/umath/loops_utils.h.src, ``pairwise_sum``: below 8 elements a
running sum from -0.0; up to 128, eight running sums over strided lanes combined as
``((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))`` and the rest added after; above, the halves
split at a multiple of 8), added to the reduction's initial 0.0. ``pairwise_sum`` below
follows that order, so the doubles are the same. Every other expression keeps the
reference's operands and order; numba compiles without fast-math or FMA contraction.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sim.compiled import jit
from sim.memory.fleet_kernel import Array, Flags

# Slots of the running totals (``Recorder._acc``), KiB·s or guest-seconds.
SAVED, BALLOONED, UNBACKED, REPORTED, UNSERVED, DEGRADED, BELOW_FLOOR = range(7)
N_TOTALS = 7
# Rows of the per-guest state (``Recorder._state``): what the recording carries from tick
# to tick, then the per-guest constants, KiB or s.
DEMAND_KIB_S, JUMP_STARTED_S, PREV_DEMAND, PREV_SWAP_IN, RECOVERED_S, FLOOR, JUMP, RECOVERED = range(8)
N_ROWS = 8
_PAIRWISE_BLOCK = 128  # numpy's PW_BLOCKSIZE


@jit
def _block(a: Any, lo: int, n: int) -> float:
    """numpy's ``pairwise_sum`` of ``a[lo:lo + n]`` for ``n`` up to its block size."""
    if n < 8:
        res = -0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    whole = n - n % 8
    while i < whole:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    total: float = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        total += a[lo + i]
        i += 1
    return total


@jit
def _pairwise(a: Any, lo: int, n: int) -> float:
    """numpy's ``pairwise_sum`` of ``a[lo:lo + n]``: above the block size, the sum of the
    two halves' (split at a multiple of 8). numpy recurses; this walks the same tree with
    a stack (numba's cache does not keep recursive functions safely), left half first."""
    if n <= _PAIRWISE_BLOCK:
        block: float = _block(a, lo, n)
        return block
    depth = 64  # halving from 2**63 elements reaches the block size long before
    los = np.empty(depth, dtype=np.int64)
    ns = np.empty(depth, dtype=np.int64)
    stage = np.zeros(depth, dtype=np.int64)  # 0: left next, 1: right next, 2: add them
    sums = np.empty(depth)
    top, n_sums = 0, 0
    los[0], ns[0] = lo, n
    while top >= 0:
        at, size = los[top], ns[top]
        half = size // 2
        half -= half % 8
        if size <= _PAIRWISE_BLOCK:
            sums[n_sums] = _block(a, at, size)
            n_sums += 1
            top -= 1
        elif stage[top] < 2:
            child_lo, child_n = (at, half) if stage[top] == 0 else (at + half, size - half)
            stage[top] += 1
            top += 1
            los[top], ns[top], stage[top] = child_lo, child_n, 0
        else:
            sums[n_sums - 2] = sums[n_sums - 2] + sums[n_sums - 1]
            n_sums -= 1
            top -= 1
    result: float = sums[0]
    return result


@jit
def pairwise_sum(a: Any) -> float:
    """``float(a.sum())`` of a 1-D float64 array, in numpy's order."""
    total: float = 0.0 + _pairwise(a, 0, len(a))
    return total


@jit
def record_tick(
    acc: Array,
    state: Array,
    touched: Array,
    ballooned: Array,
    unbacked: Array,
    reported: Array,
    unserved: Array,
    degraded: Flags,
    demand: Array,
    actual: Array,
    available: Array,
    swap_in: Array,
    ram_total_kib: float,
    jump_min_kib: float,
    now_s: float,
    dt_s: float,
    has_prev: bool,
) -> tuple[int, int]:
    """``Recorder._record_numpy`` then ``Recorder._track_recovery_numpy`` for one tick,
    on the running totals ``acc`` and the per-guest ``state`` rows. The state is one array
    and the totals another because a compiled call costs ~0.3 us per array passed. Writes
    this tick's recoveries, in guest order, to the front of the ``RECOVERED_S`` row;
    returns (recoveries, new jumps)."""
    n = state.shape[1]
    lengths = (
        len(touched),
        len(ballooned),
        len(unbacked),
        len(reported),
        len(unserved),
        len(degraded),
        len(demand),
        len(actual),
        len(available),
        len(swap_in),
    )
    if min(lengths) != n or max(lengths) != n:
        # numpy would refuse to broadcast them; unchecked, the loops would read past the end
        raise ValueError("a tick's arrays must have one element per guest")
    acc[SAVED] += (ram_total_kib - pairwise_sum(touched)) * dt_s
    acc[BALLOONED] += pairwise_sum(ballooned) * dt_s
    acc[UNBACKED] += pairwise_sum(unbacked) * dt_s
    acc[REPORTED] += pairwise_sum(reported) * dt_s
    acc[UNSERVED] += pairwise_sum(unserved) * dt_s
    degraded_n = 0
    below_n = 0
    for i in range(n):
        degraded_n += 1 if degraded[i] else 0
        below_n += 1 if actual[i] < state[FLOOR, i] else 0
        state[DEMAND_KIB_S, i] += demand[i] * dt_s
    acc[DEGRADED] += float(degraded_n) * dt_s
    acc[BELOW_FLOOR] += float(below_n) * dt_s
    jumps = 0
    recoveries = 0
    started = state[JUMP_STARTED_S]
    for i in range(n):
        if has_prev:
            rise = demand[i] - state[PREV_DEMAND, i]
            if rise >= state[JUMP, i] and rise >= jump_min_kib and np.isnan(started[i]):
                jumps += 1
                started[i] = now_s
        state[PREV_DEMAND, i] = demand[i]
        ok = available[i] >= state[RECOVERED, i] and swap_in[i] <= state[PREV_SWAP_IN, i]
        state[PREV_SWAP_IN, i] = swap_in[i]
        if ok and not np.isnan(started[i]):
            state[RECOVERED_S, recoveries] = now_s - started[i]
            recoveries += 1
            started[i] = np.nan
    return recoveries, jumps
