"""Replay throughput, bulk path against the full protocol model, same command.

    .venv/bin/python benchmarks/bench_replay.py [HOURS]

Replays the bundled traces (one guest per trace) with the default policy for HOURS
(default 2) at each speed and prints guest-ticks per second and the scorecard figures
both should agree on.
"""

from __future__ import annotations

import sys
import time

from overcommitd.config import DaemonConfig
from policies import registry
from sim.replay import ReplaySpec, load_traces, replay


def main() -> None:
    hours = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    cfg = DaemonConfig()
    spec = ReplaySpec(hours=hours)
    loaded = load_traces(spec)
    print(f"replay: {len(loaded)} guests x {hours:g} h at {spec.interval_s:g} s ticks, policy {cfg.policy.name}")
    for model in ("bulk", "protocol"):
        policy = registry.create(cfg.policy.name, cfg.policy.params)
        wall = time.perf_counter()
        card = replay(spec.model_copy(update={"model": model}), policy, cfg, loaded=loaded).scorecard
        wall = time.perf_counter() - wall
        guest_ticks = card.guests * int(hours * 3600 // spec.interval_s)
        print(
            f"  {model:8} {wall:7.1f} s  {guest_ticks / wall:9.0f} guest-ticks/s   "
            f"saved {card.saved_gib_h:.1f} GiB·h, balloon ops {card.balloon_ops}, "
            f"OOM kills {card.oom_kills}, auto-deflates {card.auto_deflate_events}"
        )


if __name__ == "__main__":
    main()
