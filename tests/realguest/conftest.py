"""Session fixtures for the real-guest suite: a private libvirtd (qemu:///system on a
private socket) and a factory of tiny real Linux guests. Guests are destroyed before
libvirtd stops (real-guest.md pitfall 9). Under CI=true a machine that cannot boot guests
fails these tests; it never skips them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from overcommitd.hypervisor.libvirt import start_event_loop
from tests.conftest import UNDER_CI, need_binaries
from tests.realguest.harness import IMAGE_DIR, GuestSpec, Libvirtd, console_text, domain_xml, wait_for

BOOT_TIMEOUT_S = 120  # ~3 s measured for one guest under TCG; 2 busy cores can be far slower


@pytest.fixture(scope="session")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Libvirtd]:
    need_binaries("libvirtd", "virsh", "qemu-system-x86_64")
    if not (IMAGE_DIR / "vmlinuz").exists() or not (IMAGE_DIR / "initrd.img").exists():
        message = f"no guest image in {IMAGE_DIR}: run tests/realguest/build.sh"
        if UNDER_CI:
            pytest.fail(message)
        pytest.skip(message)
    start_event_loop()  # before any libvirt.open in this process (pitfall 10)
    d = Libvirtd(tmp_path_factory.mktemp("libvirtd"))
    d.start()
    yield d
    d.stop()


class Guests:
    """Boots guests on the private libvirtd and destroys them at the end of a test."""

    def __init__(self, daemon: Libvirtd, console_dir: Path) -> None:
        self.daemon = daemon
        self.console_dir = console_dir
        self.conn: Any = libvirt.open(daemon.uri)
        self.names: list[str] = []

    def boot(self, *specs: GuestSpec) -> list[Any]:
        """Start every guest, then wait until each one's balloon driver is bound and the
        first stats sample has arrived."""
        doms = []
        for spec in specs:
            doms.append(self.conn.createXML(domain_xml(spec, self.console_dir), 0))
            self.names.append(spec.name)
        for spec, dom in zip(specs, doms, strict=True):
            wait_for(
                lambda s=spec: "RG-READY" in console_text(self.console_dir, s.name),
                BOOT_TIMEOUT_S,
                f"{spec.name} to boot",
            )
            wait_for(
                lambda d=dom: d.memoryStats().get("last_update", 0) > 0, BOOT_TIMEOUT_S, f"{spec.name}'s first stats"
            )
        return doms

    def actual_kib(self, dom: Any) -> int:
        """The guest's real memory size now (QMP query-balloon, via memoryStats); reopens
        the test's own connection after a libvirtd restart."""
        if not self.conn.isAlive():
            self.conn = libvirt.open(self.daemon.uri)
        return int(self.conn.lookupByUUIDString(dom.UUIDString()).memoryStats()["actual"])

    def console(self, name: str) -> str:
        return console_text(self.console_dir, name)

    def close(self) -> None:
        if not self.conn.isAlive():
            self.conn = libvirt.open(self.daemon.uri)
        for name in self.names:
            try:
                self.conn.lookupByName(name).destroy()
            except libvirt.libvirtError:
                pass
        self.conn.close()


@pytest.fixture
def guests(libvirtd: Libvirtd, tmp_path: Path) -> Iterator[Guests]:
    g = Guests(libvirtd, tmp_path)
    yield g
    g.close()


GuestFactory = Callable[..., list[Any]]
