"""What the control loop needs from a hypervisor and from the host, as two protocols.

``sim.SimHypervisor`` implements both for replays; the libvirt backend and
``overcommitd.host`` implement them on a real host. The loop never knows which.
Calls are synchronous: a blocking backend is run off the event loop by the runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from overcommitd.model import GuestSnapshot, HostSnapshot, OvercommitdError


class HypervisorError(OvercommitdError):
    """The hypervisor could not be reached or refused a call."""


class NoSuchGuest(HypervisorError):
    """The guest is not (or no longer) running on this host."""


class FloorAboveMaximum(HypervisorError):
    """A floor the guest can never meet: the guard would hold it at its maximum for good."""

    @classmethod
    def check(cls, name_or_uuid: str, floor_kib: int, max_kib: int) -> None:
        if floor_kib > max_kib:
            raise cls(
                f"{name_or_uuid}: floor {floor_kib} KiB is above the guest's maximum of {max_kib} KiB;"
                f" a floor is at most the maximum (0 removes it)"
            )


@dataclass(frozen=True, slots=True)
class GuestEvent:
    """Something the hypervisor told us about a guest: ``kind`` is ``lifecycle``,
    ``balloon-change``, ``metadata-change`` or ``migration``; ``actual_kib`` is set for a
    balloon change."""

    kind: str
    uuid: str
    name: str
    detail: str = ""
    actual_kib: int | None = None


class Hypervisor(Protocol):
    def snapshot(self) -> Sequence[GuestSnapshot]:
        """Every guest the hypervisor runs, with its balloon stats, in one call."""
        ...

    def set_target(self, uuid: str, target_kib: int) -> None:
        """Ask the guest's balloon for ``target_kib`` of guest memory; returns at once,
        the driver converges asynchronously."""
        ...


class HostReader(Protocol):
    def read(self) -> HostSnapshot:
        """The host's memory and pressure now."""
        ...
