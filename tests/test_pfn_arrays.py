"""The vectorized parsers of the protocol model hold to the byte layout they replaced.

PFN arrays are written by the driver and read by the device as numpy ``<u4`` views of
guest memory, the stats buffer is packed and parsed in one struct call, config fields
are read one le32 at a time: each property compares the fast path with the spec's
layout spelled out entry by entry (``struct`` per value), and checks that what lies
outside guest memory is still refused by name."""

from __future__ import annotations

import struct
import subprocess
import sys
from unittest.mock import patch

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sim.virtio.balloon_spec as spec
from sim.memory import balloon_fleet
from sim.memory.guest import GuestSpec
from sim.memory.hypervisor import SimHypervisor
from sim.virtio.backing import HostRam, RamBacking
from sim.virtio.device import VirtioBalloon
from sim.virtio.driver import LinuxBalloonDriver
from sim.virtio.guestmem import PAGE_BYTES, GuestMemory, GuestMemoryError
from sim.virtio.virtqueue import Buf
from sim.virtio.world import World
from tests.test_balloon_protocol import RAM_PAGES, FakeMm, make

WINDOW = 64 * 1024
RAM_BYTES = RAM_PAGES * PAGE_BYTES

u32 = st.integers(0, 2**32 - 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(u32, max_size=spec.VIRTIO_BALLOON_ARRAY_PFNS_MAX), st.integers(0, WINDOW // 4 - 256))
def test_u32_view_writes_little_endian_pfns_in_place(pfns: list[int], word: int) -> None:
    mem = GuestMemory(WINDOW, RAM_PAGES)
    view = mem.u32_view(4 * word, len(pfns))
    view[:] = np.array(pfns, dtype=np.uint32)
    assert mem.read(4 * word, 4 * len(pfns)) == struct.pack(f"<{len(pfns)}I", *pfns)
    assert mem.read_u32s(4 * word, 4 * len(pfns)).tolist() == pfns


@settings(max_examples=300, deadline=None)
@given(st.integers(-8, RAM_BYTES + 8), st.integers(-8, 4 * 1024))
def test_read_u32s_matches_bytewise_read_and_refuses_what_is_not_ram(addr: int, length: int) -> None:
    mem = GuestMemory(WINDOW, RAM_PAGES)
    mem.buf[:] = np.random.default_rng(addr & 0xFFFF).integers(0, 256, WINDOW, dtype=np.uint8).tobytes()
    if addr < 0 or length < 0 or addr + length > RAM_BYTES:
        with pytest.raises(GuestMemoryError, match="outside guest memory"):
            mem.read_u32s(addr, length)
        return
    count = length // 4
    expected = struct.unpack(f"<{count}I", mem.read(addr, 4 * count))  # zeros above the window
    assert mem.read_u32s(addr, length).tolist() == list(expected)


@pytest.mark.parametrize(("addr", "count"), [(-4, 1), (WINDOW - 4, 2), (WINDOW, 1), (0, -1)])
def test_u32_view_refuses_ranges_outside_the_window(addr: int, count: int) -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory(WINDOW, RAM_PAGES).u32_view(addr, count)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, RAM_PAGES + 1000), min_size=1, max_size=spec.VIRTIO_BALLOON_ARRAY_PFNS_MAX))
def test_inflate_request_reaches_the_host_as_written_less_what_is_not_ram(pfns: list[int]) -> None:
    class RecordingHost(HostRam):
        def inflate_element(self, pfns: npt.NDArray[np.uint32]) -> int:
            seen.append(pfns.tolist())
            return super().inflate_element(pfns)

    seen: list[list[int]] = []
    world, log = World(), []
    mem = GuestMemory(WINDOW, RAM_PAGES)
    dev = VirtioBalloon(world, mem, RecordingHost())
    drv = LinuxBalloonDriver(world, mem, dev, FakeMm(RAM_PAGES // 2, log, world))
    assert drv.probe()
    token = drv._post_pfns("inflateq", np.array(pfns, dtype=np.uint32))
    assert token is not None and dev.broken is None
    assert seen == [[p for p in pfns if p < RAM_PAGES]]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.booleans())
def test_a_descriptor_outside_guest_memory_is_refused_by_name(addr: int, length: int, inflate: bool) -> None:
    world, log = World(), []
    dev, drv, _ = make(world, log)
    name = "inflateq" if inflate else "deflateq"
    drv.vqs[name].add([Buf(addr, length)], 1)
    dev.notify(drv.index[name])
    if length == 0:
        assert dev.broken == "virtio: zero sized buffers are not allowed"
    elif addr + length > RAM_BYTES:
        assert dev.broken == "virtio: bogus descriptor or out of resources"
    else:
        assert dev.broken is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**16 - 1), st.integers(0, 2**64 - 1)), min_size=1, max_size=24))
def test_stats_buffer_parses_as_entry_by_entry(entries: list[tuple[int, int]]) -> None:
    """Tags past VIRTIO_BALLOON_S_NR are ignored; a repeated tag keeps its last value."""
    world, log = World(), []
    dev, drv, mm = make(world, log)
    mm.vm_stats = lambda: entries
    drv.stats_addr = drv.arena.alloc(spec.STAT.size * len(entries), 8)
    drv.stats_len = spec.STAT.size * len(entries)
    drv._write_stats()
    packed = b"".join(spec.STAT.pack(tag, val) for tag, val in entries)
    assert drv.mem.read(drv.stats_addr, drv.stats_len) == packed
    expected = [spec.STAT_NOT_SUPPLIED] * spec.VIRTIO_BALLOON_S_NR
    for tag, val in entries:
        if tag < spec.VIRTIO_BALLOON_S_NR:
            expected[tag] = val
    drv.vqs["statsq"].add([Buf(drv.stats_addr, drv.stats_len)], 2)
    dev.notify(drv.index["statsq"])
    assert dev.broken is None and dev.stats == expected


@settings(max_examples=100, deadline=None)
@given(st.integers(-4, 20), u32, st.booleans(), st.booleans())
def test_config_field_access_matches_the_packed_config(offset: int, value: int, hint: bool, poison: bool) -> None:
    world, log = World(), []
    dev, _, _ = make(world, log, free_page_hint=hint, page_poison=poison)
    assert dev.config_size == (16 if poison else 12 if hint else 8)
    dev.to_target(RAM_BYTES - 2**20)
    cfg = dev.get_config()
    if 0 <= offset and offset + 4 <= len(cfg):
        assert dev.config_readl(offset) == struct.unpack_from("<I", cfg, offset)[0]
    else:
        assert dev.config_readl(offset) == 0xFFFFFFFF  # past the config: all ones, as QEMU
    dev.config_writel(offset, value)
    written = bytearray(cfg.ljust(16, b"\0"))
    if 0 <= offset and offset + 4 <= len(cfg):
        struct.pack_into("<I", written, offset, value)
    assert dev.actual == struct.unpack_from("<I", written, spec.CONFIG_ACTUAL)[0]
    assert dev.num_pages == 256  # the host's field: a guest write never moves it


def test_driver_and_device_modules_do_not_import_each_other() -> None:
    code = (
        "import sys, sim.virtio.driver; assert 'sim.virtio.device' not in sys.modules, 'driver imports device';"
        "import sim.virtio.balloon_spec as s, sim.virtio.driver as d, sim.virtio.device as v;"
        "assert not hasattr(d, 'BALLOON_PAGE_KIB') or d.BALLOON_PAGE_KIB is s.BALLOON_PAGE_KIB"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([2, 4, 8, 512]),
    st.lists(st.integers(0, 4096), max_size=300),
    st.booleans(),
)
def test_large_page_discard_over_arrays_matches_qemus_per_pfn_walk(per_host: int, pfns: list[int], run: bool) -> None:
    """The vectorized PartiallyBalloonedPage accounting against the per-PFN walk, on
    arbitrary arrays and on Linux-like runs of descending contiguous PFNs."""
    if run and pfns:
        pfns = list(range(pfns[0] + len(pfns) - 1, pfns[0] - 1, -1))
    array = np.array(pfns, dtype=np.uint32)
    backing = RamBacking("hugetlbfs", page_bytes=4096 * per_host)
    fast, walk = HostRam(backing), HostRam(backing)
    freed = fast.inflate_element(array)
    assert freed == walk._inflate_large_loop(array, per_host) + walk.released_bytes
    assert (fast.discard_calls, fast.partial_dropped) == (walk.discard_calls, walk.partial_dropped)


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(0, spec.VIRTIO_BALLOON_ARRAY_PFNS_MAX), max_size=40),
    run_pages=st.sampled_from([1, 5, 256, 1000, 1 << 16]),
)
def test_fresh_frames_are_handed_out_top_down_as_one_arange_would(sizes: list[int], run_pages: int) -> None:
    """``FleetMm._fresh`` slices descending runs of frames: whatever the run length and
    the request sizes, the frames are those one arange from the top would give, each
    once, never one of the window's, and fewer only when the guest runs out."""
    fleet_spec = GuestSpec(uuid="00000000-0000-0000-0000-0000000000f1", name="f", ram_kib=1 << 20)
    hv = SimHypervisor([fleet_spec], host_mem_kib=1 << 22, initial_demand_kib=np.array([0.0]), model="protocol")
    balloons = hv.device
    assert isinstance(balloons, balloon_fleet.ProtocolBalloons)
    ram_pages = balloon_fleet.FIRST_FREE_PFN + 3000  # the frames it hands out: few enough to run out
    mm = balloon_fleet.FleetMm(hv.fleet, balloons, 0, ram_pages)
    got: list[int] = []
    with patch.object(balloon_fleet, "FRESH_RUN_PAGES", run_pages):
        for k in sizes:
            pfns = mm._fresh(k)
            assert pfns.dtype == np.uint32
            assert len(pfns) == min(k, ram_pages - balloon_fleet.FIRST_FREE_PFN - len(got))
            got += pfns.tolist()
    assert got == list(range(ram_pages - 1, balloon_fleet.FIRST_FREE_PFN - 1, -1))[: len(got)]
