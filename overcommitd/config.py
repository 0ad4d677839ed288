"""The daemon's configuration: one pydantic model per TOML table, loaded with tomllib.

Every key is documented in ``config.example.toml`` at the top of the repository. Unknown
keys are errors (a typo must not silently fall back to a default), and each error names
the key's dotted path. Precedence: defaults < TOML file < command line.

Memory sizes take an integer (KiB, libvirt's unit) or a string with a binary unit:
``"512MiB"``, ``"4 GiB"``, ``"1.5GiB"``, from 0 to ``MAX_KIB`` (1 PiB). Every duration
and count has a range too (``inf`` and ``nan`` are never accepted): a value outside
it is an error naming the key, never a daemon that stops ticking or spins.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from overcommitd.model import GuestSnapshot, Kib, OvercommitdError

DEFAULT_CONFIG_PATH = Path("/etc/overcommitd/overcommitd.toml")
CONFIG_ENV = "OVERCOMMITD_CONFIG"  # overrides DEFAULT_CONFIG_PATH (tests, non-standard installs)


def default_config_path() -> Path:
    """Where ``run``, ``guest set-floor`` and ``status`` look without ``--config``."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


class ConfigError(OvercommitdError):
    """The config file cannot be read or does not validate. ``problems`` holds one
    ``(key path, message)`` per error."""

    def __init__(self, path: Path, problems: list[tuple[str, str]]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {key}: {msg}" for key, msg in problems))


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


HOUR_S = 3600.0
DAY_S = 86400.0
# interval_s: below 0.5 s the daemon would poll libvirtd faster than QEMU refreshes a
# balloon's `actual` (at most once a second); above an hour a guest's stats are too old
# for any decision and a SIGHUP would wait that long to be seen.
INTERVAL_MIN_S, INTERVAL_MAX_S = 0.5, HOUR_S


class PolicyConfig(_Section):
    """Which policy decides, and its parameters (validated by the policy's own model)."""

    name: str = Field("trim", min_length=1, description="registry name or module:Class")
    params: dict[str, Any] = Field(default_factory=dict)


class GuardConfig(_Section):
    """The guard's rules; they hold for every policy, built-in or plugin."""

    max_inflate_step_kib: Kib = Field(256 * 1024, gt=0, description="most memory taken from a guest per tick")
    max_deflate_step_kib: Kib = Field(1024 * 1024, gt=0, description="most memory given back to a guest per tick")
    dead_band_kib: Kib = Field(16 * 1024, description="changes smaller than this are not made")
    min_guest_kib: Kib = Field(256 * 1024, description="no guest is ever ballooned below this")
    stale_after_periods: float = Field(
        3.0, gt=0, le=1000, description="stats older than this many polling periods are stale"
    )
    stale_after_min_s: float = Field(30.0, gt=0, le=DAY_S, description="... and older than this many seconds")
    auto_deflate_tolerance_kib: Kib = Field(2 * 1024, description="actual above target by more means auto-deflate")
    auto_deflate_cooldown_s: float = Field(
        600.0, ge=0, le=7 * DAY_S, description="no inflation after an auto-deflate for this long"
    )
    settle_s: float = Field(
        5.0,
        ge=0,
        le=HOUR_S,
        description="a balloon given its target less than this long ago is still moving, not stopped short",
    )

    @model_validator(mode="after")
    def _deflate_faster(self) -> GuardConfig:
        if self.max_deflate_step_kib < self.max_inflate_step_kib:
            raise ValueError(
                f"max_deflate_step_kib(={self.max_deflate_step_kib}) must be >= max_inflate_step_kib"
                f"(={self.max_inflate_step_kib}): give memory back at least as fast as it is taken"
            )
        return self


class GuestOverride(_Section):
    """Per-guest settings, keyed by the guest's name or UUID in ``[guests.<key>]``."""

    floor_kib: Kib | None = Field(None, description="SLA floor; raises the floor from the domain's metadata")
    exclude: bool = Field(False, description="never balloon this guest")
    weight: float | None = Field(None, gt=0, le=1000, description="share relative to other guests (default 1)")


class LibvirtConfig(_Section):
    """How to reach libvirt, and what to set up on guests."""

    uri: str = Field("qemu:///system", min_length=1, description="libvirt connection URI")
    enable_stats_period_s: int = Field(
        0, ge=0, le=3600, description="set this stats polling period on guests that have none (0: leave them)"
    )
    reconnect_min_s: float = Field(1.0, ge=0.05, le=HOUR_S, description="first wait before reconnecting to libvirtd")
    reconnect_max_s: float = Field(60.0, ge=0.05, le=HOUR_S, description="longest wait between reconnect attempts")
    keepalive_interval_s: int = Field(5, ge=0, le=3600, description="libvirt keepalive probe interval (0: off)")
    keepalive_count: int = Field(3, ge=1, le=100, description="unanswered probes before the connection is dropped")


class HypervisorConfig(_Section):
    """Which hypervisor backend the daemon talks to."""

    backend: Literal["libvirt", "qmp"] = Field(
        "libvirt", description="libvirt: through libvirtd ([libvirt]); qmp: QEMU's QMP sockets directly ([qmp])"
    )


class QmpConfig(_Section):
    """QEMU guests reached through their QMP sockets, without libvirt (Proxmox VE, plain QEMU)."""

    socket_glob: str = Field(
        "/var/run/qemu-server/*.qmp", min_length=1, description="every socket matching this glob is a guest"
    )
    pve_conf_dir: Path = Field(
        Path("/etc/pve/qemu-server"),
        description="Proxmox VM configs (<vmid>.conf, vmid from the socket name): balloon: is a floor; absent: none",
    )
    stats_polling_interval_s: int = Field(
        2, ge=1, description="guest-stats-polling-interval set on every balloon that polls slower or not at all"
    )
    keep_connected: bool = Field(
        False,
        description="hold each socket open between ticks (events as they happen); QEMU serves one client per "
        "socket, so only for sockets nothing else uses: never Proxmox's <vmid>.qmp, which qm and pvestatd need",
    )
    call_timeout_s: float = Field(2.0, gt=0, description="a QMP command unanswered this long marks the guest held")
    reconnect_min_s: float = Field(1.0, gt=0, description="first wait before reconnecting to a guest's socket")
    reconnect_max_s: float = Field(60.0, gt=0, description="longest wait between reconnect attempts")


class HostConfig(_Section):
    """Where the host's memory files are (only tests change these), and what the host keeps
    for itself at least: the "host short by N GiB" estimate (``overcommitd.shortfall``)
    counts the host's own use as no less than ``reserve_kib`` plus ``guest_overhead_kib``
    per guest. Defaults are oVirt vdsm's ``host_mem_reserve`` (256 MB) and
    ``guest_ram_overhead`` (65 MB, QEMU's own memory per guest; vdsm/config.py.in)."""

    meminfo_path: Path = Path("/proc/meminfo")
    psi_memory_path: Path = Path("/proc/pressure/memory")
    ksm_dir: Path = Path("/sys/kernel/mm/ksm")
    arcstats_path: Path = Field(
        Path("/proc/spl/kstat/zfs/arcstats"), description="ZFS ARC kstat; absent on hosts without ZFS"
    )
    reserve_kib: Kib = Field(256 * 1024, description="host kernel and services at least, for the shortfall estimate")
    guest_overhead_kib: Kib = Field(65 * 1024, description="QEMU's own memory per guest at least, likewise")

    def own_min_kib(self, guests: int) -> int:
        """The least the host uses for itself with ``guests`` guests running."""
        return self.reserve_kib + self.guest_overhead_kib * guests


class MqttConfig(_Section):
    """Telemetry and commands over MQTT. Off unless ``enabled``; commands are off unless
    ``commands``, and need broker authentication unless ``allow_unauthenticated_commands``:
    whoever can publish on the command topic can switch policies and set floors."""

    enabled: bool = False
    commands: bool = Field(False, description="accept commands on <prefix>/<host_id>/command")
    allow_unauthenticated_commands: bool = Field(
        False, description="accept commands without username/password or client certificate (warned at every start)"
    )
    max_payload_bytes: int = Field(
        64 * 1024, ge=1024, le=1024 * 1024, description="longer commands are refused (payload-too-large) unread"
    )
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    password_file: Path | None = Field(None, description="file holding the password (read at start and on reload)")
    tls: bool = Field(False, description="connect with TLS (port 8883 by convention)")
    ca_file: Path | None = Field(None, description="CA bundle for TLS; system CAs if unset")
    cert_file: Path | None = Field(None, description="client certificate for TLS client auth")
    key_file: Path | None = None
    topic_prefix: str = Field("overcommitd", min_length=1, description="topics are <prefix>/<host_id>/...")
    host_id: str | None = Field(None, description="this host's name in topics (default: the hostname)")
    keepalive_s: int = Field(30, ge=5, le=65535)  # MQTT 3.1.1 §3.1.2.10: a 16-bit number of seconds
    buffer_size: int = Field(
        10000,
        ge=1,
        le=1_000_000,
        description="telemetry messages held while the broker is away; a tick queues 2 per guest + 1",
    )
    reconnect_min_s: float = Field(1.0, ge=0.05, le=HOUR_S)
    reconnect_max_s: float = Field(60.0, ge=0.05, le=HOUR_S)

    @model_validator(mode="after")
    def _key_with_cert(self) -> MqttConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        if self.password is not None and self.password_file is not None:
            raise ValueError("password and password_file: set one or neither")
        if self.commands and not self.authenticated and not self.allow_unauthenticated_commands:
            raise ValueError(
                "commands = true needs the broker to authenticate the daemon (username with password or"
                " password_file, or cert_file and key_file); or set allow_unauthenticated_commands = true"
                " to take commands from anyone who can publish on the broker"
            )
        return self

    @property
    def authenticated(self) -> bool:
        has_password = self.password is not None or self.password_file is not None
        return (self.username is not None and has_password) or self.cert_file is not None


class MetricsConfig(_Section):
    """The Prometheus ``/metrics`` endpoint. Off unless ``enabled``."""

    enabled: bool = False
    address: str = Field("127.0.0.1", description="listen address; 0.0.0.0 for all")
    port: int = Field(9477, ge=0, le=65535, description="0 picks a free port")


class KsmConfig(_Section):
    """The KSM controller (overcommitd.ksm): starts, throttles and stops the kernel's
    same-page merging from host pressure. Off unless ``enabled``; defaults are ksmtuned's
    (/etc/ksmtuned.conf of Fedora/RHEL's ksmtuned) and oVirt MOM's doc/ksm.rules."""

    enabled: bool = False
    dry_run: bool = Field(False, description="log what would be written to sysfs, write nothing")
    sysfs_dir: Path = Field(Path("/sys/kernel/mm/ksm"), description="KSM's sysfs directory (tests point elsewhere)")
    adjust_interval_s: float = Field(60.0, gt=0, description="time between adjustments (KSM_MONITOR_INTERVAL)")
    threshold_pct: float = Field(20.0, gt=0, le=100, description="free memory below this % of RAM is pressure")
    threshold_min_kib: Kib = Field(2048, ge=0, description="the pressure threshold at least (KSM_THRES_CONST)")
    count_arc: bool = Field(True, description="count the ZFS ARC above c_min as free memory")
    npages_boost: int = Field(300, ge=0, description="pages_to_scan added per adjustment under pressure")
    npages_decay: int = Field(50, ge=0, description="pages_to_scan removed per adjustment without pressure")
    npages_min: int = Field(64, ge=1, description="lowest pages_to_scan while running")
    npages_max: int = Field(1250, ge=1, description="highest pages_to_scan")
    sleep_ms_per_16gib: int = Field(10, ge=0, description="sleep_millisecs for a 16 GiB host, scaled by 16 GiB / RAM")
    sleep_ms_min: int = Field(10, ge=0, description="lowest sleep_millisecs written")
    sleep_ms_max: int = Field(1000, ge=1, description="highest sleep_millisecs written")
    min_saved_kib: Kib = Field(
        128 * 1024, ge=0, description="back off when full scans have shared less than this (pages_sharing)"
    )
    judge_after_full_scans: int = Field(2, ge=1, description="full scans since start before sharing is judged")
    backoff_s: float = Field(3600.0, ge=0, description="how long KSM stays stopped after an unproductive run")

    @model_validator(mode="after")
    def _bounds(self) -> KsmConfig:
        if self.npages_min > self.npages_max:
            raise ValueError(f"npages_min(={self.npages_min}) must be <= npages_max(={self.npages_max})")
        if self.sleep_ms_min > self.sleep_ms_max:
            raise ValueError(f"sleep_ms_min(={self.sleep_ms_min}) must be <= sleep_ms_max(={self.sleep_ms_max})")
        return self


class RunnerConfig(_Section):
    """How the daemon runs."""

    dry_run: bool = Field(False, description="decide and publish, but set no balloon")
    return_to_max_on_exit: bool = Field(False, description="on SIGTERM, deflate every balloon to the guest's maximum")
    log_format: Literal["json", "text"] = Field("json", description="json: one object per line, for journald/Loki")
    status_socket: str = Field(
        "/run/overcommitd/status.sock", description="Unix socket `overcommitd status` reads; empty: none"
    )

    @field_validator("status_socket")
    @classmethod
    def _socket_path(cls, value: str) -> str:
        # sun_path holds 108 bytes with its NUL (unix(7))
        if value and (not value.startswith("/") or len(value.encode()) > 107 or "\0" in value):
            raise ValueError("must be an absolute path of at most 107 bytes, or empty for no status socket")
        return value


class DaemonConfig(_Section):
    """The whole configuration file."""

    interval_s: float = Field(10.0, ge=INTERVAL_MIN_S, le=INTERVAL_MAX_S, description="seconds between control steps")
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    guests: dict[str, GuestOverride] = Field(default_factory=dict)
    hypervisor: HypervisorConfig = Field(default_factory=HypervisorConfig)
    libvirt: LibvirtConfig = Field(default_factory=LibvirtConfig)
    qmp: QmpConfig = Field(default_factory=QmpConfig)
    host: HostConfig = Field(default_factory=HostConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    ksm: KsmConfig = Field(default_factory=KsmConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    @classmethod
    def load(cls, path: Path | None, **cli: object) -> DaemonConfig:
        """Defaults < TOML file < command line (``None`` options are not given)."""
        data = read_toml(path) if path is not None else {}
        data |= {k: v for k, v in cli.items() if v is not None}
        try:
            cfg = cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(path or Path("<command line>"), validation_problems(e)) from e
        if path is not None and cfg.mqtt.password is not None:
            refuse_world_readable(path, "mqtt.password", path)
        if cfg.mqtt.password_file is not None:
            where = path or Path("<command line>")
            mqtt = cfg.mqtt.model_copy(update={"password": read_password(cfg.mqtt.password_file, where)})
            cfg = cfg.model_copy(update={"mqtt": mqtt})
        return cfg

    def override_for(self, guest: GuestSnapshot) -> GuestOverride | None:
        """The override for a guest; one keyed by UUID wins over one keyed by name."""
        return self.guests.get(guest.uuid) or self.guests.get(guest.name)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(path, [("(file)", f"cannot read: {e.strerror or e}")]) from e
    except UnicodeDecodeError as e:
        raise ConfigError(path, [("(file)", f"not UTF-8 text: {e.reason} at byte {e.start}")]) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [("(syntax)", str(e))]) from e
    except RecursionError as e:
        raise ConfigError(path, [("(syntax)", "arrays or tables nested too deeply")]) from e


def refuse_world_readable(path: Path, key: str, config_path: Path) -> None:
    """A file holding the broker password must not be readable by every local user."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise ConfigError(config_path, [(key, f"cannot stat {path}: {e.strerror or e}")]) from e
    if mode & stat.S_IROTH:
        why = f"{path} holds the broker password and is world-readable (mode {stat.S_IMODE(mode):04o})"
        raise ConfigError(config_path, [(key, f"{why}: chmod 0640 {path}")])


def read_password(path: Path, config_path: Path) -> str:
    """``password_file``: its first line, read when the config is loaded."""
    refuse_world_readable(path, "mqtt.password_file", config_path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(config_path, [("mqtt.password_file", f"cannot read {path}: {why}")]) from e
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ConfigError(config_path, [("mqtt.password_file", f"{path} is empty")])
    return password


def validation_problems(e: ValidationError) -> list[tuple[str, str]]:
    """One (dotted key path, message) per pydantic error."""
    return [(".".join(str(p) for p in err["loc"]) or "(top)", err["msg"]) for err in e.errors()]


def config_problems(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Validation errors of a parsed config, empty when it is valid."""
    try:
        DaemonConfig.model_validate(data)
    except ValidationError as e:
        return validation_problems(e)
    return []
