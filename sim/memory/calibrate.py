"""``overcommitd sim calibrate RECORDING...``: the guest model's constants fitted from
real guests' own balloon stats, written as a guest-model file for replays.

Why: a replay is only as close to a host as its guests' constants (issue 16: three
constants set from the real guest cut the replay's error from 6.9 % to 2.9 % of RAM).
They depend on the guest kernel, its config and the machine type, so they are read from
the operator's own recording (``docs/trace-format.md``, the ``stat_*`` columns) rather
than assumed. What is fitted, per guest, then for the fleet:

- reserved memory: ``provisioned - MemTotal`` with the balloon empty (MemTotal is the
  kernel's managed pages; the balloon only lowers it, so the largest MemTotal is the one
  with the balloon empty, or any MemTotal of a DEFLATE_ON_OOM guest);
- the reserve between MemFree and MemAvailable: si_mem_available() (mm/page_alloc.c)
  takes totalreserve_pages (high watermarks + lowmem_reserve) off MemFree and credits
  half the page cache while the cache is under the low watermarks, so ``MemFree -
  MemAvailable + caches / 2`` over the low-cache samples is the reserve (less half the
  reclaimable slab, which the model has no separate term for: it is what the replay needs);
- kernel memory: ``MemTotal - MemFree - caches`` at the guest's idlest sample (the
  balloon's pages taken out for a DEFLATE_ON_OOM guest), an upper bound that is met when
  the guest was idle at some point in the recording.
Fleet: ``fixed + pct * provisioned`` by least squares when the guests have at least two
sizes, else the median of the fixed part with the slope measured on the test image
(``sim.memory.kernel.DEBIAN_6_1_PC``). The kernel version is the lowest one that sends every tag
recorded (``sim.memory.stat_tags``; libvirt drops tags 10-15, so a libvirt recording says 6.1
for any newer kernel too, which is what the daemon sees); THP is on when the reserve is
nearer the kernel's rule with THP on than off (``sim.memory.kernel.boot``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import ValidationError

from overcommitd import traceformat as tf
from sim.memory.guest_model_file import GuestModelFile
from sim.memory.kernel import DEBIAN_6_1_PC, GuestKernel, boot
from sim.memory.stat_tags import TAGS
from sim.memory.trace_reader import MAX_SIZE_KIB
from sim.memory.traces import TraceError, expand

F64 = npt.NDArray[np.float64]
MEM_TOTAL, MEM_FREE = "stat_total_memory_kib", "stat_free_memory_kib"
MEM_AVAILABLE, CACHES = "stat_available_memory_kib", "stat_disk_caches_kib"
NEEDED = (tf.TIME_S, tf.GUEST, tf.PROVISIONED_KIB, MEM_TOTAL, MEM_FREE, MEM_AVAILABLE, CACHES)
OPTIONAL = (tf.ACTUAL_KIB, tf.DEFLATE_ON_OOM)
MIN_SAMPLES = 3  # fewer valid samples of a guest: it is left out, and said so


class CalibrationError(TraceError):
    """A recording that cannot be calibrated from: the message says what is missing where."""


@dataclass(frozen=True, slots=True)
class GuestFit:
    """One guest's constants, KiB."""

    guest: str
    provisioned_kib: int
    samples: int
    reserved_kib: int
    reserve_kib: int  # MemFree - MemAvailable at low cache, plus half the cache
    kernel_kib: int


@dataclass(frozen=True, slots=True)
class Calibration:
    guests: tuple[GuestFit, ...]
    skipped: tuple[str, ...]  # guests left out, with why
    model: GuestModelFile

    def to_toml(self, sources: list[Path]) -> str:
        """The guest-model file, with each guest's figures as comments."""
        gm, gk = self.model.guest_model, self.model.guest_kernel
        lines = [
            f"# overcommitd sim calibrate: {len(self.guests)} guests from {', '.join(map(str, sources))}",
            "# Replay with: overcommitd replay --guest-model THIS_FILE",
            "# guest, provisioned, samples, reserved, MemFree-MemAvailable reserve, kernel (KiB):",
            *(
                f"#   {g.guest}: {g.provisioned_kib} {g.samples} {g.reserved_kib} {g.reserve_kib} {g.kernel_kib}"
                for g in self.guests
            ),
            *(f"# skipped {s}" for s in self.skipped),
            "",
            "[guest_model]",
            f"reserved_fixed_kib = {gm.reserved_fixed_kib}",
            f"reserved_pct = {gm.reserved_pct!r}",
            f"kernel_fixed_kib = {gm.kernel_fixed_kib}",
            f"kernel_pct = {gm.kernel_pct!r}",
            f"min_free_pct = {gm.min_free_pct!r}",
            "",
            "[guest_kernel]",
            f'version = "{gk.version}"',
            f'thp = "{gk.thp}"',
            f"watermark_scale_factor = {gk.watermark_scale_factor}",
            "",
        ]
        return "\n".join(lines)


def read_columns(path: Path) -> dict[str, Any]:
    """The columns calibration needs from one file, as numpy arrays (``guest`` as str)."""
    try:
        if path.read_bytes()[:4] == b"PAR1":
            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(path)
    except (OSError, pa.ArrowException) as e:
        raise CalibrationError(f"{path}: cannot read: {e}") from e
    missing = [c for c in NEEDED if c not in table.column_names]
    if missing:
        raise CalibrationError(
            f"{path}: missing column(s) {', '.join(missing)}: calibration needs the guests' own balloon stats "
            "(record with `overcommitd record`, which writes the stat_* columns; docs/trace-format.md)"
        )
    out: dict[str, Any] = {tf.GUEST: np.array(table.column(tf.GUEST).cast(pa.string()).to_pylist(), dtype=object)}
    for name in (*NEEDED[:1], *NEEDED[2:], *(c for c in OPTIONAL if c in table.column_names)):
        try:
            out[name] = table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)
        except pa.ArrowException as e:
            raise CalibrationError(f"{path}: column {name}: expected numbers: {e}") from e
    out["tags"] = _tags_present(table)
    return out


def _tags_present(table: pa.Table) -> frozenset[int]:
    by_field = {field: tag for tag, (field, _) in TAGS.items()}
    present = set()
    for column, field in tf.STAT_COLUMNS.items():
        if column in table.column_names and table.column(column).null_count < len(table):
            present.add(by_field[field])
    return frozenset(present)


def fit_guest(guest: str, cols: dict[str, Any]) -> GuestFit | str:
    """One guest's constants, or why it cannot be fitted."""
    total, free, avail, caches = (cols[c] for c in (MEM_TOTAL, MEM_FREE, MEM_AVAILABLE, CACHES))
    prov = cols[tf.PROVISIONED_KIB]
    sizes = prov[_sane(prov) & (prov > 0)]
    ok = _sane(total) & _sane(free) & _sane(avail) & _sane(caches) & (total > 0) & (free <= total)
    if ok.sum() < MIN_SAMPLES or sizes.size == 0:
        return f"{guest}: {int(ok.sum())} samples with all of MemTotal, MemFree, MemAvailable and caches"
    provisioned = int(np.max(sizes))
    balloon = _doo_balloon(cols, provisioned)
    reserved = provisioned - int(np.max(total[ok]))
    kernel = int(np.min((total - free - caches - balloon)[ok]))
    return GuestFit(guest, provisioned, int(ok.sum()), reserved, _reserve(free[ok], avail[ok], caches[ok]), kernel)


def _sane(values: F64) -> npt.NDArray[np.bool_]:
    """Finite sizes within 0..1 PiB (the trace reader's bound); anything else is a bad value."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (values >= 0) & (values <= MAX_SIZE_KIB)


def _doo_balloon(cols: dict[str, Any], provisioned: int) -> F64 | float:
    """The balloon's size where it counts as used: a DEFLATE_ON_OOM guest's MemTotal keeps
    the ballooned pages (recording doc, drivers/virtio/virtio_balloon.c)."""
    if tf.ACTUAL_KIB not in cols or tf.DEFLATE_ON_OOM not in cols:
        return 0.0
    doo = np.nan_to_num(cols[tf.DEFLATE_ON_OOM]) > 0
    return np.where(doo & np.isfinite(cols[tf.ACTUAL_KIB]), provisioned - cols[tf.ACTUAL_KIB], 0.0)


def _reserve(free: F64, avail: F64, caches: F64) -> int:
    """MemFree - MemAvailable + caches/2 where the cache credit is half the cache (the cache
    under twice the low watermarks, which are below the reserve): the reserve."""
    gap = free - avail + caches / 2
    estimate = float(np.median(gap))
    low = caches / 2 <= max(estimate, 0.0)
    return round(float(np.median(gap[low]))) if low.any() else round(estimate)


def fit_fleet(fits: list[GuestFit]) -> GuestModelFile:
    """The fleet's constants (module docstring), as the guest-model file."""
    prov = [g.provisioned_kib for g in fits]
    reserved_fixed, reserved_pct = _line(prov, [g.reserved_kib for g in fits], DEBIAN_6_1_PC.reserved_pct)
    kernel_fixed, kernel_pct = _line(prov, [g.kernel_kib for g in fits], DEBIAN_6_1_PC.kernel_pct)
    min_free_pct = statistics.median(100 * g.reserve_kib / g.provisioned_kib for g in fits)
    model = {
        "reserved_fixed_kib": max(reserved_fixed, 0),
        "reserved_pct": max(reserved_pct, 0.0),
        "kernel_fixed_kib": max(kernel_fixed, 0),
        "kernel_pct": max(kernel_pct, 0.0),
        "min_free_pct": max(min_free_pct, 0.0),
    }
    try:
        return GuestModelFile.model_validate({"guest_model": model, "guest_kernel": {"thp": _thp(fits)}})
    except ValidationError as e:
        where = ", ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise CalibrationError(f"the fitted constants are out of range ({where}): are these real guests?") from None


def _line(x: list[int], y: list[int], default_pct: float) -> tuple[int, float]:
    """y = fixed + pct/100 * x: least squares over two sizes or more, else the default slope."""
    if len(set(x)) >= 2:
        slope, fixed = np.polyfit(np.array(x, dtype=np.float64), np.array(y, dtype=np.float64), 1)
        return round(float(fixed)), float(slope) * 100
    return round(statistics.median(v - u * default_pct / 100 for u, v in zip(x, y, strict=True))), default_pct


def _thp(fits: list[GuestFit]) -> str:
    """'always' if most guests' reserve is nearer the kernel's THP rule than the plain one."""
    votes = 0
    for g in fits:
        on = boot(g.provisioned_kib, GuestKernel(thp="always")).totalreserve_kib
        off = boot(g.provisioned_kib, GuestKernel(thp="never")).totalreserve_kib
        votes += 1 if abs(g.reserve_kib - on) < abs(g.reserve_kib - off) else -1
    return "always" if votes > 0 else "never"


def _version(tags: frozenset[int]) -> str:
    """The lowest kernel that sends every recorded tag; 6.1 (the default) for tags 0-9."""
    since = max((TAGS[t][1] for t in tags), default=(2, 6))
    return "6.1" if (4, 18) <= since < (6, 12) else f"{since[0]}.{since[1]}"


def calibrate(paths: list[Path]) -> Calibration:
    """Every guest in the recording fitted, then the fleet."""
    files = [read_columns(p) for p in expand(paths)]
    merged = {k: np.concatenate([f[k] for f in files]) for k in NEEDED + OPTIONAL if all(k in f for f in files)}
    tags = frozenset().union(*(f["tags"] for f in files))
    fits: list[GuestFit] = []
    skipped: list[str] = []
    for guest in dict.fromkeys(merged[tf.GUEST].tolist()):
        rows = merged[tf.GUEST] == guest
        order = np.argsort(merged[tf.TIME_S][rows], kind="stable")
        fit = fit_guest(str(guest), {k: v[rows][order] for k, v in merged.items()})
        if isinstance(fit, GuestFit):
            fits.append(fit)
        else:
            skipped.append(fit)
    if not fits:
        raise CalibrationError(f"no guest could be calibrated from {', '.join(map(str, paths))}: " + "; ".join(skipped))
    model = fit_fleet(fits)
    kernel = model.guest_kernel.model_copy(update={"version": _version(tags)})
    return Calibration(tuple(fits), tuple(skipped), model.model_copy(update={"guest_kernel": kernel}))


def calibrate_command(paths: list[Path], out: Path | None) -> int:
    """Print each guest's figures and the fleet's file; write the file to ``out`` if given."""
    result = calibrate(paths)
    text = result.to_toml(paths)
    if out is not None:
        out.write_text(text)
    print(text, end="")
    return 0
