"""Guest-physical memory as the device sees it: a small byte window, never GiB of bytes.

A simulated guest's RAM is ``ram_kib`` of guest-physical address space, but only the
memory the virtio protocol touches needs bytes: descriptor tables, rings, PFN arrays,
the stats buffer. Those live in a window at the bottom of guest-physical memory
(``window_bytes``, a few dozen KiB); every other page is just a PFN, a number the
balloon passes around. RAM above the window reads as zeros (as never-touched memory
does) and writes there are dropped: the balloon device never writes buffer contents,
and the pages it is told about (reported or hinted blocks) are only discarded.

An access beyond RAM behaves like QEMU's ``dma_memory_map`` failing: it is refused with
``GuestMemoryError`` and the caller turns that into ``virtio_error`` (the device breaks,
nothing escapes).

``Arena`` is the guest kernel's allocator for that window (a bump allocator: the balloon
driver allocates its rings and buffers once, at probe, as Linux does).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

PAGE_BYTES = 4096
U32s = npt.NDArray[np.uint32]


class GuestMemoryError(Exception):
    """An access outside the bytes that back guest memory."""


class GuestMemory:
    """The byte window of one guest's physical memory, plus its size in 4 KiB frames."""

    def __init__(self, window_bytes: int, ram_pages: int) -> None:
        if window_bytes <= 0 or window_bytes % PAGE_BYTES:
            raise ValueError(f"window_bytes(={window_bytes}) must be a positive multiple of {PAGE_BYTES}")
        if ram_pages * PAGE_BYTES < window_bytes:
            raise ValueError(f"ram_pages(={ram_pages}) must cover the window (={window_bytes} bytes)")
        self.buf = bytearray(window_bytes)
        self.view = memoryview(self.buf)
        # The whole window as le32 words, made once: an aligned PFN array is a slice of
        # it, a few times cheaper than a fresh ``np.frombuffer`` per request.
        self.words = np.frombuffer(self.buf, dtype="<u4")
        self.ram_pages = ram_pages
        self.ram_bytes = ram_pages * PAGE_BYTES

    def check(self, addr: int, length: int) -> None:
        """Refuse a range that is not guest RAM."""
        if addr < 0 or length < 0 or addr + length > self.ram_bytes:
            raise GuestMemoryError(f"[{addr:#x}, +{length}) is outside guest memory ({self.ram_bytes:#x} bytes of RAM)")

    def check_window(self, addr: int, length: int) -> None:
        """Refuse a range that the model keeps no bytes for (rings must live there)."""
        if addr < 0 or length < 0 or addr + length > len(self.buf):
            raise GuestMemoryError(f"[{addr:#x}, +{length}) is outside the ring window ({len(self.buf):#x} bytes)")

    def read(self, addr: int, length: int) -> bytes:
        end = addr + length
        if addr < 0 or length < 0 or end > self.ram_bytes:
            self.check(addr, length)  # raises, with the message
        if end <= len(self.buf):
            return bytes(self.view[addr:end])
        inside = bytes(self.view[addr : len(self.buf)]) if addr < len(self.buf) else b""
        return inside + bytes(length - len(inside))

    def write(self, addr: int, data: bytes) -> None:
        self.check(addr, len(data))
        n = max(0, min(len(data), len(self.buf) - addr))
        self.view[addr : addr + n] = data[:n]

    def u32_view(self, addr: int, count: int) -> U32s:
        """``count`` little-endian u32 at ``addr`` as a numpy array over the window's
        bytes, no copy: writing it is writing guest memory (the driver's PFN array)."""
        if count < 0:
            raise GuestMemoryError(f"count(={count}) must be >= 0")
        self.check_window(addr, 4 * count)
        return np.frombuffer(self.buf, dtype="<u4", count=count, offset=addr)

    def read_u32s(self, addr: int, length: int) -> U32s:
        """The whole le32 values in ``[addr, +length)`` of guest RAM, as the device reads
        a PFN array: a view of the window where the range lies in it (valid until the
        guest writes there again), zeros for RAM above it."""
        if addr < 0 or length < 0 or addr + length > self.ram_bytes:
            self.check(addr, length)  # raises, with the message
        count = length // 4
        if addr + 4 * count <= len(self.buf):
            if not addr & 3:
                word = addr >> 2
                return self.words[word : word + count]
            return np.frombuffer(self.buf, dtype="<u4", count=count, offset=addr)
        return np.frombuffer(self.read(addr, 4 * count), dtype="<u4")

    def is_ram_pfn(self, pfn: int) -> bool:
        """Whether a 4 KiB frame number lies in the guest's RAM (QEMU's memory-region check)."""
        return 0 <= pfn < self.ram_pages


class Arena:
    """Bump allocator over the window: what the guest kernel hands its driver at probe."""

    def __init__(self, mem: GuestMemory, start: int = PAGE_BYTES) -> None:
        self.mem = mem
        self.next = start  # page 0 stays unused, so address 0 is never a valid buffer

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) // align * align
        if addr + size > len(self.mem.buf):
            raise MemoryError(f"guest memory window full: {size} bytes at {addr:#x}")
        self.next = addr + size
        return addr
