"""The bot against a model backend without adapter endpoints (an OpenAI-compatible server such as vLLM).

Tested against the real worker with SMOLCORD_ADAPTER_ENDPOINTS off: answering works, and what asks
the backend to switch adapters (`/smolcord rollback`, the training job's notification) says
plainly that it could not, instead of failing.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from test_bot.test_chat import answer_to, ask, fast
from test_bot.test_training_commands import add_version, run_command

from feedback.training.publish import tell_worker
from smolcord.worker_client import WorkerClient

pytestmark = pytest.mark.timeout(60)


async def test_a_backend_without_adapter_endpoints_answers_and_switching_degrades(start_bot) -> None:
    async with start_bot(max_tokens=8, worker_settings={"adapter_endpoints": False}) as world:
        fast(world)
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{world.worker_url}/v1/adapters/load", json={"version": "base"}
            ) as response:
                assert response.status == 404, "the backend really has no adapter endpoint"

        [answer] = await answer_to(world, await ask(world))
        assert answer.content.splitlines()[-1].startswith("-# smolcord base")

        registry, owner = world.bot.registry, world.fake.owner
        v1, v2 = add_version(registry), add_version(registry)
        _, rolled = await run_command(world, "smolcord rollback", owner)
        assert f"Rolled back from {v2} to **{v1}**" in rolled.content
        assert "has no adapter endpoint" in rolled.content and "vLLM runbook" in rolled.content
        assert registry.current() == v1, "the registry moved; the backend is the operator's to switch"

        _, status = await run_command(world, "smolcord status", owner)
        assert "Worker: ✅" in status.content and f"current **{v1}**" in status.content

        # the training job's notification, as it runs after a promotion (in its own process, no loop)
        said = await asyncio.to_thread(tell_worker, world.settings, v1)
        assert "did not load" in said and "404" in said


async def test_the_model_name_is_sent_when_configured(aiohttp_client: Any) -> None:
    """SMOLCORD_WORKER_MODEL becomes the requests' `model` (vLLM picks a LoRA by it and echoes it)."""
    bodies: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        bodies.append(body)
        model = body.get("model") or "base-model"
        return web.json_response(
            {"model": model, "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_client(app)
    url = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        plain = await WorkerClient(http, url).chat([{"role": "user", "content": "hi"}])
        named = await WorkerClient(http, url, model="smolvlm:v3").chat([{"role": "user", "content": "hi"}])
    assert "model" not in bodies[0] and bodies[1]["model"] == "smolvlm:v3"
    assert (plain.model, named.model) == ("base-model", "smolvlm:v3")
    assert json.dumps(bodies[1]["messages"]) == json.dumps([{"role": "user", "content": "hi"}])
