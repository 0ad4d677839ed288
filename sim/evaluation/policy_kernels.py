"""Built-in policies' column arithmetic compiled, for the replay (the guard's are in
``sim.evaluation.guard_kernels``, for the same reason: at 50 guests a policy's ~25 numpy
calls on 50-element arrays are dispatch, not arithmetic).

Each loop follows its numpy reference's operands and order (``policies.headroom``'s
``numpy_needs``, ``numpy_take``), with ``fleet_kernel._min``/``_max`` for numpy's NaN
rules, so the columns are identical, not merely close (``tests/test_policy_kernels.py``).
``compiled(policy)`` hands the replay a policy that runs them; the daemon never imports
this module. Without numba, or with ``OVERCOMMITD_SIM_COMPILED=0``, it is the policy as given.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np

from policies.api import Policy
from policies.headroom import HeadroomKernels, HeadroomPolicy
from sim.memory import fleet_kernel
from sim.memory.fleet_kernel import _jit, _max, _min

S = TypeVar("S")


@_jit
def headroom_needs(
    actual_kib: Any, available_kib: Any, present: Any, max_kib: Any, buffer_pct: float, min_free_kib: int
) -> Any:
    """``numpy_needs``, row by row."""
    n = len(actual_kib)
    need = np.empty(n)
    for i in range(n):
        actual = float(actual_kib[i])
        avail = available_kib[i] if present[i] else math.nan
        used = _max(0.0, actual - _min(avail, actual))
        buffer_kib = _max(np.trunc(used * buffer_pct / 100), float(min_free_kib))
        need[i] = _min(used + buffer_kib, float(max_kib[i]))
    return need


@_jit
def headroom_take(amount_kib: int, actual_kib: Any, need_kib: Any, weight: Any, targets_kib: Any) -> Any:
    """``numpy_take``, row by row; the share total summed in guest order, as its cumsum."""
    n = len(actual_kib)
    slack = np.zeros(n)
    shares = np.zeros(n)
    total_share = 0.0  # 0.0 + the first share is that share: cumsum's first element
    has_any = False
    for i in range(n):
        if actual_kib[i] >= need_kib[i]:  # NaN need: no slack
            slack[i] = actual_kib[i] - need_kib[i]
        if slack[i] > 0:
            shares[i] = slack[i] / _max(weight[i], 1e-9)
            total_share += shares[i]
            has_any = True
    if not has_any:
        total_share = 1.0
    out = targets_kib.copy()
    for i in range(n):
        if slack[i] > 0:
            taken = _min(slack[i], np.trunc(amount_kib * shares[i] / total_share))
            out[i] = actual_kib[i] - taken
    return out


HEADROOM = HeadroomKernels("compiled", headroom_needs, headroom_take)


def compiled(policy: Policy[S]) -> Policy[S]:
    """``policy`` running its compiled twin where it has one and numba is here."""
    if fleet_kernel.AVAILABLE and isinstance(policy, HeadroomPolicy):
        return policy.with_kernels(HEADROOM)
    return policy


__all__ = ["HEADROOM", "compiled", "headroom_needs", "headroom_take"]
