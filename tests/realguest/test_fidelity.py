"""Issue 16 item 6: the simulator held to a real guest. Two real 1024 MiB guests (one with
DEFLATE_ON_OOM) run ``fidelity.SCHEDULE`` under ``overcommitd run`` with ``pid`` while
``overcommitd record`` records them; the workloads as they really ran are then replayed
through ``overcommitd replay``'s arguments with the same config, and the balloons must
agree (``fidelity`` has the bars and the figures). About six minutes under TCG."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.realguest.conftest import Guests
from tests.realguest.fidelity import (
    CONFIG,
    GUEST_MIB,
    LATEST,
    RECORD_INTERVAL_S,
    RUN_AFTER_LAST_S,
    SCHEDULE,
    STATS_PERIOD_S,
    WORK,
    GuestRun,
    WorkStep,
    assert_holds,
    figures,
    table,
    write_run,
)
from tests.realguest.harness import GuestSpec, Libvirtd, wait_for

REPO = Path(__file__).resolve().parents[2]
NAMES = {"fid-plain": False, "fid-doo": True}  # guest name: DEFLATE_ON_OOM
# The 6.1 OOM killer's report (mm/oom_kill.c __oom_kill_process(), KERN_ERR: shown at loglevel=4).
POLL_S = 0.05  # the consoles' poll: a rise under TCG takes 0.5-3 s
KILLED = re.compile(r"Out of memory: Killed process|Killed process \d+ \(workload\)")


class Consoles:
    """Timestamps, per guest, each ``RG-BEGIN``/``RG-AT``/``RG-WORK`` line (a workload
    change begins, has touched so much, ends) and OOM kill on its console as it appears
    (polled every ``POLL_S``, each stamped half a poll before it was seen)."""

    def __init__(self, guests: Guests) -> None:
        self.guests = guests
        self.lines: dict[str, list[tuple[float, str, int]]] = {n: [] for n in NAMES}
        self.kills: dict[str, list[float]] = {n: [] for n in NAMES}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            for name in NAMES:
                text = self.guests.console(name)
                seen_s = time.time() - POLL_S / 2
                seen = re.findall(r"RG-(BEGIN|AT|WORK) (\d+)", text)
                self.lines[name] += [(seen_s, kind, int(m)) for kind, m in seen[len(self.lines[name]) :]]
                kills = KILLED.findall(text)
                self.kills[name] += [seen_s] * (len(kills) - len(self.kills[name]))

    def started(self, name: str) -> float | None:
        return next((t for t, kind, _ in self.lines[name] if kind == "WORK"), None)

    def steps(self, name: str) -> tuple[WorkStep, ...]:
        """Each change from its RG-BEGIN to its RG-WORK line, through its RG-AT lines;
        one the OOM killer cut short ends at the kill."""
        out: list[WorkStep] = []
        begun: tuple[float, int] | None = None
        progress: list[tuple[float, int]] = []
        for t, kind, mib in self.lines[name]:
            if kind == "BEGIN":
                begun, progress = (t, mib), []
            elif kind == "AT":
                progress.append((t, mib))
            else:
                out.append(WorkStep(begun[0] if begun else t, t, mib, tuple(progress)))
                begun, progress = None, []
        if begun is not None and self.kills[name]:
            out.append(WorkStep(begun[0], self.kills[name][0], begun[1], tuple(progress)))
        return tuple(out)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "overcommitd", *cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT
        )


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()[-4000:]


def test_simulator_follows_real_guests_under_pid(libvirtd: Libvirtd, guests: Guests, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "overcommitd.toml").write_text(CONFIG + f'[libvirt]\nuri = "{libvirtd.uri}"\n')
    guests.boot(
        *(
            GuestSpec(n, memory_mib=GUEST_MIB, work=WORK, autodeflate=doo, stats_period_s=STATS_PERIOD_S)
            for n, doo in NAMES.items()
        )
    )
    consoles = Consoles(guests)
    cfg = str(run / "overcommitd.toml")
    recording = ["record", "--config", cfg, "--out", str(run / "recording"), "--interval-s", str(RECORD_INTERVAL_S)]
    recorder = start(recording, run / "rec.log")
    t0_s = time.time()
    daemon = start(["run", "--config", cfg], run / "daemon.log")
    try:
        wait_for(lambda: all(consoles.started(n) for n in NAMES), 120, "both workloads started")
        last_s = max(consoles.started(n) or 0.0 for n in NAMES) + SCHEDULE[-1][1] + RUN_AFTER_LAST_S
        time.sleep(max(last_s - time.time(), 0.0))
        end_s = time.time()
    finally:
        stop(daemon, run / "daemon.log")
        stop(recorder, run / "rec.log")
        consoles.stop()
    runs = [GuestRun(n, doo, consoles.steps(n), tuple(consoles.kills[n])) for n, doo in NAMES.items()]
    write_run(run, t0_s, end_s, runs)
    shutil.rmtree(LATEST, ignore_errors=True)
    shutil.copytree(run, LATEST)  # kept for `python -m tests.realguest.fidelity`

    for g in runs:  # the premise: every step ran, unless the OOM killer took the workload
        assert g.kills_s or [s.mib for s in g.steps] == [mib for mib, _ in SCHEDULE], g
    figs = figures(run)
    print(table(figs))
    assert_holds(figs)
