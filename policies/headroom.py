"""``headroom``: keep the host's memory use at a target, taking from the guests with the
most slack and always giving back to a guest that runs short.

In the spirit of Proxmox VE's auto-ballooning (PVE/AutoBalloon.pm: host target 80 % of
MemTotal used, shares-weighted split), with the two fixes its users asked for: growth is
driven by the guest's own need, not only by host headroom (home-assistant/
operating-system#4805), and a guest's use is MemTotal - MemAvailable, so page cache is
reclaimable, not "used" (MOM and CloudVAMP#6 count cache as used and ratchet to max).

Each step, for each guest with stats:

* ``used = actual - MemAvailable`` and ``need = used + max(buffer_pct % of used,
  min_free_kib)``, at most the guest's maximum (Hyper-V's 20 % memory buffer);
* a guest below its need is given its need, whatever the host's state (giving memory
  back is the safe direction; the guard paces it);
* when the host uses more than ``host_target_used_pct`` of MemTotal, the excess plus
  what the short guests are given is taken from the guests above their need, in
  proportion to ``slack / weight``, never below need;
* otherwise guests above their need are held where they are.

Host use counts the ZFS ARC above its minimum as free (``count_arc``, on by default): the
kernel's MemAvailable leaves the ARC out, and squeezing guests for a cache the host would
drop on its own is the most common complaint about Proxmox's ballooning on ZFS.

Guests without stats are left out (held): with nothing to go on, hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from overcommitd.model import GuestSnapshot, HostSnapshot, Kib
from overcommitd.table import BoolArray, FloatArray, GuestTable, IntArray
from policies.api import BatchResult, PolicyResult, result_of
from policies.signals import used_kib_arrays

# The policy's column arithmetic as pure functions (``HeadroomKernels``): the daemon runs
# the numpy ones, the replay the row loops compiled (``compiled``; at 50 guests the ~25
# numpy calls here cost more than their arithmetic), held identical by
# ``tests/test_policy_kernels.py``.


def numpy_needs(
    actual_kib: IntArray,
    available_kib: FloatArray,
    present: BoolArray,
    max_kib: IntArray,
    buffer_pct: float,
    min_free_kib: int,
) -> FloatArray:
    """Each guest's use plus its buffer, at most its maximum; NaN without stats."""
    used = used_kib_arrays(actual_kib, available_kib, present)
    buffer_kib = np.maximum(np.trunc(used * buffer_pct / 100), min_free_kib)
    return np.minimum(used + buffer_kib, max_kib)


def numpy_take(
    amount_kib: int, actual_kib: IntArray, need_kib: FloatArray, weight: FloatArray, targets_kib: FloatArray
) -> FloatArray:
    """``targets_kib`` with ``amount_kib`` taken from the guests above their need, in
    proportion to slack / weight, never below need."""
    slack_kib = np.where(actual_kib >= need_kib, actual_kib - need_kib, 0.0)  # NaN need: no slack
    has = slack_kib > 0
    shares = np.where(has, slack_kib / np.maximum(weight, 1e-9), 0.0)
    # Summed in guest order (cumsum), as a running total would: numpy's pairwise sum
    # may differ in the last bit, and with it a target by 1 KiB.
    total_share = float(np.cumsum(shares[has])[-1]) if has.any() else 1.0
    taken = np.minimum(slack_kib, np.trunc(amount_kib * shares / total_share))
    return np.where(has, actual_kib - taken, targets_kib)


# The row loops: each follows its numpy function's operands and order, with scalar
# ``np.minimum``/``np.maximum`` for numpy's NaN rules, so a compiler that keeps IEEE
# order (numba without fast-math) gives the same columns, not merely close ones.


def rows_needs(
    actual_kib: IntArray,
    available_kib: FloatArray,
    present: BoolArray,
    max_kib: IntArray,
    buffer_pct: float,
    min_free_kib: int,
) -> FloatArray:
    """``numpy_needs``, row by row."""
    n = len(actual_kib)
    need = np.empty(n)
    for i in range(n):
        actual = float(actual_kib[i])
        avail = available_kib[i] if present[i] else math.nan
        used = np.maximum(0.0, actual - np.minimum(avail, actual))
        buffer_kib = np.maximum(np.trunc(used * buffer_pct / 100), float(min_free_kib))
        need[i] = np.minimum(used + buffer_kib, float(max_kib[i]))
    return need


def rows_take(
    amount_kib: int, actual_kib: IntArray, need_kib: FloatArray, weight: FloatArray, targets_kib: FloatArray
) -> FloatArray:
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
            shares[i] = slack[i] / np.maximum(weight[i], 1e-9)
            total_share += shares[i]
            has_any = True
    if not has_any:
        total_share = 1.0
    out = targets_kib.copy()
    for i in range(n):
        if slack[i] > 0:
            taken = np.minimum(slack[i], np.trunc(amount_kib * shares[i] / total_share))
            out[i] = actual_kib[i] - taken
    return out


@dataclass(frozen=True, slots=True)
class HeadroomKernels:
    """One implementation of headroom's two column functions (``numpy_needs``, ``numpy_take``)."""

    name: str
    needs: Callable[[IntArray, FloatArray, BoolArray, IntArray, float, int], FloatArray]
    take: Callable[[int, IntArray, FloatArray, FloatArray, FloatArray], FloatArray]


NUMPY = HeadroomKernels("numpy", numpy_needs, numpy_take)


class HeadroomParams(BaseModel):
    """Knobs of the ``headroom`` policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    host_target_used_pct: float = Field(80.0, gt=0, le=100, description="host MemTotal - MemAvailable to aim for")
    buffer_pct: float = Field(20.0, ge=0, le=1000, description="free memory each guest keeps, % of its use")
    min_free_kib: Kib = Field(256 * 1024, ge=0, description="free memory each guest keeps at least")
    count_arc: bool = Field(True, description="count the ZFS ARC above c_min as available host memory")


class HeadroomPolicy:
    """Host-headroom policy; stateless. Decides over columns (``decide_batch``);
    ``decide`` is the same on a table of the snapshots."""

    name = "headroom"
    Params = HeadroomParams

    def __init__(self, params: HeadroomParams | None = None, *, kernels: HeadroomKernels = NUMPY) -> None:
        self.params = params or HeadroomParams()
        self.kernels = kernels

    def with_kernels(self, kernels: HeadroomKernels) -> HeadroomPolicy:
        """The same policy with its column arithmetic run by ``kernels``."""
        return HeadroomPolicy(self.params, kernels=kernels)

    def compiled(self, jit: Callable[[Callable[..., Any]], Callable[..., Any]]) -> HeadroomPolicy:
        """``policies.api.CompiledTwin``: the row loops compiled by ``jit``."""
        return self.with_kernels(HeadroomKernels("compiled", jit(rows_needs), jit(rows_take)))

    def initial_state(self) -> None:
        return None

    def needs_kib(self, guests: GuestTable) -> FloatArray:
        """Memory each guest should have: its use plus a buffer; NaN without stats."""
        s, p = guests.stats, self.params
        return self.kernels.needs(
            guests.actual_kib, s.available_kib(), s.present, guests.max_kib, float(p.buffer_pct), int(p.min_free_kib)
        )

    def need_kib(self, guest: GuestSnapshot) -> int | None:
        """``needs_kib`` of one guest; None without stats."""
        need = float(self.needs_kib(GuestTable.of([guest]))[0])
        return None if np.isnan(need) else int(need)

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: None) -> PolicyResult[None]:
        table = GuestTable.of(guests)
        return result_of(table, self.decide_batch(host, table, state))

    def decide_batch(self, host: HostSnapshot, guests: GuestTable, state: None) -> BatchResult[None]:
        target_used_kib = int(host.mem_total_kib * self.params.host_target_used_pct / 100)
        excess_kib = host.used_kib_counting_arc(self.params.count_arc) - target_used_kib
        need = self.needs_kib(guests)
        actual = guests.actual_kib
        short = actual < need  # a NaN need (no stats) compares false: neither short ...
        comfortable = actual >= need  # ... nor comfortable
        targets = np.where(short, need, np.nan)
        excess_kib += int(np.where(short, need - actual, 0.0).sum())
        if excess_kib > 0 and comfortable.any():
            targets = self.kernels.take(excess_kib, actual, need, guests.weight, targets)
        return BatchResult(targets, None)
