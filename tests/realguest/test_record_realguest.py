"""``overcommitd record`` against real Linux guests: the recorded used_kib follows what the
guests' workload did, before, while and after their balloons are inflated, for a guest
with DEFLATE_ON_OOM and one without. About three minutes of recording."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import libvirt

from overcommitd.record import MANIFEST
from tests.realguest.conftest import Guests
from tests.realguest.harness import GuestSpec, Libvirtd, wait_for
from tests.realguest.recording import BALLOON_MIB, LATEST, SCHEDULE, SCHEDULE_FILE, WORK, Step, check_guest, rows_of

MIB = 1024
REPO = Path(__file__).resolve().parents[2]


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
                    self.steps[name].append(Step(time.time(), int(mib), self._began(name)))

    def _began(self, name: str) -> float | None:
        """When the next step's rise began: its scheduled time after the workload's first
        line (printed at its start), less 1 s for this poll and the workload's own."""
        done = self.steps[name]
        if not done or len(done) >= len(SCHEDULE):
            return None
        return done[0].at_s + SCHEDULE[len(done)][1] - 1.0

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


def test_recorded_used_kib_follows_the_workload_through_a_balloon(libvirtd: Libvirtd, guests: Guests) -> None:
    names = ["rec-plain", "rec-doo"]
    doms = guests.boot(
        GuestSpec("rec-plain", work=WORK, stats_period_s=2),
        GuestSpec("rec-doo", work=WORK, autodeflate=True, stats_period_s=2),
    )
    watch = ConsoleWatch(guests, names)
    out = guests.console_dir / "recording"
    proc = record(libvirtd, out)
    balloon: list[Step] = []
    try:
        wait_for(lambda: len(watch.steps["rec-doo"]) >= 2, 120, "both workloads at 150 MiB")
        time.sleep(25)
        began = time.time()
        for dom in doms:  # what `virsh setmem --live` does; the recorder only watches
            dom.setMemoryFlags(BALLOON_MIB * MIB, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        balloon.append(Step(time.time(), BALLOON_MIB, began))
        wait_for(lambda: all(len(watch.steps[n]) >= 4 for n in names), 150, "the workloads at 200 MiB")
        time.sleep(20)
        began = time.time()
        for dom in doms:
            dom.setMemoryFlags(512 * MIB, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        balloon.append(Step(time.time(), 512, began))
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
    for name in names:
        steps = watch.steps[name]
        assert [s.mib for s in steps] == [mib for mib, _ in SCHEDULE], steps
        check_guest(name, rows[name], steps, balloon)


def keep(out: Path, steps: dict[str, list[Step]], balloon: list[Step]) -> None:
    """Write what happened beside the recording and keep a copy in .cache for replays."""
    schedule = {
        "work": {n: [asdict(s) for s in ss] for n, ss in steps.items()},
        "balloon_mib": [asdict(s) for s in balloon],
        "guest_mib": 512,
    }
    (out / SCHEDULE_FILE).write_text(json.dumps(schedule, indent=2) + "\n")
    shutil.rmtree(LATEST, ignore_errors=True)
    shutil.copytree(out, LATEST)
