"""FakeDiscord itself: the aiohttp server on loopback, its route table, and running a client against it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Iterator

import discord
import discord.asset
import discord.gateway
import discord.http
import yarl
from aiohttp import web

from .interactions import Interactions
from .protocol import API_PREFIX

log = logging.getLogger("fake_discord")


@contextlib.contextmanager
def patch_discord_urls(api_base: str, gateway: str, cdn_base: str | None = None) -> Iterator[None]:
    """Point discord.py's REST base, default gateway (and asset CDN) somewhere else, then restore them."""
    saved = (
        discord.http.Route.BASE,
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY,
        discord.asset.Asset.BASE,
    )
    discord.http.Route.BASE = api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)
    if cdn_base is not None:
        discord.asset.Asset.BASE = cdn_base
    try:
        yield
    finally:
        (
            discord.http.Route.BASE,
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY,
            discord.asset.Asset.BASE,
        ) = saved


class FakeDiscord(Interactions):
    """A fake Discord server on 127.0.0.1 (ephemeral port) for discord.py clients under test."""

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        self._add_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        if self._patch:
            self._patcher = contextlib.ExitStack()
            self._patcher.enter_context(
                patch_discord_urls(self.api_base, self.gateway_url, self.base_url + "/cdn")
            )
        log.debug("fake discord on port %d", self.port)

    async def stop(self) -> None:
        for conn in list(self._connections):
            await self._close_connection(conn, 1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._patcher is not None:
            self._patcher.close()
            self._patcher = None

    @contextlib.asynccontextmanager
    async def run_client(
        self, client: discord.Client, *, ready_timeout: float = 10.0
    ) -> AsyncIterator[discord.Client]:
        """Start ``client`` against the fake, wait for on_ready, and close it cleanly on exit."""
        task = asyncio.create_task(client.start(self.token), name="fake-discord-client")
        deadline = asyncio.get_running_loop().time() + ready_timeout
        try:
            while not client.is_ready():
                if task.done():
                    task.result()  # raises what stopped the client
                    raise RuntimeError("the client stopped before it was ready")
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"client not ready after {ready_timeout}s; actions: {self._summary()}")
                await asyncio.sleep(0.01)
            yield client
        finally:
            crashed = task.exception() if task.done() and not task.cancelled() else None
            in_flight = sys.exc_info()[1]
            # client.start does not close the HTTP session when it fails; close() always does.
            await client.close()
            if not task.done():
                try:
                    await asyncio.wait_for(task, timeout=5)
                except TimeoutError:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if crashed is not None and in_flight is None:
                raise crashed  # the client died while the test was using it

    # ----------------------------------------------------------------- routes

    def _add_routes(self, app: web.Application) -> None:
        p = API_PREFIX
        ch = p + r"/channels/{channel_id:\d+}"
        msg = ch + r"/messages/{message_id:\d+}"
        app_cmds = p + r"/applications/{application_id:\d+}"
        app.add_routes(
            [
                web.get("/gateway", self._gateway),
                web.get("/resume-gateway", self._gateway),
                web.get(p + "/gateway", self._get_gateway),
                web.get(p + "/gateway/bot", self._get_gateway),
                web.get(p + "/users/@me", self._get_me),
                web.get(p + r"/users/{user_id:\d+}", self._get_user),
                web.post(p + "/users/@me/channels", self._create_dm),
                web.delete(p + r"/users/@me/guilds/{guild_id:\d+}", self._leave_guild),
                web.get(p + "/oauth2/applications/@me", self._get_application),
                web.get(p + "/applications/@me", self._get_application),
                web.get(app_cmds + "/commands", self._commands),
                web.put(app_cmds + "/commands", self._commands),
                web.post(app_cmds + "/commands", self._commands),
                web.route("*", app_cmds + r"/commands/{command_id:\d+}", self._command),
                web.get(app_cmds + r"/guilds/{guild_id:\d+}/commands", self._commands),
                web.put(app_cmds + r"/guilds/{guild_id:\d+}/commands", self._commands),
                web.post(app_cmds + r"/guilds/{guild_id:\d+}/commands", self._commands),
                web.route("*", app_cmds + r"/guilds/{guild_id:\d+}/commands/{command_id:\d+}", self._command),
                web.get(p + r"/guilds/{guild_id:\d+}", self._get_guild),
                web.get(p + r"/guilds/{guild_id:\d+}/channels", self._get_guild_channels),
                web.get(p + r"/guilds/{guild_id:\d+}/roles", self._get_guild_roles),
                web.get(p + r"/guilds/{guild_id:\d+}/members/{user_id:\d+}", self._get_member),
                web.get(ch, self._get_channel),
                web.post(ch + "/typing", self._typing),
                web.post(ch + "/messages/bulk-delete", self._bulk_delete_route),
                web.get(ch + "/messages", self._history),
                web.post(ch + "/messages", self._create_message),
                web.get(msg, self._get_message),
                web.patch(msg, self._edit_message),
                web.delete(msg, self._delete_message),
                web.delete(msg + "/reactions", self._clear_reactions_route),
                web.get(msg + "/reactions/{emoji}", self._reaction_users),
                web.delete(msg + "/reactions/{emoji}", self._clear_emoji_route),
                web.put(msg + "/reactions/{emoji}/{user}", self._put_reaction),
                web.delete(msg + "/reactions/{emoji}/{user}", self._delete_reaction),
                web.post(
                    p + r"/interactions/{interaction_id:\d+}/{token}/callback", self._interaction_callback
                ),
                web.post(p + r"/webhooks/{application_id:\d+}/{token}", self._webhook_execute),
                web.route(
                    "*",
                    p + r"/webhooks/{application_id:\d+}/{token}/messages/{message_id}",
                    self._webhook_message,
                ),
                web.get("/cdn/attachments/{key}/{filename}", self._cdn_file),
            ]
        )
