"""``overcommitd plan``: the safe density of each policy, the question an operator asks.

For every policy (and for ``none``, no ballooning at all) the highest overcommit ratio
(provisioned guest RAM / host RAM, ``ReplaySpec.overcommit``) at which a replay of the
same guests *holds*: ``violations(card)`` is empty (zero OOM kills, the host never above
100 %, every guest within the paging SLO, zero guest-seconds below floor).

The search, per policy, on host size (the guests stay the same, the host shrinks):

1. **Bracket.** Start at ``START_RATIO`` = 1.0 (a host as big as the guests' RAM plus
   its own base: with no ballooning nothing can go wrong there, so ``none`` must hold).
   Then double (2, 4, ...) up to ``max_ratio`` while the replay holds. A policy that
   fails at 1.0 is tried at ``MIN_RATIO`` = 0.5 (a host twice the guests' RAM): if it
   holds there, its safe ratio lies between; if not, it harms guests whatever the host
   and has no safe ratio.
2. **Bisection** between the highest ratio that held and the lowest that failed, until
   they are within ``tolerance`` (absolute ratio, default 0.02: on a 1 TiB guest fleet,
   about one 16 GiB host DIMM in 50). About 8 replays per policy.
3. **Check below.** Bisection assumes that a smaller host never hurts, and real traces
   break that: how a surplus falls among the guests changes with the host's size, and a
   policy can fail at 2.06 and hold at 2.5. So every ratio of the ``check_step`` grid
   (1/8 by default: 1.125, 1.25, ...) between the first ratio that held and the one
   found is replayed too; at a failure there, the search bisects again below it.

The safe ratio is the operator's reading: the highest ratio that held *below the lowest
that failed*, so every ratio tried up to it held. The *binding* constraint is what
failed at that lowest failure (the next step up); ratios that held again above it are
reported (``held_above``), not counted. Every ratio tried is in the JSON with its
violations.

Each policy's search is one task of a ``Sweep`` (policies in parallel processes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from overcommitd.config import DaemonConfig
from overcommitd.model import OvercommitdError
from overcommitd.shortfall import short_text
from policies.api import Policy
from sim.evaluation.compare import BASELINES, REFERENCE, NoBalloon
from sim.evaluation.metrics import GIB_KIB, Scorecard, violations
from sim.evaluation.replay import ReplaySpec, replay
from sim.evaluation.sweep import Sweep, traces_for

START_RATIO = 1.0
MIN_RATIO = 0.5
DEFAULT_TOLERANCE = 0.02
DEFAULT_CHECK_STEP = 0.125
DEFAULT_MAX_RATIO = 8.0
CONSTRAINTS = ("oom-kills", "host-over-100", "guest-slo", "below-floor")  # sim.evaluation.metrics.violations' names


class PlanError(OvercommitdError):
    """Search settings that cannot work (the CLI prints it, exit 2)."""


@dataclass(frozen=True, slots=True)
class Step:
    """One replay of the search: the ratio, its scorecard and what it violated."""

    overcommit: float
    card: Scorecard
    violations: dict[str, float]

    @property
    def holds(self) -> bool:
        return not self.violations

    def as_dict(self) -> dict[str, object]:
        return {
            "overcommit": self.overcommit,
            "holds": self.holds,
            "violations": self.violations,
            "scorecard": self.card.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class PolicyPlan:
    """A policy's search: every step in the order tried, the safe one and the next one up."""

    policy: str
    steps: tuple[Step, ...]
    tolerance: float
    max_ratio: float
    check_step: float

    @property
    def next_up(self) -> Step | None:
        """The lowest ratio that failed (None: held up to ``max_ratio``)."""
        failed = [s for s in self.steps if not s.holds]
        return min(failed, key=lambda s: s.overcommit) if failed else None

    @property
    def safe(self) -> Step | None:
        """The highest ratio that held below the lowest that failed."""
        nxt = self.next_up
        held = [s for s in self.steps if s.holds and (nxt is None or s.overcommit < nxt.overcommit)]
        return max(held, key=lambda s: s.overcommit) if held else None

    @property
    def held_above(self) -> tuple[float, ...]:
        """Ratios that held although a lower one failed: the trace is not monotone in
        the host's size there, and those ratios are not safe to run at."""
        nxt = self.next_up
        return tuple(sorted(s.overcommit for s in self.steps if s.holds and nxt and s.overcommit > nxt.overcommit))

    @property
    def safe_overcommit(self) -> float | None:
        return self.safe.overcommit if self.safe else None

    @property
    def binding(self) -> str:
        """The constraints that failed at the next step up, ``+``-joined in a fixed order;
        ``""`` when the policy held up to ``max_ratio``."""
        nxt = self.next_up
        return "+".join(c for c in CONSTRAINTS if nxt and c in nxt.violations)

    @property
    def host_short_gib(self) -> float | None:
        """The host's peak shortfall at the next step up (GiB, ``overcommitd.shortfall``):
        beyond what any balloon can take, so no policy holds there; None when not short."""
        nxt = self.next_up
        return nxt.card.host_short_peak_gib if nxt and nxt.card.host_short_peak_gib > 0 else None

    @property
    def binding_note(self) -> str:
        """The words "host short by N GiB: no policy can hold here" when the host was short at the
        next step up (then that, not the policy, is why the ratio failed); else ""."""
        short = self.host_short_gib
        return "" if short is None else f"{short_text(short * GIB_KIB)}: no policy can hold here"

    def as_dict(self) -> dict[str, object]:
        at = self.safe or self.next_up or self.steps[0]
        return {
            "policy": self.policy,
            "safe_overcommit": self.safe_overcommit,
            "host_gib": at.card.host_gib if self.safe else None,
            "provisioned_gib": at.card.provisioned_gib,
            "saved_gib_h": self.safe.card.saved_gib_h if self.safe else None,
            "saved_pct": self.safe.card.saved_pct if self.safe else None,
            "reclaimed_gib_h": self.safe.card.reclaimed_gib_h if self.safe else None,
            "binding": self.binding,
            "binding_overcommit": self.next_up.overcommit if self.next_up else None,
            "binding_note": self.binding_note,
            "held_above": list(self.held_above),
            "host_short_gib": self.host_short_gib,
            "tolerance": self.tolerance,
            "max_overcommit": self.max_ratio,
            "check_step": self.check_step,
            "tried": [s.as_dict() for s in sorted(self.steps, key=lambda s: s.overcommit)],
        }


@dataclass(frozen=True, slots=True)
class PlanJob:
    """One policy's search (a sweep task): everything it needs, picklable."""

    spec: ReplaySpec
    policy: Policy[Any]
    cfg: DaemonConfig
    tolerance: float = DEFAULT_TOLERANCE
    max_ratio: float = DEFAULT_MAX_RATIO
    check_step: float = DEFAULT_CHECK_STEP


def try_ratio(job: PlanJob, ratio: float) -> Step:
    spec = job.spec.model_copy(update={"overcommit": ratio})
    card = replay(spec, job.policy, job.cfg, loaded=traces_for(spec)).scorecard
    return Step(ratio, card, violations(card))


class _Tried:
    """The replays of one search, each ratio replayed once, in the order tried."""

    def __init__(self, job: PlanJob) -> None:
        self.job = job
        self.steps: dict[float, Step] = {}

    def holds(self, ratio: float) -> bool:
        ratio = round(ratio, 6)
        if ratio not in self.steps:
            self.steps[ratio] = try_ratio(self.job, ratio)
        return self.steps[ratio].holds

    def highest_held_below(self, ratio: float) -> float:
        return max(r for r, s in self.steps.items() if s.holds and r < ratio)


def search(job: PlanJob) -> PolicyPlan:
    """Bracket, bisect, check below (see the module docstring). The task of a sweep."""
    tried = _Tried(job)
    bracket = _bracket(tried)
    if bracket is not None:
        first_held, hi = bracket
        lo = _bisect(tried, hi)
        while (failed := _first_grid_failure(tried, first_held, lo)) is not None:
            lo = _bisect(tried, failed)
    return PolicyPlan(job.policy.name, tuple(tried.steps.values()), job.tolerance, job.max_ratio, job.check_step)


def _bracket(tried: _Tried) -> tuple[float, float] | None:
    """(the first ratio that held, the lowest that failed or NaN up to ``max_ratio``):
    upwards from 1.0 by doubling, or down to ``MIN_RATIO``; None when nothing held."""
    if not tried.holds(START_RATIO):
        return (MIN_RATIO, START_RATIO) if tried.holds(MIN_RATIO) else None
    lo = START_RATIO
    while lo < tried.job.max_ratio:
        hi = min(2 * lo, tried.job.max_ratio)
        if not tried.holds(hi):
            return START_RATIO, hi
        lo = hi
    return START_RATIO, math.nan


def _bisect(tried: _Tried, hi: float) -> float:
    """Halve the span between the highest ratio that held below ``hi`` (a failure) and
    ``hi`` until within the tolerance; returns the highest that held. With ``hi`` NaN
    (held up to ``max_ratio``) there is nothing to halve."""
    if math.isnan(hi):
        return tried.job.max_ratio
    lo = tried.highest_held_below(hi)
    while hi - lo > tried.job.tolerance:
        mid = round((lo + hi) / 2, 6)
        lo, hi = (mid, hi) if tried.holds(mid) else (lo, mid)
    return lo


def _first_grid_failure(tried: _Tried, first_held: float, safe: float) -> float | None:
    """The lowest ratio of the ``check_step`` grid between ``first_held`` and ``safe``
    that fails, replaying those not tried yet; None when all of them hold (or the
    check is off: ``check_step`` 0)."""
    step = tried.job.check_step
    k = 1
    while step > 0 and (ratio := round(first_held + k * step, 6)) < safe:
        if not tried.holds(ratio):
            return ratio
        k += 1
    return None


@dataclass(frozen=True, slots=True)
class Plan:
    """Every policy's search, ``none`` first."""

    plans: tuple[PolicyPlan, ...]
    guests: int
    hours: float

    def by_name(self) -> dict[str, PolicyPlan]:
        return {p.policy: p for p in self.plans}

    def better_baseline(self) -> float | None:
        """The higher safe ratio of the baselines (mom, proxmox) among those planned."""
        ratios = [p.safe_overcommit for p in self.plans if p.policy in BASELINES]
        held = [r for r in ratios if r is not None]
        return max(held) if held else None


def plan(
    spec: ReplaySpec,
    policies: Sequence[Policy[Any]],
    cfg: DaemonConfig,
    sweep: Sweep,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    max_ratio: float = DEFAULT_MAX_RATIO,
    check_step: float = DEFAULT_CHECK_STEP,
    on_done: Callable[[int, PolicyPlan], object] | None = None,
) -> Plan:
    """The safe density of ``none`` and of each policy, one sweep task per policy."""
    if not START_RATIO < max_ratio:
        raise PlanError(f"--max-overcommit {max_ratio:g}: must be above the start ratio {START_RATIO:g}")
    if not tolerance > 0:
        raise PlanError(f"--tolerance {tolerance:g}: must be > 0")
    if not check_step >= 0:
        raise PlanError(f"--check-step {check_step:g}: must be >= 0 (0: no check below the bisection's ratio)")
    runs: list[Policy[Any]] = [NoBalloon(), *(p for p in policies if p.name != REFERENCE)]
    plans = sweep.map(search, [PlanJob(spec, p, cfg, tolerance, max_ratio, check_step) for p in runs], on_done=on_done)
    first = plans[0].steps[0].card
    return Plan(tuple(plans), first.guests, first.hours)


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def format_plan(result: Plan) -> str:
    """The plan as a Markdown table, one row per policy."""
    base = result.better_baseline()
    first = result.plans[0]
    check = f", checked every {first.check_step:g} below" if first.check_step > 0 else ""
    lines = [
        (
            f"{result.guests} guests, {result.hours:.0f} h; safe = highest overcommit (provisioned / host RAM) "
            f"with no violation there or below, bisected to within {first.tolerance:g}{check}; "
            "binding = what failed at the next step up"
        ),
        "",
        (
            "| policy | safe overcommit | vs better baseline | host GiB | provisioned GiB | saved GiB·h | saved % "
            "| reclaimed GiB·h | binding (at overcommit) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in result.plans:
        s = p.safe.card if p.safe else None
        ratio = p.safe_overcommit
        vs = ratio / base if ratio is not None and base else None
        binding = f"{p.binding} (at {p.next_up.overcommit:g})" if p.next_up else f"none up to {p.max_ratio:g}"
        if p.binding_note:
            binding += f"; {p.binding_note}"
        if p.held_above:
            binding += "; held again at " + ", ".join(f"{r:g}" for r in p.held_above) + " (not monotone: not counted)"
        if p.safe is None:
            binding = f"fails at every ratio tried, down to {MIN_RATIO:g}: " + binding
        cells = [
            p.policy,
            _cell(ratio, "{:.3f}"),
            _cell(vs, "{:.2f}x"),
            _cell(s.host_gib if s else None, "{:.1f}"),
            f"{p.steps[0].card.provisioned_gib:.1f}",
            _cell(s.saved_gib_h if s else None, "{:.0f}"),
            _cell(s.saved_pct if s else None, "{:.1f}"),
            _cell(s.reclaimed_gib_h if s else None, "{:.0f}"),
            binding,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(p: PolicyPlan) -> str:
    """One line per finished search, while the others still run."""
    safe = f"safe {p.safe_overcommit:.3f}" if p.safe_overcommit is not None else f"fails down to {MIN_RATIO:g}"
    nxt = f", {p.binding} at {p.next_up.overcommit:g}" if p.next_up else ""
    nxt += f" ({p.binding_note})" if p.binding_note else ""
    return f"{safe}{nxt} ({len(p.steps)} replays)"


def to_json(result: Plan) -> list[dict[str, object]]:
    base = result.better_baseline()
    out = []
    for p in result.plans:
        d = p.as_dict()
        r = p.safe_overcommit
        d["vs_better_baseline"] = r / base if r is not None and base else None
        out.append(d)
    return out
