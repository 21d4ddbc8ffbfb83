"""The HTTP side: request log, auth, bodies, injected failures, and the REST routes for users, guilds and channels."""

from __future__ import annotations

import json
import logging
import mimetypes
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .protocol import API_PREFIX, DiscordError, json_response, unknown
from .records import RECORD, FakeGuild, FakeMessage, Injected, RequestRecord
from .world import World

log = logging.getLogger("fake_discord")


class Rest(World):
    """HTTP plumbing every route shares, and the routes that read the world without changing messages."""

    # ----------------------------------------------------------------- failure injection

    def rate_limit(
        self,
        method: str,
        route: str,
        *,
        retry_after: float = 0.05,
        times: int = 1,
        via: bool = True,
        is_global: bool = False,
    ) -> None:
        """Answer the next ``times`` requests to ``route`` (e.g. "/channels/{channel_id}/messages", or a
        concrete path) with 429.  *trap*: discord.py takes a 429 without a Via header for a Cloudflare
        ban and raises instead of retrying; ``via=False`` reproduces that."""
        headers = {
            "Retry-After": str(max(1, round(retry_after))),
            "X-RateLimit-Limit": "5",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset-After": str(retry_after),
            "X-RateLimit-Bucket": "fake-bucket",
            "X-RateLimit-Scope": "global" if is_global else "user",
        }
        if is_global:
            headers["X-RateLimit-Global"] = "true"
        if via:
            headers["Via"] = "1.1 google"
        body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": is_global}
        self._injected.append(Injected(method.upper(), route, times, 429, body, headers))

    def fail(
        self, method: str, route: str, status: int, *, code: int = 0, message: str = "", times: int = 1
    ) -> None:
        """Answer the next ``times`` requests to ``route`` with an error (e.g. 403 code 50013)."""
        body = {"message": message or f"{status}: injected error", "code": code}
        self._injected.append(Injected(method.upper(), route, times, status, body, {}))

    # ----------------------------------------------------------------- HTTP plumbing

    def _route_of(self, request: web.Request) -> str | None:
        resource = request.match_info.route.resource
        if resource is None:
            return None
        canonical = resource.canonical
        return canonical[len(API_PREFIX) :] if canonical.startswith(API_PREFIX) else canonical

    def _take_injected(self, request: web.Request, route: str | None) -> Injected | None:
        path = request.path[len(API_PREFIX) :] if request.path.startswith(API_PREFIX) else request.path
        for injected in self._injected:
            if injected.method in (request.method, "*") and injected.route in (route, path, request.path):
                injected.times -= 1
                if injected.times <= 0:
                    self._injected.remove(injected)
                return injected
        return None

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        route = self._route_of(request)
        record = RequestRecord(request.method, request.path, route, dict(request.query))
        request[RECORD] = record
        self.requests.append(record)
        try:
            injected = self._take_injected(request, route)
            if injected is not None:
                if injected.status == 429:
                    self._record("rate_limited", {"method": request.method, "path": request.path})
                response: web.StreamResponse = json_response(injected.body, injected.status, injected.headers)
            else:
                if route is not None:  # unknown routes answer 404/405 whoever asks
                    self._check_auth(request)
                response = await handler(request)
        except DiscordError as error:
            response = error.response()
        except web.HTTPException as error:
            if error.status in (404, 405) and route is None:
                self.unhandled.append(record)
                log.warning("fake discord has no route for %s %s", request.method, request.path)
            response = json_response({"message": f"{error.status}: {error.reason}", "code": 0}, error.status)
        record.status = response.status
        return response

    def _check_auth(self, request: web.Request) -> None:
        path = request.path
        if not path.startswith(API_PREFIX) or path.startswith(
            (API_PREFIX + "/webhooks/", API_PREFIX + "/interactions/")
        ):
            return
        if path in (API_PREFIX + "/gateway",):
            return
        if request.headers.get("Authorization") != f"Bot {self.token}":
            raise DiscordError(401, 0, "401: Unauthorized")

    async def _read_body(self, request: web.Request) -> tuple[dict[str, Any], list[tuple[str, bytes, str]]]:
        """The JSON payload (from the body, or payload_json of a multipart body) and uploaded files."""
        uploads: list[tuple[str, bytes, str]] = []
        payload: dict[str, Any] = {}
        if request.content_type == "multipart/form-data":
            form = await request.post()
            if "payload_json" in form:
                payload = json.loads(str(form["payload_json"]))
            indexed = []
            for name, value in form.items():
                if isinstance(value, web.FileField) and name.startswith("files["):
                    data = value.file.read()
                    content_type = mimetypes.guess_type(value.filename)[0] or "application/octet-stream"
                    indexed.append((int(name[6:-1]), (value.filename, data, content_type)))
            uploads = [upload for _, upload in sorted(indexed)]
        elif request.can_read_body:
            payload = await request.json()
        request[RECORD].body = payload
        return payload, uploads

    def _rest_channel(self, request: web.Request) -> dict[str, Any]:
        """The channel of a REST route, as the bot may see it (not in guilds it has left)."""
        channel = self._channel(request.match_info["channel_id"])
        guild = self._guild_of(channel)
        if guild is not None and not guild.bot_present:
            raise DiscordError(403, 50001, "Missing Access")
        return channel

    def _rest_message(self, request: web.Request) -> FakeMessage:
        channel = self._rest_channel(request)
        return self._live_message(request.match_info["message_id"], int(channel["id"]))

    # ----------------------------------------------------------------- REST: misc

    async def _get_gateway(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {"url": self.gateway_url}
        if request.path.endswith("/bot"):
            body.update(
                shards=1,
                session_start_limit={"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1},
            )
        return json_response(body)

    async def _get_me(self, request: web.Request) -> web.Response:
        return json_response({**self.bot_user.to_json(), "verified": True, "mfa_enabled": False, "flags": 0})

    async def _get_user(self, request: web.Request) -> web.Response:
        user = self.users.get(int(request.match_info["user_id"]))
        if user is None:
            raise unknown("User", 10013)
        return json_response(user.to_json())

    async def _get_application(self, request: web.Request) -> web.Response:
        return json_response(self._application_json())

    async def _create_dm(self, request: web.Request) -> web.Response:
        body, _ = await self._read_body(request)
        user = self.users.get(int(body.get("recipient_id", 0)))
        if user is None:
            raise unknown("User", 10013)
        channel = self.dm_channel(user)
        self._record("dm_create", {"user_id": user.id, "channel_id": int(channel["id"])})
        return json_response(channel)

    async def _leave_guild(self, request: web.Request) -> web.Response:
        guild = self.guilds.get(int(request.match_info["guild_id"]))
        if guild is None or not guild.bot_present:
            raise unknown("Guild", 10004)
        self._remove_bot_from(guild)
        self._record("guild_leave", {"guild_id": guild.id})
        return web.Response(status=204)

    def _guild_or_404(self, request: web.Request) -> FakeGuild:
        guild = self.guilds.get(int(request.match_info["guild_id"]))
        if guild is None or not guild.bot_present:
            raise unknown("Guild", 10004)
        return guild

    async def _get_guild(self, request: web.Request) -> web.Response:
        guild = self._guild_or_404(request)
        full = self._guild_create_json(guild, intents=0)
        keep = (
            "channels",
            "members",
            "threads",
            "presences",
            "voice_states",
            "joined_at",
            "large",
            "member_count",
        )
        return json_response({k: v for k, v in full.items() if k not in keep})

    async def _get_guild_channels(self, request: web.Request) -> web.Response:
        return json_response(list(self._guild_or_404(request).channels.values()))

    async def _get_guild_roles(self, request: web.Request) -> web.Response:
        return json_response(list(self._guild_or_404(request).roles.values()))

    async def _get_member(self, request: web.Request) -> web.Response:
        member = self._guild_or_404(request).members.get(int(request.match_info["user_id"]))
        if member is None:
            raise unknown("Member", 10007)
        return json_response(member)

    async def _get_channel(self, request: web.Request) -> web.Response:
        return json_response(self._rest_channel(request))

    async def _typing(self, request: web.Request) -> web.Response:
        channel = self._rest_channel(request)
        self._record("typing", {"channel_id": int(channel["id"])})
        return web.Response(status=204)
