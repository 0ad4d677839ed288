"""Read overcommitd's documented trace format (``docs/trace-format.md``) into Traces.

A file holds rows of many guests and a guest's rows may span many files (a recording's
hourly ``guests-*.csv.gz``), so all files are read first, then the rows are grouped by
guest. CSV, gzipped CSV and Parquet; pyarrow parses, numpy checks and groups, so a week
of 200 guests loads in seconds.

What is rejected (``TraceError`` naming file, line or row group, and column): a missing
header or required column, a row with the wrong number of fields, text where a number
belongs, a row without a time or a guest id, a guest with no usable size or use. What is
interpreted, each with a note on the guest's Trace: a NaN, infinite or negative value
holds the guest's previous valid sample; ``used_kib`` above the size is capped at it;
``provisioned_kib`` that changes makes the size the largest; duplicate timestamps keep the
first row; gaps longer than ``max_gap_s`` are cut, shorter ones hold the last sample.
Columns the format does not define are ignored, with a note; the optional columns the
replay does not use (swap rates, actual_kib, deflate_on_oom, stat_*) are named in
``Trace.columns`` but not parsed.
"""

from __future__ import annotations

import csv
import gzip
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from overcommitd import traceformat as tf
from sim.memory.traces import DEFAULT_MAX_GAP_S, Trace, TraceError, clock_notes, stitch

F64 = npt.NDArray[np.float64]
MAX_SIZE_KIB = 1 << 40  # 1 PiB: a guest size beyond it is a bad value, and KiB stay within int64
MAX_TIME_S = 1e12  # ~31 700 years either side of the origin: beyond it a time is a bad value
_LINE_END = re.compile(rb"\r\n|\n|\r")  # what pyarrow's CSV parser ends a line at


@dataclass(slots=True)
class _File:
    """One file's rows, converted, and what is needed to say where a row came from."""

    path: Path
    table: pa.Table
    data: bytes | None = None  # CSV text, for line numbers; None for Parquet
    group_rows: tuple[int, ...] = ()  # Parquet: rows per row group
    ignored: tuple[str, ...] = ()  # columns the format does not define
    listed: tuple[str, ...] = ()  # optional columns the replay does not use: named, not parsed
    notes: tuple[str, ...] = ()  # about the whole file (a torn gzip tail)
    _lines: npt.NDArray[np.int64] | None = field(default=None, repr=False)

    def where(self, row: int) -> str:
        """``file:line`` of a CSV data row, ``file: row group G, row R`` of a Parquet one."""
        if self.data is None:
            ends = np.cumsum(self.group_rows)
            g = int(np.searchsorted(ends, row, side="right"))
            return f"{self.path}: row group {g}, row {row - (int(ends[g - 1]) if g else 0)}"
        if self._lines is None:
            self._lines = _data_lines(self.data)
        return f"{self.path}:{int(self._lines[row])}"


def read(paths: Sequence[Path], *, max_gap_s: float = DEFAULT_MAX_GAP_S) -> list[Trace]:
    """Every guest in these files, in order of first appearance."""
    files = [_read_file(p) for p in paths]
    unknown = sorted({c for f in files for c in f.ignored})
    common = [f"columns not in the format, ignored: {', '.join(unknown)}"] if unknown else []
    common += [n for f in files for n in f.notes]
    listed = {c for f in files for c in f.listed}
    return _Rows(files).traces(max_gap_s, common, listed)


# ---------------------------------------------------------------------------- files


def _read_file(path: Path) -> _File:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e}") from e
    if raw[:4] == b"PAR1":
        return _read_parquet(path)
    if raw[:2] != b"\x1f\x8b":
        return _read_csv(path, raw)
    try:
        return _read_csv(path, gzip.decompress(raw))
    except (OSError, EOFError, zlib.error):
        data, note = _gunzip_complete_members(path, raw)
        f = _read_csv(path, data)
        f.notes = (note,)
        return f


def _gunzip_complete_members(path: Path, raw: bytes) -> tuple[bytes, str]:
    """The complete gzip members of a file whose tail is torn or corrupt.

    A gzip file copied while it was written, or cut short by a full disk, ends in a
    partial member; the members before it are whole and are kept (``overcommitd record``
    itself writes the hour being recorded as plain CSV and compresses it once complete,
    ``overcommitd.hourly``). Raises if no member is whole.
    """
    out: list[bytes] = []
    view, pos = memoryview(raw), 0
    while pos < len(raw):
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # zlib: 16+ = gzip header and trailer
        try:
            chunk = d.decompress(view[pos:])
        except zlib.error as e:
            if not out:
                raise TraceError(f"{path}: cannot decompress: {e}") from None
            break
        if not d.eof:
            break
        out.append(chunk)
        pos = len(raw) - len(d.unused_data)
    if not out:
        raise TraceError(f"{path}: cannot decompress: no complete gzip member")
    return b"".join(out), (
        f"{path}: the last {len(raw) - pos} bytes are not a complete gzip member (a recording cut short?): "
        "ignored, the rows before them are read"
    )


def _header(path: Path, data: bytes) -> list[str]:
    first = _LINE_END.split(data, maxsplit=1)[0]
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}:1: the header is not UTF-8 text: {e}") from None
    names = next(csv.reader([text]), [])
    missing = [c for c in tf.REQUIRED_COLUMNS if c not in names]
    if missing:
        raise TraceError(
            f"{path}:1: missing column(s) {', '.join(missing)}: the header row must name at least "
            f"{', '.join(tf.REQUIRED_COLUMNS)} (see docs/trace-format.md)"
        )
    _refuse_repeated(names, f"{path}:1")
    return names


# The columns the replay uses, parsed and checked. The other optional ones (swap rates,
# actual, deflate_on_oom, stat_*) are only named in Trace.columns: parsing 20 more
# numeric columns would triple the load time of a recording for nothing.
PARSED_COLUMNS = (*tf.REQUIRED_COLUMNS, tf.CACHE_KIB, tf.DISK_READ_KIB_S, tf.DISK_WRITE_KIB_S)


def _types(names: Sequence[str]) -> dict[str, pa.DataType]:
    return {n: (pa.string() if n == tf.GUEST else pa.float64()) for n in names if n in PARSED_COLUMNS}


def _unparsed(names: Sequence[str], types: dict[str, pa.DataType]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(columns the format does not define, optional columns named but not parsed)."""
    ignored = tuple(n for n in names if n not in tf.GUEST_COLUMNS)
    return ignored, tuple(n for n in names if n in tf.GUEST_COLUMNS and n not in types)


def _read_csv(path: Path, data: bytes) -> _File:
    names = _header(path, data)
    types = _types(names)
    opts = pacsv.ConvertOptions(column_types=types, include_columns=list(types), quoted_strings_can_be_null=False)
    try:
        table = pacsv.read_csv(pa.py_buffer(data), convert_options=opts)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise _diagnose_csv(path, data, names, types, e) from None
    ignored, listed = _unparsed(names, types)
    return _File(path, table, data, ignored=ignored, listed=listed)


def _diagnose_csv(path: Path, data: bytes, names: list[str], types: dict[str, pa.DataType], e: Exception) -> TraceError:
    """The fast typed read failed: find the first offending line and column."""
    lines = _data_lines(data)
    as_text = {n: pa.binary() for n in types}
    opts = pacsv.ConvertOptions(column_types=as_text, include_columns=list(types), strings_can_be_null=True)
    try:
        table = pacsv.read_csv(pa.py_buffer(data), convert_options=opts)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as parse_error:
        return _field_count_error(path, data, len(names), parse_error)
    for name, target in types.items():
        bad = first_bad(table.column(name), target)
        if bad is not None:
            row, value = bad
            return TraceError(f"{path}:{int(lines[row])}: column {name}: {_expected(name)}, found {value!r}")
    return TraceError(f"{path}: cannot parse: {e}")


def _field_count_error(path: Path, data: bytes, n_fields: int, e: Exception) -> TraceError:
    for lineno, line in enumerate(_LINE_END.split(data), start=1):
        if not line:
            continue
        text = line.decode("utf-8", errors="replace")
        try:
            found = len(next(csv.reader([text], strict=True)))
        except csv.Error as bad_quote:
            return TraceError(f"{path}:{lineno}: cannot split the line into fields: {bad_quote}")
        if found != n_fields:
            return TraceError(f"{path}:{lineno}: expected {n_fields} fields (as in the header), found {found}")
    return TraceError(f"{path}: cannot parse: {e}")


def _expected(name: str) -> str:
    if name == tf.GUEST:
        return "expected a guest id (UTF-8 text)"
    unit = "seconds" if name.endswith("_s") and not name.endswith("_kib_s") else name.rsplit("_", 1)[-1]
    return f"expected a number ({unit})"


def first_bad(col: pa.ChunkedArray, target: pa.DataType) -> tuple[int, str] | None:
    """The first row whose value does not convert to ``target`` (by bisection on casts),
    with the value as text."""
    arr = col.combine_chunks()

    def casts(lo: int, hi: int) -> bool:
        part = arr.slice(lo, hi - lo)
        try:
            if pa.types.is_binary(part.type):
                part = pc.cast(part, pa.string())
            pc.cast(part, target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return False
        return True

    if casts(0, len(arr)):
        return None
    lo, hi = 0, len(arr)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if casts(lo, mid):
            lo = mid
        else:
            hi = mid
    value = arr[lo].as_py()
    return lo, value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _data_lines(data: bytes) -> npt.NDArray[np.int64]:
    """Line number (1-based) of each data row: non-empty lines after the header."""
    nonempty = [i for i, line in enumerate(_LINE_END.split(data), start=1) if line]
    return np.array(nonempty[1:], dtype=np.int64)


def _refuse_repeated(names: list[str], where: str) -> None:
    """A column named twice: which of the two is meant cannot be known."""
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TraceError(f"{where}: column(s) {', '.join(dup)} appear more than once in the header")


def _read_parquet(path: Path) -> _File:
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except (pa.ArrowException, OSError) as e:
        raise TraceError(f"{path}: not a readable Parquet file: {e}") from e
    _refuse_repeated(list(names), f"{path}: schema")
    missing = [c for c in tf.REQUIRED_COLUMNS if c not in names]
    if missing:
        raise TraceError(f"{path}: schema: missing column(s) {', '.join(missing)} (see docs/trace-format.md)")
    types = _types(names)
    groups = []
    for g in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(g, columns=list(types))
        except (pa.ArrowException, OSError) as e:
            raise TraceError(f"{path}: row group {g}: cannot read: {e}") from e
        groups.append(_convert_group(path, g, table, types))
    table = pa.concat_tables(groups) if groups else pa.table({n: pa.array([], t) for n, t in types.items()})
    ignored, listed = _unparsed(names, types)
    return _File(path, table, None, tuple(len(t) for t in groups), ignored=ignored, listed=listed)


def _convert_group(path: Path, g: int, table: pa.Table, types: dict[str, pa.DataType]) -> pa.Table:
    cols = []
    for name, target in types.items():
        col = table.column(name)
        try:
            cols.append(pc.cast(col, target))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            bad = first_bad(col, target)
            row, value = bad if bad is not None else (0, str(col.type))
            raise TraceError(
                f"{path}: row group {g}, row {row}: column {name}: {_expected(name)}, found {value!r}"
            ) from None
    return pa.table(cols, names=list(types))


# ---------------------------------------------------------------------------- rows


class _Rows:
    """All files' rows as flat arrays, grouped by guest."""

    def __init__(self, files: list[_File]) -> None:
        self.files = files
        table = pa.concat_tables([f.table for f in files], promote_options="default")
        self.file_of = np.repeat(np.arange(len(files)), [len(f.table) for f in files])
        self.row_in_file = np.concatenate([np.arange(len(f.table)) for f in files]) if files else np.zeros(0, int)
        self.columns = table.column_names
        self.table = table

    def where(self, i: int) -> str:
        return self.files[int(self.file_of[i])].where(int(self.row_in_file[i]))

    def _values(self, name: str) -> F64:
        return np.asarray(self.table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)

    def traces(self, max_gap_s: float, common: list[str], listed: set[str]) -> list[Trace]:
        if len(self.table) == 0:
            raise TraceError(f"{self.files[0].path}:2: no data rows: expected one row per guest per sample")
        time_s = self._values(tf.TIME_S)
        bad_time = np.flatnonzero(~(np.abs(time_s) <= MAX_TIME_S))
        if len(bad_time):
            i = int(bad_time[0])
            found = "none" if np.isnan(time_s[i]) else f"{time_s[i]:g}"
            raise TraceError(
                f"{self.where(i)}: column {tf.TIME_S}: expected a time in seconds within ±{MAX_TIME_S:g}, found {found}"
            )
        guest_col = self.table.column(tf.GUEST).combine_chunks()
        encoded = pc.dictionary_encode(guest_col)
        codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False))
        names = encoded.dictionary.to_pylist()
        no_guest = np.flatnonzero(
            pc.fill_null(pc.equal(pc.utf8_length(guest_col), 0), True).to_numpy(zero_copy_only=False)
        )
        if len(no_guest):
            raise TraceError(f"{self.where(int(no_guest[0]))}: column {tf.GUEST}: expected a guest id, found none")
        order = np.lexsort((time_s, codes))
        starts = np.searchsorted(codes[order], np.arange(len(names) + 1))
        first_seen = np.array([order[starts[g] : starts[g + 1]].min() for g in range(len(names))])
        values = {n: self._values(n) for n in self.columns if n not in (tf.GUEST, tf.TIME_S)}
        out = []
        for g in np.argsort(first_seen, kind="stable"):
            rows = order[starts[g] : starts[g + 1]]
            out.append(
                _GuestRows(
                    str(names[g]), rows, time_s[rows], {n: v[rows] for n, v in values.items()}, self.where
                ).trace(max_gap_s, common, listed, float(time_s.min()))
            )
        return out


@dataclass(slots=True)
class _GuestRows:
    """One guest's rows in time order, and the notes on what was done with them."""

    name: str
    rows: npt.NDArray[np.int64]
    time_s: F64
    values: dict[str, F64]
    where: Callable[[int], str]
    notes: list[str] = field(default_factory=list)

    def _at(self, mask: npt.NDArray[np.bool_]) -> str:
        return self.where(int(self.rows[int(np.flatnonzero(mask)[0])]))

    def trace(self, max_gap_s: float, common: list[str], listed: set[str], first_s: float) -> Trace:
        """``first_s``: the earliest sample of any guest read with this one."""
        size_kib = self._size()
        used = self._series(tf.USED_KIB, required=True)
        assert used is not None
        over = used > size_kib
        if over.any():
            self.notes.append(
                f"{tf.USED_KIB} above {tf.PROVISIONED_KIB} in {int(over.sum())} sample(s) "
                f"(first at {self._at(over)}): capped at {size_kib} KiB"
            )
            used = np.minimum(used, size_kib)
        optional = {n: self._series(n) for n in (tf.CACHE_KIB, tf.DISK_READ_KIB_S, tf.DISK_WRITE_KIB_S)}
        present = tuple(
            n for n in tf.OPTIONAL_COLUMNS if n in listed or (n in self.values and np.isfinite(self.values[n]).any())
        )
        t_s, keep, cut = stitch(self.time_s, max_gap_s)
        self._late_start(first_s, float(np.median(np.diff(t_s))) if len(t_s) > 1 else 0.0)
        self.notes += clock_notes(self.time_s, keep, cut, max_gap_s, lambda i: self.where(int(self.rows[i])))
        cache = optional[tf.CACHE_KIB]
        reads, writes = optional[tf.DISK_READ_KIB_S], optional[tf.DISK_WRITE_KIB_S]
        return Trace(
            self.name,
            "overcommitd",
            size_kib,
            t_s,
            used[keep].astype(np.int64),
            None if reads is None else reads[keep],
            None if writes is None else writes[keep],
            cut,
            cache_kib=None if cache is None else np.minimum(cache[keep], size_kib).astype(np.int64),
            notes=(*common, *self.notes),
            columns=present,
        )

    def _late_start(self, first_s: float, period_s: float) -> None:
        """The replay starts every guest at its own first sample (it has no guest arrivals),
        so a guest that joined a recording late is shifted to the start: say so."""
        late_s = float(self.time_s[0]) - first_s
        if late_s > 0 and late_s > 2 * period_s:
            self.notes.append(
                f"first sample {late_s:g} s after the earliest of the other guests: replayed from the start "
                "like them (the replay has no guest arrivals), so it is shifted against them"
            )

    def _size(self) -> int:
        prov = self.values[tf.PROVISIONED_KIB]
        valid = (prov >= 1) & (prov <= MAX_SIZE_KIB)  # below 1 KiB is no size at all
        if not valid.any():
            raise TraceError(
                f"{self.where(int(self.rows[0]))}: guest {self.name!r}: no {tf.PROVISIONED_KIB} in 1..{MAX_SIZE_KIB} "
                f"in any of its {len(prov)} row(s): its size is unknown"
            )
        if not valid.all():
            self.notes.append(
                f"{tf.PROVISIONED_KIB} missing, NaN, under 1 KiB or over 1 PiB in {int((~valid).sum())} row(s) "
                f"(first at {self._at(~valid)}): size taken from the other rows"
            )
        size = float(prov[valid].max())
        if prov[valid].min() != size:
            self.notes.append(
                f"{tf.PROVISIONED_KIB} changes from {int(prov[valid].min())} to {int(size)} KiB: "
                "the size is the largest"
            )
        return int(size)

    def _series(self, name: str, *, required: bool = False) -> F64 | None:
        """The column for this guest; invalid samples (NaN, infinite, negative) hold the
        previous valid one (leading ones the first); None if the column has no value."""
        if name not in self.values:
            return None
        v = self.values[name]
        valid = np.isfinite(v) & (v >= 0)
        if not valid.any():
            if required:
                raise TraceError(
                    f"{self.where(int(self.rows[0]))}: guest {self.name!r}: no valid {name} "
                    f"(a number >= 0) in any of its {len(v)} row(s)"
                )
            if np.isfinite(v).any() or np.isinf(v).any():
                self.notes.append(f"{name}: no valid value (all negative or infinite): treated as absent")
            return None
        if valid.all():
            return v
        self.notes.append(
            f"{name} missing, NaN, infinite or negative in {int((~valid).sum())} row(s) "
            f"(first at {self._at(~valid)}): held the previous valid sample"
        )
        idx = np.maximum.accumulate(np.where(valid, np.arange(len(v)), 0))
        first = int(np.flatnonzero(valid)[0])
        idx[:first] = first
        return v[idx]
