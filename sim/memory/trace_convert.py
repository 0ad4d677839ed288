"""Convert other traces to overcommitd's documented format (``docs/trace-format.md``).

Bitbrains GWA-T-12 / Materna GWA-T-13 and Google 2019 instance usage are read by the
same loaders the replay uses (``sim.memory.traces.load_raw``) and written unstitched: the real
timestamps, duplicates and gaps stay, so reading the output back gives the very Trace the
native loader gives. Percent-of-size series (utilisation in % of a VM size at a fixed
period, e.g. Alibaba cluster-trace-v2018 ``container_usage.mem_util_percent``) become
``used_kib = percent / 100 * vm_size``.

All guests go into one file, in input order (the order a replay assigns them to
simulated guests, so a round trip replays the same fleet).
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from overcommitd import traceformat as tf
from sim.memory.trace_reader import first_bad
from sim.memory.traces import DEFAULT_MACHINE_KIB, RawSeries, TraceError, expand, load_raw

SourceFormat = Literal["bitbrains", "materna", "google2019", "percent"]
SOURCE_FORMATS: tuple[SourceFormat, ...] = ("bitbrains", "materna", "google2019", "percent")


@dataclass(frozen=True, slots=True)
class PercentLayout:
    """Where the percentages are in a CSV. Columns by header name or 0-based index.

    ``wide``: one column per VM (``value_columns``, default every column but the time
    column), one row per sample; a file with a single value column is one VM named after
    the file (one file per VM). ``long``: one row per VM per sample, the VM id in
    ``id_column`` and the percentage in ``value_columns[0]`` (Alibaba's
    ``container_usage.csv``: no header, id 0, time 2, mem_util_percent 4).
    """

    vm_size_kib: int
    period_s: float
    start_s: float = 0.0
    layout: Literal["wide", "long"] = "wide"
    value_columns: tuple[str, ...] = ()
    id_column: str | None = None
    time_column: str | None = None
    header: bool = True
    delimiter: str = ","


@dataclass(frozen=True, slots=True)
class ConvertResult:
    out: Path
    guests: int
    rows: int
    notes: tuple[str, ...]


def convert(
    fmt: SourceFormat,
    paths: Sequence[Path],
    out_dir: Path,
    *,
    machine_kib: int = DEFAULT_MACHINE_KIB,
    percent: PercentLayout | None = None,
    parquet: bool = False,
) -> ConvertResult:
    """Read ``paths`` as ``fmt`` and write ``out_dir/guests-<fmt>.csv.gz`` (or ``.parquet``)."""
    files = expand(paths)
    notes: list[str] = []
    if fmt == "percent":
        if percent is None:
            raise TraceError("percent: --vm-size and --period-s are required")
        tables = [t for f in files for t in _percent_tables(f, percent, notes)]
    else:
        tables = [_raw_table(_load_as(f, fmt, machine_kib)) for f in files]
    if not tables:
        raise TraceError("nothing to convert")
    table = pa.concat_tables(tables, promote_options="default")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"guests-{fmt}.{'parquet' if parquet else 'csv.gz'}"
    write(table, out)
    guests = len(pc.unique(table.column(tf.GUEST)))
    return ConvertResult(out, guests, len(table), tuple(notes))


def write(table: pa.Table, out: Path) -> None:
    """The documented format: Parquet by the suffix, else gzipped CSV with a header row."""
    if out.name.endswith(".parquet"):
        pq.write_table(table, out)
        return
    buf = io.BytesIO()
    pacsv.write_csv(table, buf, pacsv.WriteOptions(quoting_style="needed"))
    out.write_bytes(gzip.compress(buf.getvalue(), compresslevel=6))


def _load_as(path: Path, fmt: SourceFormat, machine_kib: int) -> RawSeries:
    raw = load_raw(path, machine_kib=machine_kib)
    expected = "bitbrains" if fmt == "materna" else fmt
    if raw.source != expected:
        raise TraceError(f"{path}:1: a {raw.source} file, not {fmt}: use --from {raw.source}")
    return raw


def _raw_table(raw: RawSeries) -> pa.Table:
    n = len(raw.time_s)
    cols: dict[str, pa.Array] = {
        tf.TIME_S: pa.array(raw.time_s),
        tf.GUEST: pa.array([raw.name] * n, pa.string()),
        tf.PROVISIONED_KIB: pa.array(np.full(n, raw.size_kib, dtype=np.int64)),
        tf.USED_KIB: pa.array(raw.used_kib),
    }
    if raw.disk_read_kib_s is not None:
        cols[tf.DISK_READ_KIB_S] = pa.array(raw.disk_read_kib_s)
    if raw.disk_write_kib_s is not None:
        cols[tf.DISK_WRITE_KIB_S] = pa.array(raw.disk_write_kib_s)
    return pa.table(cols)


# ---------------------------------------------------------------------------- percent


def _percent_tables(path: Path, lay: PercentLayout, notes: list[str]) -> list[pa.Table]:
    table = _read_plain_csv(path, lay)
    names = table.column_names
    time_col = _column(path, names, lay.time_column) if lay.time_column else None
    if lay.layout == "long":
        if lay.id_column is None or len(lay.value_columns) != 1:
            raise TraceError(f"{path}: --layout long needs --id-column and one --column (the percentage)")
        try:
            raw_ids = pc.cast(table.column(_column(path, names, lay.id_column)), pa.string())
        except pa.ArrowException as e:
            raise TraceError(f"{path}: column {lay.id_column!r}: ids are not text: {e}") from e
        blank = pc.sum(pc.equal(pc.fill_null(raw_ids, ""), "")).as_py() or 0  # no id, or an empty one
        if blank:
            raise TraceError(f"{path}: column {lay.id_column!r}: {blank} row(s) have no id")
        ids = raw_ids.to_numpy(zero_copy_only=False)
        pct = _numbers(path, table, _column(path, names, lay.value_columns[0]))
        times = None if time_col is None else _numbers(path, table, time_col)
        order = np.argsort(ids, kind="stable")
        uniq, first = np.unique(ids[order], return_index=True)
        bounds = [*first, len(ids)]
        by_seen = np.argsort(order[first])
        return [
            _percent_guest(
                str(uniq[g]),
                pct[order[bounds[g] : bounds[g + 1]]],
                None if times is None else times[order[bounds[g] : bounds[g + 1]]],
                lay,
                path,
                notes,
            )
            for g in by_seen
        ]
    value_cols = [_column(path, names, c) for c in lay.value_columns] or [n for n in names if n != time_col]
    times = None if time_col is None else _numbers(path, table, time_col)
    single = len(value_cols) == 1
    stem = path.name.removesuffix(".gz").removesuffix(".csv")
    return [
        _percent_guest(stem if single else c, _numbers(path, table, c), times, lay, path, notes) for c in value_cols
    ]


def _read_plain_csv(path: Path, lay: PercentLayout) -> pa.Table:
    read = pacsv.ReadOptions(autogenerate_column_names=not lay.header)
    try:
        data = path.read_bytes()
        data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        return pacsv.read_csv(pa.py_buffer(data), read, pacsv.ParseOptions(delimiter=lay.delimiter))
    except (OSError, EOFError, gzip.BadGzipFile, pa.ArrowInvalid) as e:
        raise TraceError(f"{path}: cannot read as CSV: {e}") from e


def _column(path: Path, names: list[str], ref: str) -> str:
    """A column by header name, or by 0-based index (files without a header)."""
    if ref in names:
        return ref
    if ref.isdigit() and int(ref) < len(names):
        return names[int(ref)]
    raise TraceError(f"{path}:1: no column {ref!r}: the columns are {', '.join(names)} (or give a 0-based index)")


def _numbers(path: Path, table: pa.Table, name: str) -> npt.NDArray[np.float64]:
    col = table.column(name)
    try:
        return np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        bad = first_bad(col, pa.float64())
        row, value = bad if bad is not None else (0, str(col.type))
        raise TraceError(f"{path}: data row {row + 1}: column {name}: expected a number, found {value!r}") from None


def _percent_guest(
    guest: str,
    pct: npt.NDArray[np.float64],
    times: npt.NDArray[np.float64] | None,
    lay: PercentLayout,
    path: Path,
    notes: list[str],
) -> pa.Table:
    n = len(pct)
    time_s = lay.start_s + (np.arange(n) * lay.period_s if times is None else times)
    bad = ~np.isfinite(pct) | (pct < 0)
    if bad.any():
        notes.append(
            f"{path}: {guest}: {int(bad.sum())} value(s) missing or negative: written empty "
            "(the replay holds the previous sample)"
        )
    over = pct > 100
    if over.any():
        notes.append(
            f"{path}: {guest}: {int(over.sum())} value(s) above 100 %: written as is (the replay caps them at the size)"
        )
    used = np.where(bad, 0.0, np.rint(pct * lay.vm_size_kib / 100))
    return pa.table(
        {
            tf.TIME_S: pa.array(time_s),
            tf.GUEST: pa.array([guest] * n, pa.string()),
            tf.PROVISIONED_KIB: pa.array(np.full(n, lay.vm_size_kib, dtype=np.int64)),
            tf.USED_KIB: pa.array(used.astype(np.int64), mask=bad),
        }
    )


def parse_start(text: str) -> float:
    """``--start``: epoch seconds, or an ISO 8601 date-time (UTC unless it says)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError as e:
        raise TraceError(f"--start {text!r}: expected epoch seconds or an ISO 8601 date, e.g. 2024-05-01T00:00") from e
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
