"""Oracle: the per-guest policy before it ran over columns (overcommitd 4773319), kept
verbatim for ``tests/test_batch_policies.py``; not used by the daemon.

``headroom``: keep the host's memory use at a target, taking from the guests with the
most slack and always giving back to a guest that runs short.

In the spirit of Proxmox VE's auto-ballooning (PVE/AutoBalloon.pm: host target 80 % of
MemTotal used, shares-weighted split), with the two fixes its users asked for: growth is
driven by the guest's own need, not only by host headroom (home-assistant/
operating-system#4805), and a guest's use is MemTotal - MemAvailable, so page cache is
reclaimable, not "used" (MOM and CloudVAMP#6 count cache as used and ratchet to max).

Each step, for each guest with stats:

* ``used = actual - MemAvailable`` and ``need = used + max(buffer_pct % of used,
  min_free_kib)``, at most the guest's maximum (Hyper-V's 20 % memory buffer);
* a guest below its need is given its need, whatever the host's state (giving memory
  back is the safe direction; the guard paces it);
* when the host uses more than ``host_target_used_pct`` of MemTotal, the excess plus
  what the short guests are given is taken from the guests above their need, in
  proportion to ``slack / weight``, never below need;
* otherwise guests above their need are held where they are.

Host use counts the ZFS ARC above its minimum as free (``count_arc``, on by default): the
kernel's MemAvailable leaves the ARC out, and squeezing guests for a cache the host would
drop on its own is the most common complaint about Proxmox's ballooning on ZFS.

Guests without stats are left out (held): with nothing to go on, hold.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from overcommitd.model import GuestSnapshot, HostSnapshot, Kib
from policies.api import PolicyResult
from policies.signals import used_kib


class HeadroomParams(BaseModel):
    """Knobs of the ``headroom`` policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    host_target_used_pct: float = Field(80.0, gt=0, le=100, description="host MemTotal - MemAvailable to aim for")
    buffer_pct: float = Field(20.0, ge=0, le=1000, description="free memory each guest keeps, % of its use")
    min_free_kib: Kib = Field(256 * 1024, ge=0, description="free memory each guest keeps at least")
    count_arc: bool = Field(True, description="count the ZFS ARC above c_min as available host memory")


class HeadroomPolicy:
    """Host-headroom policy; stateless."""

    name = "headroom"
    Params = HeadroomParams

    def __init__(self, params: HeadroomParams | None = None) -> None:
        self.params = params or HeadroomParams()

    def initial_state(self) -> None:
        return None

    def need_kib(self, guest: GuestSnapshot) -> int | None:
        """Memory the guest should have: its use plus a buffer; None without stats."""
        used = used_kib(guest)
        if used is None:
            return None
        buffer_kib = max(int(used * self.params.buffer_pct / 100), self.params.min_free_kib)
        return min(used + buffer_kib, guest.max_kib)

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: None) -> PolicyResult[None]:
        target_used_kib = int(host.mem_total_kib * self.params.host_target_used_pct / 100)
        excess_kib = host.used_kib_counting_arc(self.params.count_arc) - target_used_kib
        targets: dict[str, int] = {}
        slack_kib: dict[str, int] = {}
        for guest in guests:
            need = self.need_kib(guest)
            if need is None:
                continue
            if guest.actual_kib < need:
                targets[guest.uuid] = need
                excess_kib += need - guest.actual_kib
            else:
                slack_kib[guest.uuid] = guest.actual_kib - need
        if excess_kib > 0 and slack_kib:
            targets |= self._take(excess_kib, guests, slack_kib)
        return PolicyResult(targets, None)

    @staticmethod
    def _take(amount_kib: int, guests: Sequence[GuestSnapshot], slack_kib: dict[str, int]) -> dict[str, int]:
        """Take ``amount_kib`` from guests with slack, in proportion to slack / weight."""
        by_uuid = {g.uuid: g for g in guests}
        shares = {u: s / max(by_uuid[u].weight, 1e-9) for u, s in slack_kib.items() if s > 0}
        total_share = sum(shares.values())
        targets = {}
        for uuid, share in shares.items():
            take_kib = min(slack_kib[uuid], int(amount_kib * share / total_share))
            targets[uuid] = by_uuid[uuid].actual_kib - take_kib
        return targets
