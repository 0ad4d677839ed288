"""A test policy that asks for fixed targets, so a test can make a policy want something
the guard must refuse (below a floor, faster than a step). Named in configs as
``tests.fixed_policy:FixedPolicy``."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from overcommitd.model import GuestSnapshot, HostSnapshot
from policies.api import PolicyResult


class FixedParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    target_kib: int | None = None  # for every guest; None: no wish
    by_name: dict[str, int] = {}  # per guest name, wins over target_kib


class FixedPolicy:
    name = "fixed"
    Params = FixedParams

    def __init__(self, params: FixedParams | None = None) -> None:
        self.params = params or FixedParams()

    def initial_state(self) -> int:
        return 0

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: int) -> PolicyResult[int]:
        targets = {}
        for g in guests:
            t = self.params.by_name.get(g.name, self.params.target_kib)
            if t is not None:
                targets[g.uuid] = t
        return PolicyResult(targets, state + 1)
