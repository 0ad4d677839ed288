"""Trace loading speed: the bundled traces by their native loaders and converted to
overcommitd's format, and a synthetic recording the size of a real one.

    .venv/bin/python benchmarks/bench_traces.py [--guests 200] [--hours 24] [--interval-s 10]

Prints seconds per load (best of ``--repeat``), rows per second and bytes on disk. The
synthetic recording has every column ``overcommitd record`` writes, in hourly gzipped
files, so it also shows what a day of a host costs to load in a replay.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from overcommitd import traceformat as tf
from sim.memory import traces
from sim.memory.trace_convert import convert, write
from sim.memory.trace_loader import load_all


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def synthetic_recording(out: Path, guests: int, hours: int, interval_s: float) -> int:
    """Hourly ``guests-*.csv.gz`` files of random-walk guests; returns the rows written."""
    rng = np.random.default_rng(0)
    per_hour = int(3600 // interval_s)
    size = rng.choice([2, 4, 8, 16], guests) * 1024 * 1024
    level = size * 0.4
    rows = 0
    for h in range(hours):
        t = 1.7e9 + h * 3600 + np.arange(per_hour) * interval_s
        steps = rng.normal(0, 0.002, (per_hour, guests)).cumsum(axis=0) * size
        used = np.clip(level + steps, 0, size).astype(np.int64)
        level = used[-1]
        cols: dict[str, object] = {
            tf.TIME_S: np.repeat(t, guests),
            tf.GUEST: np.tile([f"guest-{g:04d}" for g in range(guests)], per_hour),
            tf.PROVISIONED_KIB: np.tile(size, per_hour),
            tf.USED_KIB: used.ravel(),
        }
        for name in tf.OPTIONAL_COLUMNS:
            cols[name] = rng.integers(0, 1 << 20, per_hour * guests)
        write(pa.table(cols), out / f"guests-{h:04d}.csv.gz")
        rows += per_hour * guests
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--guests", type=int, default=200)
    p.add_argument("--hours", type=int, default=24)
    p.add_argument("--interval-s", type=float, default=10.0)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    files = traces.bundled()
    native_s = best_of(args.repeat, lambda: [traces.load(f) for f in files])
    rows = sum(len(traces.load(f).t_s) for f in files)
    print(
        f"bundled, native loaders:   {len(files)} files, {rows} rows: {native_s:.2f} s ({rows / native_s:,.0f} rows/s)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for parquet in (False, True):
            out = Path(tmp) / ("pq" if parquet else "csv")
            for fmt, sub in (("bitbrains", "bitbrains-rnd"), ("google2019", "google2019-instance-usage")):
                convert(fmt, [traces.BUNDLED_DIR / sub], out, parquet=parquet)
            size = sum(f.stat().st_size for f in out.iterdir())
            secs = best_of(args.repeat, lambda out=out: load_all([out]))
            kind = "Parquet" if parquet else "CSV.gz "
            print(f"bundled, converted {kind}: {size / 1e6:.1f} MB: {secs:.2f} s ({rows / secs:,.0f} rows/s)")
        rec = Path(tmp) / "rec"
        rec.mkdir()
        n = synthetic_recording(rec, args.guests, args.hours, args.interval_s)
        size = sum(f.stat().st_size for f in rec.iterdir())
        secs = best_of(args.repeat, lambda: load_all([rec]))
        print(
            f"recording, {args.guests} guests x {args.hours} h at {args.interval_s:g} s, every column: "
            f"{n:,} rows, {size / 1e6:.1f} MB in {args.hours} files: {secs:.2f} s ({n / secs:,.0f} rows/s)"
        )


if __name__ == "__main__":
    main()
