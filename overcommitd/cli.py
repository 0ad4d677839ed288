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
    if args.report or (args.policy and "," in args.policy):
        from sim.compare import compare_command

        return compare_command(args)
    from sim.cli import replay_command

    return replay_command(args)


def _load(args: argparse.Namespace) -> DaemonConfig:
    return DaemonConfig.load(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    """The daemon: read, decide, apply on a steady tick until SIGTERM."""
    import asyncio

    from overcommitd import logs
    from overcommitd.host import HostPaths, ProcHostReader
    from overcommitd.hypervisor.libvirt import LibvirtHypervisor
    from overcommitd.runner import Daemon

    cfg = _load(args)
    logs.setup(args.log_format or cfg.runner.log_format, verbose=args.verbose)
    host = ProcHostReader(HostPaths(cfg.host.meminfo_path, cfg.host.psi_memory_path, cfg.host.ksm_dir))
    daemon = Daemon(
        cfg, LibvirtHypervisor(cfg.libvirt), host, config_path=args.config, cli_dry_run=args.dry_run or None
    )

    async def main() -> None:
        daemon.install_signal_handlers()
        await daemon.run(once=args.once)

    asyncio.run(main())
    return 0


def cmd_guest_set_floor(args: argparse.Namespace) -> int:
    """Write a guest's SLA floor into its domain's <metadata>; the daemon picks it up."""
    from overcommitd.hypervisor.libvirt import LibvirtHypervisor
    from overcommitd.model import parse_kib

    try:
        floor_kib = parse_kib(args.size)
    except ValueError as e:
        print(f"overcommitd: SIZE: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not isinstance(floor_kib, int) or floor_kib < 0:
        print(f"overcommitd: SIZE: {args.size!r} must be a size >= 0, e.g. 512MiB", file=sys.stderr)
        return EXIT_BAD_INPUT
    cfg = _load(args)
    libvirt_cfg = cfg.libvirt.model_copy(update={"uri": args.uri}) if args.uri else cfg.libvirt
    hv = LibvirtHypervisor(libvirt_cfg)
    hv.connect()
    try:
        uuid = hv.set_floor(args.name, floor_kib)
    finally:
        hv.close()
    print(f"{args.name} ({uuid}): floor {floor_kib} KiB")
    return 0


def cmd_sim_scenario(args: argparse.Namespace) -> int:
    from sim.scenarios import scenario_command

    return scenario_command(args.name, list_only=args.list, plot_path=args.plot, every_s=args.every_s)


def cmd_tune(args: argparse.Namespace) -> int:
    from sim.tune import tune_command

    return tune_command(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from sim.plan import plan_command

    return plan_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overcommitd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a config file; exit 2 on errors")
    p.add_argument("path", type=Path)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("run", help="run the daemon against libvirt")
    p.add_argument("--config", type=Path, default=None, help="TOML config (see config.example.toml)")
    p.add_argument("--dry-run", action="store_true", help="decide and publish, but set no balloon")
    p.add_argument("--once", action="store_true", help="one tick, then exit")
    p.add_argument("--log-format", choices=["json", "text"], default=None, help="default: [runner] log_format")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("guest", help="per-guest settings kept in the domain's libvirt metadata")
    guest_sub = p.add_subparsers(dest="guest_command", required=True)
    p = guest_sub.add_parser("set-floor", help="set a guest's SLA floor (the guard never balloons below it)")
    p.add_argument("name", help="domain name or UUID")
    p.add_argument("size", help="KiB as an integer, or e.g. 512MiB, 2GiB")
    p.add_argument("--config", type=Path, default=None, help="for [libvirt] uri")
    p.add_argument("--uri", default=None, help="libvirt URI (default: the config's, else qemu:///system)")
    p.set_defaults(func=cmd_guest_set_floor)

    try:
        from sim.cli import add_replay_arguments
    except ImportError:  # the simulator is not installed in this tree: no replay command
        return parser
    p = sub.add_parser("replay", help="replay memory traces through the control step on a simulated host")
    add_replay_arguments(p)
    p.add_argument(
        "--report", type=Path, help="write PNG plots and an HTML page comparing the policies into this directory"
    )
    p.set_defaults(func=cmd_replay)

    from sim.tune import add_tune_arguments

    p = sub.add_parser("tune", help="search a policy's parameters over replays; write them as config TOML")
    add_tune_arguments(p)
    p.set_defaults(func=cmd_tune)

    from sim.plan import add_plan_arguments

    p = sub.add_parser(
        "plan", help="safe density: the highest overcommit each policy (and no ballooning) holds on the traces"
    )
    add_plan_arguments(p)
    p.set_defaults(func=cmd_plan)

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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except OvercommitdError as e:
        print(f"overcommitd: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
