"""The simulator's one door to numba: whether compiled kernels run, how a kernel is
compiled, and numpy's NaN rules for two scalars.

Below every layer of ``sim/`` (the virtio model, the memory model and evaluation all
compile loops), so none has to import another's kernels for it. numba is in the ``sim``
extra only; without it ``AVAILABLE`` is False, ``jit`` hands back the Python function and
every part keeps to its numpy reference. ``OVERCOMMITD_SIM_COMPILED=0`` turns the
compiled paths off. A built-in policy offers its own loops (``policies.api.CompiledTwin``);
``compiled_policy`` is where the simulator takes them up.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any, TypeVar

from policies.api import CompiledTwin, Policy

njit: Any
try:
    from numba import njit
except ImportError:  # the daemon's install has no numba: every part runs its numpy path
    njit = None

OFF = os.environ.get("OVERCOMMITD_SIM_COMPILED", "1") == "0"
AVAILABLE = njit is not None and not OFF

S = TypeVar("S")


@functools.cache  # one dispatcher a function: a policy's twin asked for per replay compiles once
def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled (cached on disk beside its module), or ``fn`` without numba."""
    if njit is None:
        return fn
    compiled: Callable[..., Any] = njit(cache=True)(fn)
    return compiled


@jit
def nan_max(a: float, b: float) -> float:
    """``np.maximum`` of two scalars: NaN if either is."""
    return a if (a >= b or math.isnan(a)) else b


@jit
def nan_min(a: float, b: float) -> float:
    """``np.minimum`` of two scalars: NaN if either is."""
    return a if (a <= b or math.isnan(a)) else b


def compiled_policy(policy: Policy[S]) -> Policy[S]:
    """``policy`` running its compiled twin where it offers one and numba is here; the
    replay's only special case, and it names no policy."""
    if AVAILABLE and isinstance(policy, CompiledTwin):
        twin: Policy[S] = policy.compiled(jit)
        return twin
    return policy


__all__ = ["AVAILABLE", "OFF", "compiled_policy", "jit", "nan_max", "nan_min"]
