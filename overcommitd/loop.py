"""One control step, and the asyncio runner that calls it on a real timer.

``step`` is a plain function of (time, snapshots, policy, state): no I/O, no clock
reads. The replay calls it on a virtual clock, the daemon on a timer; both then hand the
decisions to ``apply``. One step::

    snapshots -> config overrides -> policy.decide -> guard (per guest) -> decisions
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from overcommitd.config import DaemonConfig
from overcommitd.guard import FRESH, GuardMemory, guard
from overcommitd.hypervisor import HostReader, Hypervisor
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
        floor_kib = max(g.floor_kib, o.floor_kib or 0)
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
        decisions.append(decision)
    return StepOutcome(tuple(decisions), LoopState(result.state, memory), policy_error)


def apply(hv: Hypervisor, decisions: Sequence[Decision]) -> int:
    """Set every target that is not a hold; returns how many were set."""
    n = 0
    for d in decisions:
        if d.target_kib is not None:
            hv.set_target(d.uuid, d.target_kib)
            n += 1
    return n


async def run(
    hv: Hypervisor,
    host: HostReader,
    policy: Policy[Any],
    cfg: DaemonConfig,
    *,
    once: bool = False,
    dry_run: bool = False,
    on_step: Callable[[HostSnapshot, StepOutcome[Any]], None] | None = None,
) -> None:
    """Read, decide, apply, on a steady tick. Blocking hypervisor calls run in a thread
    so the event loop (telemetry, signals) never waits on them."""
    state: LoopState[Any] = LoopState.initial(policy)
    next_s = time.monotonic()
    while True:
        host_snapshot = await asyncio.to_thread(host.read)
        guests = await asyncio.to_thread(hv.snapshot)
        outcome = step(host_snapshot.taken_at_s, host_snapshot, guests, policy, state, cfg)
        state = outcome.state
        if not dry_run:
            await asyncio.to_thread(apply, hv, outcome.decisions)
        if on_step is not None:
            on_step(host_snapshot, outcome)
        if once:
            return
        next_s += cfg.interval_s
        await asyncio.sleep(max(0.0, next_s - time.monotonic()))
