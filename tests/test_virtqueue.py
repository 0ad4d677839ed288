"""Split virtqueues: byte layout, index wrap, notification rules, and QEMU's checks."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.virtio.guestmem import Arena, GuestMemory
from sim.virtio.virtqueue import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Buf,
    DeviceQueue,
    DriverQueue,
    RingLayout,
    VirtioError,
    vring_need_event,
)


def make(
    num: int = 8, *, event_idx: bool = False, indirect: bool = False
) -> tuple[GuestMemory, DriverQueue, DeviceQueue, Arena]:
    mem = GuestMemory(64 * 1024, ram_pages=1 << 20)
    arena = Arena(mem)
    lay = RingLayout.allocate(arena, num)
    drv = DriverQueue(mem, lay, event_idx=event_idx, indirect=indirect, arena=arena)
    dev = DeviceQueue(mem, lay, event_idx=event_idx)
    return mem, drv, dev, arena


def test_layout_offsets_and_alignment_follow_the_spec() -> None:
    _mem, drv, _dev, _arena = make(128)
    lay = drv.lay
    assert lay.desc % 16 == 0 and lay.avail % 2 == 0 and lay.used % 4 == 0
    assert lay.avail == lay.desc + 16 * 128  # 2048 bytes of descriptors
    assert lay.used == (lay.avail + 6 + 2 * 128 + 3) // 4 * 4
    assert lay.used_event == lay.avail + 4 + 2 * 128
    assert lay.avail_event == lay.used + 4 + 8 * 128


def test_golden_bytes_of_one_readable_buffer_through_both_rings() -> None:
    mem, drv, dev, _ = make(4)
    lay = drv.lay
    drv.add([Buf(0x2000, 1024)], token="pfns")
    # descriptor 0: le64 addr, le32 len, le16 flags, le16 next (free list kept: 1)
    assert mem.read(lay.desc, 16) == bytes.fromhex("00200000000000000004000000000000")
    # avail: flags 0, idx 1, ring[0] = head 0
    assert mem.read(lay.avail, 6) == bytes.fromhex("000001000000")
    elem = dev.pop()
    assert elem is not None and elem.out == [(0x2000, 1024)] and elem.inn == []
    dev.push(elem, 0)
    # used: flags 0, idx 1, ring[0] = {id 0, len 0}
    assert mem.read(lay.used, 12) == bytes.fromhex("000001000000000000000000")
    assert drv.get_buf() == ("pfns", 0)
    assert drv.num_free == 4


def test_chain_has_next_and_write_flags_in_order() -> None:
    mem, drv, dev, _ = make(8)
    head = drv.add([Buf(0x2000, 4), Buf(0x3000, 16, write=True), Buf(0x4000, 8, write=True)], token=1)
    assert head == 0
    flags = [struct.unpack_from("<QIHH", mem.buf, drv.lay.desc + 16 * i)[2] for i in range(3)]
    assert flags == [VRING_DESC_F_NEXT, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, VRING_DESC_F_WRITE]
    elem = dev.pop()
    assert elem is not None and elem.out == [(0x2000, 4)] and elem.inn == [(0x3000, 16), (0x4000, 8)]


def test_indirect_chain_uses_one_ring_descriptor() -> None:
    mem, drv, dev, _ = make(4, indirect=True)
    drv.add([Buf(0x2000 + 0x1000 * i, 4096, write=True) for i in range(8)], token="report")
    assert drv.num_free == 3
    flags = struct.unpack_from("<QIHH", mem.buf, drv.lay.desc)[2]
    assert flags == VRING_DESC_F_INDIRECT
    elem = dev.pop()
    assert elem is not None and len(elem.inn) == 8 and elem.ndescs == 8
    dev.push(elem)
    assert drv.get_buf() == ("report", 0) and drv.num_free == 4


def test_indices_run_free_and_wrap_at_65536() -> None:
    mem, drv, dev, _ = make(4)
    for k in range(70000):
        assert drv.add([Buf(0x2000, 4)], token=k) is not None
        elem = dev.pop()
        assert elem is not None
        dev.push(elem)
        assert drv.get_buf() == (k, 0)
    assert dev.avail_idx() == 70000 % 65536 == drv.avail_idx_shadow
    assert struct.unpack_from("<H", mem.buf, drv.lay.used + 2)[0] == 70000 % 65536


def test_full_ring_refuses_a_chain() -> None:
    _, drv, _, _ = make(2)
    assert drv.add([Buf(0x2000, 4)], 1) is not None
    assert drv.add([Buf(0x2000, 4), Buf(0x2004, 4)], 2) is None


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),
        (1, 1, 0, False),
        (5, 10, 0, True),
        (10, 10, 0, False),
        (65535, 0, 65535, True),
        (0, 2, 1, False),
    ],
)
def test_vring_need_event(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


def test_event_idx_interrupts_only_when_used_event_is_crossed() -> None:
    mem, drv, dev, _ = make(8, event_idx=True)
    for k in range(3):
        drv.add([Buf(0x2000, 4)], k)
    assert drv.kick_prepare()  # avail_event = 0 initially: the first entry wants a kick
    first = dev.pop()
    assert first is not None
    dev.push(first)
    assert dev.should_notify()  # the first decision always interrupts
    drv.disable_cb()  # used_event stays at 0: no more interrupts wanted
    for _ in range(2):
        e = dev.pop()
        assert e is not None
        dev.push(e)
        assert not dev.should_notify()
    drv.get_buf()
    assert not drv.enable_cb()  # two used buffers are already waiting: reap them
    struct.pack_into("<H", mem.buf, drv.lay.used_event, 3)
    drv.add([Buf(0x2000, 4)], 9)
    e = dev.pop()
    assert e is not None
    dev.push(e)
    assert dev.should_notify()  # used.idx moved from 3 to 4, crossing used_event = 3


def test_no_interrupt_and_no_notify_flags_without_event_idx() -> None:
    mem, drv, dev, _ = make(4)
    drv.disable_cb()
    assert struct.unpack_from("<H", mem.buf, drv.lay.avail)[0] == VRING_AVAIL_F_NO_INTERRUPT
    drv.add([Buf(0x2000, 4)], 1)
    dev.set_notification(False)
    assert not drv.kick_prepare()
    e = dev.pop()
    assert e is not None
    dev.push(e)
    assert not dev.should_notify()
    drv.enable_cb()
    dev.set_notification(True)
    drv.add([Buf(0x2000, 4)], 2)
    assert drv.kick_prepare()


def _corrupt(mem: GuestMemory, lay: RingLayout, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
    struct.pack_into("<QIHH", mem.buf, lay.desc + 16 * i, addr, length, flags, nxt)


@pytest.mark.parametrize(
    ("desc", "message"),
    [
        ((0x10_0000_0000, 4, 0, 0), "virtio: bogus descriptor or out of resources"),
        ((0x2000, 4, VRING_DESC_F_NEXT, 0), "Looped descriptor"),
        ((0x2000, 4, VRING_DESC_F_NEXT, 99), "Desc next is 99"),
        ((0x2000, 0, 0, 0), "virtio: zero sized buffers are not allowed"),
        ((0x2000, 17, VRING_DESC_F_INDIRECT, 0), "Invalid size for indirect buffer table"),
    ],
)
def test_device_names_what_is_wrong_with_a_chain(desc: tuple[int, int, int, int], message: str) -> None:
    mem, drv, dev, _ = make(4)
    drv.add([Buf(0x2000, 4)], 1)
    _corrupt(mem, drv.lay, 0, *desc)
    with pytest.raises(VirtioError, match=message):
        dev.pop()


def test_readable_after_writable_is_refused() -> None:
    mem, drv, dev, _ = make(4)
    drv.add([Buf(0x2000, 4, write=True), Buf(0x3000, 4, write=True)], 1)
    _corrupt(mem, drv.lay, 1, 0x3000, 4, 0, 0)
    with pytest.raises(VirtioError, match="Incorrect order for descriptors"):
        dev.pop()


def test_avail_index_beyond_the_queue_and_bad_heads_are_refused() -> None:
    mem, drv, dev, _ = make(4)
    struct.pack_into("<H", mem.buf, drv.lay.avail + 2, 9)
    with pytest.raises(VirtioError, match="Guest moved used index from 0 to 9"):
        dev.pop()
    struct.pack_into("<HH", mem.buf, drv.lay.avail + 2, 1, 7)
    with pytest.raises(VirtioError, match="Guest says index 7 is available"):
        dev.pop()


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=16 * 8 + 22 + 70, max_size=16 * 8 + 22 + 70), st.integers(0, 0xFFFF))
def test_device_never_raises_anything_but_virtio_error_on_arbitrary_rings(blob: bytes, last_avail: int) -> None:
    """Whatever the guest wrote, popping either yields well-formed elements inside guest
    memory or raises VirtioError (which the device turns into a broken state)."""
    mem = GuestMemory(8 * 4096, ram_pages=16)
    lay = RingLayout(8, 0x1000, 0x1000 + 128, 0x1000 + 128 + 22 + 2)
    mem.write(0x1000, blob)
    dev = DeviceQueue(mem, lay, event_idx=bool(last_avail & 1))
    dev.last_avail_idx = last_avail
    try:
        for _ in range(10):
            elem = dev.pop()
            if elem is None:
                break
            for addr, n in elem.out + elem.inn:
                assert 0 <= addr and addr + n <= mem.ram_bytes and n > 0
            assert elem.ndescs <= len(mem.buf) // 16
            dev.push(elem, 0)
            dev.should_notify()
    except VirtioError:
        pass
