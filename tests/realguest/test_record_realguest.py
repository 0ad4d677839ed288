"""``overcommitd record`` against real Linux guests: the recorded used_kib follows what the
guests' workload did, before, while and after their balloons are inflated, for a guest
with DEFLATE_ON_OOM and one without. About three minutes of recording."""

from __future__ import annotations

import csv
import gzip
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path
from statistics import median

import libvirt

from overcommitd import traceformat as tf
from overcommitd.record import MANIFEST
from tests.realguest.conftest import Guests
from tests.realguest.harness import GuestSpec, Libvirtd, wait_for
from tests.realguest.recording import LATEST, SCHEDULE, SCHEDULE_FILE, WORK, Step

MIB = 1024
REPO = Path(__file__).resolve().parents[2]
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


class ConsoleWatch:
    """Timestamps each guest's ``RG-WORK <MiB>`` console line when it appears (polled
    every 0.2 s): when its workload really changed, on the recorder's clock."""

    def __init__(self, guests: Guests, names: list[str]) -> None:
        self.guests, self.names = guests, names
        self.steps: dict[str, list[Step]] = {n: [] for n in names}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name in self.names:
                seen = re.findall(r"RG-WORK (\d+)", self.guests.console(name))
                for mib in seen[len(self.steps[name]) :]:
                    self.steps[name].append(Step(time.time(), int(mib)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def record(libvirtd: Libvirtd, out: Path) -> subprocess.Popen[str]:
    cfg = out.parent / "record.toml"
    cfg.write_text(f'[libvirt]\nuri = "{libvirtd.uri}"\n[runner]\nlog_format = "text"\n')
    return subprocess.Popen(
        [sys.executable, "-m", "overcommitd", "record", "--config", str(cfg), "--out", str(out), "--interval-s", "2"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


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
        if s.at_s <= t < s.at_s + SETTLE_S:
            return None
    return current


def test_recorded_used_kib_follows_the_workload_through_a_balloon(libvirtd: Libvirtd, guests: Guests) -> None:
    names = ["rec-plain", "rec-doo"]
    doms = guests.boot(
        GuestSpec("rec-plain", work=WORK, stats_period_s=2),
        GuestSpec("rec-doo", work=WORK, autodeflate=True, stats_period_s=2),
    )
    watch = ConsoleWatch(guests, names)
    out = guests.console_dir / "recording"
    proc = record(libvirtd, out)
    balloon: list[tuple[float, int]] = []
    try:
        wait_for(lambda: len(watch.steps["rec-doo"]) >= 2, 120, "both workloads at 150 MiB")
        time.sleep(25)
        for dom in doms:  # what `virsh setmem --live` does; the recorder only watches
            dom.setMemoryFlags(BALLOON_MIB * MIB, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        balloon.append((time.time(), BALLOON_MIB))
        wait_for(lambda: all(len(watch.steps[n]) >= 4 for n in names), 150, "the workloads at 200 MiB")
        time.sleep(20)
        for dom in doms:
            dom.setMemoryFlags(512 * MIB, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        balloon.append((time.time(), 512))
        time.sleep(20)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        watch.stop()
    assert proc.returncode == 0, err
    keep(out, watch.steps, balloon)

    rows = rows_of(out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(rows) == set(names), (manifest, err)
    balloon_steps = [Step(t, mib) for t, mib in balloon]
    for name in names:
        steps = watch.steps[name]
        assert [s.mib for s in steps] == [mib for mib, _ in SCHEDULE], steps
        check_guest(name, rows[name], steps, balloon_steps)


def check_guest(name: str, rows: list[dict[str, str]], steps: list[Step], balloon: list[Step]) -> None:
    """used_kib = baseline + workload, whatever the balloon did; and the balloon did move."""
    times = [float(r[tf.TIME_S]) for r in rows]
    used = [int(r[tf.USED_KIB]) for r in rows]
    assert all(b - a < 6 for a, b in pairwise(times)), f"{name}: gaps in {times}"
    baseline = median(u for t, u in zip(times, used, strict=True) if work_at(steps, t) == 0)
    checked: dict[tuple[int, int], int] = {}
    for t, u, r in zip(times, used, rows, strict=True):
        work, size = work_at(steps, t), work_at(balloon, t) or (512 if t < balloon[0].at_s else None)
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


def keep(out: Path, steps: dict[str, list[Step]], balloon: list[tuple[float, int]]) -> None:
    """Write what happened beside the recording and keep a copy in .cache for replays."""
    schedule = {
        "work": {n: [{"at_s": s.at_s, "mib": s.mib} for s in ss] for n, ss in steps.items()},
        "balloon_mib": [{"at_s": t, "mib": mib} for t, mib in balloon],
        "guest_mib": 512,
    }
    (out / SCHEDULE_FILE).write_text(json.dumps(schedule, indent=2) + "\n")
    shutil.rmtree(LATEST, ignore_errors=True)
    shutil.copytree(out, LATEST)
