"""The server's own HTTP routes at the root: health, readiness and metrics (Prometheus text
format), and the middleware that times every request.

The composition root (:mod:`gateway.server`) adds them to the root application, with
:data:`~dicomweb.context.GATEWAY` set there, beside the front ends' routes (``/dicomweb``,
``/fhir``, ``/api``, ``/view``, the viewer). They live in this package because it is the
HTTP front end of the core's data; the core itself imports no aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from dicomweb.context import GATEWAY
from gateway.metrics import CONTENT_TYPE, METRICS

logger = logging.getLogger(__name__)

MEDIA_PROMETHEUS = CONTENT_TYPE
HTTP_LATENCY = "gateway_http_request_seconds"
UNMATCHED_ROUTE = "unmatched"  # a path no route knows: not one label per path asked


def route_label(request: web.Request) -> str:
    """The pattern of the route that served ``request`` (``/dicomweb/studies/{study}``), so
    that the label's values are as few as the routes."""
    route = request.match_info.route
    resource = route.resource
    if resource is None or getattr(request.match_info, "http_exception", None) is not None:
        return UNMATCHED_ROUTE
    return resource.canonical


@web.middleware
async def latency_middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                             ) -> web.StreamResponse:
    """Observe each request's duration (to its response's head; a streamed body's time is in
    the handler) in :data:`HTTP_LATENCY`, by route pattern, method and status."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        METRICS.observe(HTTP_LATENCY, time.perf_counter() - started,
                        route=route_label(request), method=request.method, status=str(status))


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
        await asyncio.to_thread(gateway.storage.check_ready)
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
    return web.Response(body=METRICS.render(), headers={"Content-Type": MEDIA_PROMETHEUS})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
