"""The stats exchange's shortcuts hold to the general code they shortcut.

``DriverQueue.reuse_one`` is ``get_buf`` + ``add_one`` + ``kick_prepare`` of the stats
buffer with the ring arithmetic inline: on any ring state (other chains in flight,
longer chains used first, a corrupt used id, interrupts off, with and without
EVENT_IDX) it must leave the same guest-memory bytes and the same driver state, or
change nothing and hand over to the general calls."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sim.virtio.guestmem import Arena, GuestMemory
from sim.virtio.virtqueue import Buf, DeviceQueue, DriverQueue, RingLayout, VirtioError

RAM_PAGES = 1 << 20
STATS_ADDR, STATS_LEN = 0x3000, 160


def _state(drv: DriverQueue) -> tuple[bytes, dict[str, Any]]:
    """Everything the driver's side keeps: its guest-memory bytes and its fields (the
    in-flight tokens in insertion order, as Linux walks nothing by order but a dict is
    compared by it here to catch a moved entry)."""
    fields = {k: v for k, v in vars(drv).items() if k not in ("mem", "arena", "_buf", "lay", "in_flight")}
    fields["in_flight"] = list(drv.in_flight.items())
    return bytes(drv.mem.buf), fields


def _general(drv: DriverQueue, token: int) -> object:
    """stats_handle_request's general calls: reclaim the used chain, post the buffer."""
    try:
        got = drv.get_buf()
    except VirtioError as e:
        return str(e)
    if got is None:
        return None
    assert drv.add_one(STATS_ADDR, STATS_LEN, token) is not None
    return drv.kick_prepare()


ring_states = st.fixed_dictionaries(
    {
        "num": st.sampled_from([2, 4, 8]),
        "event_idx": st.booleans(),
        "callbacks_off": st.booleans(),
        "rounds": st.integers(0, 20),  # stats round trips before: indices off their start
        "others": st.lists(st.integers(1, 3), max_size=2),  # chains in flight beside the stats buffer
        "first_used": st.integers(0, 3),  # which popped chain the device pushes first
        "corrupt_id": st.none() | st.integers(0, 11),
        "pushed": st.booleans(),  # whether the device used anything yet
    }
)


def _ring(state: dict[str, Any]) -> DriverQueue:
    """A driver queue whose device side holds the stats buffer and ``others``, and has
    pushed one of them back (or none, or a corrupt id)."""
    mem = GuestMemory(64 * 1024, ram_pages=RAM_PAGES)
    arena = Arena(mem)
    lay = RingLayout.allocate(arena, state["num"])
    drv = DriverQueue(mem, lay, event_idx=state["event_idx"], indirect=False, arena=arena)
    dev = DeviceQueue(mem, lay, event_idx=state["event_idx"])
    for k in range(state["rounds"]):
        drv.add_one(STATS_ADDR, STATS_LEN, -k)
        drv.kick_prepare()
        elem = dev.pop()
        assert elem is not None
        dev.push(elem)
        drv.get_buf()
    if state["callbacks_off"]:
        drv.disable_cb()
    for k, n in enumerate(state["others"]):
        drv.add([Buf(0x2000 + 0x100 * j, 16) for j in range(n)], 1000 + k)
    drv.add_one(STATS_ADDR, STATS_LEN, 1)
    drv.kick_prepare()
    popped = []
    while (elem := dev.pop()) is not None:
        popped.append(elem)
    if state["pushed"] and popped:
        dev.push(popped[state["first_used"] % len(popped)])
        if state["corrupt_id"] is not None:
            used_at = lay.used + 4 + 8 * ((dev.used_idx - 1) & (lay.num - 1))
            struct.pack_into("<I", mem.buf, used_at, state["corrupt_id"])
    return drv


@settings(max_examples=400, deadline=None)
@given(ring_states)
def test_reuse_one_is_get_buf_then_add_one_then_kick_prepare(state: dict[str, Any]) -> None:
    reference = _ring(state)
    fast = _ring(state)  # built alike: the same bytes and fields
    assert _state(fast) == _state(reference)
    expected = _general(reference, 7)
    before = _state(fast)
    got = fast.reuse_one(STATS_ADDR, STATS_LEN, 7)
    if got is None:  # not the steady state: nothing changed, the general calls follow
        assert _state(fast) == before
        got = _general(fast, 7)
    assert got == expected
    assert _state(fast) == _state(reference)
