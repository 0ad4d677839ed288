"""What the replay's scorecard recording costs a scored tick (``Recorder.record``), on the
numpy reference and on the compiled path (``sim.evaluation.score_kernel``).

The ticks are a real bulk replay's (the bundled Bitbrains-rnd traces, the headroom
policy, 3x overcommit so that demand jumps, recoveries and degraded guests occur): their
``GuestTick`` arrays are kept, then recorded again into fresh ``Recorder``s on each path,
back to back, so only the recording is timed. Prints CPU microseconds per tick
(``time.process_time``) and checks that both paths give the same scorecard.

    .venv/bin/python benchmarks/bench_scorecard.py [--guests 50] [--hours 24] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from typing import Any
from unittest import mock

import numpy as np

import sim.compiled
from overcommitd.config import DaemonConfig
from policies import registry
from sim.evaluation import replay as replay_module
from sim.evaluation.metrics import GuestTick, Recorder, RunCounters, RunFacts, Scorecard
from sim.evaluation.replay import ReplaySpec, replay
from sim.memory import traces


@dataclass(frozen=True, slots=True)
class Captured:
    """One ``Recorder.record`` call's arguments, arrays copied."""

    now_s: float
    dt_s: float
    host_used_kib: float
    host_total_kib: float
    g: GuestTick


class Capturing(Recorder):
    """The replay's recorder, keeping a copy of every tick it records."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.captured: list[Captured] = []
        CAPTURED.append(self)

    def record(self, now_s: float, dt_s: float, *, host_used_kib: float, host_total_kib: float, g: GuestTick) -> None:
        copied = GuestTick(*(a.copy() for a in g))
        self.captured.append(Captured(now_s, dt_s, host_used_kib, host_total_kib, copied))
        super().record(now_s, dt_s, host_used_kib=host_used_kib, host_total_kib=host_total_kib, g=g)


CAPTURED: list[Capturing] = []


def capture(guests: int, hours: float) -> tuple[Recorder, list[Captured]]:
    """The replay's recorder (for its constants) and every scored tick it recorded."""
    spec = ReplaySpec(
        traces=(traces.BUNDLED_DIR / "bitbrains-rnd",), guests=guests, hours=hours, warmup_h=0, overcommit=3.0
    )
    with mock.patch.object(replay_module, "Recorder", Capturing):
        replay(spec, registry.create("headroom"), DaemonConfig(interval_s=spec.interval_s))
    return CAPTURED[-1], CAPTURED[-1].captured


def record_all(template: Recorder, ticks: list[Captured], *, compiled: bool) -> tuple[float, Recorder]:
    """CPU seconds to record every tick into a fresh recorder, and the recorder."""
    rec = Recorder(template.ram, template.floor, len(ticks), compiled=compiled)
    start = time.process_time()
    for t in ticks:
        rec.record(t.now_s, t.dt_s, host_used_kib=t.host_used_kib, host_total_kib=t.host_total_kib, g=t.g)
    return time.process_time() - start, rec


def card(rec: Recorder, ticks: list[Captured]) -> dict[str, Any]:
    n = len(rec.ram)
    facts = RunFacts(RunCounters.zero(), np.zeros(n), 0, 0.2)
    duration_s = len(ticks) * ticks[0].dt_s
    result: Scorecard = rec.scorecard(
        "bench", duration_s=duration_s, host_total_kib=ticks[0].host_total_kib, facts=facts
    )
    return replace(result, policy="").as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guests", type=int, default=50)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    template, ticks = capture(args.guests, args.hours)
    print(f"{len(ticks)} scored ticks of {args.guests} guests; compiled path available: {sim.compiled.AVAILABLE}")
    record_all(template, ticks[:2], compiled=True)  # compile (or load the cache) outside the timing
    best: dict[bool, float] = {}
    cards: dict[bool, dict[str, Any]] = {}
    for _ in range(args.repeat):
        for compiled in (False, True):
            cpu_s, rec = record_all(template, ticks, compiled=compiled)
            best[compiled] = min(best.get(compiled, cpu_s), cpu_s)
            cards[compiled] = card(rec, ticks)
    for compiled, label in ((False, "numpy reference"), (True, "compiled")):
        print(f"{label:16s} {1e6 * best[compiled] / len(ticks):7.1f} us/tick CPU (best of {args.repeat})")
    same = repr(cards[False]) == repr(cards[True])
    print(
        f"scorecards identical: {same}; demand jumps {cards[True]['demand_jumps']}, "
        f"degraded {cards[True]['degraded_guest_s']:.0f} guest-s, below floor {cards[True]['below_floor_guest_s']:.0f} guest-s"
    )


if __name__ == "__main__":
    main()
