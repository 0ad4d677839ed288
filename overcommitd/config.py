"""The daemon's configuration: one pydantic model per TOML table, loaded with tomllib.

Every key is documented in ``config.example.toml`` at the top of the repository. Unknown
keys are errors (a typo must not silently fall back to a default), and each error names
the key's dotted path. Precedence: defaults < TOML file < command line.

Memory sizes take an integer (KiB, libvirt's unit) or a string with a binary unit:
``"512MiB"``, ``"4 GiB"``, ``"1.5GiB"``.
"""

from __future__ import annotations

import os
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
    model_config = ConfigDict(frozen=True, extra="forbid")


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
    stale_after_periods: float = Field(3.0, gt=0, description="stats older than this many polling periods are stale")
    stale_after_min_s: float = Field(30.0, gt=0, description="... and older than this many seconds")
    auto_deflate_tolerance_kib: Kib = Field(2 * 1024, description="actual above target by more means auto-deflate")
    auto_deflate_cooldown_s: float = Field(600.0, ge=0, description="no inflation after an auto-deflate for this long")
    settle_s: float = Field(
        5.0, ge=0, description="a balloon given its target less than this long ago is still moving, not stopped short"
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
    weight: float | None = Field(None, gt=0, description="share relative to other guests (default 1)")


class LibvirtConfig(_Section):
    """How to reach libvirt, and what to set up on guests."""

    uri: str = Field("qemu:///system", min_length=1, description="libvirt connection URI")
    enable_stats_period_s: int = Field(
        0, ge=0, description="set this stats polling period on guests that have none (0: leave them)"
    )
    reconnect_min_s: float = Field(1.0, gt=0, description="first wait before reconnecting to libvirtd")
    reconnect_max_s: float = Field(60.0, gt=0, description="longest wait between reconnect attempts")
    keepalive_interval_s: int = Field(5, ge=0, description="libvirt keepalive probe interval (0: off)")
    keepalive_count: int = Field(3, ge=1, description="unanswered probes before the connection is dropped")


class HostConfig(_Section):
    """Where the host's memory files are (only tests change these)."""

    meminfo_path: Path = Path("/proc/meminfo")
    psi_memory_path: Path = Path("/proc/pressure/memory")
    ksm_dir: Path = Path("/sys/kernel/mm/ksm")


class MqttConfig(_Section):
    """Telemetry and commands over MQTT. Off unless ``enabled``."""

    enabled: bool = False
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    tls: bool = Field(False, description="connect with TLS (port 8883 by convention)")
    ca_file: Path | None = Field(None, description="CA bundle for TLS; system CAs if unset")
    cert_file: Path | None = Field(None, description="client certificate for TLS client auth")
    key_file: Path | None = None
    topic_prefix: str = Field("overcommitd", min_length=1, description="topics are <prefix>/<host_id>/...")
    host_id: str | None = Field(None, description="this host's name in topics (default: the hostname)")
    keepalive_s: int = Field(30, ge=5)
    buffer_size: int = Field(
        10000, ge=1, description="telemetry messages held while the broker is away; a tick queues 2 per guest + 1"
    )
    reconnect_min_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _key_with_cert(self) -> MqttConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        return self


class MetricsConfig(_Section):
    """The Prometheus ``/metrics`` endpoint. Off unless ``enabled``."""

    enabled: bool = False
    address: str = Field("127.0.0.1", description="listen address; 0.0.0.0 for all")
    port: int = Field(9477, ge=0, le=65535, description="0 picks a free port")


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

    interval_s: float = Field(10.0, gt=0, description="seconds between control steps")
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    guests: dict[str, GuestOverride] = Field(default_factory=dict)
    libvirt: LibvirtConfig = Field(default_factory=LibvirtConfig)
    host: HostConfig = Field(default_factory=HostConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    @classmethod
    def load(cls, path: Path | None, **cli: object) -> DaemonConfig:
        """Defaults < TOML file < command line (``None`` options are not given)."""
        data = read_toml(path) if path is not None else {}
        data |= {k: v for k, v in cli.items() if v is not None}
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(path or Path("<command line>"), validation_problems(e)) from e

    def override_for(self, guest: GuestSnapshot) -> GuestOverride | None:
        """The override for a guest; one keyed by UUID wins over one keyed by name."""
        return self.guests.get(guest.uuid) or self.guests.get(guest.name)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(path, [("(file)", f"cannot read: {e.strerror or e}")]) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [("(syntax)", str(e))]) from e


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
