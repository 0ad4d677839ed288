"""``BalloonDevice.poll_stats`` as one compiled loop over guests.

At 50 guests in step, the numpy reference's masked loop (``_poll_reference``) cost more
than the Fleet's whole compiled interval (issue 13 profile): dispatch, not arithmetic.
``tests/test_poll_kernel.py`` holds the two to identical stamps and stats.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sim.compiled import jit


@jit
def poll_stats(
    now_s: float, work_s: float, period_s: Any, next_arrival_s: Any, last_update_s: Any, sample: Any, stats: Any
) -> None:
    """``BalloonDevice.poll_stats`` (its numpy reference) guest by guest: a guest with a
    sample due before ``now_s`` takes ``sample``'s column into ``stats`` and is stamped
    with each arrival's whole second, its next arrival a ``period + work_s`` later each
    time, summed in the reference's order. At 50 guests in step the reference's masked
    loop cost more than the Fleet's whole compiled interval (issue 13 profile)."""
    n = len(next_arrival_s)
    due = np.zeros(n, dtype=np.bool_)
    for g in range(n):
        arrival = next_arrival_s[g]
        due[g] = arrival < now_s
        while arrival < now_s:
            last_update_s[g] = np.floor(arrival)
            arrival = arrival + period_s[g] + work_s
        next_arrival_s[g] = arrival
    for row in range(stats.shape[0]):  # a stat at a time: the block's rows are contiguous
        for g in range(n):
            if due[g]:
                stats[row, g] = sample[row, g]
