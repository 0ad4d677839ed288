"""A private libvirtd, a private mosquitto and tiny real Linux guests for the real-guest
tests (../shared/reference/real-guest.md). Each service runs on private sockets/ports
under a temporary directory so it never touches a system daemon, and is killed at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO / ".cache" / "realguest"
OVERCOMMITD_NS = "https://overcommitd.dev/xmlns/guest/1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


class HarnessError(RuntimeError):
    """The machine cannot run real guests; the message says what is missing."""


def missing_binaries() -> list[str]:
    need = ["libvirtd", "virsh", "qemu-system-x86_64", "mosquitto"]
    return [b for b in need if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value; generous timeouts, TCG is slow."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Libvirtd:
    """libvirtd on a private socket: ``uri`` is ``qemu:///system?socket=...``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sock_dir = workdir / "sock"
        self.uri = f"qemu:///system?socket={self.sock_dir}/libvirt-sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "libvirtd.conf"
        # No polkit on this machine: the socket is root-only instead (pitfall 7).
        conf.write_text(
            f'unix_sock_dir = "{self.sock_dir}"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            'unix_sock_rw_perms = "0700"\nlog_outputs = "3:stderr"\n'
        )
        log = open(self.workdir / "libvirtd.log", "ab")  # noqa: SIM115 - lives as long as the daemon
        exe = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
        self.proc = subprocess.Popen(
            [exe, "-f", str(conf), "-p", str(self.workdir / "libvirtd.pid")],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_for(
            lambda: (self.sock_dir / "libvirt-sock").exists() or self.proc.poll() is not None, 30, "libvirtd socket"
        )
        if self.proc.poll() is not None:
            raise HarnessError(f"libvirtd exited with {self.proc.returncode}; see {self.workdir}/libvirtd.log")
        # The first connection probes QEMU's capabilities (~8 s under TCG, pitfall 8): do it now.
        subprocess.run(["virsh", "-c", self.uri, "version"], check=True, capture_output=True, timeout=120)

    def virsh(self, *args: str) -> str:
        return subprocess.run(
            ["virsh", "-c", self.uri, *args], check=True, capture_output=True, text=True, timeout=60
        ).stdout

    def destroy_all(self) -> None:
        """Guests outlive libvirtd (pitfall 9): destroy them before stopping it."""
        try:
            names = self.virsh("list", "--name").split()
        except (subprocess.SubprocessError, OSError):
            return
        for name in names:
            subprocess.run(["virsh", "-c", self.uri, "destroy", name], capture_output=True, timeout=60, check=False)

    def stop(self, *, destroy: bool = True) -> None:
        if destroy:
            self.destroy_all()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        (self.sock_dir / "libvirt-sock").unlink(missing_ok=True)


class Mosquitto:
    """A mosquitto broker on 127.0.0.1 and a free port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_conf = ""  # appended to the listener's settings (TLS, passwords)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        settings = self.extra_conf or "allow_anonymous true\n"
        # As root, mosquitto drops to the user "mosquitto", which cannot read a private
        # tmp dir (password file, keys); these tests own the broker, so it stays root.
        conf.write_text(f"user root\nlistener {self.port} 127.0.0.1\n{settings}persistence false\n")
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=log, start_new_session=True)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited; see {self.workdir}/mosquitto.log")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(up, 20, f"mosquitto on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@dataclass(frozen=True)
class GuestSpec:
    """One tiny guest: ``work`` is the workload schedule, ``MiB@s,...`` (see workload.c)."""

    name: str
    memory_mib: int = 512
    current_mib: int | None = None
    autodeflate: bool = False
    free_page_reporting: bool = False
    free_page_hint: bool = False  # QEMU's free-page-hint, through <qemu:override> (needs an iothread)
    stats_period_s: int | None = 2
    work: str = ""
    floor_mib: int | None = None


def domain_xml(spec: GuestSpec, console_dir: Path) -> str:
    """``<domain type='qemu'>`` (TCG, pitfall 1), direct kernel boot, no disk or network,
    TCG cache capped at 64 MiB (pitfall 13), serial console to our own file (pitfall 14)."""
    cur = spec.current_mib or spec.memory_mib
    stats = f"<stats period='{spec.stats_period_s}'/>" if spec.stats_period_s is not None else ""
    meta = ""
    if spec.floor_mib is not None:
        meta = (
            f"<metadata><oc:guest xmlns:oc='{OVERCOMMITD_NS}'><oc:floor unit='KiB'>{spec.floor_mib * 1024}</oc:floor>"
            "</oc:guest></metadata>"
        )
    cmdline = f"console=ttyS0 loglevel=4 panic=-1 rgwork={spec.work or '0@0'}"
    iothreads, override = "", ""
    if spec.free_page_hint:  # libvirt has no attribute for it
        iothreads = "<iothreads>1</iothreads>"
        override = f"""<qemu:override xmlns:qemu='{QEMU_NS}'><qemu:device alias='balloon0'><qemu:frontend>
    <qemu:property name='free-page-hint' type='bool' value='true'/>
    <qemu:property name='iothread' type='string' value='iothread1'/>
  </qemu:frontend></qemu:device></qemu:override>"""
    return f"""<domain type='qemu'>
  <name>{spec.name}</name>
  {meta}
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <currentMemory unit='MiB'>{cur}</currentMemory>
  <vcpu>1</vcpu>{iothreads}
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{IMAGE_DIR / "vmlinuz"}</kernel><initrd>{IMAGE_DIR / "initrd.img"}</initrd>
    <cmdline>{cmdline}</cmdline></os>
  <features><tcg><tb-cache unit='MiB'>64</tb-cache></tcg></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>{shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"}</emulator>
    <serial type='file'><source path='{console_dir / (spec.name + ".console")}'/><target port='0'/></serial>
    <memballoon model='virtio' autodeflate='{"on" if spec.autodeflate else "off"}' freePageReporting='{"on" if spec.free_page_reporting else "off"}'>{stats}</memballoon>
  </devices>
  {override}
</domain>"""


def console_text(console_dir: Path, name: str) -> str:
    p = console_dir / f"{name}.console"
    return p.read_text(errors="replace") if p.exists() else ""


def kill_pidfile(path: Path) -> None:
    try:
        os.kill(int(path.read_text().strip()), signal.SIGKILL)
    except (OSError, ValueError):
        pass


def guest_ram_rss_kib(name: str, memory_mib: int) -> int:
    """Host RAM backing a running guest's RAM: the Rss of the QEMU mapping as large as
    the guest (pc machine, below 4 GiB: one block), not the whole process."""
    pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    size_kib = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size_kib = int(line.split()[1])
        elif line.startswith("Rss:") and size_kib == memory_mib * 1024:
            return int(line.split()[1])
    raise HarnessError(f"no {memory_mib} MiB mapping in QEMU {pid}'s smaps for {name}")


class QemuGuest:
    """One tiny guest under QEMU started directly (no libvirt), with two QMP sockets: the
    one the daemon finds by its glob, and a control socket for the test's own checks
    (QEMU serves one client per socket). Same image, command line and TCG cap as the
    libvirt guests (``domain_xml``)."""

    def __init__(self, spec: GuestSpec, sock_dir: Path, ctl_dir: Path, console_dir: Path) -> None:
        import uuid as uuidlib

        self.spec = spec
        self.uuid = str(uuidlib.uuid4())
        self.qmp_path = sock_dir / f"{spec.name}.qmp"
        self.ctl_path = ctl_dir / f"{spec.name}.ctl"
        self.console_dir = console_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        s = self.spec
        balloon = "virtio-balloon-pci,id=balloon0"
        balloon += f",deflate-on-oom={'on' if s.autodeflate else 'off'}"
        balloon += f",free-page-reporting={'on' if s.free_page_reporting else 'off'}"
        return [
            shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64",
            "-name", s.name, "-uuid", self.uuid,
            "-machine", "pc", "-accel", "tcg,tb-size=64",  # TCG (pitfall 1), cache capped (pitfall 13)
            "-m", f"{s.memory_mib}M", "-smp", "1",
            "-nographic", "-nodefaults", "-no-reboot",
            "-serial", f"file:{self.console_dir / (s.name + '.console')}",
            "-kernel", str(IMAGE_DIR / "vmlinuz"), "-initrd", str(IMAGE_DIR / "initrd.img"),
            "-append", f"console=ttyS0 loglevel=4 panic=-1 rgwork={s.work or '0@0'}",
            "-device", balloon,
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp", f"unix:{self.ctl_path},server=on,wait=off",
        ]  # fmt: skip

    def start(self) -> None:
        log = open(self.console_dir / f"{self.spec.name}.qemu.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv(), stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def ctl(self, cmd: str, **args: object) -> object:
        """One command on the control socket, in a fresh blocking session of its own
        (plain sockets: callable from any thread, with or without an event loop)."""
        import json

        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(self.ctl_path))
            stream = sock.makefile("rwb")

            def reply() -> dict[str, object]:
                while True:  # skip the greeting's siblings: events
                    msg = json.loads(stream.readline())
                    if "return" in msg or "error" in msg or "QMP" in msg:
                        return dict(msg)

            reply()  # greeting
            for name, arguments in (("qmp_capabilities", {}), (cmd, args)):
                stream.write(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
                stream.flush()
                answer = reply()
            if "error" in answer:
                raise HarnessError(f"{self.spec.name}: {cmd}: {answer['error']}")
            return answer["return"]

    def actual_kib(self) -> int:
        reply = self.ctl("query-balloon")
        assert isinstance(reply, dict)
        return int(reply["actual"]) // 1024

    def console(self) -> str:
        return console_text(self.console_dir, self.spec.name)

    def kill(self) -> None:
        """SIGKILL: QEMU leaves its socket files behind, like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
