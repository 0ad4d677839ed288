"""The guest's balloon driver (Linux drivers/virtio/virtio_balloon.c), for every guest
at once, at the rate level.

This is the bulk path: it moves each balloon toward the host's ``num_pages`` at the
rate a real guest achieves and stops where the guest has nothing left to give. The
protocol-level driver (config interrupt -> work item -> 256-PFN batches over the
inflate/deflate virtqueues) deepens this module; the rates and rules here are the ones
that model must reproduce:

* inflate 128 MiB in 0.11-0.19 s and deflate it in 0.05-0.17 s on a TCG guest
  (real-guest.md): about 1 GiB/s and 1.5 GiB/s;
* inflation takes only pages the guest can spare (the allocation is
  ``__GFP_NORETRY``); short of the target, the driver logs "Out of puff!", sleeps
  200 ms and retries, for as long as the target stays out of reach (each retry costs
  guest CPU, so retries are counted);
* with DEFLATE_ON_OOM the OOM notifier takes pages back, 256 per OOM event, and the
  driver does not re-inflate until the host's next config-change interrupt.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
INFLATE_KIB_S = 1024 * 1024.0
DEFLATE_KIB_S = 1536 * 1024.0
OUT_OF_PUFF_RETRY_S = 0.2  # msleep(200) in fill_balloon's caller


class BalloonDriver:
    """Balloon size and target of every guest, in KiB (4 KiB pages x 4)."""

    def __init__(self, n: int) -> None:
        self.balloon_kib = np.zeros(n)
        self.num_pages_kib = np.zeros(n)  # the host's wish: config num_pages x 4 KiB
        self.waiting_for_config = np.zeros(n, dtype=bool)  # auto-deflated: no inflation until told again
        self.puff_retries = np.zeros(n)

    def config_changed(self, i: int, num_pages_kib: float) -> None:
        """Config interrupt: the host wrote ``num_pages`` (even the same value again)."""
        self.num_pages_kib[i] = num_pages_kib
        self.waiting_for_config[i] = False

    def advance(self, dt_s: float, spare_kib: Array) -> None:
        """Move toward ``num_pages`` for ``dt_s``; inflate at most ``spare_kib``."""
        diff = self.num_pages_kib - self.balloon_kib
        inflate = np.where(self.waiting_for_config, 0.0, np.clip(diff, 0.0, INFLATE_KIB_S * dt_s))
        short = inflate > spare_kib
        inflate = np.minimum(inflate, spare_kib)
        deflate = np.clip(-diff, 0.0, DEFLATE_KIB_S * dt_s)
        self.balloon_kib += inflate - deflate
        # A short guest retries every 200 ms for the rest of the interval.
        self.puff_retries += np.where(short, np.floor(dt_s / OUT_OF_PUFF_RETRY_S), 0.0)

    def deflate_on_oom(self, wanted_kib: Array) -> Array:
        """The OOM notifier's leak_balloon(): returns what was given back."""
        given = np.minimum(wanted_kib, self.balloon_kib)
        self.balloon_kib -= given
        self.waiting_for_config |= given > 0
        return given
