"""A big inflate's or deflate's requests done many at once, where nothing can come
between them.

A 1 GiB inflate is 1,024 requests of 256 PFNs, each a Python round trip through the
driver, the split ring, QEMU's device, the backing, the World clock and the Fleet (issue
13: ~43 us a request); a deflate the same, the other way. When the driver has several
requests to make, the ring is quiet and nothing is due on the World before they end
(``World.jump_limits``: the same rule as ``World.may_jump_to``, request by request),
every request goes the same way: one descriptor, kicked, served at once, reaped,
``actual`` written; an inflate takes free frames, a deflate gives back the balloon
list's last 256 pages. The only figures that differ are the clock, the Fleet's
accounting and QEMU's BALLOON_CHANGE rate limit, which one compiled loop works out
(``sim.memory.protocol_kernel.requests_run``); the rings, lists and counters are then
set to what the requests would have left, in one step each.

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
    import numpy as np
    import numpy.typing as npt

    from sim.memory.balloon_fleet import GuestBalloon

_PAGES = VIRTIO_BALLOON_ARRAY_PFNS_MAX  # every request of a run is a whole one


def _quiet(guest: GuestBalloon, queue: str) -> bool:
    """Whether every request of a run on ``queue`` would go the common way: a working
    device whose ``actual`` is the driver's size, nobody waiting for an ack, and the
    queue with nothing outstanding on either side."""
    driver, device = guest.driver, guest.device
    return (
        device.broken is None
        and device.actual == driver.num_pages
        and not driver.acked.has_waiters
        and driver.vqs[queue].quiet()
        and device.queues[queue].quiet()
    )


def _run(
    guest: GuestBalloon,
    delta_pages: int,
    max_requests: int,
    release_frac: float,
    spare_kib: float,
    clock: tuple[float, float],
) -> tuple[protocol_kernel.RequestsRun, npt.NDArray[np.float64]] | None:
    """The compiled run of up to ``max_requests`` requests of ``delta_pages`` (``clock``:
    the driver's sleep and the device's delay per request), ``actual`` and BALLOON_CHANGE
    applied to the device; None where no request could run whole."""
    driver, device, mm = guest.driver, guest.device, guest.mm
    world = driver.world
    limits = world.jump_limits()
    # Where even one request cannot end before the next event (other guests' requests
    # interleave with this one's when their targets change at once), the compiled call
    # would find so at ~20 us; this check is a filter only: a run refused here is the
    # per-request path's, whatever the rounding of the sum.
    if limits is None or max_requests < 1 or not world.may_jump_to(world.now_s + sum(clock)):
        return None
    balloons = mm.balloons
    run, at_s, emitted = protocol_kernel.requests_run(
        mm.fleet,
        (balloons.balloon_kib, balloons.held_kib, balloons.managed_removed_kib),
        mm.row,
        mm.i,
        delta_pages,
        not driver.deflate_on_oom_negotiated,
        release_frac,
        max_requests,
        spare_kib,
        protocol_kernel.RunClock(world.now_s, *limits, *clock, driver.cpu_s),
        device.balloon_change_window(),
    )
    n = run.requests
    if not n:
        return None
    first = driver.num_pages + delta_pages
    device.actuals_written(
        at_s[:n].tolist(),
        list(range(first, first + n * delta_pages, delta_pages)),
        emitted[: run.emitted].tolist(),
        run.window_end_s,
        run.pending,
        None if math.isnan(run.flush_at_s) else run.flush_at_s,
    )
    world.now_s = run.now_s
    return run, at_s[:n]


def fill_run(guest: GuestBalloon, diff: int) -> int:
    """The work item's runs before this one, as many as run whole before anything
    else is due, each a request of 256 pages, with ``diff`` pages to go: the pages they
    took (0: none could). The last request of the change stays the caller's."""
    driver, host, mm = guest.driver, guest.host, guest.mm
    if (
        host.backing.page_bytes != BALLOON_PAGE_BYTES
        or mm.release_unseen()  # balloon_taken reads each request's release
        or not _quiet(guest, "inflateq")
    ):
        return 0
    released = 0 if host.inhibited or not host.backing.frees() else _PAGES * BALLOON_PAGE_BYTES
    done = _run(
        guest,
        _PAGES,
        min((diff - 1) // _PAGES, mm.pages_left() // _PAGES),
        min(released / (_PAGES * BALLOON_PAGE_BYTES), 1.0),  # balloon_taken's release_frac
        mm.fill_spare_kib(),
        (
            _PAGES * cal.GUEST_ALLOC_S_PER_PAGE,  # fill_balloon's, with no failed allocation
            cal.NOTIFY_TO_DEVICE_S + _PAGES * cal.HOST_DISCARD_S_PER_PAGE,  # _handle_output's delay
        ),
    )
    if done is None:
        return 0
    run, _ = done
    n = run.requests
    host.inflate_elements(n, _PAGES)
    managed = not driver.deflate_on_oom_negotiated
    arrays = mm.taken_at_once(n, _PAGES, run.spare_kib, n * (2 if managed else 1))
    head = driver.filled_at_once(arrays, run.cpu_s)
    guest.device.queues["inflateq"].replay_served(n, head)
    return n * _PAGES


def leak_run(guest: GuestBalloon, diff: int) -> int:
    """``fill_run``'s mirror for a deflate of ``diff`` pages: the pages given back by
    whole requests before the caller's last one (0: none could run whole)."""
    driver, mm = guest.driver, guest.mm
    if not _quiet(guest, "deflateq"):
        return 0
    done = _run(
        guest,
        -_PAGES,
        min((diff - 1) // _PAGES, driver.num_pages // _PAGES),
        0.0,  # free_pages: nothing taken, nothing released
        0.0,  # a deflate allocates nothing
        (
            _PAGES * cal.GUEST_RELEASE_S_PER_PAGE,  # leak_balloon's sleep after the ack
            cal.NOTIFY_TO_DEVICE_S + _PAGES * cal.HOST_WILLNEED_S_PER_PAGE,  # _handle_output's delay
        ),
    )
    if done is None:
        return 0
    run, at_s = done
    n = run.requests
    guest.host.deflate_elements(n, _PAGES)
    managed = not driver.deflate_on_oom_negotiated
    arrays, head = driver.leaked_at_once(n, _PAGES, at_s.tolist(), run.cpu_s)
    mm.freed_at_once(arrays, run.spare_kib, n * (2 if managed else 1))
    guest.device.queues["deflateq"].replay_served(n, head)
    return n * _PAGES
