"""Bad trace files found by review: each is a TraceError naming the file, never another
exception (a corrupt gzip stream, infinity in a Bitbrains file, a Parquet column named
twice, a long-layout percent file with rows that have no id)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sim.memory.trace_convert import PercentLayout, convert
from sim.memory.trace_loader import load_all
from sim.memory.traces import TraceError

BITBRAINS_HEADER = (
    "Timestamp [ms];\tCPU cores;\tMemory capacity provisioned [KB];\tMemory usage [KB];\tDisk read throughput [KB/s]\n"
)


def _bitbrains(path: Path, usage: str) -> Path:
    path.write_text(BITBRAINS_HEADER + "1000;\t1;\t4194304;\t1048576;\t0\n" + f"1300;\t1;\t4194304;\t{usage};\t0\n")
    return path


def test_a_corrupt_gzip_stream_is_named(tmp_path: Path) -> None:
    good = gzip.compress(_bitbrains(tmp_path / "vm.csv", "1048576").read_bytes())
    bad = tmp_path / "1.csv.gz"
    bad.write_bytes(good[:10] + bytes(b ^ 0xFF for b in good[10:14]) + good[14:])
    with pytest.raises(TraceError, match="1.csv.gz"):
        load_all([bad])


@pytest.mark.parametrize("usage", ["inf", "-inf", "nan", "-5"])
def test_infinite_or_negative_bitbrains_usage_is_refused_with_its_line(tmp_path: Path, usage: str) -> None:
    with pytest.raises(TraceError, match=r"vm\.csv:3"):
        load_all([_bitbrains(tmp_path / "vm.csv", usage)])


def test_a_parquet_column_named_twice_is_refused(tmp_path: Path) -> None:
    table = pa.Table.from_arrays(
        [pa.array([0.0]), pa.array(["a"]), pa.array([1024]), pa.array([512]), pa.array([256])],
        names=["time_s", "guest", "provisioned_kib", "used_kib", "used_kib"],
    )
    path = tmp_path / "g.parquet"
    pq.write_table(table, path)
    with pytest.raises(TraceError, match="used_kib appear more than once"):
        load_all([path])


def test_a_long_percent_row_without_an_id_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "usage.csv"
    src.write_text("id,t,pct\nvm1,0,10\n,300,20\nvm1,600,30\n")
    layout = PercentLayout(
        vm_size_kib=1 << 20, period_s=300, layout="long", id_column="id", time_column="t", value_columns=("pct",)
    )
    with pytest.raises(TraceError, match="have no id"):
        convert("percent", [src], tmp_path / "out", percent=layout)
