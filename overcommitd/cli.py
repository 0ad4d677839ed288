"""``overcommitd ...`` subcommands. The only module that wires concrete parts together
and the only one that turns an ``OvercommitdError`` into an exit code (2)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from overcommitd.config import ConfigError, DaemonConfig
from overcommitd.model import OvercommitdError

EXIT_BAD_INPUT = 2


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file, including the policy's parameters; one line per error."""
    from policies import registry

    try:
        cfg = DaemonConfig.load(args.path)
        registry.create(cfg.policy.name, cfg.policy.params)
    except ConfigError as e:
        for key, msg in e.problems:
            print(f"{e.path}: {key}: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except registry.PolicyLoadError as e:
        print(f"{args.path}: policy: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{args.path}: ok (policy {cfg.policy.name}, {len(cfg.guests)} guest overrides)")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from sim.cli import replay_command

    return replay_command(args)


def cmd_sim_scenario(args: argparse.Namespace) -> int:
    from sim.scenarios import scenario_command

    return scenario_command(args.name, list_only=args.list, plot_path=args.plot, every_s=args.every_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overcommitd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a config file; exit 2 on errors")
    p.add_argument("path", type=Path)
    p.set_defaults(func=cmd_check_config)

    from sim.cli import add_replay_arguments

    p = sub.add_parser("replay", help="replay memory traces through the control step on a simulated host")
    add_replay_arguments(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("sim", help="simulator tools: protocol-level virtio-balloon scenarios")
    sim_sub = p.add_subparsers(dest="sim_command", required=True)
    p = sim_sub.add_parser("scenario", help="run a built-in scenario, print its timeline (omit NAME to list them)")
    p.add_argument("name", nargs="?", help="scenario name")
    p.add_argument("--list", action="store_true", help="list the scenarios")
    p.add_argument("--plot", type=Path, help="also draw the timeline to this image file (PNG, SVG, PDF)")
    p.add_argument("--every-s", type=float, default=1.0, help="one printed row per this many simulated seconds")
    p.set_defaults(func=cmd_sim_scenario)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except OvercommitdError as e:
        print(f"overcommitd: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
