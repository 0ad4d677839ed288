"""Split virtqueues in guest memory, both sides (virtio spec 1.x §2.7, "Split Virtqueues").

Three areas in guest-physical memory, little-endian, written by one side each::

    descriptor table  align 16  16*N        driver   {le64 addr; le32 len; le16 flags; le16 next}
    available ring    align 2   6 + 2*N     driver   {flags; idx; ring[N]; used_event}
    used ring         align 4   6 + 8*N     device   {flags; idx; {le32 id; le32 len}[N]; avail_event}

``avail.idx`` and ``used.idx`` are free-running u16 counters that wrap; slot = idx % N.
``DriverQueue`` is the guest's side (Linux drivers/virtio/virtio_ring.c: add, kick
decision, get_buf, callbacks on/off); ``DeviceQueue`` is the host's side (QEMU
hw/virtio/virtio.c: pop, push, interrupt decision). Neither keeps a private copy of what
the other wrote: every exchange goes through the bytes, so a test can corrupt them.

The device validates as QEMU's ``virtqueue_split_pop`` does. A bad ring raises
``VirtioError`` carrying QEMU's message; the device model catches it and marks itself
broken (``virtio_error``: DEVICE_NEEDS_RESET), so it never escapes into a replay.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from sim.virtio.guestmem import Arena, GuestMemory, GuestMemoryError

# virtio spec §2.7.5 / include/uapi/linux/virtio_ring.h
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
VIRTQUEUE_MAX_SIZE = 1024  # QEMU include/hw/virtio/virtio.h; the spec allows up to 32768
VRING_MAX_SIZE = 32768  # spec §2.7: largest power of 2 that keeps full and empty apart in u16

DESC = struct.Struct("<QIHH")  # struct virtq_desc, 16 bytes
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")  # struct virtq_used_elem, 8 bytes
FLAGS_NEXT = struct.Struct("<HH")  # a descriptor's flags and next, at offset 12
_NOT_A_HEAD = object()  # what ``in_flight`` gives for an id the driver never added


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Spec §2.7.10 / virtio_ring.h ``vring_need_event``: notify iff ``event_idx`` lies
    in the window (old, new] of indices just published, all arithmetic mod 2**16."""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


class VirtioError(Exception):
    """A guest-caused protocol violation; the message is QEMU's ``virtio_error`` text."""


@dataclass(frozen=True, slots=True)
class RingLayout:
    """Where one queue's three areas sit in guest memory, and its size."""

    num: int
    desc: int
    avail: int
    used: int

    @property
    def used_event(self) -> int:
        return self.avail + 4 + 2 * self.num

    @property
    def avail_event(self) -> int:
        return self.used + 4 + 8 * self.num

    @staticmethod
    def allocate(arena: Arena, num: int) -> RingLayout:
        """Place the areas with the spec's alignment (16, 2, 4), as a modern driver may."""
        if num <= 0 or num & (num - 1) or num > VRING_MAX_SIZE:
            raise ValueError(f"queue size num(={num}) must be a power of 2 <= {VRING_MAX_SIZE}")
        desc = arena.alloc(16 * num, 16)
        avail = arena.alloc(6 + 2 * num, 2)
        used = arena.alloc(6 + 8 * num, 4)
        return RingLayout(num, desc, avail, used)


@dataclass(frozen=True, slots=True)
class Buf:
    """One guest buffer: a guest-physical range, device-readable unless ``write``."""

    addr: int
    length: int
    write: bool = False


@dataclass(slots=True)
class Element:
    """A popped chain as the device sees it (QEMU ``VirtQueueElement``)."""

    head: int
    out: list[tuple[int, int]]  # device-readable (addr, len)
    inn: list[tuple[int, int]]  # device-writable (addr, len)
    ndescs: int = 0


# -- the driver's side ----------------------------------------------------------------


class DriverQueue:
    """The guest's half of a split virtqueue (Linux virtio_ring.c, split ring)."""

    def __init__(
        self,
        mem: GuestMemory,
        layout: RingLayout,
        *,
        event_idx: bool,
        indirect: bool = False,
        callback: bool = True,
        arena: Arena | None = None,
        name: str = "vq",
    ) -> None:
        self.mem, self.lay, self.name = mem, layout, name
        self.event_idx, self.indirect, self.arena = event_idx, indirect and arena is not None, arena
        n = layout.num
        # Addresses the hot path touches, computed once (the layout never moves).
        self._avail_idx_at, self._avail_ring_at = layout.avail + 2, layout.avail + 4
        self._used_idx_at, self._used_ring_at = layout.used + 2, layout.used + 4
        self._used_event_at, self._avail_event_at = layout.used_event, layout.avail_event
        self._buf, self._desc_at, self._mask = mem.buf, layout.desc, n - 1  # fixed: read per request
        self.num_free = n
        self.free_head = 0
        self.avail_idx_shadow = 0
        self.last_used_idx = 0
        self.num_added = 0
        self.in_flight: dict[int, object] = {}  # head -> the caller's token (Linux ``desc_state[].data``)
        self._indirect_tables: dict[int, int] = {}  # head -> table address, reused per head
        self._indirect_sizes: dict[int, int] = {}
        mem.write(layout.desc, b"\0" * 16 * n)
        for i in range(n - 1):  # free list threaded through ``next``, as vring_init does
            U16.pack_into(mem.buf, layout.desc + 16 * i + 14, i + 1)
        mem.write(layout.avail, b"\0" * (6 + 2 * n))
        self.avail_flags_shadow = 0
        if not callback:  # no callback: never want interrupts (Linux vring_create_virtqueue)
            self.avail_flags_shadow = VRING_AVAIL_F_NO_INTERRUPT
            if not event_idx:
                U16.pack_into(mem.buf, layout.avail, self.avail_flags_shadow)

    # adding buffers

    def add(self, bufs: list[Buf], token: object) -> int | None:
        """Expose one chain (readable bufs first); returns its head, or None if the ring
        is full (-ENOSPC). The device does not see it before ``kick``."""
        if not bufs:
            raise ValueError(f"{self.name}: a chain needs at least one buffer")
        if len(bufs) == 1:
            b = bufs[0]
            return self.add_one(b.addr, b.length, token, write=b.write)
        if self._misordered(bufs):
            raise ValueError(f"{self.name}: device-readable buffers must precede device-writable ones")
        head = None
        if self.indirect and len(bufs) > 1 and self.num_free:
            try:
                head = self._add_indirect(bufs)
            except MemoryError:  # no room for a table: Linux falls back to a direct chain too
                head = None
        if head is None:
            if self.num_free < len(bufs):
                return None
            head = self._add_direct(bufs)
        self._publish(head, token)
        return head

    def add_one(self, addr: int, length: int, token: object, *, write: bool = False) -> int | None:
        """``add`` of a one-buffer chain (a PFN array, the stats buffer), as Linux adds
        it: one direct descriptor, never an indirect table (virtqueue_add_split uses one
        only for more than one scatterlist entry); None if the ring is full."""
        if not self.num_free:
            return None
        buf, head = self._buf, self.free_head
        at = self._desc_at + 16 * head
        self.free_head = U16.unpack_from(buf, at + 14)[0]
        DESC.pack_into(buf, at, addr, length, VRING_DESC_F_WRITE if write else 0, 0)
        self.num_free -= 1
        self._publish(head, token)
        return head

    def _publish(self, head: int, token: object) -> None:
        """Put ``head`` in the available ring, then move ``avail.idx`` (in that order)."""
        self.in_flight[head] = token
        buf, shadow = self._buf, self.avail_idx_shadow
        U16.pack_into(buf, self._avail_ring_at + 2 * (shadow & self._mask), head)
        self.avail_idx_shadow = shadow = (shadow + 1) & 0xFFFF
        U16.pack_into(buf, self._avail_idx_at, shadow)  # after the ring entry
        self.num_added += 1

    @staticmethod
    def _misordered(bufs: list[Buf]) -> bool:
        seen_write = False
        for b in bufs:
            if seen_write and not b.write:
                return True
            seen_write |= b.write
        return False

    def _add_direct(self, bufs: list[Buf]) -> int:
        head = i = self.free_head
        buf, desc, last = self.mem.buf, self.lay.desc, len(bufs) - 1
        for k, b in enumerate(bufs):
            at = desc + 16 * i
            nxt = U16.unpack_from(buf, at + 14)[0]
            flags = (VRING_DESC_F_WRITE if b.write else 0) | (VRING_DESC_F_NEXT if k < last else 0)
            DESC.pack_into(buf, at, b.addr, b.length, flags, nxt if k < last else 0)
            last_next, i = nxt, nxt
        self.free_head = last_next
        self.num_free -= len(bufs)
        return head

    def _add_indirect(self, bufs: list[Buf]) -> int:
        """One descriptor pointing at a table of ``len(bufs)`` descriptors (spec §2.7.5.3)."""
        assert self.arena is not None
        head = self.free_head
        table = self._indirect_tables.get(head)
        if table is None or self._indirect_sizes.get(head, 0) < len(bufs):
            table = self.arena.alloc(16 * len(bufs), 16)
            self._indirect_tables[head] = table
            self._indirect_sizes[head] = len(bufs)
        for k, b in enumerate(bufs):
            flags = (VRING_DESC_F_WRITE if b.write else 0) | (VRING_DESC_F_NEXT if k < len(bufs) - 1 else 0)
            DESC.pack_into(self.mem.buf, table + 16 * k, b.addr, b.length, flags, k + 1 if k < len(bufs) - 1 else 0)
        at = self.lay.desc + 16 * head
        self.free_head = U16.unpack_from(self.mem.buf, at + 14)[0]
        DESC.pack_into(self.mem.buf, at, table, 16 * len(bufs), VRING_DESC_F_INDIRECT, 0)
        self.num_free -= 1
        return head

    # notifying the device

    def kick_prepare(self) -> bool:
        """Whether the device wants a notification for what was added since the last
        decision (Linux ``virtqueue_kick_prepare_split``)."""
        new = self.avail_idx_shadow
        old = (new - self.num_added) & 0xFFFF
        self.num_added = 0
        if self.event_idx:
            avail_event: int = U16.unpack_from(self._buf, self._avail_event_at)[0]
            return (new - avail_event - 1) & 0xFFFF < (new - old) & 0xFFFF  # vring_need_event
        used_flags = U16.unpack_from(self.mem.buf, self.lay.used)[0]
        return not used_flags & VRING_USED_F_NO_NOTIFY

    # runs of requests served at once

    def quiet(self) -> bool:
        """Nothing added and not yet kicked, nothing in flight, the ring indices in guest
        memory the ones this side last wrote and read, and the next add is kicked (the
        device asked for it): where a run of one-descriptor requests, each used and
        reaped before the next, may be replayed at once (``replay_served``)."""
        if self.num_added or self.in_flight or not self.num_free:
            return False
        return self._in_step()

    def _in_step(self) -> bool:
        """The ring indices in guest memory the ones this side last wrote and read, and
        the next add kicked (the device asked for it)."""
        buf = self._buf
        if U16.unpack_from(buf, self._avail_idx_at)[0] != self.avail_idx_shadow:
            return False
        if U16.unpack_from(buf, self._used_idx_at)[0] != self.last_used_idx:
            return False
        if self.event_idx:
            return bool(U16.unpack_from(buf, self._avail_event_at)[0] == self.avail_idx_shadow)
        return not U16.unpack_from(buf, self.lay.used)[0] & VRING_USED_F_NO_NOTIFY

    def replay_served(self, count: int, addr: int, length: int) -> int:
        """What ``count`` requests of one device-readable buffer leave in this side and
        its bytes, each added, kicked, used by the device and reaped before the next
        (from a ``quiet`` queue): every one takes the free list's head and gives it back,
        so all share one descriptor. Returns that head."""
        buf, head = self._buf, self.free_head
        at = self._desc_at + 16 * head
        DESC.pack_into(buf, at, addr, length, 0, U16.unpack_from(buf, at + 14)[0])  # get_buf restored ``next``
        self._round_trips(count, head)
        return head

    def reusable(self, head: int) -> bool:
        """Whether ``reuse_one`` of ``head``, each time the device has pushed it back, goes
        the common way (``replay_reused``): ``head`` a one-descriptor chain in flight, every
        used chain reaped and every added one made available, as the ring indices in guest
        memory say, nothing added and not yet kicked, and the device asks for each kick
        and will interrupt for each push (``used_event`` moved by each reap)."""
        if self.num_added or head not in self.in_flight:
            return False
        if U16.unpack_from(self._buf, self._desc_at + 16 * head + 12)[0] & VRING_DESC_F_NEXT:
            return False
        if self.event_idx and self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            return False  # a reap leaves ``used_event`` behind: the device stops interrupting
        return self._in_step()

    def replay_reused(self, count: int, head: int, addr: int, length: int, token: object) -> None:
        """What ``count`` ``reuse_one(addr, length, ...)`` of ``head`` leave in this side and
        its bytes, each after the device pushed ``head`` back and before it pops it again
        (from a ``reusable`` queue): the last one's ``token`` in flight."""
        DESC.pack_into(self._buf, self._desc_at + 16 * head, addr, length, 0, 0)
        del self.in_flight[head]  # re-inserted last, as reuse_one does
        self.in_flight[head] = token
        self._round_trips(count, head)

    def _round_trips(self, count: int, head: int) -> None:
        """``count`` adds of ``head``, each kicked and reaped after the device used it."""
        buf = self._buf
        _fill_ring(buf, self._avail_ring_at, U16, self.avail_idx_shadow, count, self._mask, head)
        self.avail_idx_shadow = (self.avail_idx_shadow + count) & 0xFFFF
        U16.pack_into(buf, self._avail_idx_at, self.avail_idx_shadow)
        self.last_used_idx = (self.last_used_idx + count) & 0xFFFF
        if self.event_idx and not self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            U16.pack_into(buf, self._used_event_at, self.last_used_idx)

    # reaping

    def more_used(self) -> bool:
        return bool(U16.unpack_from(self.mem.buf, self.lay.used + 2)[0] != self.last_used_idx)

    def get_buf(self) -> tuple[object, int] | None:
        """The next used chain's token and written length, or None; frees its descriptors."""
        buf, last = self._buf, self.last_used_idx
        if U16.unpack_from(buf, self._used_idx_at)[0] == last:  # not more_used()
            return None
        head, length = USED_ELEM.unpack_from(buf, self._used_ring_at + 8 * (last & self._mask))
        token = self.in_flight.pop(head, _NOT_A_HEAD)
        if token is _NOT_A_HEAD:
            # Linux BAD_RING: "id %u is not a head!" - the driver stops using the queue.
            raise VirtioError(f"{self.name}: id {head} is not a head!")
        at = self._desc_at + 16 * head
        if U16.unpack_from(buf, at + 12)[0] & VRING_DESC_F_NEXT:
            self._detach(head)
        else:  # a one-descriptor chain (every PFN array): _detach without the walk
            U16.pack_into(buf, at + 14, self.free_head)
            self.free_head = head
            self.num_free += 1
        self.last_used_idx = last = (last + 1) & 0xFFFF
        if self.event_idx and not self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            U16.pack_into(buf, self._used_event_at, last)
        return token, length

    def reuse_one(self, addr: int, length: int, token: object) -> bool | None:
        """``get_buf`` of the next used chain, then ``add_one(addr, length, token)`` and
        ``kick_prepare``: the stats work's steady state (Linux stats_handle_request
        reclaims its one buffer and posts it again), the ring arithmetic inline. Where
        the used chain is a one-descriptor chain this side has in flight, ``get_buf``
        puts its head on the free list and ``add_one`` takes it straight back: the free
        list is as it was, and only the descriptor, the two rings' entries and the
        indices change. Returns whether to kick, or None (nothing changed) where the
        general calls must run: nothing used, an unknown id, a longer chain."""
        buf, last = self._buf, self.last_used_idx
        if U16.unpack_from(buf, self._used_idx_at)[0] == last:
            return None
        head = USED_ELEM.unpack_from(buf, self._used_ring_at + 8 * (last & self._mask))[0]
        at = self._desc_at + 16 * head
        if head not in self.in_flight or U16.unpack_from(buf, at + 12)[0] & VRING_DESC_F_NEXT:
            return None
        del self.in_flight[head]  # re-inserted last, as get_buf's pop and _publish's store
        self.last_used_idx = last = (last + 1) & 0xFFFF
        if self.event_idx and not self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            U16.pack_into(buf, self._used_event_at, last)
        DESC.pack_into(buf, at, addr, length, 0, 0)
        self._publish(head, token)
        return self.kick_prepare()

    def _detach(self, head: int) -> None:
        buf, desc, num = self.mem.buf, self.lay.desc, self.lay.num
        i, n = head, 1
        while True:
            flags, nxt = FLAGS_NEXT.unpack_from(buf, desc + 16 * i + 12)
            if not flags & VRING_DESC_F_NEXT:
                break
            if nxt >= num or n >= num:
                raise VirtioError(f"{self.name}: descriptor chain at {head} is corrupt")
            i, n = nxt, n + 1
        U16.pack_into(buf, desc + 16 * i + 14, self.free_head)
        self.free_head = head
        self.num_free += n

    def disable_cb(self) -> None:
        """Ask for no interrupts (advisory); with EVENT_IDX only the shadow changes and
        ``used_event`` is simply not moved forward any more."""
        if not self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            self.avail_flags_shadow |= VRING_AVAIL_F_NO_INTERRUPT
            if not self.event_idx:
                U16.pack_into(self.mem.buf, self.lay.avail, self.avail_flags_shadow)

    def enable_cb(self) -> bool:
        """Ask for an interrupt at the next used buffer; False if one is already there
        (the caller must reap it: the lost-wakeup check of ``virtqueue_enable_cb``)."""
        if self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            self.avail_flags_shadow &= ~VRING_AVAIL_F_NO_INTERRUPT
            if not self.event_idx:
                U16.pack_into(self.mem.buf, self.lay.avail, self.avail_flags_shadow)
        if self.event_idx:
            U16.pack_into(self.mem.buf, self._used_event_at, self.last_used_idx)
        return not self.more_used()


# -- the device's side ----------------------------------------------------------------


class DeviceQueue:
    """The host's half of a split virtqueue (QEMU hw/virtio/virtio.c, split ring)."""

    def __init__(self, mem: GuestMemory, layout: RingLayout, *, event_idx: bool, name: str = "vq") -> None:
        self.mem, self.lay, self.name, self.event_idx = mem, layout, name, event_idx
        for addr, size in (
            (layout.desc, 16 * layout.num),
            (layout.avail, 6 + 2 * layout.num),
            (layout.used, 6 + 8 * layout.num),
        ):
            mem.check_window(addr, size)  # the transport refuses rings the model keeps no bytes for
        self._avail_idx_at, self._avail_ring_at = layout.avail + 2, layout.avail + 4
        self._used_idx_at, self._used_ring_at = layout.used + 2, layout.used + 4
        self._used_event_at, self._avail_event_at = layout.used_event, layout.avail_event
        self._buf, self._desc_at, self._mask = mem.buf, layout.desc, layout.num - 1  # fixed: read per request
        self.last_avail_idx = 0
        self.used_idx = 0
        self.inuse = 0
        self.signalled_used = 0
        self.signalled_used_valid = False

    def _u16(self, addr: int) -> int:
        return int(U16.unpack_from(self.mem.buf, addr)[0])

    def avail_idx(self) -> int:
        return self._u16(self.lay.avail + 2)

    def pending(self) -> int:
        """Chains the driver made available and the device has not popped; QEMU's
        ``virtqueue_num_heads`` refuses more than the queue can hold."""
        idx: int = U16.unpack_from(self.mem.buf, self.lay.avail + 2)[0]  # avail_idx()
        n = (idx - self.last_avail_idx) & 0xFFFF
        if n > self.lay.num:
            raise VirtioError(f"Guest moved used index from {self.last_avail_idx} to {idx}")
        return n

    def pop(self) -> Element | None:
        """The next available chain, its buffers resolved and checked; None if empty."""
        got = self.pop_direct()
        if isinstance(got, tuple):
            return Element(got[0], [(got[1], got[2])], [], 1)
        return got

    def pop_direct(self) -> tuple[int, int, int] | Element | None:
        """``pop``, but the common chain, one direct device-readable descriptor (a PFN
        array, the stats buffer), comes back as ``(head, addr, length)``: no Element and
        no lists per request. Every other chain is ``pop``'s Element; None if empty."""
        buf, last = self._buf, self.last_avail_idx
        idx: int = U16.unpack_from(buf, self._avail_idx_at)[0]
        if idx == last:
            return None
        mask = self._mask
        if (idx - last) & 0xFFFF > mask + 1:  # what pending() refuses
            raise VirtioError(f"Guest moved used index from {last} to {idx}")
        head = U16.unpack_from(buf, self._avail_ring_at + 2 * (last & mask))[0]
        if head > mask:
            raise VirtioError(f"Guest says index {head} is available")
        self.last_avail_idx = last = (last + 1) & 0xFFFF
        if self.event_idx:
            U16.pack_into(buf, self._avail_event_at, last)
        table, limit, i = self._desc_at, mask + 1, head
        addr, length, flags, nxt = DESC.unpack_from(buf, table + 16 * i)
        if not flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT):
            # One direct descriptor (a PFN array, the stats buffer): _collect's checks,
            # in its order, without its loop.
            if length == 0:
                raise VirtioError("virtio: zero sized buffers are not allowed")
            if addr + length > self.mem.ram_bytes:
                raise VirtioError("virtio: bogus descriptor or out of resources")
            self.inuse += 1
            if flags & VRING_DESC_F_WRITE:
                return Element(head, [], [(addr, length)], 1)
            return head, addr, length
        elem = Element(head, [], [])
        if flags & VRING_DESC_F_INDIRECT:
            if length == 0 or length % 16:
                raise VirtioError("Invalid size for indirect buffer table")
            try:
                self.mem.check_window(addr, length)
            except GuestMemoryError:
                raise VirtioError("Cannot map indirect buffer") from None
            table, limit, i = addr, length // 16, 0
            addr, length, flags, nxt = DESC.unpack_from(self.mem.buf, table)
        self._collect(elem, table, limit, i, (addr, length, flags, nxt))
        self.inuse += 1
        return elem

    def _collect(self, elem: Element, table: int, limit: int, i: int, desc: tuple[int, int, int, int]) -> None:
        indirect, ram_bytes, buf = table != self.lay.desc, self.mem.ram_bytes, self.mem.buf
        while True:
            addr, length, flags, nxt = desc
            if indirect and flags & VRING_DESC_F_INDIRECT:
                # Spec §2.7.5.3.1: the driver MUST NOT set INDIRECT inside an indirect
                # table. QEMU does not check and maps it as a plain buffer; we refuse it.
                raise VirtioError("Nested indirect descriptor")
            if length == 0:
                raise VirtioError("virtio: zero sized buffers are not allowed")
            if addr + length > ram_bytes:  # GuestMemory.check: addr and length are unsigned here
                raise VirtioError("virtio: bogus descriptor or out of resources")
            if flags & VRING_DESC_F_WRITE:
                elem.inn.append((addr, length))
            else:
                if elem.inn:
                    raise VirtioError("Incorrect order for descriptors")
                elem.out.append((addr, length))
            elem.ndescs += 1
            if elem.ndescs > limit:
                raise VirtioError("Looped descriptor")
            if not flags & VRING_DESC_F_NEXT:
                return
            if nxt >= limit:
                raise VirtioError(f"Desc next is {nxt}")
            i = nxt
            desc = DESC.unpack_from(buf, table + 16 * i)

    def read_out(self, elem: Element) -> bytes:
        """The chain's device-readable bytes, concatenated (QEMU ``iov_to_buf``)."""
        if len(elem.out) == 1:
            return self.mem.read(*elem.out[0])
        return b"".join(self.mem.read(a, n) for a, n in elem.out)

    def write_in(self, elem: Element, data: bytes) -> int:
        """Write into the chain's device-writable buffers; returns bytes written."""
        done = 0
        for a, n in elem.inn:
            part = data[done : done + n]
            if not part:
                break
            self.mem.write(a, part)
            done += len(part)
        return done

    def push(self, elem: Element, length: int = 0) -> None:
        """Return a chain: the used element first, then ``used.idx`` (QEMU fill + flush)."""
        self.push_head(elem.head, length)

    def push_head(self, head: int, length: int = 0) -> None:
        """``push`` of the chain whose head is ``head`` (what ``pop_direct`` gives)."""
        buf, used_idx = self._buf, self.used_idx
        USED_ELEM.pack_into(buf, self._used_ring_at + 8 * (used_idx & self._mask), head, length)
        self.used_idx = used_idx = (used_idx + 1) & 0xFFFF
        U16.pack_into(buf, self._used_idx_at, used_idx)
        self.inuse -= 1

    def quiet(self) -> bool:
        """Every chain the driver made available popped and every popped chain pushed,
        as far as the ring's indices in guest memory say (see ``DriverQueue.quiet``)."""
        buf = self._buf
        return bool(
            U16.unpack_from(buf, self._avail_idx_at)[0] == self.last_avail_idx
            and U16.unpack_from(buf, self._used_idx_at)[0] == self.used_idx
        )

    def signals_every_push(self) -> bool:
        """``quiet``, and each push interrupts the driver while it reaps each push before
        the next (EVENT_IDX: the last decision made at ``used_idx`` and the driver's
        ``used_event`` there; without it, interrupts not suppressed): where the stats
        buffer's exchanges may be replayed at once (``replay_served``)."""
        if not self.quiet():
            return False
        if not self.event_idx:
            return not U16.unpack_from(self._buf, self.lay.avail)[0] & VRING_AVAIL_F_NO_INTERRUPT
        return (
            self.signalled_used_valid
            and self.signalled_used == self.used_idx
            and U16.unpack_from(self._buf, self._used_event_at)[0] == self.used_idx
        )

    def replay_served(self, count: int, head: int) -> None:
        """What ``count`` one-descriptor chains at ``head`` leave in this side and its
        bytes, each popped, pushed with length 0 and signalled before the next is
        made available (``DriverQueue.replay_served``), or each pushed, made available
        again and popped (the stats buffer's exchanges, ``DriverQueue.replay_reused``):
        the same slots and indices either way."""
        buf = self._buf
        self.last_avail_idx = (self.last_avail_idx + count) & 0xFFFF
        if self.event_idx:
            U16.pack_into(buf, self._avail_event_at, self.last_avail_idx)
        _fill_ring(buf, self._used_ring_at, USED_ELEM, self.used_idx, count, self._mask, head, 0)
        self.used_idx = (self.used_idx + count) & 0xFFFF
        U16.pack_into(buf, self._used_idx_at, self.used_idx)
        if self.event_idx:  # should_notify after each push
            self.signalled_used, self.signalled_used_valid = self.used_idx, True

    def rewind(self, count: int) -> None:
        """Make the last ``count`` popped chains available again (``virtqueue_rewind``)."""
        self.last_avail_idx = (self.last_avail_idx - count) & 0xFFFF
        self.inuse -= count

    def should_notify(self) -> bool:
        """Whether to interrupt the driver now (QEMU ``virtio_split_should_notify``):
        the first decision always interrupts, then EVENT_IDX's window rule."""
        if not self.event_idx:
            return not self._u16(self.lay.avail) & VRING_AVAIL_F_NO_INTERRUPT
        valid, self.signalled_used_valid = self.signalled_used_valid, True
        old, new = self.signalled_used, self.used_idx
        self.signalled_used = new
        if not valid:
            return True
        used_event: int = U16.unpack_from(self._buf, self._used_event_at)[0]
        return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF  # vring_need_event

    def set_notification(self, enable: bool) -> None:
        """Ask for kicks or not (QEMU ``virtio_queue_set_notification``)."""
        if self.event_idx:
            if enable:
                U16.pack_into(self.mem.buf, self.lay.avail_event, self.avail_idx())
        else:
            U16.pack_into(self.mem.buf, self.lay.used, 0 if enable else VRING_USED_F_NO_NOTIFY)


_FEW_ENTRIES = 8  # up to this many, one struct write each beats building numpy index arrays


def _fill_ring(
    buf: bytearray, ring_at: int, entry: struct.Struct, first_idx: int, count: int, mask: int, *values: int
) -> None:
    """Set the ring entries (``entry``: their struct, of equal-width fields ``values``) of
    ``count`` consecutive free-running indices from ``first_idx``: every slot where
    ``count`` passes the ring's size, the last write to each being the same value."""
    if count <= _FEW_ENTRIES:
        for idx in range(first_idx, first_idx + count):
            entry.pack_into(buf, ring_at + entry.size * (idx & mask), *values)
        return
    width = entry.size // len(values)
    ring = np.frombuffer(buf, dtype=f"<u{width}", count=len(values) * (mask + 1), offset=ring_at)
    slots = slice(None) if count > mask else (first_idx + np.arange(count)) & mask
    ring.reshape(-1, len(values))[slots] = values
