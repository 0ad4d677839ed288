"""Which trace drives which simulated guest, and each guest's demand on the replay's
tick grid.

* Guest ``i`` replays trace ``i mod n``; a trace used again starts at a different
  point (an offset of whole days plus a prime number of seconds), so copies of one
  trace are not in lockstep.
* The replay may start ``start_s`` into every trace (tune on one stretch of the traces,
  judge on another).
* A trace shorter than the replay repeats from its start.
* File I/O is the trace's disk reads plus writes (both fill the page cache); a trace
  without those columns does no file I/O (nothing is invented; ``io_columns`` says so).
* Demand is capped at what fits in the guest with an empty balloon (its RAM less the
  kernel, the low watermark and the minimum page cache). A workload the guest could not
  hold even unballooned is not a policy's fault; with the cap, every swap-in and OOM
  kill in a replay is caused by ballooning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sim import compiled
from sim.memory import fleet_kernel
from sim.memory.guest import GuestModelParams, reserve_for
from sim.memory.kernel import GuestKernel
from sim.memory.traces import Trace

DAY_S = 86400.0
REUSE_SHIFT_S = 7919.0


@dataclass(frozen=True, slots=True, eq=False)
class TraceColumns:
    """Every distinct trace of a workload back to back, for the compiled lookups
    (``fleet_kernel.trace_block``/``trace_landings``): guest ``g``'s samples are
    ``first[g]`` on, ``count[g]`` of them. Demand as float64 and file I/O summed as
    ``Workload.block``'s numpy path converts and sums them."""

    first: npt.NDArray[np.int64]
    count: npt.NDArray[np.int64]
    durations_s: npt.NDArray[np.float64]
    t_s: npt.NDArray[np.float64]
    demand_kib: npt.NDArray[np.float64]
    io_kib_s: npt.NDArray[np.float64]

    @classmethod
    def of(cls, traces: tuple[Trace, ...]) -> TraceColumns:
        distinct = list({id(t): t for t in traces}.values())
        where = {id(t): k for k, t in enumerate(distinct)}
        lengths = np.array([len(t.t_s) for t in distinct], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        k = np.array([where[id(t)] for t in traces], dtype=np.int64)
        return cls(
            first=starts[k],
            count=lengths[k],
            durations_s=np.array([t.duration_s for t in traces], dtype=np.float64),
            t_s=np.concatenate([t.t_s.astype(np.float64) for t in distinct]),
            demand_kib=np.concatenate([t.demand_kib.astype(np.float64) for t in distinct]),
            io_kib_s=np.concatenate([_io_kib_s(t) for t in distinct]),
        )


def _io_kib_s(trace: Trace) -> npt.NDArray[np.float64]:
    """The trace's reads plus writes, summed in ``Workload.block``'s order (from 0)."""
    io = np.zeros(len(trace.t_s))
    for rate in (trace.disk_read_kib_s, trace.disk_write_kib_s):
        if rate is not None:
            io += rate
    return io


@dataclass(frozen=True, slots=True, eq=False)
class Workload:
    """Demand and file-read rate per guest over the tick grid, computed in blocks."""

    traces: tuple[Trace, ...]
    offsets_s: npt.NDArray[np.float64]
    demand_cap_kib: npt.NDArray[np.float64]
    columns: TraceColumns

    @classmethod
    def assign(
        cls,
        traces: list[Trace],
        n_guests: int,
        params: GuestModelParams,
        start_s: float = 0.0,
        guest_kernel: GuestKernel | None = None,
    ) -> Workload:
        if not traces:
            raise ValueError("no traces to replay")
        chosen = tuple(traces[i % len(traces)] for i in range(n_guests))
        offsets = np.array(
            [(start_s + (i // len(traces)) * (DAY_S + REUSE_SHIFT_S)) % t.duration_s for i, t in enumerate(chosen)]
        )
        ram = np.array([t.size_kib for t in chosen], dtype=np.float64)
        reserved = params.reserved_fixed_kib + ram * params.reserved_pct / 100
        kernel = params.kernel_fixed_kib + ram * params.kernel_pct / 100
        headroom = reserve_for(params, ram, guest_kernel).totalreserve_kib + ram * params.cache_min_pct / 100
        return cls(chosen, offsets, np.maximum(ram - reserved - kernel - headroom, 0.0), TraceColumns.of(chosen))

    @property
    def io_columns(self) -> str:
        """The traces' disk I/O columns: one kind for all, else "mixed"."""
        kinds = {io_columns(t) for t in self.traces}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def block(self, times_s: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Demand (KiB) and file I/O rate (reads + writes, KiB/s) at each time: arrays of
        shape (len(times_s), n_guests). Filled guest by guest into rows, then transposed
        once: writing columns of a (times, guests) array strides across memory, which
        cost 10x the lookups at 500 guests (issue 13). Compiled, both are written in
        (times x guests) layout at once (``fleet_kernel.trace_block``)."""
        if compiled.AVAILABLE and times_s.dtype == np.float64:
            c = self.columns
            out = np.empty((len(times_s), len(self.traces))), np.empty((len(times_s), len(self.traces)))
            fleet_kernel.trace_block(
                times_s,
                self.offsets_s,
                c.durations_s,
                c.first,
                c.count,
                c.t_s,
                c.demand_kib,
                c.io_kib_s,
                self.demand_cap_kib,
                *out,
            )
            return out
        demand = np.empty((len(self.traces), len(times_s)))
        reads = np.zeros_like(demand)
        for g, trace in enumerate(self.traces):
            idx = self.rows(g, times_s)
            demand[g] = trace.demand_kib[idx]
            for io in (trace.disk_read_kib_s, trace.disk_write_kib_s):
                if io is not None:
                    reads[g] += io[idx]
        capped = np.minimum(demand, self.demand_cap_kib[:, None])
        return np.ascontiguousarray(capped.T), np.ascontiguousarray(reads.T)

    def rows(self, g: int, times_s: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """The sample of guest ``g``'s trace in force at each time (the trace repeats)."""
        trace = self.traces[g]
        t = (times_s + self.offsets_s[g]) % trace.duration_s
        return np.asarray(np.searchsorted(trace.t_s, t, side="right") - 1, dtype=np.int64)

    def landings(
        self, since_s: float, times_s: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """``peaks`` and ``block``'s I/O rates at the same increasing times (one column),
        as the replay lands them: compiled, from one lookup per time and guest."""
        if compiled.AVAILABLE and times_s.dtype == np.float64 and times_s.ndim == 1:
            return self._landings_compiled(since_s, times_s, io_rows=len(times_s))
        return self.peaks(since_s, times_s), self.block(times_s)[1]

    def _landings_compiled(
        self, since_s: float, times_s: npt.NDArray[np.float64], io_rows: int
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """``fleet_kernel.trace_landings``: the peaks at every time, the I/O rates at the
        first ``io_rows`` (all of them, or none)."""
        c, guests = self.columns, len(self.traces)
        peaks, io = np.empty((len(times_s), guests)), np.empty((io_rows, guests))
        fleet_kernel.trace_landings(
            float(since_s),
            times_s,
            self.offsets_s,
            c.durations_s,
            c.first,
            c.count,
            c.t_s,
            c.demand_kib,
            self.demand_cap_kib,
            c.io_kib_s,
            peaks,
            io,
        )
        return peaks, io

    def peaks(self, since_s: float, times_s: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Demand (KiB) each guest's trace reached since the instant before: the peak of
        its samples within (``since_s``, ``times_s[0]``], then (``times_s[0]``,
        ``times_s[1]``], ... (the times increasing), or the demand in force where none
        falls within; shape (len(times_s), n_guests). The replay lands demand at a
        few instants a tick (``sim.evaluation.replay.land_demand``): a trace finer than
        that (a real guest's 1 s schedule) still reaches its guest with every peak, which
        a spike shorter than the stats period would otherwise skip (issue 16: the real
        guest was OOM-killed by a 2.4 s spike the replay never showed its guest). Across
        a trace's wrap to its start, only the demand in force at each end counts. Times of
        shape (n, n_guests) are each guest's own."""
        if compiled.AVAILABLE and times_s.dtype == np.float64 and times_s.ndim == 1:
            return self._landings_compiled(since_s, times_s, io_rows=0)[0]
        out = np.empty((len(times_s), len(self.traces)))
        for g, trace in enumerate(self.traces):
            edges = np.concatenate([[since_s], times_s if times_s.ndim == 1 else times_s[:, g]])
            t = (edges + self.offsets_s[g]) % trace.duration_s
            idx = np.maximum(np.searchsorted(trace.t_s, t, side="right") - 1, 0)
            lo, hi = idx[:-1], idx[1:]  # the samples in force at a window's two ends
            # The one in force at its start was landed there: the window's own are the
            # samples after it, up to the one in force at its end (none new: that one).
            first = np.where(hi > lo, lo + 1, hi)
            demand = np.append(trace.demand_kib.astype(np.float64), -np.inf)  # reduceat's end sentinel
            pairs = np.stack([first, hi + 1], axis=1).ravel()
            out[:, g] = np.maximum.reduceat(demand, pairs)[::2]
        return np.minimum(out, self.demand_cap_kib)


def io_columns(trace: Trace) -> str:
    """Which disk I/O columns a trace has: "read+write", "read", "write" or "none"."""
    cols = [n for n, v in (("read", trace.disk_read_kib_s), ("write", trace.disk_write_kib_s)) if v is not None]
    return "+".join(cols) or "none"
