"""A test-side MQTT client: collect what the daemon publishes, send commands, wait for
a message matching a predicate (polling with generous timeouts)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, Self

import aiomqtt


class Probe:
    def __init__(self, port: int, topic: str, **client_args: Any) -> None:
        self.client_args = client_args  # e.g. username, password, tls_context
        self.port = port
        self.topic = topic
        self.messages: list[tuple[str, Any, bool]] = []  # (topic, decoded JSON, retained)
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 20)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, **self.client_args) as client:
            self._client = client
            await client.subscribe(self.topic, qos=1)
            self._ready.set()
            async for m in client.messages:
                try:
                    body = json.loads(bytes(m.payload))
                except (ValueError, RecursionError):  # the fuzz test's own hostile commands
                    body = m.payload
                self.messages.append((str(m.topic), body, bool(m.retain)))

    async def send(self, topic: str, payload: str | bytes) -> None:
        assert self._client is not None
        await self._client.publish(topic, payload, qos=1)

    async def wait_for(self, pred: Callable[[str, Any], bool], timeout_s: float = 60, what: str = "message") -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        seen = 0
        while True:
            for topic, body, _ in self.messages[seen:]:
                if pred(topic, body):
                    return body
            seen = 0  # predicates may depend on order; rescan everything
            if loop.time() > deadline:
                tail = [t for t, _, _ in self.messages[-10:]]
                raise TimeoutError(f"no {what} within {timeout_s} s; last topics: {tail}")
            await asyncio.sleep(0.1)
