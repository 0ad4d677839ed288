"""The end of a bulk interval (``Fleet.land_workload``) as one compiled loop over guests.

At 50 guests ``Fleet.advance`` spent its time in ~300 numpy calls of a few microseconds
each on arrays of 50 elements (issue 13 profile): dispatch, not arithmetic. This module
does the same arithmetic guest by guest in a loop that numba compiles, so a tick costs one
call. ``Fleet``'s numpy methods stay the reference (and the only path of the protocol
model, whose driver moves balloons on its own clock); ``tests/test_fleet_kernel.py`` holds
the two to bit-identical results on real traces and on arbitrary states.

Bit-identity rules followed here: every expression keeps the reference's operands and
their order (IEEE arithmetic is then the same, numba compiles without fast-math or FMA
contraction); the scalars the reference computes with ``np.exp``/``math.exp`` are computed
by the caller the same way and passed in; ``nan_max``/``nan_min`` (``sim.compiled``) are
``np.maximum``/``np.minimum`` (NaN wins); and where the reference skips a step for the whole fleet when no guest needs it
(``if not amount.any(): return``), the loop checks the same condition over every guest
first, since running such a step with a zero amount can still move a guest by an ulp.

Without numba, or with ``OVERCOMMITD_SIM_COMPILED=0`` (``sim.compiled.AVAILABLE``), the
Fleet keeps to numpy.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from sim.compiled import jit, nan_max, nan_min

Array = npt.NDArray[np.float64]
Flags = npt.NDArray[np.bool_]


class KernelState(NamedTuple):
    """The Fleet's and the bulk driver's arrays the kernel reads and changes in place,
    named as the kernel uses them (``Fleet._kernel_state`` fills it)."""

    ram: Array
    reserved: Array
    kernel: Array
    min_free: Array
    oom_floor: Array
    cache_min: Array
    swap_size: Array
    deflate_on_oom: Flags
    anon: Array
    swap: Array
    cache: Array
    hot: Array
    touched: Array
    resident: Array  # balloon_resident
    older: Array  # older_touched
    deflated: Array  # deflated_free
    reported: Array  # reported_free
    pcp: Array  # free pages on the per-CPU lists
    pcp_cap: Array
    refault_debt: Array
    own_refault_debt: Array
    reaping: Flags
    swap_in: Array
    swap_out: Array
    major_faults: Array
    minor_faults: Array
    oom_kills: Array
    oom_deflates: Array
    refault_kib: Array
    own_refault_kib: Array
    balloon: Array  # the driver's balloon_kib
    held: Array
    num_pages: Array
    waiting_for_config: Flags
    puff_clock: Array  # the driver's puff_clock_s
    puff_retries: Array
    release_frac: Array
    reporting: Flags  # free page reporting runs in the Fleet, in closed form


@jit
def _touched_free(i: int, s: Any) -> float:
    """``Fleet._touched_free`` of guest ``i``."""
    in_use = s.reserved[i] + s.kernel[i] + s.anon[i] + s.cache[i] + s.resident[i]
    touched_free: float = nan_max(s.touched[i] - in_use, 0.0)
    return touched_free


@jit
def _capacity(i: int, s: Any) -> float:
    """``Fleet._capacity`` of guest ``i``."""
    capacity: float = s.ram[i] - s.reserved[i] - s.kernel[i] - s.balloon[i] - s.held[i]
    return capacity


@jit
def _free(i: int, s: Any) -> float:
    """``Fleet.free`` of guest ``i``."""
    free: float = nan_max(_capacity(i, s) - s.anon[i] - s.cache[i], 0.0)
    return free


@jit
def _allocate(i: int, s: Any, amount: float) -> None:
    """``Fleet._allocate`` of guest ``i``: last freed first (``take_in_order``)."""
    touched_free = _touched_free(i, s)
    older = s.older[i]
    left = amount
    fresh = nan_min(left, nan_max(touched_free - older, 0.0))
    left = left - fresh
    deflated = nan_min(left, s.deflated[i])
    left = left - deflated
    older_taken = nan_min(left, older)
    s.deflated[i] -= deflated
    s.older[i] -= older_taken
    s.touched[i] += amount - fresh - older_taken
    s.minor_faults[i] += amount / 4
    s.pcp[i] = nan_max(s.pcp[i] - amount, 0.0)  # Fleet._take_pcp


@jit
def _fill_pcp(i: int, s: Any, freed: float) -> None:
    """``Fleet._fill_pcp`` of guest ``i``."""
    s.pcp[i] = nan_min(s.pcp[i] + freed, s.pcp_cap[i])


@jit
def _evict(i: int, s: Any, amount: float, by_reclaim: bool = True) -> None:
    """``Fleet._evict_cache`` of guest ``i``."""
    cache, hot = s.cache[i], s.hot[i]
    hot_lost = nan_min(nan_max(amount - (cache - hot), 0.0), hot)
    s.cache[i] = cache - amount
    s.hot[i] = hot - hot_lost
    s.refault_debt[i] += hot_lost
    if by_reclaim:
        unballooned = (s.balloon[i] <= 0) & (s.held[i] <= 0)
        s.own_refault_debt[i] += hot_lost if unballooned else 0.0


@jit
def _evict_all(s: Any, amount: Any, by_reclaim: bool = True) -> None:
    """``Fleet._evict_cache`` over the fleet: nothing at all when no guest gives any."""
    n = len(amount)
    for i in range(n):
        if amount[i] != 0.0:  # ``.any()``: NaN counts too
            for j in range(n):
                _evict(j, s, amount[j], by_reclaim)
            return


@jit
def move_balloons(
    s: Any, dt_s: float, inflate_max_kib: float, deflate_max_kib: float, retry_s: float, page_kib: float
) -> None:
    """``Fleet._move_balloon`` with the bulk driver (``BalloonDriver.advance``), then
    ``Fleet.balloon_moved`` where any balloon moved."""
    n = len(s.balloon)
    delta = np.empty(n)
    for i in range(n):
        spare = nan_max(_free(i, s) - s.min_free[i], 0.0) + nan_max(s.cache[i] - s.cache_min[i], 0.0)
        before = s.balloon[i]
        diff = s.num_pages[i] - s.balloon[i]
        inflate = 0.0 if s.waiting_for_config[i] else nan_min(nan_max(diff, 0.0), inflate_max_kib)
        spare_pages_kib = np.floor(spare / page_kib) * page_kib
        short = inflate > spare_pages_kib
        inflate = nan_min(inflate, spare_pages_kib)
        deflate = nan_min(nan_max(-diff, 0.0), deflate_max_kib)
        s.balloon[i] += inflate - deflate
        retries_before = np.ceil(s.puff_clock[i] / retry_s)
        s.puff_clock[i] = s.puff_clock[i] + dt_s if short else 0.0
        s.puff_retries[i] += np.ceil(s.puff_clock[i] / retry_s) - retries_before if short else 0.0
        delta[i] = s.balloon[i] - before
    for i in range(n):
        if delta[i] != 0.0:
            _balloon_moved(s, delta)
            return


@jit
def _balloon_moved(s: Any, delta: Any) -> None:
    """``Fleet.balloon_moved``: the free-list layers are read before the page cache is
    evicted, which happens for the whole fleet or not at all (``_evict_all``)."""
    n = len(delta)
    fresh_layer = np.empty(n)
    from_free = np.empty(n)
    from_cache = np.empty(n)
    for i in range(n):
        inflated = nan_max(delta[i], 0.0)
        free_before = nan_max(_capacity(i, s) + delta[i] - s.anon[i] - s.cache[i], 0.0)
        fresh_layer[i] = nan_max(_touched_free(i, s) - s.older[i], 0.0)
        from_free[i] = nan_min(inflated, nan_max(free_before - s.min_free[i], 0.0))
        from_cache[i] = inflated - from_free[i]
    _evict_all(s, from_cache, False)
    for i in range(n):
        left = from_free[i]
        fresh = nan_min(left, fresh_layer[i])
        left = left - fresh
        deflated_taken = nan_min(left, s.deflated[i])
        left = left - deflated_taken
        older_taken = nan_min(left, s.older[i])
        s.deflated[i] -= deflated_taken
        s.older[i] -= older_taken
        taken_touched = from_cache[i] + fresh + older_taken
        s.touched[i] -= s.release_frac[i] * taken_touched
        s.resident[i] += (1.0 - s.release_frac[i]) * taken_touched
        s.pcp[i] = nan_max(s.pcp[i] - from_free[i], 0.0)
        deflated = nan_max(-delta[i], 0.0)
        before = s.balloon[i] - delta[i]
        share = deflated / before if before > 0 else 0.0
        back_resident = s.resident[i] * nan_min(share, 1.0)
        # Fleet._deflated
        if deflated > 0:
            s.older[i] = _touched_free(i, s)
        s.deflated[i] += deflated - back_resident
        s.resident[i] -= back_resident
        _fill_pcp(i, s, deflated)
        if delta[i] > 0:
            limit = s.ram[i] - s.balloon[i] + s.resident[i]
            s.touched[i] = nan_min(nan_max(s.touched[i], 0.0), limit)


@jit
def _follow_and_grow(s: Any, demand: Any, read: Any, dt_s: float, cooling: float) -> None:
    """``_reap_victims``, ``_follow_demand`` and ``_grow_cache``, guest by guest."""
    for i in range(len(demand)):
        if s.reaping[i]:
            _fill_pcp(i, s, s.anon[i])
            s.anon[i] = 0.0
            s.reaping[i] = False
        working_set = s.anon[i] + s.swap[i]
        grow = nan_max(demand[i] - working_set, 0.0)
        _allocate(i, s, grow)
        s.anon[i] += grow
        shrink = nan_min(nan_max(1.0 - demand[i] / nan_max(working_set, 1.0), 0.0), 1.0)
        freed = s.anon[i] * shrink
        s.anon[i] -= freed
        s.swap[i] -= s.swap[i] * shrink
        _fill_pcp(i, s, freed)
        read_kib = read[i] * dt_s
        room = nan_max(_free(i, s) - s.min_free[i], 0.0)
        grown = nan_min(read_kib, room)
        _allocate(i, s, grown)
        s.cache[i] += grown
        cooled = s.hot[i] * cooling
        s.hot[i] = nan_min(s.cache[i], cooled + read_kib)


@jit
def _relieve_pressure(s: Any, over: Any, killed: Any, oom_step_kib: float, epsilon_kib: float) -> None:
    """``Fleet._relieve_pressure`` with the bulk driver (no hint blocks held)."""
    n = len(over)
    from_cache = np.empty(n)
    for i in range(n):
        over[i] = s.anon[i] + s.cache[i] + s.min_free[i] - _capacity(i, s)
        from_cache[i] = nan_min(nan_max(over[i], 0.0), nan_max(s.cache[i] - s.cache_min[i], 0.0))
    _evict_all(s, from_cache)
    for i in range(n):
        o = over[i] - from_cache[i]
        to_swap = nan_min(nan_max(o, 0.0), nan_max(s.swap_size[i] - s.swap[i], 0.0))
        s.anon[i] -= to_swap
        s.swap[i] += to_swap
        s.swap_out[i] += to_swap
        o -= to_swap
        o -= s.min_free[i] - s.oom_floor[i]
        o = o if o > epsilon_kib else 0.0
        steps = np.ceil(o / oom_step_kib) if (s.deflate_on_oom[i] & (o > 0)) else 0.0
        # BalloonDriver.deflate_on_oom, then Fleet._deflated with nothing resident back.
        active = s.balloon[i] < s.num_pages[i]
        given = nan_min(steps * oom_step_kib, s.balloon[i])
        s.balloon[i] -= given
        s.waiting_for_config[i] |= (given > 0) & (not active)
        if given > 0:
            s.older[i] = _touched_free(i, s)
        s.deflated[i] += given - 0.0
        s.resident[i] -= 0.0
        _fill_pcp(i, s, given)
        s.oom_deflates[i] += np.ceil(given / oom_step_kib)
        o -= given
        # Fleet._oom_kill
        killed[i] = o > 0
        if killed[i]:
            s.oom_kills[i] += 1.0
            s.anon[i] = nan_max(s.anon[i] - o, 0.0)
            s.swap[i] = 0.0
            s.reaping[i] = True
        over[i] = o


@jit
def _swap_in(s: Any, thrashing: Any, swap_touch: float, epsilon_kib: float) -> None:
    """``Fleet._swap_in``, guest by guest."""
    n = len(thrashing)
    trim = np.empty(n)
    for i in range(n):
        touched = s.swap[i] * swap_touch
        s.swap_in[i] += touched
        s.major_faults[i] += touched / 4
        room = nan_max(_capacity(i, s) - s.min_free[i] - s.cache_min[i] - s.anon[i], 0.0)
        back = nan_min(touched, room)
        s.swap_out[i] += touched - back
        _allocate(i, s, back)
        s.anon[i] += back
        s.swap[i] -= back
        trim[i] = nan_max(s.cache[i] - nan_max(_capacity(i, s) - s.anon[i], s.cache_min[i]), 0.0)
        thrashing[i] = touched - back > epsilon_kib
    _evict_all(s, trim)


@jit
def _refault(s: Any, reread_share: float) -> None:
    """``Fleet._refault``: nothing at all when no guest owes a re-read."""
    n = len(s.refault_debt)
    owed = False
    for i in range(n):
        owed |= s.refault_debt[i] != 0.0
    if not owed:
        return
    for i in range(n):
        reread = s.refault_debt[i] * reread_share
        s.refault_debt[i] -= reread
        s.refault_kib[i] += reread
        own = s.own_refault_debt[i] * reread_share
        s.own_refault_debt[i] -= own
        s.own_refault_kib[i] += own
        s.major_faults[i] += reread / 4
        back = nan_min(reread, nan_max(_free(i, s) - s.min_free[i], 0.0))
        _allocate(i, s, back)
        s.cache[i] += back
        s.hot[i] += back


@jit
def _settle(s: Any) -> None:
    """``_clip_touched`` then ``_settle_free_layers``, guest by guest."""
    for i in range(len(s.touched)):
        limit = s.ram[i] - s.balloon[i] + s.resident[i]
        s.touched[i] = nan_min(nan_max(s.touched[i], 0.0), limit)
        touched_free = _touched_free(i, s)
        s.older[i] = nan_min(s.older[i], touched_free)
        untouched_free = nan_max(_free(i, s) - touched_free, 0.0)
        s.deflated[i] = nan_min(nan_max(s.deflated[i], 0.0), untouched_free)
        s.reported[i] = nan_min(nan_max(s.reported[i], 0.0), untouched_free - s.deflated[i])
        s.pcp[i] = nan_min(nan_max(s.pcp[i], 0.0), nan_max(_free(i, s) - s.min_free[i], 0.0))


@jit
def land(
    s: Any,
    demand: Any,
    read: Any,
    dt_s: float,
    cooling: float,
    swap_touch: float,
    reread_share: float,
    oom_step_kib: float,
    epsilon_kib: float,
    unserved: Any,
    degraded: Any,
) -> None:
    """``Fleet.land_workload`` for the bulk driver: ``s`` holds the Fleet's and the
    driver's arrays by the names above (``Fleet._kernel_state``), changed in place."""
    n = len(demand)
    over = np.empty(n)
    killed = np.zeros(n, dtype=np.bool_)
    thrashing = np.zeros(n, dtype=np.bool_)
    _follow_and_grow(s, demand, read, dt_s, cooling)
    _relieve_pressure(s, over, killed, oom_step_kib, epsilon_kib)
    _swap_in(s, thrashing, swap_touch, epsilon_kib)
    _refault(s, reread_share)
    _settle(s)
    for i in range(n):
        unserved[i] = demand[i] if killed[i] else 0.0
        degraded[i] = killed[i] | thrashing[i]


@jit
def _reportable(i: int, s: Any, capacity: float, block_kib: float, residue_pct: float) -> float:
    """``Fleet.reportable_blocks`` of guest ``i``."""
    free = _free(i, s)
    unreported = _touched_free(i, s) - free * residue_pct / 100
    if free >= s.min_free[i] + capacity * block_kib:
        blocks: float = np.floor(nan_max(unreported, 0.0) / block_kib)
        return blocks
    return 0.0


@jit
def reportable_blocks(state: Any, capacity: float, block_kib: float, residue_pct: float, out: Any) -> None:
    """``Fleet.reportable_blocks`` of every guest into ``out``, on ``KernelState``'s arrays
    as a plain tuple (the protocol model arms its guests' reporting from it every interval)."""
    s = KernelState(*state)
    for i in range(len(out)):
        out[i] = _reportable(i, s, capacity, block_kib, residue_pct)


@jit
def report_free(s: Any, passes: int, capacity: float, block_kib: float, residue_pct: float) -> None:
    """``Fleet._report_free`` for guests whose reporting the Fleet runs (``s.reporting``):
    ``passes`` passes of ``reportable_blocks``, each ending the loop once no guest has a
    block to report."""
    n = len(s.reporting)
    blocks = np.zeros(n)
    for _ in range(passes):
        found = False
        for i in range(n):
            blocks[i] = _reportable(i, s, capacity, block_kib, residue_pct) if s.reporting[i] else 0.0
            found |= blocks[i] != 0.0
        if not found:
            return
        for i in range(n):
            calls = np.ceil(blocks[i] / (capacity * 16))
            kib = nan_min(blocks[i], calls * capacity) * block_kib
            s.touched[i] -= kib
            s.reported[i] += kib


@jit
def sample_stats(s: Any, wmark_low: Any, deflate_on_oom_negotiated: Any, out: Any) -> None:
    """``Fleet.stats`` into ``out``, one row per ``StatArrays`` field in its order:
    what a stats sample taken now reads (``Fleet.mem_free``, ``mem_total``,
    ``mem_available``), with the reference's operands in its order."""
    for i in range(len(s.ram)):
        free = nan_max(_free(i, s) - s.pcp[i], 0.0)  # Fleet.mem_free
        removed = 0.0 if deflate_on_oom_negotiated[i] else s.balloon[i]  # driver.managed_removed_kib
        cache = s.cache[i]
        out[0, i], out[1, i], out[2, i], out[3, i] = s.swap_in[i], s.swap_out[i], s.major_faults[i], s.minor_faults[i]
        out[4, i] = free
        out[5, i] = s.ram[i] - s.reserved[i] - removed
        out[6, i] = nan_max(free - s.min_free[i] + cache - nan_min(cache / 2, wmark_low[i]), 0.0)
        out[7, i], out[8, i] = cache, s.oom_kills[i]


@jit
def land_state(state: Any, *args: Any) -> None:
    """``land`` on ``KernelState``'s arrays as a plain tuple, as ``advance`` takes them;
    ``args``: the rest of ``land``'s arguments."""
    land(KernelState(*state), *args)


@jit
def landed(s: Any, wmark_low: Any, out: Any) -> None:
    """``Fleet.mem_available`` and ``Fleet.saved_split`` into ``out``'s four rows
    (available, ballooned, unbacked, reported), as the reference computes them."""
    for i in range(len(s.ram)):
        free = nan_max(_free(i, s) - s.pcp[i], 0.0)
        cache = s.cache[i]
        out[0, i] = nan_max(free - s.min_free[i] + cache - nan_min(cache / 2, wmark_low[i]), 0.0)
        saved = nan_max(s.ram[i] - s.touched[i], 0.0)
        ballooned = nan_min(nan_max(s.balloon[i] - s.resident[i], 0.0), saved)
        unbacked = nan_min(s.deflated[i], saved - ballooned)
        out[1, i], out[2, i] = ballooned, unbacked
        out[3, i] = nan_min(s.reported[i], saved - ballooned - unbacked)


@jit
def landed_state(state: Any, wmark_low: Any, out: Any) -> None:
    """``landed`` on ``KernelState``'s arrays as a plain tuple (a driver that moves its
    balloons on its own clock: ``Fleet.landed`` reads it after the interval landed)."""
    landed(KernelState(*state), wmark_low, out)


@jit
def advance(
    state: Any,
    dt_s: float,
    move: Any,
    passes: int,
    report: Any,
    wmark_low: Any,
    deflate_on_oom_negotiated: Any,
    sample: Any,
    demand: Any,
    read: Any,
    land_scalars: Any,
    unserved: Any,
    degraded: Any,
    landed_out: Any,
) -> None:
    """``Fleet.advance`` for the bulk driver in one call (each call unboxes the whole
    state: three calls a tick cost more than their arithmetic at 50 guests): the balloons
    move (``move_balloons``, ``move``: its scalars), free pages are reported
    (``report_free``), the state every stats sample in the interval sees is written to
    ``sample`` (``sample_stats``), then the workload lands (``land``) and what the
    scorecard reads of the result is written to ``landed_out`` (``landed``). ``state``
    holds ``KernelState``'s arrays in its order as a plain tuple, named here: numba types a
    plain tuple of arrays at the call in half the time it takes for a NamedTuple."""
    s = KernelState(*state)
    move_balloons(s, dt_s, move[0], move[1], move[2], move[3])
    report_free(s, passes, report[0], report[1], report[2])
    sample_stats(s, wmark_low, deflate_on_oom_negotiated, sample)
    cooling, swap_touch, reread_share, oom_step_kib, epsilon_kib = land_scalars
    land(s, demand, read, dt_s, cooling, swap_touch, reread_share, oom_step_kib, epsilon_kib, unserved, degraded)
    landed(s, wmark_low, landed_out)


@jit
def _row_at(time_s: float, offset_s: float, duration_s: float, ts: Any, j: int) -> tuple[int, int]:
    """The sample of one guest's trace (``ts``: its sample times) in force at ``time_s``, as
    ``Workload.rows`` finds it (numpy's ``searchsorted(..., side="right") - 1``: -1 before
    the first, the last for a NaN time), and where to search from for the next time:
    ``j`` is the count found for the guest's previous time. Where the shifted time
    already lies inside the trace the modulo is skipped: there fmod returns its operand
    exactly."""
    x = time_s + offset_s
    t = x if 0.0 < x < duration_s else x % duration_s
    if math.isnan(t):
        return len(ts) - 1, j  # numpy sorts NaN last
    if j > 0 and ts[j - 1] > t:
        j = int(np.searchsorted(ts, t, side="right"))
    while j < len(ts) and ts[j] <= t:
        j += 1
    return j - 1, j


@jit
def trace_block(
    times_s: Any,
    offsets_s: Any,
    durations_s: Any,
    first: Any,
    count: Any,
    t_s: Any,
    demand: Any,
    io: Any,
    cap: Any,
    demand_out: Any,
    io_out: Any,
) -> None:
    """``Workload.block``'s lookups for every time (rows) and guest (columns), written
    in that (times x guests) layout directly: no per-guest pass and transpose. ``t_s``
    holds every trace back to back, guest ``g``'s from ``first[g]``, ``count[g]`` long;
    guest by guest, its search position in a local (``_row_at``)."""
    for g in range(len(offsets_s)):
        lo, hi = first[g], first[g] + count[g]
        ts, dem, rates = t_s[lo:hi], demand[lo:hi], io[lo:hi]
        j = 0
        for k in range(len(times_s)):
            i, j = _row_at(times_s[k], offsets_s[g], durations_s[g], ts, j)
            demand_out[k, g] = nan_min(dem[i], cap[g])  # -1: the last, as numpy indexes
            io_out[k, g] = rates[i]


@jit
def trace_landings(
    since_s: float,
    times_s: Any,
    offsets_s: Any,
    durations_s: Any,
    first: Any,
    count: Any,
    t_s: Any,
    demand: Any,
    cap: Any,
    io: Any,
    peaks_out: Any,
    io_out: Any,
) -> None:
    """``Workload.peaks`` for every window (rows) and guest (columns): the peak of the
    samples after the one in force at a window's start, up to the one in force at its
    end (that one alone if none is newer, or across a wrap), into ``peaks_out``; and,
    where ``io_out`` has rows, the I/O rate in force at each time (``trace_block``'s)
    from the same lookup: the replay needs both at every landing instant, and the
    lookups are the cost. Guest by guest, with its trace's row and search position in
    locals: time by time across the fleet, the same lookups cost five times as much
    (issue 13: 17 ms against 3 a block of 4096 ticks at 50 guests, ~4 us a tick)."""
    with_io = len(io_out) > 0
    for g in range(len(offsets_s)):
        lo, hi = first[g], first[g] + count[g]
        ts, dem, rates = t_s[lo:hi], demand[lo:hi], io[lo:hi]
        since_row, j = _row_at(since_s, offsets_s[g], durations_s[g], ts, 0)
        prev = max(since_row, 0)
        for k in range(len(times_s)):
            i, j = _row_at(times_s[k], offsets_s[g], durations_s[g], ts, j)
            if with_io:
                io_out[k, g] = rates[i]  # -1: the last, as numpy indexes
            now = max(i, 0)
            start = prev + 1 if now > prev else now
            peak = dem[start]
            for row in range(start + 1, now + 1):
                peak = nan_max(peak, dem[row])
            peaks_out[k, g] = nan_min(peak, cap[g])
            prev = now
