"""Composition root: one process serving DIMSE and HTTP over the same core.

With :mod:`gateway.cli` (which reaches the front ends only through this module and
``viewer_links.cli``), the only modules of ``gateway`` that import a front end or aiohttp
(tests/test_layering.py). It builds the root application: the health and metrics routes
(:mod:`dicomweb.health`), ``/api``, ``/view`` and ``/iid`` (``viewer_links``), ``/dicomweb``
and ``/fhir`` (``dicomweb``), the viewer last; and injects what one front end needs from
another: the link service as DICOMweb's :class:`~gateway.access.AccessPolicy`, DICOMweb's
error middleware into the portal API, so that every route answers an error alike
(:mod:`gateway.http_status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import selectors
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from pynetdicom.transport import ThreadedAssociationServer

import viewer_links
from dicomweb.app import create_app as create_dicomweb_app
from dicomweb.context import GATEWAY
from dicomweb.context import MOUNT as DICOMWEB_MOUNT
from dicomweb.fhir import MOUNT as FHIR_MOUNT
from dicomweb.fhir import create_app as create_fhir_app
from dicomweb.health import add_routes, latency_middleware
from dicomweb.problems import problem_middleware, problem_response
from dimse.peers import is_loopback
from dimse.scp import start_server as start_dimse
from gateway.access import AccessPolicy
from gateway.config import Settings, SettingsError
from gateway.core import Gateway
from gateway.errors import DemoNotOnLoopback, GatewayError
from gateway.events import EventService
from gateway.forwarded import Network, client_address, parse_networks
from gateway.http_status import problem

logger = logging.getLogger(__name__)


def check_demo(settings: Settings) -> None:
    """Refuse demo mode unless every listener is bound to a loopback address."""
    if not settings.demo:
        return
    for name, host in (("http", settings.http.host), ("dimse", settings.dimse.host)):
        if not is_loopback(host):
            raise DemoNotOnLoopback(
                f"demo mode lets anyone read and write, so every listener must be on loopback; "
                f"[{name}] host is {host!r}. Use 127.0.0.1 or turn demo mode off."
            )


# Host names a browser uses for this machine; demo mode answers only these (DNS rebinding).
LOOPBACK_HOST_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def is_loopback_host(host: str) -> bool:
    """Whether a ``Host`` header names this machine by a loopback name or address.

    >>> is_loopback_host("localhost:8080"), is_loopback_host("[::1]:80")
    (True, True)
    >>> is_loopback_host("evil.example:8080"), is_loopback_host("127.0.0.1.evil.example")
    (False, False)
    """
    name = host.strip().lower()
    if name.startswith("["):
        name = name[:name.find("]") + 1]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    name = name.rstrip(".")
    return (name in LOOPBACK_HOST_NAMES or name.endswith(".localhost")
            or (name.startswith("127.") and is_loopback(name)))


@web.middleware
async def demo_host_middleware(request: web.Request,
                               handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                               ) -> web.StreamResponse:
    """In demo mode, answer only requests addressed to a loopback host name.

    Demo mode lets anonymous callers read and write, trusting that only this machine can
    reach the loopback listener. A web page can still reach it through the visitor's
    browser by DNS rebinding (its own name made to resolve to 127.0.0.1): the browser then
    sends that name in ``Host``, which this check refuses (421 Misdirected Request).
    """
    host = request.headers.get("Host")
    if request.app[GATEWAY].settings.demo and host is not None and not is_loopback_host(host):
        return problem_response(problem(
            421, "demo mode answers only requests to localhost or a loopback address, "
                 "not to the host named in this request"))
    return await handler(request)


def forwarded_middleware(networks: tuple[Network, ...]) -> Any:
    """Give each request its client's address as ``request.remote`` when it comes through a
    trusted proxy (:mod:`gateway.forwarded`), for every front end's trail and limits."""

    @web.middleware
    async def middleware(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                         ) -> web.StreamResponse:
        peer = request.remote or ""
        client = client_address(peer, request.headers.getall("X-Forwarded-For", []), networks)
        return await handler(request if client == peer else request.clone(remote=client))

    return middleware


def create_app(gateway: Gateway, access_policy: AccessPolicy | None = None) -> web.Application:
    """The root aiohttp application with every HTTP front end mounted.

    ``access_policy`` resolves viewer-session cookies for DICOMweb (``viewer_links``); without
    one, no cookie grants anything (:class:`~gateway.access.NoSessions`).
    """
    # Every body read whole (the portal API's JSON) is bounded by http.max_json_bytes; STOW-RS
    # streams its body from request.content, bounded by http.max_upload_bytes itself.
    proxies = parse_networks(gateway.settings.http.trusted_proxies)
    app = web.Application(client_max_size=gateway.settings.http.max_json_bytes,
                          middlewares=[forwarded_middleware(proxies), latency_middleware,
                                       demo_host_middleware])
    app[GATEWAY] = gateway
    add_routes(app)
    # Viewer links: the portal API, /view and /iid; their service is the AccessPolicy that
    # resolves viewer-session cookies, and the trail is the persistent audit sink.
    links = viewer_links.build_service(gateway)
    viewer_links.mount_api(app, links, errors=problem_middleware)
    app.add_subapp(DICOMWEB_MOUNT, create_dicomweb_app(gateway, access_policy or links))
    # FHIR R4 ImagingStudy over the same index, principals and trail (DESIGN.md).
    app.add_subapp(FHIR_MOUNT, create_fhir_app(gateway, access_policy or links))
    viewer_links.mount_viewer(app, links)  # last: OHIF answers every path left (SPA)
    return app


def http_keepalive_timeout(settings: Settings) -> float:
    """The keep-alive timeout of aiohttp's connection handler: it bounds request heads too.

    aiohttp has no timeout of its own for a request's head: a connection that sends a partial
    request line or header and then trickles (slowloris) is closed only by the keep-alive
    timer, which runs from the connection's start and from the end of each response until a
    complete head arrives. Its default is an hour; ``[http] idle_timeout`` bounds it.
    """
    return settings.http.idle_timeout


def freeze_startup_objects() -> None:
    """Exclude the objects alive at startup from the garbage collector's full collections.

    The pydicom data dictionary, SQLAlchemy's mappers and the imported modules make ~100,000
    long-lived objects; every full (generation 2) collection walks them all, which took
    50-150 ms on a 2-core machine and landed in the middle of random QIDO responses and
    C-STORE round trips. ``gc.freeze()`` moves them to the permanent generation (Python docs,
    ``gc``). Process-wide, hence here in the composition root.
    """
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def listen_errors(name: str, host: str, port: int) -> Iterator[None]:
    """Turn a listener that cannot bind (port taken, address not here, port below 1024 without
    the right) into a :class:`SettingsError` naming the settings to change."""
    try:
        yield
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise SettingsError(
            f"cannot listen for {name} on {host}:{port}: {reason.lower()}; stop what listens "
            f"there or set GATEWAY_{name}_PORT / GATEWAY_{name}_HOST "
            f"([{name.lower()}] port, host)") from None


class Server:
    """DIMSE and HTTP listeners of one gateway process."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.dimse: ThreadedAssociationServer | None = None
        self.runner: web.AppRunner | None = None
        self.http_port: int | None = None
        self.dimse_port: int | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.events: EventService | None = None

    async def start(self) -> None:
        settings = self.gateway.settings
        check_demo(settings)
        with listen_errors("DIMSE", settings.dimse.host, settings.dimse.port):
            dimse = start_dimse(self.gateway)
        self.dimse = dimse
        self.dimse_port = int(dimse.server_address[1])
        self.workers = [spawn_dimse_worker(self.dimse_port)
                        for _ in range(settings.dimse.workers - 1)]
        for worker in self.workers:  # "ready" means every process takes associations
            await asyncio.to_thread(wait_until_listening, worker)
        self.runner = web.AppRunner(create_app(self.gateway), access_log=None,
                                    keepalive_timeout=http_keepalive_timeout(settings))
        await self.runner.setup()
        freeze_startup_objects()
        site = web.TCPSite(self.runner, settings.http.host, settings.http.port)
        with listen_errors("HTTP", settings.http.host, settings.http.port):
            await site.start()
        server = site._server  # noqa: SLF001 - aiohttp exposes no bound port otherwise
        sockets = getattr(server, "sockets", None) or []
        self.http_port = sockets[0].getsockname()[1] if sockets else settings.http.port
        logger.info("HTTP listening on http://%s:%s", settings.http.host, self.http_port)
        # The stable-study scan and the webhook deliveries (gateway.events).
        self.events = EventService(self.gateway.index, settings.events, WebhookSession())
        await self.events.start()
        # One line a supervisor (or a test) can wait for.
        print(f"gateway ready: dimse={self.dimse_port} http={self.http_port}", flush=True)

    async def stop(self) -> None:
        if self.events is not None:
            await self.events.stop()
            self.events = None
        for worker in self.workers:
            await asyncio.to_thread(stop_dimse_worker, worker)
        self.workers = []
        if self.dimse is not None:
            await asyncio.to_thread(self.dimse.shutdown)
            self.dimse = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class WebhookSession:
    """Webhook deliveries with aiohttp's client on the server's loop: the
    :class:`gateway.events.WebhookClient` the composition root gives the event service."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str],
                   timeout: float) -> str | None:
        if self._session is None:  # made on the loop that sends
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(url, data=body, headers=dict(headers),
                                          allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=timeout)
                                          ) as response:
                await response.read()
                return None if 200 <= response.status < 300 else f"HTTP {response.status}"
        except TimeoutError:
            return f"no answer within {timeout:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # refused, reset, bad answer
            return f"{type(exc).__name__}: {exc}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


WORKER_LISTENING = b"dimse worker listening\n"
WORKER_START_TIMEOUT = 60.0  # seconds for a worker process to import, open and listen


def spawn_dimse_worker(port: int) -> subprocess.Popen[bytes]:
    """Start a DIMSE-only worker process on the shared port; it stops when its stdin closes.

    It writes :data:`WORKER_LISTENING` on its stdout once it takes associations.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "dimse-worker", "--port", str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=os.environ.copy(),
    )


def wait_until_listening(worker: subprocess.Popen[bytes],
                         timeout: float = WORKER_START_TIMEOUT) -> None:
    """Return once ``worker`` listens; else kill it and raise :class:`GatewayError` (it ended,
    wrote something else, or stayed silent for ``timeout`` seconds)."""
    assert worker.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(worker.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout)
    line = worker.stdout.readline() if ready else b""
    worker.stdout.close()
    if line == WORKER_LISTENING:
        return
    worker.kill()  # nothing to a process that has already ended: its exit status stays
    status = worker.wait()
    if not ready:
        raise GatewayError(f"a DIMSE worker process did not listen within {timeout:g} s")
    raise GatewayError(f"a DIMSE worker process did not start (exit status {status})")


def stop_dimse_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.stdin:
        worker.stdin.close()
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def run_dimse_worker(gateway: Gateway, port: int) -> None:
    """Serve DIMSE on ``port`` (bound by the main process too) until stdin closes."""
    server = start_dimse(gateway, port=port)
    freeze_startup_objects()
    sys.stdout.buffer.write(WORKER_LISTENING)
    sys.stdout.buffer.flush()
    try:
        sys.stdin.buffer.read()
    finally:
        server.shutdown()


@contextlib.asynccontextmanager
async def running(gateway: Gateway) -> AsyncIterator[Server]:
    server = Server(gateway)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


async def serve_forever(gateway: Gateway) -> None:
    """Serve until SIGINT or SIGTERM, then stop listening and let running work finish."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running(gateway):
        await stop.wait()
        logger.info("stopping")
