"""``overcommitd plan``: the safe density of each policy, the question an operator asks.

For every policy (and for ``none``, no ballooning at all) the highest overcommit ratio
(provisioned guest RAM / host RAM, ``ReplaySpec.overcommit``) at which a replay of the
same guests *holds*: ``violations(card)`` is empty (zero OOM kills, the host never above
100 %, every guest within the paging SLO, zero guest-seconds below floor).

The search, per policy, on host size (the guests stay the same, the host shrinks):

1. **Bracket.** Start at ``START_RATIO`` = 1.0 (a host as big as the guests' RAM plus
   its own base: with no ballooning nothing can go wrong there, so ``none`` must hold;
   if a policy fails even at 1.0, the plan says so: no safe ratio, and what failed).
   Then double (2, 4, ...) up to ``max_ratio`` while the replay holds.
2. **Bisection** between the highest ratio that held and the lowest that failed, until
   they are within ``tolerance`` (absolute ratio, default 0.02: on a 1 TiB guest fleet,
   about one 16 GiB host DIMM in 50). About 8 replays per policy.

The safe ratio is the highest that held; the *binding* constraint is what failed at the
lowest failing ratio (the next step up). The bisection assumes holding is monotone in
the ratio (a smaller host never helps); when a trace breaks that, the answer is still a
ratio that was replayed and held, and every ratio tried is reported with its violations.

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
DEFAULT_TOLERANCE = 0.02
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

    @property
    def safe(self) -> Step | None:
        held = [s for s in self.steps if s.holds]
        return max(held, key=lambda s: s.overcommit) if held else None

    @property
    def next_up(self) -> Step | None:
        """The lowest failing ratio above the safe one (None: held up to ``max_ratio``)."""
        floor = self.safe.overcommit if self.safe else 0.0
        failed = [s for s in self.steps if not s.holds and s.overcommit > floor]
        return min(failed, key=lambda s: s.overcommit) if failed else None

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
            "reclaimed_gib_h": reclaimed_gib_h(self.safe.card) if self.safe else None,
            "binding": self.binding,
            "binding_overcommit": self.next_up.overcommit if self.next_up else None,
            "binding_note": self.binding_note,
            "host_short_gib": self.host_short_gib,
            "tolerance": self.tolerance,
            "max_overcommit": self.max_ratio,
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


def try_ratio(job: PlanJob, ratio: float) -> Step:
    spec = job.spec.model_copy(update={"overcommit": ratio})
    card = replay(spec, job.policy, job.cfg, loaded=traces_for(spec)).scorecard
    return Step(ratio, card, violations(card))


def search(job: PlanJob) -> PolicyPlan:
    """Bracket, then bisect (see the module docstring). The task of a sweep."""
    steps = [try_ratio(job, START_RATIO)]
    if steps[0].holds:
        lo, hi = START_RATIO, min(2 * START_RATIO, job.max_ratio)
        while hi > lo:
            steps.append(try_ratio(job, hi))
            if not steps[-1].holds:
                break
            lo, hi = hi, min(2 * hi, job.max_ratio)
        else:
            hi = math.nan  # held up to max_ratio: nothing to bisect
        while hi - lo > job.tolerance:
            mid = round((lo + hi) / 2, 6)
            steps.append(try_ratio(job, mid))
            lo, hi = (mid, hi) if steps[-1].holds else (lo, mid)
    return PolicyPlan(job.policy.name, tuple(steps), job.tolerance, job.max_ratio)


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
    on_done: Callable[[int, PolicyPlan], object] | None = None,
) -> Plan:
    """The safe density of ``none`` and of each policy, one sweep task per policy."""
    if not START_RATIO < max_ratio:
        raise PlanError(f"--max-overcommit {max_ratio:g}: must be above the start ratio {START_RATIO:g}")
    if not tolerance > 0:
        raise PlanError(f"--tolerance {tolerance:g}: must be > 0")
    runs: list[Policy[Any]] = [NoBalloon(), *(p for p in policies if p.name != REFERENCE)]
    plans = sweep.map(search, [PlanJob(spec, p, cfg, tolerance, max_ratio) for p in runs], on_done=on_done)
    first = plans[0].steps[0].card
    return Plan(tuple(plans), first.guests, first.hours)


def reclaimed_gib_h(card: Scorecard) -> float:
    """What the policy's balloons took back (GiB·h): pages held by a balloon, and pages a
    deflate gave back that were not touched since. Never-touched pages and free page
    reporting are the host's with or without a policy, so they are not counted."""
    return card.saved_ballooned_gib_h + card.saved_unbacked_gib_h


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def format_plan(result: Plan) -> str:
    """The plan as a Markdown table, one row per policy."""
    base = result.better_baseline()
    tol = result.plans[0].tolerance
    lines = [
        (
            f"{result.guests} guests, {result.hours:.0f} h; safe = highest overcommit (provisioned / host RAM) "
            f"with no violation, bisected to within {tol:g}; binding = what failed at the next step up"
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
        if p.safe is None:
            binding = f"fails at {START_RATIO:g}: " + binding
        cells = [
            p.policy,
            _cell(ratio, "{:.3f}"),
            _cell(vs, "{:.2f}x"),
            _cell(s.host_gib if s else None, "{:.1f}"),
            f"{p.steps[0].card.provisioned_gib:.1f}",
            _cell(s.saved_gib_h if s else None, "{:.0f}"),
            _cell(s.saved_pct if s else None, "{:.1f}"),
            _cell(reclaimed_gib_h(s) if s else None, "{:.0f}"),
            binding,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(p: PolicyPlan) -> str:
    """One line per finished search, while the others still run."""
    safe = f"safe {p.safe_overcommit:.3f}" if p.safe_overcommit is not None else f"fails at {START_RATIO:g}"
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
