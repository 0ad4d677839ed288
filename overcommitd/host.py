"""Host memory pressure from the kernel's own files: ``/proc/meminfo`` (MemAvailable,
swap), ``/proc/pressure/memory`` (PSI), KSM's sysfs counters and, on ZFS hosts, the ARC's
kstat ``/proc/spl/kstat/zfs/arcstats``.

Paths are injectable so tests read real files under a temporary directory. A missing PSI
file (kernels older than 4.20, or ``CONFIG_PSI=n``, or ``psi=0`` on the command line)
degrades to ``psi=None`` with one logged warning; a missing or malformed meminfo is an
error, since without it there is nothing to control against. A missing arcstats file
means the host has no ZFS (the module is not loaded): silently no ARC. A malformed one is
an error naming the file and line, as a wrong reading would move guests.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from overcommitd.model import HostSnapshot, OvercommitdError, PsiMemory

log = logging.getLogger(__name__)


class HostError(OvercommitdError):
    """A host memory file cannot be read or parsed."""


@dataclass(frozen=True, slots=True)
class HostPaths:
    meminfo: Path = Path("/proc/meminfo")
    psi_memory: Path = Path("/proc/pressure/memory")
    ksm_dir: Path = Path("/sys/kernel/mm/ksm")
    arcstats: Path = Path("/proc/spl/kstat/zfs/arcstats")


# kstat data types (OpenZFS include/sys/kstat.h, KSTAT_DATA_*): the integer ones. arcstats
# rows are UINT64 (4), except memory_available_bytes, INT64 (3).
_KSTAT_INTEGER_TYPES = frozenset({1, 2, 3, 4, 5, 6})


@dataclass(frozen=True, slots=True)
class ArcStats:
    """The ZFS ARC's sizes in KiB, from the kstat names of OpenZFS module/zfs/arc.c:
    ``size`` (what the ARC holds now), ``c`` (its current target), ``c_min`` and ``c_max``
    (the bounds ``c`` moves in; ``zfs_arc_min``/``zfs_arc_max``)."""

    size_kib: int
    c_kib: int
    c_min_kib: int
    c_max_kib: int

    @property
    def reclaimable_kib(self) -> int:
        """What the ARC gives back under memory pressure: it shrinks to ``c_min``, no lower
        (arc.c's arc_reap/arc_shrink stop at arc_c_min)."""
        return max(0, self.size_kib - self.c_min_kib)


def parse_arcstats(text: str, *, where: str = "/proc/spl/kstat/zfs/arcstats") -> ArcStats:
    """A kstat file: a kstat header line (``13 1 0x01 ...``), the column line ``name type
    data``, then one ``<name> <type> <value>`` row per statistic, values in bytes."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.split() == ["name", "type", "data"]), None)
    if start is None:
        raise HostError(f"{where}: no 'name type data' header line; is this a kstat file?")
    values: dict[str, int] = {}
    for lineno, line in enumerate(lines[start + 1 :], start=start + 2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or not fields[1].isdigit():
            raise HostError(f"{where}:{lineno}: expected '<name> <type> <value>', got {line.strip()[:80]!r}")
        name, kind, value = fields
        if int(kind) not in _KSTAT_INTEGER_TYPES:
            continue
        try:
            values[name] = int(value)
        except ValueError as e:
            raise HostError(f"{where}:{lineno}: {name}: {value[:40]!r} is not an integer") from e
    missing = [k for k in ("size", "c", "c_min", "c_max") if k not in values]
    if missing:
        raise HostError(f"{where}: no {', '.join(missing)} row; an OpenZFS arcstats has them all")
    return ArcStats(*(max(0, values[k]) // 1024 for k in ("size", "c", "c_min", "c_max")))


def parse_meminfo(text: str, *, where: str = "/proc/meminfo") -> dict[str, int]:
    """``Key:   123 kB`` lines to KiB; lines without a unit (HugePages_*) are counts."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts:
            continue
        try:
            out[key.strip()] = int(parts[0])
        except ValueError as e:
            raise HostError(f"{where}: {key.strip()}: {parts[0]!r} is not an integer") from e
    return out


def parse_psi(text: str, *, where: str = "/proc/pressure/memory") -> PsiMemory:
    """The two PSI lines, ``some avg10=0.12 avg60=... avg300=... total=<us>`` and ``full ...``
    (Documentation/accounting/psi.rst)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        if kind not in ("some", "full"):
            continue
        for f in fields:
            name, _, value = f.partition("=")
            try:
                values[f"{kind}_{name}"] = float(value)
            except ValueError as e:
                raise HostError(f"{where}: {kind} {name}: {value!r} is not a number") from e
    try:
        return PsiMemory(
            some_avg10=values["some_avg10"],
            some_avg60=values["some_avg60"],
            some_avg300=values["some_avg300"],
            some_total_us=int(values["some_total"]),
            # `full` exists since 4.20 for memory; absent only on odd kernels: treat as zero.
            full_avg10=values.get("full_avg10", 0.0),
            full_avg60=values.get("full_avg60", 0.0),
            full_avg300=values.get("full_avg300", 0.0),
            full_total_us=int(values.get("full_total", 0)),
        )
    except KeyError as e:
        raise HostError(f"{where}: no {e.args[0].replace('_', ' ')} field in {text[:80]!r}") from e


class ProcHostReader:
    """The ``HostReader`` of a real host. ``clock`` is wall-clock seconds, the clock of
    libvirt's ``last_update`` (host epoch), so stats ages come out right."""

    def __init__(self, paths: HostPaths = HostPaths(), clock: Callable[[], float] = time.time) -> None:
        self.paths = paths
        self.clock = clock
        self._psi_warned = False
        self._page_kib = os.sysconf("SC_PAGE_SIZE") // 1024

    def read(self) -> HostSnapshot:
        meminfo = self._meminfo()
        return HostSnapshot(
            taken_at_s=self.clock(),
            mem_total_kib=meminfo["MemTotal"],
            mem_available_kib=min(meminfo["MemAvailable"], meminfo["MemTotal"]),
            swap_total_kib=meminfo.get("SwapTotal", 0),
            swap_free_kib=meminfo.get("SwapFree", 0),
            psi=self._psi(),
            ksm_sharing_kib=self._ksm_sharing_kib(),
            arc_reclaimable_kib=arc.reclaimable_kib if (arc := self.arc()) is not None else 0,
        )

    def arc(self) -> ArcStats | None:
        """The ARC, or None on a host without ZFS (no arcstats file)."""
        path = self.paths.arcstats
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise HostError(f"cannot read {path}: {e.strerror or e}") from e
        return parse_arcstats(text, where=str(path))

    def _meminfo(self) -> dict[str, int]:
        path = self.paths.meminfo
        try:
            meminfo = parse_meminfo(path.read_text(), where=str(path))
        except OSError as e:
            raise HostError(f"cannot read {path}: {e.strerror or e}") from e
        for key in ("MemTotal", "MemAvailable"):  # MemAvailable since Linux 3.14
            if key not in meminfo:
                raise HostError(f"{path}: no {key} line; overcommitd needs Linux >= 3.14")
        return meminfo

    def _psi(self) -> PsiMemory | None:
        path = self.paths.psi_memory
        try:
            text = path.read_text()
        except OSError as e:
            if not self._psi_warned:
                log.warning(
                    "%s unreadable (%s): no host PSI; needs Linux >= 4.20 with CONFIG_PSI=y", path, e.strerror or e
                )
                self._psi_warned = True
            return None
        return parse_psi(text, where=str(path))

    def _ksm_sharing_kib(self) -> int:
        """Memory KSM saves: ``pages_sharing`` (Documentation/admin-guide/mm/ksm.rst) x page size.
        No KSM (file absent) is 0."""
        try:
            return int((self.paths.ksm_dir / "pages_sharing").read_text().strip()) * self._page_kib
        except (OSError, ValueError):
            return 0
