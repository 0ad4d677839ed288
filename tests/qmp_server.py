"""A scripted QMP server: fake QEMU monitors on unix sockets, speaking real QMP.

Each :class:`FakeQemu` answers on its own socket the way QEMU 7.2 does (greeting,
``qmp_capabilities`` negotiation, command replies with the caller's ``id``, ``error``
replies with a class and description, asynchronous events) for the commands the QMP
backend uses, and keeps a log of the commands it received. A test can make it reply with
anything (``guest_stats``), fail one command (``fail``), stop answering (``hang``),
vanish (socket removed) or emit events. All servers of one :class:`FakeQemuHost` share
one event loop in a daemon thread, so a test or a benchmark drives hundreds from plain
synchronous code.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}
MIB = 1024 * 1024


def stats_reply(last_update_s: int, **stats_bytes: int) -> dict[str, Any]:
    """A guest-stats reply: ``stat-*`` keys from keyword names (``free_memory`` ->
    ``stat-free-memory``)."""
    return {"stats": {"stat-" + k.replace("_", "-"): v for k, v in stats_bytes.items()}, "last-update": last_update_s}


async def _messages(reader: asyncio.StreamReader) -> Any:
    """JSON objects as they arrive: QMP is a stream of objects, not of lines (qemu.qmp
    sends no newline after a command)."""
    decoder, buf = json.JSONDecoder(), ""
    while chunk := await reader.read(65536):
        buf += chunk.decode()
        while buf.strip():
            try:
                msg, end = decoder.raw_decode(buf.lstrip())
            except json.JSONDecodeError:
                break  # incomplete: wait for more
            buf = buf.lstrip()[end:]
            yield msg


@dataclass
class FakeQemu:
    """One guest's monitor. Sizes are bytes, as QMP speaks them."""

    path: Path
    name: str | None = "guest"
    uuid: str = "00000000-0000-0000-0000-000000000000"
    base_memory: int = 1024 * MIB
    plugged_memory: int = 0  # hotplugged DIMMs
    actual: int | None = None
    status: str = "running"
    balloon_parent: str | None = "/machine/peripheral"  # None: no balloon device
    balloon_id: str = "balloon0"
    balloon_type: str = "virtio-balloon-pci"
    props: dict[str, object] = field(
        default_factory=lambda: {
            "deflate-on-oom": False,
            "free-page-reporting": False,
            "free-page-hint": False,
            "guest-stats-polling-interval": 0,
        }
    )
    guest_stats: object = None
    fail: dict[str, tuple[str, str]] = field(default_factory=dict)  # command -> (class, desc)
    hang: bool = False
    log: list[str] = field(default_factory=list)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = None

    def __post_init__(self) -> None:
        if self.actual is None:
            self.actual = self.base_memory + self.plugged_memory
        if self.guest_stats is None:
            self.guest_stats = stats_reply(
                1_700_000_000, free_memory=800 * MIB, total_memory=1000 * MIB, available_memory=850 * MIB
            )

    @property
    def balloon_path(self) -> str:
        return f"{self.balloon_parent}/{self.balloon_id}"

    # -- protocol ---------------------------------------------------------------------

    async def serve(self) -> None:
        self._server = await asyncio.start_unix_server(self._client, path=str(self.path))

    async def stop(self, *, unlink: bool = True) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        self._writers.clear()
        if unlink:
            self.path.unlink(missing_ok=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.hang:
            await reader.read()  # accept, never greet
            return
        self._writers.append(writer)
        negotiated = False
        try:
            await self._send(writer, GREETING)
            async for msg in _messages(reader):
                cmd, mid = msg.get("execute"), msg.get("id")
                self.log.append(cmd)
                if self.hang:
                    continue
                if not negotiated:
                    if cmd != "qmp_capabilities":
                        await self._send(writer, self._error("CommandNotFound", "Expecting capabilities", mid))
                        continue
                    negotiated = True
                    await self._send(writer, {"return": {}, "id": mid})
                    continue
                await self._send(writer, self._answer(cmd, msg.get("arguments") or {}, mid))
        except (ConnectionError, json.JSONDecodeError):
            pass
        finally:
            if writer in self._writers:
                self._writers.remove(writer)
            writer.close()

    @staticmethod
    def _error(error_class: str, desc: str, mid: object) -> dict[str, Any]:
        return {"error": {"class": error_class, "desc": desc}, "id": mid}

    async def _send(self, writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        if "id" in obj and obj["id"] is None:  # QEMU echoes an id only when the command had one
            obj = {k: v for k, v in obj.items() if k != "id"}
        writer.write(json.dumps(obj).encode() + b"\r\n")
        await writer.drain()

    def _answer(self, cmd: str, args: dict[str, Any], mid: object) -> dict[str, Any]:
        if cmd in self.fail:
            return self._error(*self.fail[cmd], mid)
        handler: Callable[[dict[str, Any]], object] | None = getattr(self, "_cmd_" + cmd.replace("-", "_"), None)
        if handler is None:
            return self._error("CommandNotFound", f"The command {cmd} has not been found", mid)
        try:
            return {"return": handler(args), "id": mid}
        except KeyError as e:
            return self._error("GenericError", f"Property '{e.args[0]}' not found", mid)

    def _cmd_query_name(self, _: dict[str, Any]) -> object:
        return {"name": self.name} if self.name else {}

    def _cmd_query_uuid(self, _: dict[str, Any]) -> object:
        return {"UUID": self.uuid}

    def _cmd_query_status(self, _: dict[str, Any]) -> object:
        return {"status": self.status, "singlestep": False, "running": self.status == "running"}

    def _cmd_query_memory_size_summary(self, _: dict[str, Any]) -> object:
        return {"base-memory": self.base_memory, "plugged-memory": self.plugged_memory}

    def _cmd_query_balloon(self, _: dict[str, Any]) -> object:
        return {"actual": self.actual}

    def _cmd_qom_list(self, args: dict[str, Any]) -> object:
        out: list[dict[str, str]] = [{"name": "type", "type": "string"}]
        if args["path"] == self.balloon_parent:
            out.append({"name": self.balloon_id, "type": f"child<{self.balloon_type}>"})
        return out

    def _cmd_qom_get(self, args: dict[str, Any]) -> object:
        if args["path"] != self.balloon_path:
            raise KeyError(args["path"])
        if args["property"] == "guest-stats":
            return self.guest_stats
        return self.props[args["property"]]

    def _cmd_qom_set(self, args: dict[str, Any]) -> object:
        if args["path"] != self.balloon_path:
            raise KeyError(args["path"])
        self.props[args["property"]] = args["value"]
        return {}

    def _cmd_balloon(self, args: dict[str, Any]) -> object:
        self.actual = min(int(args["value"]), self.base_memory)
        asyncio.get_running_loop().create_task(self.emit("BALLOON_CHANGE", {"actual": self.actual}))
        return {}

    def _cmd_stop(self, _: dict[str, Any]) -> object:
        self.status = "paused"
        asyncio.get_running_loop().create_task(self.emit("STOP", {}))
        return {}

    def _cmd_cont(self, _: dict[str, Any]) -> object:
        self.status = "running"
        asyncio.get_running_loop().create_task(self.emit("RESUME", {}))
        return {}

    async def emit(self, event: str, data: dict[str, Any]) -> None:
        msg = {"event": event, "data": data, "timestamp": {"seconds": 0, "microseconds": 0}}
        for w in list(self._writers):
            try:
                await self._send(w, msg)
            except ConnectionError:
                pass


class FakeQemuHost:
    """Many FakeQemu servers on one event loop thread; synchronous helpers for tests."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.guests: dict[str, FakeQemu] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-qemu", daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def add(self, stem: str, **kw: Any) -> FakeQemu:
        g = FakeQemu(self.directory / f"{stem}.qmp", **kw)
        self.run(g.serve())
        self.guests[stem] = g
        return g

    def remove(self, stem: str) -> None:
        self.run(self.guests.pop(stem).stop())

    def emit(self, stem: str, event: str, data: dict[str, Any] | None = None) -> None:
        self.run(self.guests[stem].emit(event, data or {}))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run a plain function on the servers' loop (to change a guest's state safely)."""

        async def wrap() -> Any:
            return fn()

        return self.run(wrap())

    def close(self) -> None:
        for g in list(self.guests.values()):
            self.run(g.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
