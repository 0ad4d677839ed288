"""QMP replies translated into our vocabulary (pure): bytes to KiB once, a guest's bad
values become None, a broken reply a clear error; the Proxmox balloon: line as a floor."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overcommitd.hypervisor import pve
from overcommitd.hypervisor import qmp_replies as qr
from overcommitd.model import RunState

MIB = 1024 * 1024
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
keys = st.sampled_from([k for k, _ in qr._STAT_KEYS.values()] + ["other"])


@given(stats=st.dictionaries(keys, values), last_update=values)
def test_any_guest_stats_reply_parses_to_plausible_values_or_none(
    stats: dict[str, object], last_update: object
) -> None:
    parsed = qr.guest_stats({"stats": stats, "last-update": last_update})
    if parsed is None:
        return
    assert parsed.last_update_s > 0
    for name in qr._STAT_KEYS:
        v = getattr(parsed, name)
        assert v is None or (type(v) is int and 0 <= v < 2**53)


@given(
    reply=st.recursive(values, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(), kids), max_leaves=8)
)
def test_a_reply_of_any_shape_never_raises(reply: object) -> None:
    qr.guest_stats(reply)
    qr.balloon_children(reply, "/machine/peripheral")
    assert qr.guest_name(reply) is None or isinstance(qr.guest_name(reply), str)
    for parse in (lambda r: qr.actual_kib(r, 1024), qr.memory_size_kib, qr.run_state):
        try:
            parse(reply)
        except qr.QmpReplyError:
            pass


def test_guest_stats_in_bytes_become_kib_and_unsupplied_ones_none() -> None:
    reply = {
        "stats": {
            "stat-free-memory": 300 * MIB + 1023,
            "stat-available-memory": 2**64 - 1,  # not supplied: QEMU's u64 -1
            "stat-swap-in": -5,
            "stat-major-faults": 12,
            "stat-total-memory": True,
        },
        "last-update": 1_700_000_000,
    }
    s = qr.guest_stats(reply)
    assert s is not None
    assert s.mem_free_kib == 300 * 1024 and s.major_faults == 12
    assert s.mem_available_kib is None and s.swap_in_kib is None and s.mem_total_kib is None
    assert qr.guest_stats({"stats": {"stat-free-memory": MIB}, "last-update": 0}) is None  # no sample yet


def test_sizes_and_states() -> None:
    assert qr.memory_size_kib({"base-memory": 512 * MIB, "plugged-memory": 0}) == 512 * 1024
    assert qr.memory_size_kib({"base-memory": 1024 * MIB, "plugged-memory": 7168 * MIB}) == 8 * 1024 * 1024
    with pytest.raises(qr.QmpReplyError, match="probing again"):  # hotplugged since the probe: hold
        qr.actual_kib({"actual": 600 * MIB}, 512 * 1024)
    assert qr.kib_to_bytes(3) == 3072 and qr.bytes_to_kib(3072) == 3
    with pytest.raises(qr.QmpReplyError, match="base-memory"):
        qr.memory_size_kib({"base-memory": -1})
    with pytest.raises(qr.QmpReplyError, match="actual"):
        qr.actual_kib({"actual": "lots"}, 1024)
    assert qr.run_state({"status": "running"}) is RunState.RUNNING
    assert qr.run_state({"status": "paused"}) is RunState.PAUSED
    assert qr.run_state({"status": "inmigrate"}) is RunState.MIGRATING
    assert qr.run_state({"status": "guest-panicked"}) is None
    assert qr.guest_uuid({"UUID": "00000000-0000-0000-0000-000000000000"}) is None
    assert qr.balloon_children(
        [{"name": "b", "type": "child<virtio-balloon-pci>"}, {"name": "n", "type": "child<virtio-net-pci>"}], "/p"
    ) == ["/p/b"]


def test_proxmox_balloon_line() -> None:
    assert pve.parse_balloon("memory: 4096\nballoon: 1024\n") == pve.PveBalloon(floor_kib=1024 * 1024)
    assert pve.parse_balloon("balloon: 0\n") == pve.PveBalloon(exclude=True)
    assert pve.parse_balloon("memory: 4096\n[snap]\nballoon: 512\n") is None  # a snapshot's, not the VM's
    assert pve.parse_balloon("balloon: lots\n") is None
    assert pve.parse_balloon("balloon: 99999999999999999999\n") is None


@given(text=st.text(max_size=200))
def test_any_proxmox_config_text_parses_or_is_none(text: str) -> None:
    b = pve.parse_balloon(text)
    assert b is None or (b.floor_kib >= 0 and (b.exclude or b.floor_kib > 0))
