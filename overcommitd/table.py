"""Every guest at one instant as one table of numpy columns: the columnar form of
``GuestSnapshot``/``GuestStats``, with the same field names.

The control step runs over columns, not over one object per guest: the guard, the
vectorized policies (``Policy.decide_batch``) and the replay each do a bounded number of
numpy operations per tick whatever the number of guests. A per-guest ``GuestSnapshot`` is
a view derived from the table (``GuestTable.snapshot``) for logs, MQTT, plugins that only
have ``decide`` and tests; a table built from snapshots gives those very objects back.

Encoding, chosen so no value is lost and ``None`` stays distinct from 0:

* memory and counts are ``int64`` where they come from the hypervisor (``max_kib``,
  ``actual_kib``...); a guest's own stats are ``float64`` with NaN for a stat it did not
  send (stats are untrusted and unbounded: float keeps every comparison the guard makes
  right, and sizes below 2**53 KiB, every real one, exactly);
* ``last_target_kib`` is valid where ``has_last_target``; ``last_target_age_s`` is NaN
  where unknown; ``stats.last_update_s`` is NaN for a guest that sent no stats;
* features are the negotiated bit word (``BalloonFeatures.to_bits``); run states are
  indices into ``RUN_STATES``.

``auto_deflate_tolerance_kib`` is the one tolerance every reader uses to tell a balloon
that deflated itself from rounding (issue 13 item 4): the guard decides it
(``GuardConfig``) and the step stamps it on the table, so policies and the replay read it
from here rather than carrying their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Any, Generic, TypeVar, overload

import numpy as np
import numpy.typing as npt

from overcommitd.model import BalloonFeatures, Feature, GuestSnapshot, GuestStats, RunState

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
ColumnT = TypeVar("ColumnT", bound=np.ndarray[Any, Any])
T = TypeVar("T")

RUN_STATES: tuple[RunState, ...] = tuple(RunState)
RUNNING = RUN_STATES.index(RunState.RUNNING)
STAT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(GuestStats) if f.name != "last_update_s")
DEFAULT_AUTO_DEFLATE_TOLERANCE_KIB = 2 * 1024  # GuardConfig's default; the step stamps the configured one


def _none_to_nan(values: Sequence[int | float | None]) -> FloatArray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _nan_none_list(values: FloatArray) -> list[float | None]:
    return [None if math.isnan(x) else x for x in values.tolist()]


def read_only(values: ColumnT) -> ColumnT:
    """A derived column shared by every reader of its table: written to, it raises."""
    values.setflags(write=False)
    return values


def _nan_to_none(value: float) -> int | None:
    return None if math.isnan(value) else int(value)


class derived(Generic[T]):  # lower case: a decorator, as functools.cached_property
    """``functools.cached_property`` without its lock: worked out on first read, then kept
    in the instance's ``__dict__``, which Python reads before this (non-data) descriptor.

    Python 3.11's ``cached_property`` takes an RLock on every first read (removed in 3.12,
    CPython gh-87634), and a replay reads three derived columns of a fresh table every
    tick. Two threads reading one table at once may both work a column out: it is a pure
    function of the table's own columns, so either result is the same."""

    def __init__(self, func: Callable[[Any], T]) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> derived[T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> T | derived[T]:
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.func(instance)
        return value


@dataclass(frozen=True, eq=False)
class StatsColumns:
    """``GuestStats`` by column: ``last_update_s`` NaN where the guest sent no stats,
    every other column NaN where that stat was not sent (see ``GuestStats``)."""

    last_update_s: FloatArray
    columns: dict[str, FloatArray]  # one per STAT_NAMES, in that order

    def __post_init__(self) -> None:
        if tuple(self.columns) != STAT_NAMES:
            raise ValueError(f"stat columns {tuple(self.columns)} must be exactly {STAT_NAMES}")

    def __getitem__(self, name: str) -> FloatArray:
        return self.columns[name]

    @property
    def present(self) -> BoolArray:
        return ~np.isnan(self.last_update_s)

    @classmethod
    def of(cls, stats: Sequence[GuestStats | None]) -> StatsColumns:
        last = _none_to_nan([None if s is None else s.last_update_s for s in stats])
        cols = {name: _none_to_nan([None if s is None else getattr(s, name) for s in stats]) for name in STAT_NAMES}
        return cls(last, cols)

    @classmethod
    def absent(cls, n: int) -> StatsColumns:
        nan = np.full(n, np.nan)
        return cls(nan, dict.fromkeys(STAT_NAMES, nan))

    def take(self, rows: IntArray) -> StatsColumns:
        return StatsColumns(self.last_update_s[rows], {k: v[rows] for k, v in self.columns.items()})

    def row(self, i: int) -> GuestStats | None:
        last = float(self.last_update_s[i])
        if math.isnan(last):
            return None
        return GuestStats(last, **{k: _nan_to_none(float(v[i])) for k, v in self.columns.items()})

    def rows(self) -> list[GuestStats | None]:
        """Every row as ``GuestStats`` (None where the guest sent none), column by column."""
        values = [[None if math.isnan(x) else int(x) for x in self.columns[name].tolist()] for name in STAT_NAMES]
        last = self.last_update_s.tolist()
        return [None if math.isnan(t) else GuestStats(t, *row) for t, *row in zip(last, *values, strict=True)]

    def available_kib(self) -> FloatArray:
        """``GuestStats.available_kib`` by column: MemAvailable, else MemFree plus disk
        caches (0 where unsent), else NaN. Worked out once per table (the policy, the guard's
        shortfall and the metrics each read it every tick); read-only."""
        return self._available_kib

    @derived
    def _available_kib(self) -> FloatArray:
        caches = self.columns["disk_caches_kib"]
        fallback = self.columns["mem_free_kib"] + np.where(np.isnan(caches), 0.0, caches)
        avail = self.columns["mem_available_kib"]
        return read_only(np.where(np.isnan(avail), fallback, avail))


@dataclass(frozen=True, eq=False)
class GuestTable:
    """Every guest's ``GuestSnapshot`` fields as columns, one row per guest (see the
    module docstring for the encoding). Build it with ``of`` from snapshots, or straight
    from arrays (the simulator, ``sim.memory.hypervisor.SimHypervisor.table``)."""

    uuid: tuple[str, ...]
    name: tuple[str, ...]
    max_kib: IntArray
    actual_kib: IntArray
    current_kib: IntArray
    last_target_kib: IntArray  # valid where has_last_target
    has_last_target: BoolArray
    last_target_age_s: FloatArray  # NaN: unknown
    feature_bits: IntArray
    stats: StatsColumns
    stats_period_s: FloatArray
    floor_kib: IntArray
    weight: FloatArray
    run_state: npt.NDArray[np.int8]  # index into RUN_STATES
    migration_pending: BoolArray
    auto_deflate_tolerance_kib: int = DEFAULT_AUTO_DEFLATE_TOLERANCE_KIB
    # The snapshots this table was built from, if any: ``snapshot`` returns them as they were.
    source: tuple[GuestSnapshot, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = len(self.uuid)
        if {value.shape for value in _columns(self)} != {(n,)}:  # the common case in one set
            name, shape = next(
                (k, v.shape) for k, v in zip(_COLUMN_NAMES, _columns(self), strict=True) if v.shape != (n,)
            )
            raise ValueError(f"guest table column {name} has shape {shape}, expected ({n},)")
        if len(self.name) != n:
            raise ValueError(f"guest table has {n} uuids but {len(self.name)} names")

    def __len__(self) -> int:
        return len(self.uuid)

    # -- derived columns ---------------------------------------------------------------

    def feature(self, bit: Feature) -> BoolArray:
        return np.asarray((self.feature_bits >> int(bit)) & 1, dtype=bool)

    @derived  # derived columns are read many times a tick: worked out once, read-only
    def deflate_on_oom(self) -> BoolArray:
        return read_only(self.feature(Feature.DEFLATE_ON_OOM))

    @derived
    def running(self) -> BoolArray:
        return read_only(np.asarray(self.run_state == RUNNING, dtype=bool))

    def auto_deflated(self) -> BoolArray:
        """DEFLATE_ON_OOM guests holding more than their last target by over the
        tolerance: they deflated themselves under OOM pressure (``signals.auto_deflated``)."""
        return self.deflate_on_oom & self.short_of_target()

    def short_of_target(self) -> BoolArray:
        """The balloon holds less than the last target asked, beyond the tolerance."""
        return self.has_last_target & (self.actual_kib > self.last_target_kib + self.auto_deflate_tolerance_kib)

    # -- building ------------------------------------------------------------------------

    @classmethod
    def of(cls, guests: Sequence[GuestSnapshot], *, auto_deflate_tolerance_kib: int | None = None) -> GuestTable:
        """The table of these snapshots (kept as ``source``)."""
        i64 = np.int64
        last = [g.last_target_kib for g in guests]
        return cls(
            uuid=tuple(g.uuid for g in guests),
            name=tuple(g.name for g in guests),
            max_kib=np.array([g.max_kib for g in guests], dtype=i64),
            actual_kib=np.array([g.actual_kib for g in guests], dtype=i64),
            current_kib=np.array([g.current_kib for g in guests], dtype=i64),
            last_target_kib=np.array([0 if v is None else v for v in last], dtype=i64),
            has_last_target=np.array([v is not None for v in last], dtype=bool),
            last_target_age_s=_none_to_nan([g.last_target_age_s for g in guests]),
            feature_bits=np.array([_bits(g.features) for g in guests], dtype=i64),
            stats=StatsColumns.of([g.stats for g in guests]),
            stats_period_s=np.array([g.stats_period_s for g in guests], dtype=np.float64),
            floor_kib=np.array([g.floor_kib for g in guests], dtype=i64),
            weight=np.array([g.weight for g in guests], dtype=np.float64),
            run_state=np.array([RUN_STATES.index(g.run_state) for g in guests], dtype=np.int8),
            migration_pending=np.array([g.migration_pending for g in guests], dtype=bool),
            auto_deflate_tolerance_kib=(
                DEFAULT_AUTO_DEFLATE_TOLERANCE_KIB if auto_deflate_tolerance_kib is None else auto_deflate_tolerance_kib
            ),
            source=tuple(guests),
        )

    def replace(self, **changes: Any) -> GuestTable:
        """A copy with some columns changed; the source snapshots no longer describe it."""
        values = dict(zip(_FIELD_NAMES, _all_fields(self), strict=True))
        values.update(changes, source=None)
        return GuestTable(**values)

    def take(self, rows: IntArray) -> GuestTable:
        """The rows ``rows`` (indices), in that order."""
        values: dict[str, Any] = {}
        for name, value in zip(_FIELD_NAMES, _all_fields(self), strict=True):
            if isinstance(value, np.ndarray):
                value = value[rows]
            elif isinstance(value, StatsColumns):
                value = value.take(rows)
            elif isinstance(value, tuple):
                value = tuple(value[i] for i in rows.tolist())
            values[name] = value
        return GuestTable(**values)

    # -- per-guest views -----------------------------------------------------------------

    def snapshot(self, i: int) -> GuestSnapshot:
        """Row ``i`` as a ``GuestSnapshot`` (the original one if the table was built from them)."""
        if self.source is not None:
            return self.source[i]
        age = float(self.last_target_age_s[i])
        return GuestSnapshot(
            uuid=self.uuid[i],
            name=self.name[i],
            max_kib=int(self.max_kib[i]),
            actual_kib=int(self.actual_kib[i]),
            current_kib=int(self.current_kib[i]),
            last_target_kib=int(self.last_target_kib[i]) if self.has_last_target[i] else None,
            last_target_age_s=None if math.isnan(age) else age,
            features=_features(int(self.feature_bits[i])),
            stats=self.stats.row(i),
            stats_period_s=float(self.stats_period_s[i]),
            floor_kib=int(self.floor_kib[i]),
            weight=float(self.weight[i]),
            run_state=RUN_STATES[int(self.run_state[i])],
            migration_pending=bool(self.migration_pending[i]),
        )

    def snapshots(self) -> tuple[GuestSnapshot, ...]:
        """Every row as a ``GuestSnapshot``; column by column (``tolist``), which costs a
        fraction of ``snapshot`` row by row."""
        if self.source is not None:
            return self.source
        stats = self.stats.rows()
        has_last, ages = self.has_last_target.tolist(), _nan_none_list(self.last_target_age_s)
        last = [t if has else None for t, has in zip(self.last_target_kib.tolist(), has_last, strict=True)]
        columns = zip(
            self.uuid,
            self.name,
            self.max_kib.tolist(),
            self.actual_kib.tolist(),
            self.current_kib.tolist(),
            last,
            ages,
            [_features(b) for b in self.feature_bits.tolist()],
            stats,
            self.stats_period_s.tolist(),
            self.floor_kib.tolist(),
            self.weight.tolist(),
            [RUN_STATES[k] for k in self.run_state.tolist()],
            self.migration_pending.tolist(),
            strict=True,
        )
        return tuple(GuestSnapshot(*row) for row in columns)


# ``GuestTable``'s fields and its numpy columns, listed once, each read in one
# ``attrgetter`` call: a replay builds a table every tick (the shape check reads the
# columns) and ``take``/``replace`` copy every field; ``dataclasses.fields`` or a loop of
# ``getattr`` cost more than the work they feed (issue 13 profile).
_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(GuestTable))
_all_fields = attrgetter(*_FIELD_NAMES)
# Every field but these is a numpy column, one value per guest.
_COLUMN_NAMES = tuple(
    n for n in _FIELD_NAMES if n not in {"uuid", "name", "stats", "auto_deflate_tolerance_kib", "source"}
)
_columns = attrgetter(*_COLUMN_NAMES)


_FEATURES: dict[int, BalloonFeatures] = {}
_BITS: dict[BalloonFeatures, int] = {}


def _bits(features: BalloonFeatures) -> int:
    """``features.to_bits()``, computed once per distinct feature set (a host has a few)."""
    found = _BITS.get(features)
    if found is None:
        found = _BITS[features] = features.to_bits()
    return found


def _features(bits: int) -> BalloonFeatures:
    """``BalloonFeatures.from_bits``, one shared object per feature word."""
    found = _FEATURES.get(bits)
    if found is None:
        found = _FEATURES[bits] = BalloonFeatures.from_bits(bits)
    return found
