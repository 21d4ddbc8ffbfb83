"""Hostile images through the worker's HTTP path: refused with a clear 400, with bounded peak memory."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import aiohttp
from image_bombs import peak_memory, png_bomb

Ask = Callable[..., dict[str, Any]]


async def test_png_bomb_in_a_data_url_is_refused_within_bounded_memory(
    live_worker: str, ask: Ask, image_url: Callable[..., str]
) -> None:
    url = f"{live_worker}/v1/chat/completions"
    bomb = (
        "data:image/png;base64," + base64.b64encode(png_bomb(256)).decode()
    )  # a 261 KB file whose image data inflates to 256 MiB
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=ask("Warm-up.", image_url(), max_tokens=2)) as resp:
            assert resp.status == 200  # first request's one-off allocations stay out of the figure
        with peak_memory() as peak:
            async with http.post(url, json=ask("What is this?", bomb, max_tokens=2)) as resp:
                status, body = resp.status, await resp.json()
    print(f"PNG bomb, worker data: URL path: peak growth {peak.mib:.1f} MiB")
    assert peak.mib < 64, f"the worker's peak memory grew by {peak.mib:.0f} MiB"
    assert status == 400, body
    assert body["error"]["code"] == "decompression_bomb"
    assert "1×1" in body["error"]["message"]
