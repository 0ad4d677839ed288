"""The tick benchmark still runs (its figures are for humans; nothing here is timed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_bench_tick_runs_for_a_few_guests() -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tick.py"
    spec = importlib.util.spec_from_file_location("bench_tick", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    step_s, tick_s, sets = bench.bench(10, 2, bench.load_traces(bench.ReplaySpec()))
    assert step_s > 0 and tick_s > 0 and 0 <= sets <= 10
