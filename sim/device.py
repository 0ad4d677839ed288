"""The host side of every guest's virtio-balloon device (QEMU hw/virtio/virtio-balloon.c),
at the rate level: the target as ``num_pages``, and the stats the host last received.

The protocol-level device (config space, virtqueues in guest memory, the reverse stats
queue) deepens this module; what it must keep are the rules modelled here:

* a target becomes ``num_pages = (ram - target) >> 12`` (truncating; a target above RAM
  is RAM) and a config-change interrupt, even when the value did not change;
* stats arrive once per polling period and are stamped with the host time they
  arrived (``last-update``); between polls the host sees the previous sample; a period
  of 0 means polling is off and the host keeps the last sample forever.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from sim.driver import BalloonDriver

Array = npt.NDArray[np.float64]
BALLOON_PAGE_KIB = 4  # VIRTIO_BALLOON_PFN_SHIFT = 12, whatever the guest page size

STAT_FIELDS = (
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "mem_free",
    "mem_total",
    "mem_available",
    "disk_caches",
    "oom_kills",
)


def num_pages_kib(ram_kib: float, target_kib: int) -> float:
    """The balloon size the host asks for, in KiB, as QEMU's virtio_balloon_to_target
    computes ``num_pages``: whole 4 KiB pages, truncated."""
    target_kib = min(target_kib, int(ram_kib))
    return float((int(ram_kib) - target_kib) // BALLOON_PAGE_KIB * BALLOON_PAGE_KIB)


class BalloonDevice:
    """Targets and received stats of every guest."""

    def __init__(self, ram_kib: Array, stats_period_s: Array, driver: BalloonDriver) -> None:
        n = len(ram_kib)
        self.ram_kib = ram_kib
        self.driver = driver
        self.stats_period_s = stats_period_s
        self.last_update_s = np.full(n, -np.inf)  # never received
        self.stats = {name: np.zeros(n) for name in STAT_FIELDS}

    def set_target(self, i: int, target_kib: int) -> None:
        self.driver.config_changed(i, num_pages_kib(self.ram_kib[i], target_kib))

    def poll_stats(self, now_s: float, current: dict[str, Array]) -> None:
        """Take a fresh sample from each guest whose polling period has elapsed."""
        due = (self.stats_period_s > 0) & (now_s - self.last_update_s >= self.stats_period_s)
        if not due.any():
            return
        for name, values in current.items():
            self.stats[name][due] = values[due]
        # The sample arrived on the guest's own period grid, not exactly now.
        on_grid = np.floor(now_s / np.maximum(self.stats_period_s, 1e-9)) * self.stats_period_s
        self.last_update_s[due] = on_grid[due]

    def has_stats(self) -> npt.NDArray[np.bool_]:
        return np.asarray(np.isfinite(self.last_update_s), dtype=bool)
