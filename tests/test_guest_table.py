"""``GuestTable``'s own contract: a column of the wrong length is refused by name, and
the derived columns (worked out once per table, ``overcommitd.table.derived``) are the
columns they derive from, read-only, on arbitrary snapshots."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overcommitd.model import Feature, GuestSnapshot, RunState
from overcommitd.table import GuestTable
from tests.test_guard_columns import snapshots


@pytest.mark.parametrize("column", ["max_kib", "weight", "run_state", "migration_pending"])
def test_a_column_of_the_wrong_length_is_refused_by_name(column: str) -> None:
    table = GuestTable.of([])
    one = np.zeros(1, dtype=getattr(table, column).dtype)
    with pytest.raises(ValueError, match=f"column {column} has shape"):
        table.replace(**{column: one})


def test_names_and_uuids_must_match_in_number() -> None:
    table = GuestTable.of([])
    with pytest.raises(ValueError, match="0 uuids but 1 names"):
        table.replace(name=("x",))


@settings(max_examples=50, deadline=None)
@given(st.lists(snapshots(), max_size=6))
def test_derived_columns_are_their_sources_read_only_and_kept(guests: list[GuestSnapshot]) -> None:
    table = GuestTable.of(guests)
    running = table.running
    assert running.tolist() == [g.run_state is RunState.RUNNING for g in guests]
    assert table.deflate_on_oom.tolist() == [g.features.deflate_on_oom for g in guests]
    expected = [
        np.nan if g.stats is None or g.stats.available_kib() is None else g.stats.available_kib() for g in guests
    ]
    np.testing.assert_allclose(table.stats.available_kib(), np.array(expected, dtype=np.float64), rtol=1e-15)
    assert table.running is running  # worked out once
    assert table.feature(Feature.DEFLATE_ON_OOM).tolist() == table.deflate_on_oom.tolist()
    with pytest.raises(ValueError):
        running[...] = True
    taken = table.take(np.arange(len(guests))[::-1])
    assert taken.running.tolist() == running.tolist()[::-1]
