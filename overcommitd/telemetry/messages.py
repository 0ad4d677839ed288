"""The JSON on the MQTT topics, as pydantic models: what the daemon publishes and the
commands it accepts. Consumers can validate against the same models.

Topics, under ``<prefix>/<host_id>/``:

* ``status`` (retained): :class:`StatusMessage`; the broker publishes the last will,
  ``online: false``, when the daemon dies without saying goodbye;
* ``host`` (retained): :class:`HostMessage`, the host snapshot of the last tick;
* ``guests/<name>/snapshot`` and ``guests/<name>/decision``: :class:`GuestMessage`,
  :class:`DecisionMessage`, every tick; ``guests/<name>/event``: :class:`GuestEventMessage`,
  as libvirt reports them;
* ``command``: a :class:`Command` in; ``command/reply``: its :class:`Reply` out.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from overcommitd.model import Decision, GuestSnapshot, HostSnapshot, Kib


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


class _Command(_Message):
    id: str | None = Field(None, max_length=200, description="echoed in the reply, to match them up")


class SetFloor(_Command):
    command: Literal["set-floor"]
    guest: str = Field(min_length=1, description="name or UUID")
    floor_kib: Kib


class PauseGuest(_Command):
    command: Literal["pause"]
    guest: str = Field(min_length=1)


class ResumeGuest(_Command):
    command: Literal["resume"]
    guest: str = Field(min_length=1)


class PrepareMigration(_Command):
    """A live migration of ``guest`` is coming: the policy may get the guest ready (the
    ``free-page`` policy leaves free memory to QEMU's hint pass and takes page cache).
    The announcement lapses after ``within_s``, or when the guest leaves this host."""

    command: Literal["prepare-migration"]
    guest: str = Field(min_length=1)
    within_s: float = Field(900.0, gt=0, le=86400, description="how long the announcement holds")


class CancelMigration(_Command):
    command: Literal["cancel-migration"]
    guest: str = Field(min_length=1)


class SwitchPolicy(_Command):
    command: Literal["set-policy"]
    name: str = Field(min_length=1)
    params: dict[str, object] = Field(default_factory=dict)


class SetDryRun(_Command):
    command: Literal["dry-run"]
    enabled: bool


Command = Annotated[
    SetFloor | PauseGuest | ResumeGuest | PrepareMigration | CancelMigration | SwitchPolicy | SetDryRun,
    Field(discriminator="command"),
]
_COMMAND = TypeAdapter(Command)

ErrorName = Literal["bad-json", "invalid-command", "no-such-guest", "bad-policy", "hypervisor-error", "internal-error"]


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


def parse_command(payload: bytes, topic: str) -> Command:
    """A command from an MQTT payload; CommandError names the bad field and the topic."""
    try:
        return _COMMAND.validate_json(payload)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(payload)'}: {err['msg']}" for err in e.errors()
        )
        kind: ErrorName = "bad-json" if any(err["type"] == "json_invalid" for err in e.errors()) else "invalid-command"
        raise CommandError(kind, f"{topic}: {problems}", _loose_id(payload)) from e


def _loose_id(payload: bytes) -> str | None:
    """The ``id`` of a payload that did not validate, so even the error reply can be matched."""
    import json

    try:
        data = json.loads(payload)
    except ValueError:
        return None
    i = data.get("id") if isinstance(data, dict) else None
    return i if isinstance(i, str) else None
