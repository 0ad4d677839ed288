"""One protocol-level balloon request's Fleet accounting as one compiled call.

The protocol model moves a balloon 256 PFNs at a time, and after each request the
Fleet accounts the move for that guest (``Fleet.balloon_moved_one``: which free layers
and how much page cache the pages came from, what the host released). In Python that is
~25 numpy element reads and writes per request, the largest single cost of a 1 GiB
inflate (issue 13 profile: about a quarter of it). This module does the same arithmetic
in a function numba compiles, one call per request.

``Fleet.balloon_moved_one`` stays the reference (and the path without numba, or with
``OVERCOMMITD_SIM_COMPILED=0``); ``tests/test_protocol_kernel.py`` holds the two to
bit-identical arrays on arbitrary states. Bit-identity as in ``sim.memory.fleet_kernel``:
every expression keeps the reference's operands and their order, and ``_py_min`` /
``_py_max`` are Python's ``min``/``max`` of two floats (the first argument wins a tie or
a NaN comparison), which the reference uses.
"""

from __future__ import annotations

from sim.memory.fleet_kernel import Array, _jit
from sim.memory.guest import FixedRow, Fleet


@_jit
def _py_min(a: float, b: float) -> float:
    """Python's ``min(a, b)``: ``b`` only if it is strictly smaller."""
    return b if b < a else a  # noqa: FURB136 - spelt out: the tie and NaN rule is the point


@_jit
def _py_max(a: float, b: float) -> float:
    """Python's ``max(a, b)``: ``b`` only if it is strictly larger."""
    return b if b > a else a  # noqa: FURB136 - spelt out: the tie and NaN rule is the point


@_jit
def _moved_one(
    balloon: Array,
    held: Array,
    anon: Array,
    cache: Array,
    hot_cache: Array,
    refault_debt: Array,
    touched: Array,
    resident_kib: Array,
    deflated_free: Array,
    older_touched: Array,
    pcp: Array,
    pcp_cap: Array,
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
    (``sim.memory.balloon_fleet.spare_kib`` with reclaim, the next request's limit)."""
    balloon_kib = balloon[i] + delta_kib
    balloon[i] = balloon_kib
    before = balloon_kib - delta_kib
    a, c, t = anon[i], cache[i], touched[i]
    resident = resident_kib[i]
    in_use = base_kib + a + c
    touched_free = _py_max(t - in_use - resident, 0.0)
    deflated, older = deflated_free[i], older_touched[i]
    if delta_kib > 0:
        capacity = (usable_kib - held[i]) - before
        free_before = _py_max(capacity - a - c, 0.0)
        from_free = _py_min(delta_kib, _py_max(free_before - min_free_kib, 0.0))
        from_cache = delta_kib - from_free
        if from_cache:  # _evict_cache_one
            hot = hot_cache[i]
            hot_lost = _py_min(_py_max(from_cache - (c - hot), 0.0), hot)
            cache[i] = c - from_cache
            hot_cache[i] = hot - hot_lost
            refault_debt[i] = refault_debt[i] + hot_lost
        amount = from_free  # take_in_order over (fresh, deflated, older)
        fresh_taken = _py_min(amount, _py_max(touched_free - older, 0.0))
        amount = amount - fresh_taken
        deflated_taken = _py_min(amount, deflated)
        amount = amount - deflated_taken
        older_taken = _py_min(amount, older)
        deflated_free[i] = deflated - deflated_taken
        older_touched[i] = older - older_taken
        pcp[i] = _py_max(pcp[i] - from_free, 0.0)
        taken_touched = from_cache + fresh_taken + older_taken
        t -= release_frac * taken_touched
        resident += (1.0 - release_frac) * taken_touched
    elif delta_kib < 0 and before > 0:
        back_resident = resident * _py_min(-delta_kib / before, 1.0)
        resident -= back_resident
        older_touched[i] = touched_free
        deflated_free[i] = deflated - delta_kib - back_resident
        pcp[i] = _py_min(pcp[i] - delta_kib, pcp_cap[i])
    resident_kib[i] = resident
    if delta_kib > 0:
        limit = (ram_kib - balloon_kib) + resident
        touched[i] = _py_min(_py_max(t, 0.0), limit)
    c = cache[i]
    free = usable_kib - balloon[i] - held[i] - anon[i] - c
    spare: float = _py_max(free - min_free_kib, 0.0) + _py_max(c - cache_min_kib, 0.0)
    return spare


def balloon_moved_one(
    fleet: Fleet, balloon: Array, held: Array, row: FixedRow, i: int, delta_kib: float, release_frac: float
) -> float:
    """Guest ``i``'s balloon (``balloon``, the driver's array) moved by ``delta_kib``:
    update it and account the move in the Fleet, in one compiled call; returns the
    guest's spare KiB after it. The arrays are fetched per call: the Fleet may have
    replaced them since."""
    f = fleet
    spare_kib: float = _moved_one(
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
