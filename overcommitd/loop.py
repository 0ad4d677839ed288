"""One control step, shared by the daemon (``overcommitd.runner``) and the replay.

``step`` is a plain function of (time, snapshots, policy, state): no I/O, no clock
reads. The replay calls it on a virtual clock, the daemon on a timer; both then hand the
decisions to ``apply``. One step::

    guest table -> config overrides -> policy.decide_batch -> guard (every guest) -> targets

It runs over columns (``overcommitd.table.GuestTable``): a bounded number of numpy
operations per tick whatever the number of guests. ``step_table`` is the step;
``step`` is the same on a table built from snapshots. The per-guest Decisions, with
their clamps, are read back from the guard's columns only when someone asks
(``StepOutcome.decisions``: logs, MQTT, status, tests); the replay never does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Generic, TypeVar

import numpy as np

from overcommitd.config import DaemonConfig
from overcommitd.guard import GuardMemories, GuardOutcome, decision, decisions, guard_table
from overcommitd.guard_kernels import NUMPY, GuardKernels
from overcommitd.hypervisor import Hypervisor, HypervisorError
from overcommitd.model import Decision, GuestSnapshot, HostSnapshot
from overcommitd.table import BoolArray, GuestTable, IntArray
from policies.api import BatchResult, Policy, RowReasons, decide_batch

S = TypeVar("S")
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoopState(Generic[S]):
    """What one step hands the next: the policy's state and the guard's memory."""

    policy_state: S
    guard: GuardMemories = dataclasses.field(default_factory=GuardMemories)

    @classmethod
    def initial(cls, policy: Policy[S]) -> LoopState[S]:
        return cls(policy.initial_state())


@dataclass(frozen=True, eq=False)
class StepOutcome(Generic[S]):
    """What one step decided: the target of each row of ``table`` (valid where
    ``has_target``), the next state, and the Decisions, derived on first use.

    The control step (``step_table``) also keeps the guard's columns (``verdict``), the
    policy's errors and reasons by row and the rows the config excludes, so the daemon
    reads a few rows' Decisions (``decisions_of``), counts clamps and estimates the
    shortfall from arrays rather than from a Decision per guest per tick."""

    table: GuestTable
    target_kib: IntArray
    has_target: BoolArray
    state: LoopState[S]
    explain: Callable[[], tuple[Decision, ...]] = dataclasses.field(repr=False)
    policy_error: str | None = None  # decide() raised as a whole: every guest held
    verdict: GuardOutcome | None = dataclasses.field(default=None, repr=False)
    errors: Mapping[int, str] = dataclasses.field(default_factory=dict, repr=False)
    reasons: Mapping[int, str] = dataclasses.field(default_factory=dict, repr=False)
    excluded: BoolArray | None = dataclasses.field(default=None, repr=False)

    @cached_property
    def decisions(self) -> tuple[Decision, ...]:
        return self.explain()

    def decisions_of(self, rows: Sequence[int]) -> tuple[Decision, ...]:
        """The Decisions of these rows of ``table`` only, in that order."""
        if self.verdict is None:  # a step without the guard's columns (the replay's baselines)
            by_uuid = {d.uuid: d for d in self.decisions}
            return tuple(by_uuid[self.table.uuid[i]] for i in rows if self.table.uuid[i] in by_uuid)
        v, errors, reasons = self.verdict, self.errors, self.reasons
        return tuple(decision(self.table, v, i, error=errors.get(i), policy_reason=reasons.get(i)) for i in rows)


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


def table_overrides(table: GuestTable, cfg: DaemonConfig) -> tuple[GuestTable, BoolArray]:
    """``with_overrides`` over a table: the config's floors and weights applied, and
    which rows it excludes. Without ``[guests.*]`` sections (the replay's case) the
    table passes through untouched."""
    tolerance_kib = cfg.guard.auto_deflate_tolerance_kib
    if table.auto_deflate_tolerance_kib != tolerance_kib:
        table = dataclasses.replace(table, auto_deflate_tolerance_kib=tolerance_kib)
    excluded = np.zeros(len(table), dtype=bool)
    if not cfg.guests:
        return table, excluded
    floor, weight = table.floor_kib.copy(), table.weight.copy()
    for i, (uuid, name) in enumerate(zip(table.uuid, table.name, strict=True)):
        o = cfg.guests.get(uuid) or cfg.guests.get(name)
        if o is None:
            continue
        excluded[i] = o.exclude
        floor[i] = min(max(int(floor[i]), o.floor_kib or 0), int(table.max_kib[i]))  # above the maximum: capped
        weight[i] = o.weight or weight[i]
    return table.replace(floor_kib=floor, weight=weight), excluded


def _decide(
    policy: Policy[S], host: HostSnapshot, table: GuestTable, eligible: BoolArray, state: S
) -> tuple[BatchResult[S], str | None]:
    """The policy's targets for every row (NaN where not eligible or held), by row of
    ``table``; a policy that raises holds every eligible guest."""
    all_in = bool(eligible.all())
    rows = None if all_in else np.flatnonzero(eligible)  # all in (the common case): no copy
    try:
        result = decide_batch(policy, host, table if rows is None else table.take(rows), state)
    except Exception as e:  # noqa: BLE001 - a policy that raises holds every guest, the loop goes on
        error = f"{type(e).__name__}: {e}"
        log.error("policy %s raised: %s; holding every guest", policy.name, error)
        held = range(len(table)) if rows is None else rows.tolist()
        return BatchResult(np.full(len(table), np.nan), state, dict.fromkeys(held, error)), error
    if rows is None:
        return result, None
    targets = np.full(len(table), np.nan)
    targets[rows] = result.targets_kib
    back = rows.tolist()
    errors = {back[i]: e for i, e in result.errors.items()}
    reasons: Mapping[int, str]
    if isinstance(result.reasons, RowReasons):  # kept unworded
        reasons = result.reasons.spread(rows, len(table))
    else:
        reasons = {back[i]: r for i, r in result.reasons.items()}
    return BatchResult(targets, result.state, errors, reasons), None


def step_table(
    now_s: float,
    host: HostSnapshot,
    table: GuestTable,
    policy: Policy[S],
    state: LoopState[S],
    cfg: DaemonConfig,
    *,
    kernels: GuardKernels = NUMPY,
) -> StepOutcome[S]:
    """Decide every guest's target for this tick, over columns; ``kernels`` runs the
    guard's arithmetic (the daemon's numpy, or the replay's compiled twin)."""
    table, excluded = table_overrides(table, cfg)
    eligible = table.running & ~excluded
    result, policy_error = _decide(policy, host, table, eligible, state.policy_state)
    failed = np.zeros(len(table), dtype=bool)
    if result.errors:
        failed[list(result.errors)] = True
    verdict = guard_table(
        now_s,
        table,
        np.asarray(result.targets_kib, dtype=np.float64),
        rules=cfg.guard,
        backoff_until_s=state.guard.aligned(table.uuid),
        excluded=excluded,
        failed=failed,
        previous_actual_kib=state.guard.aligned_actual(table.uuid),
        kernels=kernels,
    )
    errors: Mapping[int, str] = result.errors
    reasons: Mapping[int, str] = result.reasons
    return StepOutcome(
        table,
        verdict.target_kib,
        verdict.has_target,
        LoopState(result.state, GuardMemories(table.uuid, verdict.backoff_until_s, verdict.actual_kib)),
        lambda: decisions(table, verdict, errors, reasons),
        policy_error,
        verdict,
        errors,
        reasons,
        excluded,
    )


def step(
    now_s: float,
    host: HostSnapshot,
    guests: Sequence[GuestSnapshot],
    policy: Policy[S],
    state: LoopState[S],
    cfg: DaemonConfig,
) -> StepOutcome[S]:
    """Decide every guest's target for this tick (``step_table`` on these snapshots)."""
    table = GuestTable.of(guests, auto_deflate_tolerance_kib=cfg.guard.auto_deflate_tolerance_kib)
    return step_table(now_s, host, table, policy, state, cfg)


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


__all__ = ["LoopState", "StepOutcome", "apply", "step", "step_table", "table_overrides", "with_overrides"]
