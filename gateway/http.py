"""The gateway's own HTTP routes: health, readiness and metrics (Prometheus text format).

The front ends' routes (``/dicomweb``, ``/api``, ``/view``, the viewer) are added by the
composition root, :mod:`gateway.server`.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from gateway.core import Gateway
from gateway.metrics import METRICS

logger = logging.getLogger(__name__)

GATEWAY = web.AppKey("gateway", Gateway)
MEDIA_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the index answers and the data folder is writable with room left."""
    gateway = request.app[GATEWAY]
    problems: list[str] = []
    try:
        await asyncio.to_thread(gateway.index.ping)
    except Exception as exc:
        problems.append(f"index unreachable: {type(exc).__name__}")
    try:
        await asyncio.to_thread(gateway.storage.check_space, 0)
    except Exception as exc:
        problems.append(str(exc))
    if problems:
        return web.json_response({"status": "unavailable", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    counts = await asyncio.to_thread(gateway.index.counts)
    for name, value in counts.items():
        METRICS.set(f"gateway_index_{name}", value)
    METRICS.set("gateway_storage_free_bytes", await asyncio.to_thread(gateway.storage.free_bytes))
    return web.Response(body=METRICS.render().encode(), headers={"Content-Type": MEDIA_PROMETHEUS})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
