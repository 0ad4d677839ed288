"""``overcommitd replay``: arguments, the progress bar and the printed scorecard."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from overcommitd.config import DaemonConfig
from policies import registry
from sim.compare import spec_from_args
from sim.metrics import Scorecard
from sim.replay import ReplaySpec, load_traces, replay
from sim.sweep import add_sweep_arguments


def add_replay_arguments(p: argparse.ArgumentParser) -> None:
    defaults = ReplaySpec.model_fields
    p.add_argument("--trace", type=Path, nargs="+", help="trace files or directories (default: the bundled traces)")
    p.add_argument("--policy", help="policy name or module:Class (default: the config's, else trim)")
    p.add_argument("--config", type=Path, help="daemon config (guard rules, policy params, guest overrides)")
    p.add_argument("--guests", type=int, help="number of guests (default: one per trace)")
    p.add_argument("--hours", type=float, default=defaults["hours"].default, help="replayed span (default %(default)s)")
    p.add_argument("--start-hours", type=float, default=0.0, help="start this far into the traces (default 0)")
    p.add_argument("--interval-s", type=float, help="control interval (default: the config's interval_s)")
    p.add_argument(
        "--overcommit",
        type=float,
        default=defaults["overcommit"].default,
        help="provisioned / host RAM (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for guest features (default 0)")
    p.add_argument(
        "--model",
        choices=("bulk", "protocol"),
        default="bulk",
        help="bulk (fast, default) or protocol: byte-level virtio-balloon per guest",
    )
    p.add_argument("--json", type=Path, help="also write the scorecard as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sweep_arguments(p)


def replay_command(args: argparse.Namespace) -> int:
    cfg = DaemonConfig.load(args.config, **({"interval_s": args.interval_s} if args.interval_s else {}))
    name = args.policy or cfg.policy.name
    params = cfg.policy.params if name == cfg.policy.name else {}
    policy = registry.create(name, params)
    spec = spec_from_args(args, cfg)
    loaded = load_traces(spec)
    n_guests = spec.guests or len(loaded)
    total_ticks = int((spec.hours or max(t.duration_s for t in loaded) / 3600) * 3600 // spec.interval_s)
    with tqdm(total=total_ticks, unit="tick", disable=args.no_progress or None, file=sys.stderr) as bar:
        bar.set_description(f"{policy.name}: {n_guests} guests")
        result = replay(spec, policy, cfg, loaded=loaded, progress=bar.update)
    print(format_scorecard(result.scorecard))
    if args.json:
        args.json.write_text(json.dumps(result.scorecard.as_dict(), indent=2) + "\n")
    return 0


_ROWS = (
    ("guests", "guests", "{:d}"),
    ("replayed", "hours", "{:.1f} h"),
    ("provisioned guest RAM", "provisioned_gib", "{:.1f} GiB"),
    ("host RAM", "host_gib", "{:.1f} GiB"),
    ("host memory saved", "saved_gib_h", "{:.1f} GiB·h"),
    ("host memory saved, % of provisioned", "saved_pct", "{:.1f} %"),
    ("host use, peak", "host_peak_pct", "{:.1f} %"),
    ("host use, p95", "host_p95_pct", "{:.1f} %"),
    ("guest swap-in per guest-hour", "swap_in_mib_per_guest_h", "{:.2f} MiB"),
    ("guest page-cache refaults per guest-hour", "refault_mib_per_guest_h", "{:.2f} MiB"),
    ("guest major faults per guest-hour", "major_faults_per_guest_h", "{:.1f}"),
    ("guest OOM kills", "oom_kills", "{:d}"),
    ("guest-seconds below floor", "below_floor_guest_s", "{:.0f}"),
    ("balloon operations", "balloon_ops", "{:d}"),
    ("out-of-puff retries", "out_of_puff_retries", "{:d}"),
    ("auto-deflate events (1 MiB)", "auto_deflate_events", "{:d}"),
    ("demand jumps", "demand_jumps", "{:d}"),
    ("recovery after a jump, p50", "recovery_p50_s", "{:.0f} s"),
    ("recovery after a jump, p95", "recovery_p95_s", "{:.0f} s"),
)


def format_scorecard(card: Scorecard) -> str:
    width = max(len(label) for label, _, _ in _ROWS)
    lines = [f"scorecard: policy {card.policy}"]
    lines += [f"  {label:<{width}}  {fmt.format(getattr(card, key))}" for label, key, fmt in _ROWS]
    return "\n".join(lines)
