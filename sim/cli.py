"""``overcommitd replay`` and ``overcommitd plan``: arguments, progress bars, the printed
scorecard and tables. Commands live here, above the modules they drive (``sim.evaluation.compare``
and ``sim.evaluation.report``, ``sim.evaluation.plan`` and ``sim.evaluation.plan_report``), so none of those imports another back."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from overcommitd.config import DaemonConfig
from overcommitd.shortfall import short_text
from policies.api import PolicyFactory
from sim.evaluation.compare import (
    REFERENCE,
    compare,
    create_policies,
    format_table,
    io_note,
    replay_ticks,
    spec_from_args,
)
from sim.evaluation.metrics import GIB_KIB, Scorecard, violations
from sim.evaluation.plan import (
    DEFAULT_CHECK_STEP,
    DEFAULT_MAX_RATIO,
    DEFAULT_TOLERANCE,
    START_RATIO,
    format_plan,
    plan,
    to_json,
)
from sim.evaluation.plan import summary as plan_summary
from sim.evaluation.replay import ReplaySpec, load_traces, replay
from sim.evaluation.sweep import add_sweep_arguments, sweep_from_args


def add_scoring_arguments(p: argparse.ArgumentParser) -> None:
    """How a replay is scored (warm-up, per-guest SLO, guarded baselines): replay and plan."""
    defaults = ReplaySpec.model_fields
    p.add_argument(
        "--warmup-hours",
        dest="warmup_h",
        type=float,
        default=defaults["warmup_h"].default,
        help="simulated before the scored span, not scored (default %(default)s)",
    )
    p.add_argument(
        "--slo",
        dest="slo_pct_per_min",
        type=float,
        default=defaults["slo_pct_per_min"].default,
        help="per-guest paging SLO, %% of its working set per minute (default %(default)s)",
    )
    p.add_argument(
        "--floor-pct",
        dest="floor_pct",
        type=float,
        default=defaults["floor_pct"].default,
        help="every guest's SLA floor, %% of its RAM (default %(default)s; a config [guests.<name>] floor_kib raises it)",
    )
    p.add_argument(
        "--guard-baselines",
        action="store_true",
        help="run mom and proxmox through overcommitd's guard (default: only their own limits, as upstream)",
    )


def _guest_seconds(text: str) -> tuple[str, float]:
    """``GUEST=S`` as (GUEST, S)."""
    guest, sep, seconds = text.rpartition("=")
    try:
        value = float(seconds)
    except ValueError:
        value = float("nan")
    if not sep or not guest or not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected GUEST=SECONDS, SECONDS >= 0")
    return guest, value


def add_guest_arguments(p: argparse.ArgumentParser) -> None:
    """What the simulated guests are like beyond the traces (issue 16: set to match the
    real guests a replay is compared with): stats period, swap, DEFLATE_ON_OOM. Each is
    also a key of the ``--guest-model`` file's ``[guests]``; given here, it wins."""
    defaults = ReplaySpec.model_fields
    p.add_argument(
        "--stats-period-s",
        dest="stats_period_s",
        type=float,
        help=f"the guests' balloon stats period, libvirt <stats period> (default {defaults['stats_period_s'].default}; 0: off)",
    )
    p.add_argument(
        "--stats-phase-s",
        dest="stats_phase_s",
        nargs="+",
        type=_guest_seconds,
        metavar="GUEST=S",
        help="when a guest's stats timer first fires, s (trace guest name or shell pattern; default 0): "
        "real guests' timers run each in its own phase",
    )
    p.add_argument(
        "--guest-swap-mib",
        dest="guest_swap_mib",
        type=int,
        help=f"swap space in each guest, MiB (default {defaults['guest_swap_kib'].default // 1024})",
    )
    p.add_argument(
        "--deflate-on-oom",
        dest="deflate_on_oom_guests",
        nargs="+",
        metavar="GUEST",
        help="the guests with DEFLATE_ON_OOM: trace guest names or shell patterns ('-': none); "
        "default: a random share (--deflate-on-oom-share)",
    )
    p.add_argument(
        "--deflate-on-oom-share",
        dest="deflate_on_oom_share",
        type=float,
        help=f"share of guests with DEFLATE_ON_OOM, drawn with --seed (default {defaults['deflate_on_oom_share'].default})",
    )
    p.add_argument(
        "--reporting-share",
        dest="reporting_share",
        type=float,
        help=f"share of guests with free page reporting, drawn with --seed (default {defaults['reporting_share'].default})",
    )


def add_replay_arguments(p: argparse.ArgumentParser) -> None:
    defaults = ReplaySpec.model_fields
    p.add_argument("--trace", type=Path, nargs="+", help="trace files or directories (default: the bundled traces)")
    p.add_argument("--policy", help="policy name or module:Class (default: the config's, else trim)")
    p.add_argument("--config", type=Path, help="daemon config (guard rules, policy params, guest overrides)")
    p.add_argument("--guests", type=int, help="number of guests (default: one per trace)")
    p.add_argument("--hours", type=float, default=defaults["hours"].default, help="replayed span (default %(default)s)")
    p.add_argument("--start-hours", type=float, default=0.0, help="start this far into the traces (default 0)")
    add_scoring_arguments(p)
    add_guest_arguments(p)
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
    p.add_argument("--guest-model", type=Path, help="guest constants (TOML; `overcommitd sim calibrate` writes it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sweep_arguments(p)


def replay_command(args: argparse.Namespace, make_policy: PolicyFactory) -> int:
    cfg = DaemonConfig.load(args.config, **({"interval_s": args.interval_s} if args.interval_s else {}))
    name = args.policy or cfg.policy.name
    params = cfg.policy.params if name == cfg.policy.name else {}
    policy = make_policy(name, params)
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
    ("replayed (scored)", "hours", "{:.1f} h"),
    ("warm-up (not scored)", "warmup_h", "{:.1f} h"),
    ("paging SLO per guest", "slo_pct_per_min", "{:g} % of WSS per min"),
    ("provisioned guest RAM", "provisioned_gib", "{:.1f} GiB"),
    ("host RAM", "host_gib", "{:.1f} GiB"),
    ("reclaimed by ballooning", "reclaimed_gib_h", "{:.1f} GiB·h"),
    ("reclaimed by ballooning, % of provisioned", "reclaimed_pct", "{:.1f} %"),
    ("host memory not backed (incl. never touched)", "saved_gib_h", "{:.1f} GiB·h"),
    ("host memory not backed, % of provisioned", "saved_pct", "{:.1f} %"),
    ("unserved demand (killed workloads)", "unserved_gib_h", "{:.2f} GiB·h"),
    ("guest-seconds degraded", "degraded_guest_s", "{:.0f}"),
    ("host above 100 %", "host_over_100_s", "{:.0f} s"),
    ("host above 100 %, integrated", "host_over_100_gib_h", "{:.2f} GiB·h"),
    ("host short beyond any balloon", "host_short_s", "{:.0f} s"),
    ("host short, peak", "host_short_peak_gib", "{:.1f} GiB"),
    ("host short, integrated", "host_short_gib_h", "{:.2f} GiB·h"),
    ("host swap-in per guest-hour", "host_swap_in_mib_per_guest_h", "{:.2f} MiB"),
    ("worst guest paging, % of WSS per min", "worst_guest_paging_pct_per_min", "{:.3f} %"),
    ("guests over the paging SLO", "guests_over_slo", "{:d}"),
    ("not backed: ballooned now", "saved_ballooned_gib_h", "{:.1f} GiB·h"),
    ("not backed: deflated, untouched since", "saved_unbacked_gib_h", "{:.1f} GiB·h"),
    ("not backed: returned by free page reporting", "saved_reported_gib_h", "{:.1f} GiB·h"),
    ("not backed: never touched since boot", "saved_untouched_gib_h", "{:.1f} GiB·h"),
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
    lines.append(f"  {io_note(card)}")
    held = violations(card)
    verdict = "holds" if not held else "does not hold: " + ", ".join(f"{k} {v:g}" for k, v in held.items())
    if card.host_short_peak_gib > 0:
        verdict += f"; at worst {short_text(card.host_short_peak_gib * GIB_KIB)}: no policy can hold here"
    lines.append(f"  {verdict}")
    return "\n".join(lines)


def compare_command(args: Any, make_policy: PolicyFactory) -> int:
    """``overcommitd replay --policy a,b,c [--report DIR]``: one table, optional report."""
    import sys

    from tqdm import tqdm

    cfg = DaemonConfig.load(args.config, **({"interval_s": args.interval_s} if args.interval_s else {}))
    names = [n.strip() for n in (args.policy or cfg.policy.name).split(",") if n.strip()]
    policies = create_policies(names, cfg, make_policy)
    spec = spec_from_args(args, cfg)
    sweep = sweep_from_args(args)
    loaded = load_traces(spec) if sweep.in_process else None
    ticks = replay_ticks(spec, loaded) * (len(policies) + 1)
    with tqdm(total=ticks, unit="tick", disable=args.no_progress or None, file=sys.stderr) as bar:
        bar.set_description(f"{','.join(names)}: {spec.guests or 'one per trace'} guests")
        comp = compare(spec, policies, cfg, loaded=loaded, progress=bar.update, sweep=sweep)
    table = format_table(comp)
    print(table)
    if args.json:
        import json

        args.json.write_text(json.dumps([c.as_dict() for c in comp.cards()], indent=2) + "\n")
    if args.report:
        from sim.evaluation.report import write_report

        page = write_report(comp, args.report)
        print(f"report: {page}")
    return 0


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", type=Path, nargs="+", help="trace files or directories (default: the bundled traces)")
    p.add_argument(
        "--policy",
        default="trim,pid,sla-floor,free-page,mom,proxmox,headroom",
        help="comma-separated policies (default: %(default)s); none (no ballooning) is always planned",
    )
    p.add_argument("--config", type=Path, help="daemon config (guard rules, policy params)")
    p.add_argument("--guests", type=int, help="number of guests (default: one per trace)")
    p.add_argument("--hours", type=float, default=24.0, help="replayed span of every replay (default %(default)s)")
    p.add_argument("--start-hours", type=float, default=0.0, help="start this far into the traces (default 0)")
    add_scoring_arguments(p)
    p.add_argument("--interval-s", type=float, help="control interval (default: the config's interval_s)")
    p.add_argument("--seed", type=int, default=0, help="seed for guest features (default 0)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="stop bisecting when the held and failed ratios are this close (default %(default)s)",
    )
    p.add_argument(
        "--max-overcommit",
        type=float,
        default=DEFAULT_MAX_RATIO,
        help="highest ratio tried (default %(default)s)",
    )
    p.add_argument(
        "--check-step",
        type=float,
        default=DEFAULT_CHECK_STEP,
        help=(
            "also replay every ratio of this grid below the one found, since a smaller host can hurt "
            "(default %(default)s; 0: trust the bisection)"
        ),
    )
    p.add_argument("--json", type=Path, help="write one object per policy, with every ratio tried, here")
    p.add_argument("--report", type=Path, help="write the reclaim-against-harm plot and an HTML page here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sweep_arguments(p)
    p.set_defaults(overcommit=START_RATIO, model=None)


def plan_command(args: argparse.Namespace, make_policy: PolicyFactory) -> int:
    from tqdm import tqdm

    cfg = DaemonConfig.load(args.config, **({"interval_s": args.interval_s} if args.interval_s else {}))
    names = [n.strip() for n in args.policy.split(",") if n.strip()]
    policies = create_policies([n for n in names if n != REFERENCE], cfg, make_policy)
    spec = spec_from_args(args, cfg)
    sweep = sweep_from_args(args)
    with tqdm(total=len(policies) + 1, unit="policy", disable=args.no_progress or None, file=sys.stderr) as bar:
        bar.set_description(f"plan: {sweep.scheduler or f'{sweep.workers} workers'}")
        result = plan(
            spec,
            policies,
            cfg,
            sweep,
            tolerance=args.tolerance,
            max_ratio=args.max_overcommit,
            check_step=args.check_step,
            on_done=lambda _, p: (bar.write(f"{p.policy}: {plan_summary(p)}", file=sys.stderr), bar.update(1)),
        )
    print(format_plan(result))
    if args.json:
        args.json.write_text(json.dumps(to_json(result), indent=2) + "\n")
    if args.report:
        from sim.evaluation.plan_report import write_plan_report

        print(f"report: {write_plan_report(result, format_plan(result), args.report)}")
    return 0
