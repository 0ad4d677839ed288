"""The protocol model's one-buffer fast paths hold to the general code they shortcut.

A PFN array and the stats buffer are one-descriptor chains: the driver adds them with
``DriverQueue.add_one``, the device pops them without ``_collect``'s walk, the driver
frees them without ``_detach``'s walk, and the stats work runs as a plain function.
Each property compares the shortcut with the general path (or the spec's bytes) on
arbitrary input, errors included."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.virtio.guestmem import Arena, GuestMemory
from sim.virtio.process import ProcessGen, WorkItem
from sim.virtio.virtqueue import (
    VRING_DESC_F_WRITE,
    Buf,
    DeviceQueue,
    DriverQueue,
    Element,
    RingLayout,
    VirtioError,
)
from sim.virtio.world import World

RAM_PAGES = 1 << 20


def _rings(num: int = 8) -> tuple[GuestMemory, DriverQueue, DeviceQueue]:
    mem = GuestMemory(64 * 1024, ram_pages=RAM_PAGES)
    arena = Arena(mem)
    lay = RingLayout.allocate(arena, num)
    return mem, DriverQueue(mem, lay, event_idx=True, indirect=True, arena=arena), DeviceQueue(mem, lay, event_idx=True)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.booleans(), st.integers(0, 20))
def test_add_one_writes_the_spec_bytes_and_pops_as_the_general_walk(
    addr: int, length: int, write: bool, before: int
) -> None:
    """Any one-buffer chain, after ``before`` others went round the ring: the descriptor
    and avail bytes are the spec's, and pop gives what ``_collect`` gives (or raises
    the same error)."""
    mem, drv, dev = _rings()
    for k in range(before):  # move the free list and the indices off their start
        drv.add_one(0x2000, 4, k)
        elem = dev.pop()
        assert elem is not None
        dev.push(elem, 0)
        drv.get_buf()
    head = drv.add_one(addr, length, "token", write=write)
    assert head is not None
    lay = drv.lay
    flags = VRING_DESC_F_WRITE if write else 0
    assert mem.read(lay.desc + 16 * head, 16) == struct.pack("<QIHH", addr, length, flags, 0)
    assert struct.unpack_from("<H", mem.buf, lay.avail + 4 + 2 * (before % lay.num))[0] == head
    assert struct.unpack_from("<H", mem.buf, lay.avail + 2)[0] == before + 1

    reference = Element(head, [], [])
    try:
        dev._collect(reference, lay.desc, lay.num, head, (addr, length, flags, 0))
        expected: Element | str = reference
    except VirtioError as e:
        expected = str(e)
    try:
        got: Element | str | None = dev.pop()
    except VirtioError as e:
        got = str(e)
    assert got == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=40))
def test_freeing_one_and_many_descriptor_chains_keeps_the_free_list_whole(chains: list[int]) -> None:
    """get_buf's one-descriptor shortcut and _detach's walk, interleaved: every
    descriptor comes back, and the ring keeps working for as long as it is used."""
    _mem, drv, dev = _rings()
    drv.indirect = False  # direct chains, so multi-buffer chains walk the free list
    for k, n in enumerate(chains):
        bufs = [Buf(0x2000 + 0x100 * j, 16) for j in range(n)]
        assert drv.add(bufs, k) is not None
        elem = dev.pop()
        assert elem is not None and elem.ndescs == n
        dev.push(elem, 0)
        assert drv.get_buf() == (k, 0)
        assert drv.num_free == drv.lay.num
    seen, i = set(), drv.free_head
    for _ in range(drv.lay.num):  # the free list threads every descriptor exactly once
        seen.add(i)
        i = struct.unpack_from("<H", drv.mem.buf, drv.lay.desc + 16 * i + 14)[0]
    assert seen == set(range(drv.lay.num))


def test_work_that_never_sleeps_runs_once_per_queue_after_its_latency() -> None:
    world = World()
    ran: list[float] = []

    def work() -> None:
        ran.append(world.now_s)
        if len(ran) < 3:
            assert item.queue(0.5)  # not pending while it runs: the re-queue counts

    item = WorkItem(world, work, latency_s=0.25)
    assert item.queue() and not item.queue()  # a second queue while pending is a no-op
    world.run(until_s=10.0)
    assert ran == [0.25, 1.0, 1.75] and item.runs == 3 and not item.pending


@pytest.mark.parametrize("latency_s", [0.0, 0.001])
def test_a_generator_work_item_still_sleeps(latency_s: float) -> None:
    world = World()
    ran: list[float] = []

    def work() -> ProcessGen:
        ran.append(world.now_s)
        yield 0.5
        ran.append(world.now_s)

    item = WorkItem(world, work, latency_s=latency_s)
    item.queue()
    world.run(until_s=10.0)
    assert ran == [latency_s, latency_s + 0.5]
