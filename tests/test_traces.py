"""Trace loaders: the bundled real traces, each documented quirk, and bad files named by
file and line."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.memory import traces
from tests.helpers import bitbrains

G_HEADER = "time,unique_id,avg_memory_usage,max_memory_usage,assigned_memory,memory_limit"


def test_every_bundled_trace_loads() -> None:
    paths = traces.bundled()
    assert len(paths) == 53
    for p in paths:
        t = traces.load(p)
        assert t.size_kib > 0 and t.size_kib % traces.SIZE_ROUND_KIB == 0
        assert t.t_s[0] == 0 and np.all(np.diff(t.t_s) > 0)
        assert t.demand_kib.max() <= t.size_kib and t.demand_kib.min() > 0


def test_bitbrains_timestamps_are_seconds_and_the_outage_is_cut() -> None:
    t = traces.load(traces.BUNDLED_DIR / "bitbrains-rnd/2013-7/3.csv.gz")
    assert np.median(np.diff(t.t_s)) == 300.0  # seconds, not ms
    assert t.gaps_cut == 1  # the ~30 h July outage (index.csv: max_gap_s 113413)
    assert 28 < t.duration_s / 86400 < 30


def test_bitbrains_size_is_the_mode_of_nonzero_capacity_raised_to_usage(tmp_path: Path) -> None:
    rows = [(1000 + 300 * i, cap, 1000.0) for i, cap in enumerate([0, 2097152, 2097152, 511e6, 2097152])]
    assert traces.load(bitbrains(tmp_path, rows)).size_kib == 2097152
    over = rows + [(3000.0, 2097152, 3_000_000.0)]
    assert traces.load(bitbrains(tmp_path, over)).size_kib == 3_014_656  # 3 000 000 rounded up to 128 MiB


def test_zero_usage_holds_the_previous_sample(tmp_path: Path) -> None:
    rows = [(1000 + 300 * i, 1048576, u) for i, u in enumerate([0, 500, 0, 0, 700, 0])]
    assert traces.load(bitbrains(tmp_path, rows)).demand_kib.tolist() == [500, 500, 500, 500, 700, 700]


def test_all_zero_usage_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(traces.TraceError, match="every memory usage sample is 0"):
        traces.load(bitbrains(tmp_path, [(1000, 1048576, 0), (1300, 1048576, 0)]))


def test_short_gaps_hold_long_gaps_are_cut_and_duplicates_dropped(tmp_path: Path) -> None:
    times = [0, 300, 300, 600, 600 + 7200, 600 + 7500]
    t = traces.load(bitbrains(tmp_path, [(1e9 + s, 1048576, 100 + i) for i, s in enumerate(times)]))
    assert t.t_s.tolist() == [0, 300, 600, 900, 1200]
    assert t.gaps_cut == 1


def test_google_values_are_scaled_to_a_machine(tmp_path: Path) -> None:
    path = tmp_path / "g.csv"
    path.write_text(G_HEADER + "\n600000000,x-1,0.001,0.002,0.0,0.004\n900000000,x-1,0.001,0.003,0.0,0.004\n")
    t = traces.load(path, machine_kib=1024 * 1024 * 1024)
    assert t.t_s.tolist() == [0.0, 300.0]  # microseconds
    assert t.demand_kib.tolist() == [int(0.002 * 2**30), int(0.003 * 2**30)]
    assert t.size_kib == traces.SIZE_ROUND_KIB * -(-int(0.004 * 2**30) // traces.SIZE_ROUND_KIB)
    assert t.source == "google2019"


def test_a_bad_number_names_file_line_and_column(tmp_path: Path) -> None:
    path = bitbrains(tmp_path, [(1000, 1048576, 100), (1300, 1048576, 200)])
    text = gzip.decompress(path.read_bytes()).decode().replace(";\t200", ";\tlots")
    path.write_bytes(gzip.compress(text.encode()))
    with pytest.raises(traces.TraceError, match=r"7.csv.gz:3: Memory usage \[KB\] is not a number: 'lots'"):
        traces.load(path)


def test_a_short_row_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "g.csv"
    path.write_text(G_HEADER + "\n600000000,x-1,0.001,0.002,0.0,0.004\n900000000,x-1,0.001\n")
    with pytest.raises(traces.TraceError, match=r"g.csv:3: expected 6 fields, found 3"):
        traces.load(path)


def test_unknown_format_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(traces.TraceError, match="x.csv:1: unknown trace format"):
        traces.load(path)
    with pytest.raises(traces.TraceError, match="no such trace file"):
        traces.expand([tmp_path / "missing"])
    with pytest.raises(traces.TraceError, match="cannot read"):
        (tmp_path / "bad.csv.gz").write_bytes(b"\x1f\x8bnot gzip")
        traces.load(tmp_path / "bad.csv.gz")


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**7)), min_size=1, max_size=40))
@settings(max_examples=60, deadline=None)
def test_any_well_formed_bitbrains_file_gives_a_sane_trace(
    tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[int, int]]
) -> None:
    tmp = tmp_path_factory.mktemp("bb")
    data = [(1e9 + t, 1048576.0, float(u)) for t, u in rows]
    if all(u == 0 for _, _, u in data):
        with pytest.raises(traces.TraceError):
            traces.load(bitbrains(tmp, data))
        return
    t = traces.load(bitbrains(tmp, data))
    assert t.t_s[0] == 0 and np.all(np.diff(t.t_s) > 0)
    assert len(t.t_s) == len(t.demand_kib) == len({r[0] for r in rows})
    assert t.demand_kib.min() > 0 and t.size_kib >= t.demand_kib.max()


def test_the_fast_parser_reads_every_bundled_file_exactly_as_the_row_by_row_one() -> None:
    """pyarrow parses clean files; the row-by-row path (which names bad lines) must agree."""
    import io

    for p in traces.bundled():
        data = traces._read(p)
        f = io.StringIO(data.decode())
        header = f.readline()
        sep = ";\t" if ";\t" in header else ","
        names = [n.strip() for n in header.rstrip("\r\n").split(sep)]
        wanted = (
            (traces.BITBRAINS_TIME, traces.BITBRAINS_USAGE, traces.BITBRAINS_CAPACITY, traces.BITBRAINS_DISK_READ)
            if sep != ","
            else traces.GOOGLE_COLUMNS
        )
        fast = traces._fast_matrix(data, names, wanted, sep)
        slow = np.array([v for _, v in traces._rows(p, f, names, wanted, sep)])
        assert fast is not None and np.array_equal(fast, slow), p
