"""The gateway websocket: HELLO, IDENTIFY / RESUME, heartbeats, and each session's event stream (intents, replay)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from typing import Any

from aiohttp import WSMsgType, web

from .payloads import Payloads
from .protocol import (
    INTENT_DIRECT_MESSAGE_REACTIONS,
    INTENT_DIRECT_MESSAGES,
    INTENT_GUILD_MEMBERS,
    INTENT_GUILD_MESSAGE_REACTIONS,
    INTENT_GUILD_MESSAGES,
    INTENT_GUILDS,
    INTENT_MESSAGE_CONTENT,
    NON_RESUMABLE_CLOSE_CODES,
    OP_DISPATCH,
    OP_HEARTBEAT,
    OP_HEARTBEAT_ACK,
    OP_HELLO,
    OP_IDENTIFY,
    OP_INVALID_SESSION,
    OP_PRESENCE,
    OP_REQUEST_MEMBERS,
    OP_RESUME,
    PRIVILEGED_INTENTS,
)
from .records import Connection, Session

log = logging.getLogger("fake_discord")


class Gateway(Payloads):
    """Dispatches events to the bot's sessions and answers what it sends on the socket."""

    # ----------------------------------------------------------------- test-driven

    async def close_gateway(self, code: int = 4000, reason: str = "") -> None:
        """Close the bot's gateway socket(s) with ``code``.  With a resumable code (4000) discord.py
        reconnects to resume_gateway_url and RESUMEs; events sent meanwhile are replayed then."""
        self._mark = len(self.actions)
        for conn in list(self._connections):
            await self._close_connection(conn, code, reason)

    async def flush(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until every connected socket has been sent everything dispatched so far."""
        for conn in list(self._connections):
            if conn.session is not None and conn.writer is not None and not conn.writer.done():
                try:
                    await asyncio.wait_for(conn.idle.wait(), timeout)
                except TimeoutError:
                    log.warning("gateway writer did not drain within %ss", timeout)

    # ----------------------------------------------------------------- dispatching

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        """Dispatch an event to every live session (buffered for resumes when disconnected)."""
        for session in self._live_sessions():
            self._emit_to(session, event, data)

    def _emit_to(
        self, session: Session, event: str, data: dict[str, Any], only: Connection | None = None
    ) -> None:
        required = self._required_intent(event, data)
        if required and not session.intents & required:
            return
        if event in ("MESSAGE_CREATE", "MESSAGE_UPDATE") and not session.intents & INTENT_MESSAGE_CONTENT:
            data = self._blank_unreadable(data)
        seq = len(session.log) + 1
        # Serialised now: the log is a snapshot, immune to later changes of the records.
        session.log.append((json.dumps({"op": OP_DISPATCH, "t": event, "s": seq, "d": data}), only))
        conn = session.conn
        if conn is not None:
            conn.idle.clear()
            conn.wake.set()

    @staticmethod
    def _required_intent(event: str, data: dict[str, Any]) -> int:
        in_guild = bool(data.get("guild_id"))
        if event.startswith("MESSAGE_REACTION_"):
            return INTENT_GUILD_MESSAGE_REACTIONS if in_guild else INTENT_DIRECT_MESSAGE_REACTIONS
        if event.startswith("MESSAGE_"):
            return INTENT_GUILD_MESSAGES if in_guild else INTENT_DIRECT_MESSAGES
        if event.startswith("GUILD_MEMBER_") and event != "GUILD_MEMBERS_CHUNK":
            return INTENT_GUILD_MEMBERS
        if event.startswith(("GUILD_", "CHANNEL_", "THREAD_")) and event != "GUILD_MEMBERS_CHUNK":
            return INTENT_GUILDS
        return 0

    async def _writer(self, conn: Connection) -> None:
        try:
            while True:
                session = conn.session
                assert session is not None
                while conn.cursor < len(session.log):
                    text, only = session.log[conn.cursor]
                    conn.cursor += 1
                    if only is None or only is conn:
                        await conn.ws.send_str(text)
                conn.idle.set()
                await conn.wake.wait()
                conn.wake.clear()
        except (ConnectionError, RuntimeError):
            pass  # the socket went away; what was not delivered stays in the log for a resume
        finally:
            conn.idle.set()

    def _attach(self, conn: Connection, session: Session, cursor: int) -> None:
        conn.session = session
        conn.cursor = cursor
        session.conn = conn
        conn.idle.clear()
        conn.writer = asyncio.create_task(self._writer(conn), name="fake-discord-gateway-writer")

    async def _close_connection(
        self, conn: Connection, code: int, reason: str = "", *, wait: bool = True
    ) -> None:
        """Close a gateway socket from the server side (``wait=False`` from inside its own handler)."""
        session = conn.session
        if session is not None and session.conn is conn:
            session.conn = None
            if code in NON_RESUMABLE_CLOSE_CODES:
                session.alive = False
        if conn.writer is not None:
            conn.writer.cancel()
        conn.server_close_code = code
        with contextlib.suppress(ConnectionError, RuntimeError):
            await conn.ws.close(code=code, message=reason.encode())
        if wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.closed.wait(), 5)

    async def _send_op(self, conn: Connection, op: int, data: Any) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await conn.ws.send_str(json.dumps({"op": op, "d": data, "s": None, "t": None}))

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        conn = Connection(ws=ws, path=request.path, query=dict(request.query))
        self._connections.add(conn)
        try:
            await self._send_op(conn, OP_HELLO, {"heartbeat_interval": int(self.heartbeat_interval * 1000)})
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await self._on_gateway_message(conn, json.loads(msg.data))
                else:
                    await self._close_connection(conn, 4002, "Error while decoding payload.", wait=False)
        finally:
            self._connections.discard(conn)
            if conn.writer is not None:
                conn.writer.cancel()
            session = conn.session
            if session is not None and session.conn is conn:
                session.conn = None
                # A 1000/1001 close ends the session for good.  (discord.py's own shutdown usually
                # arrives as 4000: its reader task wins aiohttp's close race, so it stays resumable.)
                if ws.close_code in NON_RESUMABLE_CLOSE_CODES:
                    session.alive = False
            self._record(
                "disconnect",
                {
                    "code": ws.close_code,
                    "by_server": conn.server_close_code,
                    "session_id": session.id if session else None,
                },
            )
            conn.closed.set()
        return ws

    async def _on_gateway_message(self, conn: Connection, payload: dict[str, Any]) -> None:
        op, data = payload.get("op"), payload.get("d")
        if op == OP_HEARTBEAT:
            self.heartbeats += 1
            await self._send_op(conn, OP_HEARTBEAT_ACK, None)
        elif op == OP_IDENTIFY:
            await self._identify(conn, data or {})
        elif op == OP_RESUME:
            await self._resume(conn, data or {})
        elif op == OP_PRESENCE:
            self._record("presence", data or {})
        elif op == OP_REQUEST_MEMBERS and conn.session is not None:
            self._members_chunk(conn.session, data or {})
        elif op not in (4,):  # voice state updates are accepted and ignored
            await self._close_connection(conn, 4001, "Unknown opcode.", wait=False)

    async def _identify(self, conn: Connection, data: dict[str, Any]) -> None:
        if conn.session is not None:
            await self._close_connection(conn, 4005, "Already authenticated.", wait=False)
            return
        if data.get("token") != self.token:
            await self._close_connection(conn, 4004, "Authentication failed.", wait=False)
            return
        intents = int(data.get("intents", 0))
        if intents & PRIVILEGED_INTENTS & ~self.privileged_intents:
            # *trap*: asking for a privileged intent the portal has not enabled closes with 4014.
            await self._close_connection(conn, 4014, "Disallowed intent(s).", wait=False)
            return
        session = Session(id=secrets.token_hex(16), intents=intents, shard=data.get("shard"))
        self._sessions[session.id] = session
        self._record(
            "identify",
            {
                "session_id": session.id,
                "intents": intents,
                "shard": session.shard,
                "path": conn.path,
                "query": conn.query,
            },
        )
        self._attach(conn, session, cursor=0)
        self._emit_to(session, "READY", self._ready_json(session), only=conn)
        for guild in self.guilds.values():
            if guild.bot_present and self._in_shard(guild.id, session):
                self._emit_to(session, "GUILD_CREATE", self._guild_create_json(guild, session.intents))

    async def _resume(self, conn: Connection, data: dict[str, Any]) -> None:
        session = self._sessions.get(str(data.get("session_id")))
        if session is None or not session.alive or data.get("token") != self.token:
            self._record("invalid_session", {"session_id": data.get("session_id"), "path": conn.path})
            await self._send_op(conn, OP_INVALID_SESSION, False)
            return
        if session.conn is not None and session.conn is not conn:
            old = session.conn
            session.conn = None
            self._background(self._close_connection(old, 4000, "Resumed elsewhere."))
        seq = min(int(data.get("seq") or 0), len(session.log))
        replayed = sum(1 for _, only in session.log[seq:] if only is None)
        self._record(
            "resume", {"session_id": session.id, "seq": seq, "replayed": replayed, "path": conn.path}
        )
        self._attach(conn, session, cursor=seq)
        self._emit_to(session, "RESUMED", {}, only=conn)

    def _members_chunk(self, session: Session, data: dict[str, Any]) -> None:
        guild = self.guilds.get(int(data.get("guild_id", 0)))
        if guild is None:
            return
        query, limit = str(data.get("query") or ""), int(data.get("limit") or 0)
        wanted = {int(u) for u in data.get("user_ids") or []}
        members = [
            m
            for user_id, m in guild.members.items()
            if (not wanted or user_id in wanted) and m["user"]["username"].startswith(query)
        ]
        chunk = {
            "guild_id": str(guild.id),
            "members": members[: limit or None],
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
        }
        if data.get("nonce") is not None:
            chunk["nonce"] = data["nonce"]
        self._emit_to(session, "GUILD_MEMBERS_CHUNK", chunk)

    def _background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)
