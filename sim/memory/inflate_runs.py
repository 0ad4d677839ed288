"""A big inflate's requests done many at once, where nothing can come between them.

A 1 GiB inflate is 1,024 requests of 256 PFNs, each a Python round trip through the
driver, the split ring, QEMU's device, the backing, the World clock and the Fleet (issue
13: ~43 us a request). When the driver has several requests to make, the ring is quiet
and nothing is due on the World before they end (``World.jump_limits``: the same rule as
``World.may_jump_to``, request by request), every request goes the same way: fresh frames,
one descriptor, kicked, served at once, reaped, ``actual`` written. The only figures that
differ are the clock, the Fleet's accounting and QEMU's BALLOON_CHANGE rate limit, which
one compiled loop works out (``sim.memory.protocol_kernel.inflate_run``); the rings, lists
and counters are then set to what the requests would have left, in one step each.

The per-request path stays the reference and the path without numba;
``tests/test_inflate_runs.py`` holds the two to the same bytes, arrays, clock and logs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from sim.memory import protocol_kernel
from sim.virtio import calibration as cal
from sim.virtio.balloon_spec import BALLOON_PAGE_BYTES, VIRTIO_BALLOON_ARRAY_PFNS_MAX

if TYPE_CHECKING:
    from sim.memory.balloon_fleet import GuestBalloon


def _quiet(guest: GuestBalloon) -> bool:
    """Whether every request of a run would go the common way: a working device whose
    ``actual`` is the driver's size, 4 KiB backing, no release left unaccounted, nobody
    waiting for an ack, and an inflate queue with nothing outstanding."""
    driver, device = guest.driver, guest.device
    return (
        device.broken is None
        and device.actual == driver.num_pages
        and guest.host.backing.page_bytes == BALLOON_PAGE_BYTES
        and not guest.mm.release_unseen()
        and not driver.acked.has_waiters
        and driver.vqs["inflateq"].quiet()
        and device.queues["inflateq"].quiet()
    )


def fill_run(guest: GuestBalloon, diff: int) -> int:
    """The work item's runs before this one, as many as run whole before anything
    else is due, each a request of 256 pages, with ``diff`` pages to go: the pages they
    took (0: none could). The last request of the change stays the caller's."""
    pages = VIRTIO_BALLOON_ARRAY_PFNS_MAX
    driver, device, host, mm = guest.driver, guest.device, guest.host, guest.mm
    world = driver.world
    limits = world.jump_limits()
    max_requests = min((diff - 1) // pages, mm.fresh_pages_left() // pages)
    if limits is None or max_requests < 1 or not _quiet(guest):
        return 0
    released = 0 if host.inhibited or not host.backing.frees() else pages * BALLOON_PAGE_BYTES
    clock = protocol_kernel.RunClock(
        world.now_s,
        *limits,
        pages * cal.GUEST_ALLOC_S_PER_PAGE,  # fill_balloon's, with no failed allocation
        cal.NOTIFY_TO_DEVICE_S + pages * cal.HOST_DISCARD_S_PER_PAGE,  # _handle_output's delay
        driver.cpu_s,
    )
    managed = not driver.deflate_on_oom_negotiated
    balloons = mm.balloons
    run, at_s, emitted = protocol_kernel.inflate_run(
        mm.fleet,
        (balloons.balloon_kib, balloons.held_kib, balloons.managed_removed_kib),
        mm.row,
        mm.i,
        pages,
        managed,
        min(released / (pages * BALLOON_PAGE_BYTES), 1.0),  # balloon_taken's release_frac
        max_requests,
        mm.fill_spare_kib(),
        clock,
        device.balloon_change_window(),
    )
    n = run.requests
    if not n:
        return 0
    host.inflate_elements(n, pages)
    arrays = mm.taken_at_once(n, pages, run.spare_kib, n * (2 if managed else 1))
    first = driver.num_pages + pages
    head = driver.filled_at_once(arrays, run.cpu_s)
    device.queues["inflateq"].replay_served(n, head)
    device.actuals_written(
        at_s[:n].tolist(),
        list(range(first, first + n * pages, pages)),
        emitted[: run.emitted].tolist(),
        run.window_end_s,
        run.pending,
        None if math.isnan(run.flush_at_s) else run.flush_at_s,
    )
    world.now_s = run.now_s
    return n * pages
