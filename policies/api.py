"""The Policy protocol: the one page a plugin author reads first.

A policy turns snapshots into balloon targets. It is *pure*: ``decide`` gets the host
snapshot, every ballooned guest's snapshot and the state the policy returned last time,
and returns targets plus its next state. No I/O, no clock reads (``host.taken_at_s`` is
the time), no globals, no mutation of its inputs. That is what lets the same policy run
on a hypervisor host, in a replay at a million guest-ticks a second, and in a unit test
on hand-built values.

What a policy may rely on:

* every guest in ``guests`` is RUNNING and not excluded by config; paused, migrating and
  excluded guests never reach it;
* memory is in KiB (``*_kib``); ``guest.stats`` may be ``None`` (the guest has not sent
  stats) and any stat may be ``None`` (not supplied); ``guest.stats.last_update_s`` may
  lag ``host.taken_at_s`` by a polling period or more;
* ``guest.floor_kib`` and ``guest.weight`` already include the operator's config;
* ``guest.migration_pending`` is set while an operator has announced a live migration
  of the guest (the ``prepare-migration`` command): a policy may get it ready, as
  ``free-page`` does; once the migration runs, the guest no longer reaches the policy;
* the guard (``overcommitd.guard``) checks every target afterwards: SLA floor, maximum,
  bounded steps, dead band, no inflation on stale stats, back-off after an auto-deflate.
  A policy cannot bypass it, so it may ask for what it wants and let the guard pace it.

What a policy returns: a :class:`PolicyResult` whose ``targets_kib`` maps a guest's
``uuid`` to the memory it should have (not the balloon size). A guest left out is held
(its balloon is left where it is). A guest the policy could not decide is listed in
``errors`` with the reason and held; :class:`PerGuestPolicy` does that for you by
catching an exception per guest, so one bad guest never stalls the others (MOM's
evaluator skipped the whole host when one guest's field was bad).

Why a guest is where it is: ``reasons`` maps a guest's ``uuid`` to one short sentence a
person can read ("warm-up: 42 min left", "gain 12 MiB below min_gain 32 MiB"). It is
optional - a policy that gives none still works - but an operator looking at a guest
that does not move (``overcommitd status``, the log) sees it next to the guard's own
clamps. With :class:`PerGuestPolicy`, override ``decide_guest_why`` (target, state,
reason) and let ``decide_guest`` call it; a plugin that only has ``decide_guest`` gives
no reason and is otherwise unchanged.

Parameters: a policy class may declare ``Params``, a pydantic model with
``extra="forbid"``; the registry validates the ``[policy.params]`` table of the config
against it and passes the model to the constructor. Register a plugin under the entry
point group ``overcommitd.policies`` (see ``examples/``) or name it as ``module:Class``.

Habits the built-in policies keep, worth keeping in a plugin:

* state is a frozen dataclass (per guest with :class:`PerGuestPolicy`); counters such as
  ``swap_in_kib`` or ``oom_kills`` are cumulative, so keep the last total and take the
  delta yourself (a late tick then loses nothing);
* a guest's use is ``actual_kib - available_kib()`` (``policies.signals.used_kib``): not
  MemFree (page cache is reclaimable) and not MemTotal (a DEFLATE_ON_OOM guest keeps an
  unchanged MemTotal while inflated);
* with ``features.deflate_on_oom``, ``actual_kib`` above ``last_target_kib`` means the
  guest deflated itself under OOM pressure: meet it, do not fight it; with
  ``features.reporting`` the guest's free memory is already back on the host;
* a policy that decides many guests with the same arithmetic may also implement
  ``decide_batch(host, table, state) -> BatchResult``: the same decision over a
  :class:`overcommitd.table.GuestTable` (one numpy column per snapshot field), in a
  bounded number of array operations whatever the number of guests. The step calls it
  when it exists and adapts ``decide`` otherwise (:func:`decide_batch`), so a plugin
  with only ``decide`` runs unchanged; a batch policy's ``decide`` should be its
  ``decide_batch`` on ``GuestTable.of(guests)`` (:func:`result_of`), one implementation;
* unit-test on hand-built snapshots (``policies.testing``), then replay side by side:
  ``overcommitd replay --policy yours,pid,mom,proxmox --report DIR``; tune with
  ``overcommitd tune --policy yours --param NAME=LOW:HIGH``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from overcommitd.model import GuestSnapshot, HostSnapshot, OvercommitdError
from overcommitd.table import FloatArray, GuestTable, IntArray

S = TypeVar("S")
G = TypeVar("G")


@dataclass(frozen=True, slots=True)
class PolicyResult(Generic[S]):
    """Targets by guest uuid (KiB of guest memory), the policy's next state, the guests
    it could not decide with why, and (optional) why each guest gets what it gets."""

    targets_kib: Mapping[str, int]
    state: S
    errors: Mapping[str, str] = field(default_factory=dict)
    reasons: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class Policy(Protocol[S]):
    """What the control step calls. ``name`` is the registry name."""

    name: ClassVar[str]

    def initial_state(self) -> S:
        """The state before the first step."""
        ...

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: S) -> PolicyResult[S]:
        """Targets for this step and the next state; pure."""
        ...


@runtime_checkable
class CompiledTwin(Protocol):
    """A policy whose column arithmetic also exists as row-by-row loops a compiler can
    take (optional; the built-in ``headroom`` has them). The simulator hands ``compiled``
    its compiler (``sim.compiled.jit``: numba) and replays the policy it gets back, which
    must decide exactly as this one does; the daemon never calls it. Here so the replay
    takes up a twin without naming a policy."""

    def compiled(self, jit: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Policy[Any]:
        """This policy with its loops compiled by ``jit``; the same decisions."""
        ...


class PolicyLoadError(OvercommitdError):
    """A policy name that does not resolve, a plugin that fails to import, or bad params."""


class UnknownPolicy(PolicyLoadError):
    """No policy is registered under this name."""


class ModulePathRefused(PolicyLoadError):
    """A ``module:Class`` name where only registered names are accepted."""


class PolicyFactory(Protocol):
    """Makes a policy from a name and its params; raises ``PolicyLoadError``.

    Only the CLI knows the registry (``policies.registry.create`` is the factory it hands
    on): the daemon, which must build a new policy on reload or an MQTT ``set-policy``, and
    the tuner, which builds one per point tried, are handed a factory instead, so they never
    look a concrete policy up themselves."""

    def __call__(
        self, spec: str, params: Mapping[str, Any] | None = None, *, allow_module_path: bool = True
    ) -> Policy[Any]: ...


@dataclass(frozen=True, slots=True, eq=False)
class BatchResult(Generic[S]):
    """``decide_batch``'s answer: a target per row of the table (KiB of guest memory;
    NaN: hold), the next state, and by row the guests it could not decide and why each
    gets what it gets (optional, as in :class:`PolicyResult`)."""

    targets_kib: FloatArray
    state: S
    errors: Mapping[int, str] = field(default_factory=dict)
    reasons: Mapping[int, str] = field(default_factory=dict)


class RowReasons(Mapping[int, str]):
    """Reasons by row, worded only when read: a batch policy that has a reason for every
    guest every tick would otherwise format a thousand sentences no one reads (the daemon
    reads the few that changed; the replay none). ``kind[i]`` says which wording row ``i``
    gets (-1: none); rows of one kind differ only in their numbers, which is what lets the
    daemon tell a changed reason (``overcommitd.status``) from its kinds alone."""

    def __init__(self, kind: IntArray, word: Callable[[int], str]) -> None:
        self.kind = kind
        self.word = word

    def __getitem__(self, row: int) -> str:
        if not 0 <= row < len(self.kind) or self.kind[row] < 0:
            raise KeyError(row)
        return self.word(row)

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self.kind >= 0).tolist())

    def __len__(self) -> int:
        return int(np.count_nonzero(self.kind >= 0))

    def spread(self, rows: IntArray, n: int) -> RowReasons:
        """These reasons, for a table of which they cover only ``rows`` (of ``n``)."""
        kind = np.full(n, -1, dtype=np.int64)
        kind[rows] = self.kind
        position = np.zeros(n, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        return RowReasons(kind, lambda i: self.word(int(position[i])))


@runtime_checkable
class BatchPolicy(Policy[S], Protocol[S]):
    """A policy that also decides a whole table at once."""

    def decide_batch(self, host: HostSnapshot, guests: GuestTable, state: S) -> BatchResult[S]:
        """``decide`` over columns: the same targets, by row; pure."""
        ...


def decide_batch(policy: Policy[S], host: HostSnapshot, guests: GuestTable, state: S) -> BatchResult[S]:
    """The policy's ``decide_batch``, or its per-guest ``decide`` adapted to columns
    (targets for uuids not in the table are ignored, as the step always did)."""
    batch = getattr(policy, "decide_batch", None)  # not isinstance: a Protocol check costs more than a tick
    if batch is not None:
        return batch(host, guests, state)  # type: ignore[no-any-return]
    result = policy.decide(host, guests.snapshots(), state)
    row = {uuid: i for i, uuid in enumerate(guests.uuid)}
    targets = np.full(len(guests), np.nan)
    for uuid, target_kib in result.targets_kib.items():
        i = row.get(uuid)
        if i is not None:
            targets[i] = target_kib
    errors = {row[u]: e for u, e in result.errors.items() if u in row}
    reasons = {row[u]: r for u, r in result.reasons.items() if u in row}
    return BatchResult(targets, result.state, errors, reasons)


def result_of(guests: GuestTable, batch: BatchResult[S]) -> PolicyResult[S]:
    """A ``BatchResult`` keyed by uuid again: what a batch policy's ``decide`` returns."""
    targets = {guests.uuid[i]: int(batch.targets_kib[i]) for i in np.flatnonzero(~np.isnan(batch.targets_kib)).tolist()}
    errors = {guests.uuid[i]: e for i, e in batch.errors.items()}
    reasons = {guests.uuid[i]: r for i, r in batch.reasons.items()}
    return PolicyResult(targets, batch.state, errors, reasons)


class PerGuestPolicy(ABC, Generic[G]):
    """Base for policies that decide each guest on its own, with per-guest state ``G``.

    ``decide_guest`` raising holds that guest only; its previous state is kept. State of
    guests that have gone away is dropped.
    """

    name: ClassVar[str]

    def initial_state(self) -> Mapping[str, G]:
        return {}

    @abstractmethod
    def initial_guest_state(self, guest: GuestSnapshot) -> G:
        """State for a guest seen for the first time."""

    @abstractmethod
    def decide_guest(self, host: HostSnapshot, guest: GuestSnapshot, state: G) -> tuple[int | None, G]:
        """The guest's target (None: hold) and its next state."""

    def decide_guest_why(self, host: HostSnapshot, guest: GuestSnapshot, state: G) -> tuple[int | None, G, str | None]:
        """``decide_guest`` plus why, in a few words a person can read (None: no reason).
        Override it to explain a guest; ``decide`` calls this one."""
        target_kib, next_state = self.decide_guest(host, guest, state)
        return target_kib, next_state, None

    def decide(
        self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: Mapping[str, G]
    ) -> PolicyResult[Mapping[str, G]]:
        targets: dict[str, int] = {}
        errors: dict[str, str] = {}
        reasons: dict[str, str] = {}
        next_state: dict[str, G] = {}
        for guest in guests:
            previous = state.get(guest.uuid)
            if previous is None:
                previous = self.initial_guest_state(guest)
            try:
                target_kib, next_state[guest.uuid], reason = self.decide_guest_why(host, guest, previous)
            except Exception as e:  # noqa: BLE001 - a policy bug holds one guest, never the host
                errors[guest.uuid] = f"{type(e).__name__}: {e}"
                next_state[guest.uuid] = previous
                continue
            if reason:
                reasons[guest.uuid] = reason
            if target_kib is not None:
                targets[guest.uuid] = target_kib
        return PolicyResult(targets, next_state, errors, reasons)
