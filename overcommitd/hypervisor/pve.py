"""A Proxmox VE guest's own ballooning settings, from ``/etc/pve/qemu-server/<vmid>.conf``.

Proxmox names a VM's QMP socket ``/var/run/qemu-server/<vmid>.qmp`` and keeps its config
in ``<vmid>.conf``: ``key: value`` lines, then ``[snapshot]`` sections that describe
snapshots, not the running VM (PVE::QemuServer::parse_vm_config). ``balloon:`` is the
minimum memory in MiB that Proxmox's own auto-ballooning leaves the VM; ``balloon: 0``
turns ballooning off for the VM (Proxmox then adds no balloon device at all). We read it
as a floor, and ``0`` as an exclusion: an operator who turned ballooning off meant it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIB_KIB = 1024


@dataclass(frozen=True, slots=True)
class PveBalloon:
    """``floor_kib`` from ``balloon: N`` (MiB); ``exclude`` for ``balloon: 0``."""

    floor_kib: int = 0
    exclude: bool = False


def read_balloon(conf_dir: Path, vmid: str) -> PveBalloon | None:
    """The VM's ``balloon:`` setting, or None when there is no such file or key (or the
    socket's name is not a VMID). A malformed value is None too: the config guard still
    applies, and Proxmox itself would have refused the file."""
    if not vmid.isdigit():
        return None
    try:
        text = (conf_dir / f"{vmid}.conf").read_text(errors="replace")
    except OSError:
        return None
    return parse_balloon(text)


def parse_balloon(text: str) -> PveBalloon | None:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            break  # snapshot sections follow the current config
        key, sep, value = line.partition(":")
        if sep and key.strip() == "balloon":
            value = value.strip()
            if not value.isdigit() or len(value) > 9:  # 9 digits of MiB is ~1 EiB
                return None
            mib = int(value)
            return PveBalloon(exclude=True) if mib == 0 else PveBalloon(floor_kib=mib * MIB_KIB)
    return None
