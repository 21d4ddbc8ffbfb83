"""Typed keys of the worker app's shared resources (one module, so app.py and routes.py both import it)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from model.batching import BatchScheduler
from model.bodies import BodyReader
from model.engine import Engine
from model.metrics import WorkerMetrics
from smolcord.registry import AdapterRegistry
from smolcord.settings import Settings

__all__ = [
    "bodies_key",
    "encoder_key",
    "engine_key",
    "metrics_key",
    "registry_key",
    "scheduler_key",
    "settings_key",
]

settings_key = web.AppKey("settings", Settings)
engine_key = web.AppKey("engine", Engine)
scheduler_key = web.AppKey("scheduler", BatchScheduler)
registry_key = web.AppKey("registry", AdapterRegistry)
metrics_key = web.AppKey("metrics", WorkerMetrics)
bodies_key = web.AppKey("bodies", BodyReader)  # request bodies: size limit and the shared byte budget
encoder_key = web.AppKey("encoder", ThreadPoolExecutor)  # decodes images and tokenises, off the event loop
