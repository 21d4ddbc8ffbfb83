"""Hostile images on the bot's attachment path: refused with a message for the user, with bounded peak memory."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from image_bombs import peak_memory, png_bomb

from bot.attachments import AttachmentRef, AttachmentRefused, fetch_image
from smolcord.settings import Settings


async def test_png_bomb_attachment_is_refused_within_bounded_memory(aiohttp_client: Any, tmp_path) -> None:
    bomb = png_bomb(256)  # a 261 KB file whose image data inflates to 256 MiB

    async def attachment(request: web.Request) -> web.Response:
        return web.Response(body=bomb, content_type="image/png")

    app = web.Application()
    app.router.add_get("/attachments/1/2/bomb.png", attachment)
    cdn = await aiohttp_client(app)
    base = str(cdn.make_url("/attachments/"))
    settings = Settings(_env_file=None, data_dir=tmp_path, attachment_hosts=base)  # type: ignore[call-arg]
    ref = AttachmentRef(
        url=base + "1/2/bomb.png", size=len(bomb), filename="bomb.png", content_type="image/png"
    )

    outcome: object = None
    with peak_memory() as peak:
        try:
            outcome = await fetch_image(cdn.session, ref, settings)
        except AttachmentRefused as refused:
            outcome = refused
    print(f"PNG bomb, bot attachment path: peak growth {peak.mib:.1f} MiB")
    assert peak.mib < 64, f"the bot's peak memory grew by {peak.mib:.0f} MiB"
    assert isinstance(outcome, AttachmentRefused), "a 1×1 PNG of 256 MiB of image data was accepted"
    assert "bomb.png" in str(outcome) and "1×1" in str(outcome)
