"""``overcommitd tune``: search a policy's parameters over replays with scipy.optimize.

The goal: as much memory saved as possible, subject to no OOM kill, no guest-second
below the floor, the host never above 100 % of its RAM, and what *every* guest reads
back under its own bound: its swap-ins, page-cache refaults and host swap-in (pages a
squeeze took that the guest had to fetch again). The default bound is Google's
far-memory SLO (Lagar-Cavilla et al., ASPLOS 2019): promotions of at most 0.2 % of the
guest's own working set per minute (``ReplaySpec.slo_pct_per_min``). A fleet mean would
let one guest page at 5x the SLO while the fleet looks fine: the constraint is per
guest, through the scorecard's ``guests_over_slo`` and ``worst_guest_paging_pct_per_min``.

How: every parameter of the search space is mapped to [0, 1] (log-scaled when its range
spans more than a factor of 100) and ``scipy.optimize.minimize`` (Powell: derivative-
free, bounded, a good fit for an objective that is a replay) minimises

* ``-saved %`` when every constraint holds, else
* ``100 + violation``, with ``violation = OOM kills + minutes below floor + minutes
  with the host above 100 % + guests over the SLO + the worst guest's paging over the SLO
  / the SLO``, so any feasible point beats any infeasible one and
  among infeasible points the search walks toward feasibility.

The replay is deterministic (seeded), so the starting point (the policy's defaults, or
the config's params) is evaluated first and the result is never worse than it.
The result is written as TOML the daemon config accepts (``[policy]`` + ``[policy.params]``).

Train and test: the search sees only the *train* split (``--train-guests A:B``, slices
of the expanded trace list, and ``--hours``/``--start-hours``); the start and the best
point are then replayed on the *test* split (``--test-guests``, ``--test-start-hours``,
``--test-hours``) and both are printed, so a user sees whether the tuning generalises.
By default the first half of the traces trains and the second half tests (one trace:
the test span follows the train span). The start's train and test replays run in
parallel on the sweep (``--workers``/``--scheduler``, ``sim.evaluation.sweep``), with ``--screen N``
quasi-random points (Sobol) in the same batch; Powell then starts from the best of them.
Powell's line searches are sequential, so after that batch the search runs one replay
at a time.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize  # type: ignore[import-untyped]

from overcommitd.config import DaemonConfig
from overcommitd.model import OvercommitdError
from policies.api import Policy, PolicyFactory
from sim.evaluation.metrics import Scorecard
from sim.evaluation.replay import DEFAULT_SLO_PCT_PER_MIN, ReplayResult, ReplaySpec, load_traces, replay
from sim.evaluation.sweep import ReplayJob, Sweep, add_sweep_arguments, run_replays, sweep_from_args
from sim.memory import traces as trace_io

MIB = 1024
GIB = 1024 * 1024
GOOGLE_SLO_PCT_PER_MIN = DEFAULT_SLO_PCT_PER_MIN  # far-memory promotion SLO, % of a guest's WSS per minute


@dataclass(frozen=True, slots=True)
class Dim:
    """One searched parameter: its range and whether it is an int."""

    name: str
    low: float
    high: float
    integer: bool = False

    @property
    def log(self) -> bool:
        return self.low > 0 and self.high / self.low > 100

    def value(self, u: float) -> float | int:
        """The parameter value at ``u`` in [0, 1]."""
        u = min(1.0, max(0.0, u))
        v = self.low * (self.high / self.low) ** u if self.log else self.low + u * (self.high - self.low)
        return round(v) if self.integer else float(v)

    def unit(self, v: float) -> float:
        """Inverse of ``value``."""
        v = min(self.high, max(self.low, v))
        return (
            math.log(v / self.low) / math.log(self.high / self.low)
            if self.log
            else (v - self.low) / (self.high - self.low)
        )


# Search spaces of the built-in policies; a plugin's comes from --param.
SPACES: dict[str, tuple[Dim, ...]] = {
    "pid": (
        Dim("headroom_pct", 0.0, 60.0),
        Dim("min_headroom_pct_of_max", 0.0, 50.0),
        Dim("min_headroom_kib", 32 * MIB, 4 * GIB, integer=True),
        Dim("kp_reclaim", 0.02, 1.0),
        Dim("filter_tau_s", 60.0, 172800.0),
        Dim("max_reclaim_step_kib", 16 * MIB, 1 * GIB, integer=True),
        Dim("warmup_s", 0.0, 86400.0),
        Dim("burst_factor", 0.5, 4.0),
    ),
    "sla-floor": (
        Dim("reserve_pct", 0.0, 100.0),
        Dim("min_reserve_kib", 32 * MIB, 4 * GIB, integer=True),
        Dim("max_reclaim_step_kib", 16 * MIB, 1 * GIB, integer=True),
        Dim("warmup_s", 0.0, 86400.0),
        Dim("burst_factor", 0.5, 4.0),
    ),
    "free-page": (
        Dim("reserve_pct", 0.0, 100.0),
        Dim("min_reserve_kib", 32 * MIB, 4 * GIB, integer=True),
        Dim("min_gain_kib", 0.0, 2 * GIB, integer=True),
        Dim("max_reclaim_step_kib", 16 * MIB, 1 * GIB, integer=True),
        Dim("warmup_s", 0.0, 86400.0),
        Dim("burst_factor", 0.5, 4.0),
    ),
    "trim": (
        Dim("trim_interval_s", 600.0, 172800.0),
        Dim("headroom_pct", 0.0, 50.0),
        Dim("burst_factor", 0.5, 4.0),
        Dim("min_gain_pct_of_depth", 0.0, 50.0),
    ),
    "headroom": (
        Dim("host_target_used_pct", 50.0, 100.0),
        Dim("buffer_pct", 0.0, 100.0),
        Dim("min_free_kib", 32 * MIB, 4 * GIB, integer=True),
    ),
}


@dataclass(frozen=True, slots=True)
class Constraints:
    slo_pct_per_min: float  # every guest's paging bound, % of its own working set per minute
    oom_kills: int = 0
    below_floor_guest_s: float = 0.0
    host_over_100_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Evaluation:
    params: dict[str, float | int]
    card: Scorecard
    objective: float
    feasible: bool


@dataclass(slots=True)
class TuneResult:
    """The search on the train split; ``test_start``/``test_best``: the start and the best
    point replayed on the test split (guests and hours the search never saw)."""

    policy: str
    start: Evaluation
    best: Evaluation
    evaluations: list[Evaluation] = field(default_factory=list)
    bound: Constraints | None = None
    test_start: Evaluation | None = None
    test_best: Evaluation | None = None


def objective(card: Scorecard, bound: Constraints) -> tuple[float, bool]:
    """(value to minimise, feasible); see the module docstring. The SLO is the one the
    replay scored every guest against (``card.guests_over_slo``)."""
    worst_over = max(0.0, card.worst_guest_paging_pct_per_min - bound.slo_pct_per_min)
    violation = (
        max(0, card.oom_kills - bound.oom_kills)
        + max(0.0, card.below_floor_guest_s - bound.below_floor_guest_s) / 60
        + max(0.0, card.host_over_100_s - bound.host_over_100_s) / 60
        + card.guests_over_slo
        + worst_over / max(bound.slo_pct_per_min, 1e-9)
    )
    if violation > 0:
        return 100.0 + violation, False
    return -card.saved_pct, True


def parse_dims(specs: Sequence[str]) -> tuple[Dim, ...]:
    """``NAME=LOW:HIGH`` (``:int`` suffix for integers) as Dims."""
    dims = []
    for s in specs:
        name, _, rng = s.partition("=")
        parts = rng.split(":")
        if not name or len(parts) not in (2, 3):
            raise ValueError(f"--param {s!r}: expected NAME=LOW:HIGH or NAME=LOW:HIGH:int")
        dims.append(Dim(name, float(parts[0]), float(parts[1]), integer=len(parts) == 3 and parts[2] == "int"))
    return tuple(dims)


def tune(
    name: str,
    spec: ReplaySpec,
    cfg: DaemonConfig,
    *,
    dims: Sequence[Dim],
    start_params: Mapping[str, Any] | None = None,
    max_evals: int = 40,
    slo_pct_per_min: float | None = None,
    max_oom_kills: int = 0,
    loaded: Sequence[trace_io.Trace] | None = None,
    on_eval: Callable[[Evaluation], None] | None = None,
    test_spec: ReplaySpec | None = None,
    sweep: Sweep | None = None,
    screen: int = 0,
    make_policy: PolicyFactory,
) -> TuneResult:
    """Search ``dims`` of policy ``name`` over replays of ``spec`` (the train split); at
    most ``max_evals`` replays. With ``test_spec``, the start and the best point are also
    replayed on it. The start, ``screen`` quasi-random points and the start on the test
    split run as one parallel batch on ``sweep``; Powell then starts from the best of them.
    ``slo_pct_per_min`` replaces the specs' per-guest paging SLO when given."""
    if slo_pct_per_min is not None:
        spec = spec.model_copy(update={"slo_pct_per_min": slo_pct_per_min})
        if test_spec is not None:
            test_spec = test_spec.model_copy(update={"slo_pct_per_min": slo_pct_per_min})
    fixed = dict(start_params or {})
    defaults = getattr(make_policy(name, fixed), "params", None)
    x0 = np.array([d.unit(float(getattr(defaults, d.name, (d.low + d.high) / 2))) for d in dims])
    points = [x0, *screen_points(dims, min(screen, max_evals - 1), seed=spec.seed)]
    batch = [{d.name: d.value(float(u)) for d, u in zip(dims, x)} for x in points]
    start = batch[0]
    jobs = [ReplayJob(spec, make_policy(name, fixed | p), cfg, timeline=False) for p in batch]
    if test_spec is not None:
        jobs.append(ReplayJob(test_spec, make_policy(name, fixed | start), cfg, timeline=False))
    first = run_replays(jobs, sweep or Sweep())  # in parallel: the start, the screen, the start on test
    loaded = loaded if loaded is not None else load_traces(spec)
    evaluations: list[Evaluation] = []
    cache: dict[tuple[float | int, ...], Evaluation] = {}
    bound = Constraints(spec.slo_pct_per_min, oom_kills=max_oom_kills)

    def record(params: dict[str, float | int], card: Scorecard) -> Evaluation:
        value, feasible = objective(card, bound)
        cache[tuple(params.values())] = e = Evaluation(params, card, value, feasible)
        evaluations.append(e)
        if on_eval is not None:
            on_eval(e)
        return e

    def evaluate(x: np.ndarray) -> float:
        params = {d.name: d.value(float(u)) for d, u in zip(dims, x)}
        key = tuple(params.values())
        if key not in cache:
            if len(evaluations) >= max_evals:
                raise _Budget()
            record(params, replay(spec, make_policy(name, fixed | params), cfg, loaded=loaded).scorecard)
        return cache[key].objective

    for p, r in zip(batch, first):
        record(p, r.scorecard)
    x0 = points[int(np.argmin([e.objective for e in evaluations]))]  # Powell starts from the best screened
    try:
        optimize.minimize(
            evaluate,
            x0,
            method="Powell",
            bounds=[(0.0, 1.0)] * len(dims),
            options={"maxfev": max_evals, "xtol": 0.02, "ftol": 1e-3},
        )
    except _Budget:
        pass
    best = min(evaluations, key=lambda e: e.objective)
    result = TuneResult(name, evaluations[0], best, evaluations, bound)
    if test_spec is not None:
        result.test_start, result.test_best = _on_test(
            make_policy(name, dict(fixed) | best.params), cfg, test_spec, first[-1], start, best
        )
    return result


def screen_points(dims: Sequence[Dim], n: int, *, seed: int) -> list[np.ndarray]:
    """``n`` points of the unit cube spread evenly (a scrambled Sobol sequence, seeded:
    the same points every run), for a parallel first batch before the sequential search."""
    if n <= 0:
        return []
    from scipy.stats import qmc  # type: ignore[import-untyped]

    m = max(0, math.ceil(math.log2(n)))  # Sobol's balance holds for powers of 2: draw 2**m, keep n
    return list(qmc.Sobol(len(dims), scramble=True, seed=seed).random_base2(m)[:n])


def _on_test(
    best_policy: Policy[Any],
    cfg: DaemonConfig,
    test_spec: ReplaySpec,
    start_run: ReplayResult,
    start_params: dict[str, float | int],
    best: Evaluation,
) -> tuple[Evaluation, Evaluation]:
    """The start and the best point judged on the test split (no OOM kill allowed there:
    ``--max-oom-kills`` is a concession to the train traces, not a goal)."""
    bound = Constraints(test_spec.slo_pct_per_min, oom_kills=0)

    def judged(params: dict[str, float | int], card: Scorecard) -> Evaluation:
        value, feasible = objective(card, bound)
        return Evaluation(params, card, value, feasible)

    start = judged(start_params, start_run.scorecard)
    best_card = replay(test_spec, best_policy, cfg, loaded=load_traces(test_spec)).scorecard
    return start, judged(best.params, best_card)


@dataclass(frozen=True, slots=True)
class Split:
    """Which guests (slices of the expanded trace list) and hours train and test use."""

    train_guests: slice
    test_guests: slice
    train_start_h: float
    train_hours: float
    test_start_h: float
    test_hours: float


def parse_slice(text: str, what: str) -> slice:
    """``A:B`` (either side may be empty) as a slice of the trace list; errors name ``what``."""
    a, sep, b = text.partition(":")
    try:
        if not sep:
            raise ValueError
        lo, hi = (int(a) if a else None), (int(b) if b else None)
    except ValueError:
        raise TuneError(f"{what} {text!r}: expected A:B, indices into the trace list (e.g. 0:25)") from None
    if (lo is not None and lo < 0) or (hi is not None and hi < 0):
        raise TuneError(f"{what} {text!r}: indices must be >= 0")
    return slice(lo, hi)


def default_split(n_traces: int, start_h: float, hours: float) -> Split:
    """Disjoint by default: the first half of the traces trains, the second half tests,
    over the same hours; with a single trace, the test span follows the train span."""
    if n_traces >= 2:
        half = n_traces // 2
        return Split(slice(0, half), slice(half, None), start_h, hours, start_h, hours)
    return Split(slice(None), slice(None), start_h, hours, start_h + hours, hours)


def split_specs(base: ReplaySpec, split: Split) -> tuple[ReplaySpec, ReplaySpec]:
    """The train and the test ReplaySpec of ``split``; each names its trace files."""
    files = trace_io.expand(list(base.traces))
    specs = []
    for what, guests, start_h, hours in (
        ("--train-guests", split.train_guests, split.train_start_h, split.train_hours),
        ("--test-guests", split.test_guests, split.test_start_h, split.test_hours),
    ):
        chosen = tuple(files[guests])
        if guests != slice(None) and any(trace_io.sniff(f) == "overcommitd" for f in chosen):
            raise TuneError(
                f"{what} {guests.start}:{guests.stop}: the traces include a recording, which holds many guests per "
                "file; split it by hours instead (--test-start-hours, --test-hours)"
            )
        if not chosen:
            raise TuneError(f"{what} {guests.start}:{guests.stop}: no trace of the {len(files)} given")
        specs.append(base.model_copy(update={"traces": chosen, "start_h": start_h, "hours": hours}))
    return specs[0], specs[1]


class TuneError(OvercommitdError):
    """Split arguments that cannot work (the CLI prints it, exit 2)."""


class _Budget(Exception):
    """The replay budget is spent: stop the optimiser where it is."""


def to_toml(result: TuneResult, fixed: Mapping[str, Any] | None = None) -> str:
    """The tuned parameters as a config fragment, with how they scored as comments."""
    b = result.best
    c = b.card
    slo = result.bound.slo_pct_per_min if result.bound else c.slo_pct_per_min
    lines = [
        f"# overcommitd tune: {result.policy}, {len(result.evaluations)} replays of {c.guests} guests x {c.hours:.0f} h",
        (
            f"# best: saved {c.saved_pct:.1f} % ({c.saved_gib_h:.0f} GiB·h), OOM kills {c.oom_kills}, "
            f"below floor {c.below_floor_guest_s:.0f} guest-s, host above 100 % {c.host_over_100_s:.0f} s, "
            f"worst guest paging {c.worst_guest_paging_pct_per_min:.3f} %/min (SLO {slo:g}), "
            f"{c.guests_over_slo} guests over; constraints {'met' if b.feasible else 'NOT met'}"
        ),
        (
            f"# start: saved {result.start.card.saved_pct:.1f} %, OOM kills {result.start.card.oom_kills}, "
            f"swap-in {result.start.card.swap_in_mib_per_guest_h:.2f} MiB/guest-h"
        ),
        *generalisation_lines(result),
        "[policy]",
        f'name = "{result.policy}"',
        "",
        "[policy.params]",
    ]
    for k, v in (dict(fixed or {}) | b.params).items():
        lines.append(f"{k} = {v!r}" if not isinstance(v, float) else f"{k} = {v:.6g}")
    return "\n".join(lines) + "\n"


def _card_line(label: str, e: Evaluation) -> str:
    c = e.card
    return (
        f"#   {label:<12} saved {c.saved_pct:5.1f} %  OOM kills {c.oom_kills:3d}  below floor {c.below_floor_guest_s:6.0f} s  "
        f"host >100 % {c.host_over_100_s:6.0f} s  worst guest paging {c.worst_guest_paging_pct_per_min:7.3f} %/min  "
        f"guests over SLO {c.guests_over_slo:3d}  {'ok' if e.feasible else 'NOT ok'}"
    )


def generalisation_lines(result: TuneResult) -> list[str]:
    """Start and best on the train split and on the test split, as TOML comments."""
    if result.test_start is None or result.test_best is None:
        return []
    tr, te = result.start.card, result.test_start.card
    return [
        f"# generalisation: train {tr.guests} guests x {tr.hours:.0f} h, test {te.guests} guests x {te.hours:.0f} h",
        _card_line("train start", result.start),
        _card_line("train best", result.best),
        _card_line("test start", result.test_start),
        _card_line("test best", result.test_best),
    ]


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="policy to tune (registry name or module:Class)")
    p.add_argument("--trace", type=Path, nargs="+", help="trace files or directories (default: the bundled traces)")
    p.add_argument(
        "--config", type=Path, help="daemon config: guard rules, and the starting params if it names the policy"
    )
    p.add_argument("--guests", type=int, help="number of guests (default: one per trace)")
    p.add_argument("--guest-model", type=Path, help="guest constants (TOML; `overcommitd sim calibrate` writes it)")
    p.add_argument(
        "--hours",
        "--train-hours",
        dest="hours",
        type=float,
        default=24.0,
        help="replayed span of every train evaluation (default %(default)s)",
    )
    p.add_argument(
        "--start-hours",
        "--train-start-hours",
        dest="start_hours",
        type=float,
        default=0.0,
        help="the train span starts this far into the traces (default 0)",
    )
    p.add_argument(
        "--train-guests",
        metavar="A:B",
        help="train on traces A..B-1 of the expanded trace list (default: the first half; all if one trace)",
    )
    p.add_argument(
        "--test-guests",
        metavar="A:B",
        help="report on traces A..B-1 (default: the second half; with one trace, the same trace)",
    )
    p.add_argument(
        "--test-start-hours",
        type=float,
        help="the test span starts here (default: the train start; with one trace, right after the train span)",
    )
    p.add_argument("--test-hours", type=float, help="replayed span on the test split (default: the train span)")
    p.add_argument("--interval-s", type=float, help="control interval (default: the config's interval_s)")
    p.add_argument(
        "--overcommit",
        type=float,
        default=ReplaySpec.model_fields["overcommit"].default,
        help="provisioned / host RAM (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for guest features (default 0)")
    p.add_argument(
        "--warmup-hours",
        dest="warmup_h",
        type=float,
        default=ReplaySpec.model_fields["warmup_h"].default,
        help="simulated before every scored span, not scored (default %(default)s)",
    )
    p.add_argument("--max-evals", type=int, default=40, help="replays to spend (default %(default)s)")
    p.add_argument(
        "--swap-slo",
        "--slo",
        dest="slo_pct_per_min",
        type=float,
        default=GOOGLE_SLO_PCT_PER_MIN,
        help="every guest's paging bound, %% of its own working set per minute (default %(default)s, Google far memory)",
    )
    p.add_argument(
        "--max-oom-kills",
        type=int,
        default=0,
        help="OOM kills allowed (default 0; where 0 is infeasible on a trace, e.g. the better baseline's count)",
    )
    p.add_argument(
        "--param", action="append", default=[], help="search NAME=LOW:HIGH[:int] (replaces the built-in space)"
    )
    p.add_argument("--out", type=Path, help="write the tuned parameters here as TOML (default: stdout only)")
    p.add_argument(
        "--screen",
        type=int,
        default=0,
        help="first replay this many quasi-random points in parallel, then search from the best (default 0)",
    )
    add_sweep_arguments(p)


def split_from_args(args: argparse.Namespace, spec: ReplaySpec) -> tuple[ReplaySpec, ReplaySpec]:
    """The train and test specs the split arguments describe (see ``default_split``)."""
    files = trace_io.expand(list(spec.traces))
    hours = spec.hours or 24.0
    # A recording holds many guests per file: slicing its files would put the same guests
    # in both splits, so it splits by time (the test span after the train span).
    recorded = any(trace_io.sniff(f) == "overcommitd" for f in files)
    split = default_split(1 if recorded else len(files), spec.start_h, hours)
    if args.train_guests:
        split = replace(split, train_guests=parse_slice(args.train_guests, "--train-guests"))
    if args.test_guests:
        split = replace(split, test_guests=parse_slice(args.test_guests, "--test-guests"))
    if args.test_start_hours is not None:
        split = replace(split, test_start_h=args.test_start_hours)
    if args.test_hours is not None:
        split = replace(split, test_hours=args.test_hours)
    return split_specs(spec, split)


def tune_command(args: argparse.Namespace, make_policy: PolicyFactory) -> int:
    from sim.evaluation.compare import spec_from_args

    cfg = DaemonConfig.load(args.config, **({"interval_s": args.interval_s} if args.interval_s else {}))
    dims = parse_dims(args.param) if args.param else SPACES.get(args.policy)
    if not dims:
        print(f"overcommitd: no search space for {args.policy!r}; give one with --param NAME=LOW:HIGH", file=sys.stderr)
        return 2
    train_spec, test_spec = split_from_args(args, spec_from_args(args, cfg))
    start = cfg.policy.params if args.policy == cfg.policy.name else {}

    def show(e: Evaluation) -> None:
        c = e.card
        print(
            f"  saved {c.saved_pct:5.1f} %  oom {c.oom_kills:3d}  worst guest {c.worst_guest_paging_pct_per_min:7.3f} %/min  "
            f"over SLO {c.guests_over_slo:3d}  host>100 {c.host_over_100_s:6.0f} s  "
            f"{'ok ' if e.feasible else 'bad'}  {e.params}",
            file=sys.stderr,
        )

    result = tune(
        args.policy,
        train_spec,
        cfg,
        dims=dims,
        start_params=start,
        max_evals=args.max_evals,
        slo_pct_per_min=args.slo_pct_per_min,
        max_oom_kills=args.max_oom_kills,
        on_eval=show,
        test_spec=test_spec,
        sweep=sweep_from_args(args),
        screen=args.screen,
        make_policy=make_policy,
    )
    text = to_toml(result, {k: v for k, v in start.items() if k not in {d.name for d in dims}})
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0
