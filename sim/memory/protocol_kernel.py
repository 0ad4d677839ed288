"""One protocol-level balloon request's Fleet accounting as one compiled call.

The protocol model moves a balloon 256 PFNs at a time, and after each request the
Fleet accounts the move for that guest (``Fleet.balloon_moved_one``: which free layers
and how much page cache the pages came from, what the host released). In Python that is
~25 numpy element reads and writes per request, the largest single cost of a 1 GiB
inflate (issue 13 profile: about a quarter of it). This module does the same arithmetic
in a function numba compiles, one call per request.

A big inflate or deflate makes its requests back to back, and where nothing else can
happen between them, ``requests_run`` does a whole run of them in one call: the same
accounting per request, plus the clock and QEMU's BALLOON_CHANGE rate limit
(``sim.memory.inflate_runs`` applies the rest; ``tests/test_inflate_runs.py`` holds it
to the per-request path).

``Fleet.balloon_moved_one`` stays the reference (and the path without numba, or with
``OVERCOMMITD_SIM_COMPILED=0``); ``tests/test_protocol_kernel.py`` holds the two to
bit-identical arrays on arbitrary states. Bit-identity as in ``sim.memory.fleet_kernel``:
every expression keeps the reference's operands and their order, and ``_py_min`` /
``_py_max`` are Python's ``min``/``max`` of two floats (the first argument wins a tie or
a NaN comparison), which the reference uses.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from sim.compiled import jit
from sim.memory.fleet_kernel import Array
from sim.memory.guest import FixedRow, Fleet
from sim.virtio.balloon_spec import BALLOON_PAGE_KIB
from sim.virtio.device import BALLOON_CHANGE_RATE_S


@jit
def _py_min(a: float, b: float) -> float:
    """Python's ``min(a, b)``: ``b`` only if it is strictly smaller."""
    return b if b < a else a  # noqa: FURB136 - spelt out: the tie and NaN rule is the point


@jit
def _py_max(a: float, b: float) -> float:
    """Python's ``max(a, b)``: ``b`` only if it is strictly larger."""
    return b if b > a else a  # noqa: FURB136 - spelt out: the tie and NaN rule is the point


class MovedState(NamedTuple):
    """The arrays ``_moved_one`` reads and changes in place, named as it uses them: the
    driver seam's ``balloon`` and ``held``, then the Fleet's (``moved_state`` fills it)."""

    balloon: Array
    held: Array
    anon: Array
    cache: Array
    hot_cache: Array
    refault_debt: Array
    touched: Array
    resident_kib: Array  # balloon_resident
    deflated_free: Array
    older_touched: Array
    pcp: Array
    pcp_cap: Array


def moved_state(fleet: Fleet, balloon: Array, held: Array) -> tuple[Array, ...]:
    """``MovedState``'s arrays in its order, as the plain tuple the kernels take: numba
    types a plain tuple of arrays at the call in half the time it takes for a NamedTuple
    (as ``fleet_kernel.advance``'s state). Fetched per call: the Fleet may have replaced
    its arrays since."""
    f = fleet
    return (
        balloon,
        held,
        f.anon,
        f.cache,
        f.hot_cache,
        f.refault_debt,
        f.touched,
        f.balloon_resident,
        f.deflated_free,
        f.older_touched,
        f.pcp,
        f.pcp_cap,
    )


@jit
def _moved_one(
    state: Any,
    i: int,
    delta_kib: float,
    release_frac: float,
    ram_kib: float,
    base_kib: float,
    usable_kib: float,
    min_free_kib: float,
    cache_min_kib: float,
) -> float:
    """The driver's ``balloon[i] += delta_kib``, then ``Fleet.balloon_moved_one(i,
    delta_kib, release_frac)`` with its ``_evict_cache_one`` and ``take_in_order``,
    statement by statement; returns what the guest can then spare for the balloon
    (``sim.memory.balloon_fleet.spare_kib`` with reclaim, the next request's limit).
    ``state``: ``moved_state``'s plain tuple, named here."""
    s = MovedState(*state)
    balloon_kib = s.balloon[i] + delta_kib
    s.balloon[i] = balloon_kib
    before = balloon_kib - delta_kib
    a, c, t = s.anon[i], s.cache[i], s.touched[i]
    resident = s.resident_kib[i]
    in_use = base_kib + a + c
    touched_free = _py_max(t - in_use - resident, 0.0)
    deflated, older = s.deflated_free[i], s.older_touched[i]
    if delta_kib > 0:
        capacity = (usable_kib - s.held[i]) - before
        free_before = _py_max(capacity - a - c, 0.0)
        from_free = _py_min(delta_kib, _py_max(free_before - min_free_kib, 0.0))
        from_cache = delta_kib - from_free
        if from_cache:  # _evict_cache_one
            hot = s.hot_cache[i]
            hot_lost = _py_min(_py_max(from_cache - (c - hot), 0.0), hot)
            s.cache[i] = c - from_cache
            s.hot_cache[i] = hot - hot_lost
            s.refault_debt[i] = s.refault_debt[i] + hot_lost
        amount = from_free  # take_in_order over (fresh, deflated, older)
        fresh_taken = _py_min(amount, _py_max(touched_free - older, 0.0))
        amount = amount - fresh_taken
        deflated_taken = _py_min(amount, deflated)
        amount = amount - deflated_taken
        older_taken = _py_min(amount, older)
        s.deflated_free[i] = deflated - deflated_taken
        s.older_touched[i] = older - older_taken
        s.pcp[i] = _py_max(s.pcp[i] - from_free, 0.0)
        taken_touched = from_cache + fresh_taken + older_taken
        t -= release_frac * taken_touched
        resident += (1.0 - release_frac) * taken_touched
    elif delta_kib < 0 and before > 0:
        back_resident = resident * _py_min(-delta_kib / before, 1.0)
        resident -= back_resident
        s.older_touched[i] = touched_free
        s.deflated_free[i] = deflated - delta_kib - back_resident
        s.pcp[i] = _py_min(s.pcp[i] - delta_kib, s.pcp_cap[i])
    s.resident_kib[i] = resident
    if delta_kib > 0:
        limit = (ram_kib - balloon_kib) + resident
        s.touched[i] = _py_min(_py_max(t, 0.0), limit)
    c = s.cache[i]
    free = usable_kib - s.balloon[i] - s.held[i] - s.anon[i] - c
    spare: float = _py_max(free - min_free_kib, 0.0) + _py_max(c - cache_min_kib, 0.0)
    return spare


def balloon_moved_one(
    fleet: Fleet, balloon: Array, held: Array, row: FixedRow, i: int, delta_kib: float, release_frac: float
) -> float:
    """Guest ``i``'s balloon (``balloon``, the driver's array) moved by ``delta_kib``:
    update it and account the move in the Fleet, in one compiled call; returns the
    guest's spare KiB after it."""
    spare_kib: float = _moved_one(
        moved_state(fleet, balloon, held),
        i,
        float(delta_kib),  # one compiled signature, whether the caller's count was an int
        float(release_frac),
        row.ram_kib,
        row.base_kib,
        row.usable_kib,
        row.min_free_kib,
        row.cache_min_kib,
    )
    return spare_kib


class RequestsRun(NamedTuple):
    """What ``requests_run`` did: ``requests`` whole 256-PFN requests, and the state the
    last of them left (the caller applies the rest: rings, lists, counters)."""

    requests: int
    now_s: float
    cpu_s: float
    spare_kib: float
    window_end_s: float  # the BALLOON_CHANGE rate limit's window after the run
    pending: bool  # a BALLOON_CHANGE value waits for the window's end
    flush_at_s: float  # when the run scheduled that wait's flush; NaN if it did not
    emitted: int  # how many entries of ``emitted_at`` hold requests that sent BALLOON_CHANGE


@jit
def _jumped(now: float, wait_s: float, horizon: float, next_due: float, sleep: bool) -> float:
    """Where the clock stands after a wait of ``wait_s`` from ``now`` taken on the spot,
    NaN where ``World.may_jump_to`` refuses it (strictly before ``next_due``, not past
    ``horizon``). A process's ``sleep`` always asks; a device push due at once does not,
    and leaves the clock where it is (``VirtioBalloon._complete``)."""
    at = now + wait_s
    if not sleep and not at > now:
        return now
    return at if at <= horizon and at < next_due else math.nan


@jit
def _requests_run(
    state: Any,
    managed_removed: Array,
    i: int,
    ram_kib: float,
    base_kib: float,
    usable_kib: float,
    min_free_kib: float,
    cache_min_kib: float,
    delta_kib: float,
    managed_step_kib: float,
    release_frac: float,
    max_requests: int,
    spare_kib: float,
    now: float,
    horizon: float,
    next_due: float,
    sleep_s: float,
    device_s: float,
    cpu_s: float,
    window_end_s: float,
    pending: bool,
    actual_at_s: Array,
    emitted_at: npt.NDArray[np.int64],
) -> tuple[int, float, float, float, float, bool, float, int]:
    """Up to ``max_requests`` whole requests moving the balloon by ``delta_kib`` each
    (> 0: inflate, < 0: deflate), each only if it runs to its end with nothing due on
    the World in between (``_jumped``). An inflate allocates (the driver's sleep of
    ``sleep_s``) and only if it found all its pages (``spare_kib`` >= ``delta_kib``),
    then the device's push comes ``device_s`` later; a deflate is pushed first, then
    the driver releases the pages (its sleep). The driver's sleep is its CPU.

    A request then does what the per-request path does, in its order: the driver's
    CPU, ``managed_removed`` moved by ``-managed_step_kib`` (a step of 0.0 is
    DEFLATE_ON_OOM: untouched), the Fleet's accounting (``_moved_one`` on ``state``,
    ``moved_state``'s tuple passed through), ``actual`` written at the request's end
    (``actual_at_s``), and QEMU's BALLOON_CHANGE rate limit sending it (``emitted_at``)
    or holding it and scheduling the window's flush, which then bounds the run like any
    queued event."""
    inflate = delta_kib > 0
    first_s, then_s = (sleep_s, device_s) if inflate else (device_s, sleep_s)
    flush_at = math.nan
    done = 0
    emitted = 0
    while done < max_requests and spare_kib >= delta_kib:
        mid = _jumped(now, first_s, horizon, next_due, inflate)
        if math.isnan(mid):
            break
        end = _jumped(mid, then_s, horizon, next_due, not inflate)
        if math.isnan(end):
            break
        cpu_s += sleep_s
        now = end
        if managed_step_kib:
            managed_removed[i] = managed_removed[i] - managed_step_kib
        spare_kib = _moved_one(
            state,
            i,
            delta_kib,
            release_frac,
            ram_kib,
            base_kib,
            usable_kib,
            min_free_kib,
            cache_min_kib,
        )
        actual_at_s[done] = now
        if not pending and now >= window_end_s:  # VirtioBalloon._balloon_change
            emitted_at[emitted] = done
            emitted += 1
            window_end_s = now + BALLOON_CHANGE_RATE_S
        else:
            if not pending:
                flush_at = now + _py_max(window_end_s - now, 0.0)
                next_due = _py_min(next_due, flush_at)
            pending = True
        done += 1
    return done, now, cpu_s, spare_kib, window_end_s, pending, flush_at, emitted


class RunClock(NamedTuple):
    """The World as a run of requests sees it (``World.jump_limits``), and the driver's
    side of the clock: its CPU total and each request's two durations."""

    now_s: float
    horizon_s: float
    next_due_s: float
    sleep_s: float  # the driver's own work on one request's pages: allocation or release
    device_s: float  # kick -> the device's push: notify latency plus the host's madvise
    cpu_s: float


def requests_run(
    fleet: Fleet,
    balloons: tuple[Array, Array, Array],
    row: FixedRow,
    i: int,
    delta_pages: int,
    managed: bool,
    release_frac: float,
    max_requests: int,
    spare_kib: float,
    clock: RunClock,
    rate_limit: tuple[float, bool],
) -> tuple[RequestsRun, Array, npt.NDArray[np.int64]]:
    """``_requests_run`` of requests of ``delta_pages`` (negative: a deflate) over guest
    ``i``'s arrays (``balloons``: the driver seam's balloon, held and managed-removed
    arrays); also returns when each request wrote ``actual`` and which requests sent
    BALLOON_CHANGE. ``spare_kib``: what the first inflate request finds (a deflate's
    is not read)."""
    actual_at_s = np.empty(max_requests)
    emitted_at = np.empty(max_requests, dtype=np.int64)
    delta_kib = float(delta_pages * BALLOON_PAGE_KIB)
    done = _requests_run(
        moved_state(fleet, *balloons[:2]),
        balloons[2],
        i,
        row.ram_kib,
        row.base_kib,
        row.usable_kib,
        row.min_free_kib,
        row.cache_min_kib,
        delta_kib,
        -delta_kib if managed else 0.0,
        float(release_frac),
        max_requests,
        spare_kib,
        *clock,
        *rate_limit,
        actual_at_s,
        emitted_at,
    )
    return RequestsRun(*done), actual_at_s, emitted_at
