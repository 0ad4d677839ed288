"""``overcommitd ...`` subcommands. The only module that wires concrete parts together
and the only one that turns an ``OvercommitdError`` into an exit code (2)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from overcommitd.config import CONFIG_ENV, ConfigError, DaemonConfig, default_config_path
from overcommitd.model import OvercommitdError
from policies import registry

if TYPE_CHECKING:
    from overcommitd.runner import ManagedHypervisor

EXIT_BAD_INPUT = 2


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file, including the policy's parameters; one line per error."""
    from policies.api import PolicyLoadError

    try:
        cfg = DaemonConfig.load(args.path)
        registry.create(cfg.policy.name, cfg.policy.params)
    except ConfigError as e:
        for key, msg in e.problems:
            print(f"{e.path}: {key}: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except PolicyLoadError as e:
        print(f"{args.path}: policy: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{args.path}: ok (policy {cfg.policy.name}, {len(cfg.guests)} guest overrides)")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    if args.report or (args.policy and "," in args.policy):
        from sim.cli import compare_command

        return compare_command(args, registry.create)
    from sim.cli import replay_command

    return replay_command(args, registry.create)


def _config_path(args: argparse.Namespace) -> tuple[Path | None, str]:
    """``--config``, else the default file if it exists, else None (defaults), with a
    line saying which, so nobody wonders which file a command used."""
    if args.config is not None:
        return Path(args.config), f"config {args.config}"
    path = default_config_path()
    if path.exists():
        return path, f"config {path} (default; --config to choose another)"
    return None, f"no config at {path} (default; ${CONFIG_ENV} or --config to choose): using defaults"


def _load(args: argparse.Namespace, *, say: bool = True) -> tuple[DaemonConfig, str]:
    """The config and the line naming it; printed on stderr unless ``say`` is False
    (``run`` logs it instead, so a JSON log stays JSON)."""
    args.config, which = _config_path(args)
    cfg = DaemonConfig.load(args.config)
    if say:
        print(f"overcommitd: {which}", file=sys.stderr)
    return cfg, which


def _hypervisor(cfg: DaemonConfig) -> ManagedHypervisor:
    """The backend ``[hypervisor] backend`` names; only it is imported."""
    if cfg.hypervisor.backend == "qmp":
        from overcommitd.hypervisor.qmp import QmpHypervisor

        return QmpHypervisor(cfg.qmp)
    from overcommitd.hypervisor.libvirt import LibvirtHypervisor

    return LibvirtHypervisor(cfg.libvirt)


def cmd_run(args: argparse.Namespace) -> int:
    """The daemon: read, decide, apply on a steady tick until SIGTERM."""
    import asyncio

    from overcommitd import logs, status
    from overcommitd.host import HostPaths, ProcHostReader
    from overcommitd.runner import Daemon, TickReport

    cfg, which = _load(args, say=False)
    logs.setup(args.log_format or cfg.runner.log_format, verbose=args.verbose)
    logging.getLogger("overcommitd.cli").info(which, extra={"event": "config", "path": str(args.config or "")})
    host = ProcHostReader(
        HostPaths(cfg.host.meminfo_path, cfg.host.psi_memory_path, cfg.host.ksm_dir, cfg.host.arcstats_path)
    )
    daemon = Daemon(
        cfg,
        _hypervisor(cfg),
        host,
        config_path=args.config,
        cli_dry_run=args.dry_run or None,
        make_policy=registry.create,
    )

    def print_decisions(report: TickReport) -> None:
        if daemon.last_status is not None:
            print(status.table(daemon.last_status), flush=True)
        elif report.error is not None:
            print(f"tick skipped, every guest held: {report.error}", flush=True)

    async def main() -> None:
        daemon.install_signal_handlers()
        await daemon.run(once=args.once, on_tick=print_decisions if args.once else None)

    asyncio.run(main())
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    """Record the host's guests and the host into the trace format until SIGTERM/SIGINT
    or ``--hours``; read-only (a read-only libvirt connection, nothing but snapshots)."""
    import signal
    import threading

    from overcommitd import logs
    from overcommitd.host import HostPaths, ProcHostReader
    from overcommitd.record import ReadOnlyGuests, Recorder

    cfg, which = _load(args, say=False)
    logs.setup(args.log_format or cfg.runner.log_format, verbose=args.verbose)
    logging.getLogger("overcommitd.cli").info(which, extra={"event": "config", "path": str(args.config or "")})
    host = ProcHostReader(
        HostPaths(cfg.host.meminfo_path, cfg.host.psi_memory_path, cfg.host.ksm_dir, cfg.host.arcstats_path)
    )
    hv, source = _recording_source(cfg)
    interval_s = args.interval_s or cfg.interval_s
    recorder = Recorder(ReadOnlyGuests(hv), host, args.out, rules=cfg.guard, interval_s=interval_s, source=source)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("overcommitd.record").info("recording %s every %g s into %s", source, interval_s, args.out)
    try:
        recorder.run(stop, hours=args.hours)
    finally:
        hv.close()
    return 0


def _recording_source(cfg: DaemonConfig) -> tuple[ManagedHypervisor, str]:
    """The backend ``record`` reads, and what it records, for the log and the manifest.
    libvirt is opened read-only, so libvirt itself refuses a target; the QMP backend
    switches each balloon's stats polling on as the daemon would (a guest without polling
    sends no stats), and the recorder only ever gets its ``snapshot()``."""
    if cfg.hypervisor.backend == "qmp":
        from overcommitd.hypervisor.qmp import QmpHypervisor

        qmp = QmpHypervisor(cfg.qmp)
        qmp.connect()
        return qmp, cfg.qmp.socket_glob
    from overcommitd.hypervisor.libvirt import LibvirtHypervisor

    return LibvirtHypervisor(cfg.libvirt, read_only=True, include_excluded=True), cfg.libvirt.uri


def _positive(text: str) -> float:
    """argparse type: a number > 0 (NaN and inf are not)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def cmd_status(args: argparse.Namespace) -> int:
    """What the running daemon does to each guest and why, from its status socket."""
    from overcommitd import status

    path = args.socket
    if path is None:
        cfg, _which = _load(args)
        if not cfg.runner.status_socket:
            print(
                f"overcommitd: {args.config}: [runner] status_socket is empty: the daemon serves no status",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        path = Path(cfg.runner.status_socket)
    doc = status.read(path)
    print(doc.model_dump_json(indent=2) if args.json else status.table(doc))
    return 0


def cmd_guest_set_floor(args: argparse.Namespace) -> int:
    """Write a guest's SLA floor into its domain's <metadata>; the daemon picks it up."""
    from pydantic import TypeAdapter, ValidationError

    from overcommitd.hypervisor.libvirt import LibvirtHypervisor
    from overcommitd.model import MAX_KIB, Kib

    try:
        floor_kib = TypeAdapter(Kib).validate_python(args.size)
    except ValidationError as e:
        why = e.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
        print(f"overcommitd: SIZE: {why} (a size from 0 to {MAX_KIB} KiB, e.g. 512MiB)", file=sys.stderr)
        return EXIT_BAD_INPUT
    cfg, _which = _load(args)
    if cfg.hypervisor.backend == "qmp" and not args.uri:
        print(
            "overcommitd: guest set-floor writes libvirt domain metadata; QMP guests have none. "
            "Use [guests.<name>] floor_kib in the config, a Proxmox VM's balloon: minimum, "
            "or the MQTT set-floor command (kept in the running daemon's memory)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
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
    from sim.evaluation.scenarios import scenario_command

    return scenario_command(
        args.name, list_only=args.list, plot_path=args.plot, every_s=args.every_s, make_policy=registry.create
    )


def cmd_sim_calibrate(args: argparse.Namespace) -> int:
    from sim.memory.calibrate import calibrate_command

    return calibrate_command(args.recording, args.out)


def cmd_tune(args: argparse.Namespace) -> int:
    from sim.evaluation.tune import tune_command

    return tune_command(args, registry.create)


def cmd_plan(args: argparse.Namespace) -> int:
    from sim.cli import plan_command

    return plan_command(args, registry.create)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overcommitd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a config file; exit 2 on errors")
    p.add_argument("path", type=Path)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("run", help="run the daemon against libvirt or QMP sockets ([hypervisor] backend)")
    p.add_argument(
        "--config", type=Path, default=None, help="TOML config (default: /etc/overcommitd/overcommitd.toml if present)"
    )
    p.add_argument("--dry-run", action="store_true", help="decide and publish, but set no balloon")
    p.add_argument("--once", action="store_true", help="one tick, then exit")
    p.add_argument("--log-format", choices=["json", "text"], default=None, help="default: [runner] log_format")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("record", help="record every guest and the host into trace files (read-only)")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML config for [libvirt] uri, [guard] staleness, [host] (default: /etc/overcommitd/overcommitd.toml if present)",
    )
    p.add_argument("--out", type=Path, required=True, help="directory for guests-*.csv.gz, host-*.csv.gz")
    p.add_argument("--interval-s", type=_positive, default=None, help="seconds between samples (default: interval_s)")
    p.add_argument("--hours", type=_positive, default=None, help="stop after this many hours (default: until SIGTERM)")
    p.add_argument("--log-format", choices=["json", "text"], default=None, help="default: [runner] log_format")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("status", help="each guest's actual, target, floor, the policy's wish and why, from the daemon")
    p.add_argument("--config", type=Path, default=None, help="to find [runner] status_socket")
    p.add_argument("--socket", type=Path, default=None, help="the status socket (default: the config's)")
    p.add_argument("--json", action="store_true", help="the whole document as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("guest", help="per-guest settings kept in the domain's libvirt metadata")
    guest_sub = p.add_subparsers(dest="guest_command", required=True)
    p = guest_sub.add_parser("set-floor", help="set a guest's SLA floor (the guard never balloons below it)")
    p.add_argument("name", help="domain name or UUID")
    p.add_argument("size", help="KiB as an integer, or e.g. 512MiB, 2GiB")
    p.add_argument(
        "--config", type=Path, default=None, help="for [libvirt] uri (default: /etc/overcommitd/overcommitd.toml)"
    )
    p.add_argument("--uri", default=None, help="libvirt URI (default: the config's, else qemu:///system)")
    p.set_defaults(func=cmd_guest_set_floor)

    try:
        _add_simulator_commands(sub)
    except ImportError as e:  # a daemon-only install: say what to install, never a traceback
        _add_missing_simulator(sub, e)
    return parser


SIMULATOR_COMMANDS = ("replay", "tune", "trace", "plan", "sim")


def _add_missing_simulator(sub: argparse._SubParsersAction[argparse.ArgumentParser], e: ImportError) -> None:
    """The simulator's commands, each explaining that its dependencies are missing."""

    def missing(_args: argparse.Namespace) -> int:
        print(
            f"overcommitd: the simulator's dependencies are not installed (no module {e.name!r}): "
            "pip install 'overcommitd[sim]' (from a clone: pip install '.[sim]')",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT

    for name in SIMULATOR_COMMANDS:
        p = sub.add_parser(name, help="(needs the simulator: pip install 'overcommitd[sim]')")
        p.set_defaults(func=missing, simulator_missing=True)  # main() lets its arguments through


def _add_simulator_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """replay, tune, trace, plan and sim: they import the simulator and its dependencies,
    all before any is registered, so a missing one registers none of them."""
    from sim.cli import add_plan_arguments, add_replay_arguments
    from sim.evaluation.tune import add_tune_arguments
    from sim.trace_cli import add_trace_parser

    p = sub.add_parser("replay", help="replay memory traces through the control step on a simulated host")
    add_replay_arguments(p)
    p.add_argument(
        "--report", type=Path, help="write PNG plots and an HTML page comparing the policies into this directory"
    )
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("tune", help="search a policy's parameters over replays; write them as config TOML")
    add_tune_arguments(p)
    p.set_defaults(func=cmd_tune)

    add_trace_parser(sub)

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
    p = sim_sub.add_parser("calibrate", help="fit the guest model's constants from a recording; write them as TOML")
    p.add_argument("recording", type=Path, nargs="+", help="recording files or directories (docs/trace-format.md)")
    p.add_argument("--out", type=Path, help="write the guest-model file here (for replay --guest-model)")
    p.set_defaults(func=cmd_sim_calibrate)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "simulator_missing", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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
