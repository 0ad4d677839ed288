"""A recording of real guests by ``overcommitd record``, kept for replays.

``tests/realguest/test_record_realguest.py`` boots two real guests whose workload follows
``SCHEDULE``, records them with ``overcommitd record`` and checks the recording; it leaves
the latest recording in ``LATEST`` (under .cache, not committed). A copy of one run is
committed in ``FIXTURE`` so a replay test needs no guests: ``recording_dir()`` returns it.
``schedule.json`` in the same directory says, per guest, when (Unix time, as observed on
the guest's console) its workload changed, and when the test moved its balloon.
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from statistics import median

from overcommitd import traceformat as tf

MIB = 1024
REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "data" / "recordings" / "realguest"
LATEST = REPO / ".cache" / "realguest-recording"
SCHEDULE_FILE = "schedule.json"

# The guest workload (tests/realguest/workload.c): MiB held from each time on, seconds
# after /workload starts.
SCHEDULE = ((0, 0), (150, 40), (60, 100), (200, 130))
WORK = ",".join(f"{mib}@{at_s}" for mib, at_s in SCHEDULE)


@dataclass(frozen=True, slots=True)
class Step:
    """From ``at_s`` (Unix time) on, the guest's workload held ``mib``; the change began
    at ``from_s``. workload.c prints ``RG-WORK`` only after touching every page, which
    under TCG on a busy host takes seconds, so the console line marks the end of a rise;
    its start is the scheduled time after the workload's first line."""

    at_s: float
    mib: int
    from_s: float | None = None

    @property
    def begins_s(self) -> float:
        return self.at_s if self.from_s is None else min(self.from_s, self.at_s)


def recording_dir(*, latest: bool = False) -> Path:
    """The committed recording of real guests (or the last one this machine made)."""
    return LATEST if latest else FIXTURE


def load_steps(directory: Path) -> tuple[dict[str, list[Step]], list[Step]]:
    """Each guest's workload steps as the recording test observed them, and the balloon's."""
    data = json.loads((directory / SCHEDULE_FILE).read_text())

    def step(s: dict[str, float]) -> Step:
        return Step(float(s["at_s"]), int(s["mib"]), s.get("from_s"))

    return {name: [step(s) for s in steps] for name, steps in data["work"].items()}, [
        step(s) for s in data["balloon_mib"]
    ]


BALLOON_MIB = 350  # both guests ballooned from 512 MiB to this while the workload runs
# How long after a workload step or a balloon move a row may still show the old state:
# the stats period (2 s) + the recording interval (2 s) + QEMU's throttled BALLOON_CHANGE
# (1 s) + TCG touching 200 MiB, with room to spare on 2 busy cores.
SETTLE_S = 12.0
# used_kib = baseline + workload within this. The baseline (the guest kernel, its slab and
# the initramfs in RAM) is measured from the rows before the workload starts. What moves
# beyond it: the workload's page tables (~0.2 % of what it holds: 0.4 MiB at 200 MiB), the
# kernel's per-CPU page lists and slab, the balloon driver's own pages, and the MemAvailable
# estimate (si_mem_available() subtracts watermarks that do not move with the balloon).
# 16 MiB is 3 % of the 512 MiB guest, an eighth of the smallest step (60 -> 150 MiB is 90).
TOLERANCE_KIB = 16 * MIB


def rows_of(out: Path) -> dict[str, list[dict[str, str]]]:
    by_guest: dict[str, list[dict[str, str]]] = {}
    for path in sorted(out.glob("guests-*.csv.gz")):
        with gzip.open(path, "rt") as f:
            for row in csv.DictReader(f):
                by_guest.setdefault(row[tf.GUEST], []).append(row)
    return by_guest


def work_at(steps: list[Step], t: float) -> int | None:
    """The workload's MiB at ``t``, or None within SETTLE_S of a change."""
    current = None
    for s in steps:
        if t >= s.at_s:
            current = s.mib
        if s.begins_s <= t < s.at_s + SETTLE_S:
            return None
    return current


def check_guest(name: str, rows: list[dict[str, str]], steps: list[Step], balloon: list[Step]) -> None:
    """used_kib = baseline + workload, whatever the balloon did; and the balloon did move."""
    times = [float(r[tf.TIME_S]) for r in rows]
    used = [int(r[tf.USED_KIB]) for r in rows]
    assert all(b - a < 6 for a, b in pairwise(times)), f"{name}: gaps in {times}"
    baseline = median(u for t, u in zip(times, used, strict=True) if work_at(steps, t) == 0)
    checked: dict[tuple[int, int], int] = {}
    for t, u, r in zip(times, used, rows, strict=True):
        work, size = work_at(steps, t), work_at(balloon, t) or (512 if t < balloon[0].begins_s else None)
        if work is None or size is None:
            continue
        assert abs(u - baseline - work * MIB) <= TOLERANCE_KIB, (
            f"{name} at {t:.0f}: used {u} KiB, expected {baseline} + {work} MiB ({size} MiB balloon state)"
        )
        assert abs(int(r[tf.ACTUAL_KIB]) - size * MIB) <= 4 * MIB, (name, t, r[tf.ACTUAL_KIB])
        checked[work, size] = checked.get((work, size), 0) + 1
    # Every phase was seen: idle, 150 MiB unballooned and ballooned, 60 and 200 ballooned.
    assert {(0, 512), (150, 512), (150, BALLOON_MIB), (60, BALLOON_MIB), (200, BALLOON_MIB)} <= set(checked), checked
    # The premise, on a real kernel: MemTotal lost the balloon only without DEFLATE_ON_OOM.
    total = {size: int(r["stat_total_memory_kib"]) for r in rows if (size := work_at(balloon, float(r[tf.TIME_S])))}
    first_total = int(rows[0]["stat_total_memory_kib"])
    drop_kib = first_total - total[BALLOON_MIB]
    if rows[0][tf.DEFLATE_ON_OOM] == "1":
        assert drop_kib == 0, f"{name}: MemTotal moved by {drop_kib} KiB under a DEFLATE_ON_OOM balloon"
    else:
        assert abs(drop_kib - (512 - BALLOON_MIB) * MIB) <= 2 * MIB, f"{name}: MemTotal dropped {drop_kib} KiB"
