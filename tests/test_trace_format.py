"""overcommitd's documented trace format: the reader (CSV, gzip, Parquet, many guests per
file, a guest across files), what it rejects and where, what it interprets and says so,
the converters (round trips to the native loaders), ``trace info`` and the front door."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overcommitd.cli import main
from overcommitd.config import DaemonConfig
from policies import registry
from sim.evaluation.replay import ReplaySpec, replay
from sim.memory import traces
from sim.memory.trace_convert import PercentLayout, convert
from sim.memory.trace_info import describe, largest_rise
from sim.memory.trace_loader import load_all

HEADER = "time_s,guest,provisioned_kib,used_kib"
LOCATED = re.compile(r"(\.csv(\.gz)?:\d+:|row group \d+, row \d+)")


def write(path: Path, lines: list[str], *, gz: bool = False) -> Path:
    text = "\n".join(lines) + "\n"
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted")
    convert("bitbrains", [traces.BUNDLED_DIR / "bitbrains-rnd"], out)
    convert("google2019", [traces.BUNDLED_DIR / "google2019-instance-usage"], out)
    return out


# ---------------------------------------------------------------------------- round trips


def same_trace(a: traces.Trace, b: traces.Trace) -> bool:
    def same(x: np.ndarray | None, y: np.ndarray | None) -> bool:  # type: ignore[type-arg]
        return (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))

    return (
        a.size_kib == b.size_kib
        and a.gaps_cut == b.gaps_cut
        and np.array_equal(a.t_s, b.t_s)
        and np.array_equal(a.demand_kib, b.demand_kib)
        and same(a.disk_read_kib_s, b.disk_read_kib_s)
        and same(a.disk_write_kib_s, b.disk_write_kib_s)
    )


def test_every_bundled_trace_round_trips_through_the_format(converted: Path) -> None:
    native = [traces.load(p) for p in traces.bundled()]
    ours = load_all([converted])
    assert [t.source for t in ours] == ["overcommitd"] * 53
    assert len(ours) == len(native) == 53
    assert sum(same_trace(a, b) for a, b in zip(native, ours, strict=True)) == 53
    assert {t.name for t in ours} == {t.name for t in native}


def test_a_round_trip_replays_to_the_same_scorecard(converted: Path) -> None:
    cfg = DaemonConfig()
    policy = registry.create("trim")
    native = replay(ReplaySpec(hours=6.0), policy, cfg).scorecard
    ours = replay(ReplaySpec(traces=(converted,), hours=6.0), policy, cfg).scorecard
    assert native.balloon_ops > 0
    assert ours.as_dict() == native.as_dict()


def test_parquet_round_trip_matches_csv(tmp_path: Path) -> None:
    src = [traces.BUNDLED_DIR / "google2019-instance-usage"]
    a = load_all([convert("google2019", src, tmp_path / "csv").out])
    b = load_all([convert("google2019", src, tmp_path / "pq", parquet=True).out])
    assert len(a) == len(b) == 3
    assert all(same_trace(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------- reading


def test_guests_interleaved_across_files_and_compressions(tmp_path: Path) -> None:
    write(tmp_path / "guests-01.csv", [HEADER, "0,a,1048576,100", "0,b,2097152,900", "300,a,1048576,200"])
    write(tmp_path / "guests-02.csv.gz", [HEADER, "600,b,2097152,950", "600,a,1048576,300"], gz=True)
    write(tmp_path / "host-01.csv", ["time_s,mem_total_kib", "0,1"])  # a recording's host rows: not guests
    got = {t.name: t for t in load_all([tmp_path])}
    assert list(got) == ["a", "b"]
    assert got["a"].t_s.tolist() == [0, 300, 600] and got["a"].demand_kib.tolist() == [100, 200, 300]
    assert got["b"].t_s.tolist() == [0, 600] and got["b"].demand_kib.tolist() == [900, 950]
    assert got["a"].size_kib == 1048576 and got["b"].size_kib == 2097152
    assert got["a"].disk_read_kib_s is None and got["a"].cache_kib is None and got["a"].notes == ()


def test_a_guest_that_joined_late_is_noted(tmp_path: Path) -> None:
    rows = [HEADER, "0,a,10,1", "10,a,10,1", "20,a,10,1", "30,b,10,1", "40,b,10,2", "25,c,10,1", "35,c,10,1"]
    got = {t.name: t.notes for t in load_all([write(tmp_path / "g.csv", rows)])}
    assert got["a"] == ()
    assert got["b"] == (
        (
            "first sample 30 s after the earliest of the other guests: replayed from the start like them "
            "(the replay has no guest arrivals), so it is shifted against them"
        ),
    )
    assert len(got["c"]) == 1


def test_optional_columns_are_read_and_listed(tmp_path: Path) -> None:
    cols = f"{HEADER},cache_kib,disk_read_kib_s,stat_major_faults,vendor_field"
    write(tmp_path / "g.csv", [cols, "0,a,1000,10,50,1.5,7,x", "10,a,1000,20,60,2.5,8,y"])
    (t,) = load_all([tmp_path / "g.csv"])
    assert t.cache_kib is not None and t.cache_kib.tolist() == [50, 60]
    assert t.disk_read_kib_s is not None and t.disk_read_kib_s.tolist() == [1.5, 2.5]
    assert t.disk_write_kib_s is None
    assert t.columns == ("cache_kib", "disk_read_kib_s", "stat_major_faults")
    assert t.notes == ("columns not in the format, ignored: vendor_field",)


def test_every_interpreted_value_leaves_a_note_naming_where(tmp_path: Path) -> None:
    rows = [
        HEADER,
        "0,a,1000,100",
        "300,a,1000,nan",  # line 3: held
        "600,a,0,-5",  # line 4: size from others; held
        "600,a,1000,400",  # line 5: duplicate of 600
        "900,a,1000,1500",  # line 6: above the size: capped
        "1800,a,1000,200",  # a 900 s gap: held
        "99999,a,1000,300",  # a gap over an hour: cut
    ]
    (t,) = load_all([write(tmp_path / "g.csv", rows)])
    assert t.demand_kib.tolist() == [100, 100, 100, 1000, 200, 300]
    assert t.t_s.tolist() == [0, 300, 600, 900, 1800, 2100]
    assert t.gaps_cut == 1
    text = "\n".join(t.notes)
    assert (
        "provisioned_kib missing, NaN, under 1 KiB or over 1 PiB in 1 row(s) (first at " in text and "g.csv:4)" in text
    )
    assert "used_kib missing, NaN, infinite or negative in 2 row(s)" in text and "g.csv:3)" in text
    assert "used_kib above provisioned_kib in 1 sample(s) (first at " in text and "g.csv:6)" in text
    assert "1 duplicate timestamp(s) (first at " in text and "g.csv:5)" in text
    assert "1 gap(s) over 2x the 300 s period, longest 900 s" in text
    assert "1 gap(s) longer than 3600 s" in text and "g.csv:8" in text


def test_huge_numbers_are_bad_values_not_overflows(tmp_path: Path) -> None:
    rows = [f"{HEADER},cache_kib", "0,a,1e300,1e300,1e300", "10,a,4096,1e300,5", "20,a,4096,-1e300,1e300"]
    (t,) = load_all([write(tmp_path / "g.csv", rows)])
    assert t.size_kib == 4096
    assert t.demand_kib.tolist() == [4096, 4096, 4096]
    assert t.cache_kib is not None and t.cache_kib.tolist() == [4096, 5, 4096]
    assert any("over 1 PiB in 1 row(s)" in n for n in t.notes)


def test_a_guest_without_a_size_or_use_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(traces.TraceError, match=r"g.csv:2: guest 'a': no provisioned_kib in 1..1099511627776"):
        load_all([write(tmp_path / "g.csv", [HEADER, "0,a,0,10", "10,a,-1,10"])])
    with pytest.raises(traces.TraceError, match=r"g.csv:2: guest 'a': no valid used_kib"):
        load_all([write(tmp_path / "g.csv", [HEADER, "0,a,10,", "10,a,10,-3"])])


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["time_s,guest,used_kib", "0,a,1"], r"g.csv:1: missing column\(s\) provisioned_kib"),
        ([HEADER + ",used_kib", "0,a,1,1,1"], r"g.csv:1: column\(s\) used_kib appear more than once"),
        ([HEADER], r"g.csv:2: no data rows"),
        ([HEADER, "0,a,10,5", "", "10,a,10"], r"g.csv:4: expected 4 fields \(as in the header\), found 3"),
        ([HEADER, "0,a,10,5", "10,a,10,lots"], r"g.csv:3: column used_kib: expected a number \(kib\), found 'lots'"),
        (
            [HEADER, "0,a,10,5", ",a,10,5"],
            r"g.csv:3: column time_s: expected a time in seconds within ±1e\+12, found none",
        ),
        ([HEADER, "0,a,10,5", "1e300,a,10,5"], r"g.csv:3: column time_s: expected .* found 1e\+300"),
        ([HEADER, "0,a,10,5", "10,,10,5"], r"g.csv:3: column guest: expected a guest id, found none"),
        ([HEADER, "0,a,10,5", "1e999x,a,10,5"], r"g.csv:3: column time_s: expected a number \(seconds\)"),
    ],
)
def test_rejections_name_file_line_and_column(tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(traces.TraceError, match=message):
        load_all([write(tmp_path / "g.csv", lines)])


def test_parquet_errors_name_the_row_group(tmp_path: Path) -> None:
    path = tmp_path / "g.parquet"
    good = pa.table({"time_s": [0.0, 1.0], "guest": ["a", "a"], "provisioned_kib": [10, 10], "used_kib": ["1", "2"]})
    bad = pa.table({"time_s": [2.0, 3.0], "guest": ["a", "a"], "provisioned_kib": [10, 10], "used_kib": ["3", "x"]})
    with pq.ParquetWriter(path, good.schema) as w:
        w.write_table(good)
        w.write_table(bad)
    with pytest.raises(traces.TraceError, match=r"g.parquet: row group 1, row 1: column used_kib: .* found 'x'"):
        load_all([path])
    (tmp_path / "broken.parquet").write_bytes(b"PAR1garbage")
    with pytest.raises(traces.TraceError, match="broken.parquet: not a readable Parquet file"):
        load_all([tmp_path / "broken.parquet"])


def test_parquet_notes_name_row_group_and_row(tmp_path: Path) -> None:
    path = tmp_path / "g.parquet"
    t1 = pa.table({"time_s": [0.0, 10.0], "guest": ["a", "a"], "provisioned_kib": [10, 10], "used_kib": [1.0, 2.0]})
    t2 = pa.table({"time_s": [20.0, 30.0], "guest": ["a", "a"], "provisioned_kib": [10, 10], "used_kib": [3.0, None]})
    with pq.ParquetWriter(path, t1.schema) as w:
        w.write_table(t1)
        w.write_table(t2)
    (t,) = load_all([path])
    assert t.demand_kib.tolist() == [1, 2, 3, 3]
    assert "g.parquet: row group 1, row 1" in t.notes[0]


rows_text = st.lists(
    st.lists(
        st.one_of(
            st.integers(-(10**20), 10**20).map(str),
            st.integers(-(10**400), 10**400).map(str),
            st.floats(allow_nan=True, allow_infinity=True).map(str),
            st.sampled_from(["", "a", "b", "nan", "-0", "1e400", '"', '"x,y"', " 7 ", "\t"]),
            st.text(max_size=6),
        ),
        min_size=0,
        max_size=6,
    ),
    max_size=12,
)


@given(rows=rows_text, gz=st.booleans())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_rows_give_traces_or_an_error_naming_the_line(
    tmp_path: Path, rows: list[list[str]], gz: bool
) -> None:
    lines = [HEADER] + [",".join(r) for r in rows]
    path = write(tmp_path / ("g.csv.gz" if gz else "g.csv"), lines, gz=gz)
    try:
        loaded = load_all([path])
    except traces.TraceError as e:
        assert LOCATED.search(str(e)), str(e)
        return
    for t in loaded:
        assert t.size_kib > 0 and np.all(np.diff(t.t_s) > 0) and t.t_s[0] == 0
        assert 0 <= t.demand_kib.min() and t.demand_kib.max() <= t.size_kib


@given(data=st.binary(max_size=300))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_bytes_after_a_header_never_crash(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "g.csv"
    path.write_bytes(HEADER.encode() + b"\n" + data)
    try:
        load_all([path])
    except traces.TraceError as e:
        assert "g.csv" in str(e)


@given(data=st.binary(max_size=200))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_files_never_crash(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.parquet"
    path.write_bytes(data)
    try:
        load_all([path])
    except traces.TraceError as e:
        assert "x.parquet" in str(e)


# ---------------------------------------------------------------------------- percent


def test_percent_wide_one_column_per_vm(tmp_path: Path) -> None:
    write(tmp_path / "util.csv", ["vm1,vm2", "50,10", "25,", "100,20"])
    lay = PercentLayout(vm_size_kib=4 * 1024 * 1024, period_s=300, start_s=1000.0)
    result = convert("percent", [tmp_path / "util.csv"], tmp_path / "out", percent=lay)
    got = {t.name: t for t in load_all([result.out])}
    assert got["vm1"].demand_kib.tolist() == [2097152, 1048576, 4194304]
    assert got["vm1"].t_s.tolist() == [0, 300, 600] and got["vm1"].size_kib == 4194304
    assert got["vm2"].demand_kib.tolist() == [419430, 419430, 838861]  # the empty cell held
    assert any("1 value(s) missing or negative" in n for n in result.notes)


def test_percent_one_file_per_vm(tmp_path: Path) -> None:
    write(tmp_path / "web.csv", ["mem", "10", "20"])
    write(tmp_path / "db.csv", ["mem", "30", "40"])
    lay = PercentLayout(vm_size_kib=1024 * 1024, period_s=60)
    out = convert("percent", [tmp_path / "web.csv", tmp_path / "db.csv"], tmp_path / "out", percent=lay).out
    got = {t.name: t.demand_kib.tolist() for t in load_all([out])}
    assert got == {"web": [104858, 209715], "db": [314573, 419430]}


def test_percent_long_layout_like_alibaba_container_usage(tmp_path: Path) -> None:
    # cluster-trace-v2018 container_usage.csv: no header; container_id, machine_id,
    # time_stamp, cpu_util_percent, mem_util_percent, cpi, mem_gps, mpki, net_in, net_out, disk_io_percent
    rows = ["c_2,m_1,10,5,40,,,,,,", "c_1,m_1,10,5,20,,,,,,", "c_1,m_1,20,5,30,,,,,,", "c_2,m_1,20,5,-1,,,,,,"]
    write(tmp_path / "container_usage.csv", rows)
    lay = PercentLayout(
        vm_size_kib=2 * 1024 * 1024,
        period_s=10,
        layout="long",
        value_columns=("4",),
        id_column="0",
        time_column="2",
        header=False,
    )
    result = convert("percent", [tmp_path / "container_usage.csv"], tmp_path / "out", percent=lay)
    got = {t.name: t for t in load_all([result.out])}
    assert list(got) == ["c_2", "c_1"]
    assert got["c_1"].demand_kib.tolist() == [419430, 629146] and got["c_1"].t_s.tolist() == [0, 10]
    assert got["c_2"].demand_kib.tolist() == [838861, 838861]  # -1 (abnormal) held
    assert any("c_2: 1 value(s) missing or negative" in n for n in result.notes)


# ---------------------------------------------------------------------------- trace info


def test_info_figures_on_a_hand_made_trace(tmp_path: Path) -> None:
    gib = 1024 * 1024
    used = [1, 1, 2, 2, 5, 5, 3, 3, 3, 3, 3, 3, 3, 3, 3, 9]  # GiB, every 600 s; a hole after sample 7
    times = [600 * i for i in range(8)] + [600 * i + 1800 for i in range(8, 16)]
    lines = [f"{HEADER},cache_kib"] + [f"{t},a,{10 * gib},{u * gib},7" for t, u in zip(times, used, strict=True)]
    info = describe(load_all([write(tmp_path / "g.csv", lines)]))
    (g,) = info.guests
    assert (g.samples, g.period_s, g.size_kib) == (16, 600.0, 10 * gib)
    assert g.gaps_held == 1 and g.gaps_cut == 0
    assert (g.use_p50_kib, g.use_max_kib) == (3 * gib, 9 * gib)
    assert g.use_p95_kib == int(np.percentile(np.array(used) * gib, 95))
    assert g.rise_sample_kib == 6 * gib  # 3 -> 9
    assert g.rise_hour_kib == 6 * gib  # within an hour: 3 -> 9 again (1 -> 5 spans 1800 s: 4 GiB)
    assert g.columns == ("cache_kib",)
    assert g.span_s == times[-1] + 600
    assert info.overall.use_max_pct == 90.0 and info.overall.rise_hour_guest == "a"


@given(st.lists(st.tuples(st.integers(1, 900), st.integers(0, 10**6)), min_size=1, max_size=60))
@settings(max_examples=200, deadline=None)
def test_largest_rise_matches_brute_force(steps: list[tuple[int, int]]) -> None:
    t = np.cumsum([s for s, _ in steps]).astype(np.float64)
    v = np.array([x for _, x in steps], dtype=np.int64)
    brute = max([int(v[j] - v[i]) for i in range(len(v)) for j in range(i, len(v)) if t[j] - t[i] <= 3600] + [0])
    assert largest_rise(t, v, 3600.0) == brute


# ---------------------------------------------------------------------------- front door


def test_cli_convert_info_and_replay_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = str(traces.BUNDLED_DIR / "google2019-instance-usage")
    assert main(["trace", "convert", "--from", "google2019", src, "--out", str(tmp_path / "rec")]) == 0
    assert "3 guests, 3870 rows" in capsys.readouterr().out
    assert main(["trace", "info", str(tmp_path / "rec"), "--json", str(tmp_path / "info.json")]) == 0
    out = capsys.readouterr().out
    assert "overall: 3 guests, 3870 samples" in out and "notes from loading (3 guests)" in out
    assert "replayed from the start like them" in out  # independent instances, started apart
    assert json.loads((tmp_path / "info.json").read_text())["overall"]["guests"] == 3
    args = ["--trace", str(tmp_path / "rec"), "--hours", "2", "--no-progress"]
    assert main(["replay", *args, "--policy", "trim"]) == 0
    assert re.search(r"guests +3\n", capsys.readouterr().out)
    assert main(["replay", *args, "--policy", "trim,mom"]) == 0
    assert "trim" in capsys.readouterr().out


def test_cli_tune_on_a_recording(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = str(traces.BUNDLED_DIR / "google2019-instance-usage")
    assert main(["trace", "convert", "--from", "google2019", src, "--out", str(tmp_path), "--parquet"]) == 0
    tune = ["tune", "--policy", "trim", "--trace", str(tmp_path), "--hours", "1", "--max-evals", "2"]
    assert main(tune) == 0
    assert "[policy]" in capsys.readouterr().out


def test_cli_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path / "g.csv", [HEADER, "0,a,10,5", "10,a,10,lots"])
    assert main(["trace", "info", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"overcommitd: {bad}:3: column used_kib: expected a number (kib), found 'lots'"
    )
    assert main(["replay", "--trace", str(bad), "--no-progress"]) == 2
    assert f"{bad}:3:" in capsys.readouterr().err
    assert main(["trace", "convert", "--from", "percent", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "needs --vm-size and --period-s" in capsys.readouterr().err
    args = ["trace", "convert", "--from", "percent", str(bad), "--out", str(tmp_path / "o"), "--period-s", "1"]
    assert main([*args, "--vm-size", "lots"]) == 2
    assert "--vm-size" in capsys.readouterr().err
    assert main(["trace", "convert", "--from", "google2019", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown trace format" not in capsys.readouterr().err


def test_materna_layout_is_read_like_bitbrains(tmp_path: Path) -> None:
    header = (
        "Timestamp;CPU cores;CPU capacity provisioned [MHZ];CPU usage [MHZ];CPU usage [%];"
        "Memory capacity provisioned [KB];Memory usage [KB];Disk read throughput [KB/s];"
        "Disk write throughput [KB/s];Network received throughput [KB/s];Network transmitted throughput [KB/s]"
    )
    rows = [
        "01.01.2016 00:00:00;2;4000;10;0.5;1048576;1000;1.0;2.0;0;0",
        "01.01.2016 00:05:00;2;4000;10;0.5;1048576;2000;3.0;4.0;0;0",
    ]
    path = write(tmp_path / "1.csv", [header, *rows])
    t = traces.load(path)
    assert t.t_s.tolist() == [0.0, 300.0] and t.demand_kib.tolist() == [1000, 2000]
    assert t.disk_write_kib_s is not None and t.disk_write_kib_s.tolist() == [2.0, 4.0]
    out = convert("materna", [path], tmp_path / "out").out
    (back,) = load_all([out])
    assert same_trace(t, back)


def test_a_torn_gzip_tail_keeps_the_whole_members_before_it(tmp_path: Path) -> None:
    # a gzip file of several members (an append-style writer), its last one torn
    members = [gzip.compress(f"{HEADER}\n0,a,10,1\n".encode()), gzip.compress(b"10,a,10,2\n")]
    torn = gzip.compress(b"20,a,10,3\n")[:-6]
    path = tmp_path / "guests-2026-12-01T00.csv.gz"
    path.write_bytes(b"".join(members) + torn)
    (t,) = load_all([tmp_path])
    assert t.demand_kib.tolist() == [1, 2]
    assert t.notes == (
        (
            f"{path}: the last {len(torn)} bytes are not a complete gzip member (a recording cut "
            "short?): ignored, the rows before them are read"
        ),
    )
    path.write_bytes(members[0][:-6])  # not one whole member
    with pytest.raises(traces.TraceError, match="guests-2026-12-01T00.csv.gz: cannot decompress"):
        load_all([path])


def test_mixed_formats_keep_the_order_given(tmp_path: Path) -> None:
    google = traces.BUNDLED_DIR / "google2019-instance-usage"
    ours = write(tmp_path / "g.csv", [HEADER, "0,mine,10,1", "10,mine,10,2"])
    got = load_all([ours, google])
    assert [t.source for t in got] == ["overcommitd", "google2019", "google2019", "google2019"]
    assert [t.source for t in load_all([google, ours])][-1] == "overcommitd"
