"""A recording of real guests by ``overcommitd record``, kept for replays.

``tests/realguest/test_record_realguest.py`` boots two real guests whose workload follows
``SCHEDULE``, records them with ``overcommitd record`` and checks the recording; it leaves
the latest recording in ``LATEST`` (under .cache, not committed). A copy of one run is
committed in ``FIXTURE`` so a replay test needs no guests: ``recording_dir()`` returns it.
``schedule.json`` in the same directory says, per guest, when (Unix time, as observed on
the guest's console) its workload changed, and when the test moved its balloon.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
    """From ``at_s`` (Unix time) on, the guest's workload held ``mib``."""

    at_s: float
    mib: int


def recording_dir(*, latest: bool = False) -> Path:
    """The committed recording of real guests (or the last one this machine made)."""
    return LATEST if latest else FIXTURE


def load_steps(directory: Path) -> dict[str, list[Step]]:
    """Each guest's workload steps as the recording test observed them."""
    data = json.loads((directory / SCHEDULE_FILE).read_text())
    return {name: [Step(float(s["at_s"]), int(s["mib"])) for s in steps] for name, steps in data["work"].items()}
