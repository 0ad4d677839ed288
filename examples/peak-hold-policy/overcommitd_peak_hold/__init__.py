"""``peak-hold``: keep each guest at the highest use it showed over the last
``window_s`` seconds, plus ``margin_pct`` % - the rule Kubernetes' VPA and Google's
far-memory cold-age threshold apply in spirit: what was used recently will be used
again, so only memory idle for a whole window is reclaimed.

Everything a plugin needs: a ``Params`` model (frozen, extra="forbid", constrained),
frozen per-guest state, a pure ``decide_guest`` that reads the time from the snapshot,
and an entry point in ``pyproject.toml``. The guard paces and bounds whatever it asks.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from overcommitd.model import GuestSnapshot, HostSnapshot
from policies.api import PerGuestPolicy
from policies.signals import used_kib


class PeakHoldParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    window_s: float = Field(6 * 3600.0, gt=0, description="how far back the peak is remembered")
    margin_pct: float = Field(25.0, ge=0, le=1000, description="kept above the peak, % of it")


@dataclass(frozen=True, slots=True)
class PeakHoldState:
    peak_kib: int = 0
    peak_at_s: float = float("-inf")


class PeakHoldPolicy(PerGuestPolicy[PeakHoldState]):
    name = "peak-hold"
    Params = PeakHoldParams

    def __init__(self, params: PeakHoldParams | None = None) -> None:
        self.params = params or PeakHoldParams()

    def initial_guest_state(self, guest: GuestSnapshot) -> PeakHoldState:
        return PeakHoldState()

    def decide_guest(
        self, host: HostSnapshot, guest: GuestSnapshot, state: PeakHoldState
    ) -> tuple[int | None, PeakHoldState]:
        used = used_kib(guest)  # from actual, not MemTotal (DEFLATE_ON_OOM keeps MemTotal)
        if used is None:
            return None, state  # nothing to go on: hold
        now_s = host.taken_at_s  # the snapshot's time: a policy never reads a clock
        if used >= state.peak_kib or now_s - state.peak_at_s > self.params.window_s:
            state = PeakHoldState(used, now_s)
        return int(state.peak_kib * (1 + self.params.margin_pct / 100)), state
