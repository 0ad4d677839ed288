"""One control step, shared by the daemon (``overcommitd.runner``) and the replay.

``step`` is a plain function of (time, snapshots, policy, state): no I/O, no clock
reads. The replay calls it on a virtual clock, the daemon on a timer; both then hand the
decisions to ``apply``. One step::

    snapshots -> config overrides -> policy.decide -> guard (per guest) -> decisions
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from overcommitd.config import DaemonConfig
from overcommitd.guard import FRESH, GuardMemory, guard
from overcommitd.hypervisor import Hypervisor, HypervisorError
from overcommitd.model import Decision, GuestSnapshot, HostSnapshot, RunState
from policies.api import Policy, PolicyResult

S = TypeVar("S")
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoopState(Generic[S]):
    """What one step hands the next: the policy's state and the guard's memory."""

    policy_state: S
    guard: dict[str, GuardMemory] = dataclasses.field(default_factory=dict)

    @classmethod
    def initial(cls, policy: Policy[S]) -> LoopState[S]:
        return cls(policy.initial_state())


@dataclass(frozen=True, slots=True)
class StepOutcome(Generic[S]):
    decisions: tuple[Decision, ...]
    state: LoopState[S]
    policy_error: str | None = None  # decide() raised as a whole: every guest held


def with_overrides(guests: Sequence[GuestSnapshot], cfg: DaemonConfig) -> tuple[list[GuestSnapshot], set[str]]:
    """Guests with the config's floor and weight applied, and the uuids it excludes."""
    if not cfg.guests:
        return list(guests), set()
    out, excluded = [], set()
    for g in guests:
        o = cfg.override_for(g)
        if o is None:
            out.append(g)
            continue
        if o.exclude:
            excluded.add(g.uuid)
        floor_kib = min(max(g.floor_kib, o.floor_kib or 0), g.max_kib)  # above the maximum: capped
        out.append(dataclasses.replace(g, floor_kib=floor_kib, weight=o.weight or g.weight))
    return out, excluded


def step(
    now_s: float,
    host: HostSnapshot,
    guests: Sequence[GuestSnapshot],
    policy: Policy[S],
    state: LoopState[S],
    cfg: DaemonConfig,
) -> StepOutcome[S]:
    """Decide every guest's target for this tick."""
    guests, excluded = with_overrides(guests, cfg)
    eligible = [g for g in guests if g.uuid not in excluded and g.run_state is RunState.RUNNING]
    policy_error = None
    try:
        result = policy.decide(host, eligible, state.policy_state)
    except Exception as e:  # noqa: BLE001 - a policy that raises holds every guest, the loop goes on
        policy_error = f"{type(e).__name__}: {e}"
        log.error("policy %s raised: %s; holding every guest", policy.name, policy_error)
        result = PolicyResult({}, state.policy_state, {g.uuid: policy_error for g in eligible})
    decisions = []
    memory: dict[str, GuardMemory] = {}
    for g in guests:
        decision, memory[g.uuid] = guard(
            now_s,
            g,
            result.targets_kib.get(g.uuid),
            rules=cfg.guard,
            memory=state.guard.get(g.uuid, FRESH),
            excluded=g.uuid in excluded,
            error=result.errors.get(g.uuid),
        )
        reason = result.reasons.get(g.uuid)
        decisions.append(decision if reason is None else dataclasses.replace(decision, policy_reason=reason))
    return StepOutcome(tuple(decisions), LoopState(result.state, memory), policy_error)


def apply(hv: Hypervisor, decisions: Sequence[Decision]) -> set[str]:
    """Set every target the guard let through; returns the uuids set. One guest failing
    (destroyed mid-tick) never stops the others."""
    applied = set()
    for d in decisions:
        if d.target_kib is None:
            continue
        try:
            hv.set_target(d.uuid, d.target_kib)
        except HypervisorError as e:
            log.warning(
                "guest %s: target %d KiB not set: %s",
                d.name,
                d.target_kib,
                e,
                extra={"event": "set-failed", "guest": d.name},
            )
            continue
        applied.add(d.uuid)
    return applied
