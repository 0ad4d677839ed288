"""Hourly CSV files, written line by line and compressed once the hour is over.

``overcommitd record`` appends each interval's rows to the current hour's plain
``<kind>-<UTC hour>.csv`` in one ``write()``, then flushes and fsyncs: a crash (even a
power loss) loses at most the interval being written, and the file is readable while it
grows. When a row of the next hour comes, or the recorder stops, the hour's file is
gzip-compressed whole into ``<kind>-<UTC hour>.csv.gz`` (written to a temporary name,
fsynced, renamed; then the plain file is removed).

Why not one gzip member per interval: compressing an hour as one stream lets deflate
reuse the previous intervals' rows (guest names, sizes, values that barely move), and
``benchmarks/bench_record.py`` measured it 4-5x smaller than a member per interval.

Restarts resume where the last run stopped, whatever the way it stopped:

* the hour's plain file exists (a crash): it is kept, cut back to its last whole line if a
  write was torn (logged), and appended to; a compressed file of the same hour beside it
  is an older copy of the same rows (the crash came between rename and removal) and goes;
* only the compressed file exists (a clean stop within the hour): it is decompressed back
  into the plain file and appended to;
* plain files of other hours (a crash before their hour was compressed) are compressed by
  ``recover()``, which the recorder calls when it starts.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

Cell = str | int | float | None
# zlib's highest level: the hour is compressed once, off the sampling path's hot loop,
# and level 9 is ~15 % smaller than the default 6 on recorded rows (bench_record.py).
COMPRESS_LEVEL = 9


def hour_stamp(time_s: float) -> str:
    """The UTC hour of a Unix time, as it appears in a file name: ``2026-12-01T00Z``.
    Sorts chronologically as a string."""
    return time.strftime("%Y-%m-%dT%HZ", time.gmtime(time_s))


def encode_rows(rows: Iterable[Sequence[Cell]]) -> bytes:
    """CSV text as RFC 4180 has it, ``\\r\\n`` line ends; None is an empty cell.
    (Python's writer quotes a cell only for the characters of its line terminator: with
    ``\\n`` alone a ``\\r`` in a guest's name would go out bare and end the line.)"""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerows(["" if c is None else c for c in row] for row in rows)
    return buf.getvalue().encode()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def compress(plain: Path) -> Path:
    """``x.csv`` -> ``x.csv.gz``, crash-safe: the compressed file appears whole or not at
    all, and the plain one goes only after it."""
    done = plain.with_name(plain.name + ".gz")
    tmp = plain.with_name(plain.name + ".gz.tmp")
    with open(plain, "rb") as src, gzip.GzipFile(tmp, "wb", compresslevel=COMPRESS_LEVEL, mtime=0) as dst:
        shutil.copyfileobj(src, dst)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, done)
    _fsync_dir(plain.parent)
    plain.unlink()
    return done


class HourlyCsv:
    """Rows of one kind (``guests``, ``host``) into ``<dir>/<kind>-<UTC hour>.csv``, one
    file per UTC hour, compressed when the hour ends."""

    def __init__(self, directory: Path, kind: str, header: Sequence[str]) -> None:
        self.directory = directory
        self.kind = kind
        self.header = tuple(header)
        self.hour: str | None = None
        self._file: BinaryIO | None = None

    def plain_path(self, hour: str) -> Path:
        return self.directory / f"{self.kind}-{hour}.csv"

    def recover(self) -> list[Path]:
        """Compress plain files left by a crash in hours other than the current one."""
        done = []
        for plain in sorted(self.directory.glob(f"{self.kind}-*.csv")):
            if plain != (self.plain_path(self.hour) if self.hour else None):
                log.warning("%s: left uncompressed by an earlier run; compressing it", plain)
                done.append(compress(plain))
        return done

    def append(self, time_s: float, rows: Sequence[Sequence[Cell]]) -> bool:
        """Write ``rows`` (sampled at ``time_s``) to that hour's file. Returns True when
        this ended an hour (the caller may summarise it): never on the first write.
        Raises OSError after cutting the file back to where it was: a failed write never
        leaves half a line for the next one to follow."""
        hour = hour_stamp(time_s)
        ended = self.hour is not None and hour != self.hour
        if hour != self.hour:
            self.finish()
            self._open(hour)
        f = self._file
        assert f is not None
        before = f.tell()
        text = (encode_rows([self.header]) if before == 0 else b"") + encode_rows(rows)
        try:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            f.truncate(before)
            f.seek(before)
            raise
        return ended

    def finish(self) -> Path | None:
        """Close and compress the current hour's file; its ``.csv.gz``, if there was one."""
        if self._file is None or self.hour is None:
            return None
        self._file.close()
        self._file = None
        return compress(self.plain_path(self.hour))

    def _open(self, hour: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        plain = self.plain_path(hour)
        packed = plain.with_name(plain.name + ".gz")
        if plain.exists():
            packed.unlink(missing_ok=True)  # an older copy of rows the plain file holds
        elif packed.exists():
            with gzip.open(packed, "rb") as src, open(plain.with_name(plain.name + ".tmp"), "wb") as dst:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(plain.with_name(plain.name + ".tmp"), plain)
            packed.unlink()
        f = open(plain, "a+b")  # noqa: SIM115 - kept open across writes, closed in finish()
        f.seek(0)
        data = f.read()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):
            log.warning("%s: dropped a torn last line (%d bytes) before appending", plain, len(data) - whole)
            f.truncate(whole)
        f.seek(whole)
        self._file, self.hour = f, hour
