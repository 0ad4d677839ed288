"""The vocabulary: feature bits, validation with the value in the message, stats fallbacks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overcommitd.model import BalloonFeatures, Feature, GuestStats, HostSnapshot
from tests.helpers import GIB, guest


@given(st.integers(min_value=0, max_value=2**40))
def test_feature_bits_roundtrip_the_balloon_bits(bits: int) -> None:
    assert BalloonFeatures.from_bits(bits).to_bits() == bits & 0b111111


def test_feature_bits_match_the_linux_uapi_header() -> None:
    f = BalloonFeatures.from_bits(1 << 2 | 1 << 5)
    assert f.deflate_on_oom and f.reporting and not f.stats_vq
    assert [f.value for f in Feature] == [0, 1, 2, 3, 4, 5]


def test_host_snapshot_rejects_impossible_values_naming_them() -> None:
    with pytest.raises(ValueError, match=r"mem_available_kib\(=9\) must be within 0..mem_total_kib\(=8\)"):
        HostSnapshot(taken_at_s=0, mem_total_kib=8, mem_available_kib=9)


def test_guest_snapshot_rejects_actual_above_max() -> None:
    with pytest.raises(ValueError, match=r"guest vm1: actual_kib"):
        guest(max_kib=GIB, actual_kib=2 * GIB)


def test_available_prefers_memavailable_and_falls_back_to_free_plus_cache() -> None:
    assert GuestStats(0, mem_available_kib=5, mem_free_kib=1, disk_caches_kib=2).available_kib() == 5
    assert GuestStats(0, mem_free_kib=1, disk_caches_kib=2).available_kib() == 3
    assert GuestStats(0).available_kib() is None


def test_balloon_is_max_minus_actual() -> None:
    assert guest(max_kib=4 * GIB, actual_kib=3 * GIB).balloon_kib == GIB
