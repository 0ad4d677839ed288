"""Several policies replayed over the same guests and traces, scorecards side by side.

Every policy gets the same ``ReplaySpec`` (same traces, guests, features drawn with the
same seed, same host) and the same guard rules, so a difference in the table is a
difference between the policies, not the plumbing. The table leads with what each
policy's ballooning reclaimed (``Scorecard.reclaimed_gib_h``: ballooned plus unbacked),
then the memory the host did not back, never-touched pages included. A reference run
with no ballooning at all (``none``) comes first, and each policy's "saved beyond no
ballooning" is its not-backed memory minus the reference's: the net the host gained,
which is how policies compare (a balloon that takes never-touched pages reclaims them,
but gains the host nothing it had not already).

The yardstick ("saved beyond no ballooning / better baseline") is the baseline that
saved most beyond no ballooning among those that *hold* (``sim.evaluation.metrics.violations``
is empty: no OOM kill, host never above 100 %, every guest within its paging SLO, no time
below floor): a baseline that saved memory by killing guests is no yardstick. When no
baseline holds, the row is empty and the table says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from overcommitd.config import DaemonConfig
from overcommitd.model import GuestSnapshot, HostSnapshot
from overcommitd.table import GuestTable
from policies.api import BatchResult, Policy, PolicyFactory, PolicyResult
from sim.evaluation.metrics import Scorecard, violations
from sim.evaluation.replay import UPSTREAM_BASELINES, ReplayResult, ReplaySpec, load_traces, replay
from sim.evaluation.sweep import ReplayJob, Sweep, run_replays
from sim.memory import traces as trace_io
from sim.memory.guest_model_file import load_guest_model

REFERENCE = "none"
BASELINES = UPSTREAM_BASELINES


class NoBalloon:
    """The reference: never sets a target (the guard still raises a guest below its floor)."""

    name: ClassVar[str] = REFERENCE

    def initial_state(self) -> None:
        return None

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: None) -> PolicyResult[None]:
        return PolicyResult({}, None)

    def decide_batch(self, host: HostSnapshot, guests: GuestTable, state: None) -> BatchResult[None]:
        return BatchResult(np.full(len(guests), np.nan), None)


@dataclass(frozen=True, slots=True)
class Comparison:
    """Replay results by policy name, in the order run; ``reference`` is ``none``."""

    spec: ReplaySpec
    results: dict[str, ReplayResult]
    reference: ReplayResult | None

    def saved_beyond_reference_gib_h(self, name: str) -> float:
        """Host memory not backed beyond the no-ballooning reference (GiB·h); the
        not-backed memory itself when there is no reference."""
        card = self.results[name].scorecard
        base = self.reference.scorecard.saved_gib_h if self.reference is not None else 0.0
        return card.saved_gib_h - base

    def better_baseline(self) -> str | None:
        """The baseline that saved most beyond no ballooning among those that hold; None
        if none holds."""
        holding = [b for b in BASELINES if b in self.results and not violations(self.results[b].scorecard)]
        return max(holding, key=self.saved_beyond_reference_gib_h, default=None)

    def baselines_run(self) -> list[str]:
        return [b for b in BASELINES if b in self.results]

    def cards(self) -> list[Scorecard]:
        head = [self.reference.scorecard] if self.reference is not None else []
        return head + [r.scorecard for r in self.results.values()]


def compare(
    spec: ReplaySpec,
    policies: Sequence[Policy[Any]],
    cfg: DaemonConfig,
    *,
    loaded: Sequence[trace_io.Trace] | None = None,
    reference: bool = True,
    progress: Callable[[int], object] | None = None,
    sweep: Sweep | None = None,
) -> Comparison:
    """Replay each policy (and the no-ballooning reference) on one spec; with a ``sweep``
    of more than one worker, each replay is a task of its own (same results)."""
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        raise ValueError(f"policies(={names}) must not repeat a name")
    runs: list[Policy[Any]] = ([NoBalloon()] if reference else []) + list(policies)
    if sweep is None or sweep.in_process:
        loaded = loaded if loaded is not None else load_traces(spec)
        done = [replay(spec, p, cfg, loaded=loaded, progress=progress) for p in runs]
    else:  # each policy its own task; the bar moves a whole replay at a time
        ticks = replay_ticks(spec, loaded)
        done = run_replays(
            [ReplayJob(spec, p, cfg) for p in runs],
            sweep,
            on_done=(lambda _i, _r: progress(ticks)) if progress else None,
        )
    ref = done.pop(0) if reference else None
    return Comparison(spec, {p.name: r for p, r in zip(policies, done)}, ref)


def replay_ticks(spec: ReplaySpec, loaded: Sequence[trace_io.Trace] | None) -> int:
    """Control ticks in one replay of ``spec`` (for progress bars)."""
    if spec.hours is None:
        loaded = loaded if loaded is not None else load_traces(spec)
    hours = spec.hours or max(t.duration_s for t in loaded or ()) / 3600
    return int(hours * 3600 // spec.interval_s)


# (label, scorecard field or None for a derived row, format, better: "max", "min" or "")
ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("reclaimed by ballooning, GiB·h", "reclaimed_gib_h", "{:.0f}", "max"),
    ("reclaimed by ballooning, % of provisioned", "reclaimed_pct", "{:.1f}", "max"),
    ("host memory not backed (incl. never touched), GiB·h", "saved_gib_h", "{:.0f}", "max"),
    ("host memory not backed (incl. never touched), % of provisioned", "saved_pct", "{:.1f}", "max"),
    ("saved beyond no ballooning, GiB·h", "beyond_reference", "{:.0f}", "max"),
    ("saved beyond no ballooning / better baseline", "vs_baseline", "{:.3f}x", ""),  # 3 places: a bar at 1.5x
    ("unserved demand (killed workloads), GiB·h", "unserved_gib_h", "{:.1f}", "min"),
    ("guest-seconds degraded", "degraded_guest_s", "{:.0f}", "min"),
    ("host above 100 %, s", "host_over_100_s", "{:.0f}", "min"),
    ("host above 100 %, GiB·h", "host_over_100_gib_h", "{:.1f}", "min"),
    ("host short beyond any balloon, s", "host_short_s", "{:.0f}", ""),
    ("host short beyond any balloon, peak GiB", "host_short_peak_gib", "{:.1f}", ""),
    ("host short beyond any balloon, GiB·h", "host_short_gib_h", "{:.1f}", ""),
    ("host swap-in, MiB per guest-hour", "host_swap_in_mib_per_guest_h", "{:.2f}", "min"),
    ("worst guest paging, % of WSS per min", "worst_guest_paging_pct_per_min", "{:.3f}", "min"),
    ("guests over the paging SLO", "guests_over_slo", "{:d}", "min"),
    ("not backed: ballooned now, GiB·h", "saved_ballooned_gib_h", "{:.0f}", ""),
    ("not backed: deflated, untouched since, GiB·h", "saved_unbacked_gib_h", "{:.0f}", ""),
    ("not backed: returned by free page reporting, GiB·h", "saved_reported_gib_h", "{:.0f}", ""),
    ("not backed: never touched since boot, GiB·h", "saved_untouched_gib_h", "{:.0f}", ""),
    ("host use peak, %", "host_peak_pct", "{:.1f}", "min"),
    ("host use p95, %", "host_p95_pct", "{:.1f}", "min"),
    ("swap-in, MiB per guest-hour", "swap_in_mib_per_guest_h", "{:.2f}", "min"),
    ("page-cache refaults, MiB per guest-hour", "refault_mib_per_guest_h", "{:.2f}", "min"),
    ("major faults per guest-hour", "major_faults_per_guest_h", "{:.0f}", "min"),
    ("OOM kills", "oom_kills", "{:d}", "min"),
    ("guest-seconds below floor", "below_floor_guest_s", "{:.0f}", "min"),
    ("balloon operations", "balloon_ops", "{:d}", "min"),
    ("out-of-puff retries", "out_of_puff_retries", "{:d}", "min"),
    ("auto-deflate events (1 MiB)", "auto_deflate_events", "{:d}", "min"),
    ("recovery after a jump p50, s", "recovery_p50_s", "{:.0f}", "min"),
    ("recovery after a jump p95, s", "recovery_p95_s", "{:.0f}", "min"),
)


def row_values(comp: Comparison, key: str) -> dict[str, float]:
    """One table row by policy name (reference included)."""
    names = ([REFERENCE] if comp.reference is not None else []) + list(comp.results)
    beyond = comp.saved_beyond_reference_gib_h
    if key == "beyond_reference":
        return {n: beyond(n) if n != REFERENCE else 0.0 for n in names}
    if key == "vs_baseline":
        better = comp.better_baseline()
        best = beyond(better) if better is not None else 0.0
        return {n: (beyond(n) / best if best > 0 and n != REFERENCE else float("nan")) for n in names}
    cards = {c.policy: c for c in comp.cards()}
    return {n: float(getattr(cards[n], key)) for n in names}


def _fmt(fmt: str, value: float) -> str:
    if math.isnan(value):
        return "-"
    return fmt.format(int(value) if "d}" in fmt else value)


def table_rows(comp: Comparison) -> tuple[list[str], list[tuple[str, list[str], list[bool]]]]:
    """Header (policy names) and rows of (label, cells, best-mark per cell). The best
    mark goes to the policies (not the reference) with the best value of a row."""
    names = ([REFERENCE] if comp.reference is not None else []) + list(comp.results)
    rows = []
    for label, key, fmt, better in ROWS:
        values = row_values(comp, key)
        ranked = [values[n] for n in comp.results if not math.isnan(values[n])]
        best = (max(ranked) if better == "max" else min(ranked)) if better and ranked else None
        marks = [n != REFERENCE and best is not None and values[n] == best for n in names]
        rows.append((label, [_fmt(fmt, values[n]) for n in names], marks))
    return names, rows


def format_table(comp: Comparison) -> str:
    """The comparison as a Markdown table; ``*`` marks the best policy of each row."""
    names, rows = table_rows(comp)
    c0 = comp.cards()[0]
    head = (
        f"{c0.guests} guests, {c0.hours:.0f} h scored after {c0.warmup_h:.0f} h of warm-up, "
        f"{c0.provisioned_gib:.0f} GiB provisioned on a {c0.host_gib:.0f} GiB host; "
        f"paging SLO {c0.slo_pct_per_min:g} % of each guest's working set per minute; * = best policy of the row\n\n"
    )
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, cells, marks in rows:
        shown = [f"{c}*" if m else c for c, m in zip(cells, marks)]
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    return head + "\n".join(lines) + "\n\n" + "\n".join(table_notes(comp))


def table_notes(comp: Comparison) -> list[str]:
    """Lines under the table: the yardstick and the traces' disk I/O columns."""
    run = comp.baselines_run()
    better = comp.better_baseline()
    notes = []
    if run and better is None:
        notes.append(f"better baseline: none of {', '.join(run)} holds (kills, host over 100 %, SLO or floor)")
    elif better is not None:
        notes.append(
            f"better baseline: {better}, the baseline that saved most beyond no ballooning among those that hold"
        )
    notes.append(io_note(comp.cards()[0]))
    return notes


def io_note(card: Scorecard) -> str:
    """What file I/O the page cache followed: the traces' disk columns, said plainly."""
    if card.io_columns == "none":
        return "disk I/O: the traces have no disk I/O columns; guests read and write nothing (none is invented)"
    if card.io_columns == "mixed":
        return "disk I/O: some traces have disk I/O columns, some do not (those read and write nothing)"
    return f"disk I/O: page cache fills from the traces' disk {card.io_columns.replace('+', ' and ')} columns"


def spec_from_args(args: Any, cfg: DaemonConfig) -> ReplaySpec:
    """The ReplaySpec the ``replay`` arguments describe; replay, side by side and tune all build it here.
    An argument given wins over the ``--guest-model`` file's ``[guests]``."""
    fields: dict[str, object] = {
        "hours": args.hours,
        "start_h": args.start_hours,
        "interval_s": cfg.interval_s,
        "overcommit": args.overcommit,
        "seed": args.seed,
    }
    if getattr(args, "guest_model", None):  # issue 16: the guests' own constants (sim.memory.guest_model_file)
        fields.update(load_guest_model(args.guest_model).replay_fields())
    for name in ("warmup_h", "slo_pct_per_min", "guard_baselines", "floor_pct", "stats_period_s"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if getattr(args, "stats_phase_s", None):
        fields["stats_phase_s"] = tuple(args.stats_phase_s)
    if getattr(args, "guest_swap_mib", None) is not None:
        fields["guest_swap_kib"] = args.guest_swap_mib * 1024
    for name in ("deflate_on_oom_share", "reporting_share"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if getattr(args, "deflate_on_oom_guests", None):
        fields["deflate_on_oom_guests"] = tuple(p for p in args.deflate_on_oom_guests if p != "-")
    if getattr(args, "model", None):
        fields["model"] = args.model
    if args.trace:
        fields["traces"] = tuple(args.trace)
    if args.guests:
        fields["guests"] = args.guests
    return ReplaySpec.model_validate(fields)


def create_policies(names: Sequence[str], cfg: DaemonConfig, make_policy: PolicyFactory) -> list[Policy[Any]]:
    """Policies by name; the config's params go to the policy the config names."""
    return [make_policy(n, cfg.policy.params if n == cfg.policy.name else {}) for n in names]
