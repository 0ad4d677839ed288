"""The byte-level virtio-balloon: QEMU's device and Linux's driver over real rings."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sim.virtio.balloon_spec as spec
from sim.memory.balloon_fleet import ProtocolBalloons
from sim.memory.guest import GuestSpec
from sim.memory.hypervisor import SimHypervisor
from sim.virtio.backing import HostRam, RamBacking
from sim.virtio.device import VirtioBalloon
from sim.virtio.driver import LinuxBalloonDriver
from sim.virtio.guestmem import GuestMemory
from sim.virtio.world import World

RAM_PAGES = 512 * 256  # a 512 MiB guest


class FakeMm:
    """A guest memory manager with a plain count of free pages and a log."""

    def __init__(self, free_pages: int, log: list[tuple[float, str]], world: World) -> None:
        self.free, self.log, self.world = free_pages, log, world
        self.managed_pages = RAM_PAGES - 10_000
        self.next_pfn = RAM_PAGES
        self.held = 0

    def alloc_pages(self, n: int) -> np.ndarray:
        k = min(n, self.free)
        self.free -= k
        self.next_pfn -= k
        return np.arange(self.next_pfn + k - 1, self.next_pfn - 1, -1, dtype=np.uint32)

    def free_pages(self, pfns: np.ndarray) -> None:
        self.free += len(pfns)
        self.log.append((self.world.now_s, f"free {len(pfns)}"))

    def balloon_taken(self, pages: int) -> None:
        self.log.append((self.world.now_s, f"taken {pages}"))

    def adjust_managed_page_count(self, pages: int) -> None:
        self.managed_pages += pages

    def vm_stats(self) -> list[tuple[int, int]]:
        return [
            (spec.VIRTIO_BALLOON_S_MEMFREE, self.free * 4096),
            (spec.VIRTIO_BALLOON_S_MEMTOT, self.managed_pages * 4096),
        ]

    def alloc_block(self, order: int) -> int | None:
        if self.free < 1 << order:
            return None
        self.free -= 1 << order
        self.held += 1
        return self.held << order  # distinct blocks inside RAM

    def free_block(self, pfn: int, order: int) -> None:
        self.free += 1 << order
        self.held -= 1

    def reportable_blocks(self, order: int) -> int:
        return 0

    def isolate_reportable(self, n: int, order: int) -> list[int]:
        return []

    def mark_reported(self, pfns: list[int], order: int, discarded: bool) -> None:
        pass


def make(
    world: World,
    log: list[tuple[float, str]],
    *,
    free_pages: int = RAM_PAGES // 2,
    backing: RamBacking | None = None,
    **props: bool,
) -> tuple[VirtioBalloon, LinuxBalloonDriver, FakeMm]:
    mem = GuestMemory(64 * 1024, RAM_PAGES)
    dev = VirtioBalloon(world, mem, HostRam(backing or RamBacking()), **props)
    mm = FakeMm(free_pages, log, world)
    drv = LinuxBalloonDriver(world, mem, dev, mm)
    assert drv.probe()
    return dev, drv, mm


def actual_reached(world: World, dev: VirtioBalloon, pages: int, limit_s: float = 5.0) -> float:
    """Run until the config's ``actual`` equals ``pages``; return that time."""
    while dev.actual != pages:
        assert world.peek() < limit_s, f"actual stuck at {dev.actual}"
        world.step()
    return world.now_s


# -- config space, features, queues --------------------------------------------------


def test_config_space_layout_is_four_le32_at_0_4_8_12(world: World, log: list) -> None:
    dev, _drv, _ = make(world, log, free_page_hint=True)
    dev.to_target(RAM_PAGES * 4096 - 128 * 2**20)
    assert dev.num_pages == 32768
    cfg = dev.get_config()
    assert len(cfg) == 16  # page-poison is on by default: the 16-byte config
    assert cfg[0:4] == struct.pack("<I", 32768) and cfg[4:8] == b"\0\0\0\0"
    dev.free_page_start()
    assert dev.get_config()[8:12] == struct.pack("<I", 0x80000000)
    dev.free_page_stop()
    assert dev.get_config()[8:12] == struct.pack("<I", spec.VIRTIO_BALLOON_CMD_ID_STOP)
    dev.free_page_done()
    assert dev.get_config()[8:12] == struct.pack("<I", spec.VIRTIO_BALLOON_CMD_ID_DONE)


@pytest.mark.parametrize(
    ("props", "size"), [({"page_poison": False}, 8), ({"page_poison": False, "free_page_hint": True}, 12), ({}, 16)]
)
def test_config_size_follows_qemu(world: World, props: dict[str, bool], size: int) -> None:
    dev = VirtioBalloon(world, GuestMemory(64 * 1024, RAM_PAGES), HostRam(), **props)
    assert len(dev.get_config()) == size


def test_target_rounds_down_to_whole_pages_and_caps_at_ram(world: World, log: list) -> None:
    dev, _, _ = make(world, log)
    dev.to_target(RAM_PAGES * 4096 - 4096 - 100)
    assert dev.num_pages == 1  # (ram - target) >> 12 truncates
    dev.to_target(RAM_PAGES * 4096 * 2)
    assert dev.num_pages == 0


def test_queue_indices_count_only_present_queues(world: World, log: list) -> None:
    dev, drv, _ = make(world, log, free_page_reporting=True)
    assert dev.index == ["inflateq", "deflateq", "statsq", "reporting_vq"]
    assert drv.index["reporting_vq"] == 3  # not 4: free_page_vq is absent
    dev2, _, _ = make(World(), log, free_page_reporting=True, free_page_hint=True)
    assert dev2.index.index("reporting_vq") == 4


def test_linux_validate_drops_page_poison_and_never_asks_unoffered_bits(world: World, log: list) -> None:
    dev, drv, _ = make(world, log, deflate_on_oom=True)
    assert not drv.has(spec.VIRTIO_BALLOON_F_PAGE_POISON)  # no init_on_free, no page_poisoning
    assert drv.has(spec.VIRTIO_BALLOON_F_DEFLATE_ON_OOM) and drv.has(spec.VIRTIO_RING_F_EVENT_IDX)
    assert not drv.has(spec.VIRTIO_BALLOON_F_MUST_TELL_HOST)  # QEMU never offers it
    assert dev.status & spec.VIRTIO_CONFIG_S_DRIVER_OK
    assert not dev.set_features(1 << spec.VIRTIO_BALLOON_F_MUST_TELL_HOST)
    mem = GuestMemory(64 * 1024, RAM_PAGES)
    dev3 = VirtioBalloon(world, mem, HostRam(), page_poison=False, free_page_reporting=True)
    drv3 = LinuxBalloonDriver(world, mem, dev3, FakeMm(100, log, world), init_on_free=True)
    drv3.probe()
    assert not drv3.has(spec.VIRTIO_BALLOON_F_REPORTING)  # wants poison, device lacks it


# -- inflate, deflate, timing ------------------------------------------------------------


@pytest.mark.parametrize(("event_idx", "indirect_desc"), [(True, True), (False, False)])
def test_inflate_goes_in_256_pfn_requests_each_followed_by_actual(
    world: World, log: list, event_idx: bool, indirect_desc: bool
) -> None:
    dev, drv, _ = make(world, log, event_idx=event_idx, indirect_desc=indirect_desc)
    assert drv.has(spec.VIRTIO_RING_F_EVENT_IDX) is event_idx
    dev.to_target(RAM_PAGES * 4096 - 3 * 2**20 - 40 * 4096)  # 808 pages
    actual_reached(world, dev, 808)
    assert [a for _, a in dev.actual_log] == [256, 512, 768, 808]
    assert [m for _, m in log] == ["taken 256", "taken 256", "taken 256", "taken 40"]


def test_inflate_of_128_mib_is_reflected_in_actual_within_real_guest_time(world: World, log: list) -> None:
    """real-guest.md: balloon -128 MiB -> actual equals the target in 0.11-0.19 s;
    +128 MiB (deflate) in 0.05-0.17 s. The model must land inside those ranges."""
    dev, _, _ = make(world, log)
    world.run(1.0)
    dev.to_target(RAM_PAGES * 4096 - 128 * 2**20)
    assert 0.11 <= actual_reached(world, dev, 32768) - 1.0 <= 0.19
    world.run(2.0)
    dev.to_target(RAM_PAGES * 4096)
    world.run(2.0)
    dev.num_pages = 0
    dev._notify_config()
    assert 0.05 <= actual_reached(world, dev, 0) - 2.0 <= 0.17


def test_balloon_change_events_are_rate_limited_to_one_per_second(world: World, log: list) -> None:
    """real-guest.md: the final BALLOON_CHANGE comes 0.83-1.02 s after the request, the
    first one carrying an intermediate value."""
    dev, _, _ = make(world, log)
    world.run(1.0)
    dev.to_target(RAM_PAGES * 4096 - 128 * 2**20)
    world.run(5.0)
    (_t0, first), (t1, last) = dev.balloon_change_events
    assert first == RAM_PAGES * 4096 - 256 * 4096  # after the first 256-PFN request
    assert last == RAM_PAGES * 4096 - 128 * 2**20
    assert 0.83 <= t1 - 1.0 <= 1.02


def test_deflate_tells_the_host_before_releasing_pages(world: World, log: list) -> None:
    dev, _drv, mm = make(world, log)
    dev.to_target(RAM_PAGES * 4096 - 256 * 4096)
    actual_reached(world, dev, 256)
    willneed_at_release: list[int] = []
    original = mm.free_pages
    mm.free_pages = lambda pfns: (willneed_at_release.append(dev.host.willneed_calls), original(pfns))[1]  # type: ignore[method-assign]
    dev.num_pages = 0
    dev._notify_config()
    actual_reached(world, dev, 0)
    world.run(world.now_s + 0.1)
    assert willneed_at_release == [256]  # the host had handled all 256 PFNs before any was reused


def test_out_of_puff_retries_every_200_ms_and_sends_partial_batches(world: World, log: list) -> None:
    dev, drv, _mm = make(world, log, free_pages=300)
    dev.to_target(RAM_PAGES * 4096 - 1000 * 4096)
    world.run(2.0)
    assert dev.actual == 300  # 256, then a partial batch of 44, then nothing more
    assert 8 <= drv.puff_count <= 10  # one retry per ~200 ms for ~1.9 s
    puffs = [t for t, m in drv.log if m.startswith("Out of puff")]
    assert all(0.2 <= b - a < 0.21 for a, b in itertools.pairwise(puffs))
    assert drv.puff_sleep_s == pytest.approx(0.2 * drv.puff_count)
    from sim.virtio.calibration import FAILED_ALLOC_S, GUEST_ALLOC_S_PER_PAGE

    assert drv.cpu_s == pytest.approx(
        300 * GUEST_ALLOC_S_PER_PAGE + drv.puff_count * FAILED_ALLOC_S
    )  # retries cost CPU


# -- deflate on OOM and accounting ------------------------------------------------------


@pytest.mark.parametrize("doo", [True, False])
def test_memtotal_shrinks_with_the_balloon_only_without_deflate_on_oom(world: World, log: list, doo: bool) -> None:
    dev, _drv, mm = make(world, log, deflate_on_oom=doo)
    before = mm.managed_pages
    dev.to_target(RAM_PAGES * 4096 - 64 * 2**20)
    actual_reached(world, dev, 16384)
    assert mm.managed_pages == (before if doo else before - 16384)


def test_oom_notifier_gives_back_256_pages_and_does_not_reinflate(world: World, log: list) -> None:
    dev, drv, _mm = make(world, log, deflate_on_oom=True)
    dev.to_target(RAM_PAGES * 4096 - 64 * 2**20)
    actual_reached(world, dev, 16384)
    assert [drv.oom_notify() for _ in range(3)] == [256, 256, 256]
    assert dev.actual == 16384 - 768  # written by the notifier itself
    world.run(world.now_s + 5.0)
    assert dev.actual == 16384 - 768  # no re-inflation until the next config interrupt
    dev.to_target(RAM_PAGES * 4096 - 64 * 2**20)  # the host re-sends the same target
    actual_reached(world, dev, 16384, limit_s=world.now_s + 1)


def moves_of(log: list[tuple[float, str]]) -> list[str]:
    """The balloon's moves the guest's mm saw: pages counted in (taken), given back (free)."""
    return [what for _, what in log if what.startswith(("taken ", "free "))]


def test_oom_notifier_waits_for_an_inflate_in_flight(log: list) -> None:
    """Linux's notifier takes vb->balloon_lock, which fill_balloon holds until the host
    acked its request: the pages of an inflate in flight count as the balloon's before
    the notifier gives any back, and count once (the fill's ack, later, adds nothing)."""
    world = World(jumps=False)  # every push queued: the request can be caught awaiting its ack
    dev, drv, _mm = make(world, log, deflate_on_oom=True)
    dev.to_target(RAM_PAGES * 4096 - 2 * 2**20)  # 512 pages: two requests
    while not drv.acked.has_waiters:  # the fill sleeps in tell_host, its pages enqueued
        world.step()
    assert moves_of(log) == [] and drv.num_pages == 256
    assert drv.oom_notify() == 256
    assert moves_of(log) == ["taken 256", "free 256"] and drv.num_pages == 0 and dev.actual == 0
    # The size work was short of its target: it goes on (as Linux) and counts each request once.
    actual_reached(world, dev, 512, limit_s=world.now_s + 1)
    net = sum((1 if what.startswith("taken") else -1) * int(what.split()[1]) for what in moves_of(log))
    assert net == drv.num_pages == 512


def test_oom_notifier_does_nothing_without_the_feature(world: World, log: list) -> None:
    dev, drv, _mm = make(world, log)
    dev.to_target(RAM_PAGES * 4096 - 2**20)
    actual_reached(world, dev, 256)
    assert drv.oom_notify() == 0 and dev.actual == 256


# -- the stats queue ------------------------------------------------------------------------


def test_stats_protocol_sequence(world: World, log: list) -> None:
    """Probe posts a sample (held by the device); polling on fires at once; each answer
    re-arms the timer at arrival + interval, so arrivals drift by the guest's latency."""
    dev, _drv, mm = make(world, log)
    assert dev.stats_updates == 1 and dev.stats_last_update_s == 0.0 and dev.stats_vq_head is not None
    arrivals: list[float] = []
    stamps: list[float] = []
    dev.set_stats_poll_interval(2)
    while world.peek() < 7.0:
        world.step()
        if dev.stats_updates > len(arrivals) + 1:
            arrivals.append(world.now_s)
            stamps.append(dev.stats_last_update_s)
    assert arrivals == pytest.approx([0.001, 2.002, 4.003, 6.004])
    assert stamps == [0.0, 2.0, 4.0, 6.0]  # "last-update" is whole host seconds
    assert dev.stats_vq_head is not None  # the device holds the buffer between polls
    assert dev.stats[spec.VIRTIO_BALLOON_S_MEMFREE] == mm.free * 4096
    assert dev.stats[spec.VIRTIO_BALLOON_S_SWAP_IN] == spec.STAT_NOT_SUPPLIED  # never sent: u64 max


def test_a_guest_that_stops_answering_stops_the_polling(world: World, log: list) -> None:
    dev, drv, _ = make(world, log)
    dev.set_stats_poll_interval(2)
    world.run(3.0)
    drv.stopping = True  # the driver is being removed: stats_request queues nothing
    n = dev.stats_updates
    world.run(20.0)
    assert dev.stats_updates == n and world.peek() == float("inf")


def test_paused_vm_freezes_the_stats_timer_and_defers_the_target(world: World, log: list) -> None:
    """QEMU's stats timer runs on the virtual clock: no fresh stats while paused, and
    the timer resumes with what it had left; a target set while paused waits too."""
    dev, _drv, _ = make(world, log)
    dev.set_stats_poll_interval(2)
    world.run(3.0)  # arrivals at 0.001 and 2.002; the timer is due at 4.002
    n = dev.stats_updates
    dev.vm_stop()
    dev.to_target(RAM_PAGES * 4096 - 2**20)
    world.run(13.0)
    assert dev.stats_updates == n and dev.actual == 0
    dev.vm_start()  # 1.002 s were left on the timer
    world.run(13.9)
    assert dev.actual == 256 and dev.stats_updates == n
    world.run(14.1)
    assert dev.stats_updates == n + 1 and dev.stats_last_update_s == 14.0


def test_stats_reflect_an_inflate_within_one_polling_period(world: World, log: list) -> None:
    """real-guest.md: the guest's own stats reflect an inflate within one period."""
    dev, _drv, _mm = make(world, log)
    dev.set_stats_poll_interval(2)
    world.run(5.0)
    free_before = dev.stats[spec.VIRTIO_BALLOON_S_MEMFREE]
    dev.to_target(RAM_PAGES * 4096 - 128 * 2**20)
    while dev.stats[spec.VIRTIO_BALLOON_S_MEMFREE] > free_before - 128 * 2**20:
        world.step()
    assert world.now_s - 5.0 <= 2.0 + 0.01


# -- host discard rules --------------------------------------------------------------------


def test_partially_ballooned_huge_page_is_freed_only_when_one_request_covers_it() -> None:
    host = HostRam(RamBacking("hugetlbfs", page_bytes=2 << 20))
    whole = np.arange(512, 1024, dtype=np.uint32)
    assert host.inflate_element(whole) == 2 << 20
    assert host.inflate_element(whole[:256]) == 0 and host.inflate_element(whole[256:]) == 0
    assert host.partial_dropped == 2  # each request's tracker died with it
    mixed = np.array([1024, 1536, 1025], dtype=np.uint32)  # another host page resets the bitmap
    assert host.inflate_element(mixed) == 0 and host.partial_dropped == 5  # 2, 3, then 2 again at the end


@pytest.mark.parametrize(
    ("backing", "freed"),
    [
        (RamBacking("private-anon"), True),
        (RamBacking("shared-anon"), True),
        (RamBacking("shared-anon", discard="madvise"), False),
        (RamBacking("file", discard="madvise"), False),
        (RamBacking("file"), True),
    ],
)
def test_discard_by_backing(backing: RamBacking, freed: bool) -> None:
    host = HostRam(backing)
    assert (host.inflate_element(np.arange(256, dtype=np.uint32)) > 0) is freed


def test_inhibited_discards_acknowledge_but_free_nothing(world: World, log: list) -> None:
    dev, _drv, _ = make(world, log)
    dev.host.inhibited = True  # e.g. VFIO or incoming postcopy
    dev.to_target(RAM_PAGES * 4096 - 2**20)
    actual_reached(world, dev, 256)
    assert dev.host.released_bytes == 0


# -- free page hinting ------------------------------------------------------------------------


def test_free_page_hinting_round_holds_blocks_until_done(world: World, log: list) -> None:
    dev, drv, mm = make(world, log, free_page_hint=True, free_pages=40 * 1024)
    dev.free_page_start()
    world.run(1.0)
    assert drv.cmd_id_active == 0x80000000 and mm.held == 40  # 40 x 1024 pages = 40 blocks of 4 MiB
    assert dev.hinted_bytes == 40 * (4 << 20)
    dev.free_page_stop()
    world.run(2.0)
    assert mm.held == 40  # STOP keeps them
    dev.free_page_done()
    world.run(3.0)
    assert mm.held == 0 and mm.free == 40 * 1024


# -- errors: the device breaks, nothing escapes -----------------------------------------------


def test_descriptor_outside_guest_memory_breaks_the_device_not_the_world(world: World, log: list) -> None:
    dev, drv, _ = make(world, log)
    vq = drv.vqs["inflateq"]
    struct.pack_into("<QIHH", drv.mem.buf, vq.lay.desc, 1 << 40, 1024, 0, 0)
    struct.pack_into("<HH", drv.mem.buf, vq.lay.avail + 2, 1, 0)
    dev.notify(0)
    assert dev.broken == "virtio: bogus descriptor or out of resources"
    assert dev.status & spec.VIRTIO_CONFIG_S_NEEDS_RESET
    dev.to_target(RAM_PAGES * 4096 - 2**20)
    world.run(5.0)  # the guest keeps running; the balloon just stops responding
    assert dev.actual == 0


def test_write_only_buffer_on_inflateq_is_a_named_error(world: World, log: list) -> None:
    dev, drv, _ = make(world, log)
    drv.vqs["inflateq"].add(
        [__import__("sim.virtio.virtqueue", fromlist=["Buf"]).Buf(drv.pfns_addr, 16, write=True)], 99
    )
    dev.notify(0)
    assert dev.broken is not None and "device-writable buffer" in dev.broken


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["inflateq", "deflateq", "statsq", "free_page_vq", "reporting_vq"]),
    st.binary(min_size=64, max_size=600),
    st.integers(0, 3000),
)
def test_device_survives_arbitrary_ring_contents(name: str, blob: bytes, offset: int) -> None:
    world, log = World(), []
    dev, drv, _ = make(world, log, free_page_hint=True, free_page_reporting=True)
    lay = drv.vqs[name].lay
    start = lay.desc + offset % (lay.used + 8 * lay.num - lay.desc)
    drv.mem.buf[start : start + len(blob)] = blob[: len(drv.mem.buf) - start]
    for index in range(len(dev.index)):
        dev.notify(index)
    dev.set_stats_poll_interval(1)
    dev.to_target(RAM_PAGES * 4096 - 2**20)
    world.run(3.0)  # nothing raised: the device either worked or names what broke it
    assert dev.broken is None or isinstance(dev.broken, str)


# -- invariants over random targets and workloads, through the Fleet ------------------------


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.tuples(st.integers(64, 1024), st.integers(0, 900)), min_size=1, max_size=6),
    st.booleans(),
)
def test_balloon_invariants_under_random_targets_and_demand(steps: list[tuple[int, int]], doo: bool) -> None:
    from sim.evaluation.scenarios import OneHost, _guest
    from sim.memory.balloon_fleet import WINDOW_BYTES

    demand = {"mib": 100.0}
    host = OneHost([_guest("inv", 1024, deflate_on_oom=doo, swap_kib=0)], lambda t: [demand["mib"]], step_s=0.5)
    g = host.balloons.guests[0]
    f = host.hv.fleet
    for target_mib, demand_mib in steps:
        host.set_target_mib(0, target_mib)
        demand["mib"] = float(demand_mib)
        host.run(host.hv.now_s + 2.0, lambda t: None, {})
        pfns = np.concatenate(g.driver.balloon) if g.driver.balloon else np.empty(0, dtype=np.uint32)
        assert len(pfns) == g.driver.num_pages and len(np.unique(pfns)) == len(pfns)
        assert (pfns >= WINDOW_BYTES // 4096).all() and (pfns < g.mem.ram_pages).all()  # never the ring memory
        in_flight_kib = abs(host.balloons.balloon_kib[0] - 4 * g.driver.num_pages)
        assert in_flight_kib <= 4 * spec.VIRTIO_BALLOON_ARRAY_PFNS_MAX  # at most one request in flight
        expected_removed = 0.0 if doo else host.balloons.balloon_kib[0]
        assert abs(host.balloons.managed_removed_kib[0] - expected_removed) <= 4 * spec.VIRTIO_BALLOON_ARRAY_PFNS_MAX
        assert -1e-6 <= f.touched[0] <= f.ram[0] + 1e-6
        assert 0 <= g.device.actual <= g.mem.ram_pages and g.device.broken is None


GIB_KIB = 1 << 20


def oom_host(*, compiled: bool) -> SimHypervisor:
    """A 2 GiB DEFLATE_ON_OOM guest asked to inflate 1 GiB, through the protocol model."""
    guest = GuestSpec("0", "g0", 2 * GIB_KIB, deflate_on_oom=True)
    hv = SimHypervisor([guest], host_mem_kib=64 * GIB_KIB, initial_demand_kib=np.full(1, 64.0 * 1024), model="protocol")
    hv.fleet.compiled = compiled and hv.fleet.compiled
    hv.set_target("0", GIB_KIB)
    return hv


def assert_balloon_whole(hv: SimHypervisor) -> None:
    """The Fleet's balloon is the driver's, less the request whose ack it awaits; never
    below zero (inflating only: no deflate request is in flight)."""
    balloons = hv.device
    assert isinstance(balloons, ProtocolBalloons)
    driver = balloons.guests[0].driver
    assert balloons.balloon_kib[0] >= 0
    assert balloons.balloon_kib[0] == spec.BALLOON_PAGE_KIB * (driver.num_pages - driver.fill_unacked_pages)


@pytest.mark.parametrize("compiled", [False, True])
def test_oom_during_an_inflate_in_flight_keeps_the_fleets_balloon_the_drivers(compiled: bool) -> None:
    """An OOM while an inflate request awaits the host's ack: the notifier counts that
    request first (it waits on balloon_lock, as Linux), then gives 256 pages back. The
    Fleet's balloon is then the driver's ``num_pages`` x 4 KiB, never below zero (it
    was -1024 KiB when the notifier took the unacknowledged pages)."""
    hv = oom_host(compiled=compiled)
    hv.world.jumps = False  # every push queued: the request can be caught awaiting its ack
    balloons = hv.device
    assert isinstance(balloons, ProtocolBalloons)
    driver = balloons.guests[0].driver
    while not driver.acked.has_waiters:
        hv.world.step()
    assert balloons.balloon_kib[0] < spec.BALLOON_PAGE_KIB * driver.num_pages  # in flight
    hv.fleet.advance(10.0, np.array([8.0 * GIB_KIB]), np.zeros(1))
    assert hv.fleet.oom_deflates[0] > 0 and driver.oom_deflates > 0
    assert balloons.balloon_kib[0] >= 0
    assert balloons.balloon_kib[0] == spec.BALLOON_PAGE_KIB * driver.num_pages
    hv.world.run(until_s=hv.world.now_s + 2.0)  # the fill's ack comes, and the work goes on
    assert_balloon_whole(hv)


@settings(max_examples=25, deadline=None)
@given(
    oom_s=st.floats(0.0005, 0.3),
    demand_gib=st.sampled_from([0.5, 1.6, 8.0]),
    compiled=st.booleans(),
)
def test_oom_at_any_moment_of_an_inflate_keeps_the_balloon_whole(
    oom_s: float, demand_gib: float, compiled: bool
) -> None:
    """Whenever the demand comes while the balloon inflates (a request being allocated,
    awaiting its ack, or between two), through the host's own stepping: the Fleet's
    balloon never goes below zero and, after any OOM deflate, is what the driver holds."""
    hv = oom_host(compiled=compiled)
    balloons = hv.device
    assert isinstance(balloons, ProtocolBalloons)
    driver = balloons.guests[0].driver
    for now_s in (oom_s, oom_s + 0.5, oom_s + 3.0):
        deflates = driver.oom_deflates
        hv.advance(now_s, np.array([demand_gib * GIB_KIB]), np.zeros(1))
        assert_balloon_whole(hv)
        if driver.oom_deflates > deflates:
            assert balloons.balloon_kib[0] == spec.BALLOON_PAGE_KIB * driver.num_pages
        if demand_gib > 2:  # more than the guest's RAM: the notifier took every page, any in flight too
            assert driver.num_pages == 0


@pytest.mark.parametrize("over_mib", [1, 10, 300])
def test_the_oom_notifiers_pages_are_freed_once(over_mib: int) -> None:
    """Pages the protocol model's OOM notifier gives back reach the Fleet through the
    guest's mm (``FleetMm.free_pages``), which puts them on the free list and the per-CPU
    lists; the Fleet's pressure relief must not free them a second time (it did: the
    deflated layer and the per-CPU lists grew by twice what the balloon gave)."""
    hv = oom_host(compiled=False)
    hv.world.run(until_s=30.0)  # the 1 GiB inflate done
    f, balloons = hv.fleet, hv.device
    assert isinstance(balloons, ProtocolBalloons) and balloons.balloon_kib[0] == GIB_KIB
    f.cache[0], f.swap[0] = f.cache_min[0], f.swap_size[0]  # nothing left to reclaim or swap
    f.anon[0] += f._capacity()[0] - (f.anon + f.cache + f.oom_floor)[0] + over_mib * 1024  # over the floor
    deflated, pcp, balloon = f.deflated_free[0], f.pcp[0], balloons.balloon_kib[0]
    f._relieve_pressure()
    given = balloon - balloons.balloon_kib[0]
    assert given >= over_mib * 1024  # the notifier covered the shortfall, in whole steps
    assert f.deflated_free[0] - deflated == pytest.approx(given)  # nothing still backed came back
    assert f.pcp[0] - pcp == pytest.approx(min(given, f.pcp_cap[0] - pcp))


def test_an_oom_notifier_run_from_the_hosts_event_leaves_that_events_clock_alone() -> None:
    """The replay's tick is an event of the World; the Fleet's advance inside it may run
    a guest's OOM notifier, whose deflate request the device answers after the host's
    work on it. That answer comes on the guest's own clock: the tick's instant stays the
    tick's (it moved by the host's time on the request, and every later tick with it)."""
    hv = oom_host(compiled=False)
    hv.world.run(until_s=30.0)  # the 1 GiB inflate done
    balloons = hv.device
    assert isinstance(balloons, ProtocolBalloons)
    driver, device = balloons.guests[0].driver, balloons.guests[0].device
    seen: list[float] = []

    def tick() -> None:
        hv.fleet.advance(10.0, np.array([8.0 * GIB_KIB]), np.zeros(1))
        seen.append(hv.world.now_s)

    hv.world.schedule_at(40.0, tick)
    hv.world.run(until_s=50.0)
    assert driver.oom_deflates > 0 and seen == [40.0]
    assert device.queues["deflateq"].quiet()  # the request was answered, after the tick
