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
```
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from overcommitd.model import OvercommitdError
from sim.memory.guest import GuestModelParams
from sim.memory.kernel import GuestKernel


class GuestModelFileError(OvercommitdError):
    """The guest-model file cannot be read or holds a bad key or value."""


class GuestModelFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    guest_model: GuestModelParams = GuestModelParams()
    guest_kernel: GuestKernel = GuestKernel()


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
