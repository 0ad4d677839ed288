"""``overcommitd sim scenario NAME [--plot FILE]``: run a built-in protocol-level
scenario, print its timeline, optionally draw it. Kept apart from ``sim/cli.py`` (the
replay's), so ``overcommitd/cli.py`` only gains one hook."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_sim_parser(sub: Any) -> None:
    """Register ``sim scenario`` under the top-level subcommands."""
    p = sub.add_parser("sim", help="simulator tools: protocol-level scenarios")
    sim_sub = p.add_subparsers(dest="sim_command", required=True)
    s = sim_sub.add_parser("scenario", help="run a built-in virtio-balloon scenario and print its timeline")
    s.add_argument("name", nargs="?", help="scenario name (omit, or --list, to list them)")
    s.add_argument("--list", action="store_true", help="list the scenarios")
    s.add_argument("--plot", type=Path, help="also draw the timeline to this image file (PNG, SVG, PDF)")
    s.add_argument("--every-s", type=float, default=1.0, help="print one row per this many simulated seconds")
    s.set_defaults(func=scenario_command)


def scenario_command(args: argparse.Namespace) -> int:
    from sim.scenarios import SCENARIOS, format_timeline, plot

    if args.list or not args.name:
        for name, fn in SCENARIOS.items():
            print(f"{name:16} {' '.join((fn.__doc__ or '').split())}")
        return 0
    if args.name not in SCENARIOS:
        print(f"overcommitd: no scenario {args.name!r}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    result = SCENARIOS[args.name]()
    print(format_timeline(result, args.every_s))
    if args.plot:
        plot(result, args.plot)
        print(f"plot written to {args.plot}")
    return 0
