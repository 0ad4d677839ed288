"""The JSON on the MQTT topics, as pydantic models: what the daemon publishes and the
commands it accepts. Consumers can validate against the same models.

Topics, under ``<prefix>/<host_id>/``:

* ``status`` (retained): :class:`StatusMessage`; the broker publishes the last will,
  ``online: false``, when the daemon dies without saying goodbye;
* ``host`` (retained): :class:`HostMessage`, the host snapshot of the last tick;
* ``host/shortfall`` (retained): :class:`ShortfallMessage`, what the host lacks even if
  every balloon took all it safely can ("host short by N GiB"), every tick;
* ``ksm`` (retained, only with ``[ksm] enabled``): :class:`KsmMessage`, the KSM
  controller's reading and last adjustment;
* ``guests/<name>/snapshot`` and ``guests/<name>/decision``: :class:`GuestMessage`,
  :class:`DecisionMessage`, every tick; ``guests/<name>/event``: :class:`GuestEventMessage`,
  as libvirt reports them;
* ``command``: a :class:`Command` in; ``command/reply``: its :class:`Reply` out.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import pydantic_core
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from overcommitd.ksm import KsmStatus
from overcommitd.model import Decision, GuestSnapshot, HostSnapshot, Kib
from overcommitd.shortfall import Shortfall


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StatusMessage(_Message):
    online: bool
    dry_run: bool | None = None
    policy: str | None = None
    version: str | None = None


class HostMessage(_Message):
    taken_at_s: float
    mem_total_kib: int
    mem_available_kib: int
    swap_total_kib: int
    swap_free_kib: int
    psi_some_avg10: float | None
    psi_full_avg10: float | None
    ksm_sharing_kib: int
    arc_reclaimable_kib: int = 0  # ZFS ARC above c_min: memory the host can take back from ZFS

    @classmethod
    def of(cls, h: HostSnapshot) -> HostMessage:
        return cls(
            taken_at_s=h.taken_at_s,
            mem_total_kib=h.mem_total_kib,
            mem_available_kib=h.mem_available_kib,
            swap_total_kib=h.swap_total_kib,
            swap_free_kib=h.swap_free_kib,
            psi_some_avg10=h.psi.some_avg10 if h.psi else None,
            psi_full_avg10=h.psi.full_avg10 if h.psi else None,
            ksm_sharing_kib=h.ksm_sharing_kib,
            arc_reclaimable_kib=h.arc_reclaimable_kib,
        )


class ShortfallMessage(_Message):
    """What the host lacks even if every balloon took all it safely can
    (``overcommitd.shortfall``): ``short_kib`` 0 when it has room; ``text`` says it in
    words (``host short by 3.2 GiB``); the terms of the estimate beside it."""

    short_kib: int
    short: bool
    text: str
    need_kib: int  # the guests' irreducible need, summed
    host_own_kib: int  # the host's own use, as estimated (a lower bound)
    mem_total_kib: int
    guests_at_size: int  # guests counted at their current size: no usable stats, or not ballooned

    @classmethod
    def of(cls, s: Shortfall) -> ShortfallMessage:
        return cls(
            short_kib=s.short_kib,
            short=s.short_kib > 0,
            text=s.text(),
            need_kib=s.need_kib,
            host_own_kib=s.host_own_kib,
            mem_total_kib=s.mem_total_kib,
            guests_at_size=s.guests_at_size,
        )


class KsmMessage(_Message):
    """KSM's sysfs values (pages) as last read and the controller's last adjustment
    (``action`` None before the first one; ``error``: this tick's read or write failure)."""

    run: int | None
    pages_to_scan: int | None
    sleep_millisecs: int | None
    pages_shared: int | None
    pages_sharing: int | None
    full_scans: int | None
    action: str | None
    reason: str | None
    free_kib: int | None
    threshold_kib: int | None
    dry_run: bool
    error: str | None = None

    @classmethod
    def of(cls, s: KsmStatus) -> KsmMessage:
        r, d = s.reading, s.adjustment
        return cls(
            run=r.run if r else None,
            pages_to_scan=r.pages_to_scan if r else None,
            sleep_millisecs=r.sleep_millisecs if r else None,
            pages_shared=r.pages_shared if r else None,
            pages_sharing=r.pages_sharing if r else None,
            full_scans=r.full_scans if r else None,
            action=d.action if d else None,
            reason=d.reason if d else None,
            free_kib=d.free_kib if d else None,
            threshold_kib=d.threshold_kib if d else None,
            dry_run=s.dry_run,
            error=s.error,
        )


class GuestMessage(_Message):
    uuid: str
    name: str
    run_state: str
    max_kib: int
    actual_kib: int
    last_target_kib: int | None
    floor_kib: int
    mem_available_kib: int | None  # the guest's MemAvailable (libvirt "usable")
    mem_total_kib: int | None
    stats_last_update_s: float | None
    deflate_on_oom: bool
    migration_pending: bool

    @classmethod
    def of(cls, g: GuestSnapshot) -> GuestMessage:
        s = g.stats
        return cls(
            uuid=g.uuid,
            name=g.name,
            run_state=g.run_state.value,
            max_kib=g.max_kib,
            actual_kib=g.actual_kib,
            last_target_kib=g.last_target_kib,
            floor_kib=g.floor_kib,
            mem_available_kib=s.available_kib() if s else None,
            mem_total_kib=s.mem_total_kib if s else None,
            stats_last_update_s=s.last_update_s if s else None,
            deflate_on_oom=g.features.deflate_on_oom,
            migration_pending=g.migration_pending,
        )


class ClampMessage(_Message):
    reason: str
    before_kib: int | None
    after_kib: int | None
    detail: str


class DecisionMessage(_Message):
    uuid: str
    name: str
    target_kib: int | None
    wish_kib: int | None
    applied: bool  # False in dry-run, or when setting it failed
    clamps: list[ClampMessage]
    policy_reason: str | None = None  # the policy's own word on its wish (PolicyResult.reasons)

    @classmethod
    def of(cls, d: Decision, *, applied: bool) -> DecisionMessage:
        return cls(
            uuid=d.uuid,
            name=d.name,
            target_kib=d.target_kib,
            wish_kib=d.wish_kib,
            applied=applied,
            clamps=[
                ClampMessage(reason=c.reason.value, before_kib=c.before_kib, after_kib=c.after_kib, detail=c.detail)
                for c in d.clamps
            ],
            policy_reason=d.policy_reason,
        )


class GuestEventMessage(_Message):
    """A libvirt event about a guest (lifecycle, balloon change, metadata, migration)."""

    uuid: str
    name: str
    kind: str
    detail: str
    actual_kib: int | None


# -- commands --------------------------------------------------------------------------
#
# Strict on the wire: ``"enabled": "yes"`` or ``1`` is not a boolean, ``"5"`` is not a
# number of seconds; only sizes take a string (``"2GiB"``), through ``Kib``.


def clip(text: str, limit: int = 80) -> str:
    """``repr`` of untrusted text for a log line or a reply, at most ``limit`` characters."""
    shown = repr(text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"


def _guest_name(value: str) -> str:
    """A domain name or UUID as libvirt could hold it: no control characters (a NUL ends
    a C string: libvirt would look up a different name than the one written)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise PydanticCustomError("bad_guest_name", "a guest name has no control characters (NUL, newline...)")
    return value


def _registered_name(value: str) -> str:
    if ":" in value:
        raise PydanticCustomError(
            "policy_path_refused",
            "module:Class policies are accepted in the config file only; name a registered policy",
        )
    return value


GuestName = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(_guest_name)]
PolicyName = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_registered_name)]


class _Command(_Message):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)
    id: str | None = Field(None, max_length=200, description="echoed in the reply, to match them up")


class SetFloor(_Command):
    command: Literal["set-floor"]
    guest: GuestName = Field(description="name or UUID")
    floor_kib: Kib = Field(description="at most the guest's maximum; 0 removes the floor")


class PauseGuest(_Command):
    command: Literal["pause"]
    guest: GuestName


class ResumeGuest(_Command):
    command: Literal["resume"]
    guest: GuestName


class PrepareMigration(_Command):
    """A live migration of ``guest`` is coming: the policy may get the guest ready (the
    ``free-page`` policy leaves free memory to QEMU's hint pass and takes page cache).
    The announcement lapses after ``within_s``, or when the guest leaves this host."""

    command: Literal["prepare-migration"]
    guest: GuestName
    within_s: float = Field(900.0, gt=0, le=86400, description="how long the announcement holds")


class CancelMigration(_Command):
    command: Literal["cancel-migration"]
    guest: GuestName


class SwitchPolicy(_Command):
    """Only registered policies (entry points): a ``module:Class`` name is refused before
    anything is imported."""

    command: Literal["set-policy"]
    name: PolicyName
    params: dict[str, object] = Field(default_factory=dict)  # checked by the registry and the policy's Params


class SetDryRun(_Command):
    command: Literal["dry-run"]
    enabled: StrictBool


Command = Annotated[
    SetFloor | PauseGuest | ResumeGuest | PrepareMigration | CancelMigration | SwitchPolicy | SetDryRun,
    Field(discriminator="command"),
]
_COMMAND = TypeAdapter(Command)

ErrorName = Literal[
    "payload-too-large",  # longer than [mqtt] max_payload_bytes: not parsed, not logged
    "bad-json",
    "invalid-command",  # valid JSON, not a valid command: the message names the field
    "bad-guest-name",  # a control character (NUL...) in a guest name
    "no-such-guest",
    "floor-above-max",  # a floor above the guest's maximum memory
    "policy-path-refused",  # module:Class over MQTT
    "unknown-policy",  # no registered policy of that name
    "bad-policy",  # the policy failed to load, or its params do not validate
    "hypervisor-error",
    "internal-error",  # a bug: logged with its traceback
]
ERROR_NAMES: tuple[ErrorName, ...] = get_args(ErrorName)
# Validation error types that have a name of their own in a reply.
_NAMED_TYPES: dict[str, ErrorName] = {"bad_guest_name": "bad-guest-name", "policy_path_refused": "policy-path-refused"}


class Reply(_Message):
    id: str | None
    ok: bool
    error: ErrorName | None = None
    message: str = ""


class CommandError(Exception):
    """A command that cannot be carried out; ``name`` goes into the reply."""

    def __init__(self, name: ErrorName, message: str, id: str | None = None) -> None:
        super().__init__(message)
        self.name: ErrorName = name
        self.id = id


def parse_command(payload: bytes, topic: str, *, max_bytes: int = 64 * 1024) -> Command:
    """A command from an MQTT payload; CommandError names the bad field and the topic.

    Never raises anything else: pydantic's JSON parser bounds nesting (a ``json_invalid``
    error, where ``json.loads`` raised ``RecursionError``) and numbers (4300 digits)."""
    if len(payload) > max_bytes:
        raise CommandError("payload-too-large", f"{topic}: {len(payload)} bytes, more than the {max_bytes} allowed")
    try:
        return _COMMAND.validate_json(payload)
    except ValidationError as e:
        errors = e.errors(include_input=False, include_url=False)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(payload)'}: {err['msg']}" for err in errors[:5]
        )
        kind: ErrorName = "invalid-command"
        for err in errors:
            if err["type"] == "json_invalid":
                kind = "bad-json"
            kind = _NAMED_TYPES.get(err["type"], kind)
        raise CommandError(kind, f"{topic}: {problems}", _loose_id(payload)) from e


def _loose_id(payload: bytes) -> str | None:
    """The ``id`` of a payload that did not validate, so even the error reply can be matched."""
    try:
        data = pydantic_core.from_json(payload)
    except ValueError:
        return None
    i = data.get("id") if isinstance(data, dict) else None
    return i if isinstance(i, str) and len(i) <= 200 else None
