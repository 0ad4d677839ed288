"""Hourly gzip CSV files that survive a crash: one file per UTC hour, one gzip member
per write.

``overcommitd record`` appends each interval's rows to ``<kind>-<UTC hour>.csv.gz`` as a
complete gzip member (RFC 1952 §2.2: a gzip file is a series of members; ``gzip -dc``,
Python's ``gzip`` and zlib read them as one stream) in a single ``write()``, then flushes
and fsyncs. So the file on disk is always a valid gzip file whose content is every
interval written so far: a crash (or power loss after the fsync) loses at most the
interval being written. No uncompressed "current" file is ever left behind to recover.

Each member is compressed on its own, so it pays a fresh dictionary and an 18-byte
header; at a 10 s interval with tens of guests a member holds kilobytes of CSV and that
costs little (``benchmarks/bench_record.py`` prints the bytes per guest-day).

A file that already exists when its hour is opened (a restart within the hour) is
appended to, after dropping a torn last member, if any (the tail of a write cut short by
power loss or a full disk): the good members are kept, the dropped byte count is logged.
The header row is written only into an empty file.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

Cell = str | int | float | None
# zlib's default level (its levels run 1-9); benchmarks/bench_record.py prints what it
# costs in CPU and what it saves on disk.
COMPRESS_LEVEL = 6
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib: wbits 16+15 = a gzip header and trailer


def hour_stamp(time_s: float) -> str:
    """The UTC hour of a Unix time, as it appears in a file name: ``2026-12-01T00Z``.
    Sorts chronologically as a string."""
    return time.strftime("%Y-%m-%dT%HZ", time.gmtime(time_s))


def complete_members_length(data: bytes) -> int:
    """How many leading bytes of ``data`` are whole gzip members; a torn last member
    (or trailing garbage) starts at the returned offset."""
    pos = 0
    while pos < len(data):
        d = zlib.decompressobj(_GZIP_WBITS)
        try:
            d.decompress(data[pos:])
        except zlib.error:
            break
        if not d.eof:
            break
        pos = len(data) - len(d.unused_data)
    return pos


def encode_rows(rows: Iterable[Sequence[Cell]]) -> bytes:
    """CSV text (RFC 4180, ``\\n`` line ends); None is an empty cell."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerows(["" if c is None else c for c in row] for row in rows)
    return buf.getvalue().encode()


class HourlyGzipCsv:
    """Rows of one kind (``guests``, ``host``) into ``<dir>/<kind>-<UTC hour>.csv.gz``,
    a new file when a row's hour changes. ``bytes_written`` counts compressed bytes."""

    def __init__(self, directory: Path, kind: str, header: Sequence[str]) -> None:
        self.directory = directory
        self.kind = kind
        self.header = tuple(header)
        self.hour: str | None = None
        self.bytes_written = 0
        self._file: BinaryIO | None = None

    def path_for(self, hour: str) -> Path:
        return self.directory / f"{self.kind}-{hour}.csv.gz"

    @property
    def path(self) -> Path | None:
        return None if self.hour is None else self.path_for(self.hour)

    def append(self, time_s: float, rows: Sequence[Sequence[Cell]]) -> bool:
        """Write ``rows`` (sampled at ``time_s``) as one member of that hour's file.
        Returns True when this ended an hour (the caller may summarise it): not on the
        first write.
        Raises OSError after truncating the file back to where it was: a failed write
        never leaves a torn member for the next one to follow."""
        hour = hour_stamp(time_s)
        rotated = self.hour is not None and hour != self.hour
        if hour != self.hour:
            self._open(hour)
        f = self._file
        assert f is not None
        before = f.tell()
        text = encode_rows(rows)
        if before == 0:
            text = encode_rows([self.header]) + text
        if not text:
            return rotated
        member = gzip.compress(text, compresslevel=COMPRESS_LEVEL, mtime=0)
        try:
            f.write(member)
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            f.truncate(before)
            f.seek(before)
            raise
        self.bytes_written += len(member)
        return rotated

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self, hour: str) -> None:
        self.close()
        path = self.path_for(hour)
        self.directory.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+b")  # noqa: SIM115 - kept open across writes, closed in close()
        f.seek(0)
        data = f.read()
        good = complete_members_length(data)
        if good < len(data):
            log.warning("%s: dropped a torn last gzip member (%d bytes) before appending", path, len(data) - good)
            f.truncate(good)
        f.seek(good)
        self._file, self.hour = f, hour
