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
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize  # type: ignore[import-untyped]

from overcommitd.config import DaemonConfig
from policies import registry
from sim import traces as trace_io
from sim.metrics import Scorecard
from sim.replay import DEFAULT_SLO_PCT_PER_MIN, ReplaySpec, load_traces, replay

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
    policy: str
    start: Evaluation
    best: Evaluation
    evaluations: list[Evaluation] = field(default_factory=list)
    bound: Constraints | None = None


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
) -> TuneResult:
    """Search ``dims`` of policy ``name`` over replays of ``spec``; at most ``max_evals``
    replays. ``slo_pct_per_min`` replaces the spec's per-guest paging SLO when given."""
    if slo_pct_per_min is not None:
        spec = spec.model_copy(update={"slo_pct_per_min": slo_pct_per_min})
    loaded = loaded if loaded is not None else load_traces(spec)
    fixed = dict(start_params or {})
    defaults = getattr(registry.create(name, fixed), "params", None)
    x0 = np.array([d.unit(float(getattr(defaults, d.name, (d.low + d.high) / 2))) for d in dims])
    evaluations: list[Evaluation] = []
    cache: dict[tuple[float | int, ...], Evaluation] = {}
    bound = Constraints(spec.slo_pct_per_min, oom_kills=max_oom_kills)

    def evaluate(x: np.ndarray) -> float:
        params = {d.name: d.value(float(u)) for d, u in zip(dims, x)}
        key = tuple(params.values())
        if key not in cache:
            if len(evaluations) >= max_evals:
                raise _Budget()
            result = replay(spec, registry.create(name, fixed | params), cfg, loaded=loaded)
            value, feasible = objective(result.scorecard, bound)
            cache[key] = Evaluation(params, result.scorecard, value, feasible)
            evaluations.append(cache[key])
            if on_eval is not None:
                on_eval(cache[key])
        return cache[key].objective

    evaluate(x0)
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
    return TuneResult(name, evaluations[0], best, evaluations, bound)


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
        "[policy]",
        f'name = "{result.policy}"',
        "",
        "[policy.params]",
    ]
    for k, v in (dict(fixed or {}) | b.params).items():
        lines.append(f"{k} = {v!r}" if not isinstance(v, float) else f"{k} = {v:.6g}")
    return "\n".join(lines) + "\n"


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="policy to tune (registry name or module:Class)")
    p.add_argument("--trace", type=Path, nargs="+", help="trace files or directories (default: the bundled traces)")
    p.add_argument(
        "--config", type=Path, help="daemon config: guard rules, and the starting params if it names the policy"
    )
    p.add_argument("--guests", type=int, help="number of guests (default: one per trace)")
    p.add_argument("--guest-model", type=Path, help="guest constants (TOML; `overcommitd sim calibrate` writes it)")
    p.add_argument("--hours", type=float, default=24.0, help="replayed span per evaluation (default %(default)s)")
    p.add_argument(
        "--start-hours",
        type=float,
        default=0.0,
        help="start this far into the traces (default 0): tune on one stretch, judge on another",
    )
    p.add_argument("--interval-s", type=float, help="control interval (default: the config's interval_s)")
    p.add_argument(
        "--overcommit",
        type=float,
        default=ReplaySpec.model_fields["overcommit"].default,
        help="provisioned / host RAM (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for guest features (default 0)")
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


def tune_command(args: argparse.Namespace) -> int:
    from sim.compare import spec_from_args

    cfg = DaemonConfig.load(args.config, **({"interval_s": args.interval_s} if args.interval_s else {}))
    dims = parse_dims(args.param) if args.param else SPACES.get(args.policy)
    if not dims:
        print(f"overcommitd: no search space for {args.policy!r}; give one with --param NAME=LOW:HIGH", file=sys.stderr)
        return 2
    spec = spec_from_args(args, cfg)
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
        spec,
        cfg,
        dims=dims,
        start_params=start,
        max_evals=args.max_evals,
        slo_pct_per_min=args.slo_pct_per_min,
        max_oom_kills=args.max_oom_kills,
        on_eval=show,
    )
    text = to_toml(result, {k: v for k, v in start.items() if k not in {d.name for d in dims}})
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0
