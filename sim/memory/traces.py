"""Real memory traces, loaded into one shape: a guest size and a demand curve.

Two sources (see ``sim/data/traces/*/PROVENANCE.md``), each with quirks handled here:

Bitbrains GWA-T-12 Rnd (``;\\t``-separated, one VM per file)
    * ``Timestamp [ms]`` holds epoch **seconds** despite its label.
    * ``Memory usage [KB]`` is actively used memory in KiB: the anonymous working set.
      A zero usage sample is a missing measurement (11 of 150 VMs report 0 for over half
      their samples), so it holds the previous non-zero value.
    * ``Memory capacity provisioned [KB]`` changes within a file, is 0 in some samples
      and once ~511 GB: the guest size is the mode of the non-zero values, raised to the
      largest usage if usage exceeds it (31 VMs), rounded up to 128 MiB.
    * ``Disk read throughput [KB/s]`` and ``Disk write throughput [KB/s]`` drive
      page-cache growth in the guest model (written data is cached too, dirty first).

Google ClusterData 2019 ``instance_usage`` (CSV, one container per file)
    * ``time`` is in microseconds; values are **normalized** to the largest machine, so
      they are multiplied by ``machine_kib`` (default 512 GiB, an assumption: absolute
      sizes are not published).
    * demand is ``max_memory_usage`` (the 5-minute peak: what must fit to avoid OOM);
      the size is the largest ``memory_limit`` (``assigned_memory`` is 0 in one job).
    * no disk I/O columns: ``disk_read_kib_s`` and ``disk_write_kib_s`` are None, and
      the scorecard says so (``io_columns``) rather than inventing reads.

Materna GWA-T-13 shares the Bitbrains layout; a ``;`` separator without the tab and a
``Timestamp`` column holding ``dd.mm.yyyy HH:MM:SS`` dates (UTC) are accepted too.

overcommitd's own format (``docs/trace-format.md``, ``overcommitd.traceformat``) holds
many guests per file and a guest across many files: ``sim.memory.trace_loader.load_all`` hands those files to
``sim.memory.trace_reader`` and the others to ``load``, one guest per file.

All: rows are sorted by time; a gap longer than ``max_gap_s`` (Bitbrains' ~30 h
outage, Google instances that stopped running for up to 520 h) is cut out, so the
trace's clock is stitched and replay time always has data. Shorter gaps hold the last
sample. A malformed row raises ``TraceError`` naming the file and line; what the
loader did with duplicates and gaps is in ``Trace.notes``. Clean files are parsed by
pyarrow; any file it does not take goes row by row, which names the offending line.
"""

from __future__ import annotations

import gzip
import io
import math
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal

import numpy as np
import numpy.typing as npt

from overcommitd import traceformat
from overcommitd.model import OvercommitdError

BUNDLED_DIR = Path(__file__).parents[1] / "data" / "traces"
DEFAULT_MACHINE_KIB = 512 * 1024 * 1024
DEFAULT_MAX_GAP_S = 3600.0
SIZE_ROUND_KIB = 128 * 1024
GAP_HOLD_FACTOR = 2.0  # a gap over twice the median period is reported as held

BITBRAINS_TIME = "Timestamp [ms]"
BITBRAINS_USAGE = "Memory usage [KB]"
BITBRAINS_CAPACITY = "Memory capacity provisioned [KB]"
BITBRAINS_DISK_READ = "Disk read throughput [KB/s]"
BITBRAINS_DISK_WRITE = "Disk write throughput [KB/s]"
GOOGLE_COLUMNS = ("time", "max_memory_usage", "memory_limit")


class TraceError(OvercommitdError):
    """A trace file that cannot be read; the message names the file and line."""


@dataclass(frozen=True, slots=True, eq=False)
class Trace:
    """One guest's memory over time.

    ``t_s`` starts at 0 and strictly increases (gaps cut out); ``demand_kib[i]`` holds
    from ``t_s[i]`` until the next sample. ``disk_read_kib_s``/``disk_write_kib_s`` are
    file I/O rates, None where the source has no such column (absent data is not zero
    I/O). ``notes`` say what the loader did with gaps, duplicates and bad values;
    ``columns`` names the optional columns of the documented format that had data.
    """

    name: str
    source: str
    size_kib: int
    t_s: npt.NDArray[np.float64]
    demand_kib: npt.NDArray[np.int64]
    disk_read_kib_s: npt.NDArray[np.float64] | None
    disk_write_kib_s: npt.NDArray[np.float64] | None
    gaps_cut: int = 0
    cache_kib: npt.NDArray[np.int64] | None = None
    notes: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()

    @property
    def duration_s(self) -> float:
        """Time covered, counting the last sample as one median interval long."""
        if len(self.t_s) < 2:
            return 300.0
        return float(self.t_s[-1] + np.median(np.diff(self.t_s)))


def bundled() -> list[Path]:
    """The traces shipped in the package: every Bitbrains file, then every Google file."""
    return expand([BUNDLED_DIR / "bitbrains-rnd", BUNDLED_DIR / "google2019-instance-usage"])


TRACE_SUFFIXES = (".csv", ".csv.gz", ".parquet")
HOST_FILE_PREFIX = "host-"  # a recording's host rows (traceformat.HOST_COLUMNS), not guests


def expand(paths: Sequence[Path]) -> list[Path]:
    """Files as given; directories replaced by their trace files (``*.csv``, ``*.csv.gz``,
    ``*.parquet``; not ``index.csv`` nor a recording's ``host-*`` files), sorted
    numerically where names are numbers (Bitbrains VM ids), else by name (a recording's
    hourly files in time order)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = [f for f in p.rglob("*") if f.is_file() and _is_trace_file(f.name)]
            out.extend(sorted(found, key=_natural_key))
        elif p.exists():
            out.append(p)
        else:
            raise TraceError(f"{p}: no such trace file or directory")
    if not out:
        raise TraceError(f"no trace files (*.csv, *.csv.gz, *.parquet) under {', '.join(map(str, paths))}")
    return out


def _is_trace_file(name: str) -> bool:
    return name.endswith(TRACE_SUFFIXES) and name != "index.csv" and not name.startswith(HOST_FILE_PREFIX)


def _natural_key(p: Path) -> tuple[str, int, str]:
    stem = p.name.split(".")[0].split("-")[0]
    return (str(p.parent), int(stem) if stem.isdigit() else -1, p.name)


TraceKind = Literal["overcommitd", "bitbrains", "google2019"]


def sniff(path: Path) -> TraceKind:
    """Which format a file is in, from its first bytes: Parquet is always the documented
    format; a CSV by its header row."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
            if magic == b"PAR1":
                return "overcommitd"
            f.seek(0)
            raw: IO[bytes] = gzip.GzipFile(fileobj=f) if magic[:2] == b"\x1f\x8b" else f  # type: ignore[assignment]
            first = raw.readline(65536).decode("utf-8", errors="replace")
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise TraceError(f"{path}: cannot read: {e}") from e
    names = [n.strip().strip('"') for n in first.strip().split(",")]
    if any(c in names for c in traceformat.REQUIRED_COLUMNS):  # the reader names any missing one
        return "overcommitd"
    if first.startswith("Timestamp") and BITBRAINS_USAGE in first:
        return "bitbrains"
    if all(c in names for c in GOOGLE_COLUMNS):
        return "google2019"
    raise TraceError(
        f"{path}:1: unknown trace format: expected overcommitd's header "
        f"({', '.join(traceformat.REQUIRED_COLUMNS)}, ...; see docs/trace-format.md), "
        f"a Bitbrains/Materna header ({BITBRAINS_TIME!r}, ...) "
        f"or a Google 2019 instance_usage header ({', '.join(GOOGLE_COLUMNS)}, ...)"
    )


@dataclass(frozen=True, slots=True, eq=False)
class RawSeries:
    """One guest as its source file holds it, before the clock is stitched: rows sorted
    by time (duplicates still there), zeros already held, sizes in KiB. What a converter
    writes to the documented format, and what ``finish`` turns into a ``Trace``."""

    name: str
    source: str
    size_kib: int
    time_s: npt.NDArray[np.float64]
    used_kib: npt.NDArray[np.int64]
    disk_read_kib_s: npt.NDArray[np.float64] | None
    disk_write_kib_s: npt.NDArray[np.float64] | None


def load(path: Path, *, machine_kib: int = DEFAULT_MACHINE_KIB, max_gap_s: float = DEFAULT_MAX_GAP_S) -> Trace:
    """Load a one-guest file (Bitbrains/Materna or Google 2019), telling the source by its
    header. The documented format (many guests per file) is read by ``sim.memory.trace_loader.load_all``."""
    return finish(load_raw(path, machine_kib=machine_kib), max_gap_s)


def load_raw(path: Path, *, machine_kib: int = DEFAULT_MACHINE_KIB) -> RawSeries:
    data = _read(path)
    with io.StringIO(data.decode("utf-8")) as f:
        header = f.readline()
        if header.startswith("Timestamp") and BITBRAINS_USAGE in header:
            return _load_bitbrains(path, data, f, header)
        if all(c in header.strip().split(",") for c in GOOGLE_COLUMNS):
            return _load_google(path, data, f, header, machine_kib)
    sniff(path)  # raises the "unknown trace format" error, or names the documented format
    raise TraceError(
        f"{path}:1: a trace in overcommitd's format holds many guests: read it with sim.memory.trace_loader.load_all"
    )


def finish(raw: RawSeries, max_gap_s: float) -> Trace:
    """Stitch the clock (duplicates dropped, long gaps cut) and keep the matching rows."""
    t_s, keep, cut = stitch(raw.time_s, max_gap_s)
    notes = clock_notes(raw.time_s, keep, cut, max_gap_s, lambda i: f"{raw.name} time {raw.time_s[i]:.0f}")
    return Trace(
        raw.name,
        raw.source,
        raw.size_kib,
        t_s,
        raw.used_kib[keep],
        None if raw.disk_read_kib_s is None else raw.disk_read_kib_s[keep],
        None if raw.disk_write_kib_s is None else raw.disk_write_kib_s[keep],
        cut,
        notes=tuple(notes),
    )


def _read(path: Path) -> bytes:
    """The file's text, decompressed, checked to be UTF-8."""
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        data.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: cannot read: {e}") from e
    return data


def _matrix(
    path: Path,
    data: bytes,
    f: IO[str],
    names: list[str],
    wanted: Sequence[str],
    sep: str,
    parse: Callable[[str], float],
) -> npt.NDArray[np.float64]:
    """The wanted columns as a (rows, len(wanted)) array. pyarrow parses when the file is
    clean; anything it does not take, or a NaN or negative value, sends the file through
    the exact row-by-row path, which names the line of the problem."""
    fast = _fast_matrix(data, names, wanted, sep) if parse is float else None
    if fast is not None:
        return fast
    found = [v for _, v in _rows(path, f, names, wanted, sep, parse=parse)]
    return np.array(found, dtype=np.float64).reshape(-1, len(wanted))


def _fast_matrix(data: bytes, names: list[str], wanted: Sequence[str], sep: str) -> npt.NDArray[np.float64] | None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if any(w not in names for w in wanted) or len(set(names)) != len(names):
        return None
    body = data if sep == "," else data.replace(sep.encode(), b",")
    read = pacsv.ReadOptions(column_names=names, skip_rows=1)
    convert = pacsv.ConvertOptions(column_types=dict.fromkeys(wanted, pa.float64()), include_columns=list(wanted))
    try:
        table = pacsv.read_csv(pa.py_buffer(body), read, pacsv.ParseOptions(quote_char=False), convert)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if table.num_rows == 0 or any(table.column(w).null_count for w in wanted):
        return None
    rows = np.column_stack([table.column(w).to_numpy() for w in wanted]).astype(np.float64)
    if not np.isfinite(rows).all() or (rows < 0).any():
        return None
    return rows


def _rows(
    path: Path, f: IO[str], names: list[str], wanted: Sequence[str], sep: str, *, parse: Callable[[str], float] = float
) -> Iterator[tuple[int, list[float]]]:
    """(line number, values of the wanted columns) for each data row."""
    missing = [w for w in wanted if w not in names]
    if missing:
        raise TraceError(f"{path}:1: missing column(s) {', '.join(missing)}")
    idx = [names.index(w) for w in wanted]
    for lineno, line in enumerate(f, start=2):
        if not line.strip():
            continue
        cells = line.rstrip("\r\n").split(sep)
        if len(cells) != len(names):
            raise TraceError(f"{path}:{lineno}: expected {len(names)} fields, found {len(cells)}")
        try:
            values = [parse(cells[idx[0]]), *(float(cells[i]) for i in idx[1:])]
        except ValueError:
            bad = next(names[i] for i in idx if not _is_number(cells[i], parse if i == idx[0] else float))
            raise TraceError(f"{path}:{lineno}: {bad} is not a number: {cells[names.index(bad)]!r}") from None
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise TraceError(f"{path}:{lineno}: negative, infinite or NaN value in {', '.join(wanted)}: {values}")
        yield lineno, values


def _is_number(s: str, parse: Callable[[str], float]) -> bool:
    try:
        parse(s)
    except ValueError:
        return False
    return True


def _materna_time(cell: str) -> float:
    """Epoch seconds as Bitbrains writes them, or a ``dd.mm.yyyy HH:MM:SS`` date (UTC)."""
    try:
        return float(cell)
    except ValueError:
        return datetime.strptime(cell.strip(), "%d.%m.%Y %H:%M:%S").replace(tzinfo=UTC).timestamp()


def _load_bitbrains(path: Path, data: bytes, f: IO[str], header: str) -> RawSeries:
    """Bitbrains GWA-T-12 (``;\\t``-separated, ``Timestamp [ms]`` in epoch seconds) and
    the Materna GWA-T-13 files in its layout (``;``-separated where the tab is missing,
    a ``Timestamp`` column that may hold a date)."""
    sep = ";\t" if ";\t" in header else ";"
    names = [n.strip() for n in header.rstrip("\r\n").split(sep)]
    time_col = BITBRAINS_TIME if BITBRAINS_TIME in names else "Timestamp"
    wanted = (time_col, BITBRAINS_USAGE, BITBRAINS_CAPACITY, BITBRAINS_DISK_READ)
    write_col = [BITBRAINS_DISK_WRITE] if BITBRAINS_DISK_WRITE in names else []
    parse = float if time_col == BITBRAINS_TIME else _materna_time
    rows = _matrix(path, data, f, names, (*wanted, *write_col), sep, parse)
    if len(rows) == 0:
        raise TraceError(f"{path}: no data rows")
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    usage = _hold_nonzero(path, rows[:, 1])
    capacity = rows[:, 2][rows[:, 2] > 0]
    size = Counter(capacity.tolist()).most_common(1)[0][0] if len(capacity) else 0.0
    size_kib = _round_up(max(size, float(usage.max())))
    writes = rows[:, 4] if write_col else None
    return RawSeries(_name(path), "bitbrains", size_kib, rows[:, 0], usage.astype(np.int64), rows[:, 3], writes)


def _load_google(path: Path, data: bytes, f: IO[str], header: str, machine_kib: int) -> RawSeries:
    names = header.rstrip("\r\n").split(",")
    rows = _matrix(path, data, f, names, GOOGLE_COLUMNS, ",", float)
    if len(rows) == 0:
        raise TraceError(f"{path}: no data rows")
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    demand = _hold_nonzero(path, rows[:, 1]) * machine_kib
    size_kib = _round_up(max(float(rows[:, 2].max()) * machine_kib, float(demand.max())))
    return RawSeries(_name(path), "google2019", size_kib, rows[:, 0] / 1e6, demand.astype(np.int64), None, None)


def _hold_nonzero(path: Path, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Zeros (missing measurements) take the previous non-zero value; leading zeros the
    first one."""
    nonzero = np.flatnonzero(values > 0)
    if len(nonzero) == 0:
        raise TraceError(f"{path}: every memory usage sample is 0: nothing to replay")
    idx = np.maximum.accumulate(np.where(values > 0, np.arange(len(values)), 0))
    idx[: nonzero[0]] = nonzero[0]
    return values[idx]


def stitch(
    t_raw: npt.NDArray[np.float64], max_gap_s: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], int]:
    """Times from 0 with long gaps cut to one median interval and duplicate timestamps
    dropped (the first sample of a duplicate run is kept)."""
    keep = np.ones(len(t_raw), dtype=bool)
    keep[1:] = np.diff(t_raw) > 0
    t = t_raw[keep]
    dt = np.diff(t)
    step = float(np.median(dt)) if len(dt) else 300.0
    long_gaps = dt > max_gap_s
    dt[long_gaps] = step
    return np.concatenate(([0.0], np.cumsum(dt))), keep, int(long_gaps.sum())


def clock_notes(
    time_s: npt.NDArray[np.float64],
    keep: npt.NDArray[np.bool_],
    cut: int,
    max_gap_s: float,
    where: Callable[[int], str],
) -> list[str]:
    """What ``stitch`` did, in words: duplicates dropped, short gaps held, long ones cut.
    ``where(i)`` names the place of sorted row ``i`` in its file."""
    notes = []
    dups = np.flatnonzero(~keep)
    if len(dups):
        notes.append(f"{len(dups)} duplicate timestamp(s) (first at {where(int(dups[0]))}): kept the first row of each")
    kept = np.flatnonzero(keep)
    dt = np.diff(time_s[kept])
    if not len(dt):
        return notes
    period = float(np.median(dt))
    held = (dt > GAP_HOLD_FACTOR * period) & (dt <= max_gap_s)
    if held.any():
        notes.append(
            f"{int(held.sum())} gap(s) over {GAP_HOLD_FACTOR:g}x the {period:g} s period, "
            f"longest {float(dt[held].max()):g} s: the last sample holds through each"
        )
    if cut:
        first = int(kept[int(np.flatnonzero(dt > max_gap_s)[0]) + 1])
        notes.append(
            f"{cut} gap(s) longer than {max_gap_s:g} s (first ending at {where(first)}, "
            f"longest {float(dt.max()):g} s): cut out, the clock is stitched"
        )
    return notes


def _round_up(kib: float) -> int:
    return int(-(-kib // SIZE_ROUND_KIB) * SIZE_ROUND_KIB)


def _name(path: Path) -> str:
    stem = path.name.removesuffix(".gz").removesuffix(".csv")
    return f"{path.parent.name}/{stem}"
