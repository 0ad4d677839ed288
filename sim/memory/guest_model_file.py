"""A replay's guest constants from a TOML file: ``overcommitd replay --guest-model FILE``.

Why: the guest model's constants (reserved memory, kernel memory, the reserve between
MemFree and MemAvailable, the kernel's stat tags) decide where a MemAvailable-holding
policy puts the balloon, and they differ per kernel and distribution. ``overcommitd sim
calibrate`` fits them from an operator's own recording and writes this file, so replays
use their guests' kernels rather than ours. Lives in sim/ (the daemon's config never
imports the simulator).

```toml
[guest_model]        # sim.memory.guest.GuestModelParams; keys not given keep their defaults
kernel_fixed_kib = 18184
min_free_pct = 6.8

[guest_kernel]       # sim.memory.kernel.GuestKernel
version = "6.1"
thp = "always"

[guests]             # what the guests are like beyond the traces; given keys set the replay's
stats_period_s = 2   # libvirt <stats period>; 0: off
stats_phase_s = { web-1 = 0.8 }   # when a guest's stats timer first fires (name or pattern)
swap_mib = 0
deflate_on_oom = ["web-*"]        # the guests with DEFLATE_ON_OOM ([]: none)
reporting_share = 0.0             # share with free page reporting, drawn with the seed
```

The ``[guests]`` keys are the replay's ``--stats-period-s``, ``--stats-phase-s``,
``--guest-swap-mib``, ``--deflate-on-oom``, ``--deflate-on-oom-share`` and
``--reporting-share`` (issue 16: a replay held to real guests is set from a file); an
argument given on the command line wins over the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from overcommitd.model import OvercommitdError
from sim.memory.guest import GuestModelParams
from sim.memory.kernel import GuestKernel


class GuestModelFileError(OvercommitdError):
    """The guest-model file cannot be read or holds a bad key or value."""


class GuestSetup(BaseModel):
    """``[guests]``: each key not given leaves the replay's own default."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    stats_period_s: float | None = Field(None, ge=0, le=86400)
    stats_phase_s: dict[str, Annotated[float, Field(ge=0, le=86400)]] = Field(default_factory=dict)
    swap_mib: int | None = Field(None, ge=0, le=1 << 30)
    deflate_on_oom: tuple[str, ...] | None = None
    deflate_on_oom_share: float | None = Field(None, ge=0, le=1)
    reporting_share: float | None = Field(None, ge=0, le=1)

    def replay_fields(self) -> dict[str, object]:
        """The given keys as ``ReplaySpec`` fields."""
        fields: dict[str, object] = {
            "stats_period_s": self.stats_period_s,
            "guest_swap_kib": None if self.swap_mib is None else self.swap_mib * 1024,
            "deflate_on_oom_guests": self.deflate_on_oom,
            "deflate_on_oom_share": self.deflate_on_oom_share,
            "reporting_share": self.reporting_share,
        }
        if self.stats_phase_s:
            fields["stats_phase_s"] = tuple(self.stats_phase_s.items())
        return {k: v for k, v in fields.items() if v is not None}


class GuestModelFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    guest_model: GuestModelParams = GuestModelParams()
    guest_kernel: GuestKernel = GuestKernel()
    guests: GuestSetup = GuestSetup()

    def replay_fields(self) -> dict[str, object]:
        """The file as ``ReplaySpec`` fields."""
        return {"guest_model": self.guest_model, "guest_kernel": self.guest_kernel, **self.guests.replay_fields()}


def load_guest_model(path: Path) -> GuestModelFile:
    """The file's sections, validated; every bad key named as ``path: section.key: why``."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise GuestModelFileError(f"{path}: cannot read: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise GuestModelFileError(f"{path}: not TOML: {e}") from e
    try:
        return GuestModelFile.model_validate(data)
    except ValidationError as e:
        lines = [f"{path}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise GuestModelFileError("\n".join(lines)) from None
