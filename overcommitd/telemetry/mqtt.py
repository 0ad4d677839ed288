"""MQTT telemetry and commands (aiomqtt), kept off the control loop's path.

The control loop calls :meth:`MqttLink.offer`, which never waits: the message goes into a
bounded buffer, and when the buffer is full the oldest message is dropped and counted
(fresh telemetry beats stale). A background task owns the broker connection: it drains
the buffer, answers commands, and on any broker error waits (doubling, capped) and
reconnects. Retained messages (status, host state) are re-sent on every reconnect so a
consumer that subscribes later, or a broker that restarted, sees the current state.

The last will, ``status = {"online": false}`` retained, is what the broker publishes when
the daemon dies or loses its connection without a goodbye (MQTT 3.1.1 §3.1.2.5). A clean
DISCONNECT discards the will, so every clean way out (``stop()``, a failed session that
is about to reconnect) publishes ``online: false`` itself first.

Nothing received can stop the task: a payload is size-checked before it is parsed, every
failure while handling one is logged and answered (``internal-error`` at worst), and a
failure of the session itself is logged and the session restarted with backoff.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiomqtt
from pydantic import BaseModel

from overcommitd import package_version
from overcommitd.config import MqttConfig
from overcommitd.telemetry.messages import Command, CommandError, Reply, StatusMessage, clip, parse_command

log = logging.getLogger(__name__)

BROKER_ERRORS = (aiomqtt.MqttError, OSError, ssl.SSLError)
_REPLY_TEXT_MAX = 1000  # characters of an error message echoed in a reply or a log line

CommandHandler = Callable[[Command], Awaitable[Reply]]


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    retain: bool = False


class Topics:
    """Every topic under ``<prefix>/<host_id>``."""

    def __init__(self, prefix: str, host_id: str) -> None:
        self.base = f"{prefix.rstrip('/')}/{host_id}"
        self.status = f"{self.base}/status"
        self.host = f"{self.base}/host"
        self.shortfall = f"{self.base}/host/shortfall"
        self.ksm = f"{self.base}/ksm"
        self.command = f"{self.base}/command"
        self.reply = f"{self.base}/command/reply"

    def guest(self, name: str, what: str) -> str:
        # '+', '#' and '/' are topic syntax; a guest name may contain them.
        safe = name.replace("/", "_").replace("+", "_").replace("#", "_")
        return f"{self.base}/guests/{safe}/{what}"


class MqttLink:
    """The daemon's side of MQTT. ``start()`` launches the connection task;
    ``offer()`` queues telemetry; ``stop()`` says goodbye and closes."""

    def __init__(self, cfg: MqttConfig, handler: CommandHandler, status: Callable[[], StatusMessage]) -> None:
        self.cfg = cfg
        self.handler = handler
        self.status = status
        self.topics = Topics(cfg.topic_prefix, cfg.host_id or socket.gethostname())
        self.buffer: collections.deque[Outgoing] = collections.deque()
        self.retained: dict[str, Outgoing] = {}  # latest retained message per topic
        self.dropped_total = 0
        self.published_total = 0
        self.connected = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: aiomqtt.Client | None = None

    # -- the loop's side: never blocks ------------------------------------------------------

    def offer(self, topic: str, message: BaseModel, *, retain: bool = False) -> None:
        out = Outgoing(topic, message.model_dump_json().encode(), retain)
        if retain:
            self.retained[topic] = out
        if len(self.buffer) >= self.cfg.buffer_size:
            self.buffer.popleft()
            self.dropped_total += 1
        self.buffer.append(out)
        self._wake.set()

    # -- the connection task ----------------------------------------------------------------

    def start(self) -> None:
        if self.cfg.commands and not self.cfg.authenticated:
            log.warning(
                "mqtt: commands are on without authentication (allow_unauthenticated_commands): anyone who can"
                " publish on %s can change this host's policy and floors",
                self.topics.command,
                extra={"event": "unauthenticated-commands"},
            )
        self._task = asyncio.create_task(self._run(), name="mqtt")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Flush what we can, publish ``online: false`` retained, disconnect."""
        client = self._client
        if client is not None and self.connected:
            try:
                async with asyncio.timeout(timeout_s):
                    while self.buffer and self.connected:  # the publishing task drains it
                        await asyncio.sleep(0.05)
                    await self._say_offline(client)
            except (*BROKER_ERRORS, TimeoutError) as e:
                log.warning("mqtt: goodbye not sent: %s", e)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def _client_args(self) -> aiomqtt.Client:
        cfg = self.cfg
        offline = StatusMessage(online=False, version=package_version()).model_dump_json()
        will = aiomqtt.Will(self.topics.status, offline, qos=1, retain=True)
        tls_context = None
        if cfg.tls:
            tls_context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
            if cfg.cert_file is not None and cfg.key_file is not None:
                tls_context.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        return aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=cfg.password,
            will=will,
            keepalive=cfg.keepalive_s,
            tls_context=tls_context,
            timeout=10,
            identifier=f"overcommitd-{self.topics.base.replace('/', '-')}",
        )

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        goodbye = StatusMessage(online=False, version=package_version()).model_dump_json().encode()
        await client.publish(self.topics.status, goodbye, qos=1, retain=True)

    async def _run(self) -> None:
        """Connect, serve, and on any failure log it, wait (doubling, capped) and start over.
        Only cancellation (``stop()``) ends it."""
        backoff_s = self.cfg.reconnect_min_s
        while True:
            try:
                async with self._client_args() as client:
                    self._client, self.connected = client, True
                    backoff_s = self.cfg.reconnect_min_s
                    log.info("mqtt: connected to %s:%d", self.cfg.host, self.cfg.port)
                    await self._session(client)
            except* BROKER_ERRORS as eg:
                log.warning(
                    "mqtt: broker %s:%d unavailable (%s); retrying in %.1f s",
                    self.cfg.host,
                    self.cfg.port,
                    eg.exceptions[0],
                    backoff_s,
                )
            except* Exception as eg:
                log.error(
                    "mqtt: session failed; reconnecting in %.1f s",
                    backoff_s,
                    exc_info=eg.exceptions[0],
                    extra={"event": "mqtt-session-failed"},
                )
            finally:
                self._client, self.connected = None, False
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, self.cfg.reconnect_max_s)

    async def _session(self, client: aiomqtt.Client) -> None:
        """One connection's work. A failure that is not the broker's says ``online: false``
        before the clean disconnect that would otherwise discard the last will."""
        try:
            if self.cfg.commands:
                await client.subscribe(self.topics.command, qos=1)
            await client.publish(self.topics.status, self.status().model_dump_json(), qos=1, retain=True)
            for out in list(self.retained.values()):
                await client.publish(out.topic, out.payload, retain=True)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._publish_forever(client))
                if self.cfg.commands:
                    tg.create_task(self._commands(client))
        except* BROKER_ERRORS:
            raise
        except* Exception:
            try:
                async with asyncio.timeout(5):
                    await self._say_offline(client)
            except (*BROKER_ERRORS, TimeoutError) as e:
                log.warning("mqtt: offline status not sent: %s", e)
            raise

    async def _drain(self, client: aiomqtt.Client) -> None:
        while self.buffer:
            out = self.buffer[0]
            await client.publish(out.topic, out.payload, qos=0, retain=out.retain)
            self.buffer.popleft()  # only once sent: an outage keeps it buffered
            self.published_total += 1

    async def _publish_forever(self, client: aiomqtt.Client) -> None:
        while True:
            await self._drain(client)
            self._wake.clear()
            if not self.buffer:
                await self._wake.wait()

    async def _commands(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
                reply = await self._handle(payload, str(message.topic))
            except Exception as e:  # a bug in the handling itself: still answered
                log.exception("mqtt: a command on %s could not be handled", message.topic)
                reply = Reply(id=None, ok=False, error="internal-error", message=_text(f"{type(e).__name__}: {e}"))
            await client.publish(self.topics.reply, reply.model_dump_json(), qos=1)

    async def _handle(self, payload: bytes, topic: str) -> Reply:
        try:
            command = parse_command(payload, topic, max_bytes=self.cfg.max_payload_bytes)
        except CommandError as e:
            log.warning(
                "mqtt: rejected command (%s, %d bytes starting %s): %s",
                e.name,
                len(payload),
                clip(payload[:64].decode(errors="replace"), 64),
                _text(str(e)),
                extra={"event": "command-rejected", "error": e.name},
            )
            return Reply(id=e.id, ok=False, error=e.name, message=_text(str(e)))
        try:
            return await self.handler(command)
        except CommandError as e:
            log.warning("mqtt: command %s refused (%s): %s", command.command, e.name, _text(str(e)))
            return Reply(id=command.id, ok=False, error=e.name, message=_text(str(e)))
        except Exception as e:
            log.exception("mqtt: command %s failed", command.command)
            return Reply(id=command.id, ok=False, error="internal-error", message=_text(f"{type(e).__name__}: {e}"))


def _text(message: str) -> str:
    """An error message as it goes into a reply or a log line: bounded."""
    return message if len(message) <= _REPLY_TEXT_MAX else f"{message[:_REPLY_TEXT_MAX]}... (truncated)"
