"""``overcommitd trace info``: what a set of traces holds, per guest and overall, so a
user can judge them before trusting a replay: span, sample period, gaps, size, use
percentiles, the largest rises (what a policy must give back fast), which optional
columns are there, and what the loader did (its notes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from sim.memory.traces import GAP_HOLD_FACTOR, Trace

HOUR_S = 3600.0


@dataclass(frozen=True, slots=True)
class GuestInfo:
    name: str
    source: str
    samples: int
    span_s: float
    period_s: float
    gaps_held: int  # gaps over GAP_HOLD_FACTOR periods, the last sample held through
    gaps_cut: int
    size_kib: int
    use_p50_kib: int
    use_p95_kib: int
    use_max_kib: int
    rise_sample_kib: int  # largest rise from one sample to the next
    rise_hour_kib: int  # largest rise within any hour
    columns: tuple[str, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OverallInfo:
    guests: int
    samples: int
    span_s: float  # the longest guest's
    period_s: float  # median of the guests' periods
    gaps_held: int
    gaps_cut: int
    provisioned_kib: int
    use_p50_pct: float  # of each guest's size, pooled over every sample of every guest
    use_p95_pct: float
    use_max_pct: float
    rise_sample_kib: int
    rise_sample_guest: str
    rise_hour_kib: int
    rise_hour_guest: str
    guests_with_notes: int


@dataclass(frozen=True, slots=True)
class TraceInfo:
    guests: tuple[GuestInfo, ...]
    overall: OverallInfo

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def describe(traces: Sequence[Trace]) -> TraceInfo:
    guests = tuple(guest_info(t) for t in traces)
    use_pct = np.concatenate([t.demand_kib / t.size_kib * 100 for t in traces])
    by_sample = max(guests, key=lambda g: g.rise_sample_kib)
    by_hour = max(guests, key=lambda g: g.rise_hour_kib)
    overall = OverallInfo(
        guests=len(guests),
        samples=sum(g.samples for g in guests),
        span_s=max(g.span_s for g in guests),
        period_s=float(np.median([g.period_s for g in guests])),
        gaps_held=sum(g.gaps_held for g in guests),
        gaps_cut=sum(g.gaps_cut for g in guests),
        provisioned_kib=sum(g.size_kib for g in guests),
        use_p50_pct=float(np.percentile(use_pct, 50)),
        use_p95_pct=float(np.percentile(use_pct, 95)),
        use_max_pct=float(use_pct.max()),
        rise_sample_kib=by_sample.rise_sample_kib,
        rise_sample_guest=by_sample.name,
        rise_hour_kib=by_hour.rise_hour_kib,
        rise_hour_guest=by_hour.name,
        guests_with_notes=sum(1 for g in guests if g.notes),
    )
    return TraceInfo(guests, overall)


def guest_info(t: Trace) -> GuestInfo:
    dt = np.diff(t.t_s)
    period = float(np.median(dt)) if len(dt) else 0.0
    d = t.demand_kib
    columns = t.columns or tuple(
        name
        for name, arr in (
            ("disk_read_kib_s", t.disk_read_kib_s),
            ("disk_write_kib_s", t.disk_write_kib_s),
            ("cache_kib", t.cache_kib),
        )
        if arr is not None
    )
    return GuestInfo(
        name=t.name,
        source=t.source,
        samples=len(d),
        span_s=t.duration_s,
        period_s=period,
        gaps_held=int((dt > GAP_HOLD_FACTOR * period).sum()) if len(dt) else 0,
        gaps_cut=t.gaps_cut,
        size_kib=t.size_kib,
        use_p50_kib=int(np.percentile(d, 50)),
        use_p95_kib=int(np.percentile(d, 95)),
        use_max_kib=int(d.max()),
        rise_sample_kib=max(int(np.diff(d).max()), 0) if len(d) > 1 else 0,
        rise_hour_kib=largest_rise(t.t_s, d, HOUR_S),
        columns=columns,
        notes=t.notes,
    )


def largest_rise(t_s: npt.NDArray[np.float64], v: npt.NDArray[np.int64], window_s: float) -> int:
    """max over i <= j with t_j - t_i <= window_s of v[j] - v[i] (0 if it never rises).

    For each i the largest later value within the window is a range-maximum query,
    answered from a sparse table of maxima over power-of-two spans: O(n log n).
    """
    n = len(v)
    if n < 2:
        return 0
    end = np.searchsorted(t_s, t_s + window_s, side="right")  # exclusive end of each window
    table = [v]
    while (1 << len(table)) <= n:
        prev, half = table[-1], 1 << (len(table) - 1)
        table.append(np.maximum(prev[:-half], prev[half:]))
    length = end - np.arange(n)
    level = np.floor(np.log2(length)).astype(int)
    best = np.empty(n, dtype=np.int64)
    for k in np.unique(level):
        idx = np.flatnonzero(level == k)
        left = table[k][idx]
        right = table[k][end[idx] - (1 << k)]
        best[idx] = np.maximum(left, right)
    return max(int((best - v).max()), 0)


def format_info(info: TraceInfo) -> str:
    """A table per guest, the overall figures, then the loader's notes per guest."""
    head = (
        f"{'guest':<28} {'source':<11} {'samples':>7} {'span':>8} {'period':>7} {'gaps':>9} {'size':>9} "
        f"{'p50':>9} {'p95':>9} {'max':>9} {'rise/smp':>9} {'rise/h':>9}  columns"
    )
    lines = [head]
    for g in info.guests:
        lines.append(
            f"{g.name[-28:]:<28} {g.source:<11} {g.samples:>7} {_dur(g.span_s):>8} {g.period_s:>6.0f}s "
            f"{f'{g.gaps_held}+{g.gaps_cut}cut':>9} {_mib(g.size_kib):>9} {_mib(g.use_p50_kib):>9} "
            f"{_mib(g.use_p95_kib):>9} {_mib(g.use_max_kib):>9} {_mib(g.rise_sample_kib):>9} "
            f"{_mib(g.rise_hour_kib):>9}  {_columns(g.columns)}"
        )
    o = info.overall
    lines += [
        "",
        (
            f"overall: {o.guests} guests, {o.samples} samples, longest span {_dur(o.span_s)}, "
            f"median period {o.period_s:.0f} s, gaps {o.gaps_held} held + {o.gaps_cut} cut"
        ),
        (
            f"  provisioned {_mib(o.provisioned_kib)}; use (% of each guest's size) "
            f"p50 {o.use_p50_pct:.1f} %, p95 {o.use_p95_pct:.1f} %, max {o.use_max_pct:.1f} %"
        ),
        (
            f"  largest rise in one sample {_mib(o.rise_sample_kib)} ({o.rise_sample_guest}), "
            f"within an hour {_mib(o.rise_hour_kib)} ({o.rise_hour_guest})"
        ),
        "  sizes in MiB; gaps: held (over 2 periods) + cut (over the max gap, clock stitched)",
    ]
    noted = [g for g in info.guests if g.notes]
    if noted:
        lines += ["", f"notes from loading ({len(noted)} guests):"]
        lines += [f"  {g.name}: {n}" for g in noted for n in g.notes]
    return "\n".join(lines)


def _columns(names: tuple[str, ...]) -> str:
    """Optional columns, the raw balloon stats counted rather than listed (``--json`` lists them)."""
    stats = [n for n in names if n.startswith("stat_")]
    shown = [n for n in names if not n.startswith("stat_")] + ([f"stat_*({len(stats)})"] if stats else [])
    return ",".join(shown) or "-"


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f}M"


def _dur(s: float) -> str:
    return f"{s / 86400:.1f}d" if s >= 86400 else f"{s / 3600:.1f}h"
