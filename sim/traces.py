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

Both: rows are sorted by time; a gap longer than ``max_gap_s`` (Bitbrains' ~30 h
outage, Google instances that stopped running for up to 520 h) is cut out, so the
trace's clock is stitched and replay time always has data. Shorter gaps hold the last
sample. A malformed row raises ``TraceError`` naming the file and line.
"""

from __future__ import annotations

import gzip
import io
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

from overcommitd.model import OvercommitdError

BUNDLED_DIR = Path(__file__).parent / "data" / "traces"
DEFAULT_MACHINE_KIB = 512 * 1024 * 1024
DEFAULT_MAX_GAP_S = 3600.0
SIZE_ROUND_KIB = 128 * 1024

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
    from ``t_s[i]`` until the next sample. ``disk_read_kib_s`` and ``disk_write_kib_s``
    are file read and write throughput, None where the source has no such column.
    """

    name: str
    source: str
    size_kib: int
    t_s: npt.NDArray[np.float64]
    demand_kib: npt.NDArray[np.int64]
    disk_read_kib_s: npt.NDArray[np.float64] | None
    disk_write_kib_s: npt.NDArray[np.float64] | None
    gaps_cut: int = 0

    @property
    def duration_s(self) -> float:
        """Time covered, counting the last sample as one median interval long."""
        if len(self.t_s) < 2:
            return 300.0
        return float(self.t_s[-1] + np.median(np.diff(self.t_s)))


def bundled() -> list[Path]:
    """The traces shipped in the package: every Bitbrains file, then every Google file."""
    return expand([BUNDLED_DIR / "bitbrains-rnd", BUNDLED_DIR / "google2019-instance-usage"])


def expand(paths: Sequence[Path]) -> list[Path]:
    """Files as given; directories replaced by their ``*.csv``/``*.csv.gz`` files, sorted
    numerically where names are numbers (Bitbrains VM ids)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = [f for f in p.rglob("*") if f.name.endswith((".csv", ".csv.gz")) and f.name != "index.csv"]
            out.extend(sorted(found, key=_natural_key))
        elif p.exists():
            out.append(p)
        else:
            raise TraceError(f"{p}: no such trace file or directory")
    if not out:
        raise TraceError(f"no trace files (*.csv, *.csv.gz) under {', '.join(map(str, paths))}")
    return out


def _natural_key(p: Path) -> tuple[str, int, str]:
    stem = p.name.split(".")[0].split("-")[0]
    return (str(p.parent), int(stem) if stem.isdigit() else -1, p.name)


def load(path: Path, *, machine_kib: int = DEFAULT_MACHINE_KIB, max_gap_s: float = DEFAULT_MAX_GAP_S) -> Trace:
    """Load a trace, telling the source by its header."""
    with _open(path) as f:
        header = f.readline()
        if BITBRAINS_TIME in header:
            return _load_bitbrains(path, f, header, max_gap_s)
        if all(c in header.strip().split(",") for c in GOOGLE_COLUMNS):
            return _load_google(path, f, header, machine_kib, max_gap_s)
    raise TraceError(
        f"{path}:1: unknown trace format: expected a Bitbrains header ({BITBRAINS_TIME!r}, ...) "
        f"or a Google 2019 instance_usage header ({', '.join(GOOGLE_COLUMNS)}, ...)"
    )


def _open(path: Path) -> IO[str]:
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        return io.StringIO(data.decode("utf-8"))
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: cannot read: {e}") from e


def _rows(
    path: Path, f: IO[str], names: list[str], wanted: Sequence[str], sep: str
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
            values = [float(cells[i]) for i in idx]
        except ValueError:
            bad = next(names[i] for i in idx if not _is_float(cells[i]))
            raise TraceError(f"{path}:{lineno}: {bad} is not a number: {cells[names.index(bad)]!r}") from None
        if any(math.isnan(v) or v < 0 for v in values):
            raise TraceError(f"{path}:{lineno}: negative or NaN value in {', '.join(wanted)}: {values}")
        yield lineno, values


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _load_bitbrains(path: Path, f: IO[str], header: str, max_gap_s: float) -> Trace:
    names = [n.strip() for n in header.rstrip("\r\n").split(";\t")]
    # The disk columns are optional: a file without one says so (None), none is invented.
    io = tuple(c for c in (BITBRAINS_DISK_READ, BITBRAINS_DISK_WRITE) if c in names)
    wanted = (BITBRAINS_TIME, BITBRAINS_USAGE, BITBRAINS_CAPACITY, *io)
    rows = np.array([v for _, v in _rows(path, f, names, wanted, ";\t")], dtype=np.float64).reshape(-1, len(wanted))
    if len(rows) == 0:
        raise TraceError(f"{path}: no data rows")
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    usage = _hold_nonzero(path, rows[:, 1])
    capacity = rows[:, 2][rows[:, 2] > 0]
    size = Counter(capacity.tolist()).most_common(1)[0][0] if len(capacity) else 0.0
    size_kib = _round_up(max(size, float(usage.max())))
    t_s, keep, cut = _stitch(rows[:, 0], max_gap_s)
    demand = usage[keep].astype(np.int64)
    read, write = (
        rows[keep, wanted.index(c)] if c in io else None for c in (BITBRAINS_DISK_READ, BITBRAINS_DISK_WRITE)
    )
    return Trace(_name(path), "bitbrains", size_kib, t_s, demand, read, write, cut)


def _load_google(path: Path, f: IO[str], header: str, machine_kib: int, max_gap_s: float) -> Trace:
    names = header.rstrip("\r\n").split(",")
    rows = np.array([v for _, v in _rows(path, f, names, GOOGLE_COLUMNS, ",")], dtype=np.float64).reshape(-1, 3)
    if len(rows) == 0:
        raise TraceError(f"{path}: no data rows")
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    demand = _hold_nonzero(path, rows[:, 1]) * machine_kib
    size_kib = _round_up(max(float(rows[:, 2].max()) * machine_kib, float(demand.max())))
    t_s, keep, cut = _stitch(rows[:, 0] / 1e6, max_gap_s)
    return Trace(_name(path), "google2019", size_kib, t_s, demand[keep].astype(np.int64), None, None, cut)


def _hold_nonzero(path: Path, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Zeros (missing measurements) take the previous non-zero value; leading zeros the
    first one."""
    nonzero = np.flatnonzero(values > 0)
    if len(nonzero) == 0:
        raise TraceError(f"{path}: every memory usage sample is 0: nothing to replay")
    idx = np.maximum.accumulate(np.where(values > 0, np.arange(len(values)), 0))
    idx[: nonzero[0]] = nonzero[0]
    return values[idx]


def _stitch(
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


def _round_up(kib: float) -> int:
    return int(-(-kib // SIZE_ROUND_KIB) * SIZE_ROUND_KIB)


def _name(path: Path) -> str:
    stem = path.name.removesuffix(".gz").removesuffix(".csv")
    return f"{path.parent.name}/{stem}"
