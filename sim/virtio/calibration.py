"""How long the protocol model's steps take, calibrated to a real guest.

Figures from ``shared/reference/real-guest.md`` (QEMU 7.2 TCG, Linux 6.1 guest, 512 MiB,
``-smp 1``, on the project's 2-core CI machine):

* balloon -128 MiB -> ``actual`` equals the target in 0.11-0.19 s: 128 requests of 256
  PFNs, so about 1.1 ms per inflate request, allocation and discard together;
* balloon +128 MiB (deflate) in 0.05-0.17 s: about 0.8 ms per deflate request;
* the guest's stats reflect an inflate within one polling period (0.1-1.9 s at 2 s).

How one request's time splits between guest and host is not measured; the split below
(allocation vs. ``madvise``) is an assumption that only matters when discards are
inhibited or the guest is short of memory. The bulk path uses the rates these imply
(``sim.virtio.driver.INFLATE_KIB_S``/``DEFLATE_KIB_S``), so both speeds move a balloon equally fast.
"""

from __future__ import annotations

CONFIG_IRQ_TO_WORK_S = 0.002  # config interrupt -> update_balloon_size_work running
NOTIFY_TO_DEVICE_S = 20e-6  # a kick (VM exit, ioeventfd) -> QEMU's handler runs
GUEST_ALLOC_S_PER_PAGE = 1.5e-6  # balloon_page_alloc + balloon_page_enqueue, per 4 KiB
HOST_DISCARD_S_PER_PAGE = 2.7e-6  # ram_block_discard_range of one 4 KiB unit (TCG host)
HOST_WILLNEED_S_PER_PAGE = 2.3e-6  # madvise(MADV_WILLNEED) of one unit on deflate
GUEST_RELEASE_S_PER_PAGE = 0.7e-6  # put_page after the deflate ack
FAILED_ALLOC_S = 0.001  # assumption, not measured: a failed __GFP_NORETRY page allocation
# still runs one pass of direct reclaim/compaction before giving up ("Out of puff!")
STATS_WORK_S = 0.001  # interrupt -> update_balloon_stats_work gathered and re-posted
REPORT_BLOCK_S = 40e-6  # host discard of one reported 2 MiB block
HINT_BLOCK_S = 20e-6  # guest allocation + add of one 4 MiB hint block

INFLATE_REQUEST_S = NOTIFY_TO_DEVICE_S + 256 * (GUEST_ALLOC_S_PER_PAGE + HOST_DISCARD_S_PER_PAGE)
DEFLATE_REQUEST_S = NOTIFY_TO_DEVICE_S + 256 * (HOST_WILLNEED_S_PER_PAGE + GUEST_RELEASE_S_PER_PAGE)
